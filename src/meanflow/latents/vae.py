"""The VAE between pixels and latents: a ``diffusers`` ``AutoencoderKL`` (sd-vae-ft-mse in the
paper's ImageNet recipe, docs/method.md).

``diffusers`` is an optional dependency (``pip install 'meanflow[latents]'``). Weights are read
only from ``.safetensors`` files. A name that can be a local path is read as one, never looked
up on the hub; a hub id (``owner/name``) is read from the local Hugging Face cache first, and
downloaded only when the hub answers a quick connection test (none with ``HF_HUB_OFFLINE=1``),
so that no network means one line at once, not minutes of retries. diffusers' and the hub's
own warnings and log lines are silenced while loading: the error says what failed.

Latents are stored unscaled; the model sees ``scale * (z - shift)`` (scale 0.18215 and no
shift for SD-VAE; SD3 and FLUX VAEs have a ``shift_factor`` in their config) and decoding
computes ``z / scale + shift`` again. Scale and shift may also be per channel (C values each,
the iMF recipe's ``channel_norm``: scale_c = 1 / sigma_c, shift_c = mu_c, docs/imf.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence, Union
from urllib.parse import urlparse

import torch
from torch import Tensor

from meanflow.errors import ConfigError, DataError
from meanflow.fileio import file_sha256

__all__ = ["SD_VAE_SCALE", "DIFFUSERS_INSTALL", "load_vae", "vae_identity", "encode_posterior",
           "decode_latents", "latent_shape", "vae_shift"]

SD_VAE_SCALE = 0.18215      # Stable Diffusion's latent scale (the paper's x0.18215)
DIFFUSERS_INSTALL = "pip install 'meanflow[latents]' (or: pip install diffusers)"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _autoencoder_class() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("latents need the optional dependency diffusers, which is not "
                          f"installed: {DIFFUSERS_INSTALL}") from None
    return AutoencoderKL


# The first path segments the hub keeps for itself (huggingface.co/models/..., /datasets/...):
# "models/sd-vae-ft-mse" can only be a local folder, never a hub id.
_HUB_RESERVED = ("models", "datasets", "spaces", "docs", "api")


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is a local path rather than a hub id ``owner/name``: it starts with
    ".", "/" or "~", has other than one slash, exists, or its first part is a local folder or a
    name the hub reserves (a mistyped ``models/sd-vae-ft-mse`` fails at once, no hub lookup)."""
    if spec.startswith((".", "/", "~", "\\")) or spec.count("/") != 1 or Path(spec).exists():
        return True
    owner = spec.split("/", 1)[0]
    return owner.lower() in _HUB_RESERVED or Path(owner).is_dir() or "\\" in spec \
        or Path(spec).is_absolute()


def _vae_folder(folder: Path) -> Path:
    """The folder holding the VAE itself: ``folder``, or its ``vae/`` of a diffusers pipeline
    folder (``model_index.json``, the VAE in ``vae/``) when ``folder`` has no config.json."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        return folder / "vae"
    return folder


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and huggingface_hub's warnings and log lines off (errors are ours)."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _hub_reachable() -> str | None:
    """None when the hub answers a TCP connection within 3 s, else why not (one phrase).
    ``HF_HUB_OFFLINE`` set: not tried."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=3).close()
    except OSError as exc:
        return f"{host} cannot be reached: {exc.strerror or type(exc).__name__}"
    return None


def _failure(exc: BaseException) -> str:
    """An exception's text on one line, cut at a word, not mid-word."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:text.rfind(" ", 0, 200)] + " ..."


def load_vae(spec: str | os.PathLike[str], device: torch.device | str = "cpu") -> Any:
    """An ``AutoencoderKL`` in eval mode on ``device``, from a local folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes them), a local
    diffusers pipeline folder (a Stable Diffusion checkout: the VAE in ``vae/``) or a hub id
    such as ``stabilityai/sd-vae-ft-mse`` (the local cache, else the hub where a network
    exists). Raises DataError naming the fix."""
    text = os.fspath(spec)
    folder = Path(text).expanduser()
    if _looks_like_path(text) and not folder.is_dir():   # before importing diffusers: at once
        raise DataError(f"VAE folder {text} not found: give a folder holding config.json and "
                        f"{_WEIGHTS} (e.g. a copy of stabilityai/sd-vae-ft-mse), or a "
                        "pipeline folder with the VAE in vae/")
    AutoencoderKL = _autoencoder_class()
    local = folder.is_dir()
    if local:
        folder = _vae_folder(folder)
    if local and not (folder / _WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:4]) or "nothing"
        raise DataError(f"VAE folder {text} has no {_WEIGHTS} (found: {found}); save the VAE "
                        "with save_pretrained(folder, safe_serialization=True): other weight "
                        "files (pickles) are never read")
    source = str(folder) if local else text
    with _quiet():
        try:
            vae = AutoencoderKL.from_pretrained(source, use_safetensors=True,
                                                low_cpu_mem_usage=False,
                                                local_files_only=True)
        except Exception as exc:  # OSError, EnvironmentError, ValueError, hub errors
            if local:
                raise DataError(f"cannot load the VAE {text!r} ({_failure(exc)}); the folder "
                                f"needs config.json and {_WEIGHTS}") from None
            offline = _hub_reachable()
            if offline is not None:
                raise DataError(f"the VAE {text!r} is not a local folder nor in the Hugging "
                                f"Face cache, and {offline}; download it where a network "
                                "exists and give its folder") from None
            try:
                vae = AutoencoderKL.from_pretrained(source, use_safetensors=True,
                                                    low_cpu_mem_usage=False)
            except Exception as exc2:
                raise DataError(f"cannot load the VAE {text!r} from the hub "
                                f"({_failure(exc2)}); check the id, or give a local "
                                "folder") from None
    return vae.to(torch.device(device)).eval().requires_grad_(False)


def vae_identity(spec: str | os.PathLike[str], vae: Any) -> dict[str, Any]:
    """What identifies a VAE in latent folders and sample files: the spec (a local folder as an
    absolute path), the SHA-256 of its weights file when local, and its config."""
    text = os.fspath(spec)
    folder = Path(text).expanduser()
    ident: dict[str, Any] = {"spec": str(folder.resolve()) if folder.is_dir() else text}
    weights = _vae_folder(folder) / _WEIGHTS
    if weights.is_file():
        ident["sha256"] = file_sha256(weights)
    ident["config"] = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return ident


def latent_shape(vae: Any, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent of a ``resolution``² image (SD-VAE at 256: (4, 32, 32))."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE's "
                          f"downsampling factor {factor}")
    side = resolution // factor
    return (int(vae.config.latent_channels), side, side)


@torch.no_grad()
def encode_posterior(vae: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior (mean, std) of images (B, 3, H, W) in [-1, 1]: each (B, C, h, w) float32 on
    the CPU, unscaled."""
    device = next(vae.parameters()).device
    dist = vae.encode(images.to(device, torch.float32)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def vae_shift(vae: Any) -> float:
    """The VAE's ``shift_factor`` (SD3 and FLUX VAEs have one), 0.0 when its config has none."""
    value = dict(vae.config).get("shift_factor")
    shift = 0.0 if value is None else float(value)
    if not math.isfinite(shift):
        raise DataError(f"the VAE's shift_factor {value!r} is not a finite number; fix its "
                        "config.json")
    return shift


#: A decoding scale or shift: one number, or C (a sequence or a 1-D tensor), one per channel.
PerChannel = Union[float, Sequence[float], Tensor]


def _per_channel(value: Any, name: str, z: Tensor, device: torch.device) -> Tensor:
    """C per-channel values as a float32 (1, C, 1, ..., 1) tensor on ``device`` to broadcast
    over ``z`` (B, C, ...); a one-line ConfigError unless they are C finite numbers (and, for
    the scale, positive)."""
    try:
        values = (value.detach().to("cpu", torch.float64) if isinstance(value, Tensor)
                  else torch.as_tensor(value, dtype=torch.float64)).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{name}={value!r} must be one number or a list of numbers, one "
                          "per latent channel") from None
    channels = z.shape[1] if z.dim() > 1 else 0
    if values.numel() != channels:
        raise ConfigError(f"{name} has {values.numel()} value(s) and the latents have "
                          f"{channels} channel(s): give one number, or one per channel")
    if not torch.isfinite(values).all() or (name == "scale" and not (values > 0).all()):
        raise ConfigError(f"{name}={values.tolist()} must hold finite numbers"
                          + (", all positive" if name == "scale" else ""))
    shape = (1, channels) + (1,) * (z.dim() - 2)
    return values.to(torch.float32).view(shape).to(device)


def _is_scalar(value: Any) -> bool:
    """One number for all channels (a Python or NumPy number, a 0-d tensor)."""
    return isinstance(value, str) or not isinstance(value, (Sequence, Tensor)) \
        or (isinstance(value, Tensor) and value.dim() == 0)


@torch.no_grad()
def decode_latents(vae: Any, z: Tensor, scale: PerChannel = SD_VAE_SCALE,
                   batch_size: int = 32, shift: PerChannel | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] (float32, CPU) of model-space latents ``z`` (B, C, h, w):
    ``vae.decode(z / scale + shift)``, clamped; ``shift`` is by default the VAE's own
    (:func:`vae_shift`), the one ``prepare-latents`` subtracted before scaling.

    ``scale`` and ``shift`` are each one number or C, one per channel (a sequence or 1-D
    tensor, e.g. from :func:`meanflow.data.latents.latent_transform`), broadcast over
    (B, C, h, w) in float32: a ``channel_norm`` run's samples decode as ``z * sigma_c + mu_c``
    (up to the float32 rounding of 1 / sigma_c). One number for both is the scalar path,
    unchanged."""
    device = next(vae.parameters()).device
    if shift is None:
        shift = vae_shift(vae)
    shift = float(shift) if _is_scalar(shift) else _per_channel(shift, "shift", z, device)
    if not _is_scalar(scale):
        scale = _per_channel(scale, "scale", z, device)
    out = []
    for i in range(0, z.shape[0], batch_size):
        chunk = z[i:i + batch_size].to(device, torch.float32) / scale + shift
        out.append(vae.decode(chunk).sample.float().clamp(-1.0, 1.0).cpu())
    return torch.cat(out) if out else torch.zeros(0)
