"""The ``lmprog`` command line: check, models, generate, demo (run/batch arrive with the end-to-end issue)."""

from __future__ import annotations

import argparse
import sys


def _cmd_check(args) -> int:
    from lmprog.program import check_files

    return check_files(args.files, sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmprog", description="Probabilistic programs over language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="parse and check .lmp files; exit 0 if all are valid, 2 otherwise")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
