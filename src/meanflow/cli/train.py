"""``meanflow train``: settings from a preset or config file, shortcut flags and ``--set``,
checked, then :func:`meanflow.train.train` (or, with ``--dry-run``, only the check)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers, is_rank_zero
from meanflow.errors import ConfigError
from meanflow.presets import preset_path
from meanflow.runs.config import load_config
from meanflow.runs.folder import new_run_dir
from meanflow.train import check_config, train

__all__ = ["TRAIN_FLAGS", "add_parser", "run"]

# Shortcut flags of `meanflow train` and the config keys they set.
TRAIN_FLAGS = {
    "data": "data.name", "objective": "objective.kind", "model": "model.name",
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "optim.lr",
    "seed": "train.seed", "device": "train.device", "jvp": "objective.jvp",
}


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    tr = subparsers.add_parser("train", help="train a model", description="Train a MeanFlow (or "
                               "flow-matching) model. Settings: defaults <- --config <- flags "
                               "<- --set.")
    tr.add_argument("--config", type=Path, help="YAML/JSON config file")
    tr.add_argument("--preset", help="a shipped config by name (list them: meanflow presets), "
                    "e.g. fmnist-unet")
    tr.add_argument("--out", type=Path, default=None,
                    help="run folder (default: a new runs/NNNNN-<data>[-cond]-<objective>-"
                    "<model>)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its newest checkpoint")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and exit without training")
    tr.add_argument("--data", help="a toy set (8gaussians, checkerboard, moons, spirals), "
                    "fashion-mnist, cifar10 (with data.options.root), a folder of images, a "
                    "latent folder of prepare-latents, or a .npy/.npz/.csv file")
    tr.add_argument("--class-conditional", action="store_true",
                    help="condition on the data's labels (enables guidance)")
    tr.add_argument("--objective", help="meanflow (default) or flow_matching")
    tr.add_argument("--model", help="backbone name (default mlp)")
    tr.add_argument("--steps", type=int, help="training steps")
    tr.add_argument("--batch-size", type=int, help="batch size")
    tr.add_argument("--lr", type=float, help="learning rate")
    tr.add_argument("--seed", type=int, help="random seed")
    tr.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--jvp", help="du/dt strategy: auto (default: forward_ad on the CPU for "
                    "U-Net and DiT, split otherwise), split, func or forward_ad (see "
                    "docs/design.md)")
    tr.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="any config value, e.g. objective.p=0.5 "
                    "(repeatable)")
    return tr


def run(args: argparse.Namespace) -> int:
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in TRAIN_FLAGS.items()
                 if getattr(args, flag) is not None]
    if args.class_conditional:
        overrides.append("data.class_conditional=true")
    config = args.config
    if args.preset is not None:
        if config is not None:
            raise ConfigError("give --preset or --config, not both (a preset is a config "
                              "file; copy it to edit it)")
        config = preset_path(args.preset)
    cfg = load_config(config, overrides + args.overrides)
    if args.dry_run:
        check_config(cfg)  # data, model and loss are built too, so a dry run catches all
        print(cfg.to_yaml(), end="")
        return 0
    out = args.out
    if args.resume and out is not None and not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} holds no run to continue; check the path, "
                          "or drop --resume to start a new run there")
    if out is None:
        if args.resume:
            raise ConfigError("--resume needs --out: name the run folder to continue")
        out = new_run_dir(cfg)
    ckpt = train(cfg, out, resume=args.resume)
    if is_rank_zero():  # under torchrun, once
        print(f"done: {ckpt}")
    return 0
