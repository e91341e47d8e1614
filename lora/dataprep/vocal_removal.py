"""``prepare_data --separate vocals|auto``: the separation stage of the prepare run, before the
clips are cut.

Each recording to decode is separated once (lora.dataprep.separation) and its instrumental cached
in ``data_dir/cache/separation/``, named by the source's content hash, the separation model's
identity (a hash of its files), the sample rate and the channels, with its vocal level beside it
(``.json``, written last: a result without it is not a result). A rerun, an interrupted run or a
run with other clip settings reads the cache and separates nothing that was separated before.

``vocals`` keeps every recording's instrumental. ``auto`` keeps it only for the recordings whose
vocal stem carries real energy: ``vocals_db`` (the vocal stem's level relative to the mix in the
loudest tenth of the mix's non-silent 1-second windows, lora.dataprep.separation.VocalLevel) at or
above ``vocal_threshold_db``; the others are decoded from the source itself, exactly as without
separation. The decision and both levels are recorded per recording (the report lists them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, human_seconds, log, on_interrupt
from lora.common.files import atomic_write_json
from lora.config import Config
from lora.dataprep import audio as A
from lora.dataprep import separation as S

CACHE_DIR = Path("cache") / "separation"
CACHE_VERSION = 1
PROGRESS_EVERY_S = 15.0  # a progress line in the log this often (for logs and the web UI)


def separation_key(cfg: Config) -> Optional[dict]:
    """What the clips of a separated run depend on (part of the prepare settings, so a change
    decodes the recordings again); None without separation. Resolves the model's files (no
    download when they are in the hub cache or a folder)."""
    d = cfg.data
    if d.separate == "none":
        return None
    S.require_demucs()
    files = S.separator_files(cfg.model.separation_model, local_files_only=cfg.model.local_files_only)
    key = {"mode": d.separate, "model": cfg.model.separation_model, "identity": files.identity}
    if d.separate == "auto":
        key["vocal_threshold_db"] = d.vocal_threshold_db
    return key


def cache_files(data_dir: Path, sha1: str, identity: str, sample_rate: int, channels: int
                ) -> tuple[Path, Path]:
    """(instrumental WAV, its vocal-level JSON) of one source content in the cache."""
    stem = f"{sha1[:20]}-{identity}-sr{sample_rate}-ch{channels}-v{CACHE_VERSION}"
    folder = data_dir / CACHE_DIR
    return folder / f"{stem}.wav", folder / f"{stem}.json"


def _cached(wav: Path, meta: Path) -> Optional[dict]:
    if not (wav.is_file() and meta.is_file()):
        return None
    try:
        stats = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and "vocals_db" in stats else None


def _decide(job: dict, stats: dict, cfg: Config, wav: Path, cached: bool) -> None:
    """Record the separation in the job; decode from the instrumental when it is kept."""
    d = cfg.data
    level = stats.get("vocals_db")
    use = d.separate == "vocals" or (level is not None and level >= d.vocal_threshold_db)
    job["separation"] = {"vocals_db": level, "vocal_energy_percent": stats.get("vocal_energy_percent"),
                         "used": "instrumental" if use else "original", "cached": cached}
    if use:
        job["decode_path"] = str(wav)


def separate_jobs(cfg: Config, jobs: list[dict], data_dir: Path, key: Optional[dict]) -> dict:
    """Separate the sources of ``jobs`` not yet in the cache; set each job's ``decode_path`` (the
    instrumental, when it is kept) and ``separation`` (levels, decision). Returns the counts."""
    if key is None:
        return {}
    d = cfg.data
    files = S.separator_files(cfg.model.separation_model, local_files_only=cfg.model.local_files_only)
    todo: dict[str, list[dict]] = {}
    cached = 0
    for j in jobs:
        try:
            j["sha1"] = A.file_hash(j["src"])
        except OSError:
            continue  # the worker reports the file as unreadable
        wav, meta = cache_files(data_dir, j["sha1"], files.identity, d.sample_rate, d.channels)
        stats = _cached(wav, meta)
        if stats is not None:
            _decide(j, stats, cfg, wav, cached=True)
            cached += 1
        else:
            todo.setdefault(j["sha1"], []).append(j)
    done = _separate(cfg, files, todo, data_dir) if todo else 0
    summary = dict(key, separated_now=done, from_cache=cached, cache=str(data_dir / CACHE_DIR))
    log.info("separation (%s, %s): %d recording(s) separated now, %d from the cache", d.separate,
             cfg.model.separation_model, done, cached)
    return summary


def _seconds(path: str) -> float:
    try:
        return A.audio_info(path).duration
    except A.AudioError:
        return 0.0


def _separate(cfg: Config, files: S.SeparatorFiles, todo: dict[str, list[dict]], data_dir: Path) -> int:
    """Separate each content in ``todo`` (sha1 -> the jobs that share it) with a progress bar per
    file and overall (seconds of audio, with ETAs). Ctrl-C keeps what finished."""
    from tqdm import tqdm

    d = cfg.data
    sep = S.load_separator(files, d.separation_device)
    log.info("separating %d recording(s) with %s on %s (demucs; segments of %.1f s)", len(todo),
             cfg.model.separation_model, sep.device, sep.segment / sep.samplerate)
    total = sum(_seconds(jobs[0]["src"]) for jobs in todo.values())
    overall = tqdm(total=round(total, 1), desc="separating vocals", unit="s", disable=None)
    done: list[str] = []
    said = [time.perf_counter(), 0.0]  # when the last progress line was logged; seconds separated

    def note() -> str:
        return (f"{len(done)} recording(s) separated so far are kept in {data_dir / CACHE_DIR}; run "
                f"the same command again to continue: they are not separated again")

    t0 = time.perf_counter()
    with on_interrupt(note):
        for sha1, jobs in todo.items():
            src = Path(jobs[0]["src"])
            wav, meta = cache_files(data_dir, sha1, files.identity, d.sample_rate, d.channels)
            bar = tqdm(total=round(_seconds(str(src)), 1), desc=f"  {src.name[:40]}", unit="s",
                       leave=False, disable=None)

            def step(seconds: float, bar=bar, i=len(done) + 1) -> None:
                bar.update(seconds)
                overall.update(seconds)
                said[1] += seconds
                if time.perf_counter() - said[0] > PROGRESS_EVERY_S:  # (a log line: no TTY, the UI)
                    said[0] = time.perf_counter()
                    _say_progress(said[1], total, time.perf_counter() - t0, i, len(todo))
            try:
                stats = S.separate_file(sep, src, wav, d.sample_rate, d.channels, on_progress=step)
            except A.AudioError as e:  # never its mix instead: the file is skipped, with the reason
                bar.close()
                why = str(e).replace(f"{src}: ", "")
                for j in jobs:
                    j["skip_reason"] = f"cannot be separated ({why})"
                continue
            except OSError as e:
                raise UserError(f"could not write the separated audio into {wav.parent} "
                                f"({e.strerror or e}); is the disk full?") from None
            bar.close()
            atomic_write_json(meta, dict(stats, source=jobs[0]["rel"], model=cfg.model.separation_model,
                                         identity=files.identity))
            for j in jobs:
                _decide(j, stats, cfg, wav, cached=False)
            done.append(sha1)
    overall.close()
    log.info("separated %d recording(s) in %s", len(done), human_seconds(time.perf_counter() - t0))
    return len(done)


def _say_progress(seconds: float, total: float, wall: float, i: int, n: int) -> None:
    left = wall / seconds * max(total - seconds, 0.0) if seconds > 0 else None
    log.info("separating vocals: recording %d of %d, %s of %s of audio (%.0f%%)%s", i, n,
             human_seconds(seconds), human_seconds(total), 100 * seconds / max(total, 1e-9),
             f", about {human_seconds(left)} left" if left is not None else "")


def report_entries(results: dict[str, dict], used: set[str]) -> list[dict]:
    """Per recording used: its vocal level, its share of the energy and what was kept."""
    out = []
    for rel in sorted(used):
        s = results[rel].get("separation")
        if s:
            out.append({"file": rel, "vocals_db": s.get("vocals_db"),
                        "vocal_energy_percent": s.get("vocal_energy_percent"), "used": s.get("used")})
    return out


def say(entries: list[dict], summary: dict, most: int = 20) -> None:
    """The per-file separation lines of the report, on screen."""
    if not summary:
        return
    kept = sum(1 for e in entries if e["used"] == "instrumental")
    log.info("vocals removed from %d of %d recording(s) (--separate %s%s):", kept, len(entries),
             summary["mode"], f", threshold {summary['vocal_threshold_db']:g} dB"
             if "vocal_threshold_db" in summary else "")
    for e in entries[:most]:
        level = "no sound" if e["vocals_db"] is None else f"{e['vocals_db']:.1f} dB"
        log.info("  %s: vocal stem %s (%.1f%% of the energy) -> %s", e["file"], level,
                 e["vocal_energy_percent"] or 0.0, e["used"])
    if len(entries) > most:
        log.info("  ... and %d more (prepare_report.json lists every one)", len(entries) - most)
