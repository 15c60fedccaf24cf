"""The `glimpse` command line.  Every user error is one line on stderr and a non-zero exit.

    parser.py     the subcommands and their arguments
    commands.py   what each subcommand does
"""

from __future__ import annotations

import os
import sys

from glimpse.cli.parser import build_parser
from glimpse.errors import GlimpseError


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GlimpseError as e:
        print(f"glimpse: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("glimpse: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("GLIMPSE_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"glimpse: internal error: {type(e).__name__}: {first} (set GLIMPSE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
