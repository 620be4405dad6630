"""``meanflow export``: a run as a folder another library loads, by
:func:`meanflow.diffusers_export.export_diffusers` (the one format: a diffusers pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers, ema_choice
from meanflow.diffusers_export import EXPORT_FORMATS, PIPELINE_CLASS, export_diffusers
from meanflow.errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    ex = subparsers.add_parser("export", help="write a run as a diffusers pipeline folder",
                               description="Write a run's weights (safetensors, no pickle) and "
                               "config as a folder that "
                               f"`from meanflow.pipeline import {PIPELINE_CLASS}; "
                               f"{PIPELINE_CLASS}.from_pretrained(OUT)` loads: model_index.json, "
                               "backbone/ and, for a run on latents, vae/. OUT must be new or "
                               "empty.")
    ex.add_argument("checkpoint", type=Path, help="run folder or checkpoints/step_* folder")
    ex.add_argument("out", type=Path, help="new folder to write")
    ex.add_argument("--format", default="diffusers",
                    help=f"what to write: {', '.join(EXPORT_FORMATS)} (default diffusers)")
    ex.add_argument("--ema", default="auto", help="EMA decay of the weights, 'auto' (the run's "
                    "first) or 'none' for the raw weights")
    ex.add_argument("--vae", default="auto", help="for a run on latents: the diffusers "
                    "AutoencoderKL folder that decodes them; 'auto' (default): the one "
                    "recorded with the run's latents")
    return ex


def run(args: argparse.Namespace) -> int:
    if args.format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {args.format!r} is not a format meanflow writes: choose "
                          f"{', '.join(EXPORT_FORMATS)}")
    ema = ema_choice(args.ema)
    out = export_diffusers(args.checkpoint, args.out, ema=ema, vae=args.vae)
    print(f"exported {args.checkpoint} to {out}; load it in Python with: from meanflow.pipeline "
          f"import {PIPELINE_CLASS}; pipe = {PIPELINE_CLASS}.from_pretrained({str(out)!r})")
    return 0
