"""The backbone registry's names: unet-tiny is the fmnist-unet preset's U-Net, for any data."""

from __future__ import annotations

import pytest
import torch
import yaml

from meanflow.errors import ConfigError
from meanflow.models import MODELS, UNet, build_model_for_data
from meanflow.presets import preset_path


def test_unet_tiny_is_the_fmnist_preset_network():
    """Same seed, same weights: unet-tiny with no options is the U-Net the fmnist-unet preset
    builds from unet-small and its options."""
    preset = yaml.safe_load(preset_path("fmnist-unet").read_text())["model"]
    torch.manual_seed(0)
    tiny = build_model_for_data("unet-tiny", (1, 28, 28), 10, {})
    torch.manual_seed(0)
    ref = build_model_for_data(preset["name"], (1, 28, 28), 10, preset["options"])
    assert isinstance(tiny, UNet)
    a, b = tiny.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000


@pytest.mark.parametrize("shape,classes", [((3, 32, 32), 2), ((1, 16, 16), None),
                                           ((3, 64, 64), 5)])
def test_unet_tiny_takes_any_square_images(shape, classes):
    """Colour or grey, 16 to 64 pixels, with or without classes: out has the input's shape."""
    net = build_model_for_data("unet-tiny", shape, classes, {})
    z = torch.randn(2, *shape)
    y = None if classes is None else torch.tensor([0, classes - 1])
    out = net(z, torch.full((2,), 0.5), torch.full((2,), 0.25), y=y)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert "unet-tiny" in MODELS


def test_unet_tiny_refuses_points():
    with pytest.raises(ConfigError, match="square images"):
        build_model_for_data("unet-tiny", (2,), None, {})


@pytest.mark.parametrize("name", ["imf-dit-tiny/4", "imf-dit-s/4", "imf-dit-tiny/2"])
def test_imf_dit_sizes_take_fashion_mnist(name):
    """The small iMF DiTs build from the data (28×28×1, 10 classes) and return u, or (u, v)."""
    net = build_model_for_data(name, (1, 28, 28), 10, {})
    z = torch.randn(2, 1, 28, 28)
    t = torch.full((2,), 0.5)
    u, v = net(z, t, t / 2, torch.tensor([0, 10]), omega=torch.full((2,), 2.0), v_head=True)
    assert u.shape == v.shape == z.shape and net.takes_guidance and net.has_v_head


def test_unet_tiny_takes_the_imf_options():
    net = build_model_for_data("unet-tiny", (1, 28, 28), 10,
                               {"guidance_cond": True, "v_head": True})
    z, t = torch.randn(2, 1, 28, 28), torch.full((2,), 0.5)
    u, v = net(z, t, t / 2, omega=torch.full((2,), 2.0), t_min=torch.zeros(2), v_head=True)
    assert u.shape == v.shape == z.shape and net.takes_guidance and net.has_v_head
