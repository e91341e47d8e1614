"""Benchmark of lora/prepare_data.py: preparation speed and peak memory.

    python bench/bench_prepare.py            # full: 12 x 60 s 44.1 kHz stereo tracks, a 20-minute file
    python bench/bench_prepare.py --quick    # a smoke run that takes seconds
    python bench/bench_prepare.py --json bench/prepare_results.json

Measures seconds of audio prepared per wall-clock second (decode + resample + trim + cut + write
PCM16 clips) with 1 worker and with all workers, on a generated folder of FLAC tracks; and the peak
memory (RSS of a fresh process, and Python-tracked allocations) when preparing one long file. Prints
a markdown table and the machine (CPU model, cores).
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
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_track(path: Path, seconds: float, sr: int, seed: int, channels: int = 2,
               fmt: str = "FLAC") -> None:
    """A song-like signal written block by block (a few partials, tremolo, noise), never all in
    memory."""
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(80, 2000, 4)
    block = sr * 10
    with sf.SoundFile(path, "w", sr, channels, format=fmt, subtype="PCM_16") as f:
        for start in range(0, int(seconds * sr), block):
            n = min(block, int(seconds * sr) - start)
            t = (start + np.arange(n)) / sr
            y = sum(np.sin(2 * np.pi * fr * t) for fr in freqs) / 8 * (1 + 0.3
                                                                       * np.sin(2 * np.pi * 0.3 * t))
            y = y + 0.01 * rng.standard_normal(n)
            f.write(np.stack([y * (1 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32))


def run_prepare(input_dir: Path, out: Path, workers: int) -> dict:
    import contextlib
    import io

    from lora import prepare_data

    t0 = time.perf_counter()
    # the data summary is not part of the benchmark output
    with contextlib.redirect_stdout(io.StringIO()):
        rc = prepare_data.main(["--input_dir", str(input_dir), "--output_dir", str(out),
                                "--num_workers", str(workers)])
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"prepare_data failed with exit code {rc}")
    rep = json.loads((out / "prepare_report.json").read_text())  # the report prepare_data.py writes
    return {"wall_s": wall, "audio_s": rep["seconds_decoded"], "clips": sum(rep["clips"].values())}


def peak_memory(long_file: Path, out: Path) -> dict:
    """Peak RSS of a fresh process preparing the long file, minus that of a process that only
    imports."""
    code = """
import json, resource, sys, tracemalloc
sys.path.insert(0, {root!r})
from lora import prepare_data
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {run}:
    tracemalloc.start()
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_data.main(["--input_dir", {inp!r}, "--output_dir", {out!r}, "--num_workers", "1"])
    traced = tracemalloc.get_traced_memory()[1]
else:
    traced = 0
print(json.dumps({{"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "traced": traced}}))
"""
    res = {}
    for run in (False, True):
        r = subprocess.run([sys.executable, "-c",
                            code.format(root=str(ROOT), run=run, inp=str(long_file.parent),
                                                                out=str(out))],
                           capture_output=True, text=True, check=True)
        res[run] = json.loads(r.stdout.strip().splitlines()[-1])
    return {"rss_peak_mb": res[True]["peak_kb"] / 1024, "rss_import_only_mb": res[False]["peak_kb"]
            / 1024, "traced_peak_mb": res[True]["traced"] / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark runs")
    ap.add_argument("--tracks", type=int, default=None,
                    help="tracks in the generated folder (default 12; quick 4)")
    ap.add_argument("--track_seconds", type=float, default=None,
                    help="length of each track (default 60; quick 12)")
    ap.add_argument("--long_minutes", type=float, default=None,
                    help="length of the long file (default 20; quick 2)")
    ap.add_argument("--workers", type=int, default=0, help="'all workers' setting; 0 = one per CPU core")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    tracks = args.tracks or (4 if args.quick else 12)
    secs = args.track_seconds or (12.0 if args.quick else 60.0)
    long_min = args.long_minutes or (2.0 if args.quick else 20.0)
    workers = args.workers or os.cpu_count() or 1

    import logging

    from lora.common.cli import setup_logging

    setup_logging(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        inp = tmp / "tracks"
        inp.mkdir()
        for i in range(tracks):
            make_track(inp / f"track{i:02d}.flac", secs, 44100, i)
        for w in sorted({1, workers}):
            r = run_prepare(inp, tmp / f"out_w{w}", w)
            rows.append({"case": f"{tracks} x {secs:g} s FLAC 44.1 kHz stereo", "workers": w, **r,
                         "x_realtime": r["audio_s"] / r["wall_s"]})
        long_dir = tmp / "long"
        long_dir.mkdir()
        make_track(long_dir / "long.flac", long_min * 60, 44100, 99)
        mem = peak_memory(long_dir / "long.flac", tmp / "out_long")
    full_mb = long_min * 60 * 32000 * 4 / 1e6

    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print("\n| case | workers | audio (s) | wall (s) | audio s per wall s | clips |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['workers']} | {r['audio_s']:.0f} | {r['wall_s']:.2f} | "
              f"{r['x_realtime']:.1f} | {r['clips']} |")
    print("\n| long file | peak RSS (MB) | RSS after imports only (MB) | Python-tracked peak (MB) | "
          "whole file as float32 @32 kHz (MB) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {long_min:g} min FLAC 44.1 kHz stereo | {mem['rss_peak_mb']:.0f} | "
          f"{mem['rss_import_only_mb']:.0f} | {mem['traced_peak_mb']:.1f} | {full_mb:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                                               "speed": rows,
                                               "memory": {"minutes": long_min, **mem}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
