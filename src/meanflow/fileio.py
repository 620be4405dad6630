"""Writing files so that a crash never leaves a half-written one, one writer at a time, and
hashing them.

Every output file of the package (configs, metrics, checkpoints' records, sample arrays and
PNGs, feature statistics, classifier weights) goes through :func:`atomic_path`: the content is
written to a temporary file beside the destination, flushed to disk, then renamed into place.
Temporaries are named ``.<destination>.<random>.tmp<suffix>`` (files) and
``.<destination>.tmp-<random>`` (folders), so :func:`remove_stale_temporaries` can find the
ones a killed process left, and only those.

:func:`exclusive` is the advisory lock that gives a run folder or an output file one writer.

Nothing is replaced that meanflow did not write (docs/design.md, "What meanflow may
overwrite"): :func:`claim_folder` gives a folder that a command fills (``demo --out``,
``prepare-latents OUT_DIR``) a marker naming that command, and reuses a folder only when it
carries the same command's marker; :func:`refuse_existing` refuses an output file that exists
unless the user said ``--overwrite``. The refusals are one line naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from meanflow.errors import ConfigError

try:
    import fcntl
except ImportError:          # Windows: the lock falls back to a PID file
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_path", "atomic_write_text", "file_sha256", "exclusive", "lock_path",
           "remove_stale_temporaries", "is_temporary", "temporary_dir", "claim_folder",
           "folder_owner", "refuse_existing", "OWNER_MARK", "new_folder"]

#: Names of our temporaries: ``.<name>.<random>.tmp<suffix>`` and ``.<name>.tmp-<random>``.
_TEMP_FILE = re.compile(r"^\.(?P<dest>.+)\.[A-Za-z0-9_]{6,}\.tmp(\.[A-Za-z0-9]+)?$")
_TEMP_DIR = re.compile(r"^\.(?P<dest>.+)\.tmp-[A-Za-z0-9_]{6,}$")
#: The lock file of a folder (inside it) and of a file (beside it).
FOLDER_LOCK = ".meanflow.lock"
#: The marker of a folder a command made: one line, the command (e.g. "meanflow demo").
OWNER_MARK = ".meanflow-owner"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (same suffix, so writers that infer the format
    from it, like ``np.savez`` or matplotlib, behave); on success it is synced and renamed to
    ``path``, on failure removed. The file gets the permissions ``open()`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_dir(dest: str | os.PathLike[str]) -> Path:
    """A new empty folder beside ``dest``, named as :func:`remove_stale_temporaries` expects;
    fill it, then rename it onto ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))


@contextlib.contextmanager
def new_folder(out: str | os.PathLike[str],
               check: Callable[[Path], None]) -> Iterator[Path]:
    """Yields a temporary folder beside ``out`` to fill; on success its modes become those
    ``mkdir`` and ``open`` would give (it is made 0700; the folder is for others to read),
    ``check(out)`` runs once more (``out`` still new, or an empty folder, which is replaced)
    and the folder is renamed onto ``out``, so ``out`` is whole or absent. On any error the
    temporary folder is removed."""
    out = Path(out)
    tmp = temporary_dir(out)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        check(out)
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of our temporaries."""
    return bool(_TEMP_FILE.match(name) or _TEMP_DIR.match(name))


def remove_stale_temporaries(folder: str | os.PathLike[str],
                             dests: tuple[str, ...] | None = None) -> list[str]:
    """Removes the temporaries a killed writer left in ``folder`` and returns their names.

    Only names of our own making are touched (:func:`is_temporary`), and with ``dests`` only
    those of these destination names. Call it while holding :func:`exclusive` on what the
    temporaries belong to: then no live writer can own them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMP_FILE.match(entry.name) or _TEMP_DIR.match(entry.name)
        if not match or (dests is not None and match["dest"] not in dests):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``<folder>/.meanflow.lock`` for a folder, else
    ``.<name>.lock`` beside the file (which need not exist yet)."""
    target = Path(target)
    return target / FOLDER_LOCK if target.is_dir() else target.with_name(f".{target.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> tuple[int | None, str]:
    try:
        text = lock.read_text(errors="replace").strip()
    except OSError:
        return None, ""
    pid, _, what = text.partition(" ")
    return (int(pid) if pid.isdigit() else None), what[:80]


@contextlib.contextmanager
def exclusive(target: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Holds an advisory lock on ``target`` (a run folder or an output file) while the block
    runs; another ``meanflow`` process that asks for it meanwhile gets a ConfigError naming
    this one (PID and ``what``, e.g. "meanflow train").

    The lock is ``flock`` on :func:`lock_path`, so the kernel releases it on any exit, kill -9
    included; the file itself stays (deleting it would let two writers lock two files). Where
    the filesystem has no ``flock``, a PID file is used instead, and a lock whose PID is no
    longer alive is stale and taken over.
    """
    target = Path(target)
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                pid, holder = _holder(lock)
                who = f"process {pid} ({holder})" if pid else "another process"
                raise ConfigError(f"{target} is in use by {who}: wait for it to finish or stop "
                                  "it, then run this again") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                locked = False
        else:
            locked = False
        if not locked:        # no flock here: a PID file, stale when its process is gone
            pid, holder = _holder(lock)
            if pid not in (None, os.getpid()) and _pid_alive(pid):
                raise ConfigError(f"{target} is in use by process {pid} ({holder}): wait for "
                                  "it to finish or stop it, then run this again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        try:
            yield lock
        finally:
            if not locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def folder_owner(folder: str | os.PathLike[str]) -> str | None:
    """The command whose marker (:data:`OWNER_MARK`) ``folder`` carries, or None."""
    try:
        text = (Path(folder) / OWNER_MARK).read_text(errors="replace")
    except OSError:
        return None
    return text.strip().splitlines()[0][:80] if text.strip() else None


def _ours(name: str) -> bool:
    """Names meanflow leaves in any folder it writes: its marker, locks and temporaries."""
    return name in (OWNER_MARK, FOLDER_LOCK) or is_temporary(name) or (
        name.startswith(".") and name.endswith(".lock"))


def claim_folder(folder: str | os.PathLike[str], command: str,
                 legacy: Callable[[Path], bool] | None = None, *, write: bool = True) -> Path:
    """Makes ``folder`` the output of ``command`` (e.g. "meanflow demo"), or checks that it is.

    A folder that is missing or empty (but for our locks and temporaries) is made and marked
    with :data:`OWNER_MARK`; one marked by ``command`` is reused; anything else is refused
    with a one-line ConfigError naming the folder and the fix: one marked by another command,
    and one holding files without a marker, unless ``legacy(folder)`` recognises it as
    ``command``'s output made before markers existed (it is then marked). With
    ``write=False`` nothing is made or marked: only the check (for ``--dry-run`` and for
    checks before any work starts)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder: choose a folder for the output")
    owner = folder_owner(folder)
    if owner is not None and owner != command:
        raise ConfigError(f"{folder} was made by `{owner}`, not `{command}`: choose another "
                          "folder")
    if owner is None and folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if not _ours(p.name))
        if others and not (legacy is not None and legacy(folder)):
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(f"{folder} holds files that are not `{command}`'s ({shown}): "
                              "choose a new or empty folder")
    if write and owner is None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / OWNER_MARK, command + "\n")
    return folder


def refuse_existing(path: str | os.PathLike[str] | None, overwrite: bool = False,
                    flag: str = "--overwrite") -> None:
    """A one-line ConfigError if the output file ``path`` exists and the user did not say
    ``flag`` (replace it); a folder in its place is refused even then."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a file name for the output")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: choose another file, or pass {flag} to replace it")
