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
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("lora")


class UserError(Exception):
    """A problem the user can fix (missing file, wrong path, bad data). Printed without a
    traceback."""


def setup_logging(level=logging.INFO) -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {disk_full_message(e)}", file=sys.stderr)
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
