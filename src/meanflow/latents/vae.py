"""The VAE between pixels and latents: a ``diffusers`` ``AutoencoderKL`` (sd-vae-ft-mse in the
paper's ImageNet recipe, docs/method.md).

``diffusers`` is an optional dependency (``pip install 'meanflow[latents]'``). Weights are read
only from ``.safetensors`` files; nothing is downloaded unless a hub id is given and a network
exists. Latents are stored unscaled; the model sees ``scale * z`` (0.18215 for SD-VAE) and
decoding divides by it again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanflow.errors import ConfigError, DataError
from meanflow.fileio import file_sha256

__all__ = ["SD_VAE_SCALE", "DIFFUSERS_INSTALL", "load_vae", "vae_identity", "encode_posterior",
           "decode_latents", "latent_shape"]

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


def _looks_like_path(spec: str) -> bool:
    # a hub id is "owner/name": one slash, no leading dot, slash or tilde
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1 or Path(spec).exists()


def load_vae(spec: str | os.PathLike[str], device: torch.device | str = "cpu") -> Any:
    """An ``AutoencoderKL`` in eval mode on ``device``, from a local folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes them) or a hub id
    such as ``stabilityai/sd-vae-ft-mse`` (needs a network). Raises DataError naming the fix."""
    AutoencoderKL = _autoencoder_class()
    text = os.fspath(spec)
    folder = Path(text).expanduser()
    if _looks_like_path(text) and not folder.is_dir():
        raise DataError(f"VAE folder {text} not found: give a folder holding config.json and "
                        f"{_WEIGHTS} (e.g. a copy of stabilityai/sd-vae-ft-mse)")
    source = str(folder) if folder.is_dir() else text
    try:
        vae = AutoencoderKL.from_pretrained(source, use_safetensors=True,
                                            low_cpu_mem_usage=False)
    except Exception as exc:  # OSError, EnvironmentError, ValueError, hub errors
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        where = ("the folder needs config.json and " + _WEIGHTS if folder.is_dir()
                 else "without a network, download it elsewhere and give its folder")
        raise DataError(f"cannot load the VAE {text!r} ({msg}); {where}") from None
    return vae.to(torch.device(device)).eval().requires_grad_(False)


def vae_identity(spec: str | os.PathLike[str], vae: Any) -> dict[str, Any]:
    """What identifies a VAE in latent folders and sample files: the spec (a local folder as an
    absolute path), the SHA-256 of its weights file when local, and its config."""
    text = os.fspath(spec)
    folder = Path(text).expanduser()
    ident: dict[str, Any] = {"spec": str(folder.resolve()) if folder.is_dir() else text}
    weights = folder / _WEIGHTS
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


@torch.no_grad()
def decode_latents(vae: Any, z: Tensor, scale: float = SD_VAE_SCALE,
                   batch_size: int = 32) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] (float32, CPU) of model-space latents ``z`` (B, C, h, w):
    ``vae.decode(z / scale)``, clamped."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, z.shape[0], batch_size):
        chunk = z[i:i + batch_size].to(device, torch.float32) / scale
        out.append(vae.decode(chunk).sample.float().clamp(-1.0, 1.0).cpu())
    return torch.cat(out) if out else torch.zeros(0)
