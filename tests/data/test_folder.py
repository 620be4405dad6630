"""Image folders: layout (labels from class sub-folders), channels, ADM centre crop, errors,
and the hook in build_dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.data import BatchSource, ImageArray, build_dataset
from meanflow.data import folder as folder_mod
from meanflow.data.folder import FolderImages, adm_center_crop, load_image_folder
from meanflow.errors import ConfigError, DataError

Image = pytest.importorskip("PIL.Image")


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def grey(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def save(path: Path, pixels: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode)
    image.save(path, **kw)
    return path


def test_unlabelled_folder_round_trips_png_pixels(tmp_path):
    a, b = rgb(5, 7, 0), rgb(5, 7, 1)
    save(tmp_path / "b.png", b)
    save(tmp_path / "a.PNG", a)                          # suffix case does not matter
    (tmp_path / "notes.txt").write_text("not an image")
    save(tmp_path / ".hidden.png", rgb(5, 7, 2))          # hidden: skipped
    (tmp_path / "empty").mkdir()                          # no images: not a class
    data = load_image_folder(tmp_path)
    assert isinstance(data, ImageArray) and isinstance(data, BatchSource)
    assert isinstance(data, FolderImages)
    assert data.shape == (3, 5, 7) and len(data) == 2
    assert data.labels is None and data.class_names is None and data.num_classes is None
    assert data.files == ("a.PNG", "b.png")
    assert torch.equal(data.images[0], torch.from_numpy(a).permute(2, 0, 1))
    assert torch.equal(data.images[1], torch.from_numpy(b).permute(2, 0, 1))
    x, y = data.batch(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 5, 7) and y is None and x.min() >= -1 and x.max() <= 1


def test_class_subfolders_become_sorted_labels(tmp_path):
    save(tmp_path / "zebra" / "1.png", grey(4, 4, 0))
    save(tmp_path / "cat" / "deep" / "er" / "2.jpeg", grey(4, 4, 1))
    save(tmp_path / "cat" / "1.png", grey(4, 4, 2))
    save(tmp_path / "dog" / "x.JPG", grey(4, 4, 3))
    (tmp_path / "logs").mkdir()                           # no images: ignored
    (tmp_path / ".cache").mkdir()
    save(tmp_path / ".cache" / "junk.png", grey(4, 4, 4))  # hidden folder: skipped
    data = load_image_folder(tmp_path)
    assert data.class_names == ("cat", "dog", "zebra") and data.num_classes == 3
    assert data.files == ("cat/1.png", "cat/deep/er/2.jpeg", "dog/x.JPG", "zebra/1.png")
    assert data.labels.tolist() == [0, 0, 1, 2]
    assert data.shape == (1, 4, 4)
    assert torch.equal(data.images[0, 0], torch.from_numpy(grey(4, 4, 2)))
    _, y = data.batch(32, torch.Generator().manual_seed(1))
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}


def test_channels_inferred_and_forced(tmp_path):
    g, c = grey(6, 6, 0), rgb(6, 6, 1)
    save(tmp_path / "grey" / "a.png", g)
    save(tmp_path / "grey" / "b.png", grey(6, 6, 2))
    assert load_image_folder(tmp_path / "grey").shape == (1, 6, 6)
    forced = load_image_folder(tmp_path / "grey", channels=3)
    assert forced.shape == (3, 6, 6)
    assert torch.equal(forced.images[0], torch.from_numpy(g)[None].expand(3, 6, 6))

    save(tmp_path / "mixed" / "a.png", g)                  # grey first, then colour
    save(tmp_path / "mixed" / "b.png", c)
    mixed = load_image_folder(tmp_path / "mixed")
    assert mixed.shape == (3, 6, 6)
    assert torch.equal(mixed.images[0], torch.from_numpy(g)[None].expand(3, 6, 6))
    assert torch.equal(mixed.images[1], torch.from_numpy(c).permute(2, 0, 1))

    luma = load_image_folder(tmp_path / "mixed", channels=1)
    assert luma.shape == (1, 6, 6)
    want = np.array(Image.fromarray(c).convert("L"))
    assert torch.equal(luma.images[1, 0], torch.from_numpy(want))
    assert torch.equal(luma.images[0, 0], torch.from_numpy(g))


def test_rgba_palette_and_16_bit_images(tmp_path):
    rgba = np.concatenate([rgb(4, 4, 0), np.full((4, 4, 1), 7, np.uint8)], axis=2)
    save(tmp_path / "a.png", rgba, "RGBA")
    pal = Image.fromarray(rgb(4, 4, 1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "b.png")
    data = load_image_folder(tmp_path)
    assert data.shape == (3, 4, 4)
    assert torch.equal(data.images[0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    assert torch.equal(data.images[1], torch.from_numpy(np.array(pal.convert("RGB")))
                       .permute(2, 0, 1))

    wide = np.array([[0, 257, 65535], [32896, 1000, 65278]], dtype=np.uint16)
    save(tmp_path / "sixteen" / "a.png", wide)
    data = load_image_folder(tmp_path / "sixteen")
    assert data.shape == (1, 2, 3)
    assert data.images[0, 0].tolist() == [[0, 1, 255], [128, 4, 254]]


def test_jpeg_is_read(tmp_path):
    pixels = np.full((8, 8, 3), (200, 40, 90), np.uint8)
    save(tmp_path / "a.jpg", pixels, quality=95)
    data = load_image_folder(tmp_path)
    assert data.shape == (3, 8, 8)
    assert (data.images.int() - torch.tensor([200, 40, 90])[:, None, None]).abs().max() <= 3


def test_adm_center_crop_follows_the_recipe(tmp_path):
    """100x60 to 16: halve once (50x30; 30 < 32 stops), bicubic to 27x16, crop columns 5..20."""
    pixels = rgb(60, 100, 3)
    image = Image.fromarray(pixels)
    out = adm_center_crop(image, 16)
    assert out.size == (16, 16)
    manual = image.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(manual)[:, 5:21])
    # an upscale: a 10x12 image to 16 is only resized (no halving) and cropped vertically
    small = Image.fromarray(rgb(12, 10, 4))
    up = adm_center_crop(small, 16)
    manual = small.resize((16, 19), Image.BICUBIC)
    assert np.array_equal(np.asarray(up), np.asarray(manual)[1:17])


def test_adm_center_crop_keeps_the_centre(tmp_path):
    """Left half black, right half white, wide image: the crop's boundary stays central; a
    tall image keeps its central rows."""
    wide = np.zeros((40, 120), np.uint8)
    wide[:, 60:] = 255
    out = np.asarray(adm_center_crop(Image.fromarray(wide), 8)).astype(int)
    assert out.shape == (8, 8)
    assert (out[:, :3] < 10).all() and (out[:, 5:] > 245).all()
    tall = np.zeros((90, 30), np.uint8)
    tall[30:60] = 255
    out = np.asarray(adm_center_crop(Image.fromarray(tall), 10)).astype(int)
    assert (out > 240).all()


def test_resolution_crops_every_image_to_one_size(tmp_path):
    save(tmp_path / "a" / "1.png", rgb(40, 64, 0))
    save(tmp_path / "b" / "2.png", rgb(33, 20, 1))
    save(tmp_path / "b" / "3.png", grey(16, 16, 2))
    data = load_image_folder(tmp_path, resolution=16)
    assert data.shape == (3, 16, 16) and data.labels.tolist() == [0, 1, 1]
    want = np.array(adm_center_crop(Image.fromarray(rgb(40, 64, 0)), 16))
    assert torch.equal(data.images[0], torch.from_numpy(want).permute(2, 0, 1))
    # the grey 16x16 image is unchanged by the crop and repeated to three channels
    assert torch.equal(data.images[2], torch.from_numpy(grey(16, 16, 2))[None].expand(3, 16, 16))


def test_size_mismatch_names_two_files_and_the_fix(tmp_path):
    save(tmp_path / "a.png", rgb(4, 4, 0))
    save(tmp_path / "b.png", rgb(4, 5, 1))
    with pytest.raises(DataError, match=r"a\.png is 4x4 but .*b\.png is 5x4; pass resolution="):
        load_image_folder(tmp_path)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images found"):
        load_image_folder(tmp_path / "empty")
    bad = tmp_path / "bad"
    save(bad / "a.png", rgb(4, 4, 0))
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot read image .*b\.png .*replace or remove it"):
        load_image_folder(bad)
    truncated = tmp_path / "truncated"
    save(truncated / "a.png", rgb(32, 32, 0))
    raw = (truncated / "a.png").read_bytes()
    (truncated / "a.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*a\.png"):
        load_image_folder(truncated)
    mixed = tmp_path / "mixed"
    save(mixed / "root.png", rgb(4, 4, 0))
    save(mixed / "cls" / "a.png", rgb(4, 4, 1))
    with pytest.raises(DataError, match="both directly .*class sub-folders"):
        load_image_folder(mixed)
    for value in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="resolution="):
            load_image_folder(mixed, resolution=value)
    for value in (2, 4, 0, True, "rgb"):
        with pytest.raises(ConfigError, match="channels="):
            load_image_folder(mixed, channels=value)
    with pytest.raises(ConfigError, match="hflip"):
        load_image_folder(mixed / "cls", hflip="yes")


def test_missing_pillow_says_how_to_install(tmp_path, monkeypatch):
    save(tmp_path / "a.png", rgb(4, 4, 0))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match="pip install pillow"):
        load_image_folder(tmp_path)


def test_progress_bar_only_for_many_files(tmp_path, monkeypatch):
    import tqdm.auto

    calls = []

    class Spy(tqdm.auto.tqdm):
        def __init__(self, *args, **kw):
            calls.append(kw.get("disable"))
            super().__init__(*args, **{**kw, "disable": True})

    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    for i in range(3):
        save(tmp_path / f"{i}.png", grey(2, 2, i))
    load_image_folder(tmp_path)
    monkeypatch.setattr(folder_mod, "_PROGRESS_MIN", 2)
    load_image_folder(tmp_path)
    assert calls == [True, None]     # None: tqdm shows it on a terminal only


def test_build_dataset_takes_a_folder(tmp_path):
    save(tmp_path / "a" / "1.png", rgb(20, 30, 0))
    save(tmp_path / "b" / "1.png", rgb(24, 24, 1))
    data = build_dataset(tmp_path, resolution=8, channels=1, hflip=True)
    assert isinstance(data, FolderImages)
    assert data.shape == (1, 8, 8) and data.num_classes == 2 and data.hflip
    assert build_dataset(str(tmp_path), resolution=8).shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="does not take option.*std.*accepted options: "
                                          "resolution, channels, hflip"):
        build_dataset(tmp_path, std=0.3)
    with pytest.raises(ConfigError, match="image folder"):
        build_dataset(str(tmp_path / "nope"))
