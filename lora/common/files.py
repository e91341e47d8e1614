"""Files and folders: atomic writes (temp file + fsync + rename, so a crash never leaves a
half-written file that looks complete), write faults named by their file (``write_guard``),
inter-process locks (``folder_lock``), free-space checks and the check of an output folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from lora.common.cli import UserError, human_bytes

# "... (os error 28)": how the Rust and C++ writers (safetensors, torch) report an OS error
_OS_ERROR = re.compile(r"os error (\d+)")
# free space below which a writer's failure without an errno is taken for a full disk
NEARLY_FULL = 4 * 2 ** 20


@contextlib.contextmanager
def write_guard(path: str | os.PathLike):
    """While writing ``path``: a fault of the machine raised by any writer becomes an OSError that
    names ``path`` with its errno, so that the scripts print one message naming the file (a full
    disk, a read-only disk) instead of a traceback. Python's own writes raise OSError without the
    file's name; safetensors raises SafetensorError("... (os error 28)"); torch.save to a path raises
    RuntimeError("... unexpected pos ...") on a full disk. Anything else passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
    except Exception as e:  # (a writer's own exception type: re-raised unless it is a disk fault)
        m = _OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else None
        if code is None and type(e).__name__ in ("RuntimeError", "SafetensorError") \
                and free_bytes(path) < NEARLY_FULL:
            code = errno.ENOSPC
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def save_torch(obj, path: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """torch.save through a Python file (a full disk is then an OSError with its errno, not torch's
    "unexpected pos" RuntimeError), naming ``shown`` (default ``path``) when it fails."""
    import torch

    with write_guard(shown or path), open(path, "wb") as fh:
        torch.save(obj, fh)


def free_bytes(path: str | os.PathLike) -> int:
    """Free space of the disk that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, need_bytes: float, what: str) -> None:
    """UserError when the disk of ``path`` has less than ``need_bytes`` free (``what`` says what
    needs it)."""
    free = free_bytes(path)
    if free < need_bytes:
        raise UserError(f"Not enough free disk space in {path}: {what} needs about "
                        f"{human_bytes(need_bytes)}, {human_bytes(free)} are free. Free some "
                        f"space, or choose an output folder on another disk.")


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """The folder a script will write into, checked once before any work: no file in the way, and
    the folder (or, while it does not exist, the nearest existing folder above it) writable.
    UserError naming the path and ``flag`` otherwise. Nothing is created or changed (a probe file is
    made and removed at once)."""
    p = Path(path)
    existing = next(q for q in [p, *p.parents] if q.exists() or q == q.parent)
    if not existing.is_dir():
        raise UserError(f"{flag} {p}: {existing} is a file, not a folder. Choose another {flag}.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == p else f" (it would be made in {existing})"
        raise UserError(f"{flag} {p} is not writable{where}: {e.strerror} (a read-only disk, or no "
                        f"permission). Choose a folder you can write to.") from None
    return p


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive inter-process lock on ``path`` (fcntl; a no-op where fcntl does not exist)."""
    try:
        import fcntl
    # Windows: callers only use it to avoid doing work twice (atomic renames keep it safe)
    except ImportError:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class FolderBusy(UserError):
    """Another process holds the lock of a folder (``folder_lock``)."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str | None, *, shared: bool, busy: str):
    """Hold a lock while the block runs: exclusive (one writer, no reader) or ``shared`` (any
    number of readers, no writer). Another process holding it the other way stops this one at once
    with FolderBusy(``busy`` + who holds it, where known). An OS file lock (fcntl.flock): the kernel
    drops it when a process ends in any way, so a killed run never leaves a folder locked.

    ``name``: the lock file ``folder/name`` (an exclusive holder writes its pid and host there);
    None: the folder itself is locked, and nothing is written into it (a folder that does not exist
    yet holds nothing to protect: no lock). Where the lock file cannot be made (a read-only folder:
    no writer can run there either) or fcntl does not exist (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:  # (not on Windows: there the runs are not kept apart)
        yield
        return
    fd, fh = None, None
    try:
        if name is None:
            fd = os.open(folder, os.O_RDONLY)
        else:
            path = Path(folder) / name
            fh = open(path, "r" if shared and path.is_file() else "a+", encoding="utf-8")
            fd = fh.fileno()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR):
            raise
    if fd is None:
        yield
        return
    locked = False
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            if fh is not None:
                fh.seek(0)
                holder = fh.read().strip()[:300]
            raise FolderBusy(busy + (f" (held by {holder})" if holder else "")) from None
        locked = True
        if fh is not None and not shared:  # who holds it (a shared holder cannot: maybe several)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
            fh.flush()
        yield
    finally:
        if fh is not None:
            if locked and not shared:
                fh.truncate(0)
            fh.close()  # closing the file releases the lock
        else:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary file in the same folder, fsync, then rename over the target.
# A crash leaves either the old file or none, never a half-written one.
# --------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or (path.suffix + ".tmp"),
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        with write_guard(path):
            yield tmp
            fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to the disk (so a power loss cannot leave it truncated after a
    rename)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to the disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # (file systems that cannot sync a folder)
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` as a whole, its
    files with the usual permissions (what the umask gives any new file). Durable: every file in it
    and the folder itself are flushed to the disk before the rename, and the parent after it, so once
    this returns the folder survives a power loss whole (or, before, the old one stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with write_guard(path):
            yield tmp
            usual = 0o666 & ~_umask()
            for root, _, files in os.walk(tmp):
                for name in files:
                    f = Path(root) / name
                    mode = f.stat().st_mode & 0o7777
                    if mode & usual != usual:  # (a writer that made it owner-only, e.g. with mkstemp)
                        os.chmod(f, mode | usual)
                    fsync_file(f)
                fsync_dir(root)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
