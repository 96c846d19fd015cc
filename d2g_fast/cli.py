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
import os
import sys

SUBCOMMANDS: dict[str, str] = {
    "collect": "d2g_fast.teacher.collect_cmd",
    "verify": "d2g_fast.teacher.verify_cmd",
    "distill": "d2g_fast.train.distill_cmd",
    "export": "d2g_fast.train.export_cmd",
    "sample": "d2g_fast.train.sample_cmd",
    "demo": "d2g_fast.demo",
    "lpips": "d2g_fast.lpips.cli",
    "eval": "d2g_fast.eval.eval_cmd",
    "compare": "d2g_fast.eval.compare_cmd",
    "toy": "d2g_fast.toy.cli",
    "bench": "d2g_fast.bench.cli",
    "plan": "d2g_fast.plan.cli",
}


class _Unavailable:
    def __init__(self, name, module_path, exc):
        self.name, self.module_path, self.exc = name, module_path, exc

    def run(self, args) -> int:
        print(f"d2g {self.name}: unavailable, importing {self.module_path} failed: "
              f"{type(self.exc).__name__}: {self.exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2g", description="Distil diffusion models into one-step conditional GANs.")
    parser.add_argument("--preempt-signals", default=None, metavar="SIGNALS",
                        help="signals that make distill/collect/eval/lpips save and exit with "
                             "status 75 (requeue), e.g. SIGUSR2 or SIGTERM,SIGUSR1 (default: "
                             "$D2G_PREEMPT_SIGNALS, else SIGTERM,SIGUSR1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_path in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_path)
        except Exception as exc:  # one broken subcommand must not take the others down
            p = sub.add_parser(name, help=f"(unavailable: {type(exc).__name__})")
            p.set_defaults(_module=_Unavailable(name, module_path, exc))
            continue
        p = sub.add_parser(name, help=getattr(module, "HELP", None),
                           description=getattr(module, "DESCRIPTION",
                                               getattr(module, "HELP", None)),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from d2g_fast.runtime import EXIT_BAD_INPUT, EXIT_DISK, diskspace
    from d2g_fast.runtime.lock import FolderLockedError
    from d2g_fast.runtime.signals import SIGNALS_ENV, Preempted

    args = build_parser().parse_args(argv)
    before = os.environ.get(SIGNALS_ENV)
    try:
        if args.preempt_signals:  # for this command only (main may be called in-process)
            os.environ[SIGNALS_ENV] = args.preempt_signals
        return int(args._module.run(args) or 0)
    except Preempted as exc:  # the state is saved: the scheduler may requeue the same command
        if str(exc):
            print(exc, file=sys.stderr)
        return exc.exit_status
    except FolderLockedError as exc:
        print(f"d2g {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        if isinstance(exc, PermissionError) and exc.errno is not None:  # the OS's, not ours
            print(f"d2g {args.command}: error: "
                  f"{diskspace.to_storage_error(exc, exc.filename or '?')}", file=sys.stderr)
            return EXIT_DISK
        # Bad input: one clear line naming the argument, no traceback.
        print(f"d2g {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        # A full or read-only disk, wherever it happens: one message, no traceback.
        if not diskspace.is_disk_error(exc, getattr(exc, "filename", None)):
            raise
        path = getattr(exc, "path", None) or getattr(exc, "filename", None) or "?"
        print(f"d2g {args.command}: error: {diskspace.to_storage_error(exc, path)}",
              file=sys.stderr)
        return EXIT_DISK
    finally:
        if before is None:
            os.environ.pop(SIGNALS_ENV, None)
        else:
            os.environ[SIGNALS_ENV] = before


if __name__ == "__main__":
    sys.exit(main())
