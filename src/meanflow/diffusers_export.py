"""A trained run as a diffusers pipeline folder: ``meanflow export RUN OUT --format diffusers``.

:func:`export_diffusers` writes what ``MeanFlowPipeline.from_pretrained(OUT)``
(:mod:`meanflow.pipeline`) loads, with no pickle anywhere:

- ``model_index.json``: the pipeline's class and its components;
- ``backbone/config.json`` + ``backbone/diffusion_pytorch_model.safetensors``: the network as
  a ``MeanFlowBackbone`` component. Its config is what rebuilds it without meanflow's run
  folder: the model name and options, the sample shape, the number of classes and their
  names, the sampler ("meanflow", or "euler" for a flow-matching run) and where it came from;
  the weights are the chosen EMA's (or the raw ones), keys prefixed ``net.``;
- ``vae/``: for a run trained on latents, its ``AutoencoderKL`` with ``scaling_factor`` set to
  the run's latent scale and its own ``shift_factor`` (SD3, FLUX; none for SD-VAE): images are
  ``vae.decode(z / scale + shift)``, as :func:`meanflow.latents.vae.decode_latents` makes them;
- ``README.md``: how to load and sample it.

There is no scheduler: MeanFlow samples in 1 (or k) average-velocity jumps on a uniform
schedule, which the pipeline takes from :mod:`meanflow.sampling`. The folder is written
beside OUT under a temporary name and renamed into place, so OUT is whole or absent.

Writing needs no diffusers (only a latent run's VAE is loaded through it); loading does.
This module imports no diffusers, so that ``import meanflow`` and the CLI stay light.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from meanflow.errors import ConfigError
from meanflow.fileio import claim_folder, new_folder
from meanflow.latents.vae import decode_latents, load_vae
from meanflow.runs.build import model_options
from meanflow.runs.load import Model, load

__all__ = ["export_diffusers", "backbone_config", "PIPELINE_CLASS", "BACKBONE_CLASS",
           "PIPELINE_MODULE", "WEIGHTS_NAME", "EXPORT_COMMAND"]

#: Where the classes live: model_index.json names them so that diffusers finds them once
#: ``meanflow.pipeline`` is imported (importing MeanFlowPipeline does it).
PIPELINE_MODULE = "meanflow.pipeline"
PIPELINE_CLASS = "MeanFlowPipeline"
BACKBONE_CLASS = "MeanFlowBackbone"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
EXPORT_COMMAND = "meanflow export"


def _diffusers_version() -> str:
    """The installed diffusers' version, read from its metadata (no import), for the
    ``_diffusers_version`` fields; "0.30.0" (the oldest meanflow supports) without one."""
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.30.0"


def backbone_config(model: Model) -> dict[str, Any]:
    """The ``MeanFlowBackbone`` config of a loaded run: its init arguments, JSON-ready."""
    return {"model": model.config.model.name,
            "options": model_options(model.config, model.shape),
            "sample_shape": list(model.shape),
            "num_classes": model.num_classes,
            "class_names": None if model.class_names is None else list(model.class_names),
            "sampler": model.method,
            "source": {"checkpoint": str(model.checkpoint), "step": model.step,
                       "weights": model.weights}}


def _check_out(out: Path) -> None:
    """OUT is new or an empty folder, else a one-line ConfigError."""
    if out.is_dir() and (out / "model_index.json").is_file():
        raise ConfigError(f"{out} already holds a diffusers export: choose a new folder, or "
                          "delete it first")
    claim_folder(out, EXPORT_COMMAND, write=False)


def _export_vae(model: Model) -> Any:
    """The AutoencoderKL of a latent run, checked to decode its samples, with the run's
    latent scale as its ``scaling_factor`` (its ``shift_factor`` is its own, the one
    ``decode_latents`` adds back); None for pixel and point runs."""
    if not model.latent:
        if model.vae is not None:
            raise ConfigError(f"--vae is for runs trained on latents; this run's samples "
                              f"(shape {model.shape}) are not latents: drop --vae")
        return None
    if model.vae is None:
        raise ConfigError(f"{model.checkpoint} trained on latents and the VAE that decodes them "
                          "is unknown: pass --vae PATH (vae=PATH), a diffusers AutoencoderKL "
                          "folder")
    if not isinstance(model.vae["scale"], (int, float)):
        raise ConfigError("this run's latents are normalised per channel "
                          "(data.options.channel_norm), which the diffusers pipeline does not "
                          "decode yet: sample it with meanflow sample, or export --format "
                          "meanflow")
    vae = load_vae(model.vae["spec"], "cpu")
    try:
        decode_latents(vae, torch.zeros(1, *model.shape), model.vae["scale"])
    except (RuntimeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:120].rsplit(" ", 1)[0]
        raise ConfigError(f"the VAE {model.vae['spec']} does not decode this run's samples of "
                          f"shape {model.shape} ({first} ...): give the VAE its latents were "
                          "made with (--vae PATH)") from None
    vae.register_to_config(scaling_factor=float(model.vae["scale"]))
    return vae


def _readme(model: Model, out: Path) -> str:
    kind = ("latent" if model.latent else "image" if len(model.shape) == 3 else "point")
    if model.num_classes is None:
        labels, classes = "", "Unconditional."
    else:
        labels = ", class_labels=0"
        named = ("" if model.class_names is None
                 else f" ({', '.join(model.class_names[:10])}"
                      f"{', ...' if model.num_classes > 10 else ''})")
        classes = f"Class-conditional: {model.num_classes} classes{named}."
    what = "out.images" if kind != "point" else "out.samples"
    return (f"# MeanFlow {kind} model (exported by meanflow)\n\n"
            f"Run `{model.checkpoint}`, step {model.step}, weights `{model.weights}`, "
            f"sampler `{model.method}`, samples of shape {tuple(model.shape)}. {classes}\n\n"
            "```python\nimport torch\nfrom meanflow.pipeline import MeanFlowPipeline\n\n"
            f"pipe = MeanFlowPipeline.from_pretrained({str(out)!r})\n"
            "gens = [torch.Generator().manual_seed(i) for i in range(4)]\n"
            f"out = pipe(batch_size=4, num_inference_steps=1, generator=gens{labels})\n"
            f"{what}\n```\n\n"
            "Sample i drawn from `torch.Generator().manual_seed(s)` equals meanflow's sample "
            "of seed s: `meanflow.load(run).sample(seeds=[s, ...])` with the same labels.\n")


def export_diffusers(run_or_checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                     ema: float | str | None = "auto",
                     vae: str | os.PathLike[str] | None = "auto") -> Path:
    """Writes a run (folder or ``checkpoints/step_*``) as a diffusers pipeline folder ``out``
    (see the module docstring) and returns its path.

    Args:
        ema: the weights, as in :func:`meanflow.load`: "auto" (the run's first EMA), a
            decay, or None for the raw training weights.
        vae: for a latent run, "auto" (the VAE recorded with its latents) or a diffusers
            AutoencoderKL folder or hub id; pixel and point runs take none.

    ``out`` must be new or an empty folder: nothing is replaced.
    """
    out = Path(out)
    _check_out(out)
    model = load(run_or_checkpoint, ema=ema, device="cpu", vae=vae)
    vae_net = _export_vae(model)
    version = _diffusers_version()
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": version,
             "backbone": [PIPELINE_MODULE, BACKBONE_CLASS],
             "vae": ["diffusers", "AutoencoderKL"] if vae_net is not None else [None, None]}
    config = {"_class_name": BACKBONE_CLASS, "_diffusers_version": version,
              **backbone_config(model)}
    weights = {f"net.{k}": v.detach().cpu().contiguous().clone()
               for k, v in model.net.state_dict().items()}
    with new_folder(out, _check_out) as tmp:   # out is still new or empty when it lands
        (tmp / "backbone").mkdir()
        save_file(weights, str(tmp / "backbone" / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "backbone" / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if vae_net is not None:
            vae_net.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(model, out))
    return out
