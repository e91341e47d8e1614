"""Training throughput of the LoRA train step, as a fraction of this machine's own limits.

    python bench/bench_train.py                      # tiny + musicgen-small architecture, all cases
    python bench/bench_train.py --quick              # smoke run (tiny model, 1 s clips, few steps)
    python bench/bench_train.py --models small --cases cached-bf16 --steps 8 --json bench/results/train.json
    python bench/bench_train.py --profile cached-bf16 --models small   # torch.profiler table of the step

Each case runs in a fresh child process (so its peak memory is its own), after the parent measured
the machine's matmul peak (fp32, bf16) and copy bandwidth (bench/machine.py) in the same run. A
case:

* loads the model through lora.modeling.loading.load_base_model (timed apart) and prepares it with
  lora.training.model_prep.prepare_model (LoRA rank 12, alpha 24, default targets = decoder
  self+cross attention; training.base_weights_dtype; device placement; the step's options), exactly
  like train_lora.py;
* ``cached`` modes: builds the token cache of the batch (EnCodec codes + T5 states, timed apart as
  "cache build"), then times the step train_lora.py runs: a batch from CachedTokenDataset +
  collate_tokens, lora.training.step.step_loss (delay pattern, decoder on cached text states,
  per-codebook loss) under Accelerator.autocast, Accelerator.backward, gradient clipping, AdamW
  step;
* ``encode`` mode (what peers do, fp32 like them): EnCodec-encodes the raw audio and T5-encodes the
  captions inside every step, then the same decoder forward/backward/update.

Steady state: ``--warmup`` steps are excluded, the median of ``--steps`` step times is reported.
FLOPs are counted analytically (see ``train_flops``) and cross-checked once per case with torch's
FlopCounterMode.
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

CASES = {
    # name: (mode, mixed precision, base_weights_dtype)
    "cached-fp32": ("cached", "no", "float32"),
    "cached-bf16-fp32weights": ("cached", "bf16", "float32"),
    "cached-bf16": ("cached", "bf16", "auto"),
    "encode-fp32": ("encode", "no", "float32"),
    # CUDA: fp16 autocast + GradScaler (the seed's --fp16)
    "cached-fp16": ("cached", "fp16", "auto"),
}
# A case name may end in "+ckpt" (gradient checkpointing) and/or "+compile" (torch.compile of the
# decoder) or "+compile-ro" (torch.compile, mode reduce-overhead: CUDA graphs).
SUFFIXES = ("+ckpt", "+compile", "+compile-ro")


def parse_case(name: str) -> tuple[str, dict]:
    """'cached-bf16+ckpt' -> ('cached-bf16', {'checkpointing': True}); unknown names are refused.
    '+compile-ro': torch_compile with compile_mode reduce-overhead (CUDA graphs; flags compile +
    compile_mode)."""
    flags = {}
    if "+compile-ro" in name:
        name = name.replace("+compile-ro", "")
        flags["compile"], flags["compile_mode"] = True, "reduce-overhead"
    for suffix, key in (("+ckpt", "checkpointing"), ("+compile", "compile")):
        if suffix in name:
            name = name.replace(suffix, "")
            flags[key] = True
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}: choose from {', '.join(CASES)} (optionally with "
                         f"{' / '.join(SUFFIXES)})")
    return name, flags
CAPTIONS = ["deep house groove with warm bass and soft pads 124 bpm in a minor key",
            "lofi hip hop beat with mellow piano chords vinyl crackle and brushed drums 80 bpm"]


# --------------------------------------------------------------------------------------------
# FLOP counting (analytic)
# --------------------------------------------------------------------------------------------
def train_flops(dec, text_cfg, B: int, T: int, L: int, rank: int, n_lora_self: int, n_lora_cross: int,
                checkpointing: bool = False) -> dict:
    """FLOPs of one LoRA train step of the MusicGen decoder on B clips of T frames with L text
    tokens.

    Forward: every linear layer 2*tokens*in*out (self-attention q/k/v/out on B*S tokens;
    cross-attention q/out on B*S tokens and k/v on the B*L text tokens; fc1/fc2; the K lm heads; the
    text projection on the text), attention QK^T and AV 2*B*S*S'*D each (S' = S self, L cross; the
    causal mask is not discounted: the kernel computes the full square), LoRA 2*tokens*r*(in+out)
    per adapted layer. Backward with frozen base weights: input-gradient matmuls only (= the forward
    FLOPs of every linear whose input needs a gradient, i.e. all but the cross-attention k/v and the
    text projection, which read the frozen text states), 2x the attention FLOPs (dQ,dK and dP,dV),
    2x the LoRA FLOPs (weight + input gradients). Gradient checkpointing adds one more forward.
    """
    D, F, N, K, V = dec.hidden_size, dec.ffn_dim, dec.num_hidden_layers, dec.num_codebooks, dec.vocab_size
    Dt = text_cfg.d_model
    kc = K // dec.audio_channels
    S = T + kc - 1
    tok, txt = B * S, B * L
    lin_self = 4 * 2 * tok * D * D
    lin_cross_q_out = 2 * 2 * tok * D * D
    lin_cross_kv = 2 * 2 * txt * D * D
    ffn = 2 * 2 * tok * D * F
    attn = 2 * (2 * B * S * S * D) + 2 * (2 * B * S * L * D)
    heads = K * 2 * tok * D * V
    proj = 2 * txt * Dt * D
    lora = n_lora_self * 2 * tok * rank * 2 * D + n_lora_cross * 0  # filled below
    # cross-attention LoRA: q/out on decoder tokens, k/v on text tokens (per layer: 2 of each when
    # all four adapted)
    lora_cross = n_lora_cross * 2 * ((tok + txt) / 2) * rank * 2 * D
    lora = lora + lora_cross
    fwd_linear = N * (lin_self + lin_cross_q_out + lin_cross_kv + ffn) + heads + proj
    fwd = fwd_linear + N * attn + lora
    bwd = (fwd_linear - N * lin_cross_kv - proj) + 2 * N * attn + 2 * lora
    total = fwd + bwd + (fwd if checkpointing else 0)
    return {"forward": fwd, "backward": bwd, "total": total, "seq_len": S, "tokens": tok}


def matmul_floor(dec, B: int, S: int, dtype, device, repeats: int = 3) -> dict:
    """Time of the step's big frozen matmuls (forward and input-gradient shapes of self-attention
    q/k/v/out, cross-attention q/out, fc1, fc2 and the LM heads, B*S rows) when each runs alone at
    the speed this machine reaches for that shape: a floor for the step time that no overhead
    removal can beat."""
    import torch
    import torch.nn.functional as F

    D, Fd, N, K, V = dec.hidden_size, dec.ffn_dim, dec.num_hidden_layers, dec.num_codebooks, dec.vocab_size
    M = B * S

    def t_linear(k_in, n_out):
        a = torch.randn(M, k_in, dtype=dtype, device=device)
        w = torch.randn(n_out, k_in, dtype=dtype, device=device)
        g = torch.randn(M, n_out, dtype=dtype, device=device)
        res = []
        for f in (lambda: F.linear(a, w), lambda: g @ w):
            f()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t)
            res.append(best)
        return res  # forward, input-gradient

    dd, df, fd, dv = t_linear(D, D), t_linear(D, Fd), t_linear(Fd, D), t_linear(D, V)
    per_layer = 6 * sum(dd) + sum(df) + sum(fd)
    total = N * per_layer + K * sum(dv)
    flops = 2 * 2 * M * (N * (6 * D * D + 2 * D * Fd) + K * D * V)
    return {"seconds": total, "flops": flops, "tflops_at_shapes": flops / total / 1e12,
            "shape_tflops": {"DxD": 2 * M * D * D / dd[0] / 1e12, "DxF": 2 * M * D * Fd / df[0] / 1e12,
                             "FxD": 2 * M * Fd * D / fd[0] / 1e12, "DxV": 2 * M * D * V / dv[0] / 1e12}}


def count_lora(model) -> tuple[int, int, int]:
    """(rank, adapted self-attention layers, adapted cross-attention layers)."""
    from peft.tuners.lora import LoraLayer

    rank, n_self, n_cross = 0, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "text_encoder" not in name:  # the decoder's layers
            rank = max(rank, max(m.r.values()))
            if ".encoder_attn." in name:
                n_cross += 1
            else:
                n_self += 1
    return rank, n_self, n_cross


# --------------------------------------------------------------------------------------------
# One case (child process)
# --------------------------------------------------------------------------------------------
def peak_memory_mb(device) -> dict:
    import torch

    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_case(spec: dict) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from musicgen_arch import model_path

    from lora.config import Config
    from lora.dataset import CachedClip, CachedTokenDataset, collate_tokens
    from lora.modeling.loading import family_for, load_base_model
    from lora.training.model_prep import prepare_model, set_train_mode
    from lora.training.step import step_loss

    mode, precision, weights = CASES[spec["case"]]
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = Config()
    cfg.model.model_path = model_path(spec["model"])
    cfg.model.tiny_model_dir = spec["tiny_dir"]
    cfg.lora.lora_rank, cfg.lora.lora_alpha = spec["rank"], 2.0 * spec["rank"]
    torch.manual_seed(0)

    t0 = time.perf_counter()
    # placement as in train_lora.py: encoders first,
    model, processor, info = load_base_model(cfg.model)
    # the decoder after LoRA + the frozen-weight cast
    load_s = time.perf_counter() - t0
    fam = family_for(info)
    fam.audio_codec(model).to(device)
    fam.text_encoder_of(model).to(device)

    # Raw audio of the batch (song-like: partials + noise) and its captions.
    B, secs = spec["batch"], spec["seconds"]
    n = int(secs * info.sample_rate)
    tt = torch.arange(n) / info.sample_rate
    g = torch.Generator().manual_seed(1)
    wavs = torch.stack([sum(torch.sin(2 * torch.pi * f * tt)
                            for f in (110.0 * (i + 1), 220.0 * (i + 1.5), 440.0))
                        / 4 + 0.05 * torch.randn(n, generator=g) for i in range(B)])[:, None, :]
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(B)]

    # Cache build (what build_token_cache does per batch): EnCodec codes + T5 states.
    t0 = time.perf_counter()
    with torch.no_grad():
        codes = fam.encode_audio(model, wavs.to(device), info).cpu()
        hidden, mask = fam.encode_text(model, processor, texts, device=device)
    sync()
    cache_s = time.perf_counter() - t0
    clips = [CachedClip(id=str(i), text=texts[i], split="train", codes=codes[i].to(torch.int16),
                        hidden=hidden[i, :int(mask[i].sum())].cpu(),
                        mask=mask[i, :int(mask[i].sum())].cpu())
             for i in range(B)]
    ds = CachedTokenDataset(clips, max_frames=codes.shape[-1], seed=0, train=True, cond_dropout=0.0)
    L = int(mask.shape[1])

    # training reads tokens only: the encoders leave the accelerator, as in train_lora
    if mode == "cached":
        fam.audio_codec(model).to("cpu")
        fam.text_encoder_of(model).to("cpu")
    cfg.training.base_weights_dtype = weights
    cfg.training.gradient_checkpointing = bool(spec.get("checkpointing"))
    cfg.training.torch_compile = bool(spec.get("compile"))
    cfg.training.compile_mode = spec.get("compile_mode", "default")
    if "decoder_dropout" in spec:  # --decoder_dropout: else the config default, as train_lora.py
        cfg.training.decoder_dropout = spec["decoder_dropout"]
    model, params = prepare_model(model, cfg, precision, device)  # exactly as train_lora.py
    wdtype = "bfloat16" if next(fam.decoder(model).parameters()).dtype == torch.bfloat16 else "float32"
    set_train_mode(model, cache_text=True)
    fam.text_encoder_of(model).eval()
    assert all(p.dtype == torch.float32 for p in params), "LoRA parameters must stay float32"
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    optimizer = acc.prepare(torch.optim.AdamW(params, lr=1e-4))
    attn_impl = fam.attention_implementation(model)

    def get_batch():
        if mode == "cached":
            return collate_tokens([ds[i] for i in range(B)], info.pad_token_id)
        with torch.no_grad():  # peers: encode audio + text inside every step, fp32
            c = fam.encode_audio(model, wavs.to(device), info)
            h, m = fam.encode_text(model, processor, texts, device=device)
        return {"codes": c, "lengths": torch.full((B,), c.shape[-1], dtype=torch.long), "hidden": h,
                "mask": m, "dropped": torch.zeros(B, dtype=torch.bool), "texts": texts}

    def step():
        t_a = time.perf_counter()
        batch = get_batch()
        t_b = time.perf_counter()
        loss = step_loss(model, processor, info, batch, device, acc.autocast, cache_text=True).loss
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t_c = time.perf_counter()
        return t_c - t_a, t_b - t_a, loss

    import machine

    n_peak = machine.peak_size(device)

    def peaks():  # this machine's matmul peak right now (it drifts: the host is shared)
        return (machine.matmul_peak(torch.bfloat16, device, n=n_peak, repeats=3),
                machine.matmul_peak(torch.float32, device, n=n_peak, repeats=2))

    times, data_times, losses, adjacent = [], [], [], []
    step_peak = {}
    prof = None
    for i in range(spec["warmup"] + spec["steps"]):
        # steady-state training memory, apart from load/cache
        if i == spec["warmup"] and device.type == "cuda":
            step_peak["cuda_setup_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        if i == spec["warmup"] and spec.get("profile"):  # --profile: the timed steps only
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            prof = tprofile(activities=[ProfilerActivity.CPU]
                            + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                                                 else []))
            prof.__enter__()
        if i >= spec["warmup"] and spec.get("adjacent_peaks", True):
            adjacent.append(peaks())
        dt, d_data, loss = step()
        if i >= spec["warmup"]:
            times.append(dt)
            data_times.append(d_data)
            losses.append(float(loss.detach()))
    profile_table = None
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30)
    if device.type == "cuda":
        step_peak.update(cuda_step_max_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                         cuda_step_max_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)
    if adjacent:
        adjacent.append(peaks())
    med = statistics.median(times)

    rank, n_self, n_cross = count_lora(model)
    T = codes.shape[-1]
    base_cfg = fam.get_base(model).config
    fl = train_flops(base_cfg.decoder, base_cfg.text_encoder, B, T, L, rank, n_self, n_cross,
                     bool(spec.get("checkpointing")))
    counted = None
    if spec.get("flop_check", True):
        from torch.utils.flop_counter import FlopCounterMode

        batch = collate_tokens([ds[i] for i in range(B)], info.pad_token_id)
        with FlopCounterMode(display=False) as fc:
            loss = step_loss(model, processor, info, batch, device, acc.autocast, cache_text=True).loss
            acc.backward(loss)
        optimizer.zero_grad(set_to_none=True)
        counted = fc.get_total_flops()
    ratios = {}
    if spec.get("adjacent_peaks", True):
        mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ratios["matmul_floor"] = matmul_floor(base_cfg.decoder, B, fl["seq_len"], mm_dtype, device)
        ratios["matmul_floor_peak_bf16_after"] = machine.matmul_peak(torch.bfloat16, device,
                                                                     n=n_peak, repeats=3)
    # per step: achieved / the higher of the peaks measured just before and just after it
    if adjacent:
        for k, key in enumerate(("bf16", "fp32")):
            ratios[f"pct_of_adjacent_{key}_peak"] = 100 * statistics.median(
                fl["total"] / t / max(adjacent[j][k], adjacent[j + 1][k]) for j, t in enumerate(times))
            ratios[f"adjacent_{key}_peaks"] = [a[k] for a in adjacent]
    return {
        **spec, **ratios, "decoder_dropout": cfg.training.decoder_dropout, "mode": mode,
        "precision": precision, "base_weights_dtype": wdtype, "attn_implementation": attn_impl,
        "load_s": load_s, "cache_build_s": cache_s, "step_s_median": med,
        "step_s_mean": statistics.mean(times),
        "step_s_all": times, "data_s_median": statistics.median(data_times), "losses": losses,
        "frames": T, "text_tokens": L, "codebooks": info.num_codebooks,
        "audio_s_per_s": B * secs / med, "tokens_per_s": B * T * info.num_codebooks / med,
        "flops_step": fl["total"], "flops_forward": fl["forward"], "flops_counted_decoder_step": counted,
        "achieved_flops": fl["total"] / med, "trainable_params": sum(p.numel() for p in params),
        "lora_layers": n_self + n_cross, "threads": torch.get_num_threads(),
        **peak_memory_mb(device), **step_peak,
        **({"profile_table": profile_table} if profile_table else {})}


# --------------------------------------------------------------------------------------------
# Parent: machine + cases + report
# --------------------------------------------------------------------------------------------
def run_child(spec: dict) -> dict:
    return run_case_in_child(__file__, spec)


def compiled(r: dict) -> str:
    """The compile column's note of a result row."""
    if not r.get("compile"):
        return ""
    return " +compile-ro" if r.get("compile_mode") == "reduce-overhead" else " +compile"


def table(results: list[dict], m: dict) -> str:
    rows = ["| model | case | precision | base weights | step (s, median) | audio-s/s | tokens/s | "
            "data (ms) | TFLOP/step | TFLOP/s | % of fp32 peak | % of bf16 peak | % of bf16 peak "
            "(adjacent) | peak RSS (MB) [/ CUDA max allocated: load + cache build, training steps] "
            "| load (s) | cache build (s) |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mem = f"{r['peak_rss_mb']:.0f}" + (f" / CUDA load+cache "
                                           f"{r['cuda_setup_max_allocated_mb']:.0f}, steps "
                                           f"{r['cuda_step_max_allocated_mb']:.0f}"
                                           if "cuda_step_max_allocated_mb" in r else "")
        rows.append(
            f"| {r['model']} | {r['case']}{' +ckpt' if r.get('checkpointing') else ''}"
            f"{compiled(r)} | {r['precision']} | {r['base_weights_dtype']} | "
            f"{r['step_s_median']:.3f} | {r['audio_s_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{1000 * r['data_s_median']:.1f} | {r['flops_step'] / 1e12:.3f} | "
            f"{r['achieved_flops'] / 1e12:.3f} | "
            f"{100 * r['achieved_flops'] / m['peak_fp32_flops']:.0f}% | "
            f"{100 * r['achieved_flops'] / m['peak_bf16_flops']:.0f}% | "
            f"{r.get('pct_of_adjacent_bf16_peak', float('nan')):.0f}% | {mem} | {r['load_s']:.1f} "
            f"| {r['cache_build_s']:.2f} |")
    return "\n".join(rows)


def ratios(results: list[dict]) -> list[str]:
    out = []
    by = {(r["model"], r["case"]): r for r in results if not r.get("compile")
          and not r.get("checkpointing")}
    for model in sorted({r["model"] for r in results}):
        enc = by.get((model, "encode-fp32"))
        for case in ("cached-fp32", "cached-bf16-fp32weights", "cached-bf16"):
            c = by.get((model, case))
            if enc and c:
                out.append(f"- {model}: {case} trains at "
                           f"{c['audio_s_per_s'] / enc['audio_s_per_s']:.1f}x the audio-s/s of "
                           f"encode-every-step fp32")
        a, b = by.get((model, "cached-bf16-fp32weights")), by.get((model, "cached-bf16"))
        if a and b:
            out.append(f"- {model}: bf16 base weights vs fp32 base weights under bf16 autocast: step "
                       f"{b['step_s_median']:.3f} s vs {a['step_s_median']:.3f} s, peak RSS "
                       f"{b['peak_rss_mb']:.0f} vs {a['peak_rss_mb']:.0f} MB")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 s clips, 1+2 steps")
    ap.add_argument("--models", default="tiny,small",
                    help="comma list: tiny, small / medium / large (random weights, "
                         "facebook/musicgen-* architecture)")
    ap.add_argument("--cases", default="cached-fp32,cached-bf16-fp32weights,cached-bf16,encode-fp32",
                    help=f"comma list of {', '.join(CASES)}; a name may end in +ckpt (gradient "
                         f"checkpointing) and/or +compile")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length, s")
    ap.add_argument("--rank", type=int, default=12)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 6; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; quick 1)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in each case; 0 = torch's default")
    ap.add_argument("--decoder_dropout", default=None,
                    help="training.decoder_dropout for the cases (a number, or null = the "
                         "checkpoint's 0.1); default: the config default")
    ap.add_argument("--tiny_dir", default=str(ROOT / "output" / "tiny_model"))
    ap.add_argument("--no_flop_check", action="store_true", help="skip the FlopCounterMode cross-check")
    ap.add_argument("--profile", default=None,
                    help="profile one case with torch.profiler instead (prints a table)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--cold_start", action="store_true",
                    help="instead: time train_lora.py as a whole process from a cold start "
                         "(--steps steps, default 12) and print where the time goes (start-up, "
                         "load, token cache, LoRA set-up, first step, steady step, ...), read from "
                         "the run's logs/timing.json")
    ap.add_argument("--data_dir", default=None,
                    help="--cold_start: the prepared data (default: the synthetic "
                                                     "example set, made in a temporary folder)")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import logging

    from lora.common.cli import setup_logging

    setup_logging(logging.WARNING)
    if args._case:
        print(json.dumps(run_case(json.loads(args._case))))
        return 0

    import machine
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if args.quick:
        models, secs, steps, warmup = ["tiny"], 1.0, args.steps or 2, args.warmup or 1
    else:
        models, secs, steps, warmup = args.models.split(","), args.seconds, args.steps or 6, args.warmup or 2
    base_spec = {"batch": args.batch, "seconds": secs, "rank": args.rank, "steps": steps,
                 "warmup": warmup,
                 "device": device, "tiny_dir": args.tiny_dir, "flop_check": not args.no_flop_check,
                 "threads": args.threads, "adjacent_peaks": not args.quick}
    if args.decoder_dropout is not None:
        base_spec["decoder_dropout"] = (None if args.decoder_dropout.strip().lower() in ("null", "none")
                                        else float(args.decoder_dropout))
    if args.profile:
        case, flags = parse_case(args.profile)
        return profile(dict(base_spec, model=models[0], case=case, **flags))
    if args.cold_start:
        return cold_start(args, models if args.quick or args.models != "tiny,small" else ["small"], argv)

    m = machine.measure(device, quick=args.quick)
    print(machine.summary_line(m), flush=True)
    results = []
    for model in models:
        for name in args.cases.split(","):
            case, flags = parse_case(name)
            spec = dict(base_spec, model=model, case=case, **flags)
            results.append(run_child(spec))
            r = results[-1]
            print(f"  {model} {name}: {r['step_s_median']:.3f} s/step, {r['audio_s_per_s']:.2f} "
                  f"audio-s/s, {100 * r['achieved_flops'] / m['peak_bf16_flops']:.0f}% of the "
                  f"run's bf16 peak, {r.get('pct_of_adjacent_bf16_peak', float('nan')):.0f}% of "
                  f"the adjacent bf16 peaks", flush=True)
    command = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    dd = sorted({str(r.get("decoder_dropout")) for r in results})
    attn = sorted({str(r.get("attn_implementation")) for r in results})
    print(f"\nTraining step, batch {args.batch} x {secs:g} s, LoRA rank {args.rank} on attention, "
          f"steady state (median of {steps} steps after {warmup} warm-up), decoder dropout "
          f"{'/'.join(dd)}, attention {'/'.join(attn)} | {m['date']} | `{command.strip()}`\n")
    print(table(results, m))
    print()
    print("\n".join(ratios(results)))
    check = [r for r in results if r.get("flops_counted_decoder_step")]
    if check:
        print("\nFLOP count check (analytic vs torch FlopCounterMode, decoder forward+backward): "
              + ", ".join(
            f"{r['model']}/{r['case']} {r['flops_step'] / 1e12:.3f} vs "
            f"{r['flops_counted_decoder_step'] / 1e12:.3f}"
            for r in check if r["case"] == "cached-bf16" and not r.get("compile")
            and not r.get("checkpointing")))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": m, "command": command.strip(),
                                               "results": results},
                                              indent=1))
    return 0


# --------------------------------------------------------------------------------------------
# The whole process from a cold start (--cold_start)
# --------------------------------------------------------------------------------------------
PHASE_NOTES = {
    "start-up": "interpreter, imports, config, metadata, Accelerator",
    "load": "load_base_model (weights from safetensors; the identity hash once per file)",
    "token cache": "EnCodec codes + text-encoder states of every clip "
                   "(lora.dataprep.token_cache.build_token_cache)",
    "LoRA set-up": "attach LoRA, cast the frozen decoder weights, move to the device, step options",
    "other set-up": "data plan, optimizer, scheduler, config.yaml",
    "base held-out loss": "validation before the first step",
    "first step": "optimizer step 1 (first-call costs: allocations, kernel choices)",
    "steady step": "median of the later steps",
}


def cold_start(args, models: list[str], argv) -> int:
    """train_lora.py in a fresh process per model, timed from outside (wall) and from inside
    (logs/timing.json)."""
    import subprocess
    import tempfile

    import machine
    from musicgen_arch import model_path

    steps = args.steps or (2 if args.quick else 12)
    rows = []
    for name in models:
        path = model_path(name)
        with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
            tmp = Path(tmp)
            data = args.data_dir
            if data is None:
                data = str(tmp / "data")
                subprocess.run([sys.executable, str(ROOT / "lora" / "prepare_data.py"),
                                "--create_example",
                                "--output_dir", data], check=True, capture_output=True)
            machine.read_folder_once(path)  # a process cold start, not a disk one
            cmd = [sys.executable, str(ROOT / "lora" / "train_lora.py"), "--model_path", path,
                   "--data_dir", data,
                   "--output_dir", str(tmp / "out"), "--batch_size", str(args.batch),
                   "--gradient_accumulation_steps", "1", "--max_steps", str(steps), "--eval_steps",
                   "100000", "--save_steps", "100000", "--seed", "1"]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"train_lora.py failed on {name} (exit {proc.returncode})")
            timing = json.loads((tmp / "out" / "logs" / "timing.json").read_text())
        rows.append({"model": name, "steps": steps, "wall_s": wall, "timing": timing})
    m = machine.describe()
    command = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Cold start of train_lora.py, {steps} steps, batch {args.batch} | {m['cpu']}, "
          f"{m['cores']} cores, torch {m['torch']} | "
          f"{time.strftime('%Y-%m-%d')} | `{command.strip()}`\n")
    for r in rows:
        t = r["timing"]
        print(f"{r['model']}: whole process {r['wall_s']:.1f} s (measured outside; "
              f"{t['total']:.1f} s inside)\n")
        print("| phase | seconds | share | what |\n|---|---:|---:|---|")
        keys = [k for k in t
                if k not in ("total", "steady steps", "all steps", "first step", "steady step")]
        for k in keys + ["first step", "steady step"]:
            if t.get(k) is None:
                continue
            share = 100 * t[k] / t["total"] if k != "steady step" else 100 * t[k] * t["steady "
                                                                                      "steps"] / t["total"]
            what = PHASE_NOTES.get(k, "")
            if k == "steady step":
                what += f" ({t['steady steps']} steps; share = all of them)"
            print(f"| {k} | {t[k]:.2f} | {share:.0f}% | {what} |")
        print()
    if args.json:
        machine.save_json(args.json, {"machine": m, "command": command.strip(), "cold_start": rows})
    return 0


def profile(spec: dict) -> int:
    """torch.profiler over the timed steady-state steps of one case (not the load, cache build,
    warm-up or the peak measurements): which ops dominate the step. Prints the table, totals over
    all timed steps."""
    spec = dict(spec, flop_check=False, adjacent_peaks=False, profile=True)
    r = run_case(spec)
    print(f"{spec['model']} {spec['case']}: {r['step_s_median']:.3f} s/step (median of "
          f"{spec['steps']} steps, under the profiler); the table sums all {spec['steps']} steps")
    print(r["profile_table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
