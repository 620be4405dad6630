"""The latent pipeline end to end with a tiny random AutoencoderKL (no download): prepare
(ADM crop, shards, labels, FID reference), resume, train a few steps, sample + decode, FID."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="the latent pipeline needs the optional dependency diffusers "
    "(pip install 'meanflow[latents]')")

from meanflow.data import LatentShards, build_dataset, load_image_folder  # noqa: E402
from meanflow.errors import ConfigError, DataError  # noqa: E402
from meanflow.latents import (decode_latents, encode_posterior, load_vae,  # noqa: E402
                              prepare_latents, shard_assignment, stats_from_shards)
from meanflow.metrics import FeatureStats  # noqa: E402

from cli_helpers import cli  # noqa: E402

RES = 16          # images are cropped to 16 x 16; the tiny VAE downsamples by 2 -> (4, 8, 8)
COUNTS = (5, 3, 4)  # unequal class sizes, so that shards of 5 straddle class boundaries


def torchrun_cli(*args) -> int:
    """``torchrun --standalone --nproc_per_node 2 -m meanflow.cli ARGS`` on the CPU."""
    import subprocess
    import sys
    from pathlib import Path
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m",
                          "meanflow.cli", *map(str, args), "--device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.returncode


class _MeanRGB(torch.nn.Module):
    """A stand-in FID extractor: per-channel means and spreads (6-d features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    from PIL import Image
    rng = np.random.default_rng(0)
    images = root / "images"
    for k, count in enumerate(COUNTS):
        (images / f"class{k}").mkdir(parents=True)
        for i in range(count):
            w, h = (20 + 3 * i, 17 + k)                     # various sizes and aspect ratios
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., k] = 255                            # each class has its own colour cast
            Image.fromarray(pixels).save(images / f"class{k}" / f"img{i}.png")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=RES)
    vae.save_pretrained(root / "vae")                       # safetensors weights
    ext = root / "meanrgb.pt"
    torch.jit.save(torch.jit.script(_MeanRGB()), str(ext))
    out = root / "lat"
    assert cli("prepare-latents", images, out, "--vae", root / "vae", "--resolution", RES,
               "--shard-size", 5, "--batch-size", 3, "--fid-extractor", ext,
               "--no-progress") == 0
    return root, images, out, ext


def test_shards_hold_the_posterior_of_the_cropped_images_with_their_labels(setup):
    root, images, out, _ = setup
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["num_images"] == sum(COUNTS)
    assert index["num_shards"] == 3 and index["latent_shape"] == [4, RES // 2, RES // 2]
    assert index["scale"] == pytest.approx(0.18215) and index["num_classes"] == 3
    assert index["vae"]["spec"] == str((root / "vae").resolve()) and "sha256" in index["vae"]
    folder = load_image_folder(images, resolution=RES, channels=3)   # the same ADM crop
    ds = build_dataset(str(out))
    assert isinstance(ds, LatentShards) and ds.num_classes == 3
    assert torch.equal(ds.labels, folder.labels)                      # labels survive sharding
    lines = (out / "files.txt").read_text().splitlines()
    assert [ln.split("\t")[1] for ln in lines] == list(folder.files)
    vae = load_vae(root / "vae")
    mean, std = encode_posterior(vae, folder.images.float() / 127.5 - 1.0)
    got_mean, got_std = ds.posterior(torch.arange(len(ds)))
    torch.testing.assert_close(got_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_std, std, rtol=1e-4, atol=1e-5)
    # read lazily from the memory-mapped shards: the same rows, in any order
    lazy = LatentShards(out, in_memory=False)
    pick = torch.tensor([11, 0, 5, 4, 7, 5])
    torch.testing.assert_close(lazy.posterior(pick)[0], got_mean[pick])
    torch.testing.assert_close(lazy.posterior(pick)[1], got_std[pick])


def test_reference_statistics_are_those_of_the_cropped_images(setup):
    root, images, out, ext = setup
    from meanflow.metrics.extractors import load_extractor
    folder = load_image_folder(images, resolution=RES, channels=3)
    feats = load_extractor(str(ext)).features(folder.images.float() / 127.5 - 1.0)
    want = FeatureStats.from_features(feats, keep=5000)
    got = FeatureStats.load(out / "fid_ref.npz")
    assert got.n == sum(COUNTS) and got.meta["options"]["resolution"] == RES
    np.testing.assert_allclose(got.mu, want.mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.features, want.features, rtol=1e-6)


def test_draws_have_the_stored_mean_and_std(setup):
    _, _, out, _ = setup
    ds = LatentShards(out)
    mean, std = ds.posterior(torch.arange(len(ds)))
    x, y = ds.batch(20000, torch.Generator().manual_seed(0))
    # the labels returned are those of the drawn images: recover each draw's image index
    index = torch.randint(0, len(ds), (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, ds.labels[index])
    for i in (0, 7, 11):
        rows = x[index == i] / ds.scale                       # about 1 700 draws of image i
        torch.testing.assert_close(rows.mean(0), mean[i], atol=5 * float(std[i].max())
                                   / rows.shape[0] ** 0.5, rtol=0)
        torch.testing.assert_close(rows.std(0), std[i], rtol=0.12, atol=0)
    # same generator state -> same batch; the mean-only mode has no noise
    again, _ = ds.batch(20000, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    det, _ = LatentShards(out, sample_posterior=False).batch(4, torch.Generator().manual_seed(1))
    index = torch.randint(0, len(ds), (4,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(det, mean[index] * ds.scale)


def test_resume_reencodes_only_missing_or_foreign_shards(setup, tmp_path):
    root, images, out, ext = setup
    import shutil
    copy = tmp_path / "lat"
    shutil.copytree(out, copy)
    kept = (copy / "shards/shard-00000.safetensors").stat().st_mtime_ns
    (copy / "shards/shard-00001.safetensors").unlink()            # killed before shard 1
    (copy / "shards/shard-00002.safetensors").write_bytes(b"partial")   # damaged
    index = json.loads((copy / "index.json").read_text())
    index["complete"] = False
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="incomplete"):
        LatentShards(copy)
    prepare_latents(images, copy, str(root / "vae"), resolution=RES, shard_size=5,
                    batch_size=3, fid_extractor=str(ext), progress=False)
    assert (copy / "shards/shard-00000.safetensors").stat().st_mtime_ns == kept
    from safetensors.torch import load_file
    for s in range(3):
        name = f"shards/shard-{s:05d}.safetensors"
        again, first = load_file(copy / name), load_file(out / name)
        assert again.keys() == first.keys()
        assert all(torch.equal(again[k], first[k]) for k in first)     # deterministic
    assert LatentShards(copy).labels.tolist() == LatentShards(out).labels.tolist()
    with pytest.raises(ConfigError, match="other images or settings"):
        prepare_latents(images, copy, str(root / "vae"), resolution=RES, shard_size=4,
                        fid_extractor="none", progress=False)


@pytest.mark.parametrize("shards,world", [(7, 1), (7, 3), (2, 4), (8, 8)])
def test_shard_assignment_covers_each_shard_once(shards, world):
    parts = [shard_assignment(shards, r, world) for r in range(world)]
    assert sorted(s for p in parts for s in p) == list(range(shards))
    assert all(p == list(range(r, shards, world)) for r, p in enumerate(parts))
    with pytest.raises(ConfigError):
        shard_assignment(shards, world, world)


def test_stats_from_shards_streams_like_from_features(tmp_path):
    from safetensors.torch import save_file
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(23, 5)).astype(np.float32) * 3 + 7
    files = []
    for s, (a, b) in enumerate([(0, 10), (10, 20), (20, 23)]):
        files.append(tmp_path / f"{s}.safetensors")
        save_file({"features": torch.from_numpy(feats[a:b])}, str(files[-1]))
    got = stats_from_shards(files, keep=12, meta={})
    want = FeatureStats.from_features(feats, keep=12)
    np.testing.assert_allclose(got.mu, want.mu, rtol=1e-12)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-10)
    np.testing.assert_array_equal(got.features, want.features)


def test_train_sample_decode_and_fid_through_the_cli(setup, tmp_path, capsys):
    root, _, out, _ = setup
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{name: dit-b/2, options: {{depth: 1, width: 32, heads: 2}}}}
data: {{name: {out}, class_conditional: true}}
objective: {{omega: 1.0, kappa: 0.5, fraction_r_neq_t: 0.25, p: 1.0, c: 0.01}}
train: {{steps: 3, batch_size: 6, device: cpu, ema_decays: [0.9], log_every: 1,
         checkpoint_every: 3, sample_count: 3, sample_steps: [1],
         fid_every: 3, fid_ref: {out / "fid_ref.npz"}, fid_n: 6}}
""")
    run = tmp_path / "run"
    assert cli("train", "--config", cfg, "--out", run) == 0
    # training-time sample PNGs and FID see decoded RGB images, not 4-channel latents
    from PIL import Image
    with Image.open(run / "samples" / "step_0000003-nfe1.png") as im:
        assert im.width >= 3 * RES * 2          # 3 decoded 16 x 16 images, not 8 x 8 latents
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [d for d in lines if d.get("eval") == "fid"][-1]["fid_nfe1"]
    # the VAE is found from the latent folder the run trained on
    assert cli("sample", run, "--n", 6, "--out", tmp_path / "s.npz", "--png",
               tmp_path / "s.png", "--batch-size", 4) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert "samples" not in f.files
        images, latents, labels = f["images"], f["latents"], f["labels"]
        meta = json.loads(str(f["meta"]))
    assert images.shape == (6, RES, RES, 3) and images.dtype == np.uint8
    assert latents.shape == (6, 4, RES // 2, RES // 2)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]                       # balanced
    assert meta["vae"] == str((root / "vae").resolve())
    vae = load_vae(root / "vae")
    redo = decode_latents(vae, torch.from_numpy(latents), meta["scale"])
    from meanflow.pixels import to_uint8
    assert np.array_equal(to_uint8(redo).permute(0, 2, 3, 1).numpy(), images)
    assert (tmp_path / "s.png").stat().st_size > 0
    # --vae none keeps the latents as the samples
    assert cli("sample", run, "--n", 2, "--vae", "none", "--out", tmp_path / "z.npz") == 0
    with np.load(tmp_path / "z.npz") as f:
        np.testing.assert_allclose(f["samples"], latents[:2], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    # FID of the sample file, and of the run (sampled + decoded in batches): the same value
    assert cli("fid", "calc", tmp_path / "s.npz", "--ref", out / "fid_ref.npz") == 0
    from_file = float(re.search(r"N=6\): (\S+)", capsys.readouterr().out).group(1))
    assert cli("fid", "calc", run, "--ref", out / "fid_ref.npz", "--n", 6, "--batch-size", 4,
               "--out", tmp_path / "fid.json") == 0
    from_run = float(re.search(r"N=6\): (\S+)", capsys.readouterr().out).group(1))
    assert from_run == pytest.approx(from_file, rel=1e-6) and np.isfinite(from_run)
    assert logged == pytest.approx(from_run, rel=1e-4)
    record = json.loads((tmp_path / "fid.json").read_text())
    assert record["vae"] == meta["vae"] and record["guidance"]["kappa"] == 0.5
    # under torchrun (2 CPU processes, gloo) sampling + decoding and the FID are shared out
    # by sample index and give the one-process results
    assert torchrun_cli("sample", run, "--num-samples", 5, "--out", tmp_path / "s2.npz",
                        "--batch-size", 4) == 0
    with np.load(tmp_path / "s2.npz") as f:
        np.testing.assert_allclose(f["latents"], latents[:5], rtol=1e-5, atol=1e-5)
        assert np.abs(f["images"].astype(int) - images[:5]).max() <= 1
        assert f["labels"].tolist() == labels[:5].tolist()
    assert torchrun_cli("fid", "calc", run, "--ref", out / "fid_ref.npz", "--num-samples", 6,
                        "--batch-size", 4, "--out", tmp_path / "fid2.json") == 0
    record2 = json.loads((tmp_path / "fid2.json").read_text())
    assert record2["processes"] == 2 and record2["n"] == 6
    assert record2["fid"] == pytest.approx(from_run, rel=1e-4)


def test_errors_are_one_line_with_the_fix(setup, tmp_path, capsys):
    root, images, out, _ = setup
    assert cli("prepare-latents", images, tmp_path / "x", "--vae", tmp_path / "novae",
               "--no-progress") == 2
    assert "VAE folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("prepare-latents", images, tmp_path / "y", "--vae", empty, "--resolution", RES,
               "--fid-extractor", "none", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "has no diffusion_pytorch_model.safetensors" in err and err.count("\n") == 1
    # a pickled .bin beside a config: never read, one line, no diffusers warning before it
    (empty / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo'\ntR.")
    assert cli("prepare-latents", images, tmp_path / "y", "--vae", empty, "--resolution", RES,
               "--fid-extractor", "none", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(found: config.json, diffusion_pytorch_model.bin)" in err
    assert not (tmp_path / "y").exists()                  # refused before anything was made


def test_a_folder_of_other_files_is_refused_and_a_finished_one_reused(setup, tmp_path,
                                                                      capsys):
    """prepare-latents writes only into its own folder: a user's files.txt and fid_ref.npz
    stay as they were; the finished folder of the fixture is reused by the same command."""
    root, images, out, _ = setup
    user = tmp_path / "user"
    user.mkdir()
    (user / "files.txt").write_text("mine")
    (user / "fid_ref.npz").write_bytes(b"mine")
    assert cli("prepare-latents", images, user, "--vae", root / "vae", "--resolution", RES,
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not `meanflow prepare-latents`'s" in err
    assert (user / "files.txt").read_text() == "mine"
    assert (user / "fid_ref.npz").read_bytes() == b"mine"
    assert sorted(p.name for p in user.iterdir()) == ["fid_ref.npz", "files.txt"]


def test_a_hub_id_without_network_fails_at_once(monkeypatch):
    """A hub id not in the local cache, with the hub out of reach, is one DataError at once
    (HF_HUB_OFFLINE here: no test reaches the network), not minutes of retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"'nobody/novae' is not a local folder nor in the "
                       r"Hugging Face cache, and HF_HUB_OFFLINE is set"):
        load_vae("nobody/novae")
    assert time.perf_counter() - start < 10


def test_without_diffusers_the_error_names_the_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("diffusers"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ConfigError, match=r"meanflow\[latents\]"):
        load_vae(os.getcwd())


def test_imf_run_with_per_channel_latents_decodes_through_the_cli(setup, tmp_path):
    """An iMF run on per-channel normalised latents (data.options.channel_norm, the iMF
    recipe): its training grids and `meanflow sample` decode x·σ_c + μ_c with the run's VAE,
    and guidance chosen at sampling reaches the decoded images."""
    root, _, out, _ = setup
    norm = {"mean": [0.5, -0.25, 0.125, 0.0], "std": [2.0, 4.0, 1.0, 0.5]}
    cfg = tmp_path / "imf.yaml"
    cfg.write_text(f"""
model: {{name: imf-dit-tiny/2}}
data: {{name: {out}, class_conditional: true, options: {{channel_norm: {json.dumps(norm)}}}}}
objective: {{kind: imf}}
train: {{steps: 2, batch_size: 6, device: cpu, ema_decays: [0.9], log_every: 1,
         checkpoint_every: 2, sample_count: 2, sample_steps: [1]}}
""")
    run = tmp_path / "run"
    assert cli("train", "--config", cfg, "--out", run) == 0
    from PIL import Image
    with Image.open(run / "samples" / "step_0000002-nfe1.png") as im:
        assert im.width >= 2 * RES                # decoded 16 x 16 images, not 8 x 8 latents
    assert cli("sample", run, "--n", 3, "--out", tmp_path / "s.npz", "--guidance", "3",
               "--interval", "0.2,0.9") == 0
    with np.load(tmp_path / "s.npz") as f:
        images, latents = f["images"], f["latents"]
        meta = json.loads(str(f["meta"]))
    assert meta["guidance"] == {"omega": 3.0, "interval": [0.2, 0.9]}
    assert meta["scale"] == [1 / s for s in norm["std"]]
    vae = load_vae(root / "vae")
    std, mean = torch.tensor(norm["std"]), torch.tensor(norm["mean"])
    by_hand = vae.decode(torch.from_numpy(latents) * std[:, None, None]
                         + mean[:, None, None]).sample.clamp(-1, 1)
    from meanflow.pixels import to_uint8
    assert np.abs(to_uint8(by_hand).permute(0, 2, 3, 1).numpy().astype(int)
                  - images.astype(int)).max() <= 1
