"""What LoRA dropout costs in the CPU train step: one process, three variants alternating step by
step.

    python bench/bench_dropout.py                                  # musicgen-small architecture, 8 rounds
    python bench/bench_dropout.py --model /tmp/peer/models/small-arch --json bench/results/dropout_xeon.json
    python bench/bench_dropout.py --quick                          # tiny model, 2 rounds: checks that it runs

The step is train_lora.py's (bench/step_ab.py: lora.training.model_prep.prepare_model, step_loss
under bf16 autocast, backward, clipping, AdamW), batch 2 x 10 s, 80-token text states (the second
caption 25% shorter), the variants in turn, the order swapped every round, after 3 warm-up steps:

* ``fastdropout``: the default, lora.modeling.cpu_speed.FastDropout at training.lora_dropout 0.1;
* ``fixed-noise``: the same multiply by a 0 / 1/(1-p) noise tensor made once per shape (no random
  numbers, no mask arithmetic, and the noise is not a new tensor each step): what the dropout costs
  beyond drawing its masks;
* ``off``: p = 0 (the LoRA layers see their input unchanged).

Only ``fastdropout`` is what training does; the other two are measuring aids, never used for
training.
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
    ap.add_argument("--model", default="small",
                    help="model folder, tiny, or small / medium / large (random weights)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--frames", type=int, default=500, help="codec frames per clip (500 = 10 s)")
    ap.add_argument("--text_tokens", type=int, default=80)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.frames, args.text_tokens, args.rounds = "tiny", 40, 8, 2

    import machine
    import torch
    from step_ab import alternate, cpu_train_step

    from lora.modeling.cpu_speed import fast_dropout_class

    step, model = cpu_train_step(args.model, args.frames, args.text_tokens)
    drops = [m for m in model.modules() if isinstance(m, fast_dropout_class())]
    if not drops:
        raise SystemExit("no FastDropout in the model (lora_dropout 0?)")
    p = drops[0].p
    noise = {}

    def fixed_noise(x):
        if x.shape not in noise:
            noise[x.shape] = (torch.rand(x.shape) >= p).to(x.dtype).div_(1.0 - p)
        return x * noise[x.shape]

    def variant(rate: float, forward=None):
        def switch():
            for d in drops:
                d.p = rate
                d.__dict__.pop("forward", None)  # the class's own forward
                if forward is not None:
                    d.forward = forward
        return switch

    times = alternate(step, {"fastdropout": variant(p), "fixed-noise": variant(p, fixed_noise),
                             "off": variant(0.0)}, args.rounds)
    m = machine.describe()
    command = "python bench/bench_dropout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nLoRA dropout in the CPU train step: {len(drops)} LoRA dropouts (p {p}), batch 2 x "
          f"{args.frames} frames, {args.text_tokens} text tokens, bf16, {args.rounds} rounds | "
          f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} | {time.strftime('%Y-%m-%d %H:%M')} "
          f"| `{command.strip()}`\n")
    print("| variant | median step, s | against off (pair by pair, median) |\n|---|---:|---:|")
    for v, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, times["off"]))
        print(f"| {v} | {statistics.median(t):.3f} | {ratio:.3f}x |")
    if args.json:
        machine.save_json(args.json,
                          {"machine": m, "command": command.strip(), "lora_dropouts": len(drops),
                                      "p": p, "step_s": times})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
