"""The per-file worker of prepare_data.py (an ordinary function run inline or in a spawn process
pool): decode one recording block by block, cut, check and write its clips, and report what it
changed or why it failed.
"""

from __future__ import annotations

import errno
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional

from lora.common.cli import UserError
from lora.dataprep import audio as A
from lora.dataprep.scan import clip_base

# up to this share of NaN/inf samples is repaired (set to 0); more: damaged
NONFINITE_REPAIR_FRACTION = 0.001
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ---- the per-file worker (runs in a worker process) -----------------------------------------
def process_file(job: dict) -> dict:
    """Decode one recording block by block and write its clips. Returns a JSON-able result.

    Never raises for a bad file: the failure is returned with its reason. An OSError while writing a
    clip (a full disk) is raised, after removing the clips of this recording written so far.
    """
    t0 = time.perf_counter()
    src, rel = job["src"], job["rel"]
    res = {"rel": rel, "ok": False, "reason": "", "warnings": [], "clips": [], "tail_seconds": 0.0,
           "silent_segments": 0, "inaudible_segments": 0, "short_segments": 0, "size": job["size"],
           "mtime_ns": job["mtime_ns"], "settings": job["settings"]}
    if job.get("separation"):
        res["separation"] = job["separation"]
    if job.get("skip_reason"):  # (--separate: the recording could not be separated)
        res["reason"] = job["skip_reason"]
        return res
    try:
        res["sha1"] = job.get("sha1") or A.file_hash(src)
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
    """process_file's clips: cut the decoded stream, drop silent clips, scale down clips that peak
    above 0 dBFS (PCM16 would hard-clip them), write the WAVs into data_dir/train, record them in
    res."""

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
            # (decode_path: the recording's instrumental, when prepare_data --separate made one)
            src = self.job.get("decode_path") or self.job["src"]
            for block in A.iter_audio(src, self.sr, self.job["channels"], counts=counts):
                self.emit(self.cutter.push(block))
        except A.AudioError as e:
            error = str(e)
        self.emit(self.cutter.finish())
        if self.overs:
            self.res["warnings"].append(f"{len(self.overs)} clip(s) peaked at up to "
                                        f"+{max(self.overs):.1f} dBFS and were scaled down to "
                                        f"avoid clipping")
        return error

    def emit(self, pieces) -> None:
        res = self.res
        for off, clip in pieces:
            idx = len(res["clips"]) + res["silent_segments"] + res["inaudible_segments"] \
                + res["short_segments"]
            if A.rms_db(clip) < self.job["silence_db"]:
                res["silent_segments"] += 1
                continue
            if clip.shape[-1] < A.CODEC_FRAME_SECONDS * self.sr:  # (min_seconds 0)
                res["short_segments"] += 1
                continue
            if A.audible_db(clip, self.sr) < self.job["silence_db"]:  # a DC offset, infrasound
                res["inaudible_segments"] += 1
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
    """A few NaN/inf samples (at most NONFINITE_REPAIR_FRACTION) were set to 0: warn with the count.
    More: the file is damaged; its clips are removed and it is skipped with that reason."""
    n, m = counts.nonfinite, counts.samples
    if not n:
        return
    if n <= NONFINITE_REPAIR_FRACTION * m:
        res["warnings"].append(f"{n} NaN/inf sample(s) of {m} were replaced by 0 (silence); the "
                               f"file is slightly damaged")
        res["nonfinite_repaired"] = n
        return
    writer.remove_written()
    res["warnings"] = []
    res["reason"] = f"{n} of {m} samples are NaN/inf: the file is damaged"


def _judge(job: dict, res: dict, cutter: A.ClipCutter, header_seconds: float,
           error: Optional[str]) -> None:
    """Fill in what the decoding found: durations, warnings, ok, or the reason the file gave no
    clip."""
    sr = job["sample_rate"]
    decoded = cutter.total_samples / sr
    res.update(source_seconds=round(decoded, 3), lead_seconds=round(cutter.lead_samples / sr, 3),
               trail_seconds=round(cutter.trail_samples / sr, 3),
               tail_seconds=round(cutter.tail_samples / sr, 3))
    if res["reason"]:  # damaged (NaN/inf)
        res["tail_seconds"] = 0.0
        return
    if error and res["clips"]:
        res["warnings"].append(f"{error}; kept the {len(res['clips'])} clip(s) before it")
    elif header_seconds and decoded < min(header_seconds - 1.0, 0.95 * header_seconds) and not error:
        res["warnings"].append(f"file is shorter than its header says ({decoded:.1f} s of "
                               f"{header_seconds:.1f} s): truncated?")
    dropped = [(res["inaudible_segments"], f"no audible sound: above {A.AUDIBLE_HZ:g} Hz it stays "
                                           f"under {job['silence_db']:g} dBFS (only a DC offset or "
                                           f"infrasound)"),
               (res["short_segments"], f"shorter than one codec frame "
                                       f"({A.CODEC_FRAME_SECONDS * 1000:g} ms)")]
    if res["clips"]:
        res["ok"] = True
        res["warnings"] += [f"{n} segment(s) left out: {why}" for n, why in dropped if n]
    elif any(n for n, _ in dropped):
        res["reason"] = "; ".join(why for n, why in dropped if n)
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
    """Tempo/key of clips that already exist (a rerun that adds --enrich_captions decodes no
    source)."""
    out = {}
    for rel in job["files"]:
        y = A.load_audio(Path(job["data_dir"]) / rel, job["sample_rate"], 1)
        out[rel] = A.estimate_tempo_key(y, job["sample_rate"])
    return {"rel": job["rel"], "enrich": out}


def run_jobs(fn: Callable[[dict], dict], jobs: list[dict], workers: int, desc: str,
             on_result=None) -> list[dict]:
    """Run ``fn`` (a module-level function of this module, so a spawned worker finds it by name) on
    each job, inline (1 worker) or in a spawn process pool; on_result(result) is called as each
    finishes."""
    if not jobs:
        return []
    from tqdm import tqdm

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
                raise UserError(f"could not write clips ({e}); is the disk full or the output "
                                f"folder read-only?"
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
            raise UserError(f"could not write clips ({e}); is the disk full or the output folder "
                            f"read-only?"
                            ) from None
        except BrokenProcessPool:
            ex.shutdown(wait=False, cancel_futures=True)
            raise UserError("a worker process died (out of memory, or a decoder crashed on a "
                            "file). Finished files are kept: run the same command with "
                            "--num_workers 1 to continue and find the file."
                            ) from None
        except BaseException:  # Ctrl-C: do not wait for the queued files
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown()
    bar.close()
    return results
