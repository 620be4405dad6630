"""`meanflow fid ref` and `meanflow fid calc` with the in-repo Fashion-MNIST extractor."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from meanflow.metrics import FeatureStats

from cli_helpers import cli  # noqa: E402


def fid_value(out: str) -> float:
    return float(re.search(r"features, N=\d+\): (\S+) \[[a-z-]+ protocol\]", out).group(1))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.savez(root / "imgs.npz", x=x, y=np.arange(40) % 4)
    return root, x


def test_ref_then_calc_of_the_same_images_is_zero(images, capsys):
    root, x = images
    assert cli("fid", "ref", root / "imgs.npz", "-o", root / "ref.npz") == 0
    stats = FeatureStats.load(root / "ref.npz")
    assert stats.n == 40 and stats.meta["extractor"] == "fmnist"
    np.savez(root / "same.npz", samples=(x[:, None].astype(np.float32) / 127.5 - 1.0))
    capsys.readouterr()
    assert cli("fid", "calc", root / "same.npz", "--ref", root / "ref.npz", "--n", 40) == 0
    out = capsys.readouterr().out
    assert abs(fid_value(out)) < 1e-6 and "KID" in out
    # a different set of images is measurably farther
    other = np.random.default_rng(1).integers(0, 128, (40, 1, 28, 28)).astype(np.float32)
    np.savez(root / "other.npz", samples=other / 127.5 - 1.0)
    assert cli("fid", "calc", root / "other.npz", "--ref", root / "ref.npz") == 0
    assert fid_value(capsys.readouterr().out) > 1e-3


def test_calc_from_a_run_records_what_it_measured(images, tmp_path):
    root, _ = images
    if not (root / "ref.npz").exists():
        assert cli("fid", "ref", root / "imgs.npz", "-o", root / "ref.npz") == 0
    run = tmp_path / "run"
    assert cli("train", "--out", run, "--steps", 2, "--data", root / "imgs.npz",
               "--model", "unet-small", "--batch-size", 8,
               "--set", "model.options={channels: 8, channel_mult: [1, 2], blocks_per_res: 1, "
               "attn_resolutions: [], emb_mult: 2}",
               "--set", "train.progress=false", "--set", "train.sample_count=0") == 0
    out = tmp_path / "fid.json"
    assert cli("fid", "calc", run, "--ref", root / "ref.npz", "--n", 8, "--steps", 2,
               "--seed", 5, "--out", out) == 0
    record = json.loads(out.read_text())
    assert record["n"] == 8 and record["steps"] == 2 and record["seed"] == 5
    assert record["extractor"]["extractor"] == "fmnist" and record["fid"] >= 0
    assert record["quantized"] and {"kid", "kid_se"} <= set(record)
    assert record["checkpoint"].endswith("step_0000002") and "guidance" in record
    # under torchrun (2 CPU processes, gloo): samples shared out by index, the same FID; and
    # a samples file is featurised in shares too
    import os
    import subprocess
    import sys
    from pathlib import Path
    torchrun = Path(sys.executable).with_name("torchrun")
    for source, name in ((run, "fid2.json"), (root / "same.npz", "fid3.json")):
        if not source.exists():
            continue
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "meanflow.cli",
               "fid", "calc", str(source), "--ref", str(root / "ref.npz"), "--num-samples",
               "8", "--steps", "2", "--seed", "5", "--device", "cpu",
               "--out", str(tmp_path / name)]
        res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("FID (") == 1                      # rank 0 reports alone
        shared = json.loads((tmp_path / name).read_text())
        assert shared["processes"] == 2 and shared["n"] == 8
        if source == run:
            alone = record
        else:
            assert cli("fid", "calc", source, "--ref", root / "ref.npz", "--n", 8,
                       "--out", tmp_path / "alone.json") == 0
            alone = json.loads((tmp_path / "alone.json").read_text())
        assert shared["fid"] == pytest.approx(alone["fid"], rel=1e-6)
        assert shared["kid"] == pytest.approx(alone["kid"], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("case", ["shape", "exists", "missing_ref", "extractor", "no_command"])
def test_bad_input_is_one_line(images, tmp_path, capsys, case):
    root, _ = images
    if case == "shape":
        np.savez(tmp_path / "small.npz", x=np.zeros((4, 8, 8), np.uint8))
        args, needle = ("fid", "ref", tmp_path / "small.npz", "-o", tmp_path / "r.npz"), "1×28×28"
    elif case == "exists":
        (tmp_path / "r.npz").write_bytes(b"keep")
        args, needle = ("fid", "ref", root / "imgs.npz", "-o", tmp_path / "r.npz"), "exists"
    elif case == "missing_ref":
        np.savez(tmp_path / "s.npz", samples=np.zeros((4, 1, 28, 28), np.float32))
        args, needle = ("fid", "calc", tmp_path / "s.npz", "--ref", tmp_path / "nope.npz"), "nope"
    elif case == "extractor":
        args, needle = ("fid", "ref", root / "imgs.npz", "-o", tmp_path / "r2.npz",
                        "--extractor", tmp_path / "nope.pt"), "does not exist"
    else:
        args, needle = ("fid",), "ref or calc"
    code = cli(*args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and needle in err
    if case == "exists":
        assert (tmp_path / "r.npz").read_bytes() == b"keep"


def test_inception_ref_and_calc_end_to_end(tmp_path, capsys):
    """`fid ref --extractor inception` then `fid calc` of the same 16 images: FID ~ 0, the
    record names the Inception file's SHA-1."""
    from meanflow.metrics import extractors
    try:
        extractors.inception_file()
    except Exception:
        pytest.skip("Inception weights not installed (make inception)")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x=x)
    assert cli("fid", "ref", tmp_path / "imgs.npz", "-o", tmp_path / "ref.npz",
               "--extractor", "inception", "--device", "cpu") == 0
    stats = FeatureStats.load(tmp_path / "ref.npz")
    assert stats.dim == 2048 and stats.features.shape == (16, 2048)
    assert stats.meta["sha1"] == extractors.INCEPTION_SHA1
    np.savez(tmp_path / "same.npz", samples=x[:, None].astype(np.float32) / 127.5 - 1.0)
    capsys.readouterr()
    assert cli("fid", "calc", tmp_path / "same.npz", "--ref", tmp_path / "ref.npz",
               "--device", "cpu", "--out", tmp_path / "r.json") == 0
    assert abs(fid_value(capsys.readouterr().out)) < 1e-3
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["extractor"]["extractor"] == "inception" and record["n"] == 16
    # the fmnist extractor is refused against Inception statistics
    assert cli("fid", "calc", tmp_path / "same.npz", "--ref", tmp_path / "ref.npz",
               "--extractor", "fmnist") == 2
    assert "compare like with like" in capsys.readouterr().err


def test_kid_subsets_differ_at_small_n():
    """With N <= 1000 the KID subsets take half of each set, so its standard error is a real
    spread (subsets of the whole set would all be identical: SE exactly 0)."""
    from meanflow.metrics.fid import score_features
    rng = np.random.default_rng(0)
    ref = FeatureStats.from_features(rng.normal(size=(400, 8)), keep=400)
    out = score_features(rng.normal(size=(400, 8)) + 0.5, ref)
    assert out["kid_subset"] == 200 and out["kid_se"] > 0
    assert out["kid"] > 3 * out["kid_se"]          # a shifted set is told apart


class _RGBMeans(torch.nn.Module):
    """A TorchScript extractor for RGB images: per-channel means and their squares (6-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return torch.cat([m, m * m], dim=1)


def test_ref_of_cifar10_takes_its_folder(tmp_path, capsys):
    """`fid ref cifar10 --root FOLDER` reads the cifar-10-batches-py pickles (the reference of
    the official CIFAR-10 evaluation is its 50,000 training images); without --root it is one
    line naming the option."""
    import pickle
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = ((np.arange(2 * 3072).reshape(2, 3072) + 5 * k) % 256).astype(np.uint8)
        with open(root / name, "wb") as fh:
            pickle.dump({b"labels": [k % 10, (k + 1) % 10], b"data": data}, fh, protocol=2)
    extractor = tmp_path / "rgb.pt"
    torch.jit.save(torch.jit.script(_RGBMeans()), str(extractor))
    out = tmp_path / "ref.npz"
    assert cli("fid", "ref", "cifar10", "--root", root, "--extractor", extractor,
               "-o", out) == 0
    assert FeatureStats.load(out).n == 10                      # the 5 training batches
    assert cli("fid", "ref", "cifar10", "--extractor", extractor,
               "-o", tmp_path / "other.npz") == 2
    assert "data.options.root" in capsys.readouterr().err


def test_default_n_is_the_references_and_an_npz_record_keeps_its_weights(images, tmp_path,
                                                                         capsys):
    """Without --n, N = min(10 000, the reference's N) (said in one line); the FID record of a
    samples .npz carries what the .npz's record says: checkpoint, step, weights, method."""
    root, _ = images
    if not (root / "ref.npz").exists():
        assert cli("fid", "ref", root / "imgs.npz", "-o", root / "ref.npz") == 0
    run = tmp_path / "run"
    assert cli("train", "--out", run, "--steps", 2, "--data", root / "imgs.npz",
               "--model", "unet-small", "--batch-size", 8,
               "--set", "model.options={channels: 8, channel_mult: [1, 2], blocks_per_res: 1, "
               "attn_resolutions: [], emb_mult: 2}",
               "--set", "train.progress=false", "--set", "train.sample_count=0") == 0
    samples = tmp_path / "s.npz"
    assert cli("sample", run, "--n", 50, "--out", samples, "--ema", "none") == 0
    capsys.readouterr()
    assert cli("fid", "calc", samples, "--ref", root / "ref.npz", "--out",
               tmp_path / "f.json") == 0
    out = capsys.readouterr().out
    assert "N = 40: the reference holds 40 images, fewer than the default 10000" in out
    record = json.loads((tmp_path / "f.json").read_text())
    with np.load(samples) as f:
        meta = json.loads(str(f["meta"]))
    assert record["n"] == 40 and "min(10000" in record["n_default"]
    assert record["weights"] == meta["weights"] == "model" and record["step"] == 2
    assert record["checkpoint"] == meta["checkpoint"] and record["method"] == meta["method"]
    assert cli("fid", "calc", run, "--ref", root / "ref.npz", "--out", tmp_path / "g.json") == 0
    assert "N = 40" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.json").read_text())["n"] == 40
    assert cli("fid", "calc", run, "--ref", root / "ref.npz", "--n", 8) == 0
    assert "N = " not in capsys.readouterr().out.split("FID")[0]


def _adm_files(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 4))
    np.savez(tmp_path / "VIRTUAL_tiny.npz", mu=rng.normal(size=2048) * 0.1,
             sigma=a @ a.T / 4, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "s.npz", images=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    return tmp_path / "s.npz", tmp_path / "VIRTUAL_tiny.npz"


def test_an_adm_reference_batch_under_another_protocol_is_one_line(tmp_path, capsys):
    samples, ref = _adm_files(tmp_path)
    assert cli("fid", "calc", samples, "--ref", ref, "--protocol", "meanflow-jax",
               "--out", tmp_path / "r.json") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "made under the 'adm' protocol" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_an_adm_reference_batch_is_scored_under_its_protocol(tmp_path, capsys):
    """`fid calc --ref VIRTUAL_*.npz` (ADM's mu / sigma, made by the test): scored under the
    adm protocol and recorded; no KID (the file keeps no features), unknown reference N.
    Slow: a 2048-d Fréchet distance and the Inception file's checksum take a while."""
    from meanflow.metrics import extractors
    try:
        extractors.inception_file()
    except Exception:
        pytest.skip("Inception weights not installed (make inception)")
    samples, ref = _adm_files(tmp_path)
    assert cli("fid", "calc", samples, "--ref", ref, "--device", "cpu",
               "--out", tmp_path / "r.json") == 0
    assert "[adm protocol]" in capsys.readouterr().out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["protocol"]["name"] == "adm" and record["extractor"]["protocol"] == "adm"
    assert record["ref_n"] is None and record["n"] == 3 and "kid" not in record
    assert record["ref_source"] == "ADM reference batch" and record["fid"] > 0


def test_paper_protocols_sample_50000_with_random_labels(images, tmp_path, monkeypatch):
    """Under a paper protocol a class-conditional run is sampled as the official code does:
    labels uniform at random from the recorded seed, N = 50 000 by default."""
    from meanflow.metrics import fid as fid_module
    from meanflow.metrics.extractors import Extractor
    from meanflow.metrics.protocols import PROTOCOLS
    root, _ = images
    run = tmp_path / "run"
    assert cli("train", "--out", run, "--steps", 1, "--data", root / "imgs.npz",
               "--class-conditional", "--model", "unet-small", "--batch-size", 8,
               "--set", "model.options={channels: 8, channel_mult: [1, 2], blocks_per_res: 1, "
               "attn_resolutions: [], emb_mult: 2}",
               "--set", "train.progress=false", "--set", "train.sample_count=0") == 0
    ext = Extractor("fake", lambda x: x.mean(dim=(2, 3)), torch.device("cpu"),
                    {"extractor": "fake"}, lambda x: x, batch_size=8,
                    protocol=PROTOCOLS["py-meanflow"])
    ref = FeatureStats.from_features(np.random.default_rng(0).normal(size=(10, 1)))
    seen = {}

    def fake_features(net, seeds, shape, ext, *, labels=None, **kwargs):
        seen.update(seeds=seeds, labels=labels)
        return np.random.default_rng(1).normal(size=(len(seeds), 1))

    monkeypatch.setattr(fid_module, "load_reference", lambda *a, **k: (ref, ext))
    monkeypatch.setattr(fid_module, "sample_features", fake_features)
    monkeypatch.setattr(fid_module, "check_sampling", lambda *a, **k: None)
    record = fid_module.fid_of(run, "unused.npz", n=None, seed=7, device="cpu")
    assert record["n"] == 50000 and seen["seeds"][0] == 7 and len(seen["seeds"]) == 50000
    assert record["labels"] == "random" and record["label_seed"] == 7
    expect = torch.randint(4, (50000,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(seen["labels"], expect)
    assert record["protocol"]["name"] == "py-meanflow"
