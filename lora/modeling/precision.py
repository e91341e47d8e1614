"""Which mixed precision to train in, decided from facts about the hardware (never guessed).

``choose_precision(requested, device)`` returns ``(mode, reason)`` with mode in {"bf16", "fp16",
"no"}:

* ``auto``: bf16 autocast where the hardware runs it fast — CUDA GPUs with bf16 support (Ampere and
  newer), CPUs with AMX-BF16 or AVX512-BF16 (read from /proc/cpuinfo); fp16 with a GradScaler on
  older CUDA GPUs with tensor cores (compute capability 7.x); fp32 ("no") otherwise.
* ``fp16`` (the seed's ``--fp16``): fp16 on CUDA. On a CPU fp16 autocast is slow and numerically
  fragile, so it falls back to bf16 when the CPU runs bf16 fast, else fp32 — with a warning.
* ``bf16``: bf16; on a CUDA GPU without bf16 it falls back to fp16 (warning); on a CPU without fast
  bf16 it still runs bf16 (it works, only slowly) and warns.
* ``no``: fp32.

The hardware facts come from ``hardware_facts(device)``; tests pass their own ``HardwareFacts``. The
same facts decide the storage dtype of the frozen weights in training
(``resolve_base_weights_dtype``) and the decoder's dtype for generation (``generation_dtype``). The
CPU speed-ups of the train step (dropout, attention kernel) are in lora.modeling.cpu_speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log

if TYPE_CHECKING:
    import torch

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
    """The CPU feature flags from /proc/cpuinfo (empty when it cannot be read, e.g. on
    macOS/Windows)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def hardware_facts(device: torch.device) -> HardwareFacts:
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


def choose_precision(requested: str, device: torch.device,
                     facts: Optional[HardwareFacts] = None) -> tuple[str, str]:
    """Pick the autocast mode for ``requested`` in {auto, fp16, bf16, no} on ``device``; returns
    (mode, reason)."""
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
            log.warning("bf16 was requested but %s has no bf16 support; using fp16 with a "
                        "GradScaler instead.", gpu)
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
            log.warning("bf16 was requested, but this CPU has no AMX-BF16/AVX512-BF16: it works "
                        "but may be slower than fp32.")
            return "bf16", "bf16 autocast as requested (this CPU has no AMX-BF16/AVX512-BF16: may be slow)"
        if requested == "fp16":
            if fast:
                log.warning("--fp16 on a CPU: fp16 autocast is slow and fragile on CPUs; this CPU "
                            "has %s, so bf16 autocast is used instead.", fast)
                return "bf16", f"fp16 requested on CPU; fell back to bf16 because the CPU has {fast}"
            log.warning("--fp16 on a CPU: fp16 autocast is slow and fragile on CPUs and this CPU "
                        "has no fast bf16 (AMX-BF16/AVX512-BF16); training in fp32 instead.")
            return "no", "fp16 requested on CPU without fast bf16; fell back to fp32"
        if fast:
            return "bf16", f"auto: the CPU has {fast}, so bf16 autocast is fast"
        return "no", "auto: the CPU has no AMX-BF16/AVX512-BF16, so fp32"

    # mps, xpu, ...: no tested autocast path here.
    if requested in ("fp16", "bf16"):
        log.warning("%s was requested on device type %s; mixed precision is only supported on CUDA "
                    "and CPU here, training in fp32.", requested, f.device_type)
        return "no", f"{requested} requested on {f.device_type}: fp32 (mixed precision only on CUDA/CPU here)"
    return "no", f"auto: {f.device_type} device: fp32"


# --------------------------------------------------------------------------------------------
# Storage dtype of the frozen base weights
# --------------------------------------------------------------------------------------------
def resolve_base_weights_dtype(setting: str, precision: str) -> tuple[str, str]:
    """(dtype name, reason) for training.base_weights_dtype given the chosen autocast ``precision``.

    bf16 storage of the frozen matmul weights only makes sense under bf16 autocast (the matmuls run
    in bf16 anyway; storing them so saves the cast of every weight in every forward and half their
    memory). Asking for bfloat16 with another precision is a user error (fp32 matmuls cannot take
    bf16 weights; fp16 autocast would mix two half types).
    """
    setting = (setting or "auto").lower()
    if setting not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"base_weights_dtype must be auto, float32 or bfloat16, got {setting!r}")
    if setting == "float32":
        return "float32", "float32 as requested"
    if precision == "bf16":
        return "bfloat16", ("bf16 autocast: frozen weights stored in bf16 (no per-step cast, half "
                            "the memory)"
                            if setting == "auto" else "bfloat16 as requested")
    if setting == "bfloat16":
        raise UserError(f"training.base_weights_dtype bfloat16 needs bf16 mixed precision, but the "
                        f"precision is {precision!r}. Use --mixed_precision bf16 (on hardware that "
                        f"runs it), or --base_weights_dtype auto / float32.")
    return "float32", f"auto: precision {precision}, so float32"


def cast_frozen_weights(module, dtype) -> int:
    """Cast every frozen floating-point parameter and floating-point buffer under ``module`` to
    ``dtype`` (matmul weights, embeddings, norms, positional tables), so that under autocast the
    whole forward runs in ``dtype`` without a cast of each weight and each activation in every step.
    Trainable parameters (LoRA A/B) are left alone (they, their gradients and the optimizer state
    stay float32). Returns the number of parameters cast.

    The parameters go into one flat ``dtype`` buffer per device (each becomes a view of it): one
    allocation instead of one per tensor, which on musicgen-large's 3.3 B frozen decoder parameters
    took the cast from 8.3 s to 5.2-7.2 s on a 2-core CPU (BENCHMARKS.md, "Cold start"); the values
    are the same round-to-nearest casts."""
    import torch

    frozen: dict = {}  # unique frozen floating-point parameters, per device, in module order
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            frozen.setdefault(p.device, {})[id(p)] = p
    n = 0
    for device, params in frozen.items():
        total = sum(p.numel() for p in params.values())
        flat = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        for p in params.values():
            view = flat[offset:offset + p.numel()].view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += p.numel()
        n += total
    for m in module.modules():
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
    return n


# --------------------------------------------------------------------------------------------
# Weights dtype for generation
# --------------------------------------------------------------------------------------------
def generation_dtype(name: str, device: torch.device, facts: Optional[HardwareFacts] = None):
    """The decoder's weights dtype for generation (generation.dtype): 'auto' -> bf16 on GPUs that
    run it, fp16 on older GPUs; on a CPU bf16 where it has AMX-BF16 or AVX512-BF16 (the same facts
    as training's choice; the measured speed-up is in BENCHMARKS.md), else fp32; otherwise the named
    dtype."""
    import torch

    if name in (None, "", "auto"):
        f = facts if facts is not None else hardware_facts(device)
        if f.device_type == "cuda":
            return torch.bfloat16 if f.cuda_bf16 else torch.float16
        if f.device_type == "cpu" and _cpu_bf16_fast(f):
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"generation.dtype {name!r} is not one of auto, float32, bfloat16, float16.")
    if torch.device(device).type == "cpu" and table[name] == torch.float16:
        log.warning("dtype float16 on CPU is slow and fragile; consider float32 (or dtype: auto)")
    return table[name]
