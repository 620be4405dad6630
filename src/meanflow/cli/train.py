"""``meanflow train``: settings from a preset or config file, shortcut flags and ``--set``,
checked, then :func:`meanflow.train.train` (or, with ``--dry-run``, only the check). The check
includes the memory the run needs at least (weights, optimizer, EMAs and a batch, from a
meta-device build) against the device's (docs/design.md, "Inputs")."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from meanflow.cli.common import Subparsers, check_fits, count_arg, is_rank_zero, seed_arg
from meanflow.data import BatchSource, build_dataset
from meanflow.errors import ConfigError
from meanflow.presets import preset_path
from meanflow.runs.build import build_network, resolve_model
from meanflow.runs.config import RunConfig, load_config, train_bytes
from meanflow.runs.folder import check_run_dir, new_run_dir, saved_config
from meanflow.train import check_config, train
from meanflow.train.interrupt import Interrupted
from meanflow.world import env_world, resolve_device

__all__ = ["TRAIN_FLAGS", "add_parser", "run", "check_memory"]

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
                    "e.g. fmnist-unet; with --data its data.options stay behind")
    tr.add_argument("--out", type=Path, default=None,
                    help="run folder (default: a new runs/NNNNN-<data>[-cond]-<objective>-"
                    "<model>)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its newest checkpoint, with the "
                    "folder's saved config (flags may change only what a resume may, e.g. "
                    "--steps)")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and exit without training")
    tr.add_argument("--data", help="a toy set (8gaussians, checkerboard, moons, spirals), "
                    "fashion-mnist, cifar10 (with data.options.root), a folder of images, a "
                    "latent folder of prepare-latents, or a .npy/.npz/.csv file")
    tr.add_argument("--class-conditional", action="store_true",
                    help="condition on the data's labels (enables guidance)")
    tr.add_argument("--objective", help="meanflow (default) or flow_matching")
    tr.add_argument("--model", help="backbone name (default auto: mlp for points, unet-tiny "
                    "for images, a small U-Net fast on a CPU)")
    tr.add_argument("--steps", type=count_arg, help="training steps")
    tr.add_argument("--batch-size", type=count_arg, help="batch size")
    tr.add_argument("--lr", type=float, help="learning rate")
    tr.add_argument("--seed", type=seed_arg, help="random seed, 0 <= SEED < 2**64")
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
    out = args.out
    if out is None and args.resume:
        raise ConfigError("--resume needs --out: name the run folder to continue")
    if args.resume and not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} holds no run to continue; check the path, "
                          "or drop --resume to start a new run there")
    if args.resume and config is None:
        # the folder's own config is the base, the flags on top (docs/design.md, Run folders)
        cfg = saved_config(out, overrides + args.overrides)
    else:
        cfg = load_config(config, overrides + args.overrides)
    # model.name auto resolved from the data, so that the printed config, the folder's name
    # and the resume check see the backbone the run trains
    ds = build_dataset(cfg.data.name, **cfg.data.options)
    cfg = resolve_model(cfg, tuple(ds.shape))
    if args.dry_run:
        check_config(cfg)  # data, model and loss are built too, so a dry run catches all
        check_memory(cfg, ds)
        if out is not None:
            check_run_dir(cfg, out, args.resume)   # writes nothing
        print(cfg.to_yaml(), end="")
        return 0
    check_memory(cfg, ds)
    del ds    # train builds its own
    if out is None:
        out = new_run_dir(cfg)
    try:
        ckpt = train(cfg, out, resume=args.resume)
    except Interrupted as stop:    # Ctrl-C or SIGTERM: the last step is checkpointed
        if is_rank_zero():
            print(stop.message(), file=sys.stderr)
        return stop.exit_code
    if is_rank_zero():  # under torchrun, once
        print(f"done: {ckpt}")
    return 0


def check_memory(cfg: RunConfig, ds: BatchSource | None = None) -> None:
    """A one-line ConfigError, before any work, when the data holds fewer than 2 samples or
    the run cannot fit the device's memory:
    the parameters are counted on a meta-device build (no memory used), and
    :func:`meanflow.runs.config.train_bytes` gives what training needs at least. ``ds``: the
    run's dataset, if built already (else built here from ``cfg.data``)."""
    cfg.validate()
    if ds is None:
        ds = build_dataset(cfg.data.name, **cfg.data.options)
    cfg = resolve_model(cfg, tuple(ds.shape))
    if hasattr(ds, "__len__") and len(ds) < 2:   # one picture is not a distribution
        raise ConfigError(f"{cfg.data.name} holds {len(ds)} sample(s): a dataset needs at "
                          "least 2; give more data")
    num_classes = ds.num_classes if cfg.data.class_conditional else None
    with torch.device("meta"):
        net = build_network(cfg, tuple(ds.shape), num_classes)
    params = sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    need = train_bytes(cfg, params, math.prod(ds.shape), env_world().size)
    check_fits(need, f"training {cfg.model.name} ({params:,} parameters, batch "
               f"{cfg.train.batch_size} of {tuple(ds.shape)})", "lower train.batch_size or "
               "the model's size (model.options)", resolve_device(cfg.train.device))
