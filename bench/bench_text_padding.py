"""What padding the text states costs in generation: lora.generation pads every prompt's text states
to a multiple of TEXT_PAD_MULTIPLE tokens (so a seed reproduces its sample alone or batched, in bf16
too); this times generate() with several multiples in ONE process, interleaved over rounds (the host
drifts), on the musicgen-small architecture (random weights, bench/musicgen_arch.py) in the default
dtype.

    python bench/bench_text_padding.py                       # batch 8, multiples 64, 32, 16, 3 rounds
    python bench/bench_text_padding.py --batch 1 --multiples 32,16 --rounds 4

The prompts are all shorter than the smallest multiple, so every case is one batch of the same
prompts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from musicgen_arch import model_path  # noqa: E402

PROMPTS = ["lofi hip hop beat with mellow piano", "dark techno with heavy kick", "ambient pad",
           "funky disco bassline with brass", "drum and bass breakbeat", "acoustic guitar folk melody",
           "deep house groove with warm bass", "808 trap beat"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--multiples", default="64,32,16")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--model", default="small")
    a = ap.parse_args(argv)

    from lora.config import Config
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings
    from lora.modeling import text_padding
    from lora.modeling.loading import family_for

    cfg = Config()
    cfg.model.model_path = model_path(a.model)
    model, processor, info, _ = load_generation_model(cfg, adapter_path=None)
    s = SamplingSettings(guidance_scale=3.0, top_k=250, do_sample=True)
    reqs = [Request(prompt=PROMPTS[i % len(PROMPTS)], seed=i, duration=a.seconds, sampling=s)
            for i in range(a.batch)]
    multiples = [int(m) for m in a.multiples.split(",")]
    times: dict[int, list[float]] = {m: [] for m in multiples}
    for rnd in range(a.rounds + 1):
        for m in multiples:
            text_padding.TEXT_PAD_MULTIPLE = m
            t0 = time.perf_counter()
            out = generate(model, processor, info, reqs, batch_size=a.batch, progress=False)
            dt = time.perf_counter() - t0
            assert len({r.text_length for r in out}) == 1 and out[0].batch_size == a.batch
            if rnd:
                times[m].append(dt)
    base = statistics.median(times[min(multiples)])
    dtype = str(family_for(info).decoder_param(model).dtype).replace("torch.", "")
    print(f"{a.model}, batch {a.batch} x {a.seconds:g} s, decoder dtype {dtype}, "
          f"median of {a.rounds} interleaved rounds:")
    for m in multiples:
        med = statistics.median(times[m])
        print(f"  text padded to {m:3d}: {med:6.2f} s  ({100 * (med / base - 1):+.0f}% vs "
              f"{min(multiples)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
