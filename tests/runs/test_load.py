"""``meanflow.load(run).sample(...)``: the inference API on a point run, an image-folder run
(class names from its sub-folders) and a latent run (a tiny random AutoencoderKL, no
download): sample i depends on seed i alone, and the results are what `meanflow sample`
writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import meanflow
from meanflow.errors import ConfigError
from meanflow.pixels import to_uint8
from meanflow.runs import Model, RunConfig, load
from meanflow.sampling import sample_seeded
from meanflow.train import train

from cli_helpers import cli  # noqa: E402

TINY = {"width": 16, "depth": 1, "emb_dim": 8}
TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "blocks_per_res": 1,
             "attn_resolutions": [], "emb_mult": 2}
CLASSES = ("cat", "dog", "frog")      # sorted: the labels are 0, 1, 2
RES = 16


def run_config(data: str, model: str, model_options: dict, **data_extra) -> RunConfig:
    """A 2-step class-conditional run on ``data``: enough to have weights to sample."""
    tr = {"steps": 2, "batch_size": 6, "progress": False, "checkpoint_every": 2,
          "sample_count": 0, "device": "cpu", "ema_decays": [0.9], "log_every": 1}
    return RunConfig.from_dict({"model": {"name": model, "options": model_options},
                                "data": {"name": data, "class_conditional": True,
                                         **data_extra},
                                "train": tr}).validate()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three class sub-folders of RGB images of various sizes (cropped to RES x RES)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("load") / "images"
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(2 + k):
            pixels = rng.integers(0, 256, (RES + 1 + k, RES + 3 * i, 3), dtype=np.uint8)
            pixels[..., k] = 255                              # a colour cast per class
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def point_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("load") / "points"
    train(run_config("8gaussians", "mlp", dict(TINY)), run)
    return run


@pytest.fixture(scope="module")
def image_run(image_folder):
    run = image_folder.parent / "image_run"
    train(run_config(str(image_folder), "unet-small", dict(TINY_UNET),
                     options={"resolution": 8}), run)
    return run


@pytest.fixture(scope="module")
def latent_run(image_folder):
    diffusers = pytest.importorskip(
        "diffusers", reason="latent runs need the optional dependency diffusers")
    from meanflow.latents import prepare_latents
    root = image_folder.parent
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=RES)
    vae.save_pretrained(root / "vae")
    prepare_latents(image_folder, root / "lat", str(root / "vae"), resolution=RES,
                    shard_size=4, batch_size=3, fid_extractor="none", progress=False)
    run = root / "latent_run"
    train(run_config(str(root / "lat"), "dit-b/2", {"depth": 1, "width": 32, "heads": 2}),
          run)
    return run


def sampled_by_the_cli(run, tmp_path, *args) -> dict[str, np.ndarray]:
    out = tmp_path / "s.npz"
    assert cli("sample", run, "--out", out, "--device", "cpu", "--overwrite", *args) == 0
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_load_is_the_top_level_entry_point(point_run):
    model = meanflow.load(point_run)
    assert isinstance(model, Model) and meanflow.load is load
    assert model.shape == (2,) and model.num_classes == 8 and model.weights == "ema_0.9"
    assert model.method == "meanflow" and model.vae is None and not model.latent
    assert model.class_names is None                      # the ring's classes have no names
    assert not model.net.training


def test_point_samples_depend_on_their_seed_alone(point_run, tmp_path):
    model = load(point_run)
    out = model.sample(7, seed=3)
    assert out.samples.shape == (7, 2) and out.images is None and out.classes is None
    assert out.seeds == list(range(3, 10)) and out.labels.tolist() == [i % 8 for i in range(7)]
    assert out.method == "meanflow" and out.steps == 1 and not out.decoded and len(out) == 7
    # the same seed and label: the same noise, so the same sample whatever n, the seed list or
    # the batch size, to float rounding: CPU kernels block a matrix product by its row count,
    # so trained weights give ~1e-8 differences between batch compositions
    # (src/meanflow/sampling.py, seeded sampling)
    fewer = model.sample(seeds=[5, 6], labels=[2, 3])
    torch.testing.assert_close(fewer.samples, out.samples[2:4], rtol=0, atol=1e-6)
    assert not torch.equal(model.sample(seeds=[6, 5], labels=[2, 3]).samples,
                           fewer.samples)             # and another seed is another sample
    batched = model.sample(7, seed=3, batch_size=2)
    torch.testing.assert_close(batched.samples, out.samples, rtol=0, atol=1e-6)
    # what the sampler gives for those seeds, and what `meanflow sample` writes
    expect = sample_seeded(model.net, range(3, 10), (2,), y=torch.arange(7) % 8)
    assert torch.equal(out.samples, expect)
    written = sampled_by_the_cli(point_run, tmp_path, "--n", 7, "--seed", 3)
    assert np.array_equal(written["samples"], out.samples.numpy())
    assert np.array_equal(written["labels"], out.labels.numpy())
    two = model.sample(4, steps=2, schedule=[1.0, 0.4, 0.0])
    assert two.schedule == [1.0, 0.4, 0.0]
    assert not torch.equal(two.samples, model.sample(4).samples)


def test_labels_one_for_all_or_one_per_sample(point_run):
    model = load(point_run)
    assert model.sample(3, labels=5).labels.tolist() == [5, 5, 5]
    assert model.sample(labels=torch.tensor([1, 0])).labels.tolist() == [1, 0]   # n from them
    for bad, needle in (({"labels": 8}, "outside"), ({"labels": "cat"}, "named no classes"),
                        ({"labels": [1, 2]}, "2 labels for 3"), ({}, None)):
        with pytest.raises(ConfigError, match=needle or "give n"):
            model.sample(3 if bad else None, **bad)
    with pytest.raises(ConfigError, match="seeds given"):
        model.sample(3, seeds=[1, 2])


def test_image_run_gives_uint8_images_with_class_names(image_run, tmp_path):
    model = load(image_run)
    assert model.shape == (3, 8, 8) and model.class_names == CLASSES
    out = model.sample(5, seed=1)
    assert out.images.dtype == torch.uint8 and out.images.shape == (5, 8, 8, 3)
    assert torch.equal(out.images, to_uint8(out.samples).permute(0, 2, 3, 1))
    assert out.classes == ["cat", "dog", "frog", "cat", "dog"]
    by_name = model.sample(2, seed=1, labels=["frog", "cat"])
    assert by_name.labels.tolist() == [2, 0] and by_name.classes == ["frog", "cat"]
    with pytest.raises(ConfigError, match="cat, dog, frog"):
        model.sample(1, labels="bird")
    written = sampled_by_the_cli(image_run, tmp_path, "--n", 5, "--seed", 1)
    assert np.array_equal(written["images"], out.images.numpy())
    assert np.array_equal(written["samples"], out.samples.numpy())


def test_a_checkpoint_without_class_names_gives_none(image_run, tmp_path):
    """Runs trained before the class names were recorded load as before, unnamed."""
    import shutil
    copy = tmp_path / "old"
    shutil.copytree(image_run, copy)
    state_file = next((copy / "checkpoints").iterdir()) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["data"].pop("class_names") == list(CLASSES)
    state_file.write_text(json.dumps(state))
    model = load(copy)
    assert model.class_names is None and model.sample(2).classes is None


def test_latent_run_decodes_with_the_recorded_vae(latent_run, tmp_path):
    model = load(latent_run)
    assert model.latent and model.vae is not None and model.vae["auto"]
    assert model.shape == (4, RES // 2, RES // 2) and model.class_names == CLASSES
    out = model.sample(5, batch_size=2)
    assert out.decoded and out.images.dtype == torch.uint8
    assert out.images.shape == (5, RES, RES, 3) and out.samples.shape == (5, 4, 8, 8)
    assert out.classes == ["cat", "dog", "frog", "cat", "dog"]
    # the images are the VAE's decoding of the latents, as 8-bit pixels
    again = to_uint8(model.decode(out.samples)).permute(0, 2, 3, 1)
    assert (again.int() - out.images.int()).abs().max() <= 1
    kept = model.sample(5, batch_size=2, decode=False)
    assert kept.images is None and not kept.decoded and torch.equal(kept.samples, out.samples)
    written = sampled_by_the_cli(latent_run, tmp_path, "--n", 5, "--batch-size", 2)
    assert "samples" not in written
    assert np.array_equal(written["images"], out.images.numpy())
    assert np.array_equal(written["latents"], out.samples.numpy())
    raw = load(latent_run, vae="none")
    assert raw.vae is None and raw.sample(2).images is None
