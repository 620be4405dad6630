"""Atomic writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import pytest

from meanflow.errors import ConfigError
from meanflow.fileio import (OWNER_MARK, atomic_path, atomic_write_text, claim_folder,
                             file_sha256, folder_owner, new_folder, refuse_existing)


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "out.npz"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".npz"  # writers infer the format
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_successful_write_replaces_and_hashes(tmp_path):
    dest = tmp_path / "sub" / "a.txt"
    atomic_write_text(dest, "hello\n")
    assert dest.read_text() == "hello\n"
    assert file_sha256(dest) == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_a_second_writer_is_refused_in_one_line_and_the_lock_dies_with_its_holder(tmp_path):
    """exclusive(): another process asking for the same folder gets a ConfigError naming the
    holder; after the holder is killed (-9) the lock is free again: flock dies with it."""
    import signal
    import subprocess
    import sys

    from meanflow.errors import ConfigError
    from meanflow.fileio import exclusive, lock_path

    code = ("import sys, time\nfrom meanflow.fileio import exclusive\n"
            "with exclusive(sys.argv[1], 'meanflow train'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by process {holder.pid} \(meanflow "
                           r"train\): wait for it"):
            with exclusive(tmp_path, "meanflow sample"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(tmp_path, "meanflow train --resume") as lock:
        assert lock == lock_path(tmp_path) == tmp_path / ".meanflow.lock"
        assert lock.read_text().startswith(f"{__import__('os').getpid()} meanflow train")
    # a file's lock sits beside it, and the file need not exist
    out = tmp_path / "samples.npz"
    with exclusive(out, "meanflow sample"):
        assert lock_path(out) == tmp_path / ".samples.npz.lock"
        assert not out.exists()


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    from meanflow.fileio import (atomic_path, is_temporary, remove_stale_temporaries,
                                 temporary_dir)

    keep = ["a.npz", ".hidden", "x.tmp", ".a.npz.tmp", "notes.txt", "step_0000010.bak"]
    for name in keep:
        (tmp_path / name).write_text("user")
    # what a killed writer leaves: a temporary file of atomic_path, a temporary folder
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "a.npz") as tmp:
            stale_file = tmp.name
            raise KeyboardInterrupt
    assert not (tmp_path / stale_file).exists()    # atomic_path cleans up after itself ...
    (tmp_path / stale_file).write_text("partial")  # ... a kill -9 does not
    stale_dir = temporary_dir(tmp_path / "step_0000020")
    (stale_dir / "model.safetensors").write_bytes(b"partial")
    assert is_temporary(stale_file) and is_temporary(stale_dir.name)
    assert not any(is_temporary(n) for n in keep)
    # only the named destinations' temporaries when asked
    assert remove_stale_temporaries(tmp_path, dests=("b.npz",)) == []
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_folder_is_claimed_by_one_command_and_foreign_files_are_refused(tmp_path):
    """claim_folder: a new folder is made and marked; the same command reuses it; another
    command, or files without a marker, are refused in one line naming the folder; a folder
    the legacy test recognises is marked; write=False makes nothing."""
    out = tmp_path / "demo"
    claim_folder(out, "meanflow demo", write=False)
    assert not out.exists()
    claim_folder(out, "meanflow demo")
    assert folder_owner(out) == "meanflow demo"
    (out / "figure.png").write_bytes(b"ours")
    claim_folder(out, "meanflow demo")                     # reused by the same command
    with pytest.raises(ConfigError, match="made by `meanflow demo`, not `meanflow x`"):
        claim_folder(out, "meanflow x")

    user = tmp_path / "user"
    user.mkdir()
    (user / "figure.png").write_bytes(b"mine")
    (user / ".figure.png.abc123.tmp.png").write_bytes(b"a temporary of ours")
    with pytest.raises(ConfigError, match=r"user holds files that are not `meanflow demo`'s "
                       r"\(figure.png\): choose a new or empty folder"):
        claim_folder(user, "meanflow demo")
    assert not (user / OWNER_MARK).exists() and (user / "figure.png").read_bytes() == b"mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".meanflow.lock").write_text("")              # our lock alone: still empty
    claim_folder(empty, "meanflow prepare-latents")
    assert folder_owner(empty) == "meanflow prepare-latents"

    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text("{}")
    claim_folder(old, "meanflow prepare-latents", lambda f: (f / "index.json").is_file())
    assert folder_owner(old) == "meanflow prepare-latents"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        claim_folder(tmp_path / "file", "meanflow demo")


def test_an_existing_output_file_needs_overwrite(tmp_path):
    mine = tmp_path / "s.npz"
    refuse_existing(mine)                                   # absent: fine
    mine.write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"s.npz exists: choose another file, or pass "
                       r"--overwrite to replace it"):
        refuse_existing(mine)
    refuse_existing(mine, overwrite=True)
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        refuse_existing(tmp_path / "d.npz", overwrite=True)


def test_new_folder_lands_whole_or_not_at_all(tmp_path):
    """The filled folder replaces an empty OUT; an error inside, or an OUT that filled up
    meanwhile (the check runs again before the rename), leaves no temporary and OUT as it was."""
    def check(out):
        if out.exists() and any(out.iterdir()):
            raise ValueError("taken")

    out = tmp_path / "out"
    out.mkdir()
    with new_folder(out, check) as tmp:
        (tmp / "a.txt").write_text("a")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert (out / "a.txt").stat().st_mode & 0o044          # readable by others
    with pytest.raises(RuntimeError):
        with new_folder(tmp_path / "b", check) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("disk full")
    with pytest.raises(ValueError, match="taken"):
        with new_folder(out, check) as tmp:
            (tmp / "b.txt").write_text("b")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

