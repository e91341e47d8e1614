"""The training library behind train_lora.py (and bench/bench_train.py, test_model.py): the step users run,
timed and checked exactly as it runs.

* **Model preparation** (``prepare_model``): attach LoRA, store the frozen decoder weights in the training dtype
  (``prepare_frozen_weights``), move what the step runs to the device (``move_trained_modules``) and set the step's
  speed/memory options (``configure_step``).
* **The step loss** (``step_loss``) of one micro-batch of cached tokens, and **validation** (``heldout_loss``),
  both through the model family's one teacher-forced forward and one loss.
* **The data plan**: ``plan_steps`` and ``micro_seed`` (data order and dropout depend on (seed, epoch, index) only,
  never on the number of processes).
* **Checkpoints**: ``save_checkpoint``, ``find_checkpoint``, ``load_checkpoint``, ``save_adapter``,
  ``clear_earlier_run``; ``TrainState`` is what they record (``trainer_state.json``, written last).
* **RunLog**: metrics.jsonl, TensorBoard and loss_curve.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from lora.adapter import attach_lora
from lora.config import Config
from lora.cpu_speed import MATH_CROSS_ATTENTION_MAX_SCORES, use_cpu_train_attention, use_fast_dropout
from lora.loading import family_for
from lora.precision import cast_frozen_weights, resolve_base_weights_dtype
from lora.report import loss_figure
from lora.utils import UserError, atomic_dir, atomic_path, atomic_write_json, atomic_write_text, log

STATE_FILE = "trainer_state.json"


# ============================================================================================
# Model preparation
# ============================================================================================
def prepare_frozen_weights(model, precision: str, setting: str) -> str:
    """Apply training.base_weights_dtype after LoRA is attached: with bfloat16, every frozen weight and buffer of
    the decoder modules (the family's ``decoder_modules``) is stored in bf16 and peft's cast of each LoRA input to
    float32 is turned off (autocast runs the LoRA matmuls in bf16 anyway), so the step does no per-layer dtype
    casts. LoRA weights (and so the optimizer state and the saved adapter) stay float32. Returns the dtype name."""
    import torch

    name, why = resolve_base_weights_dtype(setting, precision)
    if name == "bfloat16":
        n = sum(cast_frozen_weights(m, torch.bfloat16) for m in family_for(model).decoder_modules(model))
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):  # peft LoRA layers
                m.cast_input_dtype_enabled = False
        log.info("Frozen base weights: bfloat16 (%s; %.1fM parameters cast)", why, n / 1e6)
    else:
        log.info("Frozen base weights: float32 (%s)", why)
    return name


def move_trained_modules(model, device, text_encoder: bool = False) -> None:
    """Move what the train step runs to ``device``: the decoder modules (with their LoRA layers) and, when asked
    (the text encoder trains), the text encoder. Called after LoRA is attached and the frozen weights are cast,
    so the decoder reaches a GPU already in its training dtype."""
    fam = family_for(model)
    for m in fam.decoder_modules(model):
        m.to(device)
    if text_encoder:
        fam.text_encoder_of(model).to(device)


# torch.compile with static shapes (training.torch_compile): every batch the compiled decoder sees is padded to one
# of a bounded set of shapes, so a run compiles a known, small number of graphs instead of one per (T, L, B).
COMPILE_FRAME_BUCKET_SECONDS = 5.0                 # clips are padded to a multiple of this many seconds of frames
COMPILE_TEXT_LENGTHS = (32, 64, 128, 256, 512)     # text states are padded to the first of these that fits
STATIC_SHAPES_ATTR = "_lora_static_shapes"         # where prepare_model leaves the plan on the model (step_loss reads it)


@dataclass(frozen=True)
class StaticShapes:
    """The padded shapes of the compiled step. ``pad`` pads a batch's codes (B, K, T) with the pad token to
    ``frames(T)`` (a multiple of ``frame_bucket``, at most ``max_frames``; a longer batch is never cut), its text
    states (B, L, D) and mask with zeros to ``text(L)``, and the batch to ``batch_size`` rows (copies of the first
    clip with length 0). Positions past ``lengths`` carry no loss and the decoder is causal, so the valid positions'
    logits, the loss and the gradients are those of the unpadded batch (the zero-mask text positions get no
    attention; tests/test_compile.py checks both)."""

    frame_bucket: int
    max_frames: int
    batch_size: int
    text_lengths: tuple = COMPILE_TEXT_LENGTHS  # () = text states not padded (MusicGen-Melody: the text length is
    #                                             part of its prefix condition, padding it would change the loss)

    @property
    def variants(self) -> int:
        """Shape variants (compiles) of one grad mode at most: frame buckets x text lengths (a batch longer than
        max_frames or text longer than the last text length adds its own)."""
        return math.ceil(self.max_frames / self.frame_bucket) * max(1, len(self.text_lengths))

    def frames(self, t: int) -> int:
        return t if t >= self.max_frames else min(self.frame_bucket * math.ceil(t / self.frame_bucket),
                                                  self.max_frames)

    def text(self, n: int) -> int:
        if not self.text_lengths:
            return n
        top = self.text_lengths[-1]
        return next((x for x in self.text_lengths if x >= n), top * math.ceil(n / top))

    def pad(self, codes, lengths, hidden, mask, pad_token_id: int, chroma=None):
        """(codes, lengths, hidden, mask, chroma) padded to the static shapes (tensors on any device)."""
        import torch
        import torch.nn.functional as F

        b, _, t = codes.shape
        codes = F.pad(codes, (0, self.frames(t) - t), value=int(pad_token_id))
        n = hidden.shape[1]
        hidden = F.pad(hidden, (0, 0, 0, self.text(n) - n))
        mask = F.pad(mask, (0, self.text(n) - n))
        extra = self.batch_size - b
        if extra > 0:
            rows = lambda x: torch.cat([x, x[:1].expand(extra, *x.shape[1:])])  # noqa: E731
            codes, hidden, mask = rows(codes), rows(hidden), rows(mask)
            lengths = torch.cat([lengths, lengths.new_zeros(extra)])
            chroma = rows(chroma) if chroma is not None else None
        return codes, lengths, hidden, mask, chroma


def static_shapes_for(model, cfg: Config) -> StaticShapes:
    """The static-shape plan of a run of ``cfg`` on ``model`` (train_lora's max_frames: max_duration at the codec's
    frame rate)."""
    fam = family_for(model)
    info = fam.model_info(model, "", "")
    bucket = max(1, int(round(COMPILE_FRAME_BUCKET_SECONDS * info.frame_rate)))
    return StaticShapes(frame_bucket=bucket, max_frames=max(1, int(round(cfg.training.max_duration * info.frame_rate))),
                        batch_size=int(cfg.training.batch_size),
                        text_lengths=() if fam.MELODY else COMPILE_TEXT_LENGTHS)


def configure_step(model, device, checkpointing: bool = False, torch_compile: bool = False,
                   decoder_dropout: float | None = 0.0, compile_mode: str = "default",
                   static_shapes: Optional[StaticShapes] = None) -> None:
    """The step's speed/memory options on the LoRA-wrapped model: the decoder's hidden-state dropout
    (training.decoder_dropout); on CPU (not under torch.compile: inductor has its own RNG and kernels) FastDropout
    for the LoRA dropout and SDPA's math kernel for the cross-attention over the text tokens (lora.cpu_speed);
    gradient checkpointing of the decoder layers; torch.compile of the decoder (``compile_mode`` default or
    reduce-overhead = CUDA graphs, CUDA only) with the batches padded to ``static_shapes`` in step_loss."""
    fam = family_for(model)
    fam.set_decoder_dropout(model, decoder_dropout)
    if device.type == "cpu" and not torch_compile:
        if use_fast_dropout(model):
            log.info("LoRA dropout: FastDropout (CPU: the default dropout's random numbers are slow)")
        if use_cpu_train_attention(fam.decoder(model)):
            log.info("Cross-attention: SDPA math kernel while training where audio positions x text tokens <= %d "
                     "(CPU: the flash-attention backward is slow for so few keys)", MATH_CROSS_ATTENTION_MAX_SCORES)
    if checkpointing:
        fam.enable_gradient_checkpointing(model)
    if torch_compile:
        import torch._dynamo

        mode = compile_mode if compile_mode != "default" else None
        if mode == "reduce-overhead" and device.type != "cuda":
            log.warning("training.compile_mode reduce-overhead captures CUDA graphs: on %s the default mode is "
                        "used", device.type)
            mode = None
        setattr(model, STATIC_SHAPES_ATTR, static_shapes)
        if static_shapes is not None:
            # Each variant is a separate graph (dynamic=False): allow all of them, training and validation (grad
            # mode and train/eval are guarded), plus a longer-than-planned batch, before dynamo falls back to eager.
            need = 2 * static_shapes.variants + 4
            for key in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, key) and getattr(torch._dynamo.config, key) < need:
                    setattr(torch._dynamo.config, key, need)
            log.info("torch.compile: decoder, mode %s, static shapes: clips padded to a multiple of %d frames (up to "
                     "%d), text states to %s tokens, batches to %d clips: at most %d x %d = %d shape variants "
                     "(compiles) for training and as many for validation", mode or "default",
                     static_shapes.frame_bucket, static_shapes.max_frames,
                     "/".join(map(str, static_shapes.text_lengths)) or "their own (melody prefix: not padded)",
                     static_shapes.batch_size, math.ceil(static_shapes.max_frames / static_shapes.frame_bucket),
                     len(static_shapes.text_lengths) or 1, static_shapes.variants)
        else:
            log.info("torch.compile: decoder, mode %s (shapes not padded: one compile per batch shape)",
                     mode or "default")
        fam.compile_decoder(model, mode=mode)


def prepare_model(model, cfg: Config, precision: str, device):
    """The trainable model from the loaded base (on the CPU, encoders wherever they are): LoRA attached (its init
    seeded by the caller), frozen weights cast, the step's modules on ``device``, the step configured. Returns
    (peft model, trainable parameters). train_lora.py, test_model.py and bench/bench_train.py all call this."""
    t = cfg.training
    model = attach_lora(model, cfg.lora)  # peft creates the LoRA weights next to the layers they adapt
    prepare_frozen_weights(model, precision, t.base_weights_dtype)
    move_trained_modules(model, device, text_encoder=bool(cfg.lora.train_text_encoder))
    configure_step(model, device, checkpointing=t.gradient_checkpointing, torch_compile=t.torch_compile,
                   decoder_dropout=t.decoder_dropout, compile_mode=t.compile_mode,
                   static_shapes=static_shapes_for(model, cfg) if t.torch_compile else None)
    return model, [p for p in model.parameters() if p.requires_grad]


def autocast_for(precision: str, device):
    """The autocast of ``Accelerator(mixed_precision=precision).autocast`` on ``device``, as a context-manager
    factory, for callers that pick their own device (test_model.py --device)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def set_train_mode(model, cache_text: bool) -> None:
    """LoRA layers (and the decoder's dropout) in training mode; the frozen codec, and the text encoder unless it
    trains, in eval mode."""
    fam = family_for(model)
    model.train()
    fam.audio_codec(model).eval()
    if cache_text:
        fam.text_encoder_of(model).eval()


# ============================================================================================
# The step loss and validation
# ============================================================================================
def step_loss(model, processor, info, batch, device, autocast, cache_text: bool):
    """The training (and validation) forward of one micro-batch -> the family's CodebookLoss (``.loss`` is the
    objective, ``.per_codebook`` / ``.tokens`` per codebook).

    Delay-pattern targets from the cached codes; the decoder reads the cached text states (or, when the text
    encoder trains, encodes the captions here and applies the null condition to dropped samples) and, for a melody
    model, the batch's chroma (already the null melody where dropped). ``autocast``
    is a context-manager factory (``Accelerator.autocast``).
    """
    fam = family_for(info)
    codes = batch["codes"].to(device, non_blocking=True)
    lengths = batch["lengths"].to(device, non_blocking=True)
    if cache_text:
        hidden = batch["hidden"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
    else:  # the text encoder trains: encode every step, then apply the null condition to dropped samples
        with autocast():
            hidden, mask = fam.encode_text(model, processor, batch["texts"], device=device)
        hidden, mask = fam.drop_condition(hidden, mask, ~batch["dropped"].to(device))
    chroma = batch["chroma"].to(device, non_blocking=True) if "chroma" in batch else None
    shapes = getattr(model, STATIC_SHAPES_ATTR, None)
    b, t = codes.shape[0], codes.shape[-1]
    if shapes is not None:  # torch_compile: pad to a static shape (no loss on the padding)
        codes, lengths, hidden, mask, chroma = shapes.pad(codes, lengths, hidden, mask, info.pad_token_id, chroma)
    melody = {"chroma": chroma} if chroma is not None else {}
    logits, labels = fam.teacher_forced_logits(model, info, codes, lengths, hidden, mask, autocast=autocast, **melody)
    loss = fam.codebook_loss(logits, labels)
    if shapes is not None:  # per-clip results of the batch's own clips (the padding has no valid token)
        s = t + (loss.ce.shape[-1] - codes.shape[-1])
        loss.ce, loss.valid = loss.ce[:b, :, :s], loss.valid[:b, :, :s]
    return loss


def heldout_loss(model, processor, info, valid_ds, collate, batch_size: int, device, autocast, cache_text: bool,
                 rank: int = 0, world: int = 1) -> dict:
    """Token-weighted held-out cross-entropy of the model as it is now (eval mode): per codebook and their mean,
    with perplexities. The held-out clips are split over processes and the sums all-reduced. Leaves the model in
    eval mode (the caller sets training mode again)."""
    import torch
    import torch.distributed as dist

    model.eval()
    K = info.num_codebooks
    sums = torch.zeros(K, dtype=torch.float64, device=device)
    counts = torch.zeros(K, dtype=torch.float64, device=device)
    lengths = valid_ds.lengths()
    order = sorted(range(len(valid_ds)), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][rank::world]
    with torch.no_grad():
        for b in batches:
            loss = step_loss(model, processor, info, collate([valid_ds[i] for i in b]), device, autocast, cache_text)
            sums += loss.per_codebook.double() * loss.tokens.double()
            counts += loss.tokens.double()
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    per_cb = (sums / counts.clamp(min=1)).tolist()
    res = {"val_loss": sum(per_cb) / K, "val_ppl": math.exp(min(50.0, sum(per_cb) / K))}
    for k, v in enumerate(per_cb):
        res[f"val_loss_cb{k}"] = v
        res[f"val_ppl_cb{k}"] = math.exp(min(50.0, v))
    res["val_tokens"] = int(counts.sum().item())
    return res


@dataclass
class StepStats:
    """One optimizer step's training loss (the token-weighted objective) and what the logs count, for this process's
    micro-batches; ``all_reduce_step`` makes them the whole step's, over every process."""

    loss: object          # scalar tensor
    per_codebook: object  # (K,) tensor
    dropped: int = 0      # samples trained on the null condition
    samples: int = 0


def accumulate(loss_fn, micro_batches: list, backward, seeds: list[int], world: int = 1, device=None) -> StepStats:
    """Forward and backward of one optimizer step's micro-batches (this process's share). Each micro-batch is
    weighted by its share of the step's valid tokens over all processes, so the step's gradient is that of the mean
    cross-entropy over all its tokens (per codebook, then over codebooks: what validation reports), whatever the
    split into micro-batches and processes and however long the clips are. (With equal micro-batches the weight is
    1 / (accumulation x processes), the plain mean.) ``seeds``: the torch seed of each micro-batch (dropout)."""
    import torch
    import torch.distributed as dist

    # Every codebook has one valid token per frame of a clip (the delay pattern shifts, never drops, frames).
    tokens = [float(b["lengths"].sum()) for b in micro_batches]
    total = torch.tensor(sum(tokens), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    total = float(total)
    stats = None
    for batch, seed, n in zip(micro_batches, seeds, tokens):
        torch.manual_seed(seed)
        loss = loss_fn(batch)
        w = n / total
        backward(loss.loss * w)
        if stats is None:
            stats = StepStats(loss=loss.loss.detach() * w, per_codebook=loss.per_codebook.detach() * w)
        else:
            stats.loss += loss.loss.detach() * w
            stats.per_codebook += loss.per_codebook.detach() * w
        stats.dropped += int(batch["dropped"].sum())  # CPU tensor: no device sync
        stats.samples += len(batch["dropped"])
    return stats


def all_reduce_step(params, stats: StepStats) -> StepStats:
    """One all-reduce (sum) of every LoRA gradient and of the step's statistics across processes: the gradients
    were weighted by tokens over all processes, so their sum is the whole step's gradient, the same as one process
    with all the micro-batches; the loss, per-codebook losses and counts become the whole step's."""
    import torch
    import torch.distributed as dist

    extra = torch.cat([stats.loss.view(1).float(), stats.per_codebook.float(),
                       torch.tensor([stats.dropped, stats.samples], dtype=torch.float32, device=stats.loss.device)])
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in params] + [extra])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).to(p.dtype).clone()
        off += n
    k = stats.per_codebook.numel()
    tail = flat[off:]
    return StepStats(loss=tail[0], per_codebook=tail[1:1 + k], dropped=int(round(float(tail[1 + k]))),
                     samples=int(round(float(tail[2 + k]))))


# ============================================================================================
# The data plan
# ============================================================================================
def micro_seed(seed: int, epoch: int, micro_index: int) -> int:
    """Seed of the torch RNG for one global micro-batch (model/LoRA dropout): independent of process count."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(micro_index) * 104_729 + 17) % (2 ** 63 - 1)


def plan_steps(cfg: Config, n_batches: int, group: int) -> tuple[int, int, int, str]:
    """(steps per epoch, total steps, warmup steps, note about warmup)."""
    t = cfg.training
    steps_per_epoch = max(1, n_batches // group)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_epochs * steps_per_epoch))
    warmup, note = t.warmup_steps, ""
    cap = math.ceil(0.1 * total)
    if warmup > cap:
        note = (f"warmup_steps {t.warmup_steps} is more than 10% of this short run ({total} steps); "
                f"capped at {cap}")
        warmup = cap
    return steps_per_epoch, total, warmup, note


AUTO_PER_RUN = 10  # eval_steps / save_steps 'auto': about this many validations / checkpoints per run


def auto_interval(total_steps: int, per_run: int = AUTO_PER_RUN) -> int:
    """The 'auto' interval of eval_steps / save_steps: total_steps / per_run, rounded to a whole step below 7.5 and
    to a multiple of 5 above (steps 10, 20, 30 of a 90-step run rather than 9, 18, 27), at least 1."""
    x = total_steps / per_run
    if x < 7.5:
        return max(1, math.floor(x + 0.5))
    return 5 * math.floor(x / 5 + 0.5)


def every_problem(key: str, value) -> Optional[str]:
    """The problem with an eval_steps / save_steps setting ('auto' or a whole number >= 1), naming the key."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < 1:
        return (f"{key} must be 'auto' (about {AUTO_PER_RUN} per run) or a whole number of optimizer steps, at least "
                f"1 (got {value!r})")
    return None


def resolve_every(value, total_steps: int) -> tuple[int, bool]:
    """(interval in optimizer steps, whether it came from 'auto') of a checked eval_steps / save_steps setting."""
    if str(value).strip().lower() == "auto":
        return auto_interval(total_steps), True
    return int(str(value).strip()), False


def events_in_run(every: int, total_steps: int) -> list[int]:
    """The optimizer steps at which an every-N event (validation, checkpoint) happens: each multiple of ``every``
    and the last step."""
    steps = list(range(every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else steps + [total_steps]


class SaveTimer:
    """'A checkpoint at least every ``minutes`` of wall time' (training.save_minutes; 0 = never due)."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.seconds, self.clock = 60.0 * minutes, clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = self.clock()


class PhaseClock:
    """Where a run's wall time goes, from the process start to the last file written: the set-up phases in order
    (``lap``), then the train loop's steps (``step``: the first apart, then the steady ones) and the time spent
    validating and checkpointing between them. ``report()`` is the table train_lora.py logs and writes to
    logs/timing.json, and bench/bench_train.py --cold_start reads."""

    def __init__(self, started: float):
        self.started = started           # process start, time.time() scale (lora.utils.process_start_time)
        self.phases: dict[str, float] = {}
        self.steps: list[float] = []
        self.mark = time.time()
        self.phases["start-up"] = self.mark - started

    def lap(self, name: str) -> float:
        """Close the phase that ran since the last lap (or the start-up) under ``name``; its seconds."""
        now = time.time()
        seconds = now - self.mark
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.mark = now
        return seconds

    def step(self) -> None:
        """One optimizer step ended (since the last lap)."""
        now = time.time()
        self.steps.append(now - self.mark)
        self.mark = now

    def report(self) -> dict:
        out = {k: round(v, 3) for k, v in self.phases.items()}
        if self.steps:
            out["first step"] = round(self.steps[0], 3)
            rest = self.steps[1:]
            out["steady step"] = round(statistics.median(rest), 3) if rest else None
            out["steady steps"] = len(rest)
            out["all steps"] = round(sum(self.steps), 3)
        out["total"] = round(time.time() - self.started, 3)
        return out

    def line(self) -> str:
        r = self.report()
        parts = [f"{k} {r[k]:.1f} s" for k in self.phases]
        if self.steps:
            parts.append(f"first step {r['first step']:.1f} s")
            if r["steady step"] is not None:
                parts.append(f"steady step {r['steady step']:.2f} s (median of {r['steady steps']})")
        return " | ".join(parts) + f" | total {r['total']:.1f} s"


def split_records(cfg: Config, records: list) -> tuple[list, list]:
    """(train records, valid records); UserError when either split is empty (training validates on held-out clips
    only, never on the training clips)."""
    train = [r for r in records if r.split == "train"]
    valid = [r for r in records if r.split == "valid"]
    if not train:
        raise UserError(f"No training clips (split 'train') in {cfg.data.data_dir}/{cfg.data.metadata_file}. "
                        f"Prepare data with: python lora/prepare_data.py --input_dir YOUR_AUDIO --output_dir "
                        f"{cfg.data.data_dir}")
    if not valid:
        raise UserError(f"No held-out clips (split 'valid') in {cfg.data.data_dir}/{cfg.data.metadata_file}; "
                        f"training needs them to measure progress and pick best_model (it never validates on the "
                        f"training clips). Re-run prepare_data.py with --valid_fraction 0.1 (or higher), or mark "
                        f"some clips \"split\": \"valid\".")
    return train, valid


# ============================================================================================
# State and checkpoints
# ============================================================================================
@dataclass
class TrainState:
    """Where a run is: saved in trainer_state.json of every checkpoint and adapter, restored on resume."""

    global_step: int = 0
    epoch: float = 0.0
    data_epoch: int = 0          # the epoch whose batches are being read
    step_in_epoch: int = 0       # optimizer steps done in data_epoch
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    base_val_loss: Optional[float] = None
    nan_steps_total: int = 0
    nan_in_a_row: int = 0
    evals_without_improvement: int = 0
    log_history: list = field(default_factory=list)

    def restore(self, saved: dict) -> None:
        for k in asdict(self):
            if k in saved:
                setattr(self, k, saved[k])

    def snapshot(self, stage: str, **run) -> dict:
        """The trainer_state.json document: the state, the stage that wrote it and facts about the run."""
        return dict(asdict(self), stage=stage, **run)


# What train_lora.py writes into output_dir, and may therefore delete again (--overwrite_output_dir): its run
# folders, each holding only these files, with its trainer_state.json. Anything else there is the user's.
RUN_FOLDERS = ("checkpoints", "best_model", "final_model")
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "config.yaml", STATE_FILE,
                           "eval_results.json"})
CHECKPOINT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "config.yaml",
                              STATE_FILE, "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pt"})
CHECKPOINT_NAME = re.compile(r"step-\d{6}")
ATOMIC_LEFTOVER = re.compile(r"\..+\.(?:tmp|old)")  # lora.utils.atomic_dir's temporary folders after a crash
LOCK_FILE = ".train_lora.lock"


def read_state(folder: Path) -> Optional[dict]:
    """trainer_state.json of a folder when it is one this tool wrote (an object with an integer global_step), else
    None."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and isinstance(state.get("global_step"), int)
    return state if ok else None


def _foreign_entries(folder: Path, allowed: frozenset, need_state: bool) -> list[Path]:
    """Entries of one of our run folders that this tool does not write there (all of them when the folder is not
    recognisably ours: no valid trainer_state.json)."""
    entries = sorted(folder.iterdir())
    if need_state and read_state(folder) is None:
        return entries  # (an empty folder holds nothing to lose)
    return [e for e in entries if e.name not in allowed or not e.is_file() or e.is_symlink()]


def earlier_run(out: Path) -> tuple[list[Path], list[Path]]:
    """(the run folders an earlier run of train_lora.py left in ``out``, the entries among them it did not write)."""
    ours, foreign = [], []
    for name in RUN_FOLDERS:
        p = out / name
        if not p.exists() and not p.is_symlink():
            continue
        if p.is_symlink() or not p.is_dir():
            foreign.append(p)
            continue
        ours.append(p)
        if name != "checkpoints":
            foreign += _foreign_entries(p, ADAPTER_FILES, need_state=True)
            continue
        for c in sorted(p.iterdir()):
            if c.is_dir() and not c.is_symlink() and CHECKPOINT_NAME.fullmatch(c.name):
                foreign += _foreign_entries(c, CHECKPOINT_FILES, need_state=True)
            elif c.is_dir() and not c.is_symlink() and ATOMIC_LEFTOVER.fullmatch(c.name):
                foreign += _foreign_entries(c, CHECKPOINT_FILES, need_state=False)  # an interrupted save
            else:
                foreign.append(c)
    return ours, foreign


def clear_earlier_run(out: Path, overwrite: bool, is_main: bool = True) -> None:
    """A fresh run must not mix with an earlier run's files: its checkpoints would be taken for this run's by
    --resume_from_checkpoint latest, and its best_model would look like this run's if this one stops early.
    --overwrite_output_dir deletes them, but only what train_lora.py wrote: anything else in those folders stops
    the run, and nothing is deleted."""
    ours, foreign = earlier_run(out)
    if foreign:
        shown = "\n  ".join(str(f) for f in foreign[:10]) + (f"\n  ... and {len(foreign) - 10} more"
                                                           if len(foreign) > 10 else "")
        raise UserError(f"{out} holds files that train_lora.py did not write, where it keeps its checkpoints and "
                        f"adapters:\n  {shown}\nNothing was deleted. Move them elsewhere, or choose another "
                        f"--output_dir.")
    if not ours:
        return
    if not overwrite:
        names = ", ".join(p.name + "/" for p in ours)
        raise UserError(f"{out} already holds an earlier training run ({names}). Continue it with "
                        f"--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir "
                        f"to delete those folders and start over.")
    if is_main:
        for p in ours:
            log.warning("--overwrite_output_dir: deleting %s of an earlier run", p)
            shutil.rmtree(p)


@contextlib.contextmanager
def output_lock(out: Path, enabled: bool = True):
    """Hold output_dir for this run: a second train_lora.py on the same folder stops at once, naming the running
    process. An OS file lock (fcntl.flock on output_dir/.train_lora.lock): the kernel drops it when the process
    ends in any way, so a killed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:  # (not on Windows: there two runs on one folder are not detected)
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    import socket

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(f"{out} is in use by another training run ({holder}). Wait for it to finish (or stop "
                            f"it), or choose another --output_dir.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing the file releases the lock


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory (before anything is changed), ready to be applied to a run."""

    path: Path
    state: dict
    adapter: dict
    optimizer: dict
    scheduler: dict
    scaler: Optional[dict]
    rng: dict


def read_checkpoint(path: Path) -> Checkpoint:
    """Every file of a checkpoint, loaded (safetensors, torch.load weights_only); UserError naming the damaged
    file."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(path)
    if state is None:
        raise UserError(f"{path / STATE_FILE} is missing or damaged (not a trainer state written by train_lora.py)")

    def load(name, fn):
        try:
            return fn(path / name)
        except (OSError, RuntimeError, EOFError, ValueError, SafetensorError, pickle.UnpicklingError) as e:
            why = (str(e).splitlines() or [""])[0][:200]
            raise UserError(f"{path / name} is damaged ({type(e).__name__}{': ' + why if why else ''})") from None

    pt = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    return Checkpoint(path=path, state=state, adapter=load("adapter_model.safetensors", lambda f: load_file(str(f))),
                      optimizer=load("optimizer.pt", pt), scheduler=load("scheduler.pt", pt),
                      scaler=load("scaler.pt", pt) if (path / "scaler.pt").is_file() else None,
                      rng=load("rng_state.pt", pt))


def find_checkpoint(output_dir: Path, spec: str) -> Checkpoint:
    """The checkpoint to resume, read whole: 'latest' -> the newest complete checkpoint that loads (falling back to
    an older one, with a warning, when the newest is damaged); else the given folder (UserError when damaged)."""
    if spec.strip().lower() != "latest":
        path = Path(spec).expanduser().resolve()
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {spec}: {path} is not a complete checkpoint (no {STATE_FILE}). "
                            f"Use 'latest' or a folder like {output_dir / 'checkpoints' / 'step-000200'}.")
        try:
            return read_checkpoint(path)
        except UserError as e:
            raise UserError(f"--resume_from_checkpoint {spec}: {e}. Resume from another checkpoint (e.g. "
                            f"'latest', which skips damaged ones).") from None
    root = output_dir / "checkpoints"
    found = []
    for d in sorted(root.glob("step-*")) if root.is_dir() else []:
        state = read_state(d)
        if state is None:
            log.warning("Ignoring incomplete checkpoint %s (no readable %s)", d, STATE_FILE)
        else:
            found.append((state["global_step"], d))
    for _, d in sorted(found, reverse=True):
        try:
            ck = read_checkpoint(d)
        except UserError as e:
            log.warning("Checkpoint %s cannot be used: %s; trying the one before it", d, e)
            continue
        if d != max(found)[1]:
            log.warning("Resuming from %s, the newest checkpoint that loads whole", d)
        return ck
    raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {root}"
                    + (" that loads (every one is damaged, see the warnings above)" if found else "")
                    + ". Start without --resume_from_checkpoint, or pass a checkpoint folder.")


def newest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    found = [(st["global_step"], d) for d in sorted((output_dir / "checkpoints").glob("step-*"))
             if (st := read_state(d)) is not None]
    return max(found)[1] if found else None


def disk_space_needed(params, save_total_limit: int) -> int:
    """Bytes a run writes into output_dir, roughly: per checkpoint the adapter and AdamW's two moments (float32),
    save_total_limit + 1 of them while the oldest is rotated out, two adapters (best, final) and a few MB of logs."""
    adapter = 4 * sum(p.numel() for p in params)
    return int(1.2 * ((save_total_limit + 1) * 3 * adapter + 2 * adapter) + 20 * 2 ** 20)


def save_checkpoint(root: Path, model, optimizer, scheduler, scaler, cfg: Config, snapshot: dict,
                    keep: int) -> Path:
    """A resumable checkpoint root/step-NNNNNN (adapter, optimizer, scheduler, scaler, RNG, config, state written
    last: it marks the folder complete); only the newest ``keep`` checkpoints are kept."""
    import torch

    path = root / f"step-{snapshot['global_step']:06d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng_state.pt")
        cfg.save(tmp / "config.yaml")
        atomic_write_json(tmp / STATE_FILE, snapshot)  # written last: marks it complete
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("Saved checkpoint %s", path)
    return path


def load_checkpoint(ck: Checkpoint, model, optimizer, scheduler, scaler, device, state: TrainState,
                    now: dict) -> None:
    """Apply a checkpoint (read by find_checkpoint) to the run: LoRA weights, optimizer, schedule, scaler, RNG and
    the state. ``now`` holds this run's batch_size / gradient_accumulation_steps / world_size / seed: a difference
    is warned about (the data order then differs from an uninterrupted run)."""
    import torch
    from peft import set_peft_model_state_dict

    for key, value in now.items():
        if ck.state.get("run", {}).get(key) not in (None, value):
            log.warning("Resuming with %s=%s but the checkpoint used %s: the data order will differ from an "
                        "uninterrupted run.", key, value, ck.state["run"][key])
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in ck.adapter.items()})
    optimizer.load_state_dict(ck.optimizer)
    scheduler.load_state_dict(ck.scheduler)
    if scaler is not None and ck.scaler is not None:
        scaler.load_state_dict(ck.scaler)
    torch.set_rng_state(ck.rng["cpu"])
    if torch.cuda.is_available() and "cuda" in ck.rng:
        torch.cuda.set_rng_state_all(ck.rng["cuda"])
    state.restore(ck.state)
    log.info("Resumed from %s at step %d (epoch %d, batch %d of the epoch)", ck.path, state.global_step,
             state.data_epoch, state.step_in_epoch)


def save_adapter(path: Path, model, cfg: Config, snapshot: dict, evaluation: Optional[dict], card: str) -> None:
    """best_model / final_model: the PEFT adapter, the config, trainer_state.json, eval_results.json and a model
    card README.md, written as one folder (atomically)."""
    snapshot = dict(snapshot, eval=evaluation)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        cfg.save(tmp / "config.yaml")
        atomic_write_json(tmp / STATE_FILE, snapshot)
        atomic_write_json(tmp / "eval_results.json", {"step": snapshot["global_step"],
                                                      "base_val_loss": snapshot["base_val_loss"],
                                                      **(evaluation or {})})
        atomic_write_text(tmp / "README.md", card)


def model_card(cfg: Config, info, state: dict, kind: str, n_train: int, train_hours: float, where: Path) -> str:
    base = info.name_or_path
    best, base_loss = state.get("best_metric"), state.get("base_val_loss")
    lines = [
        f"# MusicGen LoRA adapter ({kind})", "",
        f"- Base model: `{base}`",
        f"- Data: {n_train} training clips ({train_hours:.2f} h) from `{cfg.data.data_dir}`",
        f"- Training: {state['global_step']} optimizer steps (epoch {state['epoch']:.2f}), LoRA rank "
        f"{cfg.lora.lora_rank}, alpha {cfg.lora.lora_alpha}, targets `{cfg.lora.lora_targets}`, "
        f"lr {cfg.training.learning_rate}, effective batch {state['effective_batch']}, precision {state['precision']}",
    ]
    if base_loss is not None:
        lines.append(f"- Held-out loss (cross-entropy, mean over codebooks): base model {base_loss:.4f}, "
                     f"best {best:.4f} at step {state.get('best_step')}"
                     + (f", this adapter {state['eval']['val_loss']:.4f}" if state.get("eval") else ""))
    lines += [
        "", "## Use", "", "```bash",
        f"python lora/inference_lora.py --base_model_path {base} --lora_model_path {where} "
        f"--prompts \"your prompt\"", "```", "", "```python",
        "from transformers import AutoProcessor, MusicgenForConditionalGeneration",
        "from peft import PeftModel", "",
        f"base = MusicgenForConditionalGeneration.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {str(where)!r})",
        f"processor = AutoProcessor.from_pretrained({base!r})",
        "inputs = processor(text=['your prompt'], padding=True, return_tensors='pt')",
        "audio = model.generate(**inputs, do_sample=True, guidance_scale=3.0, max_new_tokens=500)", "```", "",
        "`config.yaml` holds the full configuration of the run; `eval_results.json` the held-out metrics.", ""]
    return "\n".join(lines)


# ============================================================================================
# Logs
# ============================================================================================
class RunLog:
    """metrics.jsonl, TensorBoard and loss_curve.png under output_dir/logs (main process only)."""

    def __init__(self, logs_dir: Path, history: list[dict], enabled: bool, resumed_at: Optional[int] = None):
        """``resumed_at``: the step of the checkpoint a resumed run starts from (None: a fresh run)."""
        self.dir, self.history, self.enabled = logs_dir, history, enabled
        self.tb = None
        if enabled:
            logs_dir.mkdir(parents=True, exist_ok=True)
            # Rewrite metrics.jsonl from the (restored) history: lines past a resumed checkpoint are dropped.
            atomic_write_text(logs_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            from torch.utils.tensorboard import SummaryWriter

            # The same for TensorBoard: its events past the checkpoint (all of them for a fresh run over an earlier
            # run's logs) are purged, so no step shows twice.
            purge = 0 if resumed_at is None else resumed_at + 1
            self.tb = SummaryWriter(log_dir=str(logs_dir), purge_step=purge)

    def add(self, entry: dict, prefix: str) -> None:
        self.history.append(entry)
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        for k, v in entry.items():
            if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, entry["step"])
        self.tb.flush()

    def plot(self, base_loss) -> None:
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        fig = loss_figure(self.history, base_loss)
        with atomic_path(self.dir / "loss_curve.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
