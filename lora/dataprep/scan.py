"""Finding the user's recordings: a recursive scan of --input_dir (symlinked folders followed once,
loops and broken links reported, the output folder never scanned) and the stable clip names of a
source.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora.common.cli import log
from lora.dataprep import audio as A
from lora.dataprep.ownership import _check_foreign_audio, _inside
from lora.dataset import SPLITS


# ============================================================================================
# --input_dir: scan, caption, decode, cut, split, write
# ============================================================================================
def _slug(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")[:32]
    return s or "clip"


def clip_base(rel: str) -> str:
    """Stable clip-name prefix of a source: readable stem + hash of its relative path."""
    return f"{_slug(Path(rel).stem)}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:10]}"


@dataclass
class Scan:
    """What scan_audio found under input_dir."""

    files: list[Path] = field(default_factory=list)  # audio files, sorted by relative path
    ignored: Counter = field(default_factory=Counter)  # what was left out on purpose, counted
    # caption files read with the audio (a sidecar .txt/.json beside it, metadata.jsonl/.csv at the top)
    caption_files: int = 0
    unreadable: list[dict] = field(default_factory=list)  # {"path", "kind": folder/file, "reason"}
    # {"file", "reason"}: broken or looping symlinks
    links: list[dict] = field(default_factory=list)
    reached_output: bool = False  # met data_dir, data_dir/train or data_dir/valid (never scanned)


def _rel(input_dir: Path, p: Path) -> str:
    return p.relative_to(input_dir).as_posix()


def _list_folder(input_dir: Path, folder: Path, scan: Scan) -> list[tuple[Path, os.stat_result, bool]]:
    """(path, stat with symlinks followed, is a symlink) of the visible entries of a folder, by
    name. What cannot be listed or stat-ed is recorded in scan (unreadable, broken link, symlink
    loop), never raised."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        scan.unreadable.append({"path": _rel(input_dir, folder), "kind": "folder",
                                "reason": e.strerror or str(e)})
        return []
    out = []
    for e in entries:
        p = Path(e.path)
        if e.name.startswith("."):
            try:
                hidden_dir = e.is_dir()
            except OSError:
                hidden_dir = False
            scan.ignored["hidden or output folders" if hidden_dir else "hidden files"] += 1
            continue
        try:
            out.append((p, os.stat(p), e.is_symlink()))
        except OSError as err:
            if err.errno == errno.ENOENT and e.is_symlink():
                scan.links.append({"file": _rel(input_dir, p),
                                   "reason": f"broken symlink: it points to {os.readlink(p)}, "
                                             f"which does not exist"})
            elif err.errno == errno.ELOOP:
                scan.links.append({"file": _rel(input_dir, p),
                                   "reason": "symlink loop: the link leads back to itself"})
            elif err.errno != errno.ENOENT:  # (ENOENT: deleted while scanning)
                scan.unreadable.append({"path": _rel(input_dir, p), "kind": "file",
                                        "reason": err.strerror or str(err)})
    return out


def scan_audio(input_dir: Path, exclude: list[Path]) -> Scan:
    """Audio files under input_dir (recursive; symlinked folders are followed, each real folder
    scanned once, a link back to a folder above is a "symlink loop"), what was ignored, what could
    not be read."""
    scan = Scan()
    excl = {os.path.realpath(e) for e in exclude}
    visited = {os.path.realpath(input_dir)}
    stack = [input_dir]
    while stack:
        folder = stack.pop()
        here = os.path.realpath(folder)
        entries = _list_folder(input_dir, folder, scan)
        subdirs = []
        # the stems of this folder's audio: a .txt / .json of the same stem is its caption (captions.py)
        stems = {p.stem for p, st, _ in entries if stat.S_ISREG(st.st_mode) and A.is_audio_file(p)}
        for p, st, _link in sorted(entries, key=lambda e: e[2]):  # real folders before links to them
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(p)
                if real in excl:
                    scan.ignored["hidden or output folders"] += 1
                    scan.reached_output = True
                elif _inside(here, real):
                    scan.links.append({"file": _rel(input_dir, p),
                                       "reason": f"symlink loop: it links back to {real}, a folder "
                                                 f"above it"})
                elif real in visited:
                    scan.ignored["folders linked twice (scanned once)"] += 1
                else:
                    visited.add(real)
                    subdirs.append(p)
            elif not stat.S_ISREG(st.st_mode):
                scan.ignored["not a regular file"] += 1
            elif A.is_audio_file(p):
                scan.files.append(p)
            elif (p.suffix in (".txt", ".json") and p.stem in stems) or (
                    folder == input_dir and p.name in ("metadata.jsonl", "metadata.csv")):
                scan.caption_files += 1
            else:
                scan.ignored[p.suffix.lower() or "(no extension)"] += 1
        stack += sorted(subdirs, reverse=True)
    scan.files.sort(key=lambda p: _rel(input_dir, p))
    return scan


@dataclass
class Found:
    """The scan, and the sources of an earlier run kept because they cannot be read now ({rel:
    reason})."""

    scan: Scan
    kept: dict
    separation: dict = field(default_factory=dict)  # the separation stage's counts (vocal_removal)


def _find_sources(input_dir: Path, data_dir: Path, state: dict) -> Scan:
    """Scan input_dir for audio, never into the output folder; refuse when that folder lies in the
    input and holds audio prepare_data did not write."""
    scan = scan_audio(input_dir, [data_dir] + [data_dir / s for s in SPLITS])
    if scan.reached_output:
        _check_foreign_audio(input_dir, data_dir, state)
    for u in scan.unreadable:
        log.warning("cannot read %s %s (%s): %s", u["kind"], input_dir / u["path"], u["reason"],
                    "the files in it are not used" if u["kind"] == "folder" else "it is not used")
    log.info("found %d audio files in %s", len(scan.files), input_dir)
    return scan


def _no_audio_message(input_dir: Path, scan: Scan) -> str:
    text = (f"No audio files found in {input_dir} (looked for {', '.join(A.AUDIO_EXTENSIONS)}, "
            f"recursively). Check --input_dir.")
    if scan.unreadable:
        text += " Could not read: " + "; ".join(f"{u['path']} ({u['reason']})"
                                                for u in scan.unreadable[:10]) + "."
    return text
