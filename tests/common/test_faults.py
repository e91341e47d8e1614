"""Faults of the machine are messages naming the file (lora.common.files.write_guard: whatever the
writer, torch, safetensors or Python, a full or read-only disk becomes an OSError naming the file,
which the scripts print as one message): a full disk while a checkpoint saves its optimizer and
while the token cache is written, and a data folder on a read-only disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from lora.common import cli
from lora.common import files as common_files
from lora.common.cli import run_main


def _dev_full() -> bool:
    """/dev/full is the kernel's always-full device (a character device: writes fail with ENOSPC)."""
    return os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)


def _full_checkpoint_file(monkeypatch, name: str) -> None:
    """The temporary folder of every checkpoint (lora.common.files.atomic_dir in checkpoints/; not
    the training samples' samples/step-N) writes its ``name`` into /dev/full, whose writes fail with
    ENOSPC as a full disk's do."""
    mkdtemp = tempfile.mkdtemp

    def full_dir(*a, prefix="", **kw):
        d = mkdtemp(*a, prefix=prefix, **kw)
        if prefix.startswith(".step-") and Path(kw.get("dir") or "").name == "checkpoints":
            os.symlink("/dev/full", Path(d) / name)
        return d

    monkeypatch.setattr(common_files.tempfile, "mkdtemp", full_dir)


@contextlib.contextmanager
def _full_cache(data: Path, monkeypatch):
    """data/cache on a disk with no space left: a full tmpfs as root; elsewhere safetensors raises
    what it raises on a full disk (its message, seen on a full tmpfs)."""
    cache = data / "cache"
    cache.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)],
                                            capture_output=True).returncode == 0:
        try:
            with contextlib.suppress(OSError), open(cache / "filler", "wb", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * 4096)
            yield
        finally:
            subprocess.run(["umount", str(cache)], check=True)
        return
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    yield


def _train(tiny, data, out, *extra):
    return ["--model_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--mixed_precision", "no", "--max_duration", "1", *extra]


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """run_main adds a handler on the stderr of the test that first ran it; here each test starts
    without, so the messages go to this test's captured stderr."""
    saved = cli.log.handlers[:]
    cli.log.handlers.clear()
    yield
    cli.log.handlers[:] = saved


@pytest.fixture
def data(tmp_path, example_data_dir):
    d = tmp_path / "data"
    shutil.copytree(example_data_dir, d, ignore=shutil.ignore_patterns("cache"))
    return d


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_a_full_disk_while_saving_the_optimizer_is_a_message_naming_the_file(tmp_path, monkeypatch, capsys,
                                                                             tiny_model_dir, data):
    from lora import train_lora

    if not _dev_full():
        pytest.skip("no /dev/full device here")
    _full_checkpoint_file(monkeypatch, "optimizer.pt")
    rc = run_main(train_lora.main, _train(tiny_model_dir, data, tmp_path / "out"))
    err = capsys.readouterr().err
    named = tmp_path / "out" / "checkpoints" / "step-000001" / "optimizer.pt"
    assert rc == 2, err[-2000:]
    assert f"The disk is full while writing {named}" in err and "Traceback" not in err, err[-2000:]
    assert not named.parent.exists()  # no half-written checkpoint that looks whole


def test_a_full_disk_while_writing_the_token_cache_is_a_message_naming_the_file(tmp_path, monkeypatch,
                                                                                capsys, tiny_model_dir,
                                                                                data):
    from lora import train_lora

    with _full_cache(data, monkeypatch):
        rc = run_main(train_lora.main, _train(tiny_model_dir, data, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"The disk is full while writing {data / 'cache'}" in err and "Traceback" not in err, err[-2000:]


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` on a read-only disk (a read-only bind mount as root; else no write permission)."""
    mounted = False
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
        mounted = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)],
                                        capture_output=True).returncode == 0
        if ok and not mounted:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        for root, dirs, names in os.walk(folder):
            for n in [*dirs, *names, "."]:
                os.chmod(Path(root) / n, 0o555 if n in (*dirs, ".") else 0o444)
    try:
        probe = folder / ".probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("cannot make a read-only folder here (root without mount permission)")
        except OSError:
            pass
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        elif os.geteuid() != 0:
            for root, _, _ in os.walk(folder):
                os.chmod(root, 0o755)


def test_a_read_only_data_folder_is_a_message_naming_the_cache(tmp_path, capsys, tiny_model_dir, data):
    from lora import train_lora

    with _read_only(data):
        rc = run_main(train_lora.main, _train(tiny_model_dir, data, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"Cannot write {data / 'cache'}" in err and "read-only" in err, err[-2000:]
    assert "Traceback" not in err
