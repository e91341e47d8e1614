"""The cross-attention kernel of the CPU train step (lora.modeling.cpu_speed.math_cross_attention):
SDPA's math kernel while training up to MATH_CROSS_ATTENTION_MAX_SCORES audio positions x text
tokens, flash above.

    python bench/bench_attention.py --grid                        # the kernel grid behind the rule
    python bench/bench_attention.py --json bench/results/attention_step.json   # the train step, rule A/B
    python bench/bench_attention.py --frames 1500 --text_tokens 48             # a 30-s window, a 48-token caption
    python bench/bench_attention.py --quick                       # tiny model, few steps: checks that it runs

--grid: forward + backward of one cross-attention (bf16, 2 clips x 16 heads, head dim 64:
musicgen-small's) with SDPA's flash and math kernels, minimum of 5, for audio positions x text
tokens on a grid; the causal self-attention (flash) at the same lengths for scale.

The A/B: one process prepares the model exactly like train_lora.py
(lora.training.model_prep.prepare_model, default config: bf16 autocast, bf16 frozen weights, LoRA
rank 12 on attention; musicgen-small's architecture with random weights by default) and times the
step train_lora.py runs (step_loss, backward, clipping, AdamW) on one batch of 2 clips x
``--frames`` codec frames with ``--text_tokens`` caption states (the second caption ``--padding``
shorter: a padding mask, as in a real batch of two captions), alternating step by step between the
rule now and the rule before it (math kernel up to 64 text tokens, whatever the clip length), the
order swapped every round, after 3 warm-up steps. Same process, same batch: the VM's drift falls on
both alike.
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

from machine import describe, save_json  # noqa: E402

OLD_MAX_KEYS = 64  # the rule before (2026-11-26): the math kernel up to 64 text tokens


def grid(frames: list[int], tokens: list[int]) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def best(T, L, backend, causal=False, reps=5):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 16, n, 64, generator=g, dtype=torch.bfloat16).requires_grad_()
                   for n in (T, L, L))
        grad = torch.randn(2, 16, T, 64, dtype=torch.bfloat16)
        out = float("inf")
        for _ in range(reps):
            with sdpa_kernel(backend):
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
                out = min(out, time.perf_counter() - t0)
        return out * 1e3

    rows = []
    for T in frames:
        row = {"positions": T,
               "self_attention_flash_ms": round(best(T, T, SDPBackend.FLASH_ATTENTION, True), 2)}
        for L in tokens:
            row[f"{L}_flash_ms"] = round(best(T, L, SDPBackend.FLASH_ATTENTION), 2)
            row[f"{L}_math_ms"] = round(best(T, L, SDPBackend.MATH), 2)
        rows.append(row)
        cells = "  ".join(f"{L}: {row[f'{L}_flash_ms']:5.1f}/{row[f'{L}_math_ms']:5.1f}" for L in tokens)
        print(f"{T:5d} positions | cross-attention flash/math ms, by text tokens: {cells} | causal "
              f"self-attention (flash) {row['self_attention_flash_ms']:.1f} ms", flush=True)
    return rows


def step_ab(model_name: str, frames: int, text_tokens: int, rounds: int, padding: float = 0.25) -> dict:
    from step_ab import alternate, cpu_train_step

    from lora.modeling import cpu_speed

    rules = {"now (frames x tokens)": cpu_speed.math_cross_attention,
             f"before (<= {OLD_MAX_KEYS} tokens)": lambda queries, keys: keys <= OLD_MAX_KEYS}
    step, _ = cpu_train_step(model_name, frames, text_tokens, padding)
    info, shorter = step.info, step.second_caption_tokens

    def use(rule):
        def switch():
            cpu_speed.math_cross_attention = rule
        return switch

    times = alternate(step, {name: use(rule) for name, rule in rules.items()}, rounds)
    now, before = rules
    paired = statistics.median(b / n for b, n in zip(times[before], times[now]))
    for name, t in times.items():
        print(f"{name:24s} median {statistics.median(t):.3f} s, min {min(t):.3f} s: "
              + " ".join(f"{x:.2f}" for x in t))
    print(f"the rule now is {paired:.3f}x the rule before (median of the per-round ratios)")
    positions = frames + info.num_codebooks - 1
    return {"model": model_name, "frames": frames, "text_tokens": text_tokens,
            "second_caption_tokens": shorter, "positions": positions,
            "kernel_now": "math" if cpu_speed.math_cross_attention(positions, text_tokens) else "flash",
            "kernel_before": "math" if text_tokens <= OLD_MAX_KEYS else "flash",
            "steps_s": times, "median_s": {n: statistics.median(t) for n, t in times.items()},
            "speedup_paired_median": paired}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small",
                    help="small (musicgen-small architecture, random weights), tiny, "
                                                    "or a model folder")
    ap.add_argument("--frames", type=int, default=500, help="codec frames per clip (500 = 10 s)")
    ap.add_argument("--text_tokens", type=int, default=80,
                    help="caption states per clip (the peer bench's captions: 60-88 tokens)")
    ap.add_argument("--padding", type=float, default=0.25,
                    help="the second caption is this much shorter (its states padded, masked out)")
    ap.add_argument("--rounds", type=int, default=16, help="steps of each rule, alternating")
    ap.add_argument("--grid", action="store_true", help="the kernel grid instead of the train step A/B")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    machine = describe()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({torch.get_num_threads()} threads), {machine['date']}")
    out = {"machine": machine, "command": "python " + " ".join(sys.argv)}
    if args.grid:
        frames, tokens = ([64, 128], [16, 64]) if args.quick else ([250, 503, 1003, 1503],
                                                                   [32, 64, 96, 128, 192, 256])
        out["cross_attention_fwd_bwd"] = grid(frames, tokens)
    else:
        if args.quick:
            args.model, args.frames, args.text_tokens, args.rounds = "tiny", 40, 8, 2
        out["step"] = step_ab(args.model, args.frames, args.text_tokens, args.rounds, args.padding)
    if args.json:
        save_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
