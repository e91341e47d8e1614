"""Does bf16 training learn like fp32? Held-out loss curves of the same LoRA run in both precisions.

    python bench/bench_precision_quality.py                  # tiny model on the example data, 5 epochs
    python bench/bench_precision_quality.py --quick          # 20 steps
    python bench/bench_precision_quality.py --json bench/results/precision_quality.json

Runs lora/train_lora.py twice on the example dataset (prepare_data.py --create_example), with the
same seed and data order: --mixed_precision no (fp32 weights, fp32 math) and --mixed_precision bf16
(bf16 autocast; with base_weights_dtype auto the frozen base weights are stored in bf16, LoRA and
AdamW stay fp32). Prints both held-out loss curves (from logs/metrics.jsonl) side by side, their
largest gap, and the total drop of each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def curve(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model_path", default="tiny")
    ap.add_argument("--epochs", type=float, default=5.0)
    ap.add_argument("--eval_steps", type=int, default=10)
    ap.add_argument("--data_dir", default=None,
                    help="existing example data (default: created in a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import logging

    from lora import prepare_data, train_lora
    from lora.common.cli import setup_logging

    setup_logging(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        tmp = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else tmp / "data"
        if not args.data_dir:
            with contextlib.redirect_stdout(io.StringIO()):
                prepare_data.main(["--create_example", "--output_dir", str(data)])
        for prec in ("no", "bf16"):
            out = tmp / f"out_{prec}"
            argv_t = ["--model_path", args.model_path, "--data_dir", str(data), "--output_dir", str(out),
                      "--tiny_model_dir", str(ROOT / "output" / "tiny_model"), "--mixed_precision", prec,
                      "--eval_steps", str(args.eval_steps), "--save_steps", "100000",
                      "--logging_steps", "10"]
            argv_t += ["--max_steps", "20"] if args.quick else ["--num_epochs", str(args.epochs)]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = train_lora.main(argv_t)
            if rc != 0:
                raise SystemExit(f"train_lora failed for {prec}")
            state = json.loads((out / "final_model" / "trainer_state.json").read_text())
            results[prec] = {"curve": curve(out), "wall_s": time.perf_counter() - t0,
                             "precision": state["precision"]}
    a, b = results["no"]["curve"], results["bf16"]["curve"]
    print(f"\nHeld-out loss (mean CE over codebooks), {args.model_path} on the example data, "
          f"{'20 steps' if args.quick else f'{args.epochs:g} epochs'} | {time.strftime('%Y-%m-%d')} | "
          f"`python bench/bench_precision_quality.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| step | fp32 | bf16 | bf16 - fp32 |")
    print("|---:|---:|---:|---:|")
    for (s1, l1), (_, l2) in zip(a, b):
        print(f"| {s1} | {l1:.4f} | {l2:.4f} | {l2 - l1:+.4f} |")
    gap = max(abs(l2 - l1) for (_, l1), (_, l2) in zip(a, b))
    drop32, drop16 = a[0][1] - a[-1][1], b[0][1] - b[-1][1]
    print(f"\nlargest gap {gap:.4f}; drop fp32 {drop32:.4f}, bf16 {drop16:.4f}; wall fp32 "
          f"{results['no']['wall_s']:.0f} s, bf16 {results['bf16']['wall_s']:.0f} s (precision "
          f"used: {results['bf16']['precision']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "max_gap": gap, "drop_fp32": drop32,
                                               "drop_bf16": drop16}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
