"""``meanflow sample``: checks the flags, loads the run (:func:`meanflow.runs.load.load`),
samples it and writes the files (:func:`meanflow.runs.export.write_samples`). The writing
process (rank 0 under torchrun) holds :func:`meanflow.fileio.exclusive` on the output from
start to end, and removes the temporaries a killed ``meanflow sample`` left for it
(docs/design.md, "What meanflow may overwrite")."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from meanflow.cli.common import (Subparsers, count_arg, ema_choice, is_rank_zero, joined,
                                 parse_interval, refuse_existing, seed_arg)
from meanflow.errors import ConfigError
from meanflow.fileio import exclusive, remove_stale_temporaries
from meanflow.pretrained import PRETRAINED
from meanflow.runs.export import can_draw, check_vae, record_path, write_samples
from meanflow.runs.load import load
from meanflow.sampling import check_guidance, check_sampling, make_schedule

__all__ = ["add_parser", "run", "parse_schedule"]


def _label(text: str) -> int | str:
    """--label: a class number, or a class name (checked against the run once it is loaded)."""
    try:
        return int(text)
    except ValueError:
        return text


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    sa = subparsers.add_parser("sample", help="sample a trained model",
                               description="Draw samples from a run folder or checkpoint. "
                               "Sample i uses seed SEED+i, so results do not depend on the "
                               "batch size.")
    sa.add_argument("checkpoint", type=Path, help="run folder, checkpoints/step_* folder, or "
                    f"the name of a model shipped with meanflow ({', '.join(PRETRAINED)})")
    sa.add_argument("--n", "--num-samples", dest="n", type=count_arg, default=1000,
                    help="number of samples (default 1000; under torchrun write --num-samples: "
                    "torchrun reads --n as one of its own options)")
    sa.add_argument("--steps", type=count_arg, default=1, help="network calls (default 1)")
    sa.add_argument("--schedule", help="comma-separated decreasing times from 1 to 0, e.g. "
                    "1,0.6,0 (default: uniform)")
    sa.add_argument("--seed", type=seed_arg, default=0, help="first seed, 0 <= SEED < 2**64 "
                    "(default 0)")
    sa.add_argument("--label", type=_label, help="class of every sample, a number or, for "
                    "data with named classes (image folders), a name (class-conditional "
                    "models; default: balanced over classes)")
    sa.add_argument("--ema", default="auto", help="EMA decay to use, 'auto' (the run's first) "
                    "or 'none' for the raw weights")
    sa.add_argument("--batch-size", type=count_arg, default=1024,
                    help="samples per network call")
    sa.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sa.add_argument("--out", type=Path, default=None,
                    help="output .npz: 'samples' in model space, plus 'images' as uint8 "
                    "(N, H, W, C) for image models (default samples.npz unless only --png)")
    sa.add_argument("--png", type=Path, help="draw an image grid (images) or a scatter plot "
                    "(2-D points); other samples are refused before sampling. Its record is "
                    "FILE.png.json when no --out is given")
    sa.add_argument("--nrow", type=count_arg, help="images per row of the --png grid")
    sa.add_argument("--guidance", type=float, help="guidance scale w >= 1 of a model trained "
                    "with guidance conditioning (iMF), chosen now, e.g. 8 (default 1: none); "
                    "a MeanFlow model's guidance is trained in")
    sa.add_argument("--interval", help="with --guidance: the times t_min,t_max where it acts, "
                    "e.g. 0.4,0.65 (default 0,1)")
    sa.add_argument("--overwrite", action="store_true", help="replace existing output files")
    sa.add_argument("--vae", default="auto", help="decode latents with this diffusers "
                    "AutoencoderKL folder or pipeline folder (x = vae.decode(z / scale + shift): "
                    "0.18215 and 0 for SD-VAE); 'auto' (default): the "
                    "VAE recorded with the run's latents, if any; 'none': keep latents. With a "
                    "VAE the .npz holds 'images' (decoded, uint8) and 'latents', no 'samples'")
    return sa


def parse_schedule(text: str | None) -> list[float] | None:
    """--schedule "1,0.5,0" -> [1.0, 0.5, 0.0]; None or empty -> None (uniform)."""
    if not text:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--schedule {text!r} must be comma-separated numbers, "
                          "e.g. 1,0.5,0") from None


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"--n {args.n} must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    out = Path("samples.npz") if args.out is None and args.png is None else args.out
    if out is not None and out.suffix != ".npz":
        raise ConfigError(f"--out {out} must end in .npz")
    if args.nrow is not None and args.nrow < 1:
        raise ConfigError(f"--nrow {args.nrow} must be >= 1")
    outputs = [p for p in (out, record_path(out, args.png), args.png) if p is not None]
    for path in outputs:
        refuse_existing(path, args.overwrite)
    if args.png is not None and args.png.suffix.lower() != ".png":
        raise ConfigError(f"--png {args.png} must end in .png")
    if args.seed + args.n > 2 ** 64:
        raise ConfigError(f"--seed {args.seed} --n {args.n}: sample i uses seed SEED+i, and "
                          "seeds stay below 2**64; lower --seed or --n")
    schedule = parse_schedule(args.schedule)
    make_schedule(args.steps, schedule)  # bad --steps/--schedule fail before any work
    args.interval = parse_interval(args.interval)
    if args.guidance is not None or args.interval is not None:
        check_guidance(1.0 if args.guidance is None else args.guidance, args.interval)
    ema = ema_choice(args.ema)
    with contextlib.ExitStack() as stack:
        if is_rank_zero():   # the one writer (docs/design.md, "What meanflow may overwrite")
            stack.enter_context(exclusive(outputs[0], "meanflow sample"))
            for folder in {p.parent for p in outputs}:
                remove_stale_temporaries(folder, dests=tuple(p.name for p in outputs))
        return _sample(args, out, schedule, ema)


def _sample(args: argparse.Namespace, out: Path | None, schedule: list[float] | None,
            ema: float | str | None) -> int:
    with joined(args.device) as (world, device):
        model = load(args.checkpoint, ema=ema, device=device, vae=args.vae)
        if args.png is not None and not can_draw(model.shape):
            # refused before any work, like every input (docs/design.md, "Inputs"): the
            # user reruns without --png at no cost, rather than finding a half-done output
            fix = "drop --png" if out is not None else f"write --out {args.png.stem}.npz"
            raise ConfigError(f"--png draws images or 2-D points; this model's samples have "
                              f"shape {model.shape}: {fix} (nothing was sampled)")
        check_sampling(args.n, model.shape, args.batch_size, args.seed, device)
        check_vae(model)
        if model.num_classes is not None:
            if isinstance(args.label, int) and not 0 <= args.label < model.num_classes:
                raise ConfigError(f"--label {args.label} is outside [0, {model.num_classes})")
        elif args.label is not None:
            raise ConfigError("--label given but the model is unconditional")
        # under torchrun rank r draws samples r, r + W, ...; sample i depends on seed i alone
        samples = model.sample(args.n, labels=args.label, steps=args.steps, schedule=schedule,
                               seed=args.seed, batch_size=args.batch_size, progress=True,
                               world=world, guidance=args.guidance, interval=args.interval)
        if not world.is_main:
            return 0
        write_samples(model, samples, npz=out, png=args.png, nrow=args.nrow,
                      overwrite=args.overwrite)
        print(f"wrote {args.n} samples to " + " and ".join(
            str(p) for p in (out, args.png) if p is not None))
    return 0
