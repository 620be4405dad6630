"""``meanflow fid``: reference statistics of a dataset, and the FID of samples or a checkpoint.

Features come from an *extractor* (:mod:`meanflow.metrics.extractors`): ``inception``, the
standard FID Inception-v3; ``fmnist``, the repo's own Fashion-MNIST classifier (128-d, CPU
speed, its own scale: not comparable with Inception FIDs); or a TorchScript / state-dict file.
Reference files keep the extractor's identity and 5 000 feature rows, so KID comes with every
FID. Every result records the extractor, the protocol, N, NFE, guidance, checkpoint and seed.

A *protocol* (:mod:`meanflow.metrics.protocols`, docs/fid.md) says how generated images are
quantised to 8 bits and fed to the Inception network: ``pytorch-fid``, or the pipeline of the
papers' official evaluators (``meanflow-jax``, ``adm``, ``py-meanflow``). Reference files record
theirs, and are only compared with samples processed the same way. Downloaded reference files
(ADM's ``mu`` / ``sigma``, the JAX MeanFlow repo's ``ref_mu`` / ``ref_sigma``) are read too.

Generated images are scored as the protocol's evaluator would hold them (8 bits) and featurised
batch by batch as :func:`meanflow.sampling.generate` makes them (:func:`sample_features`), the
way ``fid calc`` and FID during training both do it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from meanflow.data import build_dataset
from meanflow.errors import ConfigError, DataError
from meanflow.metrics.extractors import Extractor, load_extractor
from meanflow.metrics.frechet import FeatureStats, frechet_distance, kid, precision_recall
from meanflow.metrics.protocols import default_protocol, read_reference, reference_n
from meanflow.pixels import from_uint8
from meanflow.runs.export import check_vae
from meanflow.runs.load import load
from meanflow.sampling import check_sampling, generate, with_guidance
from meanflow.world import World, gather_sharded, resolve_device, sharded_indices

__all__ = ["EXTRACTORS", "load_reference", "reference_stats", "fid_of", "score_features",
           "sample_features"]

EXTRACTORS = ("inception", "fmnist")   # or the path of a TorchScript / state-dict file
KID_FEATURES = 5000                   # feature rows kept in stats files for KID


def load_reference(ref: str | os.PathLike[str], device: torch.device | str = "cpu",
                   extractor: str | None = None, protocol: str | None = None
                   ) -> tuple[FeatureStats, Extractor]:
    """Reference statistics and the extractor they were made with: the one recorded in the
    file, or ``extractor`` (where its file is now), whose name and checksum must match, so that
    features of two different networks are never compared. The extractor follows the file's
    protocol; ``protocol``, when given, must be that one."""
    ref_stats = read_reference(ref)
    made_with = ref_stats.meta.get("extractor", "fmnist")
    made_under = ref_stats.meta["protocol"]
    if protocol is not None and protocol != made_under:
        raise ConfigError(f"{ref} holds statistics made under the {made_under!r} protocol, not "
                          f"{protocol!r}: drop --protocol, or recompute the reference with "
                          f"meanflow fid ref --protocol {protocol}")
    ext = load_extractor(extractor or made_with, device, protocol=made_under)
    got = ext.identity["extractor"]
    if got != made_with and (got in EXTRACTORS or made_with in EXTRACTORS):
        raise ConfigError(f"{ref} holds {made_with!r} features, but the extractor given is "
                          f"{got!r}: compare like with like (drop --extractor, or recompute "
                          "the reference with meanflow fid ref --extractor)")
    # the same network: checked after the names, whose message says more when they differ
    for key in ("sha1", "sha256"):
        if key in ref_stats.meta and ext.identity.get(key) != ref_stats.meta[key]:
            raise DataError(f"the extractor {got!r} is not the network the reference "
                            f"statistics were made with ({key} {ext.identity.get(key)} != "
                            f"{ref_stats.meta[key]}); recompute them with meanflow fid ref, or "
                            "pass the original extractor file")
    return ref_stats, ext


def score_features(feats: np.ndarray, ref: FeatureStats, kid_subset: int = 1000,
                   pr: bool = False) -> dict[str, Any]:
    """FID of features against reference statistics; KID (and precision/recall with ``pr``)
    too when the reference file kept feature rows. KID averages 100 random subsets of
    ``min(kid_subset, N / 2)`` rows of each set; its ``kid_se`` is the spread between them."""
    out: dict[str, Any] = {"fid": frechet_distance(FeatureStats.from_features(feats), ref)}
    if ref.features is not None:
        # at most half of the smaller set, so that the 100 subsets differ and the standard
        # error means something (subsets of the whole set would all be the same: SE 0)
        size = min(kid_subset, feats.shape[0] // 2, ref.features.shape[0] // 2)
        if size >= 2:
            k, k_se = kid(feats, ref.features, subsets=100, subset_size=size, seed=0)
            out.update(kid=k, kid_se=k_se, kid_subset=size)
        if pr:
            m = min(feats.shape[0], ref.features.shape[0])
            prec, rec = precision_recall(ref.features[:m], feats[:m], k=3)
            out.update(precision=prec, recall=rec, pr_n=m)
    elif pr:
        raise ConfigError("precision/recall needs feature rows in the reference file: "
                          "recompute it with meanflow fid ref (it keeps them by default)")
    return out


def _dataset_images(data: str, options: dict[str, Any], n: int | None) -> Tensor:
    ds = build_dataset(data, **options)
    images = getattr(ds, "images", None)
    if images is None:
        raise ConfigError(f"{data!r} holds no images (samples of shape {tuple(ds.shape)}): "
                          "give an image dataset, folder or .npz")
    images = images[:n] if n is not None else images
    return from_uint8(images)


def reference_stats(data: str, out: str | os.PathLike[str], options: dict[str, Any] | None = None,
                    n: int | None = None, extractor: str = "fmnist",
                    device: str = "auto", keep: int = KID_FEATURES,
                    progress: bool = True, protocol: str | None = None) -> FeatureStats:
    """Feature statistics of the first ``n`` images (all by default) of a dataset, saved with
    the extractor's identity, the protocol and ``keep`` feature rows (for KID). ``protocol``
    defaults to the papers' one for the dataset (:func:`default_protocol`). The images are
    8-bit already, so only the protocol's network input applies to them."""
    chosen = protocol if protocol is not None else default_protocol(data, extractor)
    ext = load_extractor(extractor, resolve_device(device), protocol=chosen)   # before the data
    images = _dataset_images(data, options or {}, n)
    stats = FeatureStats.from_features(
        ext.features(images, progress=progress),
        meta={**ext.identity, "data": str(data), "options": options or {},
              "n": int(images.shape[0])}, keep=keep)
    stats.save(out)
    return stats


def _load_samples(path: Path, n: int | None) -> tuple[Tensor, dict[str, Any], bool]:
    """Samples in [-1, 1] from a ``meanflow sample`` .npz (``samples``, or uint8 ``images``),
    its record, and whether they are 8-bit already (``images``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            eight_bit = "samples" not in f.files
            if "samples" in f.files:
                raw = f["samples"]
                _check_layout(path, "samples", raw, "(N, C, H, W) real numbers",
                              raw.dtype.kind in "fiu")
                x = torch.from_numpy(np.asarray(raw, dtype=np.float32))
                if not bool(torch.isfinite(x).all()):
                    raise DataError(f"{path} 'samples' hold NaN or infinite values: FID needs "
                                    "finite samples; sample an earlier checkpoint")
            elif "images" in f.files:                                   # (N, H, W, C) uint8
                raw = f["images"]
                _check_layout(path, "images", raw, "(N, H, W, C) uint8 with C = 1 or 3",
                              raw.dtype == np.uint8 and raw.shape[-1:] in ((1,), (3,)))
                x = from_uint8(torch.from_numpy(raw).permute(0, 3, 1, 2))
            else:
                raise DataError(f"{path} has neither 'samples' nor 'images': write it with "
                                "meanflow sample --out")
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read samples from {path} ({' '.join(str(exc).split())}); "
                        "write them with meanflow sample --out FILE.npz") from None
    return (x[:n] if n is not None else x), meta, eight_bit


def _check_layout(path: Path, key: str, array: np.ndarray, layout: str, ok: bool) -> None:
    """DataError unless ``array`` is 4-D and ``ok`` (its dtype and channels fit ``layout``)."""
    if array.ndim != 4 or not ok:
        raise DataError(f"{path} '{key}' is {array.dtype} of shape {tuple(array.shape)}; fid "
                        f"calc takes '{key}' as {layout}: write it with meanflow sample --out, "
                        "or save that layout")


def sample_features(net: nn.Module, seeds: list[int], shape: tuple[int, ...], ext: Extractor,
                    *, labels: Tensor | None = None, steps: int = 1, method: str = "meanflow",
                    decode: Callable[[Tensor], Tensor] | None = None, batch_size: int = 500,
                    device: torch.device | str = "cpu", world: World | None = None,
                    progress: bool = False) -> np.ndarray:
    """Features (N, D) float64 of the samples of ``seeds`` (:func:`meanflow.sampling.generate`):
    each batch decoded (``decode``: latents -> images in [-1, 1]; None for pixel models),
    quantised to 8 bits the way of the extractor's protocol and featurised at once, so no more
    than a batch of images is ever held. Under torchrun (``world``) the rows are gathered in
    seed order on every rank."""
    def features(x: Tensor) -> Tensor:
        images = ext.quantize(decode(x) if decode is not None else x)
        return torch.from_numpy(np.asarray(ext.features(images), dtype=np.float64))

    _, feats = generate(net, seeds, shape, labels=labels, steps=steps, method=method,
                        decode=features, batch_size=batch_size, device=device, world=world,
                        progress=progress, keep_samples=False)
    return feats.numpy()


def fid_of(source: str | os.PathLike[str], ref: str | os.PathLike[str],
           n: int | None = 10000, steps: int = 1, seed: int = 0,
           ema: float | str | None = "auto", batch_size: int = 500, device: str = "auto",
           extractor: str | None = None, pr: bool = False, progress: bool = True,
           world: World | None = None, vae: str | os.PathLike[str] | None = "auto",
           note: Callable[[str], None] | None = None,
           protocol: str | None = None, guidance: float | None = None,
           interval: Sequence[float] | None = None) -> dict[str, Any]:
    """FID (and KID) of a samples .npz, or of N fresh samples of a run folder / checkpoint
    (sample i from seed SEED+i), against a reference stats file, under the reference's
    protocol (``protocol``, when given, must be it: docs/fid.md).

    Under ``pytorch-fid`` a class-conditional run's labels are balanced over classes; under
    the papers' protocols they are drawn uniformly at random as the official code does, from
    ``torch.Generator().manual_seed(SEED)`` (recorded as ``label_seed``), and N defaults to the
    official 50 000 (a .npz: its first 50 000 samples, all when it holds fewer).

    ``n``: samples scored; None takes (under ``pytorch-fid``) min(10 000, the reference's N)
    fresh samples of a run (50 000 for a latent run decoded by its VAE), or of a .npz's samples
    its first as many (all when it holds fewer): more samples than the reference has images
    cost time and leave the score's bias to the smaller set. ``note`` is told, before any
    sampling, when that rule lowered N; the record then holds ``n_default``. A latent run's
    samples are decoded by ``vae`` (:func:`meanflow.runs.load.load`: "auto" is the VAE
    recorded with its latents, "none" scores the latents). The extractor is the one recorded
    in the reference file; ``extractor`` may name where its file now is (its checksum must
    match). Samples are quantised to 8 bits first, the protocol's way (uint8 ``images`` are
    already). Under torchrun (``world`` from :func:`meanflow.world.setup`) rank r samples and
    featurises samples r, r + W, ... and the features are gathered in sample order, so the
    result does not depend on the number of processes; every rank
    returns the record. ``guidance`` and ``interval`` choose the guidance of a run trained with
    guidance conditioning (iMF: :func:`meanflow.sampling.with_guidance`, refused for others).
    """
    dev = resolve_device(device)
    main = world is None or world.is_main
    ref_stats, ext = load_reference(ref, dev, extractor, protocol)
    paper = ext.protocol.samples
    source = Path(source)
    ref_n = reference_n(ref_stats)
    record: dict[str, Any] = {"extractor": ext.identity, "protocol": ext.protocol.describe(),
                              "ref": str(ref), "ref_n": ref_n}
    if ref_n is None:
        record["ref_source"] = ref_stats.meta.get("source")

    def default_count(base: int) -> int:
        if paper is not None or ref_n is None:
            record["n_default"] = f"{paper or base} (the {ext.protocol.name} protocol's)"
            return paper or base
        count = min(base, ref_stats.n)
        record["n_default"] = f"min({base}, the reference's N {ref_stats.n})"
        if count < base and note is not None:
            note(f"N = {count}: the reference holds {ref_stats.n} images, fewer than the "
                 f"default {base} samples (pass --n to choose)")
        return count

    if source.suffix == ".npz":
        x, meta, eight_bit = _load_samples(source, n if n is not None else default_count(10000))
        count = int(x.shape[0])
        if count < 2:
            raise ConfigError(f"FID needs at least 2 samples, got {count}: raise --n")
        mine = x[sharded_indices(count, world)]
        images = mine if eight_bit else ext.quantize(mine)
        local = torch.from_numpy(np.asarray(ext.features(images, progress=progress and main),
                                            dtype=np.float64))
        feats = gather_sharded(local, count, world, dev).numpy()
        # what the .npz's record (meanflow sample's) says: which weights of which checkpoint
        # made the samples, and how
        record.update(samples=str(source), checkpoint=meta.get("checkpoint"),
                      step=meta.get("step"), weights=meta.get("weights"),
                      method=meta.get("method"), steps=meta.get("steps"),
                      seed=meta.get("seed"))
        if meta.get("vae") is not None:
            record.update(vae=meta["vae"], scale=meta.get("scale"))
    else:
        model = load(source, ema=ema, device=dev, vae=vae)
        net = with_guidance(model.net, guidance, interval, model.num_classes is not None)
        count = n if n is not None else default_count(50000 if model.vae is not None
                                                      else 10000)
        if count < 2:
            raise ConfigError(f"FID needs at least 2 samples, got {count}: raise --n")
        # the seeds, labels and feature rows of every sample are held at once
        check_sampling(count, model.shape, batch_size, seed, dev, keep_samples=False,
                       row_bytes=8 * 2048)
        check_vae(model)
        random_labels = ext.protocol.labels == "random" and model.num_classes is not None
        y = (torch.randint(model.num_classes, (count,),
                           generator=torch.Generator().manual_seed(seed))
             if random_labels else model.labels_for(count))
        feats = sample_features(net, list(range(seed, seed + count)), model.shape, ext,
                                labels=y, steps=steps, method=model.method,
                                decode=model.decode if model.vae is not None else None,
                                batch_size=batch_size, device=dev, world=world,
                                progress=progress and main)
        o = model.config.objective
        record.update(checkpoint=str(model.checkpoint), step=model.step,
                      weights=model.weights, method=model.method, steps=steps, seed=seed,
                      guidance={"omega": o.omega, "kappa": o.kappa,
                                "t_interval": list(o.t_interval)} if net is model.net else
                      {"omega": net.omega, "interval": list(net.interval), "at": "sampling"},
                      labels=None if y is None else "random" if random_labels else "balanced")
        if random_labels:
            record["label_seed"] = seed
        if model.vae is not None:
            record.update(vae=model.vae["spec"], scale=model.vae["scale"])
    record.update(n=count, quantized=True, **score_features(feats, ref_stats, pr=pr))
    if world is not None and world.enabled:
        record["processes"] = world.size
    return record
