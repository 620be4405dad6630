"""`meanflow data NAME` and the IDX sets' folders: downloads from a local HTTP server on
127.0.0.1 serving small IDX files the test makes, whose checksums the test puts in
``IDX_SETS`` (the hook); no test reaches the network. Copies from a folder, refusals of
files that are not the official ones, and where training looks for the set."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from meanflow.cli import main
from meanflow.data import build_dataset
from meanflow.data.idx_sets import IDX_FILES, IDX_SETS, IdxSet, default_root, fetch_idx_set
from meanflow.data.images import ImageArray
from meanflow.errors import DataError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _idx(array: np.ndarray, magic: int) -> bytes:
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _files() -> dict[str, bytes]:
    """The four files of a tiny IDX set (6 train and 4 test images 5x5, 3 classes), gzipped."""
    rng = np.random.default_rng(0)
    raw = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        raw[f"{prefix}-images-idx3-ubyte.gz"] = _idx(rng.integers(0, 256, (n, 5, 5)), 0x803)
        raw[f"{prefix}-labels-idx1-ubyte.gz"] = _idx(np.arange(n) % 3, 0x801)
    return {name: gzip.compress(data, mtime=0) for name, data in raw.items()}


class _Server:
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes) from a thread."""

    def __init__(self, files: dict[str, bytes]) -> None:
        served = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.server.hits.append(self.path)  # type: ignore[attr-defined]
                body = served.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.hits = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits  # type: ignore[attr-defined]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A set named "mnist" whose mirrors are two folders of a local server (/bad/ serves a
    corrupted train-images file, /good/ the right one), with the files' checksums; and
    MEANFLOW_DATA pointed into tmp_path."""
    files = _files()
    served = {f"/good/{k}": v for k, v in files.items()}
    served.update({f"/bad/{k}": v for k, v in files.items()})
    bad = bytearray(files["train-images-idx3-ubyte.gz"])
    bad[-12] ^= 0xFF
    served["/bad/train-images-idx3-ubyte.gz"] = bytes(bad)
    server = _Server(served)
    spec = IdxSet(name="mnist", title="MNIST", mirrors=(f"{server.url}/good/",),
                  gz_sha256={k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
                  raw_sha256={k: hashlib.sha256(gzip.decompress(v)).hexdigest()
                              for k, v in files.items()})
    monkeypatch.setitem(IDX_SETS, "mnist", spec)
    monkeypatch.setenv("MEANFLOW_DATA", str(tmp_path / "home"))
    yield {"server": server, "files": files, "spec": spec}
    server.close()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_then_train_reads_the_default_folder(tiny, capsys):
    assert main(["data", "mnist"]) == 0
    folder = default_root("mnist")
    assert _names(folder) == sorted(IDX_FILES)
    for name, data in tiny["files"].items():
        assert (folder / name).read_bytes() == data
    assert "downloaded from http://127.0.0.1" in capsys.readouterr().out
    data = build_dataset("mnist")                 # no root: the folder `meanflow data` filled
    assert len(data) == 6 and data.shape == (1, 5, 5) and data.num_classes == 3
    assert len(ImageArray.mnist(split="test")) == 4
    hits = len(tiny["server"].hits)
    assert main(["data", "mnist"]) == 0          # all there: nothing downloaded again
    assert len(tiny["server"].hits) == hits
    assert capsys.readouterr().out.count("already there") == 4


def test_corrupted_download_is_refused_and_leaves_nothing(tiny, monkeypatch, tmp_path, capsys):
    bad = IdxSet(**{**tiny["spec"].__dict__, "mirrors": (f"{tiny['server'].url}/bad/",)})
    monkeypatch.setitem(IDX_SETS, "mnist", bad)
    out = tmp_path / "mn"
    assert main(["data", "mnist", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256" in err[0] and "nothing of it was kept" in err[0]
    assert "--from DIR" in err[0]
    # the three good files are kept (a rerun resumes); nothing of the bad one, no temporaries
    assert _names(out) == sorted(f for f in IDX_FILES if f != "train-images-idx3-ubyte.gz")
    # a second mirror with the right file is tried after the corrupted one
    both = IdxSet(**{**bad.__dict__, "mirrors": (*bad.mirrors, *tiny["spec"].mirrors)})
    monkeypatch.setitem(IDX_SETS, "mnist", both)
    assert main(["data", "mnist", "--out", str(out)]) == 0
    assert _names(out) == sorted(IDX_FILES)


def test_failed_first_download_leaves_no_folder(tiny, monkeypatch, tmp_path, capsys):
    gone = IdxSet(**{**tiny["spec"].__dict__, "mirrors": (f"{tiny['server'].url}/none/",)})
    monkeypatch.setitem(IDX_SETS, "mnist", gone)
    assert main(["data", "mnist", "--out", str(tmp_path / "new")]) == 2
    assert "404" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_copy_from_a_folder_takes_recompressed_official_content(tiny, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in tiny["files"].items():   # same content, other gzip bytes (as Debian's)
        (src / name).write_bytes(gzip.compress(gzip.decompress(data), mtime=1234567))
    out = fetch_idx_set("mnist", tmp_path / "out", src)
    assert _names(out) == sorted(IDX_FILES) and tiny["server"].hits == []
    assert len(ImageArray.mnist(root=out)) == 6


def test_copy_refuses_files_that_are_not_official(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in tiny["files"].items():
        (src / name).write_bytes(data)
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not the images"))
    out = tmp_path / "out"
    assert main(["data", "mnist", "--out", str(out), "--from", str(src)]) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte.gz is not MNIST's official" in err and err.count("\n") == 1
    assert "t10k-images-idx3-ubyte.gz" not in _names(out)
    (src / "t10k-images-idx3-ubyte.gz").unlink()
    assert main(["data", "mnist", "--out", str(out), "--from", str(src)]) == 2
    assert "lacks t10k-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_a_users_file_in_the_way_is_never_replaced(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-images-idx3-ubyte.gz").write_bytes(b"mine")
    assert main(["data", "mnist", "--out", str(out)]) == 2
    assert "exists and is not MNIST's official" in capsys.readouterr().err
    assert (out / "train-images-idx3-ubyte.gz").read_bytes() == b"mine"


def test_missing_set_names_files_command_and_option(tiny, tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset("mnist", split="test")
    text = str(info.value)
    for part in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                 "`meanflow data mnist`", "data.options.root=DIR", str(tmp_path / "home")):
        assert part in text
    assert "\n" not in text and "pass root=" not in text


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_debian_copies_hold_the_official_content():
    """The package's files are recompressed (their .gz digests differ from the official
    ones), but their content has the official digests, so `meanflow data` accepts them."""
    spec = IDX_SETS["fashion-mnist"]
    for name in IDX_FILES:
        path = DEBIAN / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() != spec.gz_sha256[name]
        with gzip.open(path) as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == spec.raw_sha256[name]
