"""``meanflow export``: a run as a folder to share: a diffusers pipeline another library
loads (:func:`meanflow.diffusers_export.export_diffusers`), or one set of weights as a small
checkpoint folder meanflow loads (:func:`meanflow.runs.release.export_release`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers, ema_choice
from meanflow.diffusers_export import PIPELINE_CLASS, export_diffusers
from meanflow.errors import ConfigError
from meanflow.runs.release import export_release

__all__ = ["add_parser", "run", "FORMATS"]

#: --format -> what it writes
FORMATS = {"diffusers": "a diffusers pipeline folder (model_index.json, backbone/, vae/)",
           "meanflow": "one set of weights as a checkpoint folder (state.json, "
                       "ema.safetensors) that meanflow sample and meanflow.load read"}


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    ex = subparsers.add_parser("export", help="write a run as a diffusers pipeline folder, "
                               "or its weights alone",
                               description="Write a run's weights (safetensors, no pickle) and "
                               "config as a folder: --format diffusers (default) writes one "
                               f"that `from meanflow.pipeline import {PIPELINE_CLASS}; "
                               f"{PIPELINE_CLASS}.from_pretrained(OUT)` loads: model_index.json, "
                               "backbone/ and, for a run on latents, vae/; --format meanflow "
                               "writes the chosen weights alone as a checkpoint folder that "
                               "`meanflow sample OUT` reads. OUT must be new or empty.")
    ex.add_argument("checkpoint", type=Path, help="run folder or checkpoints/step_* folder")
    ex.add_argument("out", type=Path, help="new folder to write")
    ex.add_argument("--format", default="diffusers",
                    help=f"what to write: {', '.join(FORMATS)} (default diffusers)")
    ex.add_argument("--ema", default="auto", help="EMA decay of the weights, 'auto' (the run's "
                    "first) or 'none' for the raw weights")
    ex.add_argument("--vae", default="auto", help="for a run on latents: the diffusers "
                    "AutoencoderKL folder that decodes them; 'auto' (default): the one "
                    "recorded with the run's latents")
    return ex


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r} is not a format meanflow writes: choose "
                          f"{', '.join(FORMATS)}")
    ema = ema_choice(args.ema)
    if args.format == "meanflow":
        if args.vae != "auto":
            raise ConfigError("--vae is for --format diffusers: a meanflow export keeps the "
                              "run's record of its VAE; drop --vae")
        out = export_release(args.checkpoint, args.out, ema=ema)
        print(f"exported {args.checkpoint} to {out}; sample it with: meanflow sample {out}")
        return 0
    out = export_diffusers(args.checkpoint, args.out, ema=ema, vae=args.vae)
    print(f"exported {args.checkpoint} to {out}; load it in Python with: from meanflow.pipeline "
          f"import {PIPELINE_CLASS}; pipe = {PIPELINE_CLASS}.from_pretrained({str(out)!r})")
    return 0
