"""``meanflow convert``: an official py-meanflow checkpoint -> a run folder, by
:func:`meanflow.convert.convert_official_checkpoint`."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers
from meanflow.convert import convert_official_checkpoint
from meanflow.runs.checkpoint import load_checkpoint

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    cv = subparsers.add_parser("convert", help="import an official py-meanflow checkpoint",
                               description="Convert a checkpoint of the official PyTorch "
                               "MeanFlow code (py-meanflow checkpoint-*.pth) into a meanflow run "
                               "folder that `meanflow sample` and `meanflow fid calc` take as it "
                               "is: the online U-Net, every EMA and the run's recipe. The file is "
                               "read without unpickling anything but tensors, plain data and "
                               "argparse.Namespace.")
    cv.add_argument("checkpoint", type=Path, help="py-meanflow checkpoint-*.pth")
    cv.add_argument("out_dir", type=Path, help="new run folder to write")
    return cv


def run(args: argparse.Namespace) -> int:
    ckpt = convert_official_checkpoint(args.checkpoint, args.out_dir)
    _, state = load_checkpoint(ckpt, parts=())
    source = state["converted_from"]
    decays = ", ".join(f"{d:g}" for d in state["ema_decays"])
    print(f"converted {args.checkpoint} (epoch {source['epoch']}, {state['step']} steps) to "
          f"{ckpt}: online U-Net and EMAs {decays}")
    print(f"sample it: meanflow sample {args.out_dir} --n 64 --png grid.png --ema "
          f"{state['ema_decays'][0]:g}")
    return 0
