"""Generation speed of lora/generation/engine.py against this machine's memory-bandwidth limit.

    python bench/bench_generate.py                    # tiny + musicgen-small architecture, base/unmerged/merged,
                                                      # batch 1 and 8
    python bench/bench_generate.py --quick            # smoke run (tiny model, 0.5 s)
    python bench/bench_generate.py --models small --dtypes auto,bfloat16 --json bench/results/generate.json

Each case runs in a fresh child process (its own peak memory) after the parent measured the machine
(matmul peaks, copy bandwidth; bench/machine.py). A case loads the model with
lora.generation.model.load_generation_model (base; LoRA adapter unmerged; LoRA merged), then runs
lora.generation.engine.generate (classifier-free guidance 3, top-k 250 sampling: one batched forward
of the conditional and unconditional halves per step) on ``--seconds`` of audio per prompt.

Reported: steady-state decoder steps per second (median interval between consecutive decoding steps
after the first few, stamped where each step samples its tokens, so every ``--decodings`` path is
timed alike; it includes sampling), the real-time factor (wall time of the whole generate call incl.
text encoding and EnCodec decoding / seconds of audio produced; < 1 is faster than real time), and
the bandwidth limit: each step must read every decoder weight used per step once (self-attention,
cross-attention q/out, FFN, LM heads, norms; the cross-attention k/v of the text are cached,
embeddings are gathered), so steps/s <= copy bandwidth / those bytes. The LoRA adapter used is
random (rank 12 on attention, non-zero B).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


from machine import peak_rss_mb, run_case_in_child  # noqa: E402

VARIANTS = ("base", "unmerged", "merged")
PROMPTS = ["deep house groove with warm bass", "lofi hip hop beat with mellow piano",
           "epic orchestral strings",
           "funky disco bassline with brass", "ambient pad with soft bells", "drum and bass breakbeat",
           "acoustic guitar folk melody", "dark techno with heavy kick"]


def make_adapter(model_path: str, tiny_dir: str, rank: int, out: Path) -> Path:
    """A random LoRA adapter (B != 0, so merging changes the weights) saved like train_lora saves
    one."""
    import torch

    from lora.config import Config
    from lora.modeling.adapter import attach_lora
    from lora.modeling.loading import load_base_model

    if (out / "adapter_model.safetensors").is_file():
        return out
    cfg = Config()
    cfg.model.model_path, cfg.model.tiny_model_dir = model_path, tiny_dir
    cfg.lora.lora_rank, cfg.lora.lora_alpha = rank, 2.0 * rank
    model, _, _ = load_base_model(cfg.model, device="cpu")
    torch.manual_seed(0)
    model = attach_lora(model, cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(str(out))
    return out


def decoder_bytes_per_step(model) -> int:
    """Bytes of decoder weights read by one decoding step (see the module docstring)."""
    from lora.modeling.loading import family_for

    total = 0
    for name, p in family_for(model).decoder(model).named_parameters():
        if "embed_tokens" in name or ".encoder_attn.k_proj" in name or ".encoder_attn.v_proj" in name:
            continue
        if "lora_" in name and (".encoder_attn.k_proj" in name or ".encoder_attn.v_proj" in name):
            continue
        total += p.numel() * p.element_size()
    return total


def stamp_steps(device, on_step) -> None:
    """Call ``on_step()`` at every decoding step: lora.generation's TokenSampler runs once per step
    whatever runs the decoder (transformers' forward, the static cache, a CUDA graph). On CUDA it
    synchronizes first, so the stamps are the step's real end."""
    import torch

    from lora.generation import engine

    call = engine.TokenSampler.__call__

    def wrapped(self, logits, uniforms=None):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        on_step()
        return call(self, logits, uniforms)

    engine.TokenSampler.__call__ = wrapped


def run_case(spec: dict) -> dict:
    import torch

    from lora.config import Config
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings
    from lora.modeling.loading import family_for

    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = Config()
    cfg.model.model_path, cfg.model.tiny_model_dir = spec["model_path"], spec["tiny_dir"]
    cfg.generation.dtype = spec["dtype"]
    cfg.generation.merge = spec["variant"] == "merged"
    adapter = None if spec["variant"] == "base" else spec["adapter"]
    t0 = time.perf_counter()
    model, processor, info, _ = load_generation_model(cfg, device=device, adapter_path=adapter)
    load_s = time.perf_counter() - t0
    stamps: list[float] = []
    stamp_steps(device, lambda: stamps.append(time.perf_counter()))
    dec = spec.get("decoding", "auto")
    s = SamplingSettings(guidance_scale=3.0, top_k=250, do_sample=True)
    B = spec["batch"]

    def reqs(seconds):
        return [Request(prompt=PROMPTS[i % len(PROMPTS)], seed=i, duration=seconds, sampling=s)
                for i in range(B)]

    # warm-up
    generate(model, processor, info, reqs(0.5), batch_size=B, progress=False, decoding=dec)
    stamps.clear()
    t0 = time.perf_counter()
    generate(model, processor, info, reqs(spec["seconds"]), batch_size=B, progress=False, decoding=dec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps[3:], stamps[4:])]
    step_s = statistics.median(steps)
    wbytes = decoder_bytes_per_step(model)
    out = {**spec, "load_s": load_s, "wall_s": wall, "decoder_steps": len(stamps),
           "step_s_median": step_s,
           "steps_per_s": 1.0 / step_s, "rtf": wall / (B * spec["seconds"]),
           "x_realtime_per_stream": spec["seconds"] / wall, "decoder_weight_bytes_per_step": wbytes,
           "decoder_dtype": str(family_for(info).decoder_param(model).dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(),
           "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_paired(spec: dict) -> dict:
    """Base, unmerged and merged models loaded side by side, timed in alternation (``rounds``
    rounds), so that the drift of a shared machine hits every variant alike; per variant the median
    over rounds of the median step time."""
    import torch

    from lora.config import Config
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings
    device = torch.device(spec["device"])
    models, stamps = {}, {v: [] for v in VARIANTS}
    current = [VARIANTS[0]]
    stamp_steps(device, lambda: stamps[current[0]].append(time.perf_counter()))
    for v in VARIANTS:
        cfg = Config()
        cfg.model.model_path, cfg.model.tiny_model_dir = spec["model_path"], spec["tiny_dir"]
        cfg.generation.dtype = spec["dtype"]
        cfg.generation.merge = v == "merged"
        models[v] = load_generation_model(cfg, device=device, adapter_path=None if v == "base"
                                          else spec["adapter"])
    s = SamplingSettings(guidance_scale=3.0, top_k=250, do_sample=True)
    B = spec["batch"]
    reqs = [Request(prompt=PROMPTS[i % len(PROMPTS)], seed=i, duration=spec["seconds"], sampling=s)
            for i in range(B)]
    per = {v: [] for v in VARIANTS}
    for r in range(spec["rounds"] + 1):
        for v in VARIANTS:
            model, processor, info, _ = models[v]
            current[0] = v
            stamps[v].clear()
            generate(model, processor, info, reqs, batch_size=B, progress=False,
                     decoding=spec.get("decoding", "auto"))
            if r > 0:  # round 0 is the warm-up
                per[v].append(statistics.median(b - a for a, b in zip(stamps[v][3:], stamps[v][4:])))
    out = {v: {"step_s_rounds": per[v], "steps_per_s": 1.0 / statistics.median(per[v])} for v in VARIANTS}
    return {**spec, "paired": out}


def run_child(spec: dict) -> dict:
    return run_case_in_child(__file__, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 0.5 s, batch 1 and 2")
    ap.add_argument("--models", default="tiny,small",
                    help="comma list: tiny, small / medium / large (random weights, "
                         "facebook/musicgen-* architecture)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="auto",
                    help="comma list of generation.dtype values (auto: bf16 on GPUs and on CPUs with "
                         "AMX/AVX512-BF16, else fp32)")
    ap.add_argument("--decodings", default="auto",
                    help="comma list of generation.decoding values: auto, transformers, static, "
                         "cuda_graph")
    ap.add_argument("--seconds", type=float, default=None,
                    help="audio per prompt (default: tiny 4, small 3)")
    ap.add_argument("--rank", type=int, default=12)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny_dir", default=str(ROOT / "output" / "tiny_model"))
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the interleaved base/unmerged/merged timing")
    ap.add_argument("--no_paired", action="store_true",
                    help="skip the interleaved base/unmerged/merged timing")
    ap.add_argument("--paired_only", action="store_true", help="only the interleaved timing")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import logging

    from lora.common.cli import setup_logging

    setup_logging(logging.WARNING)
    if args._case:
        spec = json.loads(args._case)
        print(json.dumps(run_paired(spec) if spec.get("paired") else run_case(spec)))
        return 0
    import machine
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    from musicgen_arch import model_path

    models = ["tiny"] if args.quick else args.models.split(",")
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]
    m = machine.measure(device, quick=args.quick)
    print(machine.summary_line(m), flush=True)
    results = []
    for model in models:
        path = model_path(model)
        adapter = str(make_adapter(path, args.tiny_dir, args.rank, Path("/tmp")
                                   / f"bench_adapter_{model}_r{args.rank}"))
        secs = 0.5 if args.quick else (args.seconds or (4.0 if model == "tiny" else 3.0))
        for dtype in ([] if args.paired_only else args.dtypes.split(",")):
            for b in batches:
                for dec in args.decodings.split(","):
                    for v in args.variants.split(","):
                        spec = {"model": model, "model_path": path, "tiny_dir": args.tiny_dir,
                                "adapter": adapter,
                                "variant": v, "batch": b, "dtype": dtype, "seconds": secs,
                                "device": device, "decoding": dec}
                        r = run_child(spec)
                        results.append(r)
                        print(f"  {model} {dtype} batch {b} {dec} {v}: {r['steps_per_s']:.2f} steps/s, "
                              f"RTF {r['rtf']:.3f}", flush=True)
    paired = []
    if not args.no_paired and len(args.variants.split(",")) == len(VARIANTS):
        for model in models:
            path = model_path(model)
            secs = 0.5 if args.quick else (args.seconds or (4.0 if model == "tiny" else 3.0))
            for dtype in args.dtypes.split(","):
                for b in batches:
                    spec = {"model": model, "model_path": path, "tiny_dir": args.tiny_dir,
                            "adapter": str(Path("/tmp") / f"bench_adapter_{model}_r{args.rank}"),
                            "batch": b,
                            "dtype": dtype, "seconds": secs, "device": device, "paired": True,
                            "rounds": 1 if args.quick else args.rounds,
                            "decoding": args.decodings.split(",")[0]}
                    paired.append(run_child(spec))
                    pr = paired[-1]["paired"]
                    print(f"  interleaved {model} {dtype} batch {b}: " + ", ".join(
                        f"{v} {pr[v]['steps_per_s']:.2f}" for v in VARIANTS) + " steps/s", flush=True)
    bw = m["copy_bandwidth_bytes"]
    command = "python bench/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nGeneration, CFG 3 (batched cond+uncond), top-k 250 | {m['date']} | `{command.strip()}`\n")
    print("| model | dtype | batch | decoding | variant | decoder steps/s | vs base | bandwidth "
          "limit steps/s | % of limit | RTF (wall/audio) | audio s | peak RSS (MB) | load (s) |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next((x for x in results if x["model"] == r["model"] and x["dtype"] == r["dtype"]
                     and x["batch"] == r["batch"] and x["variant"] == "base"
                     and x.get("decoding") == r.get("decoding")), None)
        limit = bw / r["decoder_weight_bytes_per_step"]
        rel = f"{100 * r['steps_per_s'] / base['steps_per_s']:.1f}%" if base else "-"
        mem = f"{r['peak_rss_mb']:.0f}" + (f" / CUDA {r['cuda_max_allocated_mb']:.0f}"
                                           if "cuda_max_allocated_mb" in r
                                           else "")
        print(f"| {r['model']} | {r['decoder_dtype']} | {r['batch']} | {r.get('decoding', 'auto')} "
              f"| {r['variant']} | {r['steps_per_s']:.2f} | {rel} | {limit:.1f} | "
              f"{100 * r['steps_per_s'] / limit:.0f}% | {r['rtf']:.3f} | "
              f"{r['batch'] * r['seconds']:g} | {mem} | {r['load_s']:.1f} |")
    if paired:
        print(f"\nInterleaved timing (the three variants loaded side by side, timed in turn, "
              f"{args.rounds} rounds; median step time):\n")
        print("| model | dtype | batch | decoding | base steps/s | unmerged steps/s | merged steps/s | "
              "unmerged vs base | merged vs base |")
        print("|---|---|---:|---|---:|---:|---:|---:|---:|")
        for r in paired:
            pr = r["paired"]
            b0 = pr["base"]["steps_per_s"]
            print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r.get('decoding', 'auto')} | "
                  f"{b0:.2f} | {pr['unmerged']['steps_per_s']:.2f} | "
                  f"{pr['merged']['steps_per_s']:.2f} | "
                  f"{100 * pr['unmerged']['steps_per_s'] / b0:.1f}% | "
                  f"{100 * pr['merged']['steps_per_s'] / b0:.1f}% |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": m, "command": command.strip(),
                                               "results": results,
                                               "interleaved": paired}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
