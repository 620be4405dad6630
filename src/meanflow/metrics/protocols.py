"""FID protocols: what an evaluator does to generated pixels before the Inception network, and
the reference statistics files the papers' evaluators publish (docs/fid.md).

A :class:`Protocol` has two steps, both on (N, C, H, W) tensors in [-1, 1]:

* ``quantize(x)``: the 8-bit levels the evaluator's own code turns a generated image into
  (round to nearest, or floor), returned in [-1, 1] as ``level / 127.5 - 1``;
* ``network_input(x)``: those pixels as the Inception network is fed them: grey to RGB, a
  bilinear resize to 299 × 299, and the value range.

The four protocols (sources and details in docs/fid.md):

================  ============  ===========================================  ===============
name              quantisation  resize to 299                                network range
================  ============  ===========================================  ===============
``pytorch-fid``   round         half-pixel bilinear (``align_corners=False``)  2 · v / 255 − 1
``meanflow-jax``  round (½ up)  half-pixel bilinear, border (identity grid)   (v − 128) / 128
``adm``           floor         TensorFlow-1 bilinear (source = i · H / 299)  (v − 128) / 128
``py-meanflow``   floor         TensorFlow-1 bilinear (source = i · H / 299)  (v − 128) / 128
================  ============  ===========================================  ===============

Reference files: ours (``meanflow fid ref``, with a ``meta`` record that names the protocol),
ADM's reference batches (``mu`` / ``sigma``: protocol ``adm``) and the JAX MeanFlow repository's
FID stats file (``ref_mu`` / ``ref_sigma``: protocol ``meanflow-jax``); see
:func:`read_reference`.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow.errors import ConfigError, DataError
from meanflow.metrics.frechet import FeatureStats
from meanflow.pixels import quantize

__all__ = ["Protocol", "PROTOCOLS", "PYTORCH_FID", "get_protocol", "default_protocol",
           "read_reference", "reference_n", "tf1_resize", "half_pixel_resize",
           "pytorch_fid_input", "INCEPTION_SIZE"]

INCEPTION_SIZE = 299
PYTORCH_FID = "pytorch-fid"
INCEPTION_DIM = 2048


def _check_images(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"the Inception extractor takes (N, 1 or 3, H, W) images; got shape "
                          f"{tuple(images.shape)}")
    x = images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# --------------------------------------------------------------------------------------------
# Resizes
# --------------------------------------------------------------------------------------------


def _grid_resize(x: Tensor, shift: bool, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize by sampling a grid (``affine_grid`` + ``grid_sample``, border padding).

    ``shift=False``: the identity affine map, whose output pixel i reads the input at
    ``(i + 0.5) · H / size − 0.5`` (half-pixel centres). ``shift=True``: the map moved by
    ``1 / H − 1 / size`` (normalised units), so pixel i reads ``i · H / size``, which is
    TensorFlow 1's ``resize_bilinear`` without half-pixel centres."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
    if shift:
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tf1_resize(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """TensorFlow-1 bilinear resize of (N, C, H, W) to ``size`` × ``size``: output pixel i reads
    the input at ``i · H / size`` (the last pixel repeated past the edge)."""
    return _grid_resize(x, shift=True, size=size)


def half_pixel_resize(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize with half-pixel centres, the edge pixel repeated past the border:
    output pixel i reads the input at ``(i + 0.5) · H / size − 0.5``."""
    return _grid_resize(x, shift=False, size=size)


# --------------------------------------------------------------------------------------------
# Quantisers: x in [-1, 1] -> the evaluator's 8-bit level, back in [-1, 1]
# --------------------------------------------------------------------------------------------


def _levels_to_unit(levels: Tensor) -> Tensor:
    return levels / 127.5 - 1.0


def _jax_round_half_up(x: Tensor) -> Tensor:
    # 127.5 x + 128 clipped to [0, 255], then the cast to uint8 drops the fraction
    return _levels_to_unit(torch.floor((127.5 * x.float() + 128.0).clamp(0.0, 255.0)))


def _adm_floor(x: Tensor) -> Tensor:
    # (x + 1) · 127.5 clamped to [0, 255], then the cast to uint8 drops the fraction
    return _levels_to_unit(torch.floor(((x.float() + 1.0) * 127.5).clamp(0.0, 255.0)))


def _py_meanflow_floor(x: Tensor) -> Tensor:
    # clamp(x / 2 + 1/2, 0, 1), floor(· 255)
    return _levels_to_unit(torch.floor((x.float() * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0))


# --------------------------------------------------------------------------------------------
# Network inputs: x in [-1, 1] (8-bit levels) -> (N, 3, 299, 299)
# --------------------------------------------------------------------------------------------


def pytorch_fid_input(images: Tensor) -> Tensor:
    """pytorch-fid: [0, 1] images, half-pixel bilinear resize (``F.interpolate``,
    ``align_corners=False``), × 2 − 1."""
    x = (_check_images(images).clamp(-1.0, 1.0) + 1.0) / 2.0
    if tuple(x.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
    return x * 2.0 - 1.0


def _tf_range(resize: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def network_input(images: Tensor) -> Tensor:
        v = (_check_images(images).clamp(-1.0, 1.0) + 1.0) * 127.5     # the levels 0..255
        if tuple(v.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            v = resize(v)
        return (v - 128.0) / 128.0
    return network_input


@dataclass(frozen=True)
class Protocol:
    """One evaluator's pixel pipeline (see the module doc and docs/fid.md)."""

    name: str
    quantize: Callable[[Tensor], Tensor]
    network_input: Callable[[Tensor], Tensor]
    labels: str            # how the official code draws class labels: balanced or random
    samples: int | None    # the official sample count (None: meanflow's own default)
    source: str            # the official file it follows
    pixels: str            # one line: quantisation, resize, range

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "pixels": self.pixels}


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(PYTORCH_FID, quantize, pytorch_fid_input, "balanced", None,
             "mseitzer/pytorch-fid src/pytorch_fid/inception.py",
             "round to 8 bits; [0, 1]; bilinear 299 align_corners=False; x 2 - 1"),
    Protocol("meanflow-jax", _jax_round_half_up, _tf_range(half_pixel_resize), "random", 50000,
             "Gsunshine/meanflow utils/fid_util.py, utils/jax_fid/resize.py (and iMF's copy)",
             "floor(clip(127.5 x + 128)); identity affine_grid + grid_sample bilinear border "
             "299 (half-pixel); (v - 128) / 128"),
    Protocol("adm", _adm_floor, _tf_range(tf1_resize), "random", 50000,
             "openai/guided-diffusion evaluations/evaluator.py (TF Inception graph), "
             "scripts/image_sample.py",
             "floor(clamp((x + 1) 127.5)); TF1 bilinear 299 (source i H / 299, as NVIDIA's "
             "TorchScript); (v - 128) / 128"),
    Protocol("py-meanflow", _py_meanflow_floor, _tf_range(tf1_resize), "random", 50000,
             "Gsunshine/py-meanflow meanflow/training/eval_loop.py (torchmetrics FID, "
             "torch-fidelity Inception)",
             "floor(255 clamp(x / 2 + 1/2)); TF1 bilinear 299 (source i H / 299); "
             "(v - 128) / 128"),
)}


def get_protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (None: ``pytorch-fid``); ConfigError naming the choices."""
    if name is None:
        return PROTOCOLS[PYTORCH_FID]
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown FID protocol {name!r}: choose one of "
                          f"{', '.join(PROTOCOLS)} (docs/fid.md)")
    return PROTOCOLS[name]


def default_protocol(data: str, extractor: str) -> str:
    """The papers' protocol for a dataset: ``py-meanflow`` for CIFAR-10 (the MeanFlow
    CIFAR-10 numbers), ``meanflow-jax`` for ImageNet (MeanFlow, iMF), ``pytorch-fid`` for
    anything else and for every extractor other than Inception."""
    if extractor != "inception":
        return PYTORCH_FID
    name = Path(str(data)).name.lower()
    if name.startswith("cifar10") or name.startswith("cifar-10"):
        return "py-meanflow"
    if "imagenet" in name:
        return "meanflow-jax"
    return PYTORCH_FID


# --------------------------------------------------------------------------------------------
# Reference statistics files
# --------------------------------------------------------------------------------------------

_FOREIGN = {
    # keys of the mean and covariance -> (protocol, what the file is)
    ("ref_mu", "ref_sigma"): ("meanflow-jax", "JAX MeanFlow FID stats file"),
    ("mu", "sigma"): ("adm", "ADM reference batch"),
}


def read_reference(path: str | os.PathLike[str]) -> FeatureStats:
    """Statistics of a reference file: one written by ``meanflow fid ref`` (its ``meta``
    names its protocol; files from before protocols were pytorch-fid), an ADM reference batch
    (``mu``, ``sigma`` and 10 000 images ``arr_0``: protocol ``adm``) or the JAX MeanFlow
    repository's stats file (``ref_mu``, ``ref_sigma``: protocol ``meanflow-jax``). Read with
    ``allow_pickle=False``; anything else raises DataError. The statistics of a downloaded file
    have no feature rows (no KID) and an unknown N (``meta["n"]`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics file {path} does not exist; make one with "
                        "meanflow fid ref, or give the path of a downloaded .npz")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive of named arrays")
            files = set(data.files)
            if "meta" in files:
                foreign = None
            else:
                foreign = next((k for k in _FOREIGN if set(k) <= files), None)
                if foreign is None:
                    raise DataError(f"{path} holds {', '.join(sorted(files)) or 'no arrays'}: "
                                    "not meanflow, ADM (mu, sigma) or JAX MeanFlow (ref_mu, "
                                    "ref_sigma) statistics; make one with meanflow fid ref")
                mu = np.array(data[foreign[0]])
                sigma = np.array(data[foreign[1]])
                images = "arr_0" in files     # not read: 10 000 images, gigabytes
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"reference statistics file {path} is unreadable ({msg}); give an "
                        ".npz from meanflow fid ref, ADM or the JAX MeanFlow repo") from None
    if foreign is None:
        stats = FeatureStats.load(path)
        stats.meta.setdefault("protocol", PYTORCH_FID)
        return stats
    protocol, what = _FOREIGN[foreign]
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu" or mu.shape != \
            (INCEPTION_DIM,) or sigma.shape != (INCEPTION_DIM, INCEPTION_DIM):
        raise DataError(f"{path} looks like a {what} but its {foreign[0]} / {foreign[1]} are "
                        f"{mu.dtype} {mu.shape} / {sigma.dtype} {sigma.shape}, not the 2048-d "
                        "Inception mean and covariance; download the file again")
    meta = {"extractor": "inception", "protocol": protocol, "source": what, "n": None,
            "file": path.name}
    if images:
        meta["holds_images"] = "arr_0 (not used: no KID or precision/recall against it)"
    try:
        return FeatureStats(mu=mu, sigma=sigma, n=1, meta=meta)
    except ConfigError as exc:
        raise DataError(f"{path} ({what}) is malformed ({exc}); download it again") from None


def reference_n(stats: FeatureStats) -> int | None:
    """How many images a reference's statistics were made of; None for a downloaded file."""
    return stats.meta["n"] if "n" in stats.meta and stats.meta["n"] is None else stats.n
