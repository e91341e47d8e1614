"""Model preparation for training: attach LoRA, store the frozen decoder weights in the training
dtype, move what the step runs to the device and set the step's speed/memory options (static shapes,
compile, CPU kernels).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from lora.common.cli import log
from lora.config import Config
from lora.modeling.adapter import attach_lora
from lora.modeling.cpu_speed import MATH_CROSS_ATTENTION_MAX_SCORES, use_cpu_train_attention, use_fast_dropout
from lora.modeling.loading import family_for
from lora.modeling.precision import cast_frozen_weights, resolve_base_weights_dtype
from lora.modeling.window import window_frames

if TYPE_CHECKING:
    import torch
    from torch import nn


# ============================================================================================
# Model preparation
# ============================================================================================
def prepare_frozen_weights(model: nn.Module, precision: str, setting: str) -> str:
    """Apply training.base_weights_dtype after LoRA is attached: with bfloat16, every frozen weight
    and buffer of the decoder modules (the family's ``decoder_modules``) is stored in bf16 and
    peft's cast of each LoRA input to float32 is turned off (autocast runs the LoRA matmuls in bf16
    anyway), so the step does no per-layer dtype casts. LoRA weights (and so the optimizer state and
    the saved adapter) stay float32. Returns the dtype name."""
    import torch

    name, why = resolve_base_weights_dtype(setting, precision)
    if name == "bfloat16":
        n = sum(cast_frozen_weights(m, torch.bfloat16)
                for m in family_for(model).decoder_modules(model))
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):  # peft LoRA layers
                m.cast_input_dtype_enabled = False
        log.info("Frozen base weights: bfloat16 (%s; %.1fM parameters cast)", why, n / 1e6)
    else:
        log.info("Frozen base weights: float32 (%s)", why)
    return name


def move_trained_modules(model: nn.Module, device: torch.device, text_encoder: bool = False) -> None:
    """Move what the train step runs to ``device``: the decoder modules (with their LoRA layers)
    and, when asked (the text encoder trains), the text encoder. Called after LoRA is attached and
    the frozen weights are cast, so the decoder reaches a GPU already in its training dtype."""
    fam = family_for(model)
    for m in fam.decoder_modules(model):
        m.to(device)
    if text_encoder:
        fam.text_encoder_of(model).to(device)


# torch.compile with static shapes (training.torch_compile): every batch the compiled decoder sees
# is padded to one of a bounded set of shapes, so a run compiles a known, small number of graphs
# instead of one per (T, L, B). clips are padded to a multiple of this many seconds of frames
COMPILE_FRAME_BUCKET_SECONDS = 5.0
# text states are padded to the first of these that fits
COMPILE_TEXT_LENGTHS = (32, 64, 128, 256, 512)
# where prepare_model leaves the plan on the model (step_loss reads it)
STATIC_SHAPES_ATTR = "_lora_static_shapes"


@dataclass(frozen=True)
class StaticShapes:
    """The padded shapes of the compiled step. ``pad`` pads a batch's codes (B, K, T) with the pad
    token to ``frames(T)`` (a multiple of ``frame_bucket``, at most ``max_frames``; a longer batch
    is never cut), its text states (B, L, D) and mask with zeros to ``text(L)``, and the batch to
    ``batch_size`` rows (copies of the first clip with length 0). Positions past ``lengths`` carry
    no loss and the decoder is causal, so the valid positions' logits, the loss and the gradients
    are those of the unpadded batch (the zero-mask text positions get no attention;
    tests/training/test_compile.py checks both)."""

    frame_bucket: int
    max_frames: int
    batch_size: int
    # () = text states not padded (MusicGen-Melody: the text length is
    text_lengths: tuple = COMPILE_TEXT_LENGTHS
    #                                             part of its prefix condition, padding it would
    # change the loss)

    @property
    def variants(self) -> int:
        """Shape variants (compiles) of one grad mode at most: frame buckets x text lengths (a batch
        longer than max_frames or text longer than the last text length adds its own)."""
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
        """(codes, lengths, hidden, mask, chroma) padded to the static shapes (tensors on any
        device)."""
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


def static_shapes_for(model: nn.Module, cfg: Config) -> StaticShapes:
    """The static-shape plan of a run of ``cfg`` on ``model`` (train_lora's max_frames: max_duration
    at the codec's frame rate)."""
    fam = family_for(model)
    info = fam.model_info(model, "", "")
    bucket = max(1, int(round(COMPILE_FRAME_BUCKET_SECONDS * info.frame_rate)))
    return StaticShapes(frame_bucket=bucket,
                        max_frames=max(1, window_frames(cfg.training.max_duration, info)),
                        batch_size=int(cfg.training.batch_size),
                        text_lengths=() if fam.MELODY else COMPILE_TEXT_LENGTHS)


def configure_step(model: nn.Module, device: torch.device, checkpointing: bool = False,
                   torch_compile: bool = False,
                   decoder_dropout: float | None = 0.0, compile_mode: str = "default",
                   static_shapes: Optional[StaticShapes] = None) -> None:
    """The step's speed/memory options on the LoRA-wrapped model: the decoder's hidden-state dropout
    (training.decoder_dropout); on CPU (not under torch.compile: inductor has its own RNG and
    kernels) FastDropout for the LoRA dropout and SDPA's math kernel for the cross-attention over
    the text tokens (lora.modeling.cpu_speed); gradient checkpointing of the decoder layers;
    torch.compile of the decoder (``compile_mode`` default or reduce-overhead = CUDA graphs, CUDA
    only) with the batches padded to ``static_shapes`` in step_loss."""
    fam = family_for(model)
    fam.set_decoder_dropout(model, decoder_dropout)
    if device.type == "cpu" and not torch_compile:
        if use_fast_dropout(model):
            log.info("LoRA dropout: FastDropout (CPU: the default dropout's random numbers are slow)")
        if use_cpu_train_attention(fam.decoder(model)):
            log.info("Cross-attention: SDPA math kernel while training where audio positions x "
                     "text tokens <= %d (CPU: the flash-attention backward is slow for so few "
                     "keys)", MATH_CROSS_ATTENTION_MAX_SCORES)
    if checkpointing:
        fam.enable_gradient_checkpointing(model)
    if torch_compile:
        import torch._dynamo

        mode = compile_mode if compile_mode != "default" else None
        if mode == "reduce-overhead" and device.type != "cuda":
            log.warning("training.compile_mode reduce-overhead captures CUDA graphs: on %s the "
                        "default mode is used", device.type)
            mode = None
        setattr(model, STATIC_SHAPES_ATTR, static_shapes)
        if static_shapes is not None:
            # Each variant is a separate graph (dynamic=False): allow all of them, training and
            # validation (grad mode and train/eval are guarded), plus a longer-than-planned batch,
            # before dynamo falls back to eager.
            need = 2 * static_shapes.variants + 4
            for key in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, key) and getattr(torch._dynamo.config, key) < need:
                    setattr(torch._dynamo.config, key, need)
            log.info("torch.compile: decoder, mode %s, static shapes: clips padded to a multiple "
                     "of %d frames (up to %d), text states to %s tokens, batches to %d clips: at "
                     "most %d x %d = %d shape variants (compiles) for training and as many for "
                     "validation", mode or "default",
                     static_shapes.frame_bucket, static_shapes.max_frames,
                     "/".join(map(str, static_shapes.text_lengths))
                     or "their own (melody prefix: not padded)",
                     static_shapes.batch_size,
                     math.ceil(static_shapes.max_frames / static_shapes.frame_bucket),
                     len(static_shapes.text_lengths) or 1, static_shapes.variants)
        else:
            log.info("torch.compile: decoder, mode %s (shapes not padded: one compile per batch shape)",
                     mode or "default")
        fam.compile_decoder(model, mode=mode)


def prepare_model(model: nn.Module, cfg: Config, precision: str, device: torch.device):
    """The trainable model from the loaded base (on the CPU, encoders wherever they are): LoRA
    attached (its init seeded by the caller), frozen weights cast, the step's modules on ``device``,
    the step configured. Returns (peft model, trainable parameters). train_lora.py, test_model.py
    and bench/bench_train.py all call this."""
    t = cfg.training
    # peft creates the LoRA weights next to the layers they adapt
    model = attach_lora(model, cfg.lora)
    prepare_frozen_weights(model, precision, t.base_weights_dtype)
    move_trained_modules(model, device, text_encoder=bool(cfg.lora.train_text_encoder))
    configure_step(model, device, checkpointing=t.gradient_checkpointing, torch_compile=t.torch_compile,
                   decoder_dropout=t.decoder_dropout, compile_mode=t.compile_mode,
                   static_shapes=static_shapes_for(model, cfg) if t.torch_compile else None)
    return model, [p for p in model.parameters() if p.requires_grad]


def autocast_for(precision: str, device: torch.device):
    """The autocast of ``Accelerator(mixed_precision=precision).autocast`` on ``device``, as a
    context-manager factory, for callers that pick their own device (test_model.py --device)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def set_train_mode(model: nn.Module, cache_text: bool) -> None:
    """LoRA layers (and the decoder's dropout) in training mode; the frozen codec, and the text
    encoder unless it trains, in eval mode."""
    fam = family_for(model)
    model.train()
    fam.audio_codec(model).eval()
    if cache_text:
        fam.text_encoder_of(model).eval()
