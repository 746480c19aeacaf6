"""The plots that `dvc plots show` and `dvc plots diff` draw, in the tiny project with the real dvc CLI: every chart
is a named one with a title and labelled axes, and the page they write opens with no network."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import dvc

pytestmark = pytest.mark.slow

REMOTE = ("http://", "https://", "//")


class _Page(HTMLParser):
    """Every src and href of a page's tags, and the text of its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [(tag, value) for name, value in attrs if name in ("src", "href") and value is not None]
        self._in_script = tag == "script" and not any(name == "src" for name, _ in attrs)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline.append(data)


def parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def assert_opens_offline(page: Path) -> None:
    parsed = parse(page)
    remote = [link for link in parsed.links if link[1].lower().startswith(REMOTE)]
    assert not remote, f"{page} loads from the network: {remote}"
    missing = [src for tag, src in parsed.links if tag == "script" and not (page.parent / src).is_file()]
    assert not missing, f"{page} names scripts that are not there: {missing}"
    # the three libraries that draw the charts are on the page itself (vega-embed is what DVC's divs call)
    code = "".join(parsed.inline)
    for library in ("vega={}", "vegaLite={}", "vegaEmbed=t("):  # each UMD build's global
        assert f"self).{library}" in code, f"{page} does not carry {library.split('=')[0]}"


def axes(spec: object) -> list[dict[str, str]]:
    """Every x and y encoding of a vega-lite spec, its layers' included."""
    if isinstance(spec, list):
        return [axis for item in spec for axis in axes(item)]
    if not isinstance(spec, dict):
        return []
    own = [spec["encoding"][a] for a in ("x", "y") if a in spec.get("encoding", {}) and "field" in spec["encoding"][a]]
    return own + [axis for key, value in spec.items() if key != "encoding" for axis in axes(value)]


def test_every_chart_is_named_titled_and_has_labelled_axes(reproduced_project: Path) -> None:
    shown = json.loads(dvc(reproduced_project, "plots", "show", "--json").stdout)["data"]

    for name, renders in shown.items():
        spec = renders[0]["content"]
        # DVC's default chart of a file is titled with the file's path
        assert not spec["title"]["text"].endswith(".tsv"), f"{name}: DVC's default chart of a file"
        found = axes(spec)
        assert found, name
        # an axis without a label of its own is titled with the column's name
        unlabelled = [axis["field"] for axis in found if axis.get("title", axis["field"]) == axis["field"]]
        assert not unlabelled, f"{name}: axes without a label: {unlabelled}"


@pytest.mark.parametrize("command", [("plots", "show"), ("plots", "diff", "HEAD")])
def test_the_plots_page_loads_nothing_from_the_network(reproduced_project: Path, command: tuple[str, ...]) -> None:
    dvc(reproduced_project, *command)  # the default place, as a user runs it
    moved = reproduced_project.parent / "elsewhere"
    dvc(reproduced_project, *command, "-o", str(moved))  # and wherever -o puts it

    for page in (reproduced_project / "dvc_plots" / "index.html", moved / "index.html"):
        assert '<div id = "loss">' in page.read_text(encoding="utf-8")
        assert_opens_offline(page)
