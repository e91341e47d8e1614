"""What LoRA dropout costs in the CPU train step: one process, three variants alternating step by step.

    python bench/bench_dropout.py                                  # musicgen-small architecture, 8 rounds
    python bench/bench_dropout.py --model /tmp/peer/models/small-arch --json bench/results/dropout_xeon.json

The step is train_lora.py's (lora.training.prepare_model + step_loss under bf16 autocast, backward), batch 2 x 10 s,
80-token text states. Variants, each timed once per round in turn:

* ``fastdropout``: the default, lora.cpu_speed.FastDropout at training.lora_dropout 0.1;
* ``fixed-noise``: the same multiply by a saved 0/1.11 noise tensor, made once per shape (no random numbers, no
  mask arithmetic): what the dropout costs beyond drawing its masks (the multiplies and the saved tensors);
* ``off``: p = 0 (the LoRA layers see their input unchanged).

Only ``fastdropout`` is what training does; the other two are measuring aids, never used for training.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="model folder, tiny, or small / medium / large (random weights)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length, s")
    ap.add_argument("--text_tokens", type=int, default=80)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from accelerate import Accelerator

    import machine
    from lora.config import Config
    from lora.cpu_speed import fast_dropout_class
    from lora.dataset import CachedClip, CachedTokenDataset, collate_tokens
    from lora.loading import load_base_model
    from lora.training import prepare_model, set_train_mode, step_loss
    from musicgen_arch import model_path

    cfg = Config()
    cfg.model.model_path = model_path(args.model)
    cpu = torch.device("cpu")
    model, processor, info = load_base_model(cfg.model)
    frames, width = info.frames(args.seconds), info.text_hidden_size
    g = torch.Generator().manual_seed(0)
    clips = [CachedClip(id=str(i), text="x", split="train", mask=torch.ones(args.text_tokens, dtype=torch.long),
                        codes=torch.randint(0, info.vocab_size, (info.num_codebooks, frames), generator=g)
                        .to(torch.int16), hidden=torch.randn(args.text_tokens, width, generator=g)) for i in range(2)]
    ds = CachedTokenDataset(clips, max_frames=frames, seed=0, train=True, cond_dropout=0.0)
    model, params = prepare_model(model, cfg, "bf16", cpu)  # as train_lora.py: FastDropout on a CPU
    set_train_mode(model, cache_text=True)
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    batch = collate_tokens([ds[i] for i in range(2)], info.pad_token_id)
    cls = fast_dropout_class()
    drops = [m for m in model.modules() if isinstance(m, cls)]
    if not drops:
        raise SystemExit("no FastDropout in the model (lora_dropout 0?)")
    p = drops[0].p
    noise = {}

    def fixed_noise(x):
        if x.shape not in noise:
            noise[x.shape] = (torch.rand(x.shape) >= p).to(x.dtype).div_(1.0 - p)
        return x * noise[x.shape]

    def step(variant: str) -> float:
        for d in drops:
            d.p = 0.0 if variant == "off" else p
            if variant == "fixed-noise":
                d.forward = fixed_noise
            else:
                d.__dict__.pop("forward", None)
        t0 = time.perf_counter()
        loss = step_loss(model, processor, info, batch, cpu, acc.autocast, cache_text=True).loss
        loss.backward()
        for q in params:
            q.grad = None
        return time.perf_counter() - t0

    variants = ("fastdropout", "fixed-noise", "off")
    for v in variants:  # warm-up
        step(v)
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v].append(step(v))
    m = machine.describe()
    command = "python bench/bench_dropout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nLoRA dropout in the CPU train step: {len(drops)} LoRA dropouts (p {p}), batch 2 x {args.seconds:g} s, "
          f"{args.text_tokens} text tokens, bf16, {args.rounds} rounds | {m['cpu']}, {m['cores']} cores, torch "
          f"{m['torch']} | {time.strftime('%Y-%m-%d %H:%M')} | `{command.strip()}`\n")
    print("| variant | median step, s | against off (pair by pair, median) |\n|---|---:|---:|")
    for v in variants:
        ratio = statistics.median(a / b for a, b in zip(times[v], times["off"]))
        print(f"| {v} | {statistics.median(times[v]):.3f} | {ratio:.3f}x |")
    if args.json:
        machine.save_json(args.json, {"machine": m, "command": command.strip(), "lora_dropouts": len(drops),
                                      "p": p, "step_s": times})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
