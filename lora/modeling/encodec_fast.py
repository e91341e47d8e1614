"""EnCodec's encoder for the token cache, faster on a CPU and in full float32 (the family's
``encode_audio`` calls it).

transformers' ``EncodecModel.encode`` runs every layer over the whole clip: at 32 kHz the first
stage's tensors are 64 channels x 320,000 samples (82 MB) for a 10-s clip, so each of its
convolutions, ELUs, paddings and additions streams the tensor through memory and allocates a fresh
one; on a 2-core CPU that is most of the time. Here:

* **Time chunks.** Everything before the LSTM is a stack of convolutions with a finite receptive
  field, so it is computed in chunks of ``chunk_frames`` output frames (``CHUNK_BYTES`` of
  first-stage activations: ~1 s for MusicGen's codec, small enough to stay in the CPU's caches),
  each with a halo of input on both sides that covers the stack's whole receptive field
  (``halo_samples``); a chunk's output frames are those of the whole clip (same weights, same
  neighbours; only float rounding can differ). Chunks start on multiples of the stack's total
  stride, so every layer's frame grid and its right-edge ("extra") padding are the whole clip's; the
  clip's own edges are padded exactly as transformers pads them (reflect, ``EncodecConv1d._pad1d``).
* **Only the wide stages in chunks.** The later layers, from the first whose tensors are at most
  ``WHOLE_CLIP_BYTES_PER_FRAME`` per output frame (``whole_clip_from``: MusicGen's last stage, 512
  channels), run on the whole clip: their convolutions are compute-bound, and oneDNN runs them
  several times faster on a long input than on short chunks. The chunks' halo then covers only the
  chunked stages' receptive field.
* **No needless copies.** A convolution without padding gets its input as it is (transformers' F.pad
  copies it even for zero padding); ELUs and residual additions work in place on tensors no one else
  holds.
* **The LSTM sees the whole batch at once** (it reads its weights once per frame, whatever the
  batch), after the stack has run clip by clip in chunks; the LSTM, the last ELU and convolution and
  the quantizer are transformers' own modules.

Codes are float32 codes: against ``EncodecModel.encode`` of the same batch, chunked latents differ
by float rounding only (~1e-7 of their scale) and codes agree with fp32 codes as well as
transformers' own encoder at another batch size does (99.6-100 % per codebook, BENCHMARKS.md "Cold
start"); clips too short for two chunks (and every clip of a codec as narrow as the tiny test
model's) run in one piece, the whole batch at once: bit for bit transformers' latents and codes.
tests/modeling/test_encodec_fast.py checks both, at odd lengths. bf16 is not used: its codes agreed
with fp32 on only 64-96 % of frames per codebook (BENCHMARKS.md, "Cold start").

Used on the CPU for codecs of the layout it knows (weight-norm convolutions, no chunked/normalized
48-kHz style input); anything else, and every GPU, runs ``EncodecModel.encode`` itself.
``ENCODER_PRECISION`` names what the codes were made in (the token cache's key records it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# the token cache records it: codes are made in full float32 (no TF32 on a GPU)
ENCODER_PRECISION = "fp32"
# First-stage activations per chunk: 8 MiB = ~1 s for MusicGen's 64-filter codec (409 frames of its
# chunked first three stages, 80 samples each), the fastest of 0.5 / 1 / 2 / 4-s chunks for the
# stack on a 2-core Xeon (2026-12-02, every layer chunked then). A narrower codec (the tiny test
# model's 4 filters) runs unchunked.
CHUNK_BYTES = 1 << 23
# The stack's later layers run on the whole clip: from the first whose input and output are each at
# most this many bytes per output frame (MusicGen's codec: its last stage, 512 channels x 8 samples
# = 16 KiB). There the convolutions are compute-bound and oneDNN runs them faster on a long input
# than on 1-s chunks: the last convolution (512 -> 1024, kernel 16, stride 8) took 66 ms for a 10-s
# clip whole against 230 ms in chunks, and the whole stack of a 10-s clip 0.61 s against 0.83 s with
# every layer chunked (AMD EPYC, 2 cores, 2026-12-02; BENCHMARKS.md "Token cache build").
WHOLE_CLIP_BYTES_PER_FRAME = 1 << 14


def _classes():
    from transformers.models.encodec import modeling_encodec as me

    return me.EncodecConv1d, me.EncodecResnetBlock, me.EncodecLSTM


def supported(codec) -> bool:
    """Whether ``encode_codes`` can run this codec chunked (else it calls ``codec.encode``)."""
    import torch

    cfg = codec.config
    if cfg.chunk_length_s is not None or cfg.normalize or getattr(cfg, "norm_type",
                                                                  "weight_norm") != "weight_norm":
        # 48-kHz style chunking / normalisation, or GroupNorm over time (not chunkable)
        return False
    conv, block, lstm = _classes()
    layers = list(codec.encoder.layers)
    if not any(isinstance(m, lstm) for m in layers):
        return False
    for m in layers[:_lstm_index(codec.encoder)]:
        if isinstance(m, block):
            if not all(isinstance(b, (conv, torch.nn.ELU)) for b in m.block):
                return False
            if not isinstance(m.shortcut, (conv, torch.nn.Identity)):
                return False
        elif not isinstance(m, (conv, torch.nn.ELU)):
            return False
    return True


def _lstm_index(encoder) -> int:
    _, _, lstm = _classes()
    return next(i for i, m in enumerate(encoder.layers) if isinstance(m, lstm))


def _convs(layers):
    """Every EncodecConv1d of ``layers`` in order, residual blocks' own convolutions included (they
    have stride 1: they widen the receptive field but keep the length)."""
    conv, block, _ = _classes()
    for m in layers:
        if isinstance(m, conv):
            yield m
        elif isinstance(m, block):
            for b in m.block:
                if isinstance(b, conv):
                    yield b
            if isinstance(m.shortcut, conv):
                yield m.shortcut


def _geometry(layer) -> tuple[int, int, int]:
    """(kernel size with dilation, stride, total padding) of an EncodecConv1d."""
    return int(layer.kernel_size), int(layer.stride), int(layer.padding_total)


def stack_layers(encoder) -> list:
    """The encoder's layers before the LSTM (convolutions, residual blocks, ELUs)."""
    return list(encoder.layers[:_lstm_index(encoder)])


def total_stride(layers) -> int:
    """Input samples per output frame of ``layers`` (a stretch of the stack before the LSTM)."""
    return math.prod(_geometry(c)[1] for c in _convs(layers))


def halo_samples(layers) -> int:
    """Input samples a chunk of ``layers`` needs on each side: their receptive field (each
    convolution widens it by (kernel - 1) x the stride before it) plus one frame for the frame grid,
    rounded up to whole frames (chunks start on multiples of the total stride)."""
    reach, before = 0, 1
    for c in _convs(layers):
        k, s, _ = _geometry(c)
        reach += (k - 1) * before
        before *= s
    stride = total_stride(layers)
    return int(math.ceil((reach + stride) / stride)) * stride


def _paddings(layer, n: int) -> tuple[int, int]:
    """(left, right) padding transformers' EncodecConv1d.forward applies to an input of ``n``
    samples."""
    k, s, total = _geometry(layer)
    frames = math.ceil((n - k + total) / s + 1) - 1
    extra = frames * s + k - total - n
    if layer.causal:
        return total, extra
    right = total // 2
    return total - right, right + extra


def _conv(layer, x, owned: bool, elu: bool):
    """EncodecConv1d.forward of ELU(x) (``elu``) or x; ``owned``: x may be overwritten."""
    import torch.nn.functional as F

    if elu:
        x = F.elu(x, inplace=True) if owned else F.elu(x)
    left, right = _paddings(layer, x.shape[-1])
    if left or right:
        x = layer._pad1d(x, (left, right), mode=layer.pad_mode)
    return layer.conv(x)


def _stack(layers, x, owned: bool = False):
    """``layers`` (of the stack before the LSTM) on x (B, C, n), with in-place ELUs and additions
    where nothing else reads the tensor (``x`` itself is never changed unless ``owned``: the
    caller's tensor may be overwritten). An ELU is applied as the next convolution reads its input
    (``_conv``), in place once the tensor is the stack's own."""
    import torch
    import torch.nn.functional as F

    conv, _, _ = _classes()

    def run(modules, x, owned=False):
        elu = False
        for m in modules:
            if isinstance(m, torch.nn.ELU):
                if elu:  # two ELUs in a row (not in EnCodec): apply the first
                    x, owned = F.elu(x, inplace=owned), True
                elu = True
            elif isinstance(m, conv):
                x, owned, elu = _conv(m, x, owned, elu), True, False
            else:  # residual block: its branch (ELU, conv, ELU, conv) + its shortcut
                if elu:
                    x, owned, elu = F.elu(x, inplace=owned), True, False
                x, owned = run(m.block, x).add_(m.shortcut(x)), True
        return F.elu(x, inplace=owned) if elu else x

    return run(layers, x, owned)


def stack_frames(layers, n: int) -> int:
    """Output frames of ``layers`` for ``n`` input samples (transformers' padding arithmetic)."""
    for c in _main_convs(layers):
        k, s, _ = _geometry(c)
        left, right = _paddings(c, n)
        n = (n + left + right - k) // s + 1
    return n


def _main_convs(layers):
    """The convolutions on the main path of ``layers`` (those that set the length: not a residual
    branch's)."""
    conv, _, _ = _classes()
    return [m for m in layers if isinstance(m, conv)]


def whole_clip_from(encoder) -> int:
    """Index of the first layer of the stack that runs on the whole clip, not in chunks: the first
    whose input and output each hold at most ``WHOLE_CLIP_BYTES_PER_FRAME`` of float32 activations
    per output frame of the stack (channels x the stride still ahead). 0 (nothing chunked) for a
    codec as narrow as the tiny test model's."""
    conv, _, _ = _classes()
    layers = stack_layers(encoder)
    channels = int(_main_convs(layers)[0].conv.in_channels)
    for i, m in enumerate(layers):
        # blocks and ELUs keep the width
        out = int(m.conv.out_channels) if isinstance(m, conv) else channels
        widest = max(channels * total_stride(layers[i:]), out * total_stride(layers[i + 1:]))
        if 4 * widest <= WHOLE_CLIP_BYTES_PER_FRAME:
            return i
        channels = out
    return len(layers)


def chunk_frames(layers) -> int:
    """Output frames of ``layers`` per chunk: ``CHUNK_BYTES`` of float32 activations at the first
    convolution's width."""
    first = next(_convs(layers))
    return max(1, CHUNK_BYTES // (4 * int(first.conv.out_channels) * total_stride(layers)))


def chunked(layers, n: int, frames_per_chunk: int | None = None) -> bool:
    """Whether clips of ``n`` samples run through ``layers`` in chunks (at least two chunks' worth
    of frames)."""
    if not layers:
        return False
    per = frames_per_chunk or chunk_frames(layers)
    return stack_frames(layers, n) > 2 * per and n > 2 * halo_samples(layers)


def pre_lstm(encoder, x, frames_per_chunk: int | None = None, whole_from: int | None = None):
    """The stack before the LSTM on x (B, C, N): (B, D, T) equal to the unchunked stack up to float
    rounding. Its first ``whole_from`` layers (default ``whole_clip_from``) run in time chunks of
    ``frames_per_chunk`` of their own output frames (default ``chunk_frames``), the rest on the
    whole clip. Clips too short for two chunks run in one piece (exactly the unchunked stack)."""
    import torch

    layers = stack_layers(encoder)
    split = whole_clip_from(encoder) if whole_from is None else whole_from
    head = layers[:split]
    n = int(x.shape[-1])
    if not chunked(head, n, frames_per_chunk):
        return _stack(layers, x)
    per = frames_per_chunk or chunk_frames(head)
    stride, halo, frames = total_stride(head), halo_samples(head), stack_frames(head, n)
    parts = []
    for f0 in range(0, frames, per):
        f1 = min(frames, f0 + per)
        start = max(0, f0 * stride - halo)
        end = min(n, f1 * stride + halo)
        out = _stack(head, x[..., start:end])
        first = (f0 * stride - start) // stride
        parts.append(out[..., first:first + (f1 - f0)])
    out = torch.cat(parts, dim=-1)
    # the arithmetic above is transformers'; a mismatch means a layout it does not know
    if out.shape[-1] != frames:
        raise RuntimeError(f"chunked EnCodec stack gave {out.shape[-1]} frames for {n} samples, "
                           f"expected {frames}")
    return _stack(layers[split:], out, owned=True)


def encoder_forward(encoder, x, frames_per_chunk: int | None = None, whole_from: int | None = None):
    """EncodecEncoder.forward(x) (B, C, N) -> latents (B, D, T): the stack before the LSTM clip by
    clip (partly in time chunks: ``pre_lstm``), then the LSTM and the rest on the whole batch
    (transformers' modules)."""
    import torch

    idx = _lstm_index(encoder)
    split = whole_clip_from(encoder) if whole_from is None else whole_from
    # each weight-normed weight computed once, not once per chunk
    with torch.nn.utils.parametrize.cached():
        if chunked(stack_layers(encoder)[:split], int(x.shape[-1]), frames_per_chunk):
            h = torch.cat([pre_lstm(encoder, x[b:b + 1], frames_per_chunk, split)
                           for b in range(x.shape[0])])
        else:  # the whole batch in one piece: bit for bit transformers' stack
            h = _stack(stack_layers(encoder), x)
        for m in encoder.layers[idx:]:
            h = m(h)
    return h


def encode_codes(codec, wavs, bandwidth=None, frames_per_chunk: int | None = None):
    """Codes (B, K, T) of mono audio (B, 1, N) at the codec's rate, like
    ``codec.encode(wavs).audio_codes[0]`` (chunked on the CPU where ``supported``; the codec's own
    encode elsewhere, with TF32 off on a GPU so codes are float32 codes everywhere)."""
    import torch

    if bandwidth is None:
        bandwidth = codec.config.target_bandwidths[0]
    with torch.no_grad():
        if wavs.device.type != "cpu" or not supported(codec):
            with full_fp32(wavs.device):
                return codec.encode(wavs, bandwidth=bandwidth, return_dict=True).audio_codes[0]
        latents = encoder_forward(codec.encoder, wavs, frames_per_chunk)
        return codec.quantizer.encode(latents, bandwidth).transpose(0, 1)


class full_fp32:
    """Within: no TF32 in cuDNN convolutions or CUDA matmuls (their defaults may use it), so a GPU's
    codes are float32 codes like the CPU's."""

    def __init__(self, device: torch.device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False
