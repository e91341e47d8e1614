"""Benchmark of the token cache key and build: model-identity start-up cost, and the cache build.

    python bench/bench_cache.py                       # musicgen-small architecture (bench/musicgen_arch.py, 2.4 GB)
    python bench/bench_cache.py --quick               # tiny model, tiny sets: checks that the benchmark runs
    python bench/bench_cache.py --json bench/results/cache.json

1. Identity (lora.modeling.loading.model_identity): the first start hashes every config, tokenizer,
   processor and weight file in full (sha256; page cache warm, as right after a download or the
   build); later starts find the digests in the per-user sidecar (a private, fresh $XDG_CACHE_HOME
   here) and read no weight. For scale: the key it replaced (size + first and last MiB of each
   weight file) and the whole load_base_model.
2. Cache build (lora.dataprep.token_cache.build_token_cache, EnCodec codes only): each set built
   from scratch ``--rounds`` times in one process; the median wall and CPU time. Sets: the synthetic
   example set (prepare_data --create_example) and a set of 30-s clips plus a few odd tails. (The
   comparison with the padded batches the cache built before issue 13 ran at commit ca1922c:
   ``git show ca1922c:bench/bench_cache.py``; since issue 31 clips of different lengths are never in
   one planned batch, so there is no padded variant to compare.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from bench.musicgen_arch import model_path  # noqa: E402
from lora import (
    dataset,
    prepare_data,  # noqa: E402  (its main() only)
)
from lora.common.cli import setup_logging
from lora.common.files import atomic_write_json
from lora.config import ModelConfig
from lora.dataprep import token_cache
from lora.dataprep.audio import save_wav
from lora.dataprep.example_data import STYLES, synth_clip
from lora.dataset import ClipRecord, metadata_document
from lora.modeling import loading


def previous_key(directory: Path) -> str:
    """The identity before this change, for scale: config.json + size and first/last MiB of each
    weight file."""
    h = hashlib.sha256()
    h.update((directory / "config.json").read_bytes())
    for p in sorted(directory.iterdir()):
        if p.suffix in (".safetensors", ".bin"):
            size = p.stat().st_size
            with open(p, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(size - (1 << 20))
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def _timed_cpu(fn, *args, **kw):
    """(wall s, CPU s of this process (all threads), result): CPU time moves less than wall time
    when other processes share the cores."""
    c = time.process_time()
    wall, out = _timed(fn, *args, **kw)
    return wall, time.process_time() - c, out


def identity_startup(folder: Path, tmp: Path, repeats: int) -> tuple[tuple, dict]:
    """Seconds of the identity at the first start (fresh sidecar) and later starts; returns them and
    the model (loaded once, with a sidecar hit)."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg_cache")  # a fresh sidecar: the first start
    size = sum(p.stat().st_size for p in loading.identity_files(folder))
    # page cache warm
    loading.hash_file(max(loading.identity_files(folder), key=lambda p: p.stat().st_size))
    first, ident = _timed(loading.model_identity, folder)
    later = [_timed(loading.model_identity, folder)[0] for _ in range(repeats)]
    assert all(loading.model_identity(folder) == ident for _ in range(2))
    prev = [_timed(previous_key, folder)[0] for _ in range(repeats)]
    load, loaded = _timed(loading.load_base_model, ModelConfig(model_path=str(folder)))
    return loaded, {"folder": str(folder), "bytes_hashed": size, "first_s": first,
                    "first_gb_per_s": size / first / 1e9,
            "later_s_median": statistics.median(later), "later_s": later,
            "previous_key_s_median": statistics.median(prev), "load_base_model_s (sidecar hit)": load}


# --------------------------------------------------------------------------------------------
# Cache build
# --------------------------------------------------------------------------------------------
def make_long_set(data_dir: Path, clips: int, tails: list[float], sample_rate: int) -> None:
    """``clips`` synthetic 30-s clips plus one clip per odd tail length (seconds), with
    metadata.json."""
    import numpy as np

    rng = np.random.default_rng(0)
    styles = list(STYLES)
    records = []
    for i, seconds in enumerate([30.0] * clips + list(tails)):
        y, text = synth_clip(styles[i % len(styles)], seconds, sample_rate, 1, rng)
        rel = f"train/long_{i:03d}.wav"
        save_wav(data_dir / rel, y, sample_rate)
        records.append(ClipRecord(id=f"long_{i:03d}", audio=rel, text=text,
                                  duration=round(y.shape[1] / sample_rate, 4), split="train"))
    atomic_write_json(data_dir / "metadata.json", metadata_document(records, sample_rate, 1))


def build_variants(name: str, data_dir: Path, loaded, batch_size: int, rounds: int) -> dict:
    """The cache build of one set from scratch, ``rounds`` times (codes only)."""
    model, processor, info = loaded
    records = dataset.load_metadata(data_dir)
    times, cpu = [], []
    for _ in range(rounds):
        shutil.rmtree(token_cache.cache_root(data_dir, info), ignore_errors=True)
        t, c, _ = _timed_cpu(token_cache.build_token_cache, records, model, processor, info, data_dir,
                             batch_size=batch_size, text_states=False, show_progress=False)
        times.append(t)
        cpu.append(c)
    return {"set": name, "clips": len(records), "audio_s": sum(r.duration for r in records),
            "lengths_s": sorted({round(r.duration, 2) for r in records}), "batch_size": batch_size,
            "rounds": rounds, "build_s": times, "build_s_median": statistics.median(times),
            "build_cpu_s": cpu, "build_cpu_s_median": statistics.median(cpu)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="tiny, small (default; quick: tiny), medium, large, or a folder")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model and sets: checks that the benchmark runs")
    ap.add_argument("--example_clips", type=int, default=None,
                    help="clips of the example set (default 160; quick 16)")
    ap.add_argument("--long_clips", type=int, default=None,
                    help="30-s clips of the long set (default 16; quick 2)")
    ap.add_argument("--tails", default="7.3,12.1,21.4", help="odd tail lengths (s) added to the long set")
    ap.add_argument("--rounds", type=int, default=None, help="builds per variant (default 3; quick 1)")
    ap.add_argument("--batch_size", type=int, default=8,
                    help="encode_batch_size (the default setting: 8)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    name = args.model or ("tiny" if args.quick else "small")
    rounds = args.rounds or (1 if args.quick else 3)

    import logging

    setup_logging(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        tmp = Path(tmp)
        folder = Path(loading.resolve_model_path(ModelConfig(model_path=model_path(name),
                                                             tiny_model_dir=str(tmp / "tiny"))))
        loaded, ident = identity_startup(folder, tmp, repeats=5)
        ex = tmp / "example"
        # (its data summary is not part of the benchmark output)
        with contextlib.redirect_stdout(io.StringIO()):
            rc = prepare_data.main(["--create_example", "--output_dir", str(ex), "--example_clips",
                                    str(args.example_clips or (16 if args.quick else 160))])
        if rc != 0:
            raise SystemExit(f"prepare_data --create_example failed with exit code {rc}")
        long_dir = tmp / "long"
        make_long_set(long_dir, args.long_clips or (2 if args.quick else 16),
                      [float(x) for x in args.tails.split(",") if x], loaded[2].sample_rate)
        builds = [build_variants("example set", ex, loaded, args.batch_size, rounds),
                  build_variants("30-s clips + odd tails", long_dir, loaded, args.batch_size, rounds)]
    report(name, ident, builds, args.json)
    return 0


def report(name: str, ident: dict, builds: list[dict], json_path) -> None:
    m = describe()
    print(f"\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} "
          f"threads), Python {m['python']}, {m['date']}; model {name}")
    gb = ident["bytes_hashed"] / 1e9
    print("\n| model identity | seconds |\n|---|---:|")
    print(f"| first start: full sha256 of {gb:.2f} GB (page cache warm) | {ident['first_s']:.2f} "
          f"({ident['first_gb_per_s']:.2f} GB/s) |")
    print(f"| later start: sidecar hit (median of {len(ident['later_s'])}) | "
          f"{ident['later_s_median'] * 1e3:.2f} ms |")
    print(f"| (the key it replaced: first + last MiB, median) | "
          f"{ident['previous_key_s_median'] * 1e3:.2f} ms |")
    print(f"| (load_base_model, sidecar hit) | {ident['load_base_model_s (sidecar hit)']:.2f} |")
    print("\n| set | clips | audio (s) | batch | build (s, median) | CPU time (s, median) |"
          "\n|---|---:|---:|---:|---:|---:|")
    for b in builds:
        print(f"| {b['set']} | {b['clips']} | {b['audio_s']:.0f} | {b['batch_size']} | "
              f"{b['build_s_median']:.2f} | {b['build_cpu_s_median']:.2f} |")
    if json_path:
        Path(json_path).write_text(json.dumps({"machine": m, "model": name, "identity": ident,
                                               "builds": builds},
                                              indent=2))


if __name__ == "__main__":
    sys.exit(main())
