"""The copy check (lora/scoring/copy_check.py): what it costs at scale, and what each measure catches
on planted cases.

    python bench/bench_copy_check.py --json bench/results/copy_check.json
    python bench/bench_copy_check.py --quick          # 100 and 1,000 clips, no codec cases

1. Scale: an index over N training clips of 30 s of coarse tokens (MusicGen: 50 per second,
   vocabulary 2048), built from synthetic music-like token streams: a Zipf-skewed vocabulary, each
   clip made of a 2-s loop repeated with 10% of its tokens changed per repeat, and 5% of clips
   holding 3 s of one "silence" token. Reported: build time, index memory (its arrays) and the
   process's peak RSS, and the time to check one generated clip of 10 s and of 30 s (random tokens
   from the same vocabulary, and one with a 3-s copy planted: found with its length, clip and
   offset), and of a worst case: 30 s drawn from the 16 most common tokens (most of its keys are
   common, the compared alignments reach their cap). Each count runs in a fresh process (its own peak memory).
2. Planted cases through the tiny model's EnCodec (lora/modeling/tiny_model.py, the synthetic example
   set): each training clip re-encoded after a gain change (-1, -3, -6 dB) or added white noise (30,
   20, 10 dB SNR), against the index of all training clips; held-out clips against the training
   clips of other styles (no copy) and of their own style (the example set's clips of one style are
   one loop at other tempos and keys). For each: the exact measure's longest run and share, the
   near-copy measure's longest passage and share, and the best aligned 1-s window under a third
   measure that was tried and not kept: the cosine of the codec's (mean-centred) codebook-0
   embeddings, a window mean over aligned frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe, peak_rss_mb, run_case_in_child, save_json  # noqa: E402

from lora.scoring import copy_check  # noqa: E402
from lora.scoring.copy_check import CopyIndex  # noqa: E402

FR, VOCAB, CLIP_S = 50, 2048, 30.0


def synthetic_clips(n: int, seed: int = 0) -> list[np.ndarray]:
    """Music-like coarse token streams (see the module docstring)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    p /= p.sum()
    frames, loop = int(CLIP_S * FR), 2 * FR
    out = []
    for i in range(n):
        base = rng.choice(VOCAB, size=loop, p=p)
        reps = []
        for _ in range(frames // loop):
            r = base.copy()
            flip = rng.random(loop) < 0.1
            r[flip] = rng.choice(VOCAB, size=int(flip.sum()), p=p)
            reps.append(r)
        clip = np.concatenate(reps)[:frames]
        if i % 20 == 0:
            clip[:3 * FR] = 0  # a stretch of "silence"
        out.append(clip)
    return out


def scale_case(n: int) -> dict:
    clips = synthetic_clips(n)
    t0 = time.perf_counter()
    index = CopyIndex.build([f"clip{i:05d}" for i in range(n)], clips, FR)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    p /= p.sum()
    res = {"clips": n, "audio_hours": n * CLIP_S / 3600, "build_s": round(build, 3),
           "index_mb": round(index.nbytes / 2 ** 20, 1), "peak_rss_mb": None}
    for seconds in (10, 30):
        gen = rng.choice(VOCAB, size=int(seconds * FR), p=p)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = index.check(gen)
            times.append(time.perf_counter() - t0)
        res[f"check_{seconds}s_clip_s"] = round(float(np.median(times)), 4)
        res[f"random_{seconds}s_near_share"] = r["near"]["share"]
        planted = gen.copy()
        src = n // 2
        planted[2 * FR:5 * FR] = clips[src][7 * FR:10 * FR]
        t0 = time.perf_counter()
        r = index.check(planted)
        res[f"check_{seconds}s_planted_s"] = round(time.perf_counter() - t0, 4)
        found = (r["exact"]["clip"] == f"clip{src:05d}" and abs(r["exact"]["longest_s"] - 3.0) < 0.05
                 and abs(r["exact"]["clip_at_s"] - 7.0) < 0.05)
        res[f"planted_{seconds}s_found"] = bool(found)
        res[f"planted_{seconds}s_longest_s"] = r["exact"]["longest_s"]
    # the worst case: a clip made of the 16 most common tokens, so that most of its 4-token keys
    # are found often in the training set and the alignments to compare are at their cap
    dense = rng.integers(0, 16, int(30 * FR))
    t0 = time.perf_counter()
    r = index.check(dense)
    res["check_30s_dense_s"] = round(time.perf_counter() - t0, 4)
    res["dense_common_positions"] = r["common_positions"]
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return res


def _embedding_window(emb: np.ndarray, a: np.ndarray, b: np.ndarray, W: int = FR) -> float:
    """Best 1-s window mean of the per-frame cosine of centred codebook-0 embeddings, over all
    alignments of a and b."""
    ea, eb = emb[a], emb[b]
    best = -1.0
    for d in range(-len(a) + W, len(b) - W + 1):
        i0, j0 = max(0, -d), max(0, d)
        n = min(len(a) - i0, len(b) - j0)
        if n < W:
            continue
        cos = np.sum(ea[i0:i0 + n] * eb[j0:j0 + n], axis=1)
        best = max(best, float(np.convolve(cos, np.ones(W) / W, "valid").max()))
    return best


def planted_cases(work: Path) -> list[dict]:
    import torch

    from lora import prepare_data
    from lora.config import Config
    from lora.dataprep.audio import load_audio
    from lora.modeling.loading import family_for, load_base_model
    from lora.modeling.tiny_model import ensure_tiny_model

    data = work / "data"
    if not (data / "metadata.json").is_file():
        prepare_data.main(["--create_example", "--output_dir", str(data), "--example_clips", "16",
                           "--example_seconds", "4"])
    cfg = Config()
    cfg.model.model_path = str(ensure_tiny_model(work / "tiny", stereo=False))
    model, _, info = load_base_model(cfg.model)
    fam = family_for(info)

    def codes(w):
        with torch.no_grad():
            return copy_check.coarse_tokens(fam.encode_audio(model, torch.from_numpy(w)[None], info)[0])

    meta = json.loads((data / "metadata.json").read_text())["clips"]
    waves = {c["audio"]: load_audio(data / c["audio"], info.sample_rate, 1) for c in meta}
    train = [c["audio"] for c in meta if c["split"] == "train"]
    tokens = {a: codes(waves[a]) for a in train}
    index = CopyIndex.build(train, [tokens[a] for a in train], info.frame_rate)
    table = fam.audio_codec(model).quantizer.layers[0].codebook.embed.numpy()
    emb = table - table[np.concatenate(list(tokens.values()))].mean(axis=0)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9
    rng = np.random.default_rng(0)
    rows = []

    def add(case, source, gen, against, target):
        r = against.check(gen)
        rows.append({"case": case, "source": source, "exact_longest_s": r["exact"]["longest_s"],
                     "exact_share": r["exact"]["share"], "near_longest_s": r["near"]["longest_s"],
                     "near_share": r["near"]["share"], "near_clip_right": r["near"]["clip"] == target
                     if target else r["near"]["clip"] is None,
                     "embedding_best_window": round(_embedding_window(emb, gen, tokens[target]), 3)
                     if target else None})

    for a in train:
        w = waves[a]
        rms = np.sqrt(np.mean(w ** 2))
        for db in (-1, -3, -6):
            add(f"gain {db} dB", a, codes(np.clip(w * 10 ** (db / 20), -1, 1).astype(np.float32)), index, a)
        for snr in (30, 20, 10):
            noisy = w + rng.normal(size=w.shape).astype(np.float32) * rms * 10 ** (-snr / 20)
            add(f"noise {snr} dB SNR", a, codes(np.clip(noisy, -1, 1).astype(np.float32)), index, a)

    def style(name):
        return name.split("/")[-1].rsplit("_", 1)[0]

    for c in [c for c in meta if c["split"] == "valid"]:
        held = codes(waves[c["audio"]])
        own = [a for a in train if style(a) == style(c["audio"])]
        others = [a for a in train if style(a) != style(c["audio"])]
        for label, group in (("held-out clip vs other styles", others), ("held-out clip vs own style", own)):
            sub = CopyIndex.build(group, [tokens[a] for a in group], info.frame_rate)
            r = sub.check(held)
            rows.append({"case": label, "source": c["audio"], "exact_longest_s": r["exact"]["longest_s"],
                         "exact_share": r["exact"]["share"], "near_longest_s": r["near"]["longest_s"],
                         "near_share": r["near"]["share"],
                         "embedding_best_window": round(max(_embedding_window(emb, held, tokens[a])
                                                            for a in group), 3)})
    return rows


def summarize_cases(rows: list[dict]) -> list[dict]:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        out.append({"case": case, "n": len(rs),
                    "exact_caught": sum(r["exact_share"] > 0 for r in rs),
                    "exact_longest_s_max": max(r["exact_longest_s"] for r in rs),
                    "near_caught": sum(r["near_share"] > 0 for r in rs),
                    "near_share_min": round(min(r["near_share"] for r in rs), 2),
                    "near_share_median": round(float(np.median([r["near_share"] for r in rs])), 2),
                    "embedding_min": min(r["embedding_best_window"] for r in rs),
                    "embedding_max": max(r["embedding_best_window"] for r in rs)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", default="1000,10000", help="training clip counts of the scale cases")
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 clips, no codec cases")
    ap.add_argument("--work", default="/tmp/bench_copy_check")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns._case:  # one scale case, in its own process (its own peak memory)
        print(json.dumps(scale_case(int(json.loads(ns._case)["clips"]))))
        return 0
    counts = [100, 1000] if ns.quick else [int(x) for x in ns.clips.split(",")]
    out = {"machine": describe(), "command": "python bench/bench_copy_check.py " + " ".join(argv or sys.argv[1:]),
           "settings": {"seed_frames": copy_check.SEED_FRAMES, "stride": copy_check.STRIDE,
                        "max_seed_hits": copy_check.MAX_SEED_HITS, "agreement": copy_check.AGREEMENT,
                        "window_s": copy_check.WINDOW_SECONDS}, "scale": []}
    for n in counts:
        out["scale"].append(run_case_in_child(__file__, {"clips": n}))
        print(json.dumps(out["scale"][-1]))
    if not ns.quick:
        rows = planted_cases(Path(ns.work))
        out["planted"] = summarize_cases(rows)
        out["planted_rows"] = rows
        for r in out["planted"]:
            print(json.dumps(r))
    if ns.json:
        save_json(ns.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
