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
are only read, never changed.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

import numpy as np

from lora import audio as A
from lora.config import Config, parse_config, validate
from lora.dataset import SPLITS, ClipRecord, load_metadata, metadata_document, metadata_path
from lora.utils import UserError, atomic_write_json, human_seconds, log

STATE_FILE = "prepare_state.json"
REPORT_FILE = "prepare_report.json"
CONFIG_FILE = "prepare_config.yaml"
STATE_VERSION = 1
CHECKPOINT_SECONDS = 30.0  # how often an --input_dir run saves its progress (prepare_state.json)
CAPTION_KEYS = ("text", "caption", "description", "prompt")
FILE_KEYS = ("file_name", "file", "filename", "path", "audio")

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
                          sections=("data", "model"))
    d = cfg.data
    validate(check_settings(cfg))
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
    if d.sample_rate <= 0:
        p.append(f"data.sample_rate must be positive, got {d.sample_rate} (MusicGen uses 32000).")
    if d.segment_seconds <= 0:
        p.append(f"data.segment_seconds must be positive, got {d.segment_seconds}.")
    if d.min_seconds < 0 or d.min_seconds > d.segment_seconds:
        p.append(f"data.min_seconds must be between 0 and segment_seconds ({d.segment_seconds}), got {d.min_seconds}.")
    if not 0 <= d.valid_fraction < 1:
        p.append(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction} (0.1 = 10% of recordings).")
    if d.silence_db >= 0:
        p.append(f"data.silence_db must be negative dBFS, got {d.silence_db} (e.g. -50).")
    try:
        d.caption_template.format(stem="x", folder="y", name="z.wav")
    except (KeyError, IndexError, ValueError) as e:
        p.append(f"data.caption_template {d.caption_template!r} is not a valid pattern ({e!r}); use the "
                 f"placeholders {{stem}}, {{folder}} and {{name}}, e.g. '{{folder}}, {{stem}}'.")
    if d.num_workers < 0:
        p.append(f"data.num_workers must be >= 0 (0 = one per CPU core), got {d.num_workers}.")
    if d.create_example:
        if d.example_clips < 2 * len(STYLES):
            p.append(f"data.example_clips must be at least {2 * len(STYLES)} (every style needs a train and a "
                     f"valid clip), got {d.example_clips}.")
        if d.example_seconds <= 0:
            p.append(f"data.example_seconds must be positive, got {d.example_seconds}.")
    return p


# ============================================================================================
# Ownership of the output folder (never clobber what another run or the user wrote)
# ============================================================================================
def _load_state(data_dir: Path) -> dict:
    p = data_dir / STATE_FILE
    if not p.is_file():
        return {}
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; starting from scratch (clips are re-made)", p)
        return {}
    return s if isinstance(s, dict) and s.get("version") == STATE_VERSION else {}


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
# --create_example: a deterministic synthetic dataset of clearly different styles
# ============================================================================================
KEYS = {"C major": (60, "major"), "G major": (67, "major"), "D major": (62, "major"), "F major": (65, "major"),
        "A minor": (57, "minor"), "E minor": (64, "minor"), "D minor": (62, "minor"), "B minor": (59, "minor")}
PROGRESSIONS = {"major": [(0, 4, 7), (7, 11, 14), (9, 12, 16), (5, 9, 12)],  # I V vi IV
                "minor": [(0, 3, 7), (8, 12, 15), (3, 7, 10), (10, 14, 17)]}  # i VI III VII


def _hz(midi):
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


def _place(out: np.ndarray, sound: np.ndarray, start: int) -> None:
    if start >= out.size:
        return
    n = min(sound.size, out.size - start)
    out[start:start + n] += sound[:n]


def _lowpass(x: np.ndarray, cutoff: float, sr: int) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(2, min(cutoff, 0.45 * sr), fs=sr, output="sos"), x)


def _drums(sr, n, bpm, rng):
    out = np.zeros(n)
    beat = 60.0 / bpm
    t = np.arange(int(0.35 * sr)) / sr
    kick = np.sin(2 * np.pi * np.cumsum(45 + 110 * np.exp(-t * 28)) / sr) * np.exp(-t * 9)
    tc = np.arange(int(0.18 * sr)) / sr
    clap = np.diff(rng.standard_normal(tc.size + 1)) * np.exp(-tc * 25) * 0.35
    th = np.arange(int(0.05 * sr)) / sr
    hat = np.diff(np.diff(rng.standard_normal(th.size + 2))) * np.exp(-th * 90) * 0.12
    for i in range(int(n / sr / beat * 4) + 1):  # sixteenth grid
        pos = int(i * beat / 4 * sr)
        if i % 4 == 0:
            _place(out, kick * rng.uniform(0.85, 1.0), pos)
        if i % 8 == 4:
            _place(out, clap, pos)
        if i % 2 == 1:
            _place(out, hat * (1.0 if i % 4 == 2 else 0.6), pos)
    return out


def _pluck(freq, sr, dur, bright=6):
    t = np.arange(int(dur * sr)) / sr
    y = sum(np.sin(2 * np.pi * freq * h * t) * np.exp(-t * (5 + 3 * h)) / h for h in range(1, bright + 1))
    return y * np.minimum(1.0, t * 400)


def _bass_chords(sr, n, bpm, root, mode, rng):
    out = np.zeros(n)
    beat = 60.0 / bpm
    prog = PROGRESSIONS[mode]
    t_all = np.arange(n) / sr
    bar = 4 * beat
    # sawtooth bass on eighth notes, root of the chord, two octaves down
    bass = np.zeros(n)
    step = beat / 2
    for i in range(int(n / sr / step) + 1):
        chord = prog[int(i * step / bar) % len(prog)]
        f = _hz(root - 24 + chord[0])
        s0, s1 = int(i * step * sr), min(n, int((i + 0.8) * step * sr))
        if s0 >= n:
            break
        tt = t_all[s0:s1] - t_all[s0]
        bass[s0:s1] += (2 * ((f * tt) % 1.0) - 1.0) * np.exp(-tt * 4) * rng.uniform(0.7, 1.0)  # velocity
    out += _lowpass(bass, 500, sr) * 0.55
    # electric-piano chord stabs on the off-beats
    for i in range(int(n / sr / beat) + 1):
        chord = prog[int(i * beat / bar) % len(prog)]
        pos = int((i + 0.5) * beat * sr)
        stab = sum(_pluck(_hz(root + c), sr, beat * 0.45, bright=3) for c in chord) * 0.12 * rng.uniform(0.6, 1.0)
        _place(out, stab, pos)
    return out


def _arpeggio(sr, n, bpm, root, mode, rng):
    out = np.zeros(n)
    beat = 60.0 / bpm
    prog = PROGRESSIONS[mode]
    step = beat / 4
    pattern = [[0, 1, 2, 3, 2, 1], [0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3]][int(rng.integers(4))]
    for i in range(int(n / sr / step) + 1):
        chord = prog[int(i * step / (4 * beat)) % len(prog)]
        notes = [chord[0], chord[1], chord[2], chord[0] + 12]
        f = _hz(root + 12 + notes[pattern[i % len(pattern)]])
        _place(out, _pluck(f, sr, step * 2.5, bright=8) * 0.3 * rng.uniform(0.6, 1.0), int(i * step * sr))
    return out


def _pad(sr, n, bpm, root, mode, rng):
    out = np.zeros(n)
    prog = PROGRESSIONS[mode]
    t = np.arange(n) / sr
    chord_len = 2 * 4 * 60.0 / bpm  # two bars per chord
    for ci in range(int(n / sr / chord_len) + 1):
        s0 = int(ci * chord_len * sr)
        if s0 >= n:
            break
        s1 = min(n, int((ci + 1) * chord_len * sr) + int(0.8 * sr))
        tt = t[s0:s1] - t[s0]
        env = np.minimum(1.0, tt / 1.2) * np.minimum(1.0, (tt[-1] - tt) / 0.8 + 1e-3)
        chord = prog[ci % len(prog)]
        voice = np.zeros(s1 - s0)
        for c in chord:
            for det in (-0.07, 0.0, 0.07):  # detuned voices: a wide, warm pad
                f = _hz(root + c + det)
                voice += np.sin(2 * np.pi * f * tt + rng.uniform(0, 2 * np.pi))
        out[s0:s1] += voice * env * 0.06
    return _lowpass(out, 2500, sr)


# style -> (caption pattern, BPM choices, tonal?)
STYLES = {
    "techno_drums": ("techno drum loop, punchy four-on-the-floor kick, claps and crisp hi-hats, no melody, {bpm} BPM",
                     (122, 126, 128, 132), False),
    "funk_bass": ("funky bass groove with electric piano chord stabs, sawtooth bass line, {bpm} BPM, {key}",
                  (96, 100, 104, 110), True),
    "synth_arpeggio": ("bright plucked synth arpeggio, fast sixteenth notes, electronic, {bpm} BPM, {key}",
                       (110, 116, 120, 124), True),
    "ambient_pad": ("slow ambient pad, warm sustained detuned chords, calm, no drums, {bpm} BPM, {key}",
                    (60, 66, 70, 76), True),
}


def synth_clip(style: str, seconds: float, sample_rate: int, channels: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, str]:
    """One synthetic clip of a style: ((channels, N) float32, caption)."""
    pattern, bpms, tonal = STYLES[style]
    bpm = int(rng.choice(bpms))
    key = str(rng.choice(sorted(KEYS))) if tonal else ""
    root, mode = KEYS[key] if tonal else (60, "major")
    n = int(round(seconds * sample_rate))
    if style == "techno_drums":
        y = _drums(sample_rate, n, bpm, rng)
    elif style == "funk_bass":
        y = _bass_chords(sample_rate, n, bpm, root, mode, rng)
    elif style == "synth_arpeggio":
        y = _arpeggio(sample_rate, n, bpm, root, mode, rng)
    else:
        y = _pad(sample_rate, n, bpm, root, mode, rng)
    y = A.normalize_peak(y[None], -3.0)
    if channels == 2:
        pan = float(rng.uniform(-0.3, 0.3))
        y = np.concatenate([y * (1 - pan), y * (1 + pan)]) / (1 + abs(pan))
    return y.astype(np.float32), pattern.format(bpm=bpm, key=key)


def create_example(cfg: Config) -> list[ClipRecord]:
    """Write the synthetic example dataset into data_dir (train/, valid/, metadata.json)."""
    d = cfg.data
    data_dir = Path(d.data_dir)
    state = _load_state(data_dir)
    _check_owner(cfg, state, "example", None)
    rng = np.random.default_rng(d.split_seed)
    styles = list(STYLES)
    per_style = defaultdict(list)
    for i in range(d.example_clips):
        per_style[styles[i % len(styles)]].append(i)
    valid_ids = set()
    for style, idxs in per_style.items():
        k = min(len(idxs) - 1, max(1, round(d.valid_fraction * len(idxs))))
        valid_ids.update(idxs[-k:])
    records = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    it = range(d.example_clips)
    for i in (tqdm(it, desc="example clips", leave=False) if tqdm else it):
        style = styles[i % len(styles)]
        y, text = synth_clip(style, d.example_seconds, d.sample_rate, d.channels, rng)
        split = "valid" if i in valid_ids else "train"
        cid = f"example_{style}_{i:03d}"
        rel = f"{split}/{cid}.wav"
        A.save_wav(data_dir / rel, y, d.sample_rate)
        records.append(ClipRecord(id=cid, audio=rel, text=text, duration=round(y.shape[1] / d.sample_rate, 4),
                                  split=split, source=f"example/{style}/{i:03d}", offset=0.0))
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


def scan_audio(input_dir: Path, exclude: list[Path]) -> tuple[list[Path], Counter]:
    """Audio files under input_dir (recursive, sorted by relative path) and a count of what was ignored."""
    ignored: Counter = Counter()
    found = []
    excl = [e.resolve() for e in exclude]
    for root, dirs, files in os.walk(input_dir):
        r = Path(root).resolve()
        keep_dirs = []
        for dname in dirs:
            p = (r / dname).resolve()
            if dname.startswith(".") or any(p == e for e in excl):
                ignored["hidden or output folders"] += 1
                continue
            keep_dirs.append(dname)
        dirs[:] = sorted(keep_dirs)
        for fname in files:
            p = Path(root) / fname
            if fname.startswith("."):
                ignored["hidden files"] += 1
            elif A.is_audio_file(p):
                found.append(p)
            else:
                ignored[p.suffix.lower() or "(no extension)"] += 1
    found.sort(key=lambda p: p.relative_to(input_dir).as_posix())
    return found, ignored


# ---- captions ------------------------------------------------------------------------------
def _caption_from_obj(obj) -> Optional[str]:
    if isinstance(obj, str):
        return obj.strip()
    if not isinstance(obj, dict):
        return None
    for k in CAPTION_KEYS:
        if isinstance(obj.get(k), str) and obj[k].strip():
            return obj[k].strip()
    # audiocraft-style metadata: compose from fields
    parts = []
    for k in ("genre", "moods", "mood", "instrument", "instruments", "keywords"):
        v = obj.get(k)
        if isinstance(v, list):
            v = ", ".join(str(x) for x in v if x)
        if v:
            parts.append(str(v))
    if obj.get("bpm"):
        parts.append(f"{obj['bpm']} BPM")
    if obj.get("key"):
        parts.append(str(obj["key"]))
    return ", ".join(parts) or None


def read_captions_file(path: Path) -> dict[str, str]:
    """CSV (columns file_name,text or two columns), JSON ({file: text} or a list of objects) or JSONL."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"captions file {path} cannot be read ({e}); save it as UTF-8.") from None
    out: dict[str, str] = {}

    def add(obj, where):
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected an object with file_name and text")
        f = next((obj[k] for k in FILE_KEYS if isinstance(obj.get(k), str)), None)
        t = _caption_from_obj(obj)
        if f is None:
            raise UserError(f"{where}: no file column (one of {', '.join(FILE_KEYS)})")
        out[f.replace("\\", "/")] = t or ""

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    add(json.loads(line), f"{path} line {i}")
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i} is not valid JSON ({e}).") from None
    elif suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}).") from None
        if isinstance(data, dict) and isinstance(data.get("clips"), list):
            data = data["clips"]
        if isinstance(data, dict):
            for k, v in data.items():
                out[k.replace("\\", "/")] = _caption_from_obj(v) or ""
        elif isinstance(data, list):
            for i, obj in enumerate(data):
                add(obj, f"{path} entry {i}")
        else:
            raise UserError(f"{path}: expected {{file: caption}} or a list of objects.")
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.reader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        rows = [r for r in rows if r and any(c.strip() for c in r)]
        if not rows:
            return out
        head = [c.strip().lower() for c in rows[0]]
        fcol = next((head.index(k) for k in FILE_KEYS if k in head), None)
        tcol = next((head.index(k) for k in CAPTION_KEYS if k in head), None)
        if fcol is not None and tcol is not None:
            body = rows[1:]
        else:
            fcol, tcol, body = 0, 1, rows
        for i, r in enumerate(body):
            if len(r) <= max(fcol, tcol):
                raise UserError(f"{path} row {i + 2}: expected a file name and a caption, got {r!r}")
            out[r[fcol].strip().replace("\\", "/")] = r[tcol].strip()
    else:
        raise UserError(f"captions file {path}: use .csv, .tsv, .json or .jsonl")
    return out


class Captioner:
    """Caption of a recording: sidecar .txt/.json > captions_file > metadata.jsonl/csv in input_dir >
    default_text > caption_template."""

    def __init__(self, input_dir: Path, captions_file: Optional[str], default_text: Optional[str], template: str):
        self.input_dir = input_dir
        self.default_text = default_text
        self.template = template
        self.tables: list[tuple[str, dict[str, str]]] = []
        if captions_file:
            self.tables.append(("captions_file", read_captions_file(Path(captions_file))))
        for name in ("metadata.jsonl", "metadata.csv"):
            p = input_dir / name
            if p.is_file():
                self.tables.append((name, read_captions_file(p)))
        self.used_keys: set[tuple[str, str]] = set()

    def __call__(self, src: Path, rel: str) -> tuple[str, str]:
        """(caption, where it came from)."""
        for ext in (".txt", ".json"):
            side = src.with_suffix(ext)
            if side.is_file() and side != src:
                try:
                    raw = side.read_text(encoding="utf-8-sig")
                except (OSError, UnicodeDecodeError) as e:
                    log.warning("caption file %s unreadable (%s); ignored", side, e)
                    continue
                if ext == ".txt":
                    text = " ".join(raw.split())
                else:
                    try:
                        text = _caption_from_obj(json.loads(raw)) or ""
                    except json.JSONDecodeError:
                        log.warning("caption file %s is not valid JSON; ignored", side)
                        continue
                if text:
                    return text, "sidecar"
        name = Path(rel).name
        for label, table in self.tables:
            for key in (rel, name, Path(rel).stem):
                if key in table and table[key]:
                    self.used_keys.add((label, key))
                    return " ".join(table[key].split()), label
        if self.default_text:
            return self.default_text, "default_text"
        if self.template:
            p = Path(rel)
            folder = p.parent.name if p.parent.as_posix() != "." else self.input_dir.name
            text = self.template.format(stem=p.stem.replace("_", " ").strip(), folder=folder, name=p.name)
            return " ".join(text.split()), "template"
        return "", "none"

    def unused(self) -> list[str]:
        out = []
        for label, table in self.tables:
            names = {k for (lb, k) in self.used_keys if lb == label}
            out += [f"{label}: {k}" for k in table if k not in names]
        return out


# ---- the per-file worker (runs in a worker process) -----------------------------------------
def process_file(job: dict) -> dict:
    """Decode one recording block by block and write its clips. Returns a JSON-able result.

    Never raises for a bad file: the failure is returned with its reason.
    """
    t0 = time.perf_counter()
    src, rel, data_dir = job["src"], job["rel"], Path(job["data_dir"])
    res = {"rel": rel, "ok": False, "reason": "", "warnings": [], "clips": [], "tail_seconds": 0.0,
           "silent_segments": 0, "size": job["size"], "mtime_ns": job["mtime_ns"], "settings": job["settings"]}
    sr, ch = job["sample_rate"], job["channels"]
    try:
        res["sha1"] = A.file_hash(src)
    except OSError as e:
        res["reason"] = f"cannot read the file ({e})"
        return res
    base = clip_base(rel)
    cutter = A.ClipCutter(sr, job["segment_seconds"], job["min_seconds"], trim_silence=job["trim_silence"],
                          silence_db=job["silence_db"])
    header_seconds = None
    try:
        header_seconds = A.audio_info(src).duration
    except A.AudioError as e:
        res["reason"] = str(e).replace(f"{src}: ", "")
        return res
    error = None

    def emit(pieces):
        for off, clip in pieces:
            idx = len(res["clips"]) + res["silent_segments"]
            if A.rms_db(clip) < job["silence_db"]:
                res["silent_segments"] += 1
                continue
            name = f"{base}_{idx:03d}.wav"
            A.save_wav(data_dir / "train" / name, clip, sr)
            c = {"index": idx, "name": name, "file": f"train/{name}", "offset": round(off / sr, 4),
                 "duration": round(clip.shape[1] / sr, 4), "pcm_hash": A.pcm16_hash(clip)}
            if job["enrich"]:
                c.update(A.estimate_tempo_key(clip, sr))
            res["clips"].append(c)

    try:
        for block in A.iter_audio(src, sr, ch):
            emit(cutter.push(block))
    except A.AudioError as e:
        error = str(e)
    emit(cutter.finish())
    decoded = cutter.total_samples / sr
    res.update(source_seconds=round(decoded, 3), lead_seconds=round(cutter.lead_samples / sr, 3),
               trail_seconds=round(cutter.trail_samples / sr, 3), tail_seconds=round(cutter.tail_samples / sr, 3),
               decode_seconds=round(time.perf_counter() - t0, 3))
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
    return res


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
    d = cfg.data
    input_dir = Path(d.input_dir).resolve()
    data_dir = Path(d.data_dir).resolve()
    state = _load_state(data_dir)
    _check_owner(cfg, state, "input", str(input_dir))
    if d.overwrite:
        state = {"clip_files": state.get("clip_files", [])}
    exclude = [data_dir / s for s in SPLITS]
    if data_dir != input_dir and input_dir in data_dir.parents:
        exclude.append(data_dir)  # output inside input: never scan our own clips
    files, ignored = scan_audio(input_dir, exclude)
    if not files:
        raise UserError(f"No audio files found in {input_dir} (looked for {', '.join(A.AUDIO_EXTENSIONS)}, "
                        f"recursively). Check --input_dir.")
    log.info("found %d audio files in %s", len(files), input_dir)
    captioner = Captioner(input_dir, d.captions_file, d.default_text, d.caption_template)
    settings = _settings_key(d)
    workers = d.num_workers or os.cpu_count() or 1
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    (data_dir / "valid").mkdir(parents=True, exist_ok=True)

    prev_sources = state.get("sources", {})
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
    t0 = time.perf_counter()
    last_save = [time.monotonic()]
    old_files = list(state.get("clip_files", []))

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

    try:
        for r in _run_jobs("process_file", jobs, workers, "decoding", on_result=checkpoint):
            results[r["rel"]] = r
    except (UserError, KeyboardInterrupt):
        checkpoint(force=True)
        raise
    for r in _run_jobs("enrich_existing", enrich_jobs, workers, "tempo/key"):
        for c in results[r["rel"]]["clips"]:
            c.update(r["enrich"].get(c["file"], {}))
    wall = time.perf_counter() - t0

    # ---- duplicates: same file content, then identical clips from different recordings -------------
    order = sorted(results)
    duplicates, seen_file, seen_clip = [], {}, {}
    for rel in order:
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
    usable = [rel for rel in order if results[rel].get("ok") and not results[rel].get("duplicate_of")
              and any(not c.get("duplicate") for c in results[rel]["clips"])]
    if not usable:
        _write_report(data_dir, d, input_dir, results, files, ignored, duplicates, [], {},
                      {j["rel"] for j in jobs}, 0, wall, captioner)
        raise UserError(f"None of the {len(files)} audio files gave a usable clip; see {data_dir / REPORT_FILE} "
                        f"for each file's reason.")
    valid_set = _split(usable, d.valid_fraction, d.split_seed)

    # ---- place clips, caption them, build the metadata ---------------------------------------------
    records: list[ClipRecord] = []
    caption_sources: Counter = Counter()
    uncaptioned = []
    for rel in usable:
        r = results[rel]
        split = "valid" if rel in valid_set else "train"
        text, where = captioner(input_dir / rel, rel)
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
    # clips of duplicates are not kept
    for rel in order:
        r = results[rel]
        for c in r.get("clips", []):
            if (r.get("duplicate_of") or c.get("duplicate")) and (data_dir / c["file"]).is_file():
                (data_dir / c["file"]).unlink()
        if r.get("duplicate_of"):
            r["clips"] = []
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
    return _write_report(data_dir, d, input_dir, results, files, ignored, duplicates, uncaptioned, caption_sources,
                         decoded_rels, len(records), wall, captioner, records)


def _enrich_text(text: str, c: dict) -> str:
    add = []
    if c.get("bpm") and "bpm" not in text.lower():
        add.append(f"{c['bpm']:.0f} BPM")
    if c.get("key") and not re.search(r"\b(major|minor)\b", text.lower()):
        add.append(c["key"])
    if not add:
        return text
    return ", ".join([text] + add) if text else ", ".join(add)


def _write_report(data_dir, d, input_dir, results, files, ignored, duplicates, uncaptioned, caption_sources,
                  decoded: set, n_clips, wall, captioner, records=()) -> dict:
    n_decoded = len(decoded)
    skipped = [{"file": rel, "reason": r["reason"]} for rel, r in sorted(results.items()) if not r.get("ok")]
    warnings = [{"file": rel, "warning": w} for rel, r in sorted(results.items()) for w in r.get("warnings", [])]
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
        "unused_caption_entries": captioner.unused()[:200], "ignored_files": dict(ignored),
    }
    atomic_write_json(data_dir / REPORT_FILE, report)
    # ---- on screen -------------------------------------------------------------------------------
    for s in skipped:
        log.warning("skipped %s: %s", s["file"], s["reason"])
    for w in warnings:
        log.warning("%s: %s", w["file"], w["warning"])
    for dup in duplicates:
        log.warning("duplicate (%s): %s is the same as %s; kept once", dup["kind"], dup["file"], dup["same_as"])
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
    print(f"Prepared {n_clips} clips ({human_seconds(seconds)}) from {report['files_used']} of {len(files)} files: "
          f"train {report['clips']['train']}, valid {report['clips']['valid']}; decoded {n_decoded} file(s), "
          f"reused {report['files_reused']}; skipped {len(skipped)}, duplicates {len(duplicates)}, "
          f"short tails dropped {len(tails)}. Report: {data_dir / REPORT_FILE}")
    return report


# ============================================================================================
# --validate (also used by test_dataset.py)
# ============================================================================================
class DataSummary:
    def __init__(self, data_dir: Path, mpath: Path):
        self.data_dir, self.mpath = data_dir, mpath
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.records: list[ClipRecord] = []
        self.sample_rate: Optional[int] = None
        self.channels: Optional[int] = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"Data folder: {self.data_dir}  (metadata: {self.mpath.name})"]
        recs = self.records
        if recs:
            for s in SPLITS:
                rs = [r for r in recs if r.split == s]
                lines.append(f"  {s:5s}: {len(rs):5d} clips, {human_seconds(sum(r.duration for r in rs)):>9s}, "
                             f"{len({r.source or r.id for r in rs})} recordings")
            total = sum(r.duration for r in recs)
            lines.append(f"  total: {len(recs):5d} clips, {total / 3600:.3f} h; "
                         f"{self.sample_rate or '?'} Hz, {self.channels or '?'} channel(s)")
            lines.append("  clip durations (s):")
            lines += ["    " + ln for ln in duration_histogram([r.duration for r in recs])]
            words = np.array([len(r.text.split()) for r in recs])
            lines.append(f"  caption words: min {words.min()}, median {int(np.median(words))}, max {words.max()}; "
                         f"empty {int((words == 0).sum())}; distinct captions {len({r.text for r in recs})}")
        for w in self.warnings[:20]:
            lines.append(f"  warning: {w}")
        if len(self.warnings) > 20:
            lines.append(f"  ... and {len(self.warnings) - 20} more warnings")
        if self.problems:
            lines.append(f"PROBLEMS ({len(self.problems)}):")
            lines += [f"  - {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"  ... and {len(self.problems) - 50} more")
        else:
            lines.append("Data check: OK")
        return "\n".join(lines)


def duration_histogram(durations, width: int = 40) -> list[str]:
    edges = [0, 1, 2, 5, 10, 15, 20, 25, 30, 60, math.inf]
    # bins (lo, hi]: a 30 s clip counts as 25-30
    idx = np.clip(np.searchsorted(np.array(edges), np.asarray(durations, dtype=float), side="left") - 1, 0,
                  len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return ["(no clips)"]
    top = counts.max()
    out = []
    for i in range(nz[0], nz[-1] + 1):
        hi = "inf" if edges[i + 1] == math.inf else f"{edges[i + 1]:g}"
        bar = "#" * max(1 if counts[i] else 0, int(round(width * counts[i] / top)))
        out.append(f"{edges[i]:>3g}-{hi:<4s} {bar} {counts[i]}")
    return out


def check_data_dir(data_dir, metadata_file: str = "metadata.json", *, sample_rate: Optional[int] = None,
                   hash_content: bool = True, tolerance: float = 0.05) -> DataSummary:
    """Check every clip of a data folder: readable, sample rate, channels, duration vs metadata, captions,
    duplicates, split leakage. Problems fail the check; warnings do not."""
    import soundfile as sf

    data_dir = Path(data_dir)
    mpath = metadata_path(data_dir, metadata_file)
    s = DataSummary(data_dir, mpath)
    s.records = load_metadata(data_dir, metadata_file, check_files=False)
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        doc = {}
    meta = doc if isinstance(doc, dict) else {}
    s.sample_rate = meta.get("sample_rate") or sample_rate
    s.channels = meta.get("channels")
    if sample_rate and meta.get("sample_rate") and meta["sample_rate"] != sample_rate:
        s.problems.append(f"{mpath.name} says sample_rate {meta['sample_rate']}, the config expects {sample_rate}; "
                          f"prepare the data again with --sample_rate {sample_rate}")
    if not s.records:
        s.problems.append(f"{mpath} lists no clips")
        return s
    ids, paths, hashes = Counter(), Counter(), defaultdict(list)
    for r in s.records:
        ids[r.id] += 1
        paths[str(r.path)] += 1
        where = f"{r.audio}"
        if not r.path.is_file():
            s.problems.append(f"{where}: file missing")
            continue
        try:
            info = sf.info(str(r.path))
        except (sf.LibsndfileError, RuntimeError) as e:
            s.problems.append(f"{where}: unreadable ({str(e).splitlines()[0]})")
            continue
        if s.sample_rate and info.samplerate != s.sample_rate:
            s.problems.append(f"{where}: {info.samplerate} Hz, expected {s.sample_rate} Hz")
        if s.channels and info.channels != s.channels:
            s.problems.append(f"{where}: {info.channels} channel(s), expected {s.channels}")
        dur = info.frames / info.samplerate
        if r.duration and abs(dur - r.duration) > tolerance:
            s.problems.append(f"{where}: {dur:.2f} s long, metadata says {r.duration:.2f} s")
        if info.frames == 0:
            s.problems.append(f"{where}: empty file")
        if not r.text:
            s.warnings.append(f"{where}: empty caption (only trains the unconditional branch)")
        if hash_content:
            hashes[A.file_hash(r.path)].append(r.audio)
    for k, n in ids.items():
        if n > 1:
            s.problems.append(f"id {k} appears {n} times")
    for k, n in paths.items():
        if n > 1:
            s.problems.append(f"audio file {k} is listed {n} times")
    for same in hashes.values():
        if len(same) > 1:
            s.warnings.append(f"identical audio: {', '.join(same[:5])}")
    by_split = defaultdict(set)
    for r in s.records:
        if r.source:
            by_split[r.split].add(r.source)
    leak = by_split["train"] & by_split["valid"]
    if leak:
        s.problems.append(f"{len(leak)} recording(s) have clips in both train and valid (leakage), e.g. "
                          f"{sorted(leak)[0]}; re-run prepare_data.py to split by recording")
    n_train = sum(r.split == "train" for r in s.records)
    n_valid = len(s.records) - n_train
    if n_train == 0:
        s.problems.append("no train clips")
    if n_valid == 0:
        s.warnings.append("no valid clips: training cannot measure held-out loss (set valid_fraction > 0)")
    if n_train and n_train < 50:
        s.warnings.append(f"only {n_train} train clips; 50-100 is a minimum for a real style, 200-500 recommended")
    return s


if __name__ == "__main__":
    from lora.utils import run_main

    sys.exit(run_main(main))
