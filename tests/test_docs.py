"""What the README tells a newcomer: every figure in it comes from a results file that BENCHMARKS.md's summary
table names, and the everyday DVC commands it lists print what it says (the real dvc CLI, the tiny project)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, dvc

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
# a figure: a number with a decimal point or thousands separators (1.399, 12.16, 5,329); plain integers are sizes,
# counts and settings (6 layers, 500 characters, -j 4), not measurements
FIGURE = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?![\w.]*\d)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def prose(markdown: str) -> str:
    """The text a reader reads as sentences: without code blocks, inline code, HTML comments and link targets."""
    markdown = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    markdown = re.sub(r"<!--.*?-->", " ", markdown, flags=re.S)
    markdown = re.sub(r"`[^`]*`", " ", markdown)
    return re.sub(r"\]\([^)]*\)", "]", markdown)


def figures(markdown: str) -> list[str]:
    """Every figure in the prose of a markdown text, as written."""
    return FIGURE.findall(prose(markdown))


def summary_sources(benchmarks: str) -> list[tuple[Path, str | None]]:
    """The results files that BENCHMARKS.md's first table names in its "results file" column, each with the key
    the row reads (`file.json` (`a.b`)), or None where the row names the whole file."""
    table = [line for line in benchmarks.split("\n## ", 2)[1].splitlines() if line.startswith("|")]
    column = [cell.strip() for cell in table[0].strip("|").split("|")].index("results file")
    sources = []
    for row in table[2:]:
        names = re.findall(r"`([^`]+)`", row.strip("|").split("|")[column])
        sources.append((RESULTS / names[0], names[1] if len(names) > 1 else None))
    return sources


def values(path: Path, key: str | None = None) -> list[float]:
    """Every number a results file holds (under `key`, a dotted path into a JSON file), or every number written
    in a log."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return [float(n) for n in NUMBER.findall(text)]

    def walk(node: object) -> list[float]:
        if isinstance(node, dict):
            return [v for item in node.values() for v in walk(item)]
        if isinstance(node, list):
            return [v for item in node for v in walk(item)]
        if isinstance(node, str):
            return [float(n) for n in NUMBER.findall(node)]
        return [float(node)] if isinstance(node, int | float) and not isinstance(node, bool) else []

    node = json.loads(text)
    for part in key.split(".") if key else []:
        node = node[part]
    return walk(node)


def found(figure: str, numbers: list[float]) -> bool:
    """Whether a figure, as written, is one of the numbers rounded to the figure's precision."""
    value = float(figure.replace(",", ""))
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return any(abs(round(n, decimals) - value) < 10 ** -(decimals + 3) for n in numbers)


def test_figures_are_found_in_the_prose_only() -> None:
    text = "Best **1.399** (3 seeds, 5,329 tokens/s).\n```bash\ndvc exp run -S x=0.5\n```\n`-S y=1.5` [a](v1.2.png)"
    assert figures(text) == ["1.399", "5,329"]
    assert found("1.40", [1.3989]) and found("5,329", [5329.0]) and not found("1.399", [1.3979])


def test_every_figure_in_the_readme_is_in_a_results_file_of_the_summary_table() -> None:
    sources = summary_sources((PROJECT_ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"))
    missing_files = [f.name for f, _ in sources if not f.is_file()]
    assert not missing_files, f"BENCHMARKS.md's table names results files that are not there: {missing_files}"
    numbers = [n for f, key in sources for n in values(f, key)]

    readme = figures((PROJECT_ROOT / "README.md").read_text(encoding="utf-8"))

    assert readme, "no figures found in README.md: has the pattern stopped matching?"
    unsourced = [figure for figure in readme if not found(figure, numbers)]
    assert not unsourced, f"README.md figures in no results file of BENCHMARKS.md's table: {unsourced}"


def test_the_readme_fits_its_budget_and_starts_the_quick_start_early() -> None:
    lines = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    assert lines.index("## Quick start") < 40


def anchors(page: Path) -> set[str]:
    """The #fragments of a markdown page's headings, as GitHub makes them."""
    text = re.sub(r"```.*?```", " ", page.read_text(encoding="utf-8"), flags=re.S)  # a `# comment` is no heading
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_local_link_of_the_docs_resolves() -> None:
    pages = [PROJECT_ROOT / "README.md", PROJECT_ROOT / "BENCHMARKS.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path = (page.parent / target) if target else page
            if not path.exists() or (fragment and path.suffix == ".md" and fragment not in anchors(path)):
                broken.append(f"{page.relative_to(PROJECT_ROOT)}: {target}#{fragment}")
    assert not broken, broken


def test_the_readme_picture_is_drawn_from_committed_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (picture,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    # the command in benchmarks/plot.py's docstring that draws it, run with its output elsewhere
    doc = (PROJECT_ROOT / "benchmarks" / "plot.py").read_text(encoding="utf-8")
    command = re.search(r"python -m benchmarks\.plot --steps (.+?) -o " + re.escape(picture), doc, flags=re.S)
    assert command, f"benchmarks/plot.py does not say how {picture} is drawn"
    args = shlex.split(re.sub(r"\\+\n", " ", command.group(1)))  # the docstring's line continuations

    subprocess.run(
        [sys.executable, "-m", "benchmarks.plot", "--steps", *args, "-o", str(tmp_path / "picture.png")],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
    )

    assert (tmp_path / "picture.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_readme_everyday_commands_print_what_it_says(reproduced_project: Path) -> None:
    project = reproduced_project

    assert "Data and pipelines are up to date." in dvc(project, "status").stdout
    drawing = dvc(project, "dag").stdout
    assert all(stage in drawing for stage in ("validate", "download", "encode", "train", "sample"))
    assert "best_val_loss" in dvc(project, "metrics", "show").stdout
    assert dvc(project, "params", "diff").stdout.strip() == ""  # nothing differs from HEAD yet
    dvc(project, "exp", "run", "-S", "sample.temperature=0.5")
    changed = dvc(project, "params", "diff").stdout
    assert "sample.temperature" in changed and "0.5" in changed, changed
    dvc(project, "plots", "show")
    assert (project / "dvc_plots" / "index.html").is_file()
