"""EDMAugment: identity at p = 0, exact flips, reproducibility, the label's meaning and the
per-transform probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from meanflow.data import EDMAugment
from meanflow.errors import ConfigError

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 64, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images: no mirror symmetry, so a flip or a warp always changes them."""
    return torch.rand(b, c, h, w, generator=gen(seed)) * 2 - 1


def centred_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred pixel coordinates (x right, y down) of every pixel centre, each (h, w)."""
    y = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2
    x = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
    return torch.meshgrid(x, y, indexing="xy")


def smooth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A smooth, asymmetric test pattern (no symmetry under flips or rotations)."""
    return torch.sin(0.23 * x + 0.11 * y) + 0.5 * torch.cos(0.17 * y - 0.07 * x + 0.4)


def test_p_zero_is_the_identity_with_zero_labels():
    aug = EDMAugment(p=0.0, xflip=0)
    x = images()
    out, labels = aug(x, gen(1))
    assert torch.equal(out, x) and labels.shape == (64, 9) and not labels.any()
    assert aug.label_dim == 9 and EDMAugment.label_dim == 9


def test_xflip_only_gives_exact_mirrors_for_about_half():
    aug = EDMAugment(p=1.0, **{**OFF, "xflip": 1.0})
    x = images(b=4000, h=4, w=5)
    out, labels = aug(x, gen(2))
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])
    assert not labels[:, 1:].any() and set(labels[:, 0].tolist()) <= {0.0, 1.0}
    assert abs(flipped.double().mean().item() - 0.5) < 0.03   # 4000 draws: sd 0.008


def test_edm_defaults_always_draw_the_xflip():
    """With EDM's xflip=1e8 the left-right flip is always decided (half the images mirrored)."""
    aug = EDMAugment(p=0.12, **{**OFF, "xflip": 1e8})
    x = images(b=4000, h=4, w=4)
    out, labels = aug(x, gen(3))
    flipped = labels[:, 0] == 1
    assert abs(flipped.double().mean().item() - 0.5) < 0.03
    assert torch.equal(out[flipped], x[flipped].flip(3))


def test_same_seed_same_output_and_other_seed_differs():
    aug = EDMAugment(p=0.5)
    x = images()
    a, la = aug(x, gen(7))
    b, lb = aug(x, gen(7))
    c, lc = aug(x, gen(8))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_labels_are_zero_exactly_when_the_image_is_unchanged():
    aug = EDMAugment(p=0.3)
    x = images(b=512)
    out, labels = aug(x, gen(4))
    unchanged = (out == x).flatten(1).all(dim=1)
    zero = (labels == 0).all(dim=1)
    assert torch.equal(unchanged, zero)
    assert 0 < int(zero.sum()) < 512


def decode(label: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) of the documented layout: content at p moves to A·p + b (centred pixels)."""
    label = label.double()
    s = 2.0 ** label[2]
    c, sn = label[3] + 1, label[4]
    rot = torch.stack([torch.stack([c, -sn]), torch.stack([sn, c])])
    log2_stretch = torch.stack([torch.stack([label[5], label[6]]),
                                torch.stack([label[6], -label[5]])])
    a = s * rot @ torch.linalg.matrix_exp(math.log(2) * log2_stretch)
    return a, torch.stack([label[7] * w, label[8] * h])


def expected_and_mask(label: torch.Tensor, h: int, w: int, margin: float = 1.0):
    """The pattern as the label says it was transformed, and where that is away from borders."""
    a, b = decode(label, h, w)
    qx, qy = centred_grid(h, w)
    q = torch.stack([qx - b[0], qy - b[1]])                    # (2, h, w)
    p = torch.einsum("ij,jhw->ihw", torch.linalg.inv(a), q)
    px = -p[0] if label[0] == 1 else p[0]                      # flips come first
    py = -p[1] if label[1] == 1 else p[1]
    inside = (px.abs() < w / 2 - 0.5 - margin) & (py.abs() < h / 2 - 0.5 - margin)
    return smooth(px, py), inside


def test_a_rotation_matches_the_labelled_angle():
    """Rotation only: the output is the smooth pattern rotated by the θ of the label."""
    h = w = 32
    aug = EDMAugment(p=1.0, **{**OFF, "rotate_frac": 1.0})
    qx, qy = centred_grid(h, w)
    x = smooth(qx, qy).float().expand(16, 1, h, w).contiguous()
    out, labels = aug(x, gen(5))
    assert not labels[:, [0, 1, 2, 5, 6, 7, 8]].any()
    for i in range(16):
        theta = math.atan2(labels[i, 4].item(), labels[i, 3].item() + 1)
        # manual rotation: out(q) = in(R(θ)ᵀ q), R clockwise on screen (y down)
        px = math.cos(theta) * qx + math.sin(theta) * qy
        py = -math.sin(theta) * qx + math.cos(theta) * qy
        inside = (px.abs() < h / 2 - 1.5) & (py.abs() < h / 2 - 1.5)
        err = (out[i, 0].double() - smooth(px, py))[inside]
        assert inside.sum() > 300 and err.abs().max() < 0.02, (theta, err.abs().max())
        if abs(math.sin(theta)) > 0.3:   # the opposite sense is clearly wrong
            bad = smooth(math.cos(theta) * qx - math.sin(theta) * qy,
                         math.sin(theta) * qx + math.cos(theta) * qy)
            assert (out[i, 0].double() - bad)[inside].abs().max() > 0.2


def test_every_transform_follows_its_label():
    """All transforms at once: away from the borders the output is the pattern moved by the
    (A, b) decoded from the label, flips first; a non-square image checks the axes."""
    h, w = 24, 32
    aug = EDMAugment(p=1.0, xflip=1.0, yflip=1.0)
    qx, qy = centred_grid(h, w)
    x = smooth(qx, qy).float().expand(32, 2, h, w).contiguous()
    out, labels = aug(x, gen(6))
    assert labels[:, 2:].ne(0).all() and labels[:, 0].any() and labels[:, 1].any()
    checked = 0
    for i in range(32):
        want, inside = expected_and_mask(labels[i], h, w)
        if inside.sum() < 20:
            continue
        err = (out[i, 1].double() - want)[inside]
        assert err.abs().max() < 0.05, (i, labels[i], err.abs().max())
        checked += 1
    assert checked > 24


def test_translation_moves_content_by_the_labelled_fraction():
    """Translation only: a centred blob's centroid lands at (t_x·W, t_y·H), x right, y down."""
    h, w = 32, 40
    aug = EDMAugment(p=1.0, **{**OFF, "translate_frac": 1.0})
    qx, qy = centred_grid(h, w)
    blob = torch.exp(-(qx ** 2 + qy ** 2) / (2 * 2.0 ** 2))
    x = blob.float().expand(64, 1, h, w).contiguous()
    out, labels = aug(x, gen(9))
    assert not labels[:, :7].any() and labels[:, 7:].ne(0).all()
    checked = 0
    for i in range(64):
        bx, by = labels[i, 7].item() * w, labels[i, 8].item() * h
        if abs(bx) > w / 2 - 8 or abs(by) > h / 2 - 8:
            continue
        img = out[i, 0].double()
        cx, cy = (img * qx).sum() / img.sum(), (img * qy).sum() / img.sum()
        assert abs(cx - bx) < 0.05 and abs(cy - by) < 0.05, (bx, by, cx, cy)
        checked += 1
    assert checked > 30


@pytest.mark.parametrize("name,column", [("scale", 2), ("rotate_frac", 3), ("aniso", 5),
                                         ("translate_frac", 7)])
def test_each_transform_is_applied_with_probability_p_times_weight(name, column):
    aug = EDMAugment(p=0.3, **{**OFF, name: 0.5})
    x = images(b=8000, c=1, h=4, w=4)
    _, labels = aug(x, gen(10))
    rate = labels[:, column].ne(0).double().mean().item()
    assert abs(rate - 0.15) < 0.015, rate                       # sd 0.004
    others = [k for k in range(9) if k not in (column, column + (column in (3, 5, 7)))]
    assert not labels[:, others].any()


def test_flip_probability_is_half_of_p_times_weight():
    aug = EDMAugment(p=0.4, **{**OFF, "yflip": 1.0})
    _, labels = aug(images(b=8000, c=1, h=4, w=4), gen(11))
    assert abs(labels[:, 1].mean().item() - 0.2) < 0.015


def test_generator_on_another_device_and_dtype_follow_x():
    aug = EDMAugment(p=0.5)
    x = images(b=8).double()
    out, labels = aug(x, gen(12))
    assert out.dtype == labels.dtype == torch.float64
    assert out.device == labels.device == x.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_images_matches_cpu():
    aug = EDMAugment(p=0.5)
    x = images(b=16)
    ref, ref_labels = aug(x, gen(13))
    out, labels = aug(x.cuda(), gen(13))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(labels.cpu(), ref_labels)


def test_bad_arguments():
    with pytest.raises(ConfigError, match=r"p=-0.1 must lie in \[0, 1\]"):
        EDMAugment(p=-0.1)
    with pytest.raises(ConfigError, match=r"p=1.5 must lie in \[0, 1\]"):
        EDMAugment(p=1.5)
    with pytest.raises(ConfigError, match="scale_std=-1 must be >= 0"):
        EDMAugment(scale_std=-1)
    with pytest.raises(ConfigError, match="finite number"):
        EDMAugment(aniso=float("nan"))
    with pytest.raises(ConfigError, match="finite number"):
        EDMAugment(p=True)
    aug = EDMAugment()
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\) floating tensor"):
        aug(torch.zeros(3, 8, 8), gen(0))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\) floating tensor"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gen(0))
    with pytest.raises(ConfigError, match="torch.Generator"):
        aug(torch.zeros(2, 3, 8, 8), 0)
    assert "p=0.12" in repr(aug)
    assert aug.probabilities()["xflip"] == 1.0
    assert aug.probabilities()["scale"] == pytest.approx(0.12)
