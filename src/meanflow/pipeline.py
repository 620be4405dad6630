"""MeanFlow models as diffusers pipelines: ``MeanFlowPipeline.from_pretrained(OUT)`` on a folder
that ``meanflow export RUN OUT --format diffusers`` wrote (:mod:`meanflow.diffusers_export`).

    import torch
    from meanflow.pipeline import MeanFlowPipeline

    pipe = MeanFlowPipeline.from_pretrained("exports/shapes")
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    images = pipe(batch_size=8, num_inference_steps=1, class_labels=3, generator=gens).images

This module imports diffusers (``pip install 'meanflow[latents]'``); nothing else in meanflow
imports it at import time. diffusers finds the backbone's class through this module, so import
it (as above) before ``from_pretrained``; ``DiffusionPipeline.from_pretrained`` reads the
folder too once it is imported, but only ``MeanFlowPipeline.from_pretrained`` picks the class
by itself.

Seeds: meanflow draws sample i from ``torch.Generator().manual_seed(seeds[i])`` on the CPU
(:func:`meanflow.sampling.seeded_noise`). The pipeline draws sample i from ``generator[i]``
when given a list of generators (one per sample), and all samples one after another from a
single generator; so ``[torch.Generator().manual_seed(s) for s in seeds]`` gives exactly
``meanflow.load(run).sample(seeds=seeds)`` (same labels, steps and weights), bit for bit on the
CPU, and ``torch.Generator().manual_seed(s)`` with ``batch_size=1`` gives seed ``s``'s sample.
The sampler is meanflow's own (:func:`meanflow.sampling.sample`, or
:func:`~meanflow.sampling.euler_sample` for a flow-matching run), and a latent run's images
are decoded by :func:`meanflow.latents.vae.decode_latents`, as ``meanflow sample`` does.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from meanflow.diffusers_export import BACKBONE_CLASS, PIPELINE_CLASS
from meanflow.errors import ConfigError
from meanflow.latents.vae import DIFFUSERS_INSTALL, decode_latents
from meanflow.models import build_model_for_data
from meanflow.pixels import to_uint8
from meanflow.sampling import SAMPLING_METHODS, euler_sample, sample

try:
    from diffusers import AutoencoderKL, DiffusionPipeline, ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.utils import BaseOutput
except ImportError as exc:
    raise ImportError(f"meanflow.pipeline needs the optional dependency diffusers, which is not "
                      f"installed: {DIFFUSERS_INSTALL}") from exc

__all__ = ["MeanFlowBackbone", "MeanFlowPipeline", "MeanFlowPipelineOutput", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class MeanFlowBackbone(ModelMixin, ConfigMixin):
    """A meanflow backbone (``mlp``, ``unet-*``, ``dit-*``) as a diffusers model: its config
    (the init arguments below, saved in ``config.json``) rebuilds the network, and its weights
    are those of ``net``. ``forward(z, t, h, y)`` is the network's: the average velocity
    u(z, r = t - h, t) for MeanFlow runs, the velocity at ``h = 0``.

    Args:
        model: the registry name, e.g. "unet-small" (:data:`meanflow.models.MODELS`).
        options: the backbone's options as the run built it (``model_options``).
        sample_shape: one sample's shape, e.g. [3, 32, 32] (latents for a latent run).
        num_classes: classes of a class-conditional run, else None.
        class_names: the name of each class where the data named them, else None.
        sampler: "meanflow", or "euler" for a run trained by flow matching.
        source: where the weights came from (checkpoint, step, weights), for the record.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, model: str = "mlp", options: dict[str, Any] | None = None,
                 sample_shape: Sequence[int] = (2,), num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, sampler: str = "meanflow",
                 source: dict[str, Any] | None = None):
        super().__init__()
        if sampler not in SAMPLING_METHODS:
            raise ConfigError(f"sampler {sampler!r} in the backbone's config.json is not one "
                              f"of {', '.join(SAMPLING_METHODS)}: export the run again")
        self.net = build_model_for_data(model, tuple(int(s) for s in sample_shape),
                                        num_classes, dict(options or {}))

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(z, t, h, y)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "MeanFlowBackbone":
        """diffusers' ``from_pretrained``, then every tensor copied to memory of its own.
        diffusers leaves the weights in views of the memory-mapped file, at addresses that
        are not 64-byte aligned, and on the CPU some kernels round differently there (by
        1e-7 at batch size 1): fresh copies are aligned as meanflow's own loading leaves
        them, so the pipeline's samples equal ``meanflow.load(run).sample``'s bit for bit."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
        return model


@dataclass
class MeanFlowPipelineOutput(BaseOutput):
    """What :class:`MeanFlowPipeline` returns.

    ``images``: for image and latent runs, a list of PIL images ("pil"), an array
    (N, H, W, C) in [0, 1] ("np"), a tensor (N, C, H, W) in [0, 1] ("pt"), or the latents
    ("latent"); None for point runs. ``samples``: (N, *sample_shape) what the network made, in
    model space (points, pixels in [-1, 1] or latents; an array for "np", else a tensor), on
    the CPU. ``labels``: (N,) int64 class of each sample, or None (unconditional).
    """
    images: list[PIL.Image.Image] | np.ndarray | Tensor | None
    samples: np.ndarray | Tensor
    labels: Tensor | None = None


def _pil(images: Tensor) -> list[PIL.Image.Image]:
    """uint8 (N, C, H, W) -> N PIL images (grey for one channel, RGB for three)."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    if hwc.shape[-1] == 1:
        return [PIL.Image.fromarray(a[..., 0], mode="L") for a in hwc]
    return [PIL.Image.fromarray(a) for a in hwc]


class MeanFlowPipeline(DiffusionPipeline):
    """One-step (or k-step) MeanFlow generation from a folder ``meanflow export`` wrote.

    Components: ``backbone`` (:class:`MeanFlowBackbone`) and, for runs trained on latents,
    ``vae`` (an ``AutoencoderKL`` whose ``scaling_factor`` is the run's latent scale). There is
    no scheduler: the schedule is uniform from t = 1 (noise) to t = 0 (data) unless given.
    """

    model_cpu_offload_seq = "backbone->vae"
    _optional_components = ["vae"]

    def __init__(self, backbone: MeanFlowBackbone, vae: AutoencoderKL | None = None):
        super().__init__()
        self.register_modules(backbone=backbone, vae=vae)

    @property
    def class_names(self) -> list[str] | None:
        names = self.backbone.config.class_names
        return None if names is None else list(names)

    def get_label_ids(self, labels: Any) -> list[int]:
        """Class numbers of ``labels``: one class or a list, each a number or a class name."""
        one = (isinstance(labels, (numbers.Integral, str))
               or (isinstance(labels, (Tensor, np.ndarray)) and labels.ndim == 0))
        return [self._label_id(k) for k in ([labels] if one else list(labels))]

    def _label_id(self, label: Any) -> int:
        num_classes = self.backbone.config.num_classes
        names = self.class_names
        if isinstance(label, str):
            if names is None or label not in names:
                choose = ("give class numbers" if names is None
                          else f"choose one of {', '.join(names)}")
                raise ConfigError(f"class {label!r} is not a named class of this model: {choose}")
            return names.index(label)
        k = int(label)
        if not 0 <= k < num_classes:
            raise ConfigError(f"label {k} is outside [0, {num_classes}): give a class number "
                              f"below {num_classes}")
        return k

    def _labels(self, n: int, class_labels: Any) -> Tensor | None:
        """(n,) labels: None -> class i mod K (meanflow's balanced default); one class -> all
        samples; else one per sample. None for an unconditional model."""
        num_classes = self.backbone.config.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ConfigError("class_labels given but the model is unconditional: drop them")
            return None
        if class_labels is None:
            return torch.arange(n) % num_classes
        ids = self.get_label_ids(class_labels)
        if len(ids) == 1:
            ids = ids * n
        if len(ids) != n:
            raise ConfigError(f"{len(ids)} class labels for {n} samples: give one label per "
                              "sample, or one for all")
        return torch.tensor(ids, dtype=torch.long)

    def _noise(self, n: int, generator: Any) -> Tensor:
        """(n, *sample_shape) float32 noise, row i drawn from ``generator[i]`` (a list), or the
        rows in order from one generator (or torch's global one when None), on the
        generator's device (the CPU for meanflow's seeds)."""
        shape = tuple(self.backbone.config.sample_shape)
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ConfigError(f"{len(generator)} generators for batch_size={n}: give one "
                                  "generator per sample, or one for all")
            gens = list(generator)
        else:
            gens = [generator] * n
        rows = [torch.randn(shape, generator=g, device=None if g is None else g.device)
                for g in gens]
        return torch.stack([r.cpu() for r in rows])

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, num_inference_steps: int = 1,
                 class_labels: Any = None, generator: Any = None,
                 output_type: str | None = None, schedule: Sequence[float] | None = None,
                 return_dict: bool = True) -> MeanFlowPipelineOutput | tuple:
        """Generates ``batch_size`` samples in ``num_inference_steps`` network calls.

        Args:
            batch_size: how many; by default the length of ``generator`` or ``class_labels``
                when a list, else 1.
            num_inference_steps: network calls (1: one-step MeanFlow).
            class_labels: None (class i mod K), one class for all, or one per sample; each a
                number or a class name (class-conditional models only).
            generator: one ``torch.Generator`` per sample (sample i from ``generator[i]``:
                ``torch.Generator().manual_seed(s)`` gives meanflow's sample of seed ``s``),
                one for all (drawn in order), or None (torch's global generator).
            output_type: "pil", "np", "pt" or "latent"; default "pil" for image and latent
                runs, "np" for point runs (which have no images: only "np" and "pt").
            schedule: the times 1 = t_0 > ... > t_K = 0 (default uniform).
            return_dict: False returns a tuple: (images,), or (samples,) for points.
        """
        shape = tuple(self.backbone.config.sample_shape)
        is_image = len(shape) == 3 or self.vae is not None
        if output_type is None:
            output_type = "pil" if is_image else "np"
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r} is not one of "
                              f"{', '.join(OUTPUT_TYPES)}")
        if not is_image and output_type not in ("np", "pt"):
            raise ConfigError(f"this model makes points of shape {shape}, not images: give "
                              "output_type 'np' or 'pt'")
        if batch_size is None:
            lists = [x for x in (generator, class_labels) if isinstance(x, (list, tuple))
                     or (isinstance(x, (Tensor, np.ndarray)) and x.ndim == 1)]
            batch_size = len(lists[0]) if lists else 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        y = self._labels(batch_size, class_labels)
        noise = self._noise(batch_size, generator)
        device, dtype = self.backbone.device, self.backbone.dtype
        step = sample if self.backbone.config.sampler == "meanflow" else euler_sample
        x = step(self.backbone, noise.to(device, dtype), num_inference_steps,
                 None if y is None else y.to(device), schedule).cpu()
        images = self._images(x, output_type) if is_image else None
        samples = x.numpy() if output_type == "np" else x
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images if images is not None else samples,)
        return MeanFlowPipelineOutput(images=images, samples=samples, labels=y)

    def _images(self, x: Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | Tensor:
        """Images of model-space samples ``x``: decoded by the VAE for latent runs (as
        meanflow decodes them), else pixels in [-1, 1]."""
        if output_type == "latent":
            return x
        if self.vae is not None:     # z / scale (+ the VAE's shift_factor), as meanflow does
            x = decode_latents(self.vae, x, float(self.vae.config.scaling_factor),
                               batch_size=max(1, len(x)))
        if output_type == "pil":
            return _pil(to_uint8(x))
        unit = (x.float().clamp(-1.0, 1.0) + 1.0) / 2.0
        return unit.permute(0, 2, 3, 1).numpy() if output_type == "np" else unit


# the names model_index.json uses (meanflow.diffusers_export) are these classes' names
assert MeanFlowPipeline.__name__ == PIPELINE_CLASS and MeanFlowBackbone.__name__ == BACKBONE_CLASS
