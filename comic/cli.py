"""The flags every script shares, as argparse parents (torchvision references' `get_args_parser` pattern), and the
one way a script turns them into a config (how a script starts, stops and exits: `comic.progress.script_main`).

    parser = argparse.ArgumentParser(parents=[config_flags(), tracking_flags("comic-train")], ...)
    args = parse(parser, argv)            # overrides may stand before or after the flags
    cfg = base_config(args)               # preset -> --config file -> smoke test -> overrides -> --epochs / --data

`--seeds` is a list everywhere (`--seeds 0 1 2`), `--list-keys` prints the chosen preset's values.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from comic._io import absolute_path
from comic.config import Config, ConfigError, apply_overrides, describe, load_config
from comic.data.build import adopt_built
from comic.presets import PRESETS, SMOKE_OVERRIDES


def config_flags(smoke_help: str = "tiny synthetic data, 2 epochs, CPU: seconds") -> argparse.ArgumentParser:
    """Positional dotted overrides, --preset, --data, --config, --epochs, --smoke-test, --list-keys."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. method=bce rlc.tau=0.8 "
                                                     "(see --list-keys)")
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", default="synthetic", choices=sorted(PRESETS), help="base configuration")
    group.add_argument("--data", help="source data root (VOCdevkit / COCO root) or a built benchmark directory")
    group.add_argument("--config", help="YAML file of config keys applied after the preset")
    group.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    group.add_argument("--smoke-test", action="store_true", help=smoke_help)
    group.add_argument("--list-keys", action="store_true", help="print every config key with the chosen preset's "
                                                                "value and exit")
    return parser


def tracking_flags(experiment: str | None) -> argparse.ArgumentParser:
    """--tracking-uri and --experiment (default `experiment`; None: the script derives one)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("tracking")
    group.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                              "sqlite:///<cwd>/mlruns/mlflow.db)")
    group.add_argument("--experiment", default=experiment, help="MLflow experiment name"
                       + (f" (default {experiment})" if experiment else ""))
    return parser


def seeds_flag(default: Sequence[int] | None, what: str) -> argparse.ArgumentParser:
    """--seeds N [N ...]: a list of seeds (the same meaning in every script). `default` None: the script decides
    (say which in `what`)."""
    parser = argparse.ArgumentParser(add_help=False)
    shown = "" if default is None else f" (default {' '.join(map(str, default))})"
    parser.add_argument("--seeds", type=_seed, nargs="+", default=None if default is None else list(default),
                        metavar="N", help=what + shown)
    return parser


def check_seeds(seeds: Sequence[int]) -> None:
    """The seed rule of every list of seeds (a study's, a sweep's confirmation): distinct non-negative integers, at
    least one. Raises ConfigError."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds={seeds!r}: give distinct non-negative integers (--seeds 0 1 2)")


def _seed(text: str) -> int:
    """One seed; an override (`key=value`) right after the seeds gets a message that says how to place it."""
    try:
        return int(text)
    except ValueError:
        hint = "; end the seed list with -- (or put the overrides first)" if "=" in text else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (an integer){hint}") from None


def ray_flags() -> argparse.ArgumentParser:
    """Where trials run: --address, --num-cpus, per-trial resources, concurrency, restarts, shared storage."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("where trials run (Ray)")
    group.add_argument("--address", help="Ray cluster to join ('auto' on a `ray up` head; default: $RAY_ADDRESS, "
                                         "else a new local Ray instance)")
    group.add_argument("--num-cpus", type=int, help="CPUs of a new local Ray instance (default: all cores)")
    group.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    group.add_argument("--gpus-per-trial", type=float, default=0.0,
                       help="GPUs per trial; a fraction (0.5) packs trials on one GPU, but Ray does not isolate GPU "
                            "memory: the packed trials must fit in memory together (default 0)")
    group.add_argument("--max-concurrent", type=int, default=0,
                       help="at most this many trials at once (default 0: as many as resources allow)")
    group.add_argument("--max-failures", type=int, default=1, help="restarts of a crashed trial from its checkpoint")
    group.add_argument("--shared-storage", action="store_true",
                       help="assert that local storage / SQLite paths are on a file system every node mounts")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with overrides accepted before and after the flags; a bad --epochs is a usage error."""
    args = parser.parse_intermixed_args(argv)
    if getattr(args, "epochs", None) is not None and args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: give at least 1")
    return args


def base_config(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> Config:
    """preset -> --config file -> smoke-test overrides -> `extra` (a script's own defaults) -> positional overrides
    -> --epochs / --data; with --data naming a built benchmark, its card's data.* values (`adopt_built`). Raises
    ConfigError naming the bad key or flag."""
    cfg = load_config(args.preset, {}, path=args.config)
    if args.smoke_test:
        cfg = apply_overrides(cfg, SMOKE_OVERRIDES)
    cfg = apply_overrides(cfg, dict(extra or {}))
    cfg = apply_overrides(cfg, list(args.overrides))
    flags: dict[str, Any] = {}
    if getattr(args, "epochs", None) is not None:
        flags["train.epochs"] = args.epochs
    if args.data:
        if not Path(args.data).expanduser().exists():
            raise ConfigError(f"--data {args.data}: folder not found")
        flags["data.root"] = str(absolute_path(args.data))
    explicit = {item.split("=", 1)[0].strip() for item in args.overrides}
    return adopt_built(apply_overrides(cfg, flags), explicit)


def list_keys(args: argparse.Namespace) -> str:
    """Every config key with its value in the chosen preset (and --config file) and its meaning."""
    return f"config keys of preset {args.preset!r}:\n" + describe(load_config(args.preset, {}, path=args.config))
