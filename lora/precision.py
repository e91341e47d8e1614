"""Which mixed precision to train in, decided from facts about the hardware (never guessed).

``choose_precision(requested, device)`` returns ``(mode, reason)`` with mode in {"bf16", "fp16", "no"}:

* ``auto``: bf16 autocast where the hardware runs it fast — CUDA GPUs with bf16 support (Ampere and newer),
  CPUs with AMX-BF16 or AVX512-BF16 (read from /proc/cpuinfo); fp16 with a GradScaler on older CUDA GPUs
  with tensor cores (compute capability 7.x); fp32 ("no") otherwise.
* ``fp16`` (the seed's ``--fp16``): fp16 on CUDA. On a CPU fp16 autocast is slow and numerically fragile, so
  it falls back to bf16 when the CPU runs bf16 fast, else fp32 — with a warning.
* ``bf16``: bf16; on a CUDA GPU without bf16 it falls back to fp16 (warning); on a CPU without fast bf16 it
  still runs bf16 (it works, only slowly) and warns.
* ``no``: fp32.

The hardware facts come from ``hardware_facts(device)``; tests pass their own ``HardwareFacts``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("lora")

MODES = ("bf16", "fp16", "no")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass
class HardwareFacts:
    device_type: str  # "cuda", "cpu", "mps", ...
    cuda_name: str = ""
    cuda_capability: tuple[int, int] = (0, 0)
    cuda_bf16: bool = False
    cpu_flags: frozenset = field(default_factory=frozenset)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset:
    """The CPU feature flags from /proc/cpuinfo (empty when it cannot be read, e.g. on macOS/Windows)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def hardware_facts(device) -> HardwareFacts:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return HardwareFacts("cuda", cuda_name=torch.cuda.get_device_name(idx),
                             cuda_capability=tuple(torch.cuda.get_device_capability(idx)),
                             cuda_bf16=bool(torch.cuda.is_bf16_supported()))
    if dev.type == "cpu":
        return HardwareFacts("cpu", cpu_flags=cpu_flags())
    return HardwareFacts(dev.type)


def _cpu_bf16_fast(f: HardwareFacts) -> Optional[str]:
    found = [x for x in CPU_BF16_FLAGS if x in f.cpu_flags]
    return ", ".join(found) if found else None


def choose_precision(requested: str, device, facts: Optional[HardwareFacts] = None) -> tuple[str, str]:
    """Pick the autocast mode for ``requested`` in {auto, fp16, bf16, no} on ``device``; returns (mode, reason)."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "fp16", "bf16", "no"):
        raise ValueError(f"mixed_precision must be auto, fp16, bf16 or no, got {requested!r}")
    f = facts if facts is not None else hardware_facts(device)

    if requested == "no":
        return "no", "fp32 as requested (mixed_precision: no)"

    if f.device_type == "cuda":
        gpu = f"{f.cuda_name or 'CUDA GPU'} (compute capability {f.cuda_capability[0]}.{f.cuda_capability[1]})"
        if requested == "fp16":
            return "fp16", f"fp16 autocast with a GradScaler as requested on {gpu}"
        if requested == "bf16":
            if f.cuda_bf16:
                return "bf16", f"bf16 autocast as requested on {gpu}"
            log.warning("bf16 was requested but %s has no bf16 support; using fp16 with a GradScaler instead.", gpu)
            return "fp16", f"bf16 requested but unsupported on {gpu}: fp16 with a GradScaler instead"
        if f.cuda_bf16:
            return "bf16", f"auto: {gpu} supports bf16 (same range as fp32, no loss scaling needed)"
        if f.cuda_capability >= (7, 0):
            return "fp16", f"auto: {gpu} has fp16 tensor cores but no bf16: fp16 with a GradScaler"
        return "no", f"auto: {gpu} has neither bf16 nor fp16 tensor cores: fp32"

    if f.device_type == "cpu":
        fast = _cpu_bf16_fast(f)
        if requested == "bf16":
            if fast:
                return "bf16", f"bf16 autocast as requested; the CPU has {fast}"
            log.warning("bf16 was requested, but this CPU has no AMX-BF16/AVX512-BF16: it works but may be slower "
                        "than fp32.")
            return "bf16", "bf16 autocast as requested (this CPU has no AMX-BF16/AVX512-BF16: may be slow)"
        if requested == "fp16":
            if fast:
                log.warning("--fp16 on a CPU: fp16 autocast is slow and fragile on CPUs; this CPU has %s, so bf16 "
                            "autocast is used instead.", fast)
                return "bf16", f"fp16 requested on CPU; fell back to bf16 because the CPU has {fast}"
            log.warning("--fp16 on a CPU: fp16 autocast is slow and fragile on CPUs and this CPU has no fast bf16 "
                        "(AMX-BF16/AVX512-BF16); training in fp32 instead.")
            return "no", "fp16 requested on CPU without fast bf16; fell back to fp32"
        if fast:
            return "bf16", f"auto: the CPU has {fast}, so bf16 autocast is fast"
        return "no", "auto: the CPU has no AMX-BF16/AVX512-BF16, so fp32"

    # mps, xpu, ...: no tested autocast path here.
    if requested in ("fp16", "bf16"):
        log.warning("%s was requested on device type %s; mixed precision is only supported on CUDA and CPU here, "
                    "training in fp32.", requested, f.device_type)
        return "no", f"{requested} requested on {f.device_type}: fp32 (mixed precision only on CUDA/CPU here)"
    return "no", f"auto: {f.device_type} device: fp32"


# --------------------------------------------------------------------------------------------
# Storage dtype of the frozen base weights
# --------------------------------------------------------------------------------------------
def resolve_base_weights_dtype(setting: str, precision: str) -> tuple[str, str]:
    """(dtype name, reason) for training.base_weights_dtype given the chosen autocast ``precision``.

    bf16 storage of the frozen matmul weights only makes sense under bf16 autocast (the matmuls run in bf16
    anyway; storing them so saves the cast of every weight in every forward and half their memory). Asking for
    bfloat16 with another precision is a user error (fp32 matmuls cannot take bf16 weights; fp16 autocast
    would mix two half types).
    """
    setting = (setting or "auto").lower()
    if setting not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"base_weights_dtype must be auto, float32 or bfloat16, got {setting!r}")
    if setting == "float32":
        return "float32", "float32 as requested"
    if precision == "bf16":
        return "bfloat16", ("bf16 autocast: frozen weights stored in bf16 (no per-step cast, half the memory)"
                            if setting == "auto" else "bfloat16 as requested")
    if setting == "bfloat16":
        from lora.utils import UserError

        raise UserError(f"training.base_weights_dtype bfloat16 needs bf16 mixed precision, but the precision is "
                        f"{precision!r}. Use --mixed_precision bf16 (on hardware that runs it), or "
                        f"--base_weights_dtype auto / float32.")
    return "float32", f"auto: precision {precision}, so float32"


def cast_frozen_weights(module, dtype) -> int:
    """Cast every frozen floating-point parameter and floating-point buffer under ``module`` to ``dtype``
    (matmul weights, embeddings, norms, positional tables), so that under autocast the whole forward runs in
    ``dtype`` without a cast of each weight and each activation in every step. Trainable parameters (LoRA A/B)
    are left alone (they, their gradients and the optimizer state stay float32). Returns the number of
    parameters cast."""
    n = 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += p.numel()
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
    return n


# --------------------------------------------------------------------------------------------
# Faster dropout on CPUs
# --------------------------------------------------------------------------------------------
_FAST_DROPOUT_CLS = None


def fast_dropout_class():
    """An nn.Dropout replacement for CPUs, where ``bernoulli_`` draws one random number per element slowly
    (~12 ms per million elements here; with rank-12 LoRA on 192 attention layers of musicgen-small that was
    ~1.7 s of a 6.5 s train step). It draws 16 random bits per element from full-range 64-bit draws of the same
    seeded torch generator (4 per draw), keeps an element when its bits are >= round(p * 65536) (so the drop rate
    is p to within 1/65536, independently per element and per call), and then does what torch's own CPU dropout
    does with its mask: ``noise = keep.to(x.dtype).div_(1 - p)``, ``x * noise`` (so on a bf16 input the kept
    values are scaled by 1/(1-p) rounded to bf16, exactly like nn.Dropout on that input), with autograd saving
    only ``noise`` for the backward (one multiply). Same semantics as nn.Dropout: identity in eval mode or with
    p = 0."""
    global _FAST_DROPOUT_CLS
    if _FAST_DROPOUT_CLS is not None:
        return _FAST_DROPOUT_CLS
    import torch
    import torch.nn as nn

    class FastDropout(nn.Module):
        def __init__(self, p: float):
            super().__init__()
            if not 0.0 <= p < 1.0:
                raise ValueError(f"dropout probability must be in [0, 1), got {p}")
            self.p = float(p)

        def forward(self, x):
            if not self.training or self.p == 0.0 or x.numel() == 0:
                return x
            n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)  # 64 bits
            bits = words.view(torch.int16)[:n].view(x.shape)  # uniform int16, 4 per draw, no copy
            keep = bits >= (int(round(self.p * 65536)) - 32768)
            noise = keep.view(torch.uint8).to(x.dtype).div_(1.0 - self.p)  # (uint8 -> float casts faster than bool)
            return x * noise

        def extra_repr(self) -> str:
            return f"p={self.p}"

    _FAST_DROPOUT_CLS = FastDropout
    return FastDropout


def use_fast_dropout(model) -> int:
    """Replace the nn.Dropout modules of peft's LoRA layers (``lora_dropout``) by FastDropout; returns how
    many were replaced. Meant for CPU training (CUDA's dropout is already fast)."""
    import torch.nn as nn

    cls = fast_dropout_class()
    n = 0
    for m in model.modules():
        drops = getattr(m, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key, d in list(drops.items()):
                if type(d) is nn.Dropout and d.p > 0:
                    drops[key] = cls(d.p)
                    n += 1
    return n


# --------------------------------------------------------------------------------------------
# Cross-attention kernel for CPU training
# --------------------------------------------------------------------------------------------
CPU_TRAIN_ATTENTION = "sdpa_cpu_train"
MATH_CROSS_ATTENTION_MAX_KEYS = 64


def _cpu_train_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, except that the decoder's cross-attention over a few text tokens (non-causal,
    at most MATH_CROSS_ATTENTION_MAX_KEYS keys) runs SDPA's math kernel while gradients are recorded. torch's CPU
    flash-attention backward is slow for so few keys (musicgen-small, 503 frames x 16 text tokens, 2 threads:
    23 ms per layer forward+backward vs 7 ms with the math kernel; it also had the larger bf16 error against a
    float64 reference); from ~128 keys on, flash is faster, and without gradients (evaluation) it always is.
    Same mask semantics either way (rows with no visible token, the null condition, give 0)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (getattr(module, "is_causal", True) or key.shape[2] > MATH_CROSS_ATTENTION_MAX_KEYS
            or query.device.type != "cpu" or not torch.is_grad_enabled()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_cpu_train_attention(decoder) -> bool:
    """Switch a MusicGen decoder that uses transformers' "sdpa" attention to CPU_TRAIN_ATTENTION (registered with
    transformers' AttentionInterface, with sdpa's mask function, so masks are built exactly as for sdpa).
    Returns False (nothing changed) for any other attention implementation. Meant for CPU training."""
    if decoder.config._attn_implementation != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_TRAIN_ATTENTION, _cpu_train_attention)
    AttentionMaskInterface.register(CPU_TRAIN_ATTENTION, sdpa_mask)
    decoder.set_attn_implementation(CPU_TRAIN_ATTENTION)
    return decoder.config._attn_implementation == CPU_TRAIN_ATTENTION
