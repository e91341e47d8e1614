"""How the data path grows with the number of clips: prepare, token-cache build, training start-up (cold
and with a warm cache), one epoch's data loading, and each process's memory, at several dataset sizes.

    python bench/bench_scale.py --sizes 1000,4000,16000 --json bench/results/scale_after.json
    python bench/bench_scale.py --code /tmp/before --sizes 1000,4000,16000 --json bench/results/scale_before.json
    python bench/bench_scale.py --sizes 64,128 --quick        # checks that the benchmark runs (a minute)

``--code`` names the checkout whose scripts are measured (default: this one), so the same measurements run
on the code before a change (``git archive <commit> | tar -x -C /tmp/before``). Every measurement is a
fresh process running the user's command (``python lora/prepare_data.py``, ``python lora/train_lora.py``,
``torchrun --nproc_per_node 2 lora/train_lora.py``); the benchmark polls each process's
``/proc/<pid>/status`` and ``/proc/<pid>/io`` while it runs.

Data: N synthetic 1-s source files (32 kHz mono WAV, each different: tones and noise), each with its own
caption (a captions CSV, as auto-captions give: no two alike), prepared with ``--min_seconds 0.5`` into
N clips; the held-out share is set to keep about 32 held-out clips at every size, so the held-out loss
before the first step costs the same at every size. Model: the built-in tiny MusicGen, with its text
encoder widened to ``--text_width`` (768 = MusicGen's T5, default) so that each caption's text states
take the room they take in the real models (L tokens x 768); the codec and decoder are the tiny ones.

Per size it measures:

- prepare: ``prepare_data.py`` on the N files (cold), and the same command again (nothing new);
- cold start: ``train_lora.py --max_steps 1`` with no cache (the cache build is its "token cache" phase);
- warm start: the same again, the cache complete (``--warm_runs`` times; the fastest is kept): the
  set-up phases of ``logs/timing.json`` up to the first step, the held-out loss before it apart;
- 2 processes: ``torchrun --nproc_per_node 2`` cold (the cache removed first): its build time and the
  clips and captions each rank encoded (from the log, where the code logs them);
- one epoch's data loading: the train clips through ``CachedTokenDataset``, ``bucketed_batches`` and
  ``collate_tokens`` in a DataLoader, as training reads them (no model step);
- per process: peak RssAnon (the process's own heap: what grows with the data if it is loaded into
  memory), peak RssFile (memory-mapped files, shared between processes through the page cache), peak
  VmRSS, and the bytes it read with read() (rchar: audio files read whole show up here; memory-mapped
  cache files do not).

Then it fits each measure against N (least squares: seconds or KB per clip, and the intercept) and
prints the tables BENCHMARKS.md holds, plus the per-clip bytes of musicgen-small's real shapes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLIP_SECONDS = 1.0
SAMPLE_RATE = 32000
VALID_CLIPS = 32
THREADS = 1


# --------------------------------------------------------------------------------------------
# Processes and their memory
# --------------------------------------------------------------------------------------------
def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k == "rchar":
                    out["rchar"] = int(v)
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run(cmd: list[str], env: dict, log_path: Path, timeout: float = 7200) -> dict:
    """Run ``cmd``; poll every process of its tree that runs a python script (workers of torchrun
    too) for peak memory and bytes read. Returns wall seconds, rc and per-process peaks (the
    processes that ran the measured script, not torchrun's own launcher)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        peaks: dict[int, dict] = {}
        while p.poll() is None:
            for pid in _tree(p.pid):
                s = _status(pid)
                if not s:
                    continue
                if pid not in peaks:
                    peaks[pid] = {"cmd": _cmdline(pid)[:200]}
                for k, v in s.items():
                    peaks[pid][k] = max(peaks[pid].get(k, 0), v)
            if time.perf_counter() - t0 > timeout:
                p.kill()
                raise RuntimeError(f"{cmd} ran past {timeout} s")
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log_path}:\n"
                           + log_path.read_text()[-3000:])
    # the processes that ran the measured script (not torchrun's launcher)
    workers = [v for v in peaks.values() if "torch.distributed.run" not in v["cmd"]]
    return {"wall": wall, "procs": workers}


def _mb(x) -> float:
    return round(x / 2**20, 1)


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------
def caption(i: int, words: list[str]) -> str:
    """A caption no other clip has (its index written in the vocabulary's words), as auto-captions
    give."""
    digits = []
    n = i
    for _ in range(3):
        digits.append(words[n % len(words)])
        n //= len(words)
    return f"lofi hip hop beat with piano and {' '.join(digits)}, {60 + i % 120} BPM"


def write_sources(folder: Path, n: int) -> Path:
    """N different 1-s WAV files in folders of 1000, and a captions CSV; the CSV's path."""
    import soundfile as sf

    from lora.modeling.tiny_model import _caption_vocabulary

    words = _caption_vocabulary()
    rows = []
    t = np.arange(int(CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    for i in range(n):
        rng = np.random.default_rng(i)
        f0 = 80.0 * 2 ** (rng.integers(0, 36) / 12)
        x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(t.size)
        x *= np.minimum(1.0, 20 * t)  # a short fade-in, like a note
        rel = Path(f"part{i // 1000:03d}") / f"song{i:06d}.wav"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(folder / rel, x.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        rows.append((rel.as_posix(), caption(i, words)))
    path = folder.parent / f"captions_{n}.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "text"])
        w.writerows(rows)
    return path


def build_model(work: Path, text_width: int) -> Path:
    """The tiny MusicGen with its text encoder widened to ``text_width`` (T5, 2 layers, random), its
    codec and decoder kept; saved as a model folder."""
    from lora.modeling.tiny_model import ensure_tiny_model

    tiny = ensure_tiny_model(work / "tiny", stereo=False)
    if text_width <= 32:
        return tiny
    dst = work / f"tiny-text{text_width}"
    if (dst / "config.json").is_file():
        return dst
    import torch
    from transformers import MusicgenConfig, MusicgenForConditionalGeneration, MusicgenProcessor

    from lora.modeling import musicgen as family

    base = MusicgenForConditionalGeneration.from_pretrained(tiny)
    sub = base.config.to_dict()
    text = dict(sub["text_encoder"])
    text.update(d_model=text_width, d_kv=64, num_heads=text_width // 64, d_ff=2 * text_width)
    cfg = MusicgenConfig(text_encoder=text, audio_encoder=sub["audio_encoder"], decoder=sub["decoder"])
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(cfg)
    # the tiny codec (its fitted codebooks) and decoder; the wider text encoder and its projection new
    family.audio_codec(model).load_state_dict(family.audio_codec(base).state_dict())
    family.decoder(model).load_state_dict(family.decoder(base).state_dict())
    model.generation_config = base.generation_config
    tmp = work / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    MusicgenProcessor.from_pretrained(tiny).save_pretrained(tmp)
    shutil.copy(tiny / "preprocessor_config.json", tmp / "preprocessor_config.json")
    tmp.rename(dst)
    return dst


# --------------------------------------------------------------------------------------------
# One epoch's data loading (run in its own process: --_epoch)
# --------------------------------------------------------------------------------------------
def _rss() -> dict:
    return {k: v / 2**20 for k, v in _status(os.getpid()).items() if k in ("RssAnon", "RssFile")}


def epoch_main(args) -> int:
    """The data path of a warm start, alone and timed in one process (no imports, no model load in
    the figures): metadata, the token cache (complete: reused), the training dataset; then one
    epoch's data loading. The process's RssAnon / RssFile growth over the first three (MB)."""
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch
    from torch.utils.data import DataLoader

    from lora.config import ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import CachedTokenDataset, bucketed_batches, collate_tokens, load_metadata
    from lora.modeling.loading import load_base_model

    torch.set_num_threads(1)
    model, processor, info = load_base_model(ModelConfig(model_path=args.model))
    before = _rss()
    t0 = time.perf_counter()
    records = load_metadata(args.data)
    t1 = time.perf_counter()
    clips, stats = build_token_cache(records, model, processor, info, args.data, show_progress=False)
    t2 = time.perf_counter()
    train = [c for c in clips if c.split == "train"]
    ds = CachedTokenDataset(train, int(CLIP_SECONDS * info.frame_rate), seed=0, train=True,
                            cond_dropout=0.1)
    lengths = ds.lengths()
    t3 = time.perf_counter()
    after = _rss()
    with open(f"/proc/{os.getpid()}/maps") as fh:
        maps = sum(1 for _ in fh)  # memory mappings (the kernel allows vm.max_map_count of them)
    batches = bucketed_batches(lengths, 8, 0, 0)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=lambda it: collate_tokens(it, info.pad_token_id))
    n = frames = 0
    for b in loader:
        n += b["codes"].shape[0]
        frames += int(b["lengths"].sum())
    t_epoch = time.perf_counter() - t3
    print(json.dumps({"epoch_s": t_epoch, "clips": n, "frames": frames, "metadata_s": t1 - t0,
                      "cache_s": t2 - t1, "dataset_s": t3 - t2, "data_path_s": t3 - t0,
                      "anon_growth_mb": after["RssAnon"] - before["RssAnon"],
                      "file_growth_mb": after["RssFile"] - before["RssFile"], "maps": maps,
                      "stats": {k: v for k, v in stats.items() if k != "by_rank"}}))
    return 0


# --------------------------------------------------------------------------------------------
# The measurements of one size
# --------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    # One thread per process (torchrun sets the same for its workers): on a shared 2-core machine a
    # second OpenMP thread per process made the 1-process cache build up to 10x slower under load.
    env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def _train_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1", "--batch_size", "2",
            "--gradient_accumulation_steps", "1", "--mixed_precision", "no",
            "--max_duration", str(CLIP_SECONDS)]


def _procs(res: dict) -> list[dict]:
    return [{k: (_mb(v) if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "rchar") else v)
             for k, v in p.items() if k != "cmd"} for p in res["procs"]]


def _rank_counts(text: str) -> list[str]:
    return [line.split(" ", 3)[-1] for line in text.splitlines() if "encoded by rank" in line
            or ("Token cache" in line and "encoded" in line)]


def measure(n: int, work: Path, code: Path, model: Path, warm_runs: int, procs2: bool) -> dict:
    env = _env()
    py = sys.executable
    src = work / f"src_{n}"
    data = work / f"data_{n}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    if not src.is_dir():
        write_sources(src, n)
    caps = work / f"captions_{n}.csv"
    shutil.rmtree(data, ignore_errors=True)
    row: dict = {"clips": n}
    prep = [py, str(code / "lora" / "prepare_data.py"), "--input_dir", str(src), "--output_dir", str(data),
            "--captions_file", str(caps), "--min_seconds", "0.5", "--valid_fraction",
            f"{min(0.5, VALID_CLIPS / n):.6f}"]
    r = run(prep, env, logs / f"prepare_{n}.log")
    row["prepare_cold_s"], row["prepare_cold_procs"] = r["wall"], _procs(r)
    r = run(prep, env, logs / f"prepare_again_{n}.log")
    row["prepare_again_s"] = r["wall"]
    meta = json.loads((data / "metadata.json").read_text())
    clips = meta["clips"] if isinstance(meta, dict) else meta
    row["train_clips"] = sum(c["split"] == "train" for c in clips)
    row["valid_clips"] = len(clips) - row["train_clips"]
    row["audio_bytes"] = sum((data / c["audio"]).stat().st_size for c in clips)

    script = str(code / "lora" / "train_lora.py")

    def train(label: str, cmd_prefix: list[str]) -> dict:
        out = work / f"out_{n}_{label}"
        shutil.rmtree(out, ignore_errors=True)
        r = run(cmd_prefix + [script] + _train_args(model, data, out), env, logs / f"train_{n}_{label}.log")
        timing = json.loads((out / "logs" / "timing.json").read_text())
        setup = sum(v for k, v in timing.items() if k in ("start-up", "load", "token cache", "LoRA set-up",
                                                           "other set-up"))
        res = {"wall": r["wall"], "timing": timing, "to_first_step_s": setup,
               "procs": _procs(r), "log": _rank_counts((logs / f"train_{n}_{label}.log").read_text())}
        shutil.rmtree(out, ignore_errors=True)
        return res

    row["cold"] = train("cold", [py])
    row["warm"] = min((train(f"warm{i}", [py]) for i in range(warm_runs)), key=lambda x: x["to_first_step_s"])
    r = run([py, str(Path(__file__).resolve()), "--_epoch", "--code", str(code), "--data", str(data),
             "--model", str(model)], env, logs / f"epoch_{n}.log")
    line = [x for x in (logs / f"epoch_{n}.log").read_text().splitlines() if x.startswith("{")][-1]
    row["epoch"] = dict(json.loads(line), procs=_procs(r))
    if procs2:
        shutil.rmtree(data / "cache", ignore_errors=True)
        tr = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        row["cold2"] = train("cold2", tr)
        row["warm2"] = train("warm2", tr)
    return row


# --------------------------------------------------------------------------------------------
# Fits and tables
# --------------------------------------------------------------------------------------------
def fit(xs, ys) -> tuple[float, float]:
    """(slope per clip, intercept) of a least-squares line."""
    if len(xs) < 2:
        return float("nan"), float("nan")
    a, b = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def _peak(row_part: dict, key: str) -> float:
    """The largest peak of ``key`` (MB) among the processes of one measurement."""
    return max(p.get(key, 0.0) for p in row_part["procs"])


def summarize(rows: list[dict]) -> dict:
    xs = [r["clips"] for r in rows]
    measures = {
        "prepare, cold (s)": [r["prepare_cold_s"] for r in rows],
        "prepare, again (s)": [r["prepare_again_s"] for r in rows],
        "cache build, 1 process (s)": [r["cold"]["timing"].get("token cache", 0) for r in rows],
        "start-up to first step, cold (s)": [r["cold"]["to_first_step_s"] for r in rows],
        "start-up to first step, warm (s)": [r["warm"]["to_first_step_s"] for r in rows],
        "token cache phase, warm (s)": [r["warm"]["timing"].get("token cache", 0) for r in rows],
        "warm data path in one process: metadata + cache + dataset (s)": [r["epoch"]["data_path_s"]
                                                                           for r in rows],
        "RssAnon growth over that data path (MB)": [r["epoch"]["anon_growth_mb"] for r in rows],
        "RssFile growth over that data path (MB)": [r["epoch"]["file_growth_mb"] for r in rows],
        "one epoch's data loading (s)": [r["epoch"]["epoch_s"] for r in rows],
        "RssAnon peak, warm start (MB)": [_peak(r["warm"], "RssAnon") for r in rows],
        "RssFile peak, warm start (MB)": [_peak(r["warm"], "RssFile") for r in rows],
        "VmRSS peak, warm start (MB)": [_peak(r["warm"], "VmRSS") for r in rows],
        "RssAnon peak, cold start (MB)": [_peak(r["cold"], "RssAnon") for r in rows],
        "bytes read (rchar), warm start (MB)": [_peak(r["warm"], "rchar") for r in rows],
    }
    if all("cold2" in r for r in rows):
        measures["cache build, 2 processes (s)"] = [r["cold2"]["timing"].get("token cache", 0) for r in rows]
        measures["start-up to first step, warm, 2 processes (s)"] = [r["warm2"]["to_first_step_s"] for r in rows]
        measures["RssAnon peak per process, warm, 2 processes (MB)"] = [_peak(r["warm2"], "RssAnon")
                                                                        for r in rows]
    out = {}
    for name, ys in measures.items():
        slope, icpt = fit(xs, ys)
        per = "MB" if "(MB)" in name else "s"
        out[name] = {"values": [round(y, 3) for y in ys], "per_clip": slope, "intercept": icpt,
                     "per_clip_text": (f"{slope * 1024:.2f} KB" if per == "MB" else f"{slope * 1e3:.3f} ms")}
    return out


def real_shapes() -> list[dict]:
    """Bytes per 30-s clip of musicgen-small's shapes (4 codebooks at 50 Hz, T5 768 wide), for L caption
    tokens: the codes (int16), the text states in float32 (the per-caption heap tensor before) and in
    float16 (the shard files now)."""
    codes = 4 * 50 * 30 * 2
    return [{"tokens": L, "codes_B": codes, "text_fp32_B": L * 768 * 4, "text_fp16_B": L * 768 * 2}
            for L in (16, 32, 64)]


def table(summary: dict, rows: list[dict]) -> str:
    head = "| measure | " + " | ".join(f"{r['clips']:,} clips" for r in rows) + " | per clip (fit) |"
    lines = [head, "|---|" + "---:|" * (len(rows) + 1)]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:g}" for v in s["values"]) + f" | {s['per_clip_text']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="numbers of clips, comma-separated")
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose scripts are measured")
    ap.add_argument("--work", default=None, help="work folder (default: a new one under /tmp, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--text_width", type=int, default=768, help="width of the text encoder's states")
    ap.add_argument("--warm_runs", type=int, default=2)
    ap.add_argument("--no_procs2", action="store_true", help="skip the 2-process (torchrun) runs")
    ap.add_argument("--quick", action="store_true", help="1 warm run, small sizes: checks that it runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of each 1-process run (torchrun's workers: 1)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_epoch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._epoch:
        return epoch_main(args)
    from bench.machine import describe

    global THREADS
    THREADS = args.threads
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    code = Path(args.code).resolve()
    try:
        model = build_model(work, args.text_width)
        rows = []
        for n in sizes:
            t0 = time.perf_counter()
            rows.append(measure(n, work, code, model, 1 if args.quick else args.warm_runs, not args.no_procs2))
            print(f"{n} clips measured in {time.perf_counter() - t0:.0f} s", flush=True)
        summary = summarize(rows)
        print(table(summary, rows))
        print("\nmusicgen-small, bytes per 30-s clip:", json.dumps(real_shapes()))
        for r in rows:
            if r.get("cold2"):
                print(f"{r['clips']} clips, 2 processes:", "; ".join(r["cold2"]["log"]))
        result = {"machine": describe(), "code": str(code), "sizes": sizes, "text_width": args.text_width,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "threads": THREADS,
                  "load_average": os.getloadavg(), "rows": rows, "summary": summary,
                  "real_shapes": real_shapes()}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
