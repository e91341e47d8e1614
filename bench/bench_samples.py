"""What the training samples cost per validation (lora/training/samples.py), on this machine.

    python bench/bench_samples.py --json bench/results/samples.json       # tiny + musicgen-small arch
    python bench/bench_samples.py --models tiny --rounds 3

Each model runs in a fresh child process: the model is loaded and prepared exactly as train_lora.py
prepares it (LoRA attached with its dropout, CPU step options, the precision ``mixed_precision:
auto`` picks here), in training mode; then the Sampler renders the default round (3 prompts,
``training.sample_seconds`` each, seeds 42-44, the generation section's default sampling, guidance 3)
``--rounds`` times into a temporary folder, with the copy check against an index of 100 random 30-s
clips. Reported: the seconds of each round (median), which include text encoding, decoding, EnCodec,
the WAV files, the manifest and the copy check; the machine's load average before and after (this
machine is shared: a busy one slows the two-thread cases most). The musicgen-small architecture is random weights
with the hub model's shapes (bench/musicgen_arch.py), so its time is musicgen-small's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe, peak_rss_mb, run_case_in_child, save_json  # noqa: E402

PROMPTS = ["techno drum loop, punchy four-on-the-floor kick, claps and crisp hi-hats, 128 BPM",
           "funky bass groove with electric piano chord stabs, sawtooth bass line, 110 BPM",
           "ambient pad with soft bells and a slow evolving texture"]


def case(spec: dict) -> dict:
    import os

    import numpy as np
    import torch

    from lora.config import Config
    from lora.modeling.loading import family_for, load_base_model
    from lora.modeling.precision import choose_precision
    from lora.scoring.copy_check import CopyIndex
    from lora.training import model_prep, samples

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    load_before = os.getloadavg()[0]
    cfg = Config()
    cfg.model.model_path = spec["model_path"]
    cfg.model.tiny_model_dir = str(Path(tempfile.gettempdir()) / "bench_samples_tiny")
    device = torch.device("cpu")
    precision, _ = choose_precision(cfg.training.mixed_precision, device)
    t0 = time.perf_counter()
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    model, _ = model_prep.prepare_model(model, cfg, precision, device)
    model_prep.set_train_mode(model, cache_text=True)
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    index = CopyIndex.build([f"c{i}" for i in range(100)],
                            [rng.integers(0, info.vocab_size, int(30 * info.frame_rate)) for _ in range(100)],
                            info.frame_rate)
    g = cfg.generation
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        sampler = samples.Sampler(out=Path(tmp), prompts=PROMPTS, seeds=[42, 43, 44],
                                  seconds=float(spec["seconds"]), every=1,
                                  sampling=samples.SamplingSettings(guidance_scale=g.guidance_scale,
                                                                    top_k=g.top_k),
                                  max_window=30.0, extend_stride=18.0, index=index, min_seconds=1.0)
        for r in range(spec["rounds"]):
            t0 = time.perf_counter()
            sampler.render(model, processor, info, step=r, epoch=0.0, runlog=None)
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in family_for(info).decoder(model).parameters())
    return {"model": spec["name"], "decoder_params_m": round(params / 1e6, 1), "precision": precision,
            "torch_threads": torch.get_num_threads(), "prompts": len(PROMPTS), "seconds": spec["seconds"],
            "rounds": times, "round_s_median": round(statistics.median(times), 2),
            "per_audio_second_s": round(statistics.median(times) / (len(PROMPTS) * spec["seconds"]), 3),
            "load_s": round(load, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small", help="tiny and/or small (musicgen-small's architecture)")
    ap.add_argument("--seconds", type=float, default=5.0, help="training.sample_seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="0", help="torch threads per case, e.g. 1,2 (0 = torch's default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns._case:
        print(json.dumps(case(json.loads(ns._case))))
        return 0
    from musicgen_arch import model_path

    out = {"machine": describe(), "command": "python bench/bench_samples.py " + " ".join(argv or sys.argv[1:]),
           "cases": []}
    for name in ns.models.split(","):
        for threads in ns.threads.split(","):
            spec = {"name": name, "model_path": model_path(name), "seconds": ns.seconds, "threads": int(threads),
                    "rounds": ns.rounds if name == "tiny" else max(1, min(ns.rounds, 2))}
            out["cases"].append(run_case_in_child(__file__, spec))
            print(json.dumps(out["cases"][-1]))
    if ns.json:
        save_json(ns.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
