"""What every ``res2det`` subcommand shares: plain-text tables and the user-error convention."""
from __future__ import annotations

import argparse
import sys

from ..errors import Res2DetError


def text_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run; a user error (``Res2DetError``) is one line on stderr and exit code 2, no traceback."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Res2DetError as e:
        print(f"res2det: error: {e}", file=sys.stderr)
        return 2
    return 0
