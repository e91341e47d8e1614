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

This script holds the run (settings, ownership of the output folder, scanning, the per-file worker, reuse and
checkpoints, duplicates, split, the report). Its parts live in library modules: captions.py (where a caption
comes from), example_data.py (the synthetic --create_example set) and data_check.py (the --validate check,
shared with test_dataset.py).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
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
from lora.utils import UserError, atomic_write_json, human_seconds, log

STATE_FILE = "prepare_state.json"
REPORT_FILE = "prepare_report.json"
CONFIG_FILE = "prepare_config.yaml"
STATE_VERSION = 1
CHECKPOINT_SECONDS = 30.0  # how often an --input_dir run saves its progress (prepare_state.json)

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
# --create_example: the synthetic example set (synthesised and written by example_data.py)
# ============================================================================================
def create_example(cfg: Config) -> list[ClipRecord]:
    """Write the synthetic example dataset into data_dir (train/, valid/, metadata.json)."""
    d = cfg.data
    data_dir = Path(d.data_dir)
    state = _load_state(data_dir)
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
    """The --input_dir run: scan, plan (reuse what an earlier run made), decode, drop duplicates, split,
    caption, write the dataset and its report. Returns the report."""
    d = cfg.data
    input_dir = Path(d.input_dir).resolve()
    data_dir = Path(d.data_dir).resolve()
    state = _load_state(data_dir)
    _check_owner(cfg, state, "input", str(input_dir))
    if d.overwrite:
        state = {"clip_files": state.get("clip_files", [])}
    files, ignored = _find_sources(input_dir, data_dir)
    captioner = Captioner(input_dir, d.captions_file, d.default_text, d.caption_template)
    workers = d.num_workers or os.cpu_count() or 1
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    (data_dir / "valid").mkdir(parents=True, exist_ok=True)

    results, jobs, enrich_jobs = _plan_jobs(d, files, input_dir, data_dir, state.get("sources", {}))
    t0 = time.perf_counter()
    _run_with_checkpoints(jobs, results, workers, input_dir, data_dir, state)
    _enrich_reused(enrich_jobs, results, workers)
    wall = time.perf_counter() - t0

    duplicates = _find_duplicates(results)
    usable = _usable_recordings(results)
    if not usable:
        _write_report(data_dir, d, input_dir, results, files, ignored, duplicates, [], {},
                      {j["rel"] for j in jobs}, 0, wall, captioner)
        raise UserError(f"None of the {len(files)} audio files gave a usable clip; see {data_dir / REPORT_FILE} "
                        f"for each file's reason.")
    valid_set = _split(usable, d.valid_fraction, d.split_seed)
    records, caption_sources, uncaptioned = _place_clips(d, input_dir, data_dir, results, usable, valid_set,
                                                          captioner)
    _delete_duplicate_clips(data_dir, results)
    decoded_rels = _write_dataset(cfg, input_dir, data_dir, state, results, records)
    return _write_report(data_dir, d, input_dir, results, files, ignored, duplicates, uncaptioned, caption_sources,
                         decoded_rels, len(records), wall, captioner, records)


def _find_sources(input_dir: Path, data_dir: Path) -> tuple[list[Path], Counter]:
    """The audio files of input_dir (never our own clips when the output is inside the input)."""
    exclude = [data_dir / s for s in SPLITS]
    if data_dir != input_dir and input_dir in data_dir.parents:
        exclude.append(data_dir)  # output inside input: never scan our own clips
    files, ignored = scan_audio(input_dir, exclude)
    if not files:
        raise UserError(f"No audio files found in {input_dir} (looked for {', '.join(A.AUDIO_EXTENSIONS)}, "
                        f"recursively). Check --input_dir.")
    log.info("found %d audio files in %s", len(files), input_dir)
    return files, ignored


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
    the run stops on an error or Ctrl-C, so a rerun resumes without decoding finished files."""
    prev_sources = state.get("sources", {})
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
                 valid_set: set[str], captioner: Captioner) -> tuple[list[ClipRecord], Counter, list[str]]:
    """Move each kept clip into its split's folder, caption it, and build its record.
    Returns (records, how many recordings each caption source captioned, uncaptioned recordings)."""
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


if __name__ == "__main__":
    from lora.utils import run_main

    sys.exit(run_main(main))
