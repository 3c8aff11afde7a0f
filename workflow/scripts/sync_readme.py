"""Keep the README's result blocks equal to the committed result files, so no figure in it can go stale.

A block in README.md is delimited by two HTML comments and holds a file's content verbatim:

    <!-- include results/quick/tables/table2_accuracy.md -->
    ...the file's content, written by this script...
    <!-- end include -->

``python workflow/scripts/sync_readme.py`` rewrites every block from its file; ``--check`` only reports blocks
that differ (exit 1), which the test suite runs. A block naming a missing file is an error either way.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- include (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


def render(readme: str, root: Path = ROOT) -> str:
    """The README with every include block's body replaced by its file's current content."""

    def fill(match: re.Match[str]) -> str:
        source = root / match.group("path")
        if not source.is_file():
            raise FileNotFoundError(f"README includes {match.group('path')}, which does not exist")
        body = source.read_text(encoding="utf-8")
        return f"{match.group(1)}{body if body.endswith(chr(10)) else body + chr(10)}{match.group(4)}"

    return BLOCK.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale blocks instead of rewriting them")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        rendered = render(text, args.readme.resolve().parent)
    except FileNotFoundError as exc:
        print(f"sync_readme: {exc}", file=sys.stderr)
        return 2
    if rendered == text:
        return 0
    if args.check:
        stale = [
            m.group("path") for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(rendered)) if m.group(0) != n.group(0)
        ]
        print(f"sync_readme: README blocks differ from {', '.join(stale)}; run `make readme`", file=sys.stderr)
        return 1
    args.readme.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
