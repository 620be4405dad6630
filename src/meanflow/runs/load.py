"""Trained runs back for inference: ``meanflow.load(run).sample(n)``.

:func:`load` restores a run folder's newest checkpoint (or a given ``checkpoints/step_*``
folder): the backbone built as in training (:mod:`meanflow.runs.build`), its EMA (or raw)
weights, what the data recorded (sample shape, classes and their names) and, for a run on a
latent folder, the VAE that decodes its samples (loaded on first use). :meth:`Model.sample`
then gives what the run makes: 2-D or N-D points, uint8 images, or decoded images of a latent
run, with the class of each sample. Every sample goes through
:func:`meanflow.sampling.generate`, the path the CLI, FID and training take too, so sample i
(from seed i) is the same here, in ``meanflow sample`` and under torchrun.

:func:`load_model` is the lower level: the network and its record, without the VAE.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from meanflow.data.latents import is_latent_folder, latent_transform, read_latent_index
from meanflow.errors import CheckpointError, ConfigError, DataError
from meanflow.latents.vae import SD_VAE_SCALE, decode_latents, load_vae
from meanflow.pixels import to_uint8
from meanflow.runs.build import build_network, resolve_model
from meanflow.runs.checkpoint import (check_state, checkpoint_step, ema_key,
                                      find_checkpoint, list_checkpoints,
                                      load_checkpoint)
from meanflow.runs.config import RunConfig
from meanflow.sampling import generate, sampling_method, with_guidance
from meanflow.world import World, resolve_device

__all__ = ["LoadedModel", "load_model", "Model", "Samples", "load", "resolve_vae"]


@dataclass
class LoadedModel:
    """A backbone restored from a checkpoint, in eval mode, with what is needed to sample it."""
    net: nn.Module
    config: RunConfig
    step: int
    shape: tuple[int, ...]
    num_classes: int | None
    weights: str            # "model" or the EMA key used, e.g. "ema_0.999"
    checkpoint: Path
    class_names: tuple[str, ...] | None = None   # name of class k, where the data named them


def _class_names(data: dict[str, Any], num_classes: int | None) -> tuple[str, ...] | None:
    """The class names a checkpoint's data record holds (runs trained before they were
    recorded have none: None), checked against its number of classes."""
    names = data.get("class_names")
    if names is None or num_classes is None:
        return None
    if (not isinstance(names, list) or len(names) != num_classes
            or not all(isinstance(s, str) for s in names)):
        raise TypeError
    return tuple(names)


def load_model(path: str | os.PathLike[str], ema: float | str | None = "auto",
               device: torch.device | str = "cpu") -> LoadedModel:
    """Restores a backbone from a run folder (newest checkpoint) or a checkpoint folder.

    ``ema="auto"`` takes the first EMA decay of the run (samplers should use EMA weights);
    a float picks that decay; None takes the raw training weights. The backbone is built as
    in training (:func:`meanflow.runs.build.model_options`: with the augmentation label's
    width when the run used ``data.augment``).
    """
    ckpt = find_checkpoint(Path(path))
    _, state = load_checkpoint(ckpt, device, parts=())
    fields = check_state(state, ckpt)      # bounded before anything is built from it
    shape, num_classes, decays = fields["shape"], fields["num_classes"], fields["decays"]
    try:
        # runs record the backbone they trained; "auto" (a hand-made config) is the data's
        cfg = resolve_model(RunConfig.from_dict(fields["config"]), shape)
        class_names = _class_names(state["data"], num_classes)
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError):
        raise CheckpointError(f"{ckpt / 'state.json'} lacks the config, data or EMA fields of a "
                              "meanflow checkpoint: restore it or use another checkpoint") from None
    weights = _chosen_weights(ckpt, ema, decays)
    part = "model" if weights == "model" else "ema"
    if f"{part}.safetensors" not in state["sha256"]:     # a release holds one set of weights
        held = ", ".join(str(d) for d in decays) or "none"
        raise ConfigError(f"{ckpt} holds only the weights --ema {held} chooses (an export "
                          f"of one set of weights): choose --ema {held.split(', ')[0]}")
    sd = _weights(load_checkpoint(ckpt, device, parts=(part,))[0], weights)
    if not _all_finite(sd):
        raise CheckpointError(_diverged(ckpt, weights, ema))
    net = build_network(cfg, shape, num_classes)
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise CheckpointError(f"weights in {ckpt} do not fit the configured model "
                              f"({said[:300]})") from None
    step = fields["step"]
    net.to(device).eval()
    return LoadedModel(net=net, config=cfg, step=step, shape=shape, num_classes=num_classes,
                       weights=weights, checkpoint=ckpt, class_names=class_names)


def _chosen_weights(ckpt: Path, ema: float | str | None, decays: list[float]) -> str:
    """The name of the weights ``ema`` chooses: "model", or an EMA's key."""
    if ema is None or (ema == "auto" and not decays):
        return "model"
    decay = decays[0] if ema == "auto" else float(ema)
    if decay not in decays:
        raise ConfigError(f"checkpoint {ckpt} has no EMA with decay {ema}: choose one of "
                          f"{', '.join(map(str, decays))} or none")
    return ema_key(decay)


def _weights(tensors: dict[str, dict[str, Tensor]], weights: str) -> dict[str, Tensor]:
    """The tensors of the weights named ``weights`` ("model" or an EMA's key)."""
    if weights == "model":
        return tensors["model"]
    prefix = weights + "."
    return {k[len(prefix):]: v for k, v in tensors["ema"].items() if k.startswith(prefix)}


def _all_finite(tensors: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values()
               if t.is_floating_point() or t.is_complex())


def _diverged(ckpt: Path, weights: str, ema: float | str | None) -> str:
    """The message for a checkpoint whose chosen weights hold NaN or inf: it names the newest
    earlier checkpoint of the same run whose same weights are finite, if there is one."""
    good = None
    if ckpt.parent.name == "checkpoints":
        step = checkpoint_step(ckpt)
        for earlier in reversed(list_checkpoints(ckpt.parent.parent, quiet=True)):
            if step is None or checkpoint_step(earlier) >= step:
                continue
            try:
                tensors, state = load_checkpoint(earlier, parts=("model", "ema"))
                decays = check_state(state, earlier)["decays"]
                chosen = _chosen_weights(earlier, ema, decays)
            except (CheckpointError, ConfigError):
                continue
            if chosen == weights and _all_finite(_weights(tensors, chosen)):
                good = earlier
                break
    fix = (f"sample the earlier checkpoint {good}" if good is not None
           else "no earlier checkpoint of this run has finite weights; train it again with "
                "a lower optim.lr")
    return (f"{ckpt} holds non-finite weights ({weights} has NaN or inf values: the run "
            f"diverged); {fix}")


def _latent_index(config: RunConfig) -> dict[str, Any] | None:
    """The index of the latent folder a run trained on, or None (other data, or the folder is
    no longer where the run found it)."""
    data = config.data.name
    return read_latent_index(data) if isinstance(data, str) and is_latent_folder(data) else None


def resolve_vae(spec: str | os.PathLike[str] | None, config: RunConfig) -> dict[str, Any] | None:
    """Which VAE decodes a run's samples: ``{"spec", "scale", "shift", "auto"}``, or None.

    ``spec`` "none" -> None; None or "auto" -> the VAE recorded in the run's latent folder
    (``config.data.name``) when it trained on one, else None; a path or hub id -> that VAE.
    Scale and shift are what the run's latents were made with
    (:func:`meanflow.data.latents.latent_transform`: the folder's, ``data.options.scale``, or
    per-channel ones under ``data.options.channel_norm``); without a folder the SD-VAE 0.18215
    and the VAE's own shift (None).
    """
    if spec == "none":
        return None
    index = _latent_index(config)
    scale, shift = latent_transform(index, config.data.options)
    scale = SD_VAE_SCALE if scale is None else scale
    if spec in (None, "auto"):
        if index is None or not (index.get("vae") or {}).get("spec"):
            return None
        return {"spec": index["vae"]["spec"], "scale": scale, "shift": shift, "auto": True}
    return {"spec": os.fspath(spec), "scale": scale, "shift": shift, "auto": False}


def _one_label(labels: Any) -> bool:
    """Whether ``labels`` is one class for all samples (a number or a name), not a sequence."""
    return (isinstance(labels, (numbers.Integral, str))
            or (isinstance(labels, Tensor) and labels.ndim == 0))


@dataclass
class Samples:
    """What :meth:`Model.sample` gives, sample i from ``seeds[i]``, all on the CPU.

    ``samples`` (N, *shape) float: what the network makes (points, pixels in [-1, 1], or
    latents in model space). ``images`` (N, H, W, C) uint8: the pictures, for image runs and
    for latent runs decoded by their VAE; None for points and kept latents. ``labels`` (N,)
    int64 for class-conditional runs, else None; ``classes`` the name of each sample's class
    where the data named them, else None.
    """
    samples: Tensor
    images: Tensor | None
    labels: Tensor | None
    classes: list[str] | None
    seeds: list[int]
    method: str                       # "meanflow" or "euler"
    steps: int
    schedule: list[float] | None
    decoded: bool                     # whether ``images`` come from the VAE
    guidance: dict[str, Any] | None = None   # {"omega", "interval"} chosen at sampling time

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass
class Model(LoadedModel):
    """A trained run ready to sample (see :func:`load`). Besides the fields of
    :class:`LoadedModel`: ``device``, ``latent`` (whether it trained on VAE latents) and
    ``vae`` (``{"spec", "scale", "auto"}`` of the VAE that decodes its samples, or None),
    which is loaded at the first decode."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    latent: bool = False              # trained on a latent folder: samples are VAE latents
    vae: dict[str, Any] | None = None
    _vae_net: Any = field(default=None, init=False, repr=False)

    @property
    def method(self) -> str:
        """The sampler of the run's objective: "meanflow", or "euler" for flow matching."""
        return sampling_method(self.config.objective.kind)

    def labels_for(self, n: int, labels: Any = None) -> Tensor | None:
        """(n,) int64 labels for a class-conditional run, None for an unconditional one.

        ``labels``: None (balanced: sample i gets class i mod K), one class for all (an int,
        or a name from ``class_names``), or one per sample (ints or names)."""
        if self.num_classes is None:
            if labels is not None:
                raise ConfigError("labels given but the model is unconditional: drop them")
            return None
        if labels is None:
            return torch.arange(n) % self.num_classes
        if _one_label(labels):
            labels = [self._class_index(labels)] * n
        else:
            labels = [self._class_index(k) for k in labels]
        if len(labels) != n:
            raise ConfigError(f"{len(labels)} labels for {n} samples: give one label per "
                              "sample, or one for all")
        return torch.tensor(labels, dtype=torch.long)

    def _class_index(self, label: Any) -> int:
        if isinstance(label, str):
            if self.class_names is None:
                raise ConfigError(f"class {label!r} given by name, but this run's data named "
                                  "no classes: give class numbers")
            if label not in self.class_names:
                raise ConfigError(f"class {label!r} is not a class of this run: choose one of "
                                  f"{', '.join(self.class_names)}")
            return self.class_names.index(label)
        k = int(label)
        if not 0 <= k < self.num_classes:
            raise ConfigError(f"label {k} is outside [0, {self.num_classes}): give a class "
                              f"number below {self.num_classes}")
        return k

    def decode(self, z: Tensor) -> Tensor:
        """Latents (b, C, h, w) in model space -> images (b, 3, H, W) in [-1, 1] (float32,
        CPU) by the run's VAE, ``vae.decode(z / scale)`` in one batch; loads the VAE at the
        first call."""
        if self.vae is None:
            raise ConfigError("this run has no VAE to decode its samples: load it with "
                              "vae=PATH (a diffusers AutoencoderKL folder)")
        if self._vae_net is None:
            try:
                self._vae_net = load_vae(self.vae["spec"], self.device)
            except DataError as exc:
                if not self.vae["auto"]:
                    raise
                raise DataError(f"{exc} [it is the VAE recorded with the run's latents: pass "
                                "--vae PATH (load(..., vae=PATH)) where it is now, or --vae "
                                "none to keep the latents]") from None
        return decode_latents(self._vae_net, z, self.vae["scale"], batch_size=max(1, len(z)),
                              shift=self.vae.get("shift"))

    def sample(self, n: int | None = None, *, labels: Any = None, steps: int = 1,
               schedule: Sequence[float] | None = None, seed: int = 0,
               seeds: Sequence[int] | None = None, batch_size: int = 500, decode: bool = True,
               progress: bool = False, world: World | None = None,
               guidance: float | None = None,
               interval: Sequence[float] | None = None) -> Samples:
        """``n`` samples, sample i from seed ``seed + i`` (or ``seeds[i]``) with label
        ``labels[i]`` (see :meth:`labels_for`; default balanced over the classes), in
        ``steps`` network calls on the ``schedule`` (default uniform).

        ``guidance`` (ω >= 1) and ``interval`` ((t_min, t_max), default (0, 1)) choose the
        guidance of a model trained with guidance conditioning (iMF, docs/imf.md §9), e.g.
        ``guidance=8, interval=(0.4, 0.65)``; None samples it at ω = 1. A MeanFlow model's
        guidance is trained in, and refuses both.

        Sample i depends on its seed and label alone, not on ``n``, ``batch_size`` or the
        number of processes: under torchrun (``world`` from :func:`meanflow.world.setup`) the
        seeds are shared out over the ranks and every rank gets all samples back. A latent
        run's samples are decoded by its VAE batch by batch (``decode=False`` keeps the
        latents). ``progress`` shows a bar (on rank 0).
        """
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if n is not None and n != len(seeds):
                raise ConfigError(f"n={n} but {len(seeds)} seeds given: give one of them")
            n = len(seeds)
        elif n is None and labels is not None and not _one_label(labels):
            n = len(labels)
        if n is None:
            raise ConfigError("give n (how many samples) or seeds")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} must be a positive number of samples")
        seeds = seeds if seeds is not None else list(range(seed, seed + n))
        net = with_guidance(self.net, guidance, interval, self.num_classes is not None)
        y = self.labels_for(n, labels)
        decoder = self._to_images if decode and self.vae is not None else None
        main = world is None or world.is_main
        x, decoded = generate(net, seeds, self.shape, labels=y, steps=steps,
                              schedule=schedule, method=self.method, decode=decoder,
                              batch_size=batch_size, device=self.device, world=world,
                              progress=progress and main)
        if decoded is not None:
            images = decoded.permute(0, 2, 3, 1).contiguous()          # (N, H, W, 3)
        elif len(self.shape) == 3 and not self.latent and self.vae is None:
            images = to_uint8(x).permute(0, 2, 3, 1).contiguous()      # (N, H, W, C)
        else:
            images = None
        classes = (None if y is None or self.class_names is None
                   else [self.class_names[k] for k in y.tolist()])
        return Samples(samples=x, images=images, labels=y, classes=classes, seeds=seeds,
                       method=self.method, steps=steps,
                       schedule=None if schedule is None else [float(t) for t in schedule],
                       decoded=decoded is not None,
                       guidance=None if net is self.net else
                       {"omega": net.omega, "interval": list(net.interval)})

    def _to_images(self, z: Tensor) -> Tensor:
        """A batch of latents as the uint8 images (b, 3, H, W) a file would hold."""
        return to_uint8(self.decode(z))


def load(run_or_checkpoint: str | os.PathLike[str], ema: float | str | None = "auto",
         device: torch.device | str = "cpu",
         vae: str | os.PathLike[str] | None = "auto") -> Model:
    """A trained run, ready to sample: ``meanflow.load("runs/00001-...").sample(16)``.

    Args:
        run_or_checkpoint: a run folder (its newest checkpoint) or a ``checkpoints/step_*``
            folder.
        ema: "auto" (the run's first EMA decay), a decay (e.g. 0.9999), or None for the raw
            training weights.
        device: "cpu", "auto", "cuda", "cuda:N", "mps" or a ``torch.device``.
        vae: for a latent run, "auto" (the VAE recorded with its latents), a diffusers
            AutoencoderKL folder or hub id, or "none" to keep latents.
    """
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    loaded = load_model(run_or_checkpoint, ema=ema, device=dev)
    class_names = loaded.class_names
    index = _latent_index(loaded.config)
    if class_names is None and index is not None and loaded.num_classes is not None:
        # runs trained before checkpoints kept the class names: the latent folder's
        names = index.get("class_names")
        if isinstance(names, list) and len(names) == loaded.num_classes:
            class_names = tuple(str(s) for s in names)
    return Model(net=loaded.net, config=loaded.config, step=loaded.step, shape=loaded.shape,
                 num_classes=loaded.num_classes, weights=loaded.weights,
                 checkpoint=loaded.checkpoint, class_names=class_names, device=dev,
                 latent=index is not None, vae=resolve_vae(vae, loaded.config))
