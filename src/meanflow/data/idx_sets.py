"""The IDX image sets (Fashion-MNIST, MNIST): their official files and checksums, where
meanflow looks for them, and how ``meanflow data NAME`` puts them in a folder.

Each set is four gzipped IDX files (:data:`IDX_FILES`). :func:`fetch_idx_set` fills a
folder with them: copied from a given folder (``--from``), else from the Debian package's
folder where one is installed, else downloaded from the official mirrors with the standard
library. Every file is checked before it is kept: a download against the SHA-256 of the
official ``.gz`` file, a local copy against it or against the SHA-256 of the official
*decompressed* content (the Debian package ships the official content recompressed, so its
``.gz`` bytes differ). A file that fails is never kept: it is written to a temporary beside
its destination and renamed only once verified (docs/design.md, "Data sets you can fetch").

Where training looks (:func:`idx_set_folders`): ``data.options.root`` when given; else the
folder ``meanflow data`` writes by default, :func:`default_root` (``$MEANFLOW_DATA/NAME``,
``~/.cache/meanflow/data/NAME`` without the variable), then the Debian package's folder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meanflow.errors import ConfigError, DataError
from meanflow.fileio import atomic_path, file_sha256

__all__ = ["IdxSet", "IDX_SETS", "IDX_FILES", "default_root", "idx_set_folders",
           "find_idx_set", "fetch_idx_set", "missing_message"]

#: The four files of an IDX set, in the order they are fetched (small label files first).
IDX_FILES = ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz")

# Download limit per file; the largest official file (Fashion-MNIST train images) is 26.4 MB.
_MAX_BYTES = 64 << 20
_BLOCK = 1 << 20


@dataclass(frozen=True)
class IdxSet:
    """An IDX image set: where to download it and what its files must be.

    Attributes:
        name: the name ``meanflow data`` and ``--data`` take, e.g. ``"fashion-mnist"``.
        title: how messages write it, e.g. ``"Fashion-MNIST"``.
        mirrors: base URLs tried in order (each joined with a file name).
        gz_sha256: file name -> SHA-256 of the official ``.gz`` file.
        raw_sha256: file name -> SHA-256 of its decompressed content.
        system_root: where a system package installs the files, or None.
        class_names: the name of class k, where the set's authors named its classes.
    """

    name: str
    title: str
    mirrors: tuple[str, ...]
    gz_sha256: dict[str, str]
    raw_sha256: dict[str, str]
    system_root: str | None = None
    class_names: tuple[str, ...] | None = None


#: The sets ``meanflow data`` knows. The Fashion-MNIST digests are those of the files
#: published by Zalando Research (github.com/zalandoresearch/fashion-mnist; the README there
#: gives their MD5, 8d4fb7e6... for the training images, which these files have); the
#: Debian package dataset-fashion-mnist holds the same content recompressed (its
#: decompressed files have the digests of raw_sha256). The MNIST digests are those of the
#: files of the original MNIST page as its mirrors serve them.
IDX_SETS: dict[str, IdxSet] = {
    "fashion-mnist": IdxSet(
        name="fashion-mnist", title="Fashion-MNIST",
        mirrors=("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/"
                 "data/fashion/",
                 # HTTP only (an S3 website endpoint); the SHA-256 check keeps it safe
                 "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        gz_sha256={
            "train-images-idx3-ubyte.gz":
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz":
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz":
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz":
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"},
        raw_sha256={
            "train-images-idx3-ubyte.gz":
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz":
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz":
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz":
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
        system_root="/usr/share/datasets/fashion-mnist",
        # the labels' names as the Fashion-MNIST README gives them, label 0 first
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot")),
    "mnist": IdxSet(
        name="mnist", title="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        gz_sha256={
            "train-images-idx3-ubyte.gz":
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz":
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz":
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz":
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        raw_sha256={
            "train-images-idx3-ubyte.gz":
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte.gz":
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte.gz":
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte.gz":
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"}),
}


def _spec(name: str) -> IdxSet:
    if name not in IDX_SETS:
        raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(IDX_SETS)}")
    return IDX_SETS[name]


def default_root(name: str) -> Path:
    """The folder ``meanflow data NAME`` fills by default: ``$MEANFLOW_DATA/NAME``, or
    ``~/.cache/meanflow/data/NAME`` when the variable is not set."""
    base = os.environ.get("MEANFLOW_DATA") or os.path.join("~", ".cache", "meanflow", "data")
    return Path(base).expanduser() / name


def idx_set_folders(name: str) -> list[Path]:
    """Where training looks for set ``name`` without ``data.options.root``, in order."""
    spec = _spec(name)
    folders = [default_root(name)]
    if spec.system_root:
        folders.append(Path(spec.system_root))
    return folders


def missing_message(name: str, looked: list[Path], files: tuple[str, ...]) -> str:
    """The one-line error for a set not found: the files, the command, the option."""
    title = _spec(name).title
    return (f"{title} not found (looked in {', '.join(str(p) for p in looked)} for "
            f"{', '.join(files)}): run `meanflow data {name}` (downloads the official files "
            f"to {default_root(name)}, or copies them with --from DIR), or set "
            "data.options.root=DIR to a folder holding them")


def find_idx_set(name: str, root: str | os.PathLike[str] | None,
                 files: tuple[str, ...]) -> Path:
    """The folder holding ``files`` of set ``name``: ``root`` when given, else the first of
    :func:`idx_set_folders` that holds them all.

    Raises:
        DataError: naming the missing files, ``meanflow data NAME`` and ``data.options.root``.
    """
    looked = [Path(os.fspath(root)).expanduser()] if root is not None else idx_set_folders(name)
    for folder in looked:
        if all((folder / f).is_file() for f in files):
            return folder
    raise DataError(missing_message(name, looked, files))


def _raw_sha256(path: Path) -> str | None:
    """SHA-256 of the decompressed content of a gzip file, or None if it is not one."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def _is_official(spec: IdxSet, name: str, path: Path) -> bool:
    """Whether ``path`` is the official file ``name``: its bytes, or its content recompressed."""
    return file_sha256(path) == spec.gz_sha256[name] or _raw_sha256(path) == spec.raw_sha256[name]


def _download(spec: IdxSet, name: str, dest: Path, timeout: float) -> str:
    """Download ``name`` from the first mirror that gives the official file; return its URL.

    The file is streamed to a temporary beside ``dest`` while hashed, and renamed onto
    ``dest`` only when its SHA-256 is the official one; otherwise the temporary is removed.
    """
    failures = []
    for base in spec.mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            with atomic_path(dest) as tmp:
                digest = hashlib.sha256()
                size = 0
                with urllib.request.urlopen(url, timeout=timeout) as response, \
                        open(tmp, "wb") as out:
                    for block in iter(lambda: response.read(_BLOCK), b""):
                        size += len(block)
                        if size > _MAX_BYTES:
                            raise _Refused(f"more than {_MAX_BYTES >> 20} MiB")
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != spec.gz_sha256[name]:
                    raise _Refused(f"SHA-256 {digest.hexdigest()[:12]}..., expected "
                                   f"{spec.gz_sha256[name][:12]}...")
            return url
        except _Refused as exc:
            failures.append(f"{url}: {exc}")
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {' '.join(str(reason).split())}")
    raise DataError(f"could not download {spec.title}'s {name} ({'; '.join(failures)}); "
                    f"nothing of it was kept. Without a network, copy the official files "
                    f"{', '.join(IDX_FILES)} into a folder and run "
                    f"`meanflow data {spec.name} --from DIR`")


class _Refused(Exception):
    """A download that is not the official file (wrong checksum, too large)."""


def fetch_idx_set(name: str, out: str | os.PathLike[str] | None = None,
                  source: str | os.PathLike[str] | None = None, *, timeout: float = 60.0,
                  report: Callable[[str], None] | None = None) -> Path:
    """Put the four official files of set ``name`` in folder ``out`` and return it.

    Args:
        name: a key of :data:`IDX_SETS`.
        out: the folder to fill (default :func:`default_root`); files already there are
            kept when they are the official ones, and refused (never replaced) otherwise.
        source: a folder to copy the files from instead of downloading them. Without it,
            the set's system folder (the Debian package) is copied from where it holds the
            files, else the files are downloaded from the set's mirrors.
        timeout: seconds a download may wait for the server.
        report: called with one line per file (what was done).

    Raises:
        DataError: a file that is missing from ``source``, not the official one, or could
            not be downloaded from any mirror (nothing of it is kept).
        ConfigError: for an unknown name, or ``out`` a file.
    """
    spec = _spec(name)
    folder = Path(os.fspath(out)).expanduser() if out is not None else default_root(name)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder: choose a folder for {spec.title}")
    say = report or (lambda line: None)
    if source is not None:
        origin: Path | None = Path(os.fspath(source)).expanduser()
        if not origin.is_dir():
            raise DataError(f"--from {origin} is not a folder; give the folder holding "
                            f"{', '.join(IDX_FILES)}")
        absent = [f for f in IDX_FILES if not (origin / f).is_file()]
        if absent:
            raise DataError(f"{origin} lacks {', '.join(absent)}; {spec.title} needs the four "
                            f"official files {', '.join(IDX_FILES)} there")
    elif spec.system_root and all((Path(spec.system_root) / f).is_file() for f in IDX_FILES):
        origin = Path(spec.system_root)
    else:
        origin = None
    created = not folder.exists()
    try:
        for file in IDX_FILES:
            dest = folder / file
            if dest.exists():
                if dest.is_file() and _is_official(spec, file, dest):
                    say(f"{dest}: already there")
                    continue
                raise DataError(f"{dest} exists and is not {spec.title}'s official {file}; "
                                "move it away or choose another folder with --out")
            if origin is not None and origin.resolve() == folder.resolve():
                raise DataError(f"{origin} lacks a verified {file}; copy it there")
            if origin is not None:
                src = origin / file
                if not _is_official(spec, file, src):
                    raise DataError(f"{src} is not {spec.title}'s official {file} (its "
                                    "checksum differs); give the folder of the official "
                                    f"files, or run `meanflow data {name}` with a network")
                with atomic_path(dest) as tmp:
                    shutil.copyfile(src, tmp)
                say(f"{dest}: copied from {src}")
            else:
                say(f"{dest}: downloaded from {_download(spec, file, dest, timeout)}")
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()          # nothing verified: leave no empty folder behind
    return folder
