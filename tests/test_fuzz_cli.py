"""Bad invocations of every flag of every command: each gives exactly one stderr line
``meanflow: error: ...`` with its exit code, no traceback, and changes none of the user's files
(docs/design.md, "Inputs" and "What meanflow may overwrite").

Every row runs in-process through :func:`meanflow.cli.main`; ``--dry-run`` where it saves work.
``test_every_flag_has_a_row`` walks the argument parsers, so a new flag without a row here
fails the suite. No row reaches the network: ``HF_HUB_OFFLINE`` is set for all of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meanflow.cli import build_parser, main

# (argv with {placeholders} of the fixture's files, regex of the error line, exit code)
ROWS = [
    # no command, and the top-level flags
    ("", r"no command given; choose one of train, sample", 2),
    ("--version bogus", r"invalid choice: 'bogus'", 2),
    # train
    ("train --config {tmp}/missing.yaml --dry-run", r"config file not found", 2),
    ("train --config {deep} --dry-run", r"nested too deeply", 2),
    ("train --preset nope --dry-run", r"unknown preset 'nope'", 2),
    ("train --preset fmnist-unet --config {deep} --dry-run", r"--preset or --config, not both", 2),
    ("train --resume --out {tmp}/norun", r"holds no run to continue", 2),
    ("train --out {user}/notes.txt --steps 1 --set train.progress=false", r"is a file", 2),
    ("train --out {user} --dry-run", r"is not empty and holds no meanflow run", 2),
    ("train --out {run} --dry-run", r"already holds a run: pass --resume", 2),
    ("train --dry-run --steps 0", r"train\.steps=0 must be >= 1", 2),
    ("train --data {tmp}/nosuch.npz --dry-run", r"data file not found", 2),
    ("train --data {points} --class-conditional --dry-run", r"has no labels", 2),
    ("train --data {big_label} --class-conditional --dry-run", r"label 1000000000000 would make",
     2),
    ("train --data {one_image} --dry-run", r"one image \(H, W, C\), not a dataset", 2),
    ("train --data {u8_5d} --dry-run", r"uint8 of shape \(4, 2, 3, 8, 8\): neither images", 2),
    ("train --data {single} --set data.order=random --dry-run", r"a dataset needs at least 2", 2),
    ("train --data {one_image_dir} --set data.order=random --dry-run",
     r"holds 1 sample\(s\): a dataset needs at least 2", 2),
    ("train --objective nope --dry-run", r"objective\.kind", 2),
    ("train --model nope --dry-run", r"unknown model 'nope'", 2),
    ("train --batch-size 1e12 --dry-run", r"needs at least .* lower train\.batch_size", 2),
    ("train --batch-size 1.5 --dry-run", r"argument --batch-size: '1\.5' is not an integer", 2),
    ("train --set model.options.width=10000000 --dry-run", r"parameters.*needs at least", 2),
    ("train --lr nan --dry-run", r"optim\.lr=nan must be a number", 2),
    ("train --seed 1180591620717411303424 --dry-run", r"seed \d+ must be in \[0, 2\*\*64\)", 2),
    ("train --seed -1 --dry-run", r"argument --seed: seed -1 must be in \[0, 2\*\*64\)", 2),
    ("train --device tpu --dry-run", r"train\.device='tpu'", 2),
    ("train --jvp nope --dry-run", r"unknown objective\.jvp 'nope'", 2),
    ("train --set model.name=[1] --dry-run", r"model\.name=\[1\] must be a backbone name", 2),
    # sample
    ("sample {tmp}/norun --out {tmp}/s.npz", r"no checkpoint found", 2),
    ("sample {run} --n 0", r"--n 0 must be >= 1", 2),
    ("sample {run} --num-samples 1e12 --out {tmp}/s.npz", r"sampling 1000000000000 .* lower --n",
     2),
    ("sample {run} --steps 0 --out {tmp}/s.npz", r"steps=0 must be a positive integer", 2),
    ("sample {run} --schedule 1,x,0 --out {tmp}/s.npz", r"--schedule '1,x,0'", 2),
    ("sample {run} --seed 18446744073709551616", r"seed \d+ must be in \[0, 2\*\*64\)", 2),
    ("sample {run} --seed -1", r"seed -1 must be in \[0, 2\*\*64\)", 2),
    ("sample {run} --seed 18446744073709551615 --n 2 --out {tmp}/s.npz",
     r"seeds stay below 2\*\*64", 2),
    ("sample {run} --label 3 --out {tmp}/s.npz", r"--label given but the model is unconditional",
     2),
    ("sample {run} --ema bogus", r"--ema 'bogus' must be auto, none or a decay", 2),
    ("sample {run} --batch-size 0", r"--batch-size 0 must be >= 1", 2),
    ("sample {run} --device tpu --out {tmp}/s.npz", r"device 'tpu' is not one of", 2),
    ("sample {run} --out {tmp}/s.txt", r"must end in \.npz", 2),
    ("sample {run} --out {user}/mine.npz", r"mine\.npz exists: .* --overwrite", 2),
    ("sample {run} --png {tmp}/s.jpg", r"must end in \.png", 2),
    ("sample {run} --png {tmp}/s.png --nrow 0", r"--nrow 0 must be >= 1", 2),
    ("sample {run} --out {user}/folder.npz --overwrite", r"is a folder", 2),
    ("sample {run} --vae {vae_empty} --out {tmp}/s.npz", r"--vae decodes latents", 2),
    ("sample {run} --guidance 2 --out {tmp}/s.npz", r"not trained with guidance conditioning",
     2),
    ("sample {run} --guidance 0.5 --out {tmp}/s.npz", r"guidance scale 0\.5 must be a number >= 1",
     2),
    ("sample {run} --interval 0.5 --out {tmp}/s.npz", r"two comma-separated times", 2),
    ("sample {run} --guidance 2 --interval 0.7,0.2 --out {tmp}/s.npz",
     r"0 <= t_min <= t_max <= 1", 2),
    # fid ref
    ("fid ref {tmp}/nosuch.npz -o {tmp}/r.npz", r"not found", 2),
    ("fid ref {images} -o {tmp}/r.txt", r"must end in \.npz", 2),
    ("fid ref {images} --out {user}/mine.npz", r"mine\.npz exists", 2),
    ("fid ref {images} -o {tmp}/r.npz --split test", r"does not take option\(s\) split", 2),
    ("fid ref cifar10 -o {tmp}/r.npz --root {tmp}/nosuch", r"CIFAR-10 not found", 2),
    ("fid ref {images} -o {tmp}/r.npz --n 1", r"--n 1 must be >= 2", 2),
    ("fid ref {images} -o {tmp}/r.npz --extractor {evil}",
     r"never unpickled: Trying to load unsupported GLOBAL os\.system whose module os is "
     r"blocked\); give", 2),
    ("fid ref {images} -o {tmp}/r.npz --keep -1", r"--keep -1 must be >= 0", 2),
    ("fid ref {images} -o {tmp}/r.npz --device tpu", r"device 'tpu'", 2),
    ("fid ref {images} -o {tmp}/r.npz --protocol tf", r"unknown FID protocol 'tf'", 2),
    ("fid ref {images} -o {user}/folder.npz --overwrite", r"is a folder", 2),
    # fid calc
    ("fid calc {tmp}/nosuch.npz --ref {ref}", r"cannot read samples", 2),
    ("fid calc {images_nhw} --ref {ref}",
     r"'images' is uint8 of shape \(8, 28, 28\); fid calc takes 'images' as \(N, H, W, C\)", 2),
    ("fid calc {nan_samples} --ref {ref}", r"NaN or infinite", 2),
    ("fid calc {nan_samples} --ref {tmp}/nope.npz", r"nope\.npz", 2),
    ("fid calc {run} --ref {ref} --n 1", r"--n 1 must be >= 2", 2),
    ("fid calc {run} --ref {ref} --num-samples 1e12", r"sampling 1000000000000 .* lower --n", 2),
    ("fid calc {run} --ref {ref} --steps 0", r"--steps 0 must be >= 1", 2),
    ("fid calc {run} --ref {ref} --guidance 2", r"not trained with guidance conditioning", 2),
    ("fid calc {run} --ref {ref} --interval 1,2,3", r"two comma-separated times", 2),
    ("fid calc {nan_samples} --ref {ref} --guidance 2", r"scored as it is .* drop them", 2),
    ("fid calc {run} --ref {ref} --seed 18446744073709551616", r"must be in \[0, 2\*\*64\)", 2),
    ("fid calc {nan_samples} --ref {ref} --ema 0.5", r"drop --ema", 2),
    ("fid calc {run} --ref {ref} --batch-size 0", r"--batch-size 0 .* must be >= 1", 2),
    ("fid calc {run} --ref {ref} --device tpu", r"device 'tpu'", 2),
    ("fid calc {samples} --ref {ref} --protocol adm",
     r"made under the 'pytorch-fid' protocol, not 'adm'", 2),
    ("fid calc {run} --ref {ref} --extractor {evil}", r"never unpickled", 2),
    ("fid calc {samples} --ref {ref_nokeep} --precision-recall", r"needs feature rows", 2),
    ("fid calc {samples} --ref {ref} --out {user}/notes.txt", r"notes\.txt exists", 2),
    ("fid calc {samples} --ref {ref} --out {user}/folder.npz --overwrite", r"is a folder", 2),
    ("fid calc {run} --ref {ref} --vae {vae_empty}", r"--vae decodes latents", 2),
    # prepare-latents
    ("prepare-latents {tmp}/nosuch {tmp}/lat --vae {vae_empty}", r"image folder not found", 2),
    ("prepare-latents {image_dir} {user} --vae {vae_empty} --no-progress",
     r"holds files that are not `meanflow prepare-latents`'s", 2),
    ("prepare-latents {image_dir} {run} --vae {vae_empty}",
     r"not `meanflow prepare-latents`'s \(checkpoints", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --resolution 16",
     r"no diffusion_pytorch_model\.safetensors|needs the optional dependency diffusers", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae nobody/novae --resolution 16",
     r"not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
     r"|needs the optional dependency diffusers", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --resolution 100000",
     r"resolution=100000 is above 16384", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --batch-size 1e9",
     r"a batch of 1000000000 crops .* lower --batch-size", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --shard-size 0",
     r"shard_size=0 must be an integer >= 1", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --dtype float8",
     r"dtype='float8'", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --scale inf",
     r"scale=inf must be a positive finite number", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --fid-keep -1",
     r"fid_keep=-1 must be an integer >= 0", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --device tpu",
     r"device 'tpu'", 2),
    ("prepare-latents {image_dir} {tmp}/lat --vae {vae_empty} --fid-extractor {evil} "
     "--resolution 16", r"no diffusion_pytorch_model|needs the optional dependency diffusers", 2),
    # convert
    ("convert {tmp}/nosuch.pth {tmp}/cv", r"no file at", 2),
    ("convert {evil} {tmp}/cv", r"holds the global os\.system, which meanflow refuses", 2),
    ("convert {evil} {user}", r"exists and is not empty", 2),
    # demo
    ("demo --out {user}", r"holds files that are not `meanflow demo`'s", 2),
    ("demo --out {demo_like}", r"not `meanflow demo`'s \(figure\.png, metrics\.json\)", 2),
    ("demo --out {user}/notes.txt --no-progress", r"is a file", 2),
    ("demo --steps 0 --out {tmp}/d", r"train\.steps", 2),
    ("demo --seed 18446744073709551616", r"must be in \[0, 2\*\*64\)", 2),
    ("demo --set objective.kind=x --out {tmp}/d", r"drop --set objective\.kind=x", 2),
    # export
    ("export {run} {user}", r"holds files that are not `meanflow export`'s", 2),
    ("export {tmp}/norun {tmp}/e", r"no checkpoint found", 2),
    ("export {run} {tmp}/e --format onnx", r"--format 'onnx' is not a format meanflow writes", 2),
    ("export {run} {tmp}/e --ema bogus", r"--ema 'bogus' must be auto, none or a decay", 2),
    ("export {run} {tmp}/e --vae {vae_empty}", r"--vae is for runs trained on latents", 2),
    ("export {run} {tmp}/e --format meanflow --vae x", r"drop --vae", 2),
    ("export {run} {user} --format meanflow", r"exists and is not an empty folder", 2),
    # presets
    ("presets extra", r"unrecognized arguments: extra", 2),
    # data (each refused before any download)
    ("data nope", r"argument name: invalid choice: 'nope'", 2),
    ("data mnist --out {user}/notes.txt --from {tmp}", r"notes\.txt is a file, not a folder", 2),
    ("data fashion-mnist --out {tmp}/fm --from {tmp}/nosuch", r"--from .*nosuch is not a folder",
     2),
    ("data mnist --out {user} --from {image_dir}", r"lacks train-labels-idx1-ubyte\.gz", 2),
]


def _digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the user's files)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The files the rows use: a tiny trained run, reference statistics, data files, the
    user's folder of files that must never change."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    f = {"tmp": root / "scratch", "user": root / "user"}
    f["tmp"].mkdir()
    f["user"].mkdir()
    (f["user"] / "notes.txt").write_text("the user's notes\n")
    (f["user"] / "mine.npz").write_bytes(b"the user's samples")
    (f["user"] / "folder.npz").mkdir()
    f["demo_like"] = root / "dm"
    f["demo_like"].mkdir()
    (f["demo_like"] / "figure.png").write_bytes(b"the user's figure")
    (f["demo_like"] / "metrics.json").write_text("{}")
    f["deep"] = root / "deep.yaml"
    f["deep"].write_text("[" * 3000 + "]" * 3000 + "\n")
    f["points"] = root / "points.npz"
    np.savez(f["points"], x=rng.normal(size=(64, 2)).astype(np.float32))
    f["big_label"] = root / "big_label.npz"
    labels = np.zeros(64, np.int64)
    labels[0] = 10 ** 12
    np.savez(f["big_label"], x=rng.normal(size=(64, 2)).astype(np.float32), y=labels)
    f["one_image"] = root / "one_image.npz"
    np.savez(f["one_image"], x=np.zeros((28, 28, 3), np.uint8))
    f["single"] = root / "single.npz"
    np.savez(f["single"], x=np.zeros((1, 28, 28), np.uint8))
    f["u8_5d"] = root / "u8_5d.npz"
    np.savez(f["u8_5d"], x=np.zeros((4, 2, 3, 8, 8), np.uint8))
    f["images"] = root / "images.npz"
    np.savez(f["images"], x=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    f["images_nhw"] = root / "images_nhw.npz"
    np.savez(f["images_nhw"], images=np.zeros((8, 28, 28), np.uint8))
    f["nan_samples"] = root / "nan.npz"
    np.savez(f["nan_samples"], samples=np.full((8, 1, 28, 28), np.nan, np.float32))
    f["samples"] = root / "samples.npz"
    np.savez(f["samples"], samples=rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32))
    f["evil"] = root / "evil.pkl"
    f["evil"].write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    f["vae_empty"] = root / "vae"
    f["vae_empty"].mkdir()
    (f["vae_empty"] / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    f["image_dir"] = root / "imgdir"
    for c in "ab":
        (f["image_dir"] / c).mkdir(parents=True)
    for c in "ab":
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                f["image_dir"] / c / f"{i}.png")
    f["one_image_dir"] = root / "one_image_dir"
    f["one_image_dir"].mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        f["one_image_dir"] / "only.png")
    f["run"] = root / "run"
    assert main(["train", "--out", str(f["run"]), "--steps", "2", "--batch-size", "16",
                 "--set", "model.options={width: 16, depth: 1, emb_dim: 8}",
                 "--set", "train.progress=false", "--set", "train.sample_count=0"]) == 0
    f["ref"] = root / "ref.npz"
    f["ref_nokeep"] = root / "ref_nokeep.npz"
    assert main(["fid", "ref", str(f["images"]), "-o", str(f["ref"])]) == 0
    assert main(["fid", "ref", str(f["images"]), "-o", str(f["ref_nokeep"]), "--keep", "0"]) == 0
    return f


@pytest.mark.parametrize("argv, pattern, code", ROWS, ids=[r[0] or "<none>" for r in ROWS])
def test_bad_invocation_is_one_line(world, capsys, monkeypatch, argv, pattern, code):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = {name: _digest(world[name]) for name in ("user", "demo_like", "run")}
    args = shlex.split(argv.format(**{k: str(v) for k, v in world.items()}))
    capsys.readouterr()
    try:
        got = main(args)
    except SystemExit as exc:           # argparse's own errors
        got = exc.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meanflow: error: "), err
    assert "Traceback" not in err and re.search(pattern, lines[0]), lines[0]
    assert got == code, lines[0]
    after = {name: _digest(world[name]) for name in before}
    assert after == before, "a file of the user's (or the run's) changed"


def _flags() -> set[tuple[str, str]]:
    """(command path, option) of every flag of every command, e.g. ("fid calc", "--seed"),
    and ("fid calc", "") for each command itself."""
    found: set[tuple[str, str]] = set()

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.add((" ".join(path + [name]), ""))
                    walk(sub, path + [name])
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                found.update((" ".join(path), option) for option in action.option_strings)
    walk(build_parser(), [])
    return found


def _covered() -> set[tuple[str, str]]:
    """What the rows exercise: each command on their path, and each option they give."""
    commands = {path for path, option in _flags() if not option}
    covered = set()
    for argv, _, _ in ROWS:
        words = argv.split()
        path: list[str] = []
        while words and " ".join(path + words[:1]) in commands:
            path.append(words.pop(0))
            covered.add((" ".join(path), ""))
        covered.update((" ".join(path), w) for w in words if w.startswith("-"))
    return covered


def test_every_flag_has_a_row():
    """Each command and each of its flags appears in a bad invocation above."""
    missing = sorted(f"{path} {option}".strip() for path, option in _flags() - _covered())
    assert not missing, f"flags without a row in ROWS: {', '.join(missing)}"
