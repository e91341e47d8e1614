"""Prepare a MusicGen fine-tuning dataset: clips + captions + metadata.json.

    # the small synthetic example set (seconds)
    python lora/prepare_data.py --create_example --output_dir data
    # your own audio (any of wav flac ogg opus mp3 aiff; m4a/aac with PyAV)
    python lora/prepare_data.py --input_dir /path/to/audio --output_dir data --metadata_file metadata.json
    # check an existing data folder
    python lora/prepare_data.py --validate --data_dir data

What --input_dir does (DATA_PREPARATION.md has the details): scan the folder recursively; caption each
recording (sidecar .txt/.json, captions_file, metadata.jsonl/.csv of the HF audiofolder layout, then
default_text / caption_template); decode block by block in worker processes, resample to sample_rate, mix
to mono (or stereo), trim leading/trailing silence, cut into segment_seconds clips; split train/valid by
recording; write PCM16 WAVs into data/train and data/valid, metadata.json, prepare_report.json (every
skipped file with its reason) and prepare_state.json (lets a rerun skip work already done). Source files
are only read, never changed: input and output folders that overlap (the input is the output's train/ or
valid/, a file it writes would replace one it reads) are refused before anything is written, and so is a
damaged prepare_state.json (without --overwrite). What it changes in the audio is said: clips above
0 dBFS scaled down, a few NaN/inf samples set to 0, channels mixed. Symlinked folders are followed; what
cannot be read is reported, and a source of the last run that cannot be read now keeps its clips.

This script holds the run (settings, ownership of the output folder, scanning, the per-file worker, reuse and
checkpoints, duplicates, split, the report). Its parts live in library modules: captions.py (where a caption
comes from), example_data.py (the synthetic --create_example set) and data_check.py (the --validate check,
shared with test_dataset.py).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import re
import stat
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

from lora import audio as A
from lora.captions import Captioner
from lora.config import Config, parse_config
from lora.data_check import check_data_dir
from lora.dataset import SPLITS, ClipRecord, metadata_document, metadata_path
from lora.example_data import STYLES, write_example_clips
from lora.utils import UserError, atomic_write_json, check_free_space, check_output_dir, disk_full_message, \
    human_bytes, human_seconds, log, on_interrupt

STATE_FILE = "prepare_state.json"
REPORT_FILE = "prepare_report.json"
CONFIG_FILE = "prepare_config.yaml"
STATE_VERSION = 1
CHECKPOINT_SECONDS = 30.0  # how often an --input_dir run saves its progress (prepare_state.json)
NONFINITE_REPAIR_FRACTION = 0.001  # up to this share of NaN/inf samples is repaired (set to 0); more: damaged
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

EXAMPLES = """examples:
  python lora/prepare_data.py --create_example --output_dir data
  python lora/prepare_data.py --input_dir /path/to/audio/files --output_dir data --metadata_file metadata.json
  python lora/prepare_data.py --validate --data_dir data
  (from inside lora/: python prepare_data.py --create_example --output_dir ../data)"""


# ============================================================================================
# Entry point
# ============================================================================================
def main(argv=None) -> int:
    cfg, _ = parse_config(argv, description=__doc__.split("\n\n")[0] + "\n\n" + EXAMPLES,
                          sections=("data", "model"), rules=lambda cfg, ns: check_settings(cfg))
    d = cfg.data
    log.info("data settings: %s", json.dumps({k: v for k, v in vars(d).items()}, ensure_ascii=False))
    if d.validate:
        summary = check_data_dir(d.data_dir, d.metadata_file, sample_rate=d.sample_rate)
        print(summary.text())
        return 0 if summary.ok else 1
    if d.create_example:
        create_example(cfg)
    else:
        prepare_folder(cfg)
    summary = check_data_dir(d.data_dir, d.metadata_file, sample_rate=d.sample_rate, hash_content=False)
    print(summary.text())
    print(f"Next: python lora/test_dataset.py --data_dir {d.data_dir}   (or: cd lora && python test_dataset.py)")
    return 0 if summary.ok else 1


def check_settings(cfg: Config) -> list[str]:
    """What must hold before anything is read or written, besides each value's range (the schema's): one mode,
    the input files, settings that depend on each other."""
    d = cfg.data
    p: list[str] = []
    modes = [n for n, on in (("--create_example", d.create_example), ("--input_dir", d.input_dir),
                             ("--validate", d.validate)) if on]
    if not modes:
        p.append("Nothing to do: pass --input_dir YOUR_AUDIO_FOLDER, --create_example or --validate.\n" + EXAMPLES)
    elif len(modes) > 1:
        p.append(f"Choose one of {', '.join(modes)} (they were given together).")
    if d.input_dir and not d.create_example and not d.validate and not Path(d.input_dir).is_dir():
        p.append(f"data.input_dir: folder {d.input_dir} does not exist (pass --input_dir with your audio folder).")
    if d.captions_file and not Path(d.captions_file).is_file():
        p.append(f"data.captions_file: {d.captions_file} not found.")
    if d.min_seconds > d.segment_seconds:
        p.append(f"data.min_seconds must be between 0 and segment_seconds ({d.segment_seconds}), got {d.min_seconds}.")
    try:
        d.caption_template.format(stem="x", folder="y", name="z.wav")
    except (KeyError, IndexError, ValueError) as e:
        p.append(f"data.caption_template {d.caption_template!r} is not a valid pattern ({e!r}); use the "
                 f"placeholders {{stem}}, {{folder}} and {{name}}, e.g. '{{folder}}, {{stem}}'.")
    return p


# ============================================================================================
# Ownership of the output folder (never clobber what another run or the user wrote)
# ============================================================================================
def _load_state(data_dir: Path, overwrite: bool = False) -> dict:
    """prepare_state.json of data_dir ({} when there is none). A damaged one (not JSON, not an object) is a
    UserError: without it prepare_data cannot tell its own clips from other files; --overwrite rebuilds."""
    p = data_dir / STATE_FILE
    if not p.is_file():
        return {}
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
        damage = "" if isinstance(s, dict) else f"it holds a JSON {type(s).__name__}, not an object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        damage = f"it is not valid JSON: {e}"
    except OSError as e:
        damage = f"it cannot be read: {e.strerror or e}"
    if damage and overwrite:
        log.warning("%s is damaged (%s); --overwrite: rebuilding the dataset (files it listed that are not made "
                    "again are left in place)", p, damage)
        return {}
    if damage:
        raise UserError(f"{p} is damaged ({damage}). It records which files in {data_dir} prepare_data made, so "
                        f"without it nothing there can be reused or cleaned up safely; nothing was changed. Pass "
                        f"--overwrite to rebuild the dataset (every clip is made again; files it cannot tell are "
                        f"its own are not deleted), or restore the file.")
    return s if s.get("version") == STATE_VERSION else {}


def _check_owner(cfg: Config, state: dict, mode: str, input_dir: Optional[str]) -> None:
    d = cfg.data
    data_dir = Path(d.data_dir)
    mpath = metadata_path(data_dir, d.metadata_file)
    if d.overwrite:
        return
    if not state:
        if mpath.is_file():
            raise UserError(f"{mpath} exists but was not written by prepare_data.py (no {STATE_FILE} next to it). "
                            f"Choose another --output_dir, or pass --overwrite to replace it.")
        return
    if state.get("mode") == "input" and mode == "example":
        raise UserError(f"{data_dir} holds a dataset prepared from {state.get('input_dir')}; --create_example would "
                        f"replace it. Choose another --output_dir (e.g. data_example), or pass --overwrite.")
    if mode == "input" and state.get("mode") == "input" and state.get("input_dir") != input_dir:
        raise UserError(f"{data_dir} holds a dataset prepared from {state.get('input_dir')}, not from {input_dir}. "
                        f"Choose another --output_dir, or pass --overwrite to replace it.")


def _inside(path: str, folder: str) -> bool:
    """Real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_split_overlap(input_dir: Path, data_dir: Path) -> None:
    """Refuse an --input_dir that is data_dir/train or data_dir/valid or lies inside one: prepare_data writes
    its clips there and deletes the clips of earlier runs, so the user's recordings could be deleted, and the
    clips would come back as new recordings on the next run. Checked before anything is written."""
    real_in = os.path.realpath(input_dir)
    for split in SPLITS:
        split_dir = data_dir / split
        if _inside(real_in, os.path.realpath(split_dir)):
            where = "is" if real_in == os.path.realpath(split_dir) else f"lies inside {split_dir},"
            raise UserError(
                f"--input_dir {input_dir} {where} the {split}/ folder of --output_dir {data_dir}: prepare_data "
                f"writes its clips there and deletes the clips of earlier runs, so your recordings there could be "
                f"deleted, and the clips would be read back as new recordings on the next run. Nothing was "
                f"changed. Move your recordings to a folder of their own (e.g. {data_dir / 'recordings'}) and pass "
                f"that as --input_dir, or leave them where they are and pass another --output_dir (e.g. "
                f"{data_dir.parent / (data_dir.name + '_prepared')}).")


def _check_written_files(d, input_dir: Path, data_dir: Path, owned: bool) -> None:
    """Refuse when a file prepare_data writes (metadata file, state, report, config) is a file it reads
    (captions_file, metadata.jsonl/.csv of the input folder), or a file of the input folder it did not write."""
    written = [metadata_path(data_dir, d.metadata_file), data_dir / STATE_FILE, data_dir / REPORT_FILE,
               data_dir / CONFIG_FILE]
    read = ([Path(d.captions_file)] if d.captions_file else []) + [input_dir / n for n in ("metadata.jsonl",
                                                                                            "metadata.csv")]
    read_real = {os.path.realpath(r): r for r in read if r.is_file()}
    real_in = os.path.realpath(input_dir)
    for w in written:
        rw = os.path.realpath(w)
        if rw in read_real:
            raise UserError(f"{w} is read as captions ({read_real[rw]}) and prepare_data would overwrite it with "
                            f"its own {w.name}. Nothing was changed. Copy the captions to a file of their own, or "
                            f"choose another --output_dir / --metadata_file.")
        if not owned and _inside(rw, real_in) and os.path.lexists(w):
            raise UserError(f"{w} is a file in --input_dir {input_dir} that prepare_data did not write (no "
                            f"readable {STATE_FILE} in {data_dir} lists it); preparing would overwrite it. Nothing "
                            f"was changed. Choose an --output_dir outside --input_dir, or a new subfolder (e.g. "
                            f"{input_dir / 'prepared'}).")


def _check_foreign_audio(input_dir: Path, data_dir: Path, state: dict) -> None:
    """When the scan met the output folder (it is the input folder or inside it), refuse if data_dir/train or
    data_dir/valid hold audio that prepare_data did not write (not in its state's clip_files): that audio
    would be left out of the scan without a word, and the folders are where prepare_data writes and cleans."""
    ours = set(state.get("clip_files") or ())
    for split in SPLITS:
        foreign = []
        for root, dirs, names in os.walk(data_dir / split):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            foreign += [Path(root) / n for n in sorted(names) if not n.startswith(".") and A.is_audio_file(n)
                        and (Path(root) / n).relative_to(data_dir).as_posix() not in ours]
        if foreign:
            raise UserError(
                f"{data_dir / split} holds {len(foreign)} audio file(s) that prepare_data did not write (e.g. "
                f"{', '.join(p.name for p in foreign[:3])}), and it lies in --input_dir {input_dir}: prepare_data "
                f"writes and deletes its clips there and never scans it, so these would be left out without a "
                f"word. Nothing was changed. Move them to a folder of their own inside --input_dir (e.g. "
                f"{input_dir / 'recordings'}), or pass an --output_dir outside --input_dir.")


def _remove_stale(data_dir: Path, old_files, new_files) -> int:
    """Delete clip files an earlier run wrote that the new dataset no longer uses (only ours, only clips)."""
    n = 0
    keep = set(new_files)
    for rel in old_files or ():
        if rel in keep or Path(rel).parts[0] not in SPLITS or ".." in Path(rel).parts:
            continue
        p = data_dir / rel
        if p.is_file():
            p.unlink()
            n += 1
    return n


# ============================================================================================
# --create_example: the synthetic example set (synthesised and written by example_data.py)
# ============================================================================================
def create_example(cfg: Config) -> list[ClipRecord]:
    """Write the synthetic example dataset into data_dir (train/, valid/, metadata.json)."""
    d = cfg.data
    check_output_dir(d.data_dir, "--output_dir")
    data_dir = Path(d.data_dir)
    state = _load_state(data_dir, d.overwrite)
    _check_owner(cfg, state, "example", None)
    records = write_example_clips(data_dir, clips=d.example_clips, seconds=d.example_seconds,
                                  sample_rate=d.sample_rate, channels=d.channels, valid_fraction=d.valid_fraction,
                                  seed=d.split_seed)
    files = [r.audio for r in records]
    removed = _remove_stale(data_dir, state.get("clip_files"), files)
    atomic_write_json(metadata_path(data_dir, d.metadata_file),
                      metadata_document(records, d.sample_rate, d.channels))
    atomic_write_json(data_dir / STATE_FILE, {"version": STATE_VERSION, "mode": "example", "input_dir": None,
                                              "clip_files": files, "sources": {}})
    report = {"mode": "example", "data_dir": str(data_dir), "clips": Counter(r.split for r in records),
              "styles": list(STYLES), "seconds": sum(r.duration for r in records), "stale_removed": removed}
    atomic_write_json(data_dir / REPORT_FILE, report)
    cfg.save(data_dir / CONFIG_FILE)
    log.info("example dataset: %d clips (%s) of %s styles in %s", len(records),
             ", ".join(f"{k} {v}" for k, v in report["clips"].items()), len(STYLES), data_dir)
    return records


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
    unreadable: list[dict] = field(default_factory=list)  # {"path", "kind": folder/file, "reason"}
    links: list[dict] = field(default_factory=list)  # {"file", "reason"}: broken or looping symlinks
    reached_output: bool = False  # met data_dir, data_dir/train or data_dir/valid (never scanned)


def _rel(input_dir: Path, p: Path) -> str:
    return p.relative_to(input_dir).as_posix()


def _list_folder(input_dir: Path, folder: Path, scan: Scan) -> list[tuple[Path, os.stat_result, bool]]:
    """(path, stat with symlinks followed, is a symlink) of the visible entries of a folder, by name. What
    cannot be listed or stat-ed is recorded in scan (unreadable, broken link, symlink loop), never raised."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        scan.unreadable.append({"path": _rel(input_dir, folder), "kind": "folder", "reason": e.strerror or str(e)})
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
                                   "reason": f"broken symlink: it points to {os.readlink(p)}, which does not exist"})
            elif err.errno == errno.ELOOP:
                scan.links.append({"file": _rel(input_dir, p), "reason": "symlink loop: the link leads back to itself"})
            elif err.errno != errno.ENOENT:  # (ENOENT: deleted while scanning)
                scan.unreadable.append({"path": _rel(input_dir, p), "kind": "file", "reason": err.strerror or str(err)})
    return out


def scan_audio(input_dir: Path, exclude: list[Path]) -> Scan:
    """Audio files under input_dir (recursive; symlinked folders are followed, each real folder scanned once,
    a link back to a folder above is a "symlink loop"), what was ignored, what could not be read."""
    scan = Scan()
    excl = {os.path.realpath(e) for e in exclude}
    visited = {os.path.realpath(input_dir)}
    stack = [input_dir]
    while stack:
        folder = stack.pop()
        here = os.path.realpath(folder)
        entries = _list_folder(input_dir, folder, scan)
        subdirs = []
        for p, st, link in sorted(entries, key=lambda e: e[2]):  # real folders before links to them
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(p)
                if real in excl:
                    scan.ignored["hidden or output folders"] += 1
                    scan.reached_output = True
                elif _inside(here, real):
                    scan.links.append({"file": _rel(input_dir, p),
                                       "reason": f"symlink loop: it links back to {real}, a folder above it"})
                elif real in visited:
                    scan.ignored["folders linked twice (scanned once)"] += 1
                else:
                    visited.add(real)
                    subdirs.append(p)
            elif not stat.S_ISREG(st.st_mode):
                scan.ignored["not a regular file"] += 1
            elif A.is_audio_file(p):
                scan.files.append(p)
            else:
                scan.ignored[p.suffix.lower() or "(no extension)"] += 1
        stack += sorted(subdirs, reverse=True)
    scan.files.sort(key=lambda p: _rel(input_dir, p))
    return scan


# ---- the per-file worker (runs in a worker process) -----------------------------------------
def process_file(job: dict) -> dict:
    """Decode one recording block by block and write its clips. Returns a JSON-able result.

    Never raises for a bad file: the failure is returned with its reason. An OSError while writing a clip (a
    full disk) is raised, after removing the clips of this recording written so far.
    """
    t0 = time.perf_counter()
    src, rel = job["src"], job["rel"]
    res = {"rel": rel, "ok": False, "reason": "", "warnings": [], "clips": [], "tail_seconds": 0.0,
           "silent_segments": 0, "size": job["size"], "mtime_ns": job["mtime_ns"], "settings": job["settings"]}
    try:
        res["sha1"] = A.file_hash(src)
    except OSError as e:
        res["reason"] = f"cannot read the file ({e})"
        res["unreadable"] = e.strerror or str(e)
        return res
    try:
        info = A.audio_info(src)
    except A.AudioError as e:
        res["reason"] = str(e).replace(f"{src}: ", "")
        return res
    res["source_channels"] = info.channels
    writer = _ClipWriter(job, res)
    counts = A.DecodeCounts()
    try:
        error = writer.decode(counts)
    except OSError:
        writer.remove_written()
        raise
    _check_nonfinite(res, counts, writer)
    _judge(job, res, writer.cutter, info.duration, error)
    res["decode_seconds"] = round(time.perf_counter() - t0, 3)
    return res


class _ClipWriter:
    """process_file's clips: cut the decoded stream, drop silent clips, scale down clips that peak above
    0 dBFS (PCM16 would hard-clip them), write the WAVs into data_dir/train, record them in res."""

    def __init__(self, job: dict, res: dict):
        self.job, self.res = job, res
        self.sr = job["sample_rate"]
        self.base = clip_base(job["rel"])
        self.train = Path(job["data_dir"]) / "train"
        self.cutter = A.ClipCutter(self.sr, job["segment_seconds"], job["min_seconds"],
                                   trim_silence=job["trim_silence"], silence_db=job["silence_db"])
        self.written: list[Path] = []
        self.overs: list[float] = []  # peak (dBFS) of each clip that was scaled down

    def decode(self, counts: A.DecodeCounts) -> Optional[str]:
        """Decode and write; the decoding error (clips before it are kept) or None."""
        error = None
        try:
            for block in A.iter_audio(self.job["src"], self.sr, self.job["channels"], counts=counts):
                self.emit(self.cutter.push(block))
        except A.AudioError as e:
            error = str(e)
        self.emit(self.cutter.finish())
        if self.overs:
            self.res["warnings"].append(f"{len(self.overs)} clip(s) peaked at up to +{max(self.overs):.1f} dBFS and "
                                        f"were scaled down to avoid clipping")
        return error

    def emit(self, pieces) -> None:
        res = self.res
        for off, clip in pieces:
            idx = len(res["clips"]) + res["silent_segments"]
            if A.rms_db(clip) < self.job["silence_db"]:
                res["silent_segments"] += 1
                continue
            clip, over_db = A.scale_overs(clip)
            name = f"{self.base}_{idx:03d}.wav"
            self.written.append(self.train / name)
            A.save_wav(self.train / name, clip, self.sr)
            c = {"index": idx, "name": name, "file": f"train/{name}", "offset": round(off / self.sr, 4),
                 "duration": round(clip.shape[1] / self.sr, 4), "pcm_hash": A.pcm16_hash(clip)}
            if over_db is not None:
                c["scaled_from_db"] = round(over_db, 2)
                self.overs.append(over_db)
            if self.job["enrich"]:
                c.update(A.estimate_tempo_key(clip, self.sr))
            res["clips"].append(c)

    def remove_written(self) -> None:
        """Delete this recording's clips (a damaged file, or a write that failed part-way)."""
        for p in self.written:
            try:
                p.unlink()
            except OSError:
                pass
        self.written.clear()
        self.res["clips"] = []


def _check_nonfinite(res: dict, counts: A.DecodeCounts, writer: _ClipWriter) -> None:
    """A few NaN/inf samples (at most NONFINITE_REPAIR_FRACTION) were set to 0: warn with the count. More:
    the file is damaged; its clips are removed and it is skipped with that reason."""
    n, m = counts.nonfinite, counts.samples
    if not n:
        return
    if n <= NONFINITE_REPAIR_FRACTION * m:
        res["warnings"].append(f"{n} NaN/inf sample(s) of {m} were replaced by 0 (silence); the file is slightly "
                               f"damaged")
        res["nonfinite_repaired"] = n
        return
    writer.remove_written()
    res["warnings"] = []
    res["reason"] = f"{n} of {m} samples are NaN/inf: the file is damaged"


def _judge(job: dict, res: dict, cutter: A.ClipCutter, header_seconds: float, error: Optional[str]) -> None:
    """Fill in what the decoding found: durations, warnings, ok, or the reason the file gave no clip."""
    sr = job["sample_rate"]
    decoded = cutter.total_samples / sr
    res.update(source_seconds=round(decoded, 3), lead_seconds=round(cutter.lead_samples / sr, 3),
               trail_seconds=round(cutter.trail_samples / sr, 3), tail_seconds=round(cutter.tail_samples / sr, 3))
    if res["reason"]:  # damaged (NaN/inf)
        res["tail_seconds"] = 0.0
        return
    if error and res["clips"]:
        res["warnings"].append(f"{error}; kept the {len(res['clips'])} clip(s) before it")
    elif header_seconds and decoded < min(header_seconds - 1.0, 0.95 * header_seconds) and not error:
        res["warnings"].append(f"file is shorter than its header says ({decoded:.1f} s of {header_seconds:.1f} s): "
                               f"truncated?")
    if res["clips"]:
        res["ok"] = True
    elif error:
        res["reason"] = error
    elif cutter.total_samples == 0:
        res["reason"] = "empty: the file holds no audio samples"
    elif not cutter.any_loud or res["silent_segments"]:
        res["reason"] = f"silent: nothing above {job['silence_db']:g} dBFS"
    else:
        kept = cutter.tail_samples / sr
        res["reason"] = (f"too short: {kept:.2f} s of sound (of {decoded:.2f} s) is under min_seconds "
                         f"({job['min_seconds']:g} s)")
        res["tail_seconds"] = 0.0


def enrich_existing(job: dict) -> dict:
    """Tempo/key of clips that already exist (a rerun that adds --enrich_captions decodes no source)."""
    out = {}
    for rel in job["files"]:
        y = A.load_audio(Path(job["data_dir"]) / rel, job["sample_rate"], 1)
        out[rel] = A.estimate_tempo_key(y, job["sample_rate"])
    return {"rel": job["rel"], "enrich": out}


def _run_jobs(fn_name: str, jobs: list[dict], workers: int, desc: str, on_result=None) -> list[dict]:
    """Run jobs inline (1 worker) or in a spawn process pool; on_result(result) is called as each finishes."""
    if not jobs:
        return []
    from tqdm import tqdm

    fn = getattr(importlib.import_module("lora.prepare_data"), fn_name)  # picklable by module name
    results = []
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=None)
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            try:
                results.append(fn(j))
                if on_result:
                    on_result(results[-1])
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise
                raise UserError(f"could not write clips ({e}); is the disk full or the output folder read-only?"
                                ) from None
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures.process import BrokenProcessPool

        ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn"))
        try:
            futs = [ex.submit(fn, j) for j in jobs]
            for f in as_completed(futs):
                results.append(f.result())
                if on_result:
                    on_result(results[-1])
                bar.update()
        except OSError as e:  # writing clips failed: the whole run cannot go on
            ex.shutdown(wait=False, cancel_futures=True)
            if e.errno in DISK_FULL:
                raise
            raise UserError(f"could not write clips ({e}); is the disk full or the output folder read-only?"
                            ) from None
        except BrokenProcessPool:
            ex.shutdown(wait=False, cancel_futures=True)
            raise UserError("a worker process died (out of memory, or a decoder crashed on a file). Finished files "
                            "are kept: run the same command with --num_workers 1 to continue and find the file."
                            ) from None
        except BaseException:  # Ctrl-C: do not wait for the queued files
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown()
    bar.close()
    return results


# ---- the run -------------------------------------------------------------------------------
def _settings_key(d) -> dict:
    return {"sample_rate": d.sample_rate, "channels": d.channels, "segment_seconds": d.segment_seconds,
            "min_seconds": d.min_seconds, "trim_silence": d.trim_silence, "silence_db": d.silence_db}


def _split(recordings: list[str], valid_fraction: float, seed: int) -> set[str]:
    """Deterministic split by recording: the recordings with the lowest hash(seed, path) go to valid."""
    if valid_fraction <= 0 or len(recordings) < 2:
        return set()
    ranked = sorted(recordings, key=lambda r: hashlib.sha1(f"{seed}:{r}".encode("utf-8")).hexdigest())
    k = min(len(ranked) - 1, max(1, round(valid_fraction * len(ranked))))
    return set(ranked[:k])


def prepare_folder(cfg: Config) -> dict:
    """The --input_dir run: check the folders, scan, plan (reuse what an earlier run made), decode, drop
    duplicates, split, caption, write the dataset and its report. Returns the report."""
    d = cfg.data
    input_dir = Path(d.input_dir).resolve()
    data_dir = Path(d.data_dir).resolve()
    _check_split_overlap(input_dir, data_dir)
    check_output_dir(d.data_dir, "--output_dir")
    state = _load_state(data_dir, d.overwrite)
    _check_written_files(d, input_dir, data_dir, owned=bool(state))
    _check_owner(cfg, state, "input", str(input_dir))
    if d.overwrite:
        state = {"clip_files": state.get("clip_files", [])}
    scan = _find_sources(input_dir, data_dir, state)
    captioner = Captioner(input_dir, d.captions_file, d.default_text, d.caption_template)
    workers = d.num_workers or os.cpu_count() or 1
    results, jobs, enrich_jobs = _plan_jobs(d, scan.files, input_dir, data_dir, state.get("sources", {}))
    kept = _keep_unreadable(scan, jobs, results, data_dir, state.get("sources", {}))
    if not scan.files and not kept:
        raise UserError(_no_audio_message(input_dir, scan))
    _check_space(d, jobs, data_dir, state.get("sources", {}))
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    (data_dir / "valid").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    _run_with_checkpoints(jobs, results, workers, input_dir, data_dir, state)
    _enrich_reused(enrich_jobs, results, workers)
    wall = time.perf_counter() - t0

    duplicates = _find_duplicates(results)
    usable = _usable_recordings(results)
    found = Found(scan, kept)
    if not usable:
        _write_report(data_dir, d, input_dir, results, found, duplicates, [], {}, {j["rel"] for j in jobs}, 0, wall,
                      captioner)
        raise UserError(f"None of the {len(scan.files)} audio files gave a usable clip; see {data_dir / REPORT_FILE} "
                        f"for each file's reason.")
    valid_set = _split(usable, d.valid_fraction, d.split_seed)
    records, caption_sources, uncaptioned = _place_clips(d, input_dir, data_dir, results, usable, valid_set,
                                                          captioner, kept)
    _delete_duplicate_clips(data_dir, results)
    decoded_rels = _write_dataset(cfg, input_dir, data_dir, state, results, records)
    return _write_report(data_dir, d, input_dir, results, found, duplicates, uncaptioned, caption_sources,
                         decoded_rels, len(records), wall, captioner, records)


@dataclass
class Found:
    """The scan, and the sources of an earlier run kept because they cannot be read now ({rel: reason})."""

    scan: Scan
    kept: dict


def _find_sources(input_dir: Path, data_dir: Path, state: dict) -> Scan:
    """Scan input_dir for audio, never into the output folder; refuse when that folder lies in the input
    and holds audio prepare_data did not write."""
    scan = scan_audio(input_dir, [data_dir] + [data_dir / s for s in SPLITS])
    if scan.reached_output:
        _check_foreign_audio(input_dir, data_dir, state)
    for u in scan.unreadable:
        log.warning("cannot read %s %s (%s): %s", u["kind"], input_dir / u["path"], u["reason"],
                    "the files in it are not used" if u["kind"] == "folder" else "it is not used")
    log.info("found %d audio files in %s", len(scan.files), input_dir)
    return scan


def _no_audio_message(input_dir: Path, scan: Scan) -> str:
    text = (f"No audio files found in {input_dir} (looked for {', '.join(A.AUDIO_EXTENSIONS)}, recursively). "
            f"Check --input_dir.")
    if scan.unreadable:
        text += " Could not read: " + "; ".join(f"{u['path']} ({u['reason']})" for u in scan.unreadable[:10]) + "."
    return text


def _keep_unreadable(scan: Scan, jobs: list[dict], results: dict[str, dict], data_dir: Path, prev_sources: dict
                     ) -> dict[str, str]:
    """Sources of the last run that cannot be read now (their folder or file is unreadable, a broken or
    looping link) keep their earlier result and clips (reused; removed from jobs). Returns {rel: reason}."""
    found = {j["rel"] for j in jobs} | set(results)
    problems = {u["path"]: u["reason"] for u in scan.unreadable} | {x["file"]: x["reason"] for x in scan.links}
    kept: dict[str, str] = {}
    for rel in prev_sources:
        if rel in found:
            continue
        why = next((r for p, r in problems.items() if p in (".", rel) or rel.startswith(p + "/")), None)
        if why:
            kept[rel] = why
    for j in list(jobs):
        if j["rel"] in prev_sources:
            try:
                with open(j["src"], "rb"):
                    pass
            except OSError as e:
                kept[j["rel"]] = e.strerror or str(e)
                scan.unreadable.append({"path": j["rel"], "kind": "file", "reason": kept[j["rel"]]})
                jobs.remove(j)
    for rel in kept:
        r = json.loads(json.dumps(prev_sources[rel]))
        r["clips"] = [c for c in r.get("clips", []) if c.get("duplicate") or (data_dir / c["file"]).is_file()]
        results[rel] = dict(r, reused=True)
    if kept:
        log.warning("%d file(s) of the last run cannot be read now: kept their earlier clips (%s)", len(kept),
                    ", ".join(sorted(kept)[:5]) + (" ..." if len(kept) > 5 else ""))
    return kept


def _check_space(d, jobs: list[dict], data_dir: Path, prev_sources: dict) -> None:
    """Refuse before decoding when the disk of data_dir clearly lacks the space the clips will take: the
    sources' seconds (from their headers) x sample_rate x channels x 2 bytes, less the clips they replace.
    Each job gets its estimate (est_bytes), for the message of a disk that fills up anyway."""
    per_second = d.sample_rate * d.channels * 2
    need, seconds = 0, 0.0
    for j in jobs:
        try:
            secs = A.audio_info(j["src"]).duration
        except A.AudioError:
            secs = 0.0
        j["est_bytes"] = int(secs * per_second)
        need += j["est_bytes"]
        seconds += secs
        for c in (prev_sources.get(j["rel"]) or {}).get("clips", []):
            old = data_dir / c["file"]
            need -= old.stat().st_size if old.is_file() else 0
    if jobs and need > 0:
        log.info("the clips of %d file(s) to decode will take about %s", len(jobs), human_bytes(need))
        check_free_space(data_dir, need, f"the clips of {len(jobs)} file(s) ({human_seconds(seconds)} of audio at "
                                         f"{d.sample_rate} Hz, {d.channels} channel(s), 16-bit)")


def _plan_jobs(d, files: list[Path], input_dir: Path, data_dir: Path, prev_sources: dict
               ) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """(results reused from the last run, decode jobs, tempo/key jobs for reused clips).

    A file is reused when its size, mtime and the clip settings are unchanged and its clips still exist; a
    duplicate (it kept no clips of its own) only while what it duplicates is reused too."""
    settings = _settings_key(d)
    results: dict[str, dict] = {}
    jobs, enrich_jobs = [], []
    unchanged = set()
    for src in files:
        rel = src.relative_to(input_dir).as_posix()
        st = src.stat()
        prev = prev_sources.get(rel)
        if (prev and prev.get("size") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns
                and prev.get("settings") == settings
                and all((data_dir / c["file"]).is_file() for c in prev.get("clips", []) if not c.get("duplicate"))):
            unchanged.add(rel)
    for src in files:
        rel = src.relative_to(input_dir).as_posix()
        st = src.stat()
        prev = prev_sources.get(rel)
        # a duplicate kept no clips of its own: reuse it only while what it duplicates is unchanged
        refs = {prev.get("duplicate_of")} | {c.get("duplicate_of") for c in prev.get("clips", [])} if prev else set()
        if rel in unchanged and refs - {None} <= unchanged:
            results[rel] = json.loads(json.dumps(prev))
            results[rel]["reused"] = True
            if d.enrich_captions and any("bpm" not in c for c in prev.get("clips", [])):
                enrich_jobs.append({"rel": rel, "files": [c["file"] for c in prev["clips"]],
                                    "data_dir": str(data_dir), "sample_rate": d.sample_rate})
            continue
        jobs.append({"src": str(src), "rel": rel, "data_dir": str(data_dir), "size": st.st_size,
                     "mtime_ns": st.st_mtime_ns, "settings": settings, "sample_rate": d.sample_rate,
                     "channels": d.channels, "segment_seconds": d.segment_seconds, "min_seconds": d.min_seconds,
                     "trim_silence": d.trim_silence, "silence_db": d.silence_db, "enrich": d.enrich_captions})
    if results:
        log.info("%d file(s) unchanged since the last run: reusing their clips", len(results))
    return results, jobs, enrich_jobs


def _run_with_checkpoints(jobs: list[dict], results: dict[str, dict], workers: int, input_dir: Path,
                          data_dir: Path, state: dict) -> None:
    """Decode the jobs into results, saving progress (prepare_state.json) every CHECKPOINT_SECONDS and when
    the run stops on an error, a full disk or Ctrl-C, so a rerun resumes without decoding finished files."""
    prev_sources = state.get("sources", {})
    last_save = [time.monotonic()]
    old_files = list(state.get("clip_files", []))
    unsaved: list[str] = []  # why the progress could not be saved, when it could not

    def checkpoint(r=None, force=False):
        """Save progress now and then, so an interrupted run resumes without decoding finished files."""
        if r is not None:
            results[r["rel"]] = r
        if not force and time.monotonic() - last_save[0] < CHECKPOINT_SECONDS:
            return
        last_save[0] = time.monotonic()
        sources = dict(prev_sources)
        sources.update({k: v for k, v in results.items() if not v.get("reused")})
        files_now = sorted(set(old_files) | {c["file"] for v in results.values() for c in v.get("clips", [])})
        atomic_write_json(data_dir / STATE_FILE, {"version": STATE_VERSION, "mode": "input",
                                                  "input_dir": str(input_dir), "clip_files": files_now,
                                                  "sources": sources})

    def save_now() -> None:
        try:
            checkpoint(force=True)
        except OSError as e:
            unsaved.append(e.strerror or str(e))
            log.warning("could not save the progress in %s (%s)", data_dir / STATE_FILE, unsaved[-1])

    with on_interrupt(lambda: _progress_note(data_dir, results, unsaved)):
        try:
            for r in _run_jobs("process_file", jobs, workers, "decoding", on_result=checkpoint):
                results[r["rel"]] = r
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            save_now()
            left = [j for j in jobs if j["rel"] not in results]
            need = (f"the clips of the {len(left)} file(s) not done yet need about "
                    f"{human_bytes(sum(j.get('est_bytes', 0) for j in left))}")
            note = _progress_note(data_dir, results, unsaved)
            raise UserError(f"{disk_full_message(e, need)} {note[0].upper() + note[1:]}.") from None
        except (UserError, KeyboardInterrupt):
            save_now()
            raise


def _progress_note(data_dir: Path, results: dict, unsaved: list[str]) -> str:
    """What a stopped decoding run saved, and how to continue (Ctrl-C, a full disk)."""
    if unsaved:
        return (f"the progress could not be saved in {data_dir / STATE_FILE} ({unsaved[-1]}); running the same "
                f"command again decodes the files finished since its last save again")
    return (f"progress of {len(results)} finished file(s) is saved in {data_dir / STATE_FILE}; run the same command "
            f"again to continue: finished files are not decoded again")


def _enrich_reused(enrich_jobs: list[dict], results: dict[str, dict], workers: int) -> None:
    """Add tempo/key to the reused clips that lack it (a rerun that adds --enrich_captions)."""
    for r in _run_jobs("enrich_existing", enrich_jobs, workers, "tempo/key"):
        for c in results[r["rel"]]["clips"]:
            c.update(r["enrich"].get(c["file"], {}))


def _find_duplicates(results: dict[str, dict]) -> list[dict]:
    """Mark duplicates in results: same file content (duplicate_of on the file), then identical clips of
    different recordings (duplicate/duplicate_of on the clip); the first by path is kept. Returns them."""
    duplicates, seen_file, seen_clip = [], {}, {}
    for rel in sorted(results):
        r = results[rel]
        if not r.get("ok"):
            continue
        r.pop("duplicate_of", None)
        if r.get("sha1") in seen_file:
            duplicates.append({"file": rel, "same_as": seen_file[r["sha1"]], "kind": "identical file"})
            r["duplicate_of"] = seen_file[r["sha1"]]
            continue
        seen_file[r.get("sha1")] = rel
        for c in r["clips"]:
            c.pop("duplicate", None)
            c.pop("duplicate_of", None)
            other = seen_clip.get(c["pcm_hash"])
            if other and other[0] != rel:
                duplicates.append({"file": f"{rel} (clip {c['index']})", "same_as": f"{other[0]} (clip {other[1]})",
                                   "kind": "identical clip"})
                c["duplicate"], c["duplicate_of"] = True, other[0]
                continue
            seen_clip.setdefault(c["pcm_hash"], (rel, c["index"]))
    return duplicates


def _usable_recordings(results: dict[str, dict]) -> list[str]:
    """Recordings (sorted) that keep at least one clip: decoded fine, not a duplicate file."""
    return [rel for rel in sorted(results) if results[rel].get("ok") and not results[rel].get("duplicate_of")
            and any(not c.get("duplicate") for c in results[rel]["clips"])]


def _place_clips(d, input_dir: Path, data_dir: Path, results: dict[str, dict], usable: list[str],
                 valid_set: set[str], captioner: Captioner, kept: dict
                 ) -> tuple[list[ClipRecord], Counter, list[str]]:
    """Move each kept clip into its split's folder, caption it, and build its record (a source that cannot be
    read now keeps the caption of the run that made its clips). Returns (records, how many recordings each
    caption source captioned, uncaptioned recordings)."""
    records: list[ClipRecord] = []
    caption_sources: Counter = Counter()
    uncaptioned = []
    for rel in usable:
        r = results[rel]
        split = "valid" if rel in valid_set else "train"
        if rel in kept and "caption" in r:
            text, where = r["caption"], r.get("caption_source", "earlier run")
        else:
            text, where = captioner(input_dir / rel, rel)
        r["caption"], r["caption_source"] = text, where
        caption_sources[where] += 1
        if not text:
            uncaptioned.append(rel)
        for c in r["clips"]:
            if c.get("duplicate"):
                continue
            target = f"{split}/{c['name']}"
            if c["file"] != target:
                os.replace(data_dir / c["file"], data_dir / target)
                c["file"] = target
            ctext = _enrich_text(text, c) if d.enrich_captions else text
            records.append(ClipRecord(id=Path(c["name"]).stem, audio=target, text=ctext, duration=c["duration"],
                                      split=split, source=rel, offset=c["offset"]))
    return records, caption_sources, uncaptioned


def _delete_duplicate_clips(data_dir: Path, results: dict[str, dict]) -> None:
    """Clips of duplicates are not kept: delete their files; a duplicate file keeps no clips."""
    for rel in sorted(results):
        r = results[rel]
        for c in r.get("clips", []):
            if (r.get("duplicate_of") or c.get("duplicate")) and (data_dir / c["file"]).is_file():
                (data_dir / c["file"]).unlink()
        if r.get("duplicate_of"):
            r["clips"] = []


def _write_dataset(cfg: Config, input_dir: Path, data_dir: Path, state: dict, results: dict[str, dict],
                   records: list[ClipRecord]) -> set[str]:
    """Remove stale clips of an earlier run, write metadata.json, prepare_state.json and prepare_config.yaml.
    Returns the recordings decoded by this run (the others were reused)."""
    d = cfg.data
    new_files = [rec.audio for rec in records]
    removed = _remove_stale(data_dir, state.get("clip_files"), new_files)
    if removed:
        log.info("removed %d clip(s) of an earlier run that are no longer part of the dataset", removed)

    atomic_write_json(metadata_path(data_dir, d.metadata_file), metadata_document(records, d.sample_rate, d.channels))
    decoded_rels = {rel for rel, r in results.items() if not r.get("reused")}
    for r in results.values():
        r.pop("reused", None)
    atomic_write_json(data_dir / STATE_FILE, {"version": STATE_VERSION, "mode": "input", "input_dir": str(input_dir),
                                              "clip_files": new_files, "sources": results})
    cfg.save(data_dir / CONFIG_FILE)
    return decoded_rels


def _enrich_text(text: str, c: dict) -> str:
    add = []
    if c.get("bpm") and "bpm" not in text.lower():
        add.append(f"{c['bpm']:.0f} BPM")
    if c.get("key") and not re.search(r"\b(major|minor)\b", text.lower()):
        add.append(c["key"])
    if not add:
        return text
    return ", ".join([text] + add) if text else ", ".join(add)


def _write_report(data_dir, d, input_dir, results, found: Found, duplicates, uncaptioned, caption_sources,
                  decoded: set, n_clips, wall, captioner, records=()) -> dict:
    n_decoded = len(decoded)
    files = found.scan.files
    skipped = sorted([{"file": rel, "reason": r["reason"]} for rel, r in results.items() if not r.get("ok")]
                     + found.scan.links, key=lambda x: x["file"])
    warnings = [{"file": rel, "warning": w} for rel, r in sorted(results.items()) for w in r.get("warnings", [])]
    warnings += [{"file": rel, "warning": f"cannot be read now ({why}); kept the {len(results[rel]['clips'])} "
                                          f"clip(s) an earlier run made from it"}
                 for rel, why in sorted(found.kept.items())]
    tails = [{"file": rel, "seconds": r["tail_seconds"]} for rel, r in sorted(results.items())
             if r.get("ok") and r.get("tail_seconds", 0) > 0]
    silent_segments = sum(r.get("silent_segments", 0) for r in results.values() if r.get("ok"))
    clips = Counter(rec.split for rec in records)
    seconds = sum(rec.duration for rec in records)
    decoded_seconds = sum(r.get("source_seconds", 0.0) for rel, r in results.items() if rel in decoded)
    report = {
        "input_dir": str(input_dir), "data_dir": str(data_dir), "settings": _settings_key(d),
        "files_found": len(files), "files_used": len({rec.source for rec in records}),
        "files_decoded": n_decoded, "files_reused": len(files) - n_decoded,
        "clips": {"train": clips.get("train", 0), "valid": clips.get("valid", 0)},
        "recordings": {s: len({rec.source for rec in records if rec.split == s}) for s in SPLITS},
        "hours": round(seconds / 3600, 4), "seconds_decoded": round(decoded_seconds, 2),
        "wall_seconds": round(wall, 2),
        "skipped": skipped, "warnings": warnings, "duplicates": duplicates,
        "tails_dropped": tails, "tails_dropped_seconds": round(sum(t["seconds"] for t in tails), 2),
        "silent_segments_dropped": silent_segments,
        "uncaptioned": uncaptioned, "caption_sources": dict(caption_sources),
        "unused_caption_entries": captioner.unused()[:200], "ignored_files": dict(found.scan.ignored),
        **_audio_changes(d, results, {rec.source for rec in records}), "unreadable": _unreadable(results, found),
    }
    atomic_write_json(data_dir / REPORT_FILE, report)
    _say(d, report, data_dir, n_clips, seconds, len(files), n_decoded, len(tails))
    return report


def _audio_changes(d, results: dict, used: set) -> dict:
    """Counts of what preparing changed in the used recordings' audio: clips scaled down (they peaked above
    0 dBFS), NaN/inf samples set to 0, recordings mixed down or up to --channels."""
    rs = [results[rel] for rel in sorted(used)]
    src = Counter(r.get("source_channels") for r in rs if r.get("source_channels"))
    return {"clips_scaled_down": sum(1 for r in rs for c in r["clips"] if c.get("scaled_from_db") is not None
                                     and not c.get("duplicate")),
            "nonfinite_samples_repaired": sum(r.get("nonfinite_repaired", 0) for r in rs),
            "channel_mix": {"channels": d.channels, "mixed_down": sum(n for c, n in src.items() if c > d.channels),
                            "mono_to_stereo": src[1] if d.channels == 2 else 0}}


def _unreadable(results: dict, found: Found) -> list[dict]:
    """Every folder or file that could not be read, with how many sources of the last run it kept."""
    out = [dict(u) for u in found.scan.unreadable]
    out += [{"path": rel, "kind": "file", "reason": r["unreadable"]} for rel, r in sorted(results.items())
            if r.get("unreadable") and not r.get("ok")]
    for u in out:
        u["earlier_sources_kept"] = sum(1 for rel in found.kept if u["path"] in (".", rel)
                                        or rel.startswith(u["path"] + "/"))
    return out


def _say(d, report: dict, data_dir: Path, n_clips: int, seconds: float, n_files: int, n_decoded: int,
         n_tails: int) -> None:
    """The report, on screen: what was skipped or changed, then one summary line."""
    for s in report["skipped"]:
        log.warning("skipped %s: %s", s["file"], s["reason"])
    for w in report["warnings"]:
        log.warning("%s: %s", w["file"], w["warning"])
    for dup in report["duplicates"]:
        log.warning("duplicate (%s): %s is the same as %s; kept once", dup["kind"], dup["file"], dup["same_as"])
    uncaptioned, caption_sources = report["uncaptioned"], report["caption_sources"]
    if uncaptioned:
        log.warning("%d recording(s) have no caption (trained as unconditional only): %s", len(uncaptioned),
                    ", ".join(uncaptioned[:10]) + (" ..." if len(uncaptioned) > 10 else ""))
    if caption_sources.get("template"):
        log.warning("%d recording(s) are captioned from their file name (caption_template %r); a real description "
                    "(sidecar .txt or captions_file) trains much better", caption_sources["template"],
                    d.caption_template)
    if report["unused_caption_entries"]:
        log.warning("%d caption entr(y/ies) matched no audio file, e.g. %s", len(report["unused_caption_entries"]),
                    report["unused_caption_entries"][0])
    mix = report["channel_mix"]
    if mix["mixed_down"]:
        log.info("%d recording(s) with more than %d channel(s) were mixed down to %s (--channels %d)",
                 mix["mixed_down"], d.channels, "mono" if d.channels == 1 else "stereo", d.channels)
    if mix["mono_to_stereo"]:
        log.info("%d mono recording(s) were copied to both channels (--channels 2)", mix["mono_to_stereo"])
    if report["clips_scaled_down"]:
        log.warning("%d clip(s) peaked above 0 dBFS and were scaled down to avoid clipping (see the warnings)",
                    report["clips_scaled_down"])
    print(f"Prepared {n_clips} clips ({human_seconds(seconds)}) from {report['files_used']} of {n_files} files: "
          f"train {report['clips']['train']}, valid {report['clips']['valid']}; decoded {n_decoded} file(s), "
          f"reused {report['files_reused']}; skipped {len(report['skipped'])}, duplicates "
          f"{len(report['duplicates'])}, short tails dropped {n_tails}. Report: {data_dir / REPORT_FILE}")


if __name__ == "__main__":
    from lora.utils import run_main

    sys.exit(run_main(main))
