"""``d2g distill``: train the one-step generator on a pair store (see d2g_fast.train)."""
from __future__ import annotations

import argparse
import dataclasses

HELP = "distil the teacher into a one-step conditional GAN generator on stored ODE pairs"
DESCRIPTION = HELP + (". Every setting has a default; --config FILE (json/toml/yaml) sets "
                      "several, flags override it. Start with torchrun --nproc-per-node N -m "
                      "d2g_fast.cli distill ... for N processes. Rerun the same command to "
                      "resume from the newest checkpoint.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from d2g_fast.train.config import TrainConfig, field_help, flag

    helps = field_help()
    p.add_argument("--config", default=None, help="settings file (.json, .toml, .yaml)")
    for f in dataclasses.fields(TrainConfig):
        name, help_text = f.name, helps.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse formats help with %: escape ours; the default shown is the dataclass's (the
        # parser's own default is SUPPRESS, so that only flags actually given override a file).
        help_text = (help_text + f" [default: {default!r}]").replace("%", "%%")
        if name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                           default=argparse.SUPPRESS, help="hide the progress bar")
        elif isinstance(default, bool):
            p.add_argument(flag(name), dest=name, action="store_const", const=True,
                           default=argparse.SUPPRESS, help=help_text)
        elif name in ("betas_g", "betas_d"):
            p.add_argument(flag(name), dest=name, type=float, nargs=2, default=argparse.SUPPRESS,
                           metavar=("BETA1", "BETA2"), help=help_text)
        elif name == "d_taps":
            p.add_argument(flag(name), dest=name, type=int, nargs="+", default=argparse.SUPPRESS,
                           metavar="BLOCK", help=help_text)
        elif name in ("sample_prompts", "lora_targets"):
            p.add_argument(flag(name), dest=name, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif name == "timestep":
            p.add_argument(flag(name), dest=name, type=int, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = type(default) if default is not None else str
            p.add_argument(flag(name), dest=name, type=kind, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace):
    from d2g_fast.train.config import TrainConfig, build_config, read_config_file

    file_values = read_config_file(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    return build_config(file_values, given)


def run(args: argparse.Namespace) -> int:
    from d2g_fast.teacher.collect_cmd import quiet_model_loading
    from d2g_fast.train.loop import train

    config = config_from_args(args)
    quiet_model_loading()
    from d2g_fast.plan.planner import announce

    announce(config)  # the predicted peak memory per GPU (CUDA; D2G_PLAN=1: also CPU)
    train(config)
    return 0
