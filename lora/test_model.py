"""Is my model / GPU ready for LoRA training? A one-minute check before the first real run.

    python lora/test_model.py                          # the model from config.yaml
    cd lora && python test_model.py --model_path tiny  # the built-in test model (no download)
    python lora/test_model.py --model_path facebook/musicgen-small --batch_size 2 --fp16
    python lora/test_model.py --model_path facebook/musicgen-large --gradient_checkpointing --max_duration 15

It loads the base model as train_lora.py does, prepares it for training with the same library
function (lora.training.model_prep.prepare_model: LoRA with your settings, the frozen-weight dtype,
device placement, the step's options, e.g. --gradient_checkpointing) and runs train_lora.py's step
(lora.training.step.step_loss) forward + backward on a random batch of --batch_size clips as long as
the training window (--max_duration; random EnCodec codes + the captions' text states, as the token
cache holds them) in the precision training would use, reports the loss, gradients and the step's
peak memory (on a GPU: what training with these settings needs), then generates 2 seconds of audio
with model.generate(), and ends with a verdict and the next step. Exit code 0 when everything works,
1 when a check fails.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora.common.cli import UserError, log, run_main, script_command, shown_model, shown_path
from lora.common.fields import ConfigError
from lora.config import parse_config
from lora.dataset import CachedClip, CachedTokenDataset, collate_tokens, metadata_path
from lora.modeling.loading import family_for, load_base_model
from lora.modeling.memory import check_fits, training_floor
from lora.modeling.precision import choose_precision, resolve_base_weights_dtype
from lora.modeling.window import checked_window, longest_caption, window_frames
from lora.training.model_prep import autocast_for, prepare_model, set_train_mode
from lora.training.plan import micro_seed
from lora.training.step import step_loss

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

SECTIONS = ("model", "lora", "training")
CAPTIONS = ["drum loop, 120 BPM, kick snare hihat", "lofi piano chords in A minor, mellow, 80 BPM"]


def _extra(p):
    g = p.add_argument_group("test_model")
    g.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cuda, cuda:1 or cpu")
    g.add_argument("--seconds", type=float, default=None,
                   help="Length of the random training batch, s; default: training.max_duration "
                        "(--max_duration), the training window, so the peak memory is the one "
                        "training needs")
    g.add_argument("--generate_seconds", type=float, default=2.0,
                   help="Length of the test generation, s")
    g.add_argument("--skip_generation", action="store_true",
                   help="Only check loading and a training step")


def _say(line: str = "") -> None:
    print(line, flush=True)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def _peak_memory(device: torch.device) -> str:
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


def pick_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"--device {spec!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given, but PyTorch sees no CUDA GPU here "
                          "(torch.cuda.is_available() is False). Use --device cpu, or install a "
                          "CUDA build of PyTorch.")
    return device


def random_batch(model: nn.Module, processor, info: ModelInfo, batch_size: int, seconds: float,
                 device: torch.device) -> dict:
    """A training batch as the token cache and collate_tokens give it: random EnCodec codes and the
    captions' cached text states (the text encoder runs once, like the cache build)."""
    import torch

    t = window_frames(seconds, info)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    with torch.no_grad():
        hidden, mask = family_for(info).encode_text(model, processor, captions, device=device)
    clips = []
    for i in range(batch_size):
        n = int(mask[i].sum())
        clips.append(CachedClip(id=str(i), text=captions[i], split="train",
                                codes=torch.randint(0, info.vocab_size,
                                                    (info.num_codebooks, t)).to(torch.int16),
                                hidden=hidden[i, :n].float().cpu(), mask=mask[i, :n].long().cpu()))
    ds = CachedTokenDataset(clips, t, train=False)
    return collate_tokens([ds[i] for i in range(batch_size)], info.pad_token_id)


def training_step(cfg, model: nn.Module, processor, info: ModelInfo, device: torch.device,
                  seconds: float, precision: str):
    """What train_lora.py does before and in its first step, on a random batch: LoRA attached and
    prepared by lora.training.model_prep.prepare_model (the same seed, frozen-weight dtype, device
    placement and step options), then lora.training.step.step_loss under the training precision's
    autocast, with the dropout seed of the first micro-batch. Returns (model, batch, loss); the
    caller runs the backward."""
    import torch
    from accelerate.utils import set_seed

    t = cfg.training
    fam = family_for(info)
    fam.audio_codec(model).to(device)
    fam.text_encoder_of(model).to(device)
    batch = random_batch(model, processor, info, t.batch_size, seconds, device)
    fam.audio_codec(model).to("cpu")
    if not cfg.lora.train_text_encoder:
        fam.text_encoder_of(model).to("cpu")
    set_seed(t.seed)
    model, _ = prepare_model(model, cfg, precision, device)
    set_train_mode(model, cache_text=not cfg.lora.train_text_encoder)
    torch.manual_seed(micro_seed(t.seed, 0, 0))
    loss = step_loss(model, processor, info, batch, device, autocast_for(precision, device),
                     cache_text=not cfg.lora.train_text_encoder)
    return model, batch, loss


def flag_problems(cfg, ns) -> list[str]:
    problems = []
    if ns.seconds is not None and (ns.seconds <= 0 or ns.seconds > 30):
        problems.append(f"--seconds must be in (0, 30], got {ns.seconds} (leave it out to use the "
                        f"training window, --max_duration)")
    if ns.generate_seconds <= 0:
        problems.append(f"--generate_seconds must be positive, got {ns.generate_seconds}")
    return problems


def main(argv=None) -> int:
    cfg, ns = parse_config(argv, description=__doc__.split("\n")[0], sections=SECTIONS, extra=_extra,
                           rules=flag_problems)
    import torch

    device = pick_device(ns.device)
    seconds = ns.seconds if ns.seconds is not None else cfg.training.max_duration
    mode, reason = choose_precision(cfg.training.mixed_precision, device)
    # a bad combination fails before loading
    resolve_base_weights_dtype(cfg.training.base_weights_dtype, mode)
    torch.manual_seed(cfg.training.seed)

    # ---- model -------------------------------------------------------------------------------
    _say("== model")
    _say(f"model_path: {cfg.model.model_path}")
    _say(f"device:     {device}"
         + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    t0 = time.perf_counter()
    try:
        model, processor, info = load_base_model(cfg.model)  # on the CPU, as train_lora.py loads it
    except UserError as e:
        return _fail("load model", str(e),
                     "fix --model_path (or model.model_path in config.yaml), or try the toolkit "
                     "first with --model_path tiny.")
    fam = family_for(info)
    try:
        checked_window(seconds, info, model, **longest_caption(info, processor, CAPTIONS))
    except ConfigError as e:
        return _fail("training window", str(e),
                     "use --max_duration 30 or less (MusicGen's context is 30 s).")
    dtype = next(model.parameters()).dtype
    _say(f"loaded:     {info.name_or_path} in {time.perf_counter() - t0:.1f} s, weights {dtype}")
    _say(f"audio:      {info.sample_rate} Hz, {info.audio_channels} channel(s), "
         f"{info.num_codebooks} codebooks x {info.vocab_size} codes at {info.frame_rate} frames/s")
    parts = fam.parameter_counts(model)
    _say(f"parameters: {sum(parts.values()) / 1e6:,.1f}M total = "
         + " + ".join(f"{name} {n / 1e6:,.1f}M" for name, n in parts.items()))
    _say(f"attention:  {fam.attention_implementation(model)}")

    # ---- lora + training step ------------------------------------------------------------------
    _say("== lora")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:  # the batch against the machine's memory, before it is allocated
        check_fits(training_floor(model, cfg.training.batch_size, window_frames(seconds, info)), device,
                   f"A training step of batch_size {cfg.training.batch_size} x {seconds:g} s", "")
    except UserError as e:
        return _fail("memory", str(e), "lower --batch_size (raise --gradient_accumulation_steps to "
                                       "keep the effective batch) or --max_duration.")
    try:
        model, batch, loss = training_step(cfg, model, processor, info, device, seconds, mode)
        loss.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        return _fail("training step",
                     f"out of GPU memory with batch_size {cfg.training.batch_size} and {seconds:g} "
                     f"s clips (peak {_peak_memory(device)})",
                     "lower --batch_size (and raise --gradient_accumulation_steps), use --fp16/--bf16, "
                     "--gradient_checkpointing, a shorter --max_duration, or a smaller model.")
    except UserError as e:
        return _fail("attach LoRA", str(e),
                     "fix the lora section of config.yaml (lora_targets, lora_rank, ...).")
    step_s = time.perf_counter() - t0
    failed = report_step(cfg, model, info, batch, loss, mode, reason, seconds, step_s, device)
    if failed:
        return failed
    model.zero_grad(set_to_none=True)

    # ---- generation ----------------------------------------------------------------------------
    if not ns.skip_generation:
        failed = check_generation(cfg, model, processor, info, device, mode, ns.generate_seconds)
        if failed:
            return failed

    _say()
    _say(f"OK — next step: {next_step(cfg)}")
    log.info("test_model finished: all checks passed")
    return 0


def next_step(cfg) -> str:
    """The training command for this model, written for the folder the user runs from (the data
    folder and output folder of config.yaml or the flags); preparing the data first when that
    folder holds no dataset yet."""
    d = cfg.data
    train = (f"{script_command('train_lora.py')} --model_path {shown_model(cfg.model.model_path)} "
             f"--data_dir {shown_path(d.data_dir)} --output_dir {shown_path(cfg.training.output_dir)} "
             f"--lora_rank {cfg.lora.lora_rank} --batch_size {cfg.training.batch_size}")
    if metadata_path(d.data_dir, d.metadata_file).is_file():
        return train
    return (f"prepare your audio: {script_command('prepare_data.py')} --input_dir YOUR_AUDIO "
            f"--output_dir {shown_path(d.data_dir)} (there is no dataset there yet), then {train}")


def report_step(cfg, model: nn.Module, info: ModelInfo, batch, loss, mode, reason, seconds, step_s,
                device: torch.device) -> int:
    """Print the step's loss, gradients, time and memory; 0, or the exit code of a failed check."""
    import torch

    trainable, total = model.get_nb_trainable_parameters()
    n_modules = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A"))
    _say(f"LoRA r={cfg.lora.lora_rank} alpha={cfg.lora.lora_alpha:g} "
         f"targets={cfg.lora.lora_targets!r}: {n_modules} layers, {trainable:,} trainable parameters "
         f"({100.0 * trainable / total:.3f}% of {total:,})")
    _say("== training step (train_lora.py's preparation and step)")
    _say(f"precision:  {mode} ({reason})")
    named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    grads = [g for _, g in named]
    finite_grads = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    nonzero = sum(1 for g in grads if g is not None and bool(g.abs().sum() > 0))
    b_grads = [g for n, g in named if "lora_B" in n]
    b_nonzero = sum(1 for g in b_grads if g is not None and bool(g.abs().sum() > 0))
    chance = math.log(info.vocab_size)
    value = loss.loss.item()
    b, t = batch["codes"].shape[0], batch["codes"].shape[-1]
    window = "the training window, --max_duration" if seconds == cfg.training.max_duration else "--seconds"
    _say(f"batch:      {b} x {seconds:g} s ({window}) = {t} frames, {int(loss.tokens.sum()):,} "
         f"target tokens; gradient checkpointing "
         f"{'on' if cfg.training.gradient_checkpointing else 'off'}")
    _say(f"loss:       {value:.3f} (random codes; chance level ln({info.vocab_size}) = {chance:.3f}); "
         f"per codebook {', '.join(f'{x:.2f}' for x in loss.per_codebook.tolist())}")
    _say(f"gradients:  all finite: {finite_grads}; non-zero in {nonzero}/{len(grads)} trainable "
         f"tensors, {b_nonzero}/{len(b_grads)} LoRA B matrices (A matrices get gradient once B has "
         f"moved off its zero init)")
    _say(f"time:       {step_s:.2f} s for forward + backward")
    _say(f"peak:       {_peak_memory(device)} in the training step")
    if not math.isfinite(value):
        return _fail("training step", f"the loss is {value}",
                     "try --mixed_precision no (fp32); if that works, your GPU's fp16 overflows: "
                     "use --bf16.")
    if not finite_grads or nonzero == 0 or (b_grads and b_nonzero == 0):
        return _fail("training step", "LoRA parameters got no usable gradient",
                     "check lora_targets; run the test suite (pytest tests/test_modeling.py).")
    return 0


def check_generation(cfg, model: nn.Module, processor, info: ModelInfo, device: torch.device,
                     mode: str, seconds: float) -> int:
    """Generate a short piece with transformers' generate() (the adapter unmerged, the training
    precision's autocast); 0, or the exit code of a failed check."""
    import torch

    _say("== generation")
    model.eval()
    fam = family_for(info)
    fam.text_encoder_of(model).to(device)
    fam.audio_codec(model).to(device)
    guidance = cfg.generation.guidance_scale
    new_tokens = window_frames(seconds, info)
    inputs = processor(text=[CAPTIONS[1]], padding=True, return_tensors="pt").to(device)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), autocast_for(mode, device)():
            audio = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True,
                                   guidance_scale=guidance)
    except torch.cuda.OutOfMemoryError:
        return _fail("generation", "out of GPU memory",
                     "free the GPU (other processes?) or use a smaller model.")
    gen_s = time.perf_counter() - t0
    audio_s = audio.shape[-1] / info.sample_rate
    _say(f"generated:  {tuple(audio.shape)} = {audio_s:.2f} s of audio in {gen_s:.1f} s "
         f"(guidance_scale {guidance:g}, max_new_tokens {new_tokens})")
    if audio.shape[0] != 1 or audio.shape[1] != info.audio_channels or audio.shape[-1] == 0:
        return _fail("generation", f"unexpected audio shape {tuple(audio.shape)}",
                     "report this together with your transformers version.")
    if not bool(torch.isfinite(audio.float()).all()):
        return _fail("generation", "the audio contains NaN/inf",
                     "try --mixed_precision no, or --attn_implementation eager.")
    _say(f"peak:       {_peak_memory(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
