"""Is my model / GPU ready for LoRA training? A one-minute check before the first real run.

    python lora/test_model.py                          # the model from config.yaml
    cd lora && python test_model.py --model_path tiny  # the built-in test model (no download)
    python lora/test_model.py --model_path facebook/musicgen-small --batch_size 2 --seconds 10 --fp16

It loads the base model exactly as train_lora.py does, attaches LoRA with your settings, runs one training
forward + backward on a random batch (random EnCodec codes + a caption) in the precision training would use,
reports the loss, gradients and peak memory, then generates 2 seconds of audio with model.generate(), and ends
with a verdict and the next step. Exit code 0 when everything works, 1 when a check fails.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

from lora.config import ConfigError, parse_config, validate  # noqa: E402
from lora.utils import UserError, log, run_main  # noqa: E402

SECTIONS = ("model", "lora", "training")
CAPTIONS = ["drum loop, 120 BPM, kick snare hihat", "lofi piano chords in A minor, mellow, 80 BPM"]


def _extra(p):
    g = p.add_argument_group("test_model")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:1 or cpu")
    g.add_argument("--seconds", type=float, default=2.0,
                   help="Length of the random training batch, s (training uses up to max_duration)")
    g.add_argument("--generate_seconds", type=float, default=2.0, help="Length of the test generation, s")
    g.add_argument("--skip_generation", action="store_true", help="Only check loading and a training step")


def _say(line: str = "") -> None:
    print(line, flush=True)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{_mb(torch.cuda.max_memory_allocated(device))} GPU memory (torch.cuda.max_memory_allocated)"
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return f"{_mb(rss_kib * scale)} process RAM (peak RSS, includes Python and libraries)"


def _fail(step: str, problem: str, next_step: str) -> int:
    _say()
    _say(f"FAILED at '{step}': {problem}")
    _say(f"Next step: {next_step}")
    return 1


def main(argv=None) -> int:
    import torch

    from lora.modeling import attach_lora, build_delay_pattern, codebook_losses, encode_text, get_base, \
        load_base_model
    from lora.precision import choose_precision

    cfg, ns = parse_config(argv, description=__doc__.split("\n")[0], sections=SECTIONS, extra=_extra)
    problems = []
    if ns.seconds <= 0 or ns.seconds > 30:
        problems.append(f"--seconds must be in (0, 30], got {ns.seconds}")
    if ns.generate_seconds <= 0:
        problems.append(f"--generate_seconds must be positive, got {ns.generate_seconds}")
    if cfg.training.batch_size < 1:
        problems.append(f"training.batch_size must be at least 1 (got {cfg.training.batch_size})")
    validate(problems)
    if ns.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(ns.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {ns.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was given, but PyTorch sees no CUDA GPU here (torch.cuda.is_available() "
                              "is False). Use --device cpu, or install a CUDA build of PyTorch.")
    torch.manual_seed(cfg.training.seed)
    train_cmd = f"python train_lora.py --model_path {cfg.model.model_path}"

    # ---- model -------------------------------------------------------------------------------
    _say("== model")
    _say(f"model_path: {cfg.model.model_path}")
    _say(f"device:     {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    t0 = time.perf_counter()
    try:
        model, processor, info = load_base_model(cfg.model, device=device)
    except UserError as e:
        return _fail("load model", str(e), "fix --model_path (or model.model_path in config.yaml), or try the "
                     "toolkit first with --model_path tiny.")
    base = get_base(model)
    dtype = next(model.parameters()).dtype
    _say(f"loaded:     {info.name_or_path} in {time.perf_counter() - t0:.1f} s, weights {dtype}")
    _say(f"audio:      {info.sample_rate} Hz, {info.audio_channels} channel(s), {info.num_codebooks} codebooks x "
         f"{info.vocab_size} codes at {info.frame_rate} frames/s")
    _say(f"parameters: {_count(model.parameters()) / 1e6:,.1f}M total = decoder "
         f"{_count(base.decoder.parameters()) / 1e6:,.1f}M + text encoder "
         f"{_count(base.text_encoder.parameters()) / 1e6:,.1f}M + EnCodec "
         f"{_count(base.audio_encoder.parameters()) / 1e6:,.1f}M")
    _say(f"attention:  {base.config.decoder._attn_implementation}")

    # ---- lora --------------------------------------------------------------------------------
    _say("== lora")
    try:
        model = attach_lora(model, cfg.lora)
    except UserError as e:
        return _fail("attach LoRA", str(e), "fix the lora section of config.yaml (lora_targets, lora_rank, ...).")
    trainable, total = model.get_nb_trainable_parameters()
    n_modules = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A"))
    _say(f"LoRA r={cfg.lora.lora_rank} alpha={cfg.lora.lora_alpha:g} targets={cfg.lora.lora_targets!r}: "
         f"{n_modules} layers, {trainable:,} trainable parameters ({100.0 * trainable / total:.3f}% of {total:,})")

    # ---- training step -------------------------------------------------------------------------
    _say("== training step")
    mode, reason = choose_precision(cfg.training.mixed_precision, device)
    _say(f"precision:  {mode} ({reason})")
    b = cfg.training.batch_size
    t = info.frames(ns.seconds)
    codes = torch.randint(0, info.vocab_size, (b, info.num_codebooks, t), device=device)
    lengths = torch.full((b,), t, device=device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t0 = time.perf_counter()
    try:
        hidden, mask = encode_text(model, processor, captions, device=device)
        decoder_input_ids, labels = build_delay_pattern(codes, lengths, info)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(encoder_outputs=(hidden,), attention_mask=mask,
                           decoder_input_ids=decoder_input_ids).logits
            loss, per_codebook, n_tokens = codebook_losses(logits, labels)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        return _fail("training step", f"out of GPU memory with batch_size {b} and {ns.seconds:g} s clips "
                     f"(peak {_peak_memory(device)})",
                     "lower --batch_size (and raise --gradient_accumulation_steps), use --fp16/--bf16, "
                     "--gradient_checkpointing, a shorter --max_duration, or a smaller model.")
    step_s = time.perf_counter() - t0
    named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    grads = [g for _, g in named]
    finite_grads = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    nonzero = sum(1 for g in grads if g is not None and bool(g.abs().sum() > 0))
    b_grads = [g for n, g in named if "lora_B" in n]
    b_nonzero = sum(1 for g in b_grads if g is not None and bool(g.abs().sum() > 0))
    chance = math.log(info.vocab_size)
    _say(f"batch:      {b} x {ns.seconds:g} s = {t} frames, {int(n_tokens.sum()):,} target tokens")
    _say(f"loss:       {loss.item():.3f} (random codes; chance level ln({info.vocab_size}) = {chance:.3f}); "
         f"per codebook {', '.join(f'{x:.2f}' for x in per_codebook.tolist())}")
    _say(f"gradients:  all finite: {finite_grads}; non-zero in {nonzero}/{len(grads)} trainable tensors, "
         f"{b_nonzero}/{len(b_grads)} LoRA B matrices (A matrices get gradient once B has moved off its zero init)")
    _say(f"time:       {step_s:.2f} s for forward + backward")
    _say(f"peak:       {_peak_memory(device)}")
    if not math.isfinite(loss.item()):
        return _fail("training step", f"the loss is {loss.item()}",
                     "try --mixed_precision no (fp32); if that works, your GPU's fp16 overflows: use --bf16.")
    if not finite_grads or nonzero == 0 or (b_grads and b_nonzero == 0):
        return _fail("training step", "LoRA parameters got no usable gradient",
                     "check lora_targets; run the test suite (pytest tests/test_modeling.py).")
    model.zero_grad(set_to_none=True)

    # ---- generation ----------------------------------------------------------------------------
    if not ns.skip_generation:
        _say("== generation")
        model.eval()
        guidance = cfg.generation.guidance_scale
        new_tokens = int(round(ns.generate_seconds * info.frame_rate))
        inputs = processor(text=[CAPTIONS[1]], padding=True, return_tensors="pt").to(device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                audio = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True,
                                       guidance_scale=guidance)
        except torch.cuda.OutOfMemoryError:
            return _fail("generation", "out of GPU memory", "free the GPU (other processes?) or use a smaller model.")
        gen_s = time.perf_counter() - t0
        seconds = audio.shape[-1] / info.sample_rate
        _say(f"generated:  {tuple(audio.shape)} = {seconds:.2f} s of audio in {gen_s:.1f} s "
             f"(guidance_scale {guidance:g}, max_new_tokens {new_tokens})")
        if audio.shape[0] != 1 or audio.shape[1] != info.audio_channels or audio.shape[-1] == 0:
            return _fail("generation", f"unexpected audio shape {tuple(audio.shape)}",
                         "report this together with your transformers version.")
        if not bool(torch.isfinite(audio).all()):
            return _fail("generation", "the audio contains NaN/inf",
                         "try --mixed_precision no, or --attn_implementation eager.")
        _say(f"peak:       {_peak_memory(device)}")

    _say()
    _say(f"OK — next step: {train_cmd} --data_dir data --output_dir output "
         f"--lora_rank {cfg.lora.lora_rank} --batch_size {cfg.training.batch_size}")
    log.info("test_model finished: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
