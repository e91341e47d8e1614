"""CPU speed-ups of LoRA training: a faster dropout for the LoRA layers and SDPA's math kernel for
the decoder's cross-attention over a few text tokens (same semantics as what they replace, tested;
switched on for CPU training by lora.training.model_prep.configure_step), and glibc's allocator told
to keep freed memory (train_lora.py and evaluate.py, CPU runs). The measured gains are in
BENCHMARKS.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# --------------------------------------------------------------------------------------------
# Freed memory stays in the process (glibc)
# --------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap (mallopt M_MMAP_MAX 0) and never
    to give freed
memory back to the kernel (M_TRIM_THRESHOLD -1), for the rest of this process. By default each tensor over 32 MiB
(EnCodec's activations while the token cache is built: hundreds of MiB each) is a fresh mmap whose every page the
kernel zero-fills again on first touch. With this, freed memory is reused: on a 2-core VM the cold start of
musicgen-small went from 2.3 to 1.0 million page faults and its token cache from 27.8 to 26.5 s, the tiny model's
cache from 6.1 to 3.2 s (BENCHMARKS.md). Values and numerics are untouched; the process's resident memory stays
near its peak instead of shrinking between big tensors (the peak itself moved by 1% on musicgen-small). Meant for
CPU runs of train_lora.py and evaluate.py (on a GPU the big tensors are CUDA's; inference_lora.py measured no gain).
Returns False, changing nothing, where the C library is not glibc (macOS, musl)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


# --------------------------------------------------------------------------------------------
# Faster dropout on CPUs
# --------------------------------------------------------------------------------------------
_FAST_DROPOUT_CLS = None


def fast_dropout_class():
    """An nn.Dropout replacement for CPUs, where ``bernoulli_`` draws one random number per element
    slowly (with
rank-12 LoRA on every attention layer of musicgen-small that was a large share of the CPU train step:
BENCHMARKS.md). It draws 16 random bits per element from full-range 64-bit draws of the same seeded torch
generator (4 per draw), keeps an element when its bits are >= round(p * 65536) (so the drop rate is p to within
1/65536, independently per element and per call), and then does what torch's own CPU dropout does with its mask:
``noise = keep.to(x.dtype).div_(1 - p)``, ``x * noise`` (so on a bf16 input the kept values are scaled by
1/(1-p) rounded to bf16, exactly like nn.Dropout on that input), with autograd saving only ``noise`` for the
backward (one multiply). Same semantics as nn.Dropout: identity in eval mode or with p = 0."""
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
            # (uint8 -> float casts faster than bool)
            noise = keep.view(torch.uint8).to(x.dtype).div_(1.0 - self.p)
            return x * noise

        def extra_repr(self) -> str:
            return f"p={self.p}"

    _FAST_DROPOUT_CLS = FastDropout
    return FastDropout


def use_fast_dropout(model: nn.Module) -> int:
    """Replace the nn.Dropout modules of peft's LoRA layers (``lora_dropout``) by FastDropout;
    returns how many were replaced. Meant for CPU training (CUDA's dropout is already fast)."""
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
# The math kernel while training when (audio positions) x (text tokens) is at most this: its cost
# grows with that product, flash's backward has a large cost of its own. On a 2-core Xeon (bf16, 2 x
# 16 heads, head dim 64, forward + backward; bench/bench_attention.py --grid, BENCHMARKS.md) math
# was faster at 503 x 96 (13.0 against 19.6 ms) and 1003 x 32 (14.2 / 19.7), flash at 1003 x 64
# (15.2 / 19.3) and 250 x 256 (19.9 / 22.7): the crossover is near 48 Ki scores per head.
MATH_CROSS_ATTENTION_MAX_SCORES = 48 * 1024


def math_cross_attention(queries: int, keys: int) -> bool:
    """Whether a cross-attention of ``queries`` audio positions over ``keys`` text tokens runs
    SDPA's math kernel while training on a CPU (else flash)."""
    return queries * keys <= MATH_CROSS_ATTENTION_MAX_SCORES


def _cpu_train_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, except that the decoder's cross-attention over a few text
    tokens (non-causal,
``math_cross_attention``: at most MATH_CROSS_ATTENTION_MAX_SCORES queries x keys) runs SDPA's math kernel while
gradients are recorded. torch's CPU flash-attention backward is slow for so few keys (several times slower than
the math kernel for musicgen-small's shapes, and with the larger bf16 error against a float64 reference:
BENCHMARKS.md); for longer windows or captions flash is faster, and without gradients (evaluation) it always is.
Same mask semantics either way (rows with no visible token, the null condition, give 0)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (getattr(module, "is_causal", True) or not math_cross_attention(query.shape[2], key.shape[2])
            or query.device.type != "cpu" or not torch.is_grad_enabled()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_cpu_train_attention(decoder) -> bool:
    """Switch a MusicGen decoder that uses transformers' "sdpa" attention to CPU_TRAIN_ATTENTION
    (registered with transformers' AttentionInterface, with sdpa's mask function, so masks are built
    exactly as for sdpa). Returns False (nothing changed) for any other attention implementation.
    Meant for CPU training."""
    if decoder.config._attn_implementation != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_TRAIN_ATTENTION, _cpu_train_attention)
    AttentionMaskInterface.register(CPU_TRAIN_ATTENTION, sdpa_mask)
    decoder.set_attn_implementation(CPU_TRAIN_ATTENTION)
    return decoder.config._attn_implementation == CPU_TRAIN_ATTENTION
