"""Benchmark of vocal removal (lora/dataprep/separation.py): time per hour of audio and peak memory.

    python bench/bench_separation.py --speed --json bench/results/separation_speed.json
        htdemucs' architecture (random weights: the time does not depend on them): separate a 30-s
        44.1-kHz stereo file; seconds of compute per second of audio, per model segment, and per hour
    python bench/bench_separation.py --memory --arch tiny --minutes 1 10 \
        --json bench/results/separation_memory_tiny.json
        peak memory (RSS of a fresh process) of ours (block by block) and of demucs' apply_model on the
        whole file, for files of these lengths
    python bench/bench_separation.py --memory --arch htdemucs --minutes 10 --ours_only --json ...
        the same for htdemucs' architecture (slow on a CPU: about 8 s of compute per second of audio
        on 2 cores)
    python bench/bench_separation.py --quick      # a smoke run that takes seconds

Each measurement runs in its own process started from this one (which imports no torch), so its
peak RSS (``ru_maxrss``) is its own. Prints a markdown table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        model = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def make_song(path: Path, seconds: float, sr: int = 44100, seed: int = 0) -> None:
    """A 44.1-kHz stereo FLAC written block by block (partials with tremolo, noise)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    freqs = rng.uniform(80, 2000, 4)
    with sf.SoundFile(path, "w", sr, 2, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, int(seconds * sr), sr * 10):
            n = min(sr * 10, int(seconds * sr) - start)
            t = (start + np.arange(n)) / sr
            y = sum(np.sin(2 * np.pi * fr * t) for fr in freqs) / 8 * (1 + 0.3 * np.sin(2 * np.pi * 0.3 * t))
            y = y + 0.01 * rng.standard_normal(n)
            f.write(np.stack([y, 0.9 * y], axis=1).astype(np.float32))


# ---- child processes -------------------------------------------------------------------------------
def child(ns) -> None:
    """One measurement: separate ns.file with ns.model (ours or demucs' whole-file apply_model)."""
    import resource

    import torch

    torch.set_num_threads(ns.threads)
    from lora.dataprep import separation as S

    sep = S.load_separator(S.separator_files(ns.model), "cpu")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    chunks = [0]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if ns.way == "ours":
        info = S.separate_file(sep, Path(ns.file), Path(ns.out), 32000, 1,
                               on_progress=lambda s: chunks.__setitem__(0, chunks[0] + 1))
        seconds = info["seconds"]
    else:  # demucs' own apply_model on the whole decoded file (what demucs.api does)
        from demucs.apply import apply_model

        from lora.dataprep.audio import load_audio

        wav = torch.from_numpy(load_audio(ns.file, sep.samplerate, 2))
        ref = wav.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        out = apply_model(sep.model, ((wav - mean) / std)[None], shifts=0, split=True, overlap=0.25)
        instrumental = (out * std + mean)[0, sep.keep].sum(0)
        seconds = instrumental.shape[-1] / sep.samplerate
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"way": ns.way, "seconds": round(seconds, 2), "wall_s": round(wall, 2),
                      "cpu_s": round(cpu, 2), "load_average": os.getloadavg(),
                      "segments": chunks[0], "peak_rss_mb": round(resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rss_after_load_mb": round(rss_loaded, 1),
                      "threads": ns.threads}))


def measure(model: Path, file: Path, way: str, threads: int, nice: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", way, "--model", str(model), "--file", str(file),
               "--out", str(Path(tmp) / "out.wav"), "--threads", str(threads)]
        if nice:
            cmd = ["nice", "-n", str(nice)] + cmd
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the benchmarks ------------------------------------------------------------------------------------
def speed(work: Path, arch: str, seconds: float, threads: int) -> dict:
    from lora.dataprep import separation as S

    model = S.random_separator(work / arch, size=arch)
    song = work / f"song_{seconds:g}s.flac"
    make_song(song, seconds)
    r = measure(model, song, "ours", threads)
    # CPU time is what the machine's load does not inflate (a shared VM); wall time is what a user waits
    return dict(r, arch=arch, wall_s_per_audio_s=round(r["wall_s"] / r["seconds"], 3),
                cpu_s_per_audio_s=round(r["cpu_s"] / r["seconds"], 3),
                cpu_hours_per_audio_hour=round(r["cpu_s"] / r["seconds"], 2))


def memory(work: Path, arch: str, minutes: list[float], threads: int, ours_only: bool, nice: int) -> list[dict]:
    from lora.dataprep import separation as S

    model = S.random_separator(work / arch, size=arch)
    rows = []
    for m in minutes:
        song = work / f"song_{m:g}min.flac"
        make_song(song, m * 60)
        for way in ("ours",) if ours_only else ("ours", "whole_file"):
            r = dict(measure(model, song, way, threads, nice), arch=arch, minutes=m)
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", default="htdemucs", choices=("htdemucs", "tiny"))
    ap.add_argument("--seconds", type=float, default=30.0, help="--speed: length of the file")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--ours_only", action="store_true", help="--memory: skip demucs' whole-file run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--nice", type=int, default=0, help="run the measurements at this niceness")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=("ours", "whole_file"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child:
        ns.way = ns.child
        child(ns)
        return 0
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if ns.quick:
            result["speed"] = speed(work, "tiny", 5.0, ns.threads)
            result["memory"] = memory(work, "tiny", [0.2], ns.threads, False, 0)
        if ns.speed:
            result["speed"] = speed(work, ns.arch, ns.seconds, ns.threads)
        if ns.memory:
            result["memory"] = memory(work, ns.arch, ns.minutes, ns.threads, ns.ours_only, ns.nice)
    print(json.dumps(result, indent=1))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
