"""The prepare run of ``prepare_data.py``: --create_example, and --input_dir (scan, reuse what an
earlier run made, decode in workers with checkpoints, drop duplicates, split by recording, caption,
write the dataset and its report).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, disk_full_message, human_bytes, human_seconds, log, on_interrupt
from lora.common.files import atomic_write_json, check_free_space, check_output_dir
from lora.config import Config
from lora.dataprep import audio as A
from lora.dataprep import autocaption, review, vocal_removal, worker
from lora.dataprep.captions import Captioner, clip_caption
from lora.dataprep.example_data import STYLES, write_example_clips
from lora.dataprep.ownership import (
    CONFIG_FILE,
    REPORT_FILE,
    STATE_FILE,
    STATE_VERSION,
    _check_owner,
    _check_split_overlap,
    _check_written_files,
    _load_state,
    _remove_stale,
)
from lora.dataprep.scan import Found, Scan, _find_sources, _no_audio_message
from lora.dataprep.worker import DISK_FULL
from lora.dataset import (
    SPLITS,
    ClipRecord,
    load_metadata,
    metadata_document,
    metadata_path,
    metadata_trigger,
    resolve_trigger,
)

CHECKPOINT_SECONDS = 30.0  # how often an --input_dir run saves its progress (prepare_state.json)


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
    settings = {"clips": d.example_clips, "seconds": d.example_seconds, "sample_rate": d.sample_rate,
                "channels": d.channels, "valid_fraction": d.valid_fraction, "seed": d.split_seed,
                "metadata_file": d.metadata_file}
    if not d.overwrite and _example_intact(data_dir, state, settings):
        log.info("example dataset: already in %s with these settings, every clip as written: nothing "
                 "to do (--overwrite writes it again)", data_dir)
        return load_metadata(data_dir, d.metadata_file)
    records = write_example_clips(data_dir, clips=d.example_clips, seconds=d.example_seconds,
                                  sample_rate=d.sample_rate, channels=d.channels,
                                  valid_fraction=d.valid_fraction, seed=d.split_seed)
    files = [r.audio for r in records]
    removed = _remove_stale(data_dir, state.get("clip_files"), files)
    atomic_write_json(metadata_path(data_dir, d.metadata_file),
                      metadata_document(records, d.sample_rate, d.channels))
    atomic_write_json(data_dir / STATE_FILE,
                      {"version": STATE_VERSION, "mode": "example", "input_dir": None,
                       "clip_files": files, "sources": {}, "example_settings": settings,
                       "clip_sha1": {f: A.file_hash(data_dir / f) for f in files}})
    report = {"mode": "example", "data_dir": str(data_dir), "clips": Counter(r.split for r in records),
              "styles": list(STYLES), "seconds": sum(r.duration for r in records),
              "stale_removed": removed}
    atomic_write_json(data_dir / REPORT_FILE, report)
    cfg.save(data_dir / CONFIG_FILE)
    log.info("example dataset: %d clips (%s) of %s styles in %s", len(records),
             ", ".join(f"{k} {v}" for k, v in report["clips"].items()), len(STYLES), data_dir)
    return records


def _example_intact(data_dir: Path, state: dict, settings: dict) -> bool:
    """The example set of ``state`` was made with these settings, and its metadata and every clip are
    there as written (by content)."""
    sha1 = state.get("clip_sha1") or {}
    if state.get("mode") != "example" or state.get("example_settings") != settings or not sha1:
        return False
    if not metadata_path(data_dir, settings["metadata_file"]).is_file():
        return False
    return all((data_dir / f).is_file() and A.file_hash(data_dir / f) == h for f, h in sha1.items())


# ---- the run -------------------------------------------------------------------------------
def _settings_key(d, separation: Optional[dict] = None) -> dict:
    key = {"sample_rate": d.sample_rate, "channels": d.channels, "segment_seconds": d.segment_seconds,
           "min_seconds": d.min_seconds, "trim_silence": d.trim_silence, "silence_db": d.silence_db}
    if separation:  # (only then: the states of runs without separation stay valid)
        key["separate"] = separation
    return key


def _wants_tempo(d) -> bool:
    """Tempo/key estimates are made for --enrich_captions, and for auto captions that use them."""
    if not d.auto_caption:
        return d.enrich_captions
    return d.enrich_captions or bool({"bpm", "key"} & set(autocaption.template_fields(d.auto_caption_template)))


def _split(recordings: list[str], valid_fraction: float, seed: int) -> set[str]:
    """Deterministic split by recording: the recordings with the lowest hash(seed, path) go to
    valid."""
    if valid_fraction <= 0 or len(recordings) < 2:
        return set()
    ranked = sorted(recordings, key=lambda r: hashlib.sha1(f"{seed}:{r}".encode("utf-8")).hexdigest())
    k = min(len(ranked) - 1, max(1, round(valid_fraction * len(ranked))))
    return set(ranked[:k])


def prepare_folder(cfg: Config) -> dict:
    """The --input_dir run: check the folders, scan, plan (reuse what an earlier run made), decode,
    drop duplicates, split, caption, write the dataset and its report. Returns the report."""
    d = cfg.data
    input_dir = Path(d.input_dir).resolve()
    data_dir = Path(d.data_dir).resolve()
    _check_split_overlap(input_dir, data_dir)
    check_output_dir(d.data_dir, "--output_dir")
    state = _load_state(data_dir, d.overwrite)
    _check_written_files(d, input_dir, data_dir, owned=bool(state))
    _check_owner(cfg, state, "input", str(input_dir))
    review.check_table_free(data_dir, state)
    trigger = _trigger(d, data_dir, state)
    if d.overwrite:
        state = {"clip_files": state.get("clip_files", []),
                 "captions_csv_sha1": state.get("captions_csv_sha1")}
    scan = _find_sources(input_dir, data_dir, state)
    captioner = Captioner(input_dir, d.captions_file, d.default_text, d.caption_template)
    workers = d.num_workers or os.cpu_count() or 1
    sep_key = vocal_removal.separation_key(cfg)
    results, jobs, enrich_jobs = _plan_jobs(d, scan.files, input_dir, data_dir, state.get("sources", {}),
                                            sep_key)
    kept = _keep_unreadable(scan, jobs, results, data_dir, state.get("sources", {}))
    if not scan.files and not kept:
        raise UserError(_no_audio_message(input_dir, scan))
    _check_space(d, jobs, data_dir, state.get("sources", {}))
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    (data_dir / "valid").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    separation = vocal_removal.separate_jobs(cfg, jobs, data_dir, sep_key)
    _run_with_checkpoints(jobs, results, workers, input_dir, data_dir, state)
    review.carry_edits(state.get("sources", {}), results)
    _enrich_reused(enrich_jobs, results, workers)
    wall = time.perf_counter() - t0

    duplicates = _find_duplicates(results)
    usable = _usable_recordings(results)
    found = Found(scan, kept)
    found.separation = separation
    if not usable:
        _write_report(data_dir, d, input_dir, results, found, duplicates, [], {},
                      {j["rel"] for j in jobs}, 0, wall, captioner)
        raise UserError(f"None of the {len(scan.files)} audio files gave a usable clip; see "
                        f"{data_dir / REPORT_FILE} for each file's reason.")
    valid_set = _split(usable, d.valid_fraction, d.split_seed)
    captions = _recording_captions(input_dir, results, usable, captioner, kept)
    if d.auto_caption:
        autocaption.tag_recordings(cfg, data_dir, results, [rel for rel in usable if d.auto_caption_replace
                                                            or captions[rel][1] in ("template", "none")])
    records, caption_sources, uncaptioned = _place_clips(d, data_dir, results, usable, valid_set, captions)
    _delete_duplicate_clips(data_dir, results)
    decoded_rels = _write_dataset(cfg, input_dir, data_dir, state, results, records, trigger)
    return _write_report(data_dir, d, input_dir, results, found, duplicates, uncaptioned, caption_sources,
                         decoded_rels, len(records), wall, captioner, records)


def _trigger(d, data_dir: Path, state: dict) -> tuple[str, str]:
    """The trigger word this run records: none with trigger_position off, data.trigger_word when
    given, else the one the folder's metadata.json (made by an earlier run) records."""
    if d.trigger_position == "off" or d.trigger_word is not None:
        return resolve_trigger(d)
    return metadata_trigger(data_dir, d.metadata_file) if state else ("", "start")


def _keep_unreadable(scan: Scan, jobs: list[dict], results: dict[str, dict], data_dir: Path,
                     prev_sources: dict
                     ) -> dict[str, str]:
    """Sources of the last run that cannot be read now (their folder or file is unreadable, a broken
    or looping link) keep their earlier result and clips (reused; removed from jobs). Returns {rel:
    reason}."""
    found = {j["rel"] for j in jobs} | set(results)
    problems = {u["path"]: u["reason"] for u in scan.unreadable} | {x["file"]: x["reason"]
                                                                    for x in scan.links}
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
        r["clips"] = [c for c in r.get("clips", []) if c.get("duplicate")
                      or (data_dir / c["file"]).is_file()]
        results[rel] = dict(r, reused=True)
    if kept:
        log.warning("%d file(s) of the last run cannot be read now: kept their earlier clips (%s)",
                    len(kept), ", ".join(sorted(kept)[:5]) + (" ..." if len(kept) > 5 else ""))
    return kept


def _check_space(d, jobs: list[dict], data_dir: Path, prev_sources: dict) -> None:
    """Refuse before decoding when the disk of data_dir clearly lacks the space the clips will take:
    the sources' seconds (from their headers) x sample_rate x channels x 2 bytes, less the clips
    they replace. Each job gets its estimate (est_bytes), for the message of a disk that fills up
    anyway."""
    # 16-bit clips; with separation also the float32 instrumental in the cache
    per_second = d.sample_rate * d.channels * (2 if d.separate == "none" else 6)
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
        check_free_space(data_dir, need,
                         f"the clips of {len(jobs)} file(s) ({human_seconds(seconds)} of audio at "
                                         f"{d.sample_rate} Hz, {d.channels} channel(s), 16-bit)")


def _plan_jobs(d, files: list[Path], input_dir: Path, data_dir: Path, prev_sources: dict,
               separation: Optional[dict] = None) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """(results reused from the last run, decode jobs, tempo/key jobs for reused clips).

    A file is reused when its size, mtime and the clip settings are unchanged and its clips still
    exist; a duplicate (it kept no clips of its own) only while what it duplicates is reused too."""
    settings = _settings_key(d, separation)
    results: dict[str, dict] = {}
    jobs, enrich_jobs = [], []
    unchanged = set()
    for src in files:
        rel = src.relative_to(input_dir).as_posix()
        st = src.stat()
        prev = prev_sources.get(rel)
        if (prev and prev.get("size") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns
                and prev.get("settings") == settings
                and all((data_dir / c["file"]).is_file() for c in prev.get("clips", [])
                        if not c.get("duplicate"))):
            unchanged.add(rel)
    for src in files:
        rel = src.relative_to(input_dir).as_posix()
        st = src.stat()
        prev = prev_sources.get(rel)
        # a duplicate kept no clips of its own: reuse it only while what it duplicates is unchanged
        refs = {prev.get("duplicate_of")} | {c.get("duplicate_of")
                                             for c in prev.get("clips", [])} if prev else set()
        if rel in unchanged and refs - {None} <= unchanged:
            results[rel] = json.loads(json.dumps(prev))
            results[rel]["reused"] = True
            if _wants_tempo(d) and any("bpm" not in c for c in prev.get("clips", [])):
                enrich_jobs.append({"rel": rel, "files": [c["file"] for c in prev["clips"]],
                                    "data_dir": str(data_dir), "sample_rate": d.sample_rate})
            continue
        jobs.append({"src": str(src), "rel": rel, "data_dir": str(data_dir), "size": st.st_size,
                     "mtime_ns": st.st_mtime_ns, "settings": settings, "sample_rate": d.sample_rate,
                     "channels": d.channels, "segment_seconds": d.segment_seconds,
                     "min_seconds": d.min_seconds,
                     "trim_silence": d.trim_silence, "silence_db": d.silence_db,
                     "enrich": _wants_tempo(d)})
    if results:
        log.info("%d file(s) unchanged since the last run: reusing their clips", len(results))
    return results, jobs, enrich_jobs


def _run_with_checkpoints(jobs: list[dict], results: dict[str, dict], workers: int, input_dir: Path,
                          data_dir: Path, state: dict) -> None:
    """Decode the jobs into results, saving progress (prepare_state.json) every CHECKPOINT_SECONDS
    and when the run stops on an error, a full disk or Ctrl-C, so a rerun resumes without decoding
    finished files."""
    prev_sources = state.get("sources", {})
    last_save = [time.monotonic()]
    old_files = list(state.get("clip_files", []))
    unsaved: list[str] = []  # why the progress could not be saved, when it could not

    def checkpoint(r=None, force=False):
        """Save progress now and then, so an interrupted run resumes without decoding finished
        files."""
        if r is not None:
            results[r["rel"]] = r
        if not force and time.monotonic() - last_save[0] < CHECKPOINT_SECONDS:
            return
        last_save[0] = time.monotonic()
        sources = dict(prev_sources)
        sources.update({k: v for k, v in results.items() if not v.get("reused")})
        files_now = sorted(set(old_files)
                           | {c["file"] for v in results.values() for c in v.get("clips", [])})
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
            for r in worker.run_jobs(worker.process_file, jobs, workers, "decoding",
                                     on_result=checkpoint):
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
        return (f"the progress could not be saved in {data_dir / STATE_FILE} ({unsaved[-1]}); "
                f"running the same command again decodes the files finished since its last save again")
    done = [r for r in results.values() if not r.get("reused")]
    if not done or not (data_dir / STATE_FILE).is_file():
        return ("no file was finished yet, so there is no progress to keep; run the same command "
                "again to start over")
    return (f"progress of {len(done)} finished file(s) is saved in {data_dir / STATE_FILE}; run "
            f"the same command again to continue: finished files are not decoded again")


def _enrich_reused(enrich_jobs: list[dict], results: dict[str, dict], workers: int) -> None:
    """Add tempo/key to the reused clips that lack it (a rerun that adds --enrich_captions)."""
    for r in worker.run_jobs(worker.enrich_existing, enrich_jobs, workers, "tempo/key"):
        for c in results[r["rel"]]["clips"]:
            c.update(r["enrich"].get(c["file"], {}))


def _find_duplicates(results: dict[str, dict]) -> list[dict]:
    """Mark duplicates in results: same file content (duplicate_of on the file), then identical
    clips of different recordings (duplicate/duplicate_of on the clip); the first by path is kept.
    Returns them."""
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
                duplicates.append({"file": f"{rel} (clip {c['index']})",
                                   "same_as": f"{other[0]} (clip {other[1]})",
                                   "kind": "identical clip"})
                c["duplicate"], c["duplicate_of"] = True, other[0]
                continue
            seen_clip.setdefault(c["pcm_hash"], (rel, c["index"]))
    return duplicates


def _usable_recordings(results: dict[str, dict]) -> list[str]:
    """Recordings (sorted) that keep at least one clip: decoded fine, not a duplicate file."""
    return [rel for rel in sorted(results) if results[rel].get("ok")
            and not results[rel].get("duplicate_of")
            and any(not c.get("duplicate") for c in results[rel]["clips"])]


def _recording_captions(input_dir: Path, results: dict[str, dict], usable: list[str],
                        captioner: Captioner, kept: dict) -> dict[str, tuple[str, str]]:
    """(caption, where it came from) of each usable recording (a source that cannot be read now
    keeps the caption of the run that made its clips)."""
    out = {}
    for rel in usable:
        r = results[rel]
        if rel in kept and "caption" in r:
            out[rel] = r["caption"], r.get("caption_source", "earlier run")
        else:
            out[rel] = captioner(input_dir / rel, rel)
        r["caption"], r["caption_source"] = out[rel]
    return out


def _place_clips(d, data_dir: Path, results: dict[str, dict], usable: list[str], valid_set: set[str],
                 captions: dict[str, tuple[str, str]]) -> tuple[list[ClipRecord], Counter, list[str]]:
    """Move each kept clip into its split's folder, caption it (captions.clip_caption: an edit,
    an auto caption or the recording's own) and build its record. Returns (records, how many
    recordings each caption source captioned, uncaptioned recordings)."""
    records: list[ClipRecord] = []
    caption_sources: Counter = Counter()
    uncaptioned = []
    for rel in usable:
        r = results[rel]
        split = "valid" if rel in valid_set else "train"
        stem = Path(rel).stem.replace("_", " ").strip()
        sources, texts = Counter(), []
        for c in r["clips"]:
            if c.get("duplicate"):
                continue
            target = f"{split}/{c['name']}"
            if c["file"] != target:
                os.replace(data_dir / c["file"], data_dir / target)
                c["file"] = target
            ctext, where, tags = clip_caption(d, *captions[rel], r, c, stem)
            sources[where] += 1
            texts.append(ctext)
            records.append(ClipRecord(id=Path(c["name"]).stem, audio=target, text=ctext,
                                      duration=c["duration"], split=split, source=rel, offset=c["offset"],
                                      caption_source=where, tags=tags, bpm=c.get("bpm"), key=c.get("key")))
        caption_sources[sources.most_common(1)[0][0] if sources else captions[rel][1]] += 1
        if not any(texts):
            uncaptioned.append(rel)
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
                   records: list[ClipRecord], trigger: tuple[str, str] = ("", "start")) -> set[str]:
    """Remove stale clips of an earlier run, write metadata.json, prepare_state.json and
    prepare_config.yaml. Returns the recordings decoded by this run (the others were reused)."""
    d = cfg.data
    new_files = [rec.audio for rec in records]
    removed = _remove_stale(data_dir, state.get("clip_files"), new_files)
    if removed:
        log.info("removed %d clip(s) of an earlier run that are no longer part of the dataset", removed)

    doc = metadata_document(records, d.sample_rate, d.channels, trigger)
    atomic_write_json(metadata_path(data_dir, d.metadata_file), doc)
    decoded_rels = {rel for rel, r in results.items() if not r.get("reused")}
    for r in results.values():
        r.pop("reused", None)
    # the review table (captions.csv): written after metadata.json, its hash kept in the state
    atomic_write_json(data_dir / STATE_FILE,
                      {"version": STATE_VERSION, "mode": "input", "input_dir": str(input_dir),
                       "clip_files": new_files, "sources": results,
                       "captions_csv_sha1": review.write_table(data_dir, doc)})
    cfg.save(data_dir / CONFIG_FILE)
    return decoded_rels


def _write_report(data_dir, d, input_dir, results, found: Found, duplicates, uncaptioned, caption_sources,
                  decoded: set, n_clips, wall, captioner, records=()) -> dict:
    n_decoded = len(decoded)
    files = found.scan.files
    skipped = sorted([{"file": rel, "reason": r["reason"]} for rel, r in results.items()
                      if not r.get("ok")]
                     + found.scan.links, key=lambda x: x["file"])
    warnings = [{"file": rel, "warning": w} for rel, r in sorted(results.items())
                for w in r.get("warnings", [])]
    warnings += [{"file": rel,
                  "warning": f"cannot be read now ({why}); kept the {len(results[rel]['clips'])} "
                                          f"clip(s) an earlier run made from it"}
                 for rel, why in sorted(found.kept.items())]
    warnings += captioner.notes  # captions cleaned or cut, sidecars left out
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
        "caption_files": found.scan.caption_files,
        **_audio_changes(d, results, {rec.source for rec in records}),
        "unreadable": _unreadable(results, found),
        "captions_edited": sum(1 for rec in records if str(rec.caption_source).startswith("edited")),
        "captions_table": str(data_dir / review.CAPTIONS_CSV) if records else None,
    }
    if found.separation:
        report["separation"] = dict(found.separation, files=vocal_removal.report_entries(
            results, {rec.source for rec in records}))
    atomic_write_json(data_dir / REPORT_FILE, report)
    _say(d, report, data_dir, n_clips, seconds, len(files), n_decoded, len(tails))
    return report


def _audio_changes(d, results: dict, used: set) -> dict:
    """Counts of what preparing changed in the used recordings' audio: clips scaled down (they
    peaked above 0 dBFS), NaN/inf samples set to 0, recordings mixed down or up to --channels."""
    rs = [results[rel] for rel in sorted(used)]
    src = Counter(r.get("source_channels") for r in rs if r.get("source_channels"))
    return {"clips_scaled_down": sum(1 for r in rs for c in r["clips"]
                                     if c.get("scaled_from_db") is not None
                                     and not c.get("duplicate")),
            "nonfinite_samples_repaired": sum(r.get("nonfinite_repaired", 0) for r in rs),
            "channel_mix": {"channels": d.channels,
                            "mixed_down": sum(n for c, n in src.items() if c > d.channels),
                            "mono_to_stereo": src[1] if d.channels == 2 else 0}}


def _unreadable(results: dict, found: Found) -> list[dict]:
    """Every folder or file that could not be read, with how many sources of the last run it
    kept."""
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
    vocal_removal.say(report.get("separation", {}).get("files", []), report.get("separation", {}))
    for dup in report["duplicates"]:
        log.warning("duplicate (%s): %s is the same as %s; kept once", dup["kind"], dup["file"],
                    dup["same_as"])
    uncaptioned, caption_sources = report["uncaptioned"], report["caption_sources"]
    if uncaptioned:
        log.warning("%d recording(s) have no caption (trained as unconditional only): %s",
                    len(uncaptioned),
                    ", ".join(uncaptioned[:10]) + (" ..." if len(uncaptioned) > 10 else ""))
    if caption_sources.get("template"):
        log.warning("%d recording(s) are captioned from their file name (caption_template %r); a "
                    "real description (sidecar .txt or captions_file) trains much better",
                    caption_sources["template"], d.caption_template)
    if report["unused_caption_entries"]:
        log.warning("%d caption entr(y/ies) matched no audio file, e.g. %s",
                    len(report["unused_caption_entries"]), report["unused_caption_entries"][0])
    mix = report["channel_mix"]
    if mix["mixed_down"]:
        log.info("%d recording(s) with more than %d channel(s) were mixed down to %s (--channels %d)",
                 mix["mixed_down"], d.channels, "mono" if d.channels == 1 else "stereo", d.channels)
    if mix["mono_to_stereo"]:
        log.info("%d mono recording(s) were copied to both channels (--channels 2)",
                 mix["mono_to_stereo"])
    if report["clips_scaled_down"]:
        log.warning("%d clip(s) peaked above 0 dBFS and were scaled down to avoid clipping (see "
                    "the warnings)", report["clips_scaled_down"])
    print(f"Prepared {n_clips} clips ({human_seconds(seconds)}) from {report['files_used']} of "
          f"{n_files} files: train {report['clips']['train']}, valid {report['clips']['valid']}; "
          f"decoded {n_decoded} file(s), reused {report['files_reused']}; skipped "
          f"{len(report['skipped'])}, duplicates {len(report['duplicates'])}, short tails dropped "
          f"{n_tails}. Report: {data_dir / REPORT_FILE}")
