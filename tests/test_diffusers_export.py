"""``meanflow export RUN OUT --format diffusers`` and :class:`meanflow.pipeline.MeanFlowPipeline`:
the round trip on tiny runs trained here (a class-conditional 8x8 image run from a uint8
.npz, a latent run with a tiny random AutoencoderKL and named classes, a flow-matching point
run): the folder holds no pickle, loads with ``from_pretrained``, and one generator per sample
seeded s gives meanflow's sample of seed s bit for bit on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import meanflow
from meanflow.errors import ConfigError
from meanflow.runs import RunConfig
from meanflow.train import train

diffusers = pytest.importorskip("diffusers", reason="the pipeline needs diffusers")
from meanflow.pipeline import MeanFlowPipeline  # noqa: E402  (after the skip)

from cli_helpers import cli  # noqa: E402

TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "blocks_per_res": 1,
             "attn_resolutions": [], "emb_mult": 2}
CLASSES = ("circle", "square")
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def run_config(data: str, model: str, options: dict, conditional: bool = True,
               **objective) -> RunConfig:
    tr = {"steps": 2, "batch_size": 6, "progress": False, "checkpoint_every": 2,
          "sample_count": 0, "device": "cpu", "ema_decays": [0.9], "log_every": 1}
    return RunConfig.from_dict({"model": {"name": model, "options": options},
                                "data": {"name": data, "class_conditional": conditional},
                                "objective": objective, "train": tr}).validate()


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def pil_array(images) -> np.ndarray:
    """PIL images -> (N, H, W, C) uint8, as ``Samples.images`` holds them."""
    arrays = [np.asarray(im) for im in images]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("diffusers_export")


@pytest.fixture(scope="module")
def image_run(root):
    """Class-conditional RGB 8x8 images from a uint8 .npz (3 classes, no names)."""
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", x=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8),
             y=np.arange(24) % 3)
    run = root / "image_run"
    train(run_config(str(root / "images.npz"), "unet-small", dict(TINY_UNET)), run)
    return run


@pytest.fixture(scope="module")
def latent_run(root):
    """A DiT on the latents of a tiny random AutoencoderKL (16x16 images -> 4x8x8 latents) of
    an image folder whose classes are named."""
    from PIL import Image
    from meanflow.latents import prepare_latents
    rng = np.random.default_rng(1)
    for k, name in enumerate(CLASSES):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[..., k] = 255
            Image.fromarray(pixels).save(root / "folder" / name / f"{i}.png")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    prepare_latents(root / "folder", root / "lat", str(root / "vae"), resolution=16,
                    shard_size=4, batch_size=3, fid_extractor="none", progress=False)
    run = root / "latent_run"
    train(run_config(str(root / "lat"), "dit-b/2", {"depth": 1, "width": 32, "heads": 2}), run)
    return run


@pytest.fixture(scope="module")
def point_run(root):
    """Flow matching on the 8-Gaussian ring, unconditional: sampled by Euler."""
    run = root / "point_run"
    train(run_config("8gaussians", "mlp", {"width": 16, "depth": 1, "emb_dim": 8},
                     conditional=False, kind="flow_matching"), run)
    return run


def files_of(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_image_run_round_trip_equals_meanflow_samples(image_run, root):
    out = root / "image_export"
    assert cli("export", image_run, out, "--format", "diffusers") == 0
    assert files_of(out) == {"model_index.json", "README.md", "backbone/config.json",
                             "backbone/diffusion_pytorch_model.safetensors"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "MeanFlowPipeline"
    assert index["backbone"] == ["meanflow.pipeline", "MeanFlowBackbone"]
    config = json.loads((out / "backbone" / "config.json").read_text())
    assert config["sample_shape"] == [3, 8, 8] and config["num_classes"] == 3
    assert config["sampler"] == "meanflow" and config["source"]["weights"] == "ema_0.9"

    pipe = MeanFlowPipeline.from_pretrained(out)
    model = meanflow.load(image_run)
    seeds, labels = [3, 4, 5, 6, 7, 8], [2, 0, 1, 1, 0, 2]
    for steps in (1, 2):
        got = pipe(batch_size=6, num_inference_steps=steps, class_labels=labels,
                   generator=generators(seeds))
        want = model.sample(seeds=seeds, labels=labels, steps=steps)
        assert torch.equal(got.samples, want.samples)             # bit for bit on the CPU
        assert np.array_equal(pil_array(got.images), want.images.numpy())
        assert torch.equal(got.labels, want.labels)
    unit = pipe(num_inference_steps=1, class_labels=labels, generator=generators(seeds),
                output_type="np").images                         # unquantized, in [0, 1]
    assert unit.shape == (6, 8, 8, 3) and unit.dtype == np.float32
    assert np.abs(unit * 255 - model.sample(seeds=seeds, labels=labels).images.numpy()).max() \
        <= 0.5 + 1e-4

    # one generator for a batch of one is that seed's sample; no labels: class i mod K
    one = pipe(generator=torch.Generator().manual_seed(5), output_type="pt")
    assert torch.equal(one.samples, model.sample(seeds=[5]).samples)
    assert one.images.shape == (1, 3, 8, 8) and one.labels.tolist() == [0]

    # the folder's README runs as it stands
    readme = (out / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(compile(code, str(out / "README.md"), "exec"), scope)
    assert len(scope["out"].images) == 4 and scope["out"].labels.tolist() == [0] * 4

    # diffusers' own save_pretrained of the loaded pipeline loads back to the same samples
    pipe.save_pretrained(root / "resaved")
    again = MeanFlowPipeline.from_pretrained(root / "resaved")
    assert torch.equal(again(generator=generators([9]), class_labels=1).samples,
                       model.sample(seeds=[9], labels=1).samples)


def test_latent_run_round_trip_decodes_like_meanflow(latent_run, root):
    out = meanflow.export_diffusers(latent_run, root / "latent_export")
    assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= files_of(out)
    assert not {p for p in files_of(out) if any(p.endswith(s) for s in PICKLES)}
    model = meanflow.load(latent_run)
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == model.vae["scale"]

    pipe = MeanFlowPipeline.from_pretrained(out)
    assert pipe.class_names == list(CLASSES) and pipe.get_label_ids("square") == [1]
    seeds = [0, 1, 2, 3]
    got = pipe(class_labels=["square", "circle", "circle", "square"],
               generator=generators(seeds))
    want = model.sample(seeds=seeds, labels=[1, 0, 0, 1])
    assert want.decoded and torch.equal(got.samples, want.samples)
    assert np.array_equal(pil_array(got.images), want.images.numpy())   # (4, 16, 16, 3)
    latents = pipe(class_labels=1, generator=generators(seeds), output_type="latent")
    assert torch.equal(latents.images, model.sample(seeds=seeds, labels=1).samples)


def test_point_run_samples_by_euler_as_arrays(point_run, root):
    out = meanflow.export_diffusers(point_run, root / "point_export", ema=None)
    config = json.loads((out / "backbone" / "config.json").read_text())
    assert config["sampler"] == "euler" and config["source"]["weights"] == "model"
    pipe = MeanFlowPipeline.from_pretrained(out)
    model = meanflow.load(point_run, ema=None)
    got = pipe(num_inference_steps=4, generator=generators(range(10, 15)))
    assert got.images is None and got.labels is None and isinstance(got.samples, np.ndarray)
    assert np.array_equal(got.samples, model.sample(seeds=range(10, 15), steps=4).samples.numpy())
    with pytest.raises(ConfigError, match="makes points of shape \\(2,\\), not images"):
        pipe(generator=generators([0]), output_type="pil")
    with pytest.raises(ConfigError, match="unconditional: drop them"):
        pipe(generator=generators([0]), class_labels=1)
    with pytest.raises(ConfigError, match="2 generators for batch_size=3"):
        pipe(batch_size=3, generator=generators([0, 1]))


def test_export_refusals_are_one_line(image_run, point_run, root, capsys):
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    cases = [
        (("export", image_run, user), r"holds files that are not `meanflow export`'s"),
        (("export", image_run, root / "new", "--format", "onnx"),
         r"--format 'onnx' is not a format meanflow writes: choose diffusers"),
        (("export", point_run, root / "new", "--vae", root / "vae"),
         r"--vae is for runs trained on latents"),
        (("export", image_run, root / "new", "--ema", "0.5"), r"has no EMA with decay 0\.5"),
    ]
    for args, pattern in cases:
        capsys.readouterr()
        assert cli(*args) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("meanflow: error: "), lines
        assert re.search(pattern, lines[0]), lines[0]
    assert files_of(user) == {"notes.txt"} and not (root / "new").exists()
    assert cli("export", point_run, root / "twice") == 0
    capsys.readouterr()
    assert cli("export", point_run, root / "twice") == 2
    assert "already holds a diffusers export" in capsys.readouterr().err
    (root / "empty").mkdir()
    assert cli("export", point_run, root / "empty") == 0     # an empty folder is taken
    assert (root / "empty" / "model_index.json").is_file()


def test_import_meanflow_and_its_cli_load_no_diffusers():
    code = "import meanflow, meanflow.cli, sys; print('diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"
