"""Write template.html, DVC's plots page with vega, vega-lite and vega-embed inlined, from their npm packages.

    cd "$(mktemp -d)" && npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    python vendor/vega/build.py /that/folder      # from the project root

DVC's own page loads these three scripts from a CDN, so without a network its charts are blank. This page carries
them: `plots.html_template` in .dvc/config points `dvc plots show` and `dvc plots diff` at it. Inlined rather than
linked, so the page works wherever `-o` writes it. Only each package's minified build goes in, without its
source-map comment (the map is not shipped).
"""

import hashlib
import re
import sys
import tarfile
from pathlib import Path

PACKAGES = (("vega", "5.33.1"), ("vega-lite", "5.23.0"), ("vega-embed", "6.29.0"))

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
{inlined}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def minified_build(folder: Path, name: str, version: str) -> str:
    """The package's build/<name>.min.js from its npm tarball, source-map comment removed."""
    with tarfile.open(folder / f"{name}-{version}.tgz") as tar:
        member = tar.extractfile(f"package/build/{name}.min.js")
        if member is None:
            raise SystemExit(f"error: {name}-{version}.tgz has no build/{name}.min.js")
        code = member.read().decode("utf-8")
    code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", code)
    if "</script" in code.lower() or any(f"{{{p}}}" in code for p in ("scripts", "plot_divs", "refresh_tag")):
        raise SystemExit(f"error: {name} holds text that would end the inline script or that DVC would replace")
    return code


def main() -> None:
    folder = Path(sys.argv[1])
    scripts = []
    for name, version in PACKAGES:
        code = minified_build(folder, name, version)
        digest = hashlib.sha256(code.encode("utf-8")).hexdigest()
        print(f"{name} {version}: {len(code):,} bytes, sha256 {digest}")
        scripts.append(
            f"    <!-- {name} {version} (npm), BSD-3-Clause: LICENSE-{name}.txt -->\n<script>{code}</script>"
        )
    # .replace, not .format: the page keeps {refresh_tag} and {plot_divs} for DVC to fill
    page = PAGE.replace("{inlined}", "\n".join(scripts))
    out = Path(__file__).with_name("template.html")
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
