"""What every script's main() shares: the ``lora`` logger, user errors (printed without a
traceback), Ctrl-C with a note of what was saved, the ``run_main`` wrapper, numbers in words
(bytes, seconds), and "next step" hints written for the folder the user runs from
(``script_command``, ``shown_path``, ``shown_model``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import reprlib
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("lora")


class UserError(Exception):
    """A problem the user can fix (missing file, wrong path, bad data). Printed without a
    traceback."""


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not the stream of the first
    setup_logging() call: a caller that swaps sys.stderr (a test's capture, the web UI's run
    output) and closes the old one never leaves the "lora" logger writing to a closed file."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def setup_logging(level=logging.INFO) -> None:
    if not log.handlers:
        h = _CurrentStderr()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the running part had saved at that moment (``note``)."""

    def __init__(self, note: str = ""):
        super().__init__(note)
        self.note = note


@contextlib.contextmanager
def on_interrupt(note: Callable[[], str]):
    """While the block runs, Ctrl-C ends the script with ``note()`` (evaluated when it happens)
    after "interrupted:"."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        try:
            text = note()
        except Exception as e:  # the note must never hide the interrupt itself; say that it failed
            text = f"(could not say what was saved: {type(e).__name__}: {e})"
        raise Interrupted(text) from None


def interrupt_message(e: BaseException) -> str:
    note = getattr(e, "note", "")
    return f"interrupted: {note}" if note else "interrupted"


def run_main(main: Callable[[list[str] | None], int], argv=None) -> int:
    """Run a script's main(argv); turn user errors into one clear message and exit code 2 (a full
    disk too, as a message naming the file; Ctrl-C: exit code 130 and what was saved)."""
    setup_logging()
    try:
        return main(argv)
    except UserError as e:  # ConfigError (lora.config) is a UserError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a fault of the machine (full disk, read-only, no permission): a message
        message = fault_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # (an Interrupted says what was saved and how to continue)
        print(interrupt_message(e), file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------
# "Next step" hints: commands that work from the folder the user runs in
# --------------------------------------------------------------------------------------------
SCRIPTS_DIR = Path(__file__).resolve().parent.parent  # lora/: the scripts a hint names


def script_command(script: str) -> str:
    """How to run lora/<script> from the current folder: ``python train_lora.py`` inside lora/ (the
    user's plan), ``python lora/train_lora.py`` in the folder above it, else its full path."""
    here = Path.cwd().resolve()
    if here == SCRIPTS_DIR:
        return f"python {script}"
    if here == SCRIPTS_DIR.parent:
        return f"python lora/{script}"
    return f"python {shlex.quote(str(SCRIPTS_DIR / script))}"


def shown_path(path: str | os.PathLike) -> str:
    """A path as the user types it from the current folder: relative where it lies in it or beside
    it (``../data`` from lora/), else absolute; quoted for the shell where needed."""
    p = Path(path).expanduser().absolute()
    try:
        rel = os.path.relpath(p, Path.cwd())
    except ValueError:  # (another drive, on Windows)
        rel = str(p)
    parts = Path(rel).parts
    shown = str(p) if os.path.isabs(rel) or parts[:2] == ("..", "..") else rel
    return shlex.quote(shown)


def shown_model(model_path: str) -> str:
    """--model_path as the user types it from here: a hub id or a built-in name (tiny) as it is, a
    local folder by ``shown_path``."""
    return shown_path(model_path) if os.path.isabs(str(model_path)) else shlex.quote(str(model_path))


# --------------------------------------------------------------------------------------------
# Output folders and free space
# --------------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def disk_full_message(e: OSError, need: str = "") -> str:
    where = f" while writing {e.filename}" if e.filename else ""
    return (f"The disk is full{where} ({e.strerror}). Free some "
            f"space{f' ({need})' if need else ''} and run the same command again; what was "
            f"finished and saved is kept.")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def fault_message(e: OSError, need: str = "") -> str | None:
    """The message for a fault of the machine while reading or writing a file, naming it: a full
    disk, a read-only disk, no permission; None for any other error (a bug shows its traceback)."""
    if e.errno in DISK_FULL:
        return disk_full_message(e, need)
    if e.errno in NOT_WRITABLE and e.filename:
        return (f"Cannot write {e.filename} ({e.strerror}): the disk is read-only or you have no "
                f"permission there. Nothing else was changed. Make it writable, or choose a "
                f"folder on a writable disk (for a read-only data folder: copy it to a writable "
                f"disk, whose cache/ can then be written).")
    return None


def clip_text(value, limit: int = 200) -> str:
    """``value`` as text cut to ``limit`` characters for a message (with how long it was): a value
    the user gave can be any size (a YAML alias can expand to gigabytes), a message stays short."""
    if isinstance(value, str):
        text = value
    else:
        text = _bounded_repr(value, limit + 1)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else "longer"
    return f"{text[:limit]}... ({size})"


def _bounded_repr(value, limit: int) -> str:
    """repr(value) without building more than about ``limit`` characters (a nested list that YAML
    aliases made huge is never expanded whole)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = max(20, limit)
    return r.repr(value)


def human_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def process_start_time() -> float:
    """When this process started (time.time() scale): from /proc on Linux (the interpreter's own
    start-up included, to 10 ms), else when this module was first imported."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat", encoding="ascii") as fh:
            # field 22 (starttime), after "(comm)"
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the import time is the nearest clock
        return _IMPORTED
    return min(_IMPORTED, time.time() - (uptime - start_ticks / ticks))


_IMPORTED = time.time()
