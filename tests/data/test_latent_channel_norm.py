"""Per-channel latent normalisation (LatentShards' ``channel_norm``, the iMF recipe of
docs/imf.md): draws are (mean + std * e - mu_c) / sigma_c exactly, they decode back through
``decode_latents`` with the (scale, shift) of ``latent_transform``, the scalar path is
unchanged, and bad statistics are refused in one line. Latent folders are written by hand and
the VAE is a fake linear one, so nothing here needs diffusers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from meanflow.data import LatentShards, build_dataset
from meanflow.data.latents import (INDEX_NAME, LATENT_FORMAT, LATENT_VERSION,
                                   SD_VAE_IMF_CHANNEL_NORM, check_channel_norm,
                                   latent_transform, shard_name)
from meanflow.errors import ConfigError
from meanflow.latents.vae import decode_latents
from meanflow.runs.config import load_config

MU = [0.5, -1.0, 2.0, 0.25]
SIGMA = [4.0, 0.5, 3.0, 1.5]
NORM = {"mean": MU, "std": SIGMA}


def _latent_folder(root, n: int = 7, shard_size: int = 3, scale: float = 0.5,
                   shift: float = 0.0):
    """A 4-channel latent folder in the format of meanflow prepare-latents; returns it and the
    full (mean, std) tensors."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 4, 2, 2, generator=g) * 3 + 1
    std = torch.rand(n, 4, 2, 2, generator=g) + 0.1
    labels = torch.arange(n) % 3
    shards = (n + shard_size - 1) // shard_size
    (root / "shards").mkdir(parents=True)
    for s in range(shards):
        rows = slice(s * shard_size, min((s + 1) * shard_size, n))
        save_file({"mean": mean[rows].contiguous(), "std": std[rows].contiguous(),
                   "index": torch.arange(n)[rows].contiguous(),
                   "label": labels[rows].contiguous()},
                  str(root / shard_name(s)), metadata={"plan_id": "p", "shard": str(s)})
    index = {"format": LATENT_FORMAT, "version": LATENT_VERSION, "complete": True,
             "plan_id": "p", "num_images": n, "shard_size": shard_size, "num_shards": shards,
             "latent_shape": [4, 2, 2], "dtype": "float32", "scale": scale, "shift": shift,
             "vae": {}, "num_classes": 3, "class_names": None}
    (root / INDEX_NAME).write_text(json.dumps(index))
    return root, mean, std


class LinearVAE(torch.nn.Module):
    """A stand-in AutoencoderKL: decode is a fixed 1x1 convolution, 4 latent channels to 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 4, 1, 1, generator=g) * 0.05)
            self.conv.bias.zero_()
        self.config = {"shift_factor": None}

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.conv(z))


def _column(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(4, 1, 1)


@pytest.mark.parametrize("in_memory", [True, False])
def test_draws_are_the_posterior_draw_normalised_per_channel(tmp_path, in_memory):
    """x = (mean + std * e - mu_c) / sigma_c, bit for bit, with e from the generator; the
    folder's scale (0.5) and shift (0.3) are replaced, not applied on top."""
    root, mean, std = _latent_folder(tmp_path / "lat", shift=0.3)
    ds = LatentShards(root, in_memory=in_memory, channel_norm=NORM)
    index = torch.tensor([6, 0, 3, 3, 1])
    x, y = ds.take(index, torch.Generator().manual_seed(5))
    e = torch.randn((5, 4, 2, 2), generator=torch.Generator().manual_seed(5))
    want = (mean[index] + std[index] * e - _column(MU)) / _column(SIGMA)
    assert torch.equal(x, want) and torch.equal(y, index % 3)
    # channel 1 by hand, one element: (m + s * e - (-1.0)) / 0.5
    assert x[0, 1, 0, 0] == (mean[6, 1, 0, 0] + std[6, 1, 0, 0] * e[0, 1, 0, 0] + 1.0) / 0.5
    g = torch.Generator().manual_seed(9)
    xb, _ = ds.batch(4, torch.Generator().manual_seed(9))
    assert torch.equal(xb, ds.take(torch.randint(0, 7, (4,), generator=g), g)[0])
    det, _ = LatentShards(root, sample_posterior=False, in_memory=in_memory,
                          channel_norm=NORM).take(index, torch.Generator())
    assert torch.equal(det, (mean[index] - _column(MU)) / _column(SIGMA))
    # the attributes say the same transform: x = (z - shift) * scale per channel
    assert ds.channel_norm == (tuple(MU), tuple(SIGMA)) and ds.shift == tuple(MU)
    assert ds.scale == tuple(1 / s for s in SIGMA)
    assert "channel_norm" in repr(ds)


def test_the_option_reaches_latent_shards_through_data_options(tmp_path):
    """data.options.channel_norm (a --set override parsed as YAML) is LatentShards' keyword."""
    root, mean, _ = _latent_folder(tmp_path / "lat")
    cfg = load_config(None, [f"data.name={root}", f"data.options.channel_norm={NORM}",
                             "data.options.sample_posterior=false"])
    ds = build_dataset(cfg.data.name, **cfg.data.options)
    assert isinstance(ds, LatentShards) and ds.channel_norm == (tuple(MU), tuple(SIGMA))
    x, _ = ds.take(torch.arange(7), torch.Generator())
    assert torch.equal(x, (mean - _column(MU)) / _column(SIGMA))


def test_decode_inverts_the_normalisation(tmp_path):
    """decode_latents with latent_transform's per-channel (scale, shift) gives back the VAE's
    decoding of the raw latent: vae.decode(x * sigma_c + mu_c)."""
    root, mean, _ = _latent_folder(tmp_path / "lat")
    options = {"channel_norm": NORM, "sample_posterior": False}
    ds = LatentShards(root, **options)
    x, _ = ds.take(torch.arange(7), torch.Generator())
    scale, shift = latent_transform(ds.index, options)
    assert scale == [1 / s for s in SIGMA] and shift == MU
    vae = LinearVAE()
    got = decode_latents(vae, x, scale, batch_size=3, shift=shift)
    with torch.no_grad():
        raw = vae.decode(mean).sample.clamp(-1, 1)
        # exactly the documented arithmetic: x / fl32(1 / sigma) + mu in float32
        exact = vae.decode(x / _column(scale) + _column(shift)).sample.clamp(-1, 1)
    assert torch.equal(got, exact)
    torch.testing.assert_close(got, raw, rtol=1e-5, atol=1e-6)
    assert raw.abs().max() < 1          # the clamp did not hide a difference
    # tensors work as well as lists, and the scale may be per channel with a scalar shift
    torch.testing.assert_close(decode_latents(vae, x, torch.tensor(scale),
                                              shift=torch.tensor(shift)), got)
    z = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        want = vae.decode(z / _column(scale) + 0.0).sample.clamp(-1, 1)
    assert torch.equal(decode_latents(vae, z, scale), want)


def test_the_scalar_path_is_unchanged(tmp_path):
    """One scale and shift: z / scale + shift with Python numbers, as before; latent_transform
    gives the folder's (or the option's) scale and the folder's shift."""
    vae = LinearVAE()
    z = torch.randn(3, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(decode_latents(vae, z, 0.18215),
                           vae.decode(z / 0.18215 + 0.0).sample.clamp(-1, 1))
        assert torch.equal(decode_latents(vae, z, 0.5, shift=0.25),
                           vae.decode(z / 0.5 + 0.25).sample.clamp(-1, 1))
    root, _, _ = _latent_folder(tmp_path / "lat", scale=0.5, shift=0.25)
    index = LatentShards(root).index
    assert latent_transform(index, {}) == (0.5, 0.25)
    assert latent_transform(index, {"scale": 2.0, "in_memory": False}) == (2.0, 0.25)
    assert latent_transform(None, {}) == (None, None)          # unknown: the caller's default
    assert latent_transform(None, {"channel_norm": NORM}) == ([1 / s for s in SIGMA], MU)


def test_the_official_statistics_are_those_of_the_imf_recipe():
    """The iMF recipe's SD-VAE statistics (docs/imf.md), to five decimals."""
    mean, std = check_channel_norm(SD_VAE_IMF_CHANNEL_NORM, 4)
    assert [round(v, 5) for v in mean] == [0.86488, -0.27787, 0.21617, 0.37384]
    assert [round(v, 5) for v in std] == [4.85504, 5.31922, 3.93725, 3.987]


BAD = [
    ({"mean": MU[:3], "std": SIGMA[:3]}, r"has 3 value\(s\) and the latents have 4"),
    ({"mean": MU, "std": [1.0, 0.0, 1.0, 1.0]}, "must be positive"),
    ({"mean": MU, "std": [1.0, -2.0, 1.0, 1.0]}, "must be positive"),
    ({"mean": [0.0, float("nan"), 0.0, 0.0], "std": SIGMA}, "finite"),
    ({"mean": MU, "std": [1.0, float("inf"), 1.0, 1.0]}, "finite"),
    ({"mean": MU}, "must be a mapping"),
    ({"mean": MU, "std": SIGMA, "eps": 1e-6}, "must be a mapping"),
    ([MU, SIGMA], "must be a mapping"),
    ({"mean": "0 0 0 0", "std": SIGMA}, "list of numbers"),
    ({"mean": [0, 0, True, 0], "std": SIGMA}, "list of numbers"),
    ({"mean": [], "std": []}, "non-empty"),
]


@pytest.mark.parametrize("norm,match", BAD)
def test_bad_statistics_are_refused_in_one_line(tmp_path, norm, match):
    root, _, _ = _latent_folder(tmp_path / "lat")
    for make in (lambda: LatentShards(root, channel_norm=norm),
                 lambda: build_dataset(str(root), channel_norm=norm),
                 lambda: latent_transform(LatentShards(root).index, {"channel_norm": norm})):
        with pytest.raises(ConfigError, match=match) as info:
            make()
        assert "\n" not in str(info.value)


def test_scale_and_channel_norm_together_are_refused(tmp_path):
    root, _, _ = _latent_folder(tmp_path / "lat")
    with pytest.raises(ConfigError, match="not both"):
        LatentShards(root, scale=0.18215, channel_norm=NORM)
    with pytest.raises(ConfigError, match="not both"):
        latent_transform(None, {"scale": 0.18215, "channel_norm": NORM})


@pytest.mark.parametrize("scale,shift,match", [
    ([1.0, 1.0, 1.0], 0.0, "scale has 3 value"), ([1.0, 0.0, 1.0, 1.0], 0.0, "positive"),
    (1.0, [0.0, float("nan"), 0.0, 0.0], "finite"), (["a"] * 4, 0.0, "list of numbers"),
])
def test_decode_refuses_per_channel_values_that_do_not_fit(scale, shift, match):
    with pytest.raises(ConfigError, match=match) as info:
        decode_latents(LinearVAE(), torch.zeros(1, 4, 2, 2), scale, shift=shift)
    assert "\n" not in str(info.value)
