"""``meanflow prepare-latents``: an image folder -> VAE latent shards and FID statistics, by
:func:`meanflow.latents.prepare.prepare_latents`."""

from __future__ import annotations

import argparse
from pathlib import Path

from meanflow.cli.common import Subparsers, count_arg, is_rank_zero
from meanflow.latents.prepare import prepare_latents

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    pl = subparsers.add_parser("prepare-latents", help="encode an image folder into VAE latents",
                               description="Encode an ImageNet-style folder (one sub-folder "
                               "per class) into shards of VAE posterior mean and std with "
                               "labels, ADM centre crop, plus the FID reference statistics of "
                               "the same images. Rerun the same command to resume; under "
                               "torchrun the shards are shared out over the ranks. Needs "
                               "diffusers: pip install 'meanflow[latents]'.")
    pl.add_argument("image_dir", type=Path, help="image folder, one sub-folder per class")
    pl.add_argument("out_dir", type=Path, help="latent folder to write (or finish): a new or "
                    "empty folder, or one an earlier prepare-latents made")
    pl.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder "
                    "(config.json + diffusion_pytorch_model.safetensors), or a hub id such as "
                    "stabilityai/sd-vae-ft-mse where a network exists")
    pl.add_argument("--resolution", type=count_arg, default=256, help="ADM centre crop side "
                    "(default 256)")
    pl.add_argument("--shard-size", type=count_arg, default=1000, help="images per shard "
                    "(default 1000)")
    pl.add_argument("--batch-size", type=count_arg, default=64, help="images per VAE call "
                    "(default 64)")
    pl.add_argument("--dtype", default="float32", help="storage of mean and std: float32 "
                    "(default), float16 or bfloat16")
    pl.add_argument("--scale", type=float, help="latent scale recorded for training (default: "
                    "the VAE's scaling_factor, 0.18215 for SD-VAE)")
    pl.add_argument("--fid-extractor", default="inception", help="features of the reference "
                    "statistics: inception (default), fmnist, an extractor file, or none")
    pl.add_argument("--fid-keep", type=count_arg, default=5000, help="feature rows kept for KID "
                    "(default 5000)")
    pl.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pl.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return pl


def run(args: argparse.Namespace) -> int:
    index = prepare_latents(args.image_dir, args.out_dir, args.vae, resolution=args.resolution,
                            shard_size=args.shard_size, batch_size=args.batch_size,
                            device=args.device, fid_extractor=args.fid_extractor,
                            fid_keep=args.fid_keep, scale=args.scale, dtype=args.dtype,
                            progress=not args.no_progress)
    if is_rank_zero():
        ref = (f"; FID reference: {args.out_dir / index['fid_ref']}" if index["fid_ref"]
               else "")
        print(f"wrote {index['num_images']} latents {tuple(index['latent_shape'])} in "
              f"{index['num_shards']} shard(s) to {args.out_dir}{ref}")
    return 0
