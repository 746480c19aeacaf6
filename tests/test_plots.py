"""The plots that `dvc plots show` and `dvc plots diff` draw, in the tiny project with the real dvc CLI: every chart
is a named one with a title and labelled axes, and the page they write opens with no network."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import dvc

pytestmark = pytest.mark.slow

REMOTE = ("http://", "https://", "//")

# Runs a plots page's inline scripts in node, no browser: loads the libraries the page carries, collects the charts
# its divs hand to vegaEmbed, and renders each with vega's headless SVG renderer; prints [div id, SVG] per chart.
RENDER = """
const vm = require("vm");
const [libraries, charts] = JSON.parse(require("fs").readFileSync(0, "utf8"));
for (const code of libraries) vm.runInThisContext(code);
const specs = [];
globalThis.vegaEmbed = (id, spec) => specs.push([id, spec]);
for (const code of charts) vm.runInThisContext(code);
Promise.all(specs.map(async ([id, spec]) => {
  const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), { renderer: "none" });
  return [id, await view.toSVG()];
})).then((svgs) => console.log(JSON.stringify(svgs)));
"""
# a line mark drawn through at least two points
LINE = re.compile(r'class="mark-line role-mark[^"]*"[^>]*><path[^>]*d="M[\d.,-]+L')


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


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's scripts")
def test_the_page_draws_every_chart_with_the_scripts_it_carries(reproduced_project: Path, tmp_path: Path) -> None:
    dvc(reproduced_project, "plots", "show")
    render = tmp_path / "render.js"  # a file, not `node -e`: there `module` is defined and the builds would not
    render.write_text(RENDER, encoding="utf-8")  # make the globals that a page's scripts use
    scripts = parse(reproduced_project / "dvc_plots" / "index.html").inline
    libraries = [code for code in scripts if "vegaEmbed('#" not in code]
    charts = [code for code in scripts if "vegaEmbed('#" in code]

    result = subprocess.run(
        ["node", str(render)], input=json.dumps([libraries, charts]), capture_output=True, text=True, check=True
    )

    drawn = dict(json.loads(result.stdout))
    assert set(drawn) == {"#loss", "#metrics_train_loss_tsv", "#metrics_val_loss_tsv"}
    for chart, svg in drawn.items():
        assert LINE.search(svg), f"{chart}: no line drawn"
    assert "Train and validation loss" in drawn["#loss"] and "optimizer step" in drawn["#loss"]
