"""EDMAugment: label layout and width, EDM's order of random draws, the draws' distributions,
exact flips, the geometry each label describes (moments of Gaussian blobs), the near-identity
resampling of untransformed images, reproducibility, dtypes and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import meanflow.data.augment as augment_module
from meanflow.data import EDMAugment
from meanflow.errors import ConfigError

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
ALL = dict(xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
#: Where zoom, rotation and stretch pivot (both axes, pixels from the centre, about -0.049):
#: EDM's 2x grid convention puts the sym6 taps' centre at 5, their centroid is at 5.098.
_TAPS = augment_module._SYM6
PIVOT = (5 - sum(k * t for k, t in enumerate(_TAPS)) / sum(_TAPS)) / 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 64, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1]: no symmetry, so any transform visibly changes them."""
    return torch.rand(b, c, h, w, generator=gen(seed)) * 2 - 1


def centred_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred pixel coordinates (x right, y down) of every pixel centre, each (h, w)."""
    y = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    return torch.meshgrid(x, y, indexing="xy")


def blob(h: int, w: int, cov, mean=(0.0, 0.0)) -> torch.Tensor:
    """(h, w) Gaussian with the given (2, 2) covariance and mean, in centred pixels."""
    qx, qy = centred_grid(h, w)
    d = torch.stack([qx - mean[0], qy - mean[1]], dim=-1)           # (h, w, 2)
    prec = torch.linalg.inv(torch.as_tensor(cov, dtype=torch.float64))
    return torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", d, prec, d))


def moments(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (2,) and covariance (2, 2) of an (h, w) non-negative image, centred pixels."""
    weight = (img.double() / img.double().sum()).flatten()
    q = torch.stack(centred_grid(*img.shape), dim=-1).flatten(0, 1)  # (h·w, 2)
    mean = weight @ q
    d = q - mean
    return mean, (d * weight[:, None]).T @ d


def rotation(theta: float) -> torch.Tensor:
    """R of the module docstring: counter-clockwise on screen for theta > 0 (y points down)."""
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, s], [-s, c]], dtype=torch.float64)


# --- label layout and EDM's random draws -------------------------------------------------------

@pytest.mark.parametrize("options,width", [
    ({}, 6), (dict(yflip=1, rotate_frac=1), 9), (OFF, 0), ({**OFF, "scale": 1}, 1),
    ({**OFF, "rotate_frac": 2}, 2), ({**OFF, "xflip": 1, "translate_frac": 1}, 3),
    ({"aniso": 0}, 4)])
def test_label_width_counts_the_enabled_transforms(options, width):
    aug = EDMAugment(p=0.5, **options)
    _, labels = aug(images(b=5), gen(0))
    assert aug.label_dim == width and labels.shape == (5, width)
    assert isinstance(vars(EDMAugment)["label_dim"], property)
    assert not hasattr(augment_module, "AUGMENT_LABEL_DIM")


def edm_draws(g: torch.Generator, B: int, H: int, W: int, p: float, aug: EDMAugment):
    """The labels as EDM computes them from its draws, spelled out: one step per enabled
    transform, each with its own random numbers, in float32."""
    f32 = dict(generator=g, dtype=torch.float32)
    cols = []
    for w in (aug.xflip, aug.yflip):
        if w > 0:
            bit = torch.randint(2, (B,), generator=g)
            cols.append(torch.where(torch.rand(B, **f32) < w * p, bit, 0).float())
    if aug.scale > 0:
        z = torch.randn(B, **f32)
        cols.append(torch.where(torch.rand(B, **f32) < aug.scale * p, z, 0.0))
    if aug.rotate_frac > 0:
        theta = (torch.rand(B, **f32) * 2 - 1) * (math.pi * aug.rotate_frac_max)
        theta = torch.where(torch.rand(B, **f32) < aug.rotate_frac * p, theta, 0.0)
        cols += [theta.cos() - 1, theta.sin()]
    if aug.aniso > 0:
        z = torch.randn(B, **f32)
        r = (torch.rand(B, **f32) * 2 - 1) * math.pi
        z = torch.where(torch.rand(B, **f32) < aug.aniso * p, z, 0.0)
        r = torch.where(torch.rand(B, **f32) < aug.aniso_rotate_prob, r, 0.0)
        cols += [z * r.cos(), z * r.sin()]
    if aug.translate_frac > 0:
        z = torch.randn(2, B, **f32)
        z = torch.where(torch.rand(1, B, **f32) < aug.translate_frac * p, z, 0.0)
        cols += [z[0], z[1]]
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("p,options", [(0.12, {}), (0.6, ALL), (1.0, dict(yflip=1)),
                                       (0.3, dict(xflip=0, rotate_frac=0.5, scale=0))])
def test_draws_follow_edm_order_and_labels_are_the_raw_draws(p, options):
    """Same numbers, same order, same amount as EDM's pipeline: identical labels and the
    generator left in the same state (batch 37 also exercises torch's vectorised randn)."""
    aug = EDMAugment(p=p, **options)
    _, labels = aug(images(b=37, h=6, w=10), g := gen(5))
    want = edm_draws(expected := gen(5), 37, 6, 10, p, aug)
    assert torch.equal(labels, want)
    assert torch.equal(g.get_state(), expected.get_state())


def test_all_weights_off_returns_the_input_and_draws_nothing():
    x = images()
    g = gen(1)
    state = g.get_state()
    out, labels = EDMAugment(p=1.0, **OFF)(x, g)
    assert torch.equal(out, x) and labels.shape == (64, 0)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("name,dim", [("xflip", 3), ("yflip", 2)])
def test_a_pure_flip_mirrors_exactly_half_the_images(name, dim):
    aug = EDMAugment(p=1.0, **{**OFF, name: 1.0})
    x = images(b=2000, h=4, w=5)
    out, labels = aug(x, gen(2))
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], x[flipped].flip(dim))
    assert torch.equal(out[~flipped], x[~flipped])
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert stats.binomtest(int(flipped.sum()), 2000, 0.5).pvalue > 1e-3


def test_edm_xflip_weight_mirrors_half_the_images_whatever_p():
    aug = EDMAugment(p=0.01, **{**OFF, "xflip": 1e8})
    _, labels = aug(images(b=2000, c=1, h=4, w=4), gen(3))
    assert stats.binomtest(int(labels[:, 0].sum()), 2000, 0.5).pvalue > 1e-3


@pytest.mark.parametrize("name,column", [("xflip", 0), ("yflip", 0), ("scale", 0),
                                         ("rotate_frac", 1), ("aniso", 0),
                                         ("translate_frac", 0)])
def test_each_transform_is_applied_with_probability_p_times_weight(name, column):
    aug = EDMAugment(p=0.3, **{**OFF, name: 0.5})
    _, labels = aug(images(b=4000, c=1, h=4, w=4), gen(10))
    hits = int(labels[:, column].ne(0).sum())
    rate = 0.15 / 2 if "flip" in name else 0.15     # a flip mirrors half of its images
    assert stats.binomtest(hits, 4000, rate).pvalue > 1e-3, hits
    assert aug.probabilities()[name] == pytest.approx(0.15)


def test_applied_transforms_draw_edm_distributions():
    """p = 1: scale and translation labels are N(0, 1) draws, the angle is uniform on
    ±π·rotate_frac_max, and the stretch label is z·(cos r, sin r) with z ~ N(0, 1) and, for a
    fraction aniso_rotate_prob of the images, r uniform on the circle (else r = 0)."""
    aug = EDMAugment(p=1.0, **ALL, rotate_frac_max=0.5)
    _, lab = aug(images(b=3000, c=1, h=4, w=4), gen(11))
    lab = lab.double().numpy()
    for column in (2, 7, 8):                                 # scale, translate x, translate y
        assert stats.kstest(lab[:, column], "norm").pvalue > 1e-3, column
    theta = torch.atan2(torch.tensor(lab[:, 4]), torch.tensor(lab[:, 3]) + 1).numpy()
    assert stats.kstest(theta, stats.uniform(-math.pi / 2, math.pi).cdf).pvalue > 1e-3
    turned = lab[:, 6] != 0
    assert stats.binomtest(int(turned.sum()), 3000, 0.5).pvalue > 1e-3
    assert stats.kstest(lab[~turned, 5], "norm").pvalue > 1e-3       # r = 0: the label is z
    size = (lab[turned, 5] ** 2 + lab[turned, 6] ** 2) ** 0.5
    assert stats.kstest(size, stats.halfnorm.cdf).pvalue > 1e-3
    angle = torch.atan2(torch.tensor(lab[turned, 6]), torch.tensor(lab[turned, 5])).numpy()
    assert stats.kstest(angle, stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 1e-3


# --- resampling ----------------------------------------------------------------------------------

def test_untransformed_images_are_resampled_but_unchanged_up_to_rounding():
    """EDM warps the whole batch once any geometric weight is on; for a zero label that is the
    identity up to float32 rounding, while a transformed image clearly changes."""
    x = images(b=256, h=16, w=16)
    out, labels = EDMAugment()(x, gen(4))
    mirrored = torch.where(labels[:, 0, None, None, None] == 1, x.flip(3), x)
    err = (out - mirrored).flatten(1).abs().amax(dim=1)
    plain = (labels[:, 1:] == 0).all(dim=1)
    assert 50 < int(plain.sum()) < 256
    assert err[plain].max() < 1e-4 and err[~plain].min() > 1e-2
    assert not torch.equal(out[plain], mirrored[plain])       # resampled, not passed through
    out0, labels0 = EDMAugment(p=0.0)(x, gen(4))               # p = 0: still resampled
    assert not labels0.any() and (out0 - x).abs().max() < 1e-4


def test_a_constant_image_stays_constant():
    """Unit gain of the filters, and padding wide enough that no sample reads the zeros
    outside, for transforms of every kind at once (moderate spreads: the padding is capped at
    the image size - 1, beyond which EDM's resampling, and ours, reads zeros)."""
    x = torch.full((64, 2, 20, 28), 0.7)
    aug = EDMAugment(p=1.0, **ALL, aniso_rotate_prob=1.0, scale_std=0.1, aniso_std=0.1,
                     translate_frac_std=0.05)
    out, labels = aug(x, gen(5))
    assert labels[:, 2:].ne(0).all()
    assert (out - 0.7).abs().max() < 1e-5


def test_translation_moves_the_centroid_by_the_labelled_shift():
    """Translation only, non-square image: a blob's centroid lands at translate_frac_std ·
    (z_x·W, z_y·H) pixels, x right and y down, to a small fraction of a pixel."""
    h, w = 40, 56
    aug = EDMAugment(p=1.0, **{**OFF, "translate_frac": 1.0}, translate_frac_std=0.1)
    x = blob(h, w, [[6.0, 0.0], [0.0, 6.0]]).float().expand(48, 1, h, w).contiguous()
    out, labels = aug(x, gen(6))
    checked = 0
    for i in range(48):
        b = labels[i].double() * torch.tensor([0.1 * w, 0.1 * h], dtype=torch.float64)
        if abs(b[0]) > w / 2 - 12 or abs(b[1]) > h / 2 - 12:
            continue                                           # tails would leave the image
        mean, cov = moments(out[i, 0])
        torch.testing.assert_close(mean, b, atol=1e-3, rtol=0)
        torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64) * 6, atol=0.1, rtol=0)
        checked += 1
    assert checked > 30


def test_scale_changes_the_second_moment_by_two_to_the_two_std_label():
    aug = EDMAugment(p=1.0, **{**OFF, "scale": 1.0})
    x = blob(48, 48, [[9.0, 0.0], [0.0, 9.0]]).float().expand(32, 1, 48, 48).contiguous()
    out, labels = aug(x, gen(7))
    for i in range(32):
        s2 = 2.0 ** (2 * 0.2 * labels[i, 0].item())
        mean, cov = moments(out[i, 0])
        # (bilinear interpolation on the 2x grid adds ~0.03 px² of blur)
        torch.testing.assert_close(cov, 9 * s2 * torch.eye(2, dtype=torch.float64),
                                   atol=0.06, rtol=0.005)
        torch.testing.assert_close(mean, torch.full((2,), PIVOT * (1 - s2 ** 0.5),
                                                    dtype=torch.float64), atol=2e-3, rtol=0)


def test_rotation_turns_counter_clockwise_on_screen_by_the_labelled_angle():
    """Rotation only: an elongated blob's covariance turns by the θ of the label. (The image is
    large enough that the frame's corners, which read reflected content, stay dark.)"""
    cov0 = torch.tensor([[9.0, 0.0], [0.0, 2.25]], dtype=torch.float64)   # wide blob
    aug = EDMAugment(p=1.0, **{**OFF, "rotate_frac": 1.0})
    x = blob(64, 64, cov0).float().expand(32, 1, 64, 64).contiguous()
    out, labels = aug(x, gen(8))
    for i in range(32):
        theta = math.atan2(labels[i, 1].item(), labels[i, 0].item() + 1)
        mean, cov = moments(out[i, 0])
        rot = rotation(theta)
        torch.testing.assert_close(cov, rot @ cov0 @ rot.T, atol=0.06, rtol=0.005)
        pivot = torch.full((2,), PIVOT, dtype=torch.float64)
        torch.testing.assert_close(mean, pivot - rot @ pivot, atol=2e-3, rtol=0)
        if abs(math.sin(2 * theta)) > 0.5:                  # the other sense is clearly wrong
            assert (cov - rot.T @ cov0 @ rot).abs().max() > 1


def test_aniso_stretches_along_the_labelled_axis():
    """A round blob becomes an ellipse whose axes are the label's direction (cos r, -sin r) on
    screen and its normal, with variances σ²·2^(±2·aniso_std·|label|). With r = 0 the label is
    z itself and the x axis gets 2^(aniso_std·z). (For r ≠ 0 the label does not say which of
    the two axes is the stretched one: EDM's z·(cos r, sin r) is the same for (-z, r + π).)"""
    x = blob(48, 48, [[9.0, 0.0], [0.0, 9.0]]).float().expand(32, 1, 48, 48).contiguous()
    out, labels = EDMAugment(p=1.0, **{**OFF, "aniso": 1.0}, aniso_rotate_prob=0.0)(x, gen(9))
    assert not labels[:, 1].any()
    for i in range(32):
        a2 = 2.0 ** (2 * 0.2 * labels[i, 0].item())
        want = 9 * torch.diag(torch.tensor([a2, 1 / a2], dtype=torch.float64))
        torch.testing.assert_close(moments(out[i, 0])[1], want, atol=0.06, rtol=0.005)
    out, labels = EDMAugment(p=1.0, **{**OFF, "aniso": 1.0}, aniso_rotate_prob=1.0)(x, gen(9))
    for i in range(32):
        size = math.hypot(labels[i, 0].item(), labels[i, 1].item())
        r = math.atan2(labels[i, 1].item(), labels[i, 0].item())
        axes = torch.tensor([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]],
                            dtype=torch.float64)                 # columns: axis, its normal
        in_axes = axes.T @ moments(out[i, 0])[1] @ axes
        a2 = 2.0 ** (2 * 0.2 * size)
        assert abs(in_axes[0, 1]) < 0.05
        pair = sorted([in_axes[0, 0].item(), in_axes[1, 1].item()])
        assert pair == pytest.approx([9 / a2, 9 * a2], rel=0.005, abs=0.06)


def test_every_transform_follows_its_label():
    """All transforms at once on an off-centre tilted blob: flips first (exact mirrors about the
    centre), then content at p moves to A·(p - P) + P + b with A = K·R·s as decoded from the
    label (r = 0, so the stretch is along x) and P the pivot; centroid and covariance follow.
    Images zoomed out so far that reflected copies of the blob enter the frame are skipped."""
    h, w = 56, 64
    mean0 = torch.tensor([3.0, -2.0], dtype=torch.float64)
    cov0 = torch.tensor([[7.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    aug = EDMAugment(p=1.0, **ALL, aniso_rotate_prob=0.0, translate_frac_std=0.05)
    x = blob(h, w, cov0, mean0).float().expand(64, 1, h, w).contiguous()
    out, labels = aug(x, gen(12))
    assert labels[:, 0].any() and labels[:, 1].any() and labels[:, [2, 3, 4, 5, 7, 8]].all()
    assert not labels[:, 6].any()
    pivot = torch.full((2,), PIVOT, dtype=torch.float64)
    checked = 0
    for i in range(64):
        frame = torch.cat([out[i, 0, [0, -1]].flatten(), out[i, 0, :, [0, -1]].flatten()])
        if frame.abs().max() > 1e-4:
            continue
        lab = labels[i].double()
        flip = torch.diag(1 - 2 * lab[:2])
        a = 2.0 ** (0.2 * lab[5])
        stretch = torch.diag(torch.stack([a, 1 / a]))
        A = stretch @ rotation(math.atan2(lab[4], lab[3] + 1)) * 2.0 ** (0.2 * lab[2])
        b = lab[7:] * torch.tensor([0.05 * w, 0.05 * h], dtype=torch.float64)
        mean, cov = moments(out[i, 0])
        torch.testing.assert_close(mean, A @ (flip @ mean0 - pivot) + pivot + b, atol=0.01,
                                   rtol=0)
        torch.testing.assert_close(cov, A @ flip @ cov0 @ flip @ A.T, atol=0.06, rtol=0.01)
        checked += 1
    assert checked > 50


# --- reproducibility, channels, dtypes, devices -------------------------------------------------

def test_same_generator_state_same_output_and_other_seed_differs():
    aug = EDMAugment(p=0.5, **ALL)
    x = images()
    a, la = aug(x, gen(7))
    b, lb = aug(x, gen(7))
    c, lc = aug(x, gen(8))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc) and not torch.equal(a, c)


def test_grey_and_rgb_images_get_the_same_transform_per_channel():
    aug = EDMAugment(p=0.7, **ALL)
    grey = images(b=16, c=1, h=12, w=12)
    out1, lab1 = aug(grey, gen(13))
    out3, lab3 = aug(grey.expand(16, 3, 12, 12).contiguous(), gen(13))
    assert torch.equal(lab1, lab3) and out3.shape == (16, 3, 12, 12)
    for ch in range(3):
        torch.testing.assert_close(out3[:, ch], out1[:, 0], atol=1e-6, rtol=0)


def test_dtype_follows_x_and_the_draws_do_not_depend_on_it():
    aug = EDMAugment(p=0.5, **ALL)
    x = images(b=8)
    ref, ref_labels = aug(x, gen(12))
    for dtype, atol in ((torch.float64, 1e-4), (torch.bfloat16, 2e-2)):
        out, labels = aug(x.to(dtype), gen(12))
        assert out.dtype == labels.dtype == dtype and out.device == labels.device == x.device
        torch.testing.assert_close(labels.float(), ref_labels, atol=atol, rtol=0)
        torch.testing.assert_close(out.float(), ref, atol=atol * 2, rtol=0)


def test_empty_batch():
    out, labels = EDMAugment(p=0.5, **ALL)(torch.zeros(0, 3, 8, 8), gen(0))
    assert out.shape == (0, 3, 8, 8) and labels.shape == (0, 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_images_matches_cpu():
    aug = EDMAugment(p=0.5, **ALL)
    x = images(b=16)
    ref, ref_labels = aug(x, gen(13))
    out, labels = aug(x.cuda(), gen(13))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(labels.cpu(), ref_labels)


# --- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(p=-0.1), r"p=-0.1 must lie in \[0, 1\]"), (dict(p=1.5), r"p=1.5 must lie in \[0, 1\]"),
    (dict(scale_std=-1), "scale_std=-1 must be >= 0"), (dict(yflip=-2), "yflip=-2 must be >= 0"),
    (dict(translate_frac_std=-0.1), "translate_frac_std=-0.1 must be >= 0"),
    (dict(aniso_rotate_prob=1.5), r"aniso_rotate_prob=1.5 must lie in \[0, 1\]"),
    (dict(aniso=float("nan")), "finite number"), (dict(p=True), "finite number"),
    (dict(rotate_frac_max="1"), "finite number")])
def test_bad_arguments_raise_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        EDMAugment(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_keywords_are_type_errors():
    with pytest.raises(TypeError):
        EDMAugment(translate_std=0.1)                  # the old name: now translate_frac_std
    with pytest.raises(TypeError):
        EDMAugment(brightness=1)                        # EDM's colour transforms: not here


def test_bad_call_arguments_and_description():
    aug = EDMAugment()
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\) floating tensor"):
        aug(torch.zeros(3, 8, 8), gen(0))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\) floating tensor"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gen(0))
    with pytest.raises(ConfigError, match="torch.Generator"):
        aug(torch.zeros(2, 3, 8, 8), 0)
    assert "p=0.12" in repr(aug) and "translate_frac_std=0.125" in repr(aug)
    probs = aug.probabilities()
    assert probs["xflip"] == 1.0 and probs["yflip"] == probs["rotate_frac"] == 0.0
    assert probs["scale"] == probs["aniso"] == probs["translate_frac"] == pytest.approx(0.12)
