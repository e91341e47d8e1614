"""Set-up before the first training step, phase by phase, on musicgen-small / -medium / -large
architectures: load_base_model, LoRA attach (peft), the bf16 cast of the frozen decoder weights, the
move to the device and the step options -- the parts of lora.training.model_prep.prepare_model,
timed apart, each model in a fresh process.

    python bench/bench_setup.py --models small,medium,large [--json bench/results/setup.json]

Random weights (bench/musicgen_arch.py builds each folder once: 2.4 / 7 / 14 GB); the model files
are read once before each case, so the load is from the page cache (a process cold start, not a disk
one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import peak_rss_mb, run_case_in_child, save_json  # noqa: E402


def run_case(spec: dict) -> dict:
    import torch
    from musicgen_arch import model_path

    from lora.config import Config
    from lora.modeling.adapter import attach_lora
    from lora.modeling.loading import load_base_model
    from lora.training.model_prep import configure_step, move_trained_modules, prepare_frozen_weights

    cfg = Config()
    cfg.model.model_path = model_path(spec["model"])
    out = {"model": spec["model"]}
    torch.manual_seed(0)
    t = time.perf_counter()
    model, _, info = load_base_model(cfg.model)
    out["load_s"] = time.perf_counter() - t
    out["parameters"] = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    model = attach_lora(model, cfg.lora)
    out["attach_lora_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prepare_frozen_weights(model, "bf16", "auto")
    out["cast_bf16_s"] = time.perf_counter() - t
    device = torch.device(spec.get("device", "cpu"))
    t = time.perf_counter()
    move_trained_modules(model, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["move_s"] = time.perf_counter() - t
    t = time.perf_counter()
    configure_step(model, device, decoder_dropout=cfg.training.decoder_dropout)
    out["configure_s"] = time.perf_counter() - t
    out["lora_setup_s"] = out["attach_lora_s"] + out["cast_bf16_s"] + out["move_s"] + out["configure_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small", help="comma list of small, medium, large")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from lora.common.cli import setup_logging

    setup_logging()
    if a._case:
        print(json.dumps(run_case(json.loads(a._case))))
        return 0
    import machine
    from musicgen_arch import model_path

    rows = []
    for name in a.models.split(","):
        machine.read_folder_once(model_path(name))
        rows.append(run_case_in_child(Path(__file__), {"model": name, "device": a.device}))
    m = machine.describe()
    print(f"Set-up phases | {m['cpu']}, {m['cores']} cores | {m['date']} | `python bench/bench_setup.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| model | parameters | load s | LoRA attach s | bf16 cast s | move s | step options s | "
          "LoRA set-up s | peak RSS GB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['load_s']:.1f} | "
              f"{r['attach_lora_s']:.2f} | {r['cast_bf16_s']:.2f} | {r['move_s']:.2f} | "
              f"{r['configure_s']:.2f} | {r['lora_setup_s']:.2f} | {r['peak_rss_mb'] / 1024:.1f} |")
    if a.json:
        save_json(a.json, {"machine": m, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
