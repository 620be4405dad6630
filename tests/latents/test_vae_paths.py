"""VAE specs: local-looking paths that do not exist fail at once (no hub lookup), Stable
Diffusion pipeline folders (the VAE in vae/) load, and a VAE's shift_factor (SD3, FLUX) is
applied on the way in (prepare-latents, LatentShards) and out (decode_latents). Tiny
AutoencoderKLs made here, saved with safetensors; nothing reaches the network."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="VAEs need the optional dependency diffusers "
    "(pip install 'meanflow[latents]')")

from meanflow.cli import main  # noqa: E402
from meanflow.data import LatentShards  # noqa: E402
from meanflow.errors import DataError  # noqa: E402
from meanflow.latents import (decode_latents, load_vae, prepare_latents,  # noqa: E402
                              vae_identity, vae_shift)

RES = 8


def _tiny_vae(folder, **config):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=2, sample_size=RES, **config)
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test; HF_HUB_OFFLINE is not set, so the quick hub
    check would run if the spec were taken for a hub id."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was tried: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("spec", ["models/sd-vae-ft-mse", "./x", "~/x", "{tmp}/x", "mine/x",
                                  "a/b/c"])
def test_a_missing_local_looking_path_fails_at_once(spec, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "mine").mkdir()              # "mine/x": its first part is a local folder
    text = spec.format(tmp=tmp_path)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_vae(text)
    assert time.perf_counter() - start < 2
    message = str(info.value)
    assert message.startswith(f"VAE folder {text} not found") and "\n" not in message
    assert "vae/" in message


def test_the_cli_error_is_one_line(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.chdir(tmp_path)
    from PIL import Image
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    assert main(["prepare-latents", "imgs", "lat", "--vae", "models/sd-vae-ft-mse",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VAE folder models/sd-vae-ft-mse not found" in err


def test_a_pipeline_folder_gives_its_vae(tmp_path):
    pipe = tmp_path / "stable-diffusion"
    want = _tiny_vae(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    (pipe / "unet").mkdir()
    vae = load_vae(pipe)
    x = torch.rand(1, 3, RES, RES) * 2 - 1
    torch.testing.assert_close(vae.decode(vae.encode(x).latent_dist.mean).sample,
                               want.decode(want.encode(x).latent_dist.mean).sample)
    ident = vae_identity(pipe, vae)
    weights = pipe / "vae" / "diffusion_pytorch_model.safetensors"
    assert ident["spec"] == str(pipe.resolve())
    assert ident["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_shift_factor_is_applied_in_and_out(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"c{k}" / f"{i}.png")
    vae = _tiny_vae(tmp_path / "vae", scaling_factor=1.5, shift_factor=0.25)
    assert vae_shift(vae) == 0.25
    prepare_latents(tmp_path / "imgs", tmp_path / "lat", str(tmp_path / "vae"),
                    resolution=RES, shard_size=4, batch_size=2, fid_extractor=None,
                    progress=False)
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert index["shift"] == 0.25 and index["scale"] == 1.5
    ds = LatentShards(tmp_path / "lat", sample_posterior=False)
    mean, _ = ds.posterior(torch.arange(len(ds)))
    x, _ = ds.take(torch.arange(len(ds)), torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, (mean - 0.25) * 1.5)              # encode: (z - shift)·scale
    loaded = load_vae(tmp_path / "vae")
    got = decode_latents(loaded, x, scale=1.5)                      # decode: z/scale + shift
    want = loaded.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # an SD-VAE-like config has no shift: nothing subtracted, nothing added
    plain = _tiny_vae(tmp_path / "plain")
    assert vae_shift(plain) == 0.0
    z = torch.randn(2, 2, RES // 2, RES // 2)
    torch.testing.assert_close(decode_latents(plain, z, scale=2.0),
                               plain.decode(z / 2.0).sample.clamp(-1, 1))
