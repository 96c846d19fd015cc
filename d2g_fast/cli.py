"""The ``d2g`` command.

Each subcommand lives in its own module, listed in ``SUBCOMMANDS`` (name -> module path). A
module provides:
    HELP: str                                  one line for ``d2g --help``
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int       the exit status
and imports its heavy dependencies inside ``run`` so that ``d2g --help`` stays fast. To add a
subcommand, write the module and add one line here.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, str] = {
    "collect": "d2g_fast.teacher.collect_cmd",
    "verify": "d2g_fast.teacher.verify_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2g", description="Distil diffusion models into one-step conditional GANs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_path in SUBCOMMANDS.items():
        module = importlib.import_module(module_path)
        p = sub.add_parser(name, help=getattr(module, "HELP", None),
                           description=getattr(module, "DESCRIPTION", getattr(module, "HELP", None)),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        # Bad input: one clear line naming the argument, no traceback.
        print(f"d2g {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
