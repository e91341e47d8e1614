"""The MusicGen model family: the one place that knows MusicGen's internals (``fast_decode.py``
beside it is the family's decoding step).

Everything else in the toolkit calls these functions through
``lora.modeling.loading.family_for(...)``, so a second family (e.g. MusicGen-Melody, which
conditions through a prefix instead of cross-attention) is a sibling module with the same names,
chosen by the checkpoint's ``model_type``, and not special cases in every script. What a family
module provides:

* ``MODEL_TYPE``, ``ModelInfo``, ``from_pretrained`` and ``model_info`` (path resolution, hub access
  and the model identity are family-independent: ``lora.modeling.loading``);
* its parts: ``decoder_modules`` (what casting, device moves, ``cast_for_generation`` and decoder
  dropout act on), ``text_encoder``, ``audio_codec``, and the switches the train step sets on them;
* where LoRA may go: ``LORA_PRESETS``, ``LORA_SEARCH_PREFIX``, ``TEXT_ENCODER_TARGETS``,
  ``decoder_shape``;
* the encoders (``encode_audio``, ``decode_audio``, ``codec_latents``, ``encode_text``);
* the conditioning: how cached text states become the decoder's input (``condition``), the null
  condition (``null_condition``, ``drop_condition``, ``with_unconditional``);
* the delay pattern (``build_delay_pattern`` for teacher forcing, ``generation_pattern`` and
  ``frames_from_pattern`` for decoding);
* the ONE teacher-forced forward (``teacher_forced_logits``) and the ONE loss (``codebook_loss``),
  which training, validation, evaluate's held-out likelihood and test_model all call;
* a decoder step with transformers' own cache (``cached_step``) and the static-cache
  ``StaticDecoder``.

Shapes used throughout (K = number of codebooks, interleaved left/right for stereo models):
    codes             LongTensor (B, K, T)         EnCodec codes, T frames at ``info.frame_rate``
    decoder_input_ids LongTensor (B*K, T+Kc-1)     what MusicGen's decoder reads (Kc = codebooks per channel)
    labels            LongTensor (B, T+Kc-1, K)    delay-pattern targets, -100 where no loss is taken
    logits            FloatTensor (B*K, S, V)      as returned by ``MusicgenForConditionalGeneration``
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from lora.common.cli import clip_text, log
from lora.config import MAX_TEXT_TOKENS

# the family's EnCodec encoder (float32, chunked on a CPU)
from lora.modeling.encodec_fast import encode_codes
from lora.modeling.fast_decode import StaticDecoder  # noqa: F401  (the family's static-cache decoding step)

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_TYPE = "musicgen"
MELODY = False  # conditioned on text only (lora.modeling.musicgen_melody: text and a melody)


# --------------------------------------------------------------------------------------------
# Model description and loading
# --------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What the rest of the toolkit needs to know about a loaded MusicGen."""

    name_or_path: str            # the real folder (absolute) or the hub id
    sample_rate: int             # Hz (32000 for MusicGen)
    frame_rate: int              # codec frames per second (50 for MusicGen)
    num_codebooks: int           # decoder codebooks, all channels (4 mono, 8 stereo)
    audio_channels: int          # 1 or 2
    pad_token_id: int            # decoder pad token (= codebook size for MusicGen)
    decoder_start_token_id: int  # first decoder input (BOS)
    vocab_size: int              # codebook size
    # T5 hidden size (before the decoder's projection of the text states)
    text_hidden_size: int
    identity: str                # stable short hash of config + weights (cache keys)
    model_type: str = MODEL_TYPE
    hub_revision: Optional[str] = None  # commit of a hub snapshot, when known

    @property
    def codebooks_per_channel(self) -> int:
        return self.num_codebooks // self.audio_channels

    def frames(self, seconds: float) -> int:
        """Codec frames for ``seconds`` of audio."""
        return int(math.ceil(round(seconds * self.sample_rate) * self.frame_rate / self.sample_rate))

    def to_dict(self) -> dict:
        return asdict(self)


def from_pretrained(path: str, attn: str, **kw):
    """``MusicgenForConditionalGeneration.from_pretrained`` with the decoder's attention kernel set
    (EnCodec has no sdpa; it keeps its default). Falls back to eager attention where the kernel is
    not available."""
    from transformers import MusicgenForConditionalGeneration

    if attn == "eager":
        return MusicgenForConditionalGeneration.from_pretrained(path, attn_implementation="eager", **kw)
    try:
        return MusicgenForConditionalGeneration.from_pretrained(path,
                                                                attn_implementation={"decoder": attn}, **kw)
    except (ValueError, ImportError) as e:
        if "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        log.info("attn_implementation=%s is not available here (%s); falling back to eager "
                 "attention", attn, str(e).splitlines()[0][:200])
        return MusicgenForConditionalGeneration.from_pretrained(path, attn_implementation="eager", **kw)


def load_processor(path: str, **kw):
    """The model's processor (tokenizer + EnCodec feature extractor):
    ``AutoProcessor.from_pretrained``."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, **kw)


def model_info(model: nn.Module, name_or_path: str, identity: str,
               hub_revision: Optional[str] = None) -> ModelInfo:
    base = get_base(model)
    cfg = base.config
    dec = cfg.decoder
    gen = getattr(base, "generation_config", None)
    start = getattr(gen, "decoder_start_token_id", None) if gen is not None else None
    if start is None:
        start = getattr(dec, "decoder_start_token_id", None)
    if start is None:
        start = dec.bos_token_id
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = dec.pad_token_id
    return ModelInfo(
        name_or_path=name_or_path, sample_rate=int(cfg.audio_encoder.sampling_rate),
        frame_rate=int(cfg.audio_encoder.frame_rate), num_codebooks=int(dec.num_codebooks),
        audio_channels=int(dec.audio_channels), pad_token_id=int(pad),
        decoder_start_token_id=int(start),
        vocab_size=int(dec.vocab_size), text_hidden_size=int(cfg.text_encoder.hidden_size),
        identity=identity, model_type=cfg.model_type, hub_revision=hub_revision)


def get_base(model: nn.Module):
    """The MusicgenForConditionalGeneration under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


# --------------------------------------------------------------------------------------------
# The parts of the model, and the switches the train step sets on them
# --------------------------------------------------------------------------------------------
def decoder_modules(model: nn.Module) -> list:
    """What runs in every decoding / training step: the decoder (with its LoRA layers) and the
    projection of the text states into the decoder's width (when the widths differ). Casting the
    frozen weights, device moves for training and ``cast_for_generation`` act on exactly these."""
    base = get_base(model)
    mods = [base.decoder]
    if getattr(base, "enc_to_dec_proj", None) is not None:
        mods.append(base.enc_to_dec_proj)
    return mods


def decoder(model: nn.Module):
    """The decoder language model (``MusicgenForCausalLM``): the part LoRA adapts."""
    return get_base(model).decoder


def text_encoder_of(model: nn.Module):
    return get_base(model).text_encoder


def audio_codec(model: nn.Module):
    return get_base(model).audio_encoder


def lm_heads(model: nn.Module):
    return get_base(model).decoder.lm_heads


def decoder_param(model: nn.Module):
    """A parameter of the decoder: its device and dtype are the decoding step's."""
    return next(get_base(model).decoder.parameters())


def parameter_counts(model: nn.Module) -> dict:
    """Parameters per part, in the order a user reads them."""
    base = get_base(model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"decoder": count(base.decoder), "text encoder": count(base.text_encoder),
            "EnCodec": count(base.audio_encoder)}


def attention_implementation(model: nn.Module) -> str:
    return get_base(model).config.decoder._attn_implementation


def max_positions(model: nn.Module) -> int:
    return int(getattr(get_base(model).config.decoder, "max_position_embeddings", 10 ** 9))


def prefix_positions(info: ModelInfo, text_length: int = 0) -> int:
    """Decoder positions read before the audio: none (the text is cross-attended)."""
    return 0


def set_decoder_dropout(model: nn.Module, p: float | None) -> float | None:
    """training.decoder_dropout: the hidden-state dropout of the frozen decoder while LoRA trains
    (``MusicgenDecoder.dropout`` after the embeddings and ``MusicgenDecoderLayer.dropout`` after
    self-attention, cross-attention and the feed-forward block; attention_dropout /
    activation_dropout stay as the config has them). None keeps the checkpoint's value. Only the
    module attributes change, not the model config: the saved adapter is the same, and evaluation /
    generation run in eval mode, where dropout is off anyway. Returns the value in effect
    (logged)."""
    dec = get_base(model).decoder.model.decoder
    if p is None:
        log.info("Decoder hidden-state dropout: %g (the checkpoint's, training.decoder_dropout: "
                 "null)", dec.dropout)
        return float(dec.dropout)
    before = {float(dec.dropout)} | {float(layer.dropout) for layer in dec.layers}
    dec.dropout = float(p)
    for layer in dec.layers:
        layer.dropout = float(p)
    log.info("Decoder hidden-state dropout: %g (training.decoder_dropout; the checkpoint has %s)", p,
             "/".join(f"{v:g}" for v in sorted(before)))
    return float(p)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute the decoder layers' activations in backward (peft's input-grad hook on the
    embeddings makes the checkpointed segments see an input that needs a gradient)."""
    base = get_base(model)
    base.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    for emb in base.decoder.model.decoder.embed_tokens:
        emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))


class _NoLayerDropRandom:
    """Stands in for the ``random`` module in the transformers module of the decoder stack under
    torch.compile when its layerdrop is 0 (every MusicGen checkpoint): the stack draws
    ``random.uniform(0, 1)`` per layer for LayerDrop and compares it with ``layerdrop`` in training
    mode, a data-dependent branch that makes dynamo give up on the whole stack (each layer then
    becomes its own graph, with eager code between). With layerdrop 0 no layer is ever dropped, so
    ``uniform`` returning its upper bound changes nothing and the stack is one graph."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def uniform(a, b):
        return float(b)


def compile_decoder(model: nn.Module, mode: str | None = None) -> None:
    """torch.compile the decoder (inductor) with static shapes (``dynamic=False``: every input shape
    is its own specialised graph; the training library pads batches to a bounded set of shapes).
    ``mode``: torch.compile's mode (None = default, "reduce-overhead" = CUDA graphs as well). With
    layerdrop 0, the decoder stack's LayerDrop draw is made a constant (``_NoLayerDropRandom``) so
    the stack compiles as one graph."""
    import sys

    dec = get_base(model).decoder
    stack = dec.model.decoder
    mod = sys.modules[type(stack).__module__]
    if float(getattr(stack, "layerdrop", 0.0)) == 0.0 and not isinstance(getattr(mod, "random", None),
                                                                        _NoLayerDropRandom):
        mod.random = _NoLayerDropRandom(mod.random)
    dec.compile(dynamic=False, mode=mode)


# --------------------------------------------------------------------------------------------
# Where LoRA may go
# --------------------------------------------------------------------------------------------
_ATTN_PROJ = r"(?:q_proj|k_proj|v_proj|out_proj)"
LORA_PRESETS = {
    # Decoder self- and cross-attention projections of every MusicgenDecoderLayer.
    "attention": rf"decoder\.model\.decoder\.layers\.\d+\.(?:self_attn|encoder_attn)\.{_ATTN_PROJ}",
    # ... plus the feed-forward block.
    "attention_ffn": rf"decoder\.model\.decoder\.layers\.\d+\.(?:(?:self_attn|encoder_attn)\.{_ATTN_PROJ}|fc1|fc2)",
}
LORA_PRESETS_HELP = "'attention' (self+cross q/k/v/out), 'attention_ffn' (+ fc1/fc2)"
# only the decoder gets LoRA (plus TEXT_ENCODER_TARGETS when the text encoder trains)
LORA_SEARCH_PREFIX = "decoder."
# names of one layer, shown when a lora_targets pattern matches nothing
LORA_EXAMPLE_LAYER = ".layers.0."
DECODER_NAME = "MusicGen decoder"
# T5 encoder self-attention (train_text_encoder).
TEXT_ENCODER_TARGETS = r"text_encoder\.encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?:q|k|v|o)"
DECODER_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                      "num_codebooks", "audio_channels", "vocab_size")


def decoder_shape(config) -> dict:
    """The decoder's architecture (the keys an adapter depends on) from a model config or a
    config.json dict."""
    dec = config.get("decoder") or {} if isinstance(config, dict) else config.decoder
    get = dec.get if isinstance(dec, dict) else (lambda k: getattr(dec, k, None))
    return {k: get(k) for k in DECODER_SHAPE_KEYS}


# --------------------------------------------------------------------------------------------
# Audio and text encoders
# --------------------------------------------------------------------------------------------
def _match_channels(wavs, channels: int):
    """(B, C, N) -> (B, channels, N): mix down for mono models, duplicate a mono signal for stereo
    models."""
    c = wavs.shape[1]
    if c == channels:
        return wavs
    if channels == 1:
        return wavs.mean(dim=1, keepdim=True)
    if c == 1:
        return wavs.expand(-1, channels, -1)
    raise ValueError(f"cannot map {c}-channel audio to a {channels}-channel model")


def encode_audio(model: nn.Module, wavs, info: ModelInfo):
    """EnCodec codes of float audio (B, C, N) at ``info.sample_rate`` -> LongTensor (B, K, T), T =
    ceil(N/hop).

    Stereo models: left and right are encoded separately and their codebooks interleaved (L0, R0,
    L1, R1, ...), exactly like MusicgenForConditionalGeneration does for audio prompts. The codes
    are float32 codes of ``EncodecModel.encode`` (lora.modeling.encodec_fast: chunked over time on a
    CPU, no TF32 on a GPU).
    """
    import torch

    codec = get_base(model).audio_encoder
    if wavs.dim() == 2:
        wavs = wavs[:, None, :]
    wavs = _match_channels(wavs, info.audio_channels)
    param = next(codec.parameters())
    wavs = wavs.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        if info.audio_channels == 1:
            codes = encode_codes(codec, wavs)
        else:
            left = encode_codes(codec, wavs[:, :1])
            right = encode_codes(codec, wavs[:, 1:])
            b, k, t = left.shape
            codes = left.new_empty((b, 2 * k, t))
            codes[:, ::2] = left
            codes[:, 1::2] = right
    return codes.long()


def decode_audio(model: nn.Module, codes, info: ModelInfo):
    """Codes (B, K, T) -> float audio (B, C, N) with N = T * hop (as generate() decodes)."""
    import torch

    codec = get_base(model).audio_encoder
    codes = codes.to(next(codec.parameters()).device).long()
    scales = [None] * codes.shape[0]
    with torch.no_grad():
        if info.audio_channels == 1:
            return codec.decode(codes[None], audio_scales=scales).audio_values
        left = codec.decode(codes[None, :, ::2], audio_scales=scales).audio_values
        right = codec.decode(codes[None, :, 1::2], audio_scales=scales).audio_values
        return torch.cat([left, right], dim=1)


def codec_latents(model: nn.Module, wav):
    """Frames of the frozen EnCodec encoder before quantisation: float64 numpy (T, D) for one clip
    (C, N) (a mono codec hears the mix-down). The embedding space of evaluate's FAD/KAD."""
    import numpy as np
    import torch

    codec = get_base(model).audio_encoder
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if x.dim() == 1:
        x = x[None]
    if int(getattr(codec.config, "audio_channels", 1)) == 1 and x.shape[0] > 1:
        x = x.mean(dim=0, keepdim=True)
    p = next(codec.parameters())
    with torch.no_grad():
        z = codec.encoder(x[None].to(device=p.device, dtype=p.dtype))
    return z[0].float().T.cpu().numpy().astype(np.float64)


def encode_text(model: nn.Module, processor, texts: Sequence[str], device: torch.device | None = None):
    """Frozen T5 states of the captions: (hidden (B, L, D) float, mask (B, L) long).

    ``hidden`` is the text encoder's last_hidden_state BEFORE the decoder's projection (the model
    applies that itself, see ``condition``). An empty caption ("") is the null condition: all-zero
    states and an all-zero mask, which is what generate() feeds the unconditional branch of
    classifier-free guidance.
    """
    import torch

    enc = get_base(model).text_encoder
    if device is None:
        device = next(enc.parameters()).device
    texts = [str(t) if t is not None else "" for t in texts]
    # T5 reads at most MAX_TEXT_TOKENS tokens: a longer text is cut there (said), never encoded
    # whole (its attention grows with the square of its length)
    batch = processor.tokenizer(texts, padding=True, return_tensors="pt", truncation=True,
                                max_length=MAX_TEXT_TOKENS)
    cut = [t for t in texts if len(t) > MAX_TEXT_TOKENS
           and len(processor.tokenizer(t, truncation=False)["input_ids"]) > MAX_TEXT_TOKENS]
    if cut:
        log.warning("%d text(s) are longer than the text encoder's %d tokens and were cut there, "
                    "e.g. %r", len(cut), MAX_TEXT_TOKENS, clip_text(cut[0], 80))
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).long()
    trainable = any(p.requires_grad for p in enc.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    empty = torch.tensor([t.strip() == "" for t in texts], device=device)
    if bool(empty.any()):
        hidden = hidden.masked_fill(empty[:, None, None], 0.0)
        mask = mask.masked_fill(empty[:, None], 0)
    return hidden, mask


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------
def condition(hidden, mask) -> dict:
    """The decoder's conditioning inputs from text states (B, L, D) before projection and their mask
    (B, L): the keyword arguments of ``MusicgenForConditionalGeneration.forward``, which projects
    the states into the decoder's width, zeroes the masked ones and cross-attends to them."""
    return {"encoder_outputs": (hidden,), "attention_mask": mask}


def null_condition(batch: int, info: ModelInfo, device: torch.device | None = None, dtype=None):
    """The unconditional input: zeros (B, 1, D) states and zeros (B, 1) mask, as in
    MusicgenForConditionalGeneration.get_unconditional_inputs / the CFG branch of generate()."""
    import torch

    dtype = dtype or torch.float32
    hidden = torch.zeros((batch, 1, info.text_hidden_size), device=device, dtype=dtype)
    mask = torch.zeros((batch, 1), device=device, dtype=torch.long)
    return hidden, mask


def null_text_states(hidden_size: int, dtype=None):
    """One clip's null condition as the token cache holds text states: zeros (1, D) and a zero mask
    (1,) (padded into a batch, it is ``null_condition``)."""
    import torch

    return torch.zeros(1, hidden_size, dtype=dtype or torch.float32), torch.zeros(1, dtype=torch.long)


def drop_condition(hidden, mask, keep):
    """The null condition (zero states, zero mask) for the rows where ``keep`` (B,) bool is False
    (conditioning dropout when the text encoder trains and its states are made in the step)."""
    return hidden * keep[:, None, None].to(hidden.dtype), mask * keep[:, None]


def with_unconditional(hidden, mask):
    """Classifier-free guidance: the null condition appended as a second half of the batch, as
    transformers' generate() builds it (zeros of the same shape, zero mask)."""
    import torch

    return torch.cat([hidden, torch.zeros_like(hidden)],
                     dim=0), torch.cat([mask, torch.zeros_like(mask)], dim=0)


# --------------------------------------------------------------------------------------------
# The delay pattern
# --------------------------------------------------------------------------------------------
def build_delay_pattern(codes, lengths, info: ModelInfo):
    """Decoder inputs and labels for teacher forcing, with MusicGen's delay pattern.

    codes: LongTensor (B, K, T), right-padded; lengths: LongTensor (B,) valid frames per clip.
    Returns decoder_input_ids (B*K, S) and labels (B, S, K) with S = T + Kc - 1 (Kc = codebooks per
    channel).

    Codebook k (channel codebook c = k // 2 for stereo, whose codebooks interleave L/R) is delayed
    by c steps: labels[b, s, k] = codes[b, k, s - c] where 0 <= s - c < lengths[b], else -100. This
    is exactly what transformers' MusicgenForCausalLM.build_delay_pattern_mask +
    apply_delay_pattern_mask give on the codes with a BOS column prepended and max_length T + Kc,
    after dropping the BOS column (the special positions become -100), and it also masks each clip's
    batch padding. decoder_input_ids are the labels shifted right with the decoder start token first
    and the pad token wherever a label is -100 (transformers' shift_tokens_right), which is also
    what generate() feeds the decoder at the delay-pattern positions.
    """
    import torch

    if codes.dim() != 3:
        raise ValueError(f"codes must be (B, K, T), got shape {tuple(codes.shape)}")
    b, k, t = codes.shape
    if k != info.num_codebooks:
        raise ValueError(f"codes have {k} codebooks but the model uses {info.num_codebooks}")
    if t == 0:
        raise ValueError("codes have no frames (T = 0)")
    device = codes.device
    lengths = torch.as_tensor(lengths, device=device).long().clamp(0, t)
    kc = info.codebooks_per_channel
    s = t + kc - 1
    delay = torch.arange(k, device=device) // info.audio_channels if info.audio_channels == 2 else \
        torch.arange(k, device=device)
    pos = torch.arange(s, device=device)
    frame = pos[None, :] - delay[:, None]                                  # (K, S)
    valid = (frame[None] >= 0) & (frame[None] < lengths[:, None, None])    # (B, K, S)
    gathered = codes.long().gather(2, frame.clamp(0, t - 1)[None].expand(b, -1, -1))
    labels = torch.where(valid, gathered, torch.full_like(gathered, -100))  # (B, K, S)
    inputs = torch.full_like(labels, info.pad_token_id)
    inputs[..., 1:] = labels[..., :-1]
    inputs = inputs.masked_fill(inputs == -100, info.pad_token_id)
    inputs[..., 0] = info.decoder_start_token_id
    return inputs.reshape(b * k, s), labels.transpose(1, 2).contiguous()


def generation_pattern(model: nn.Module, ids, pad_token_id: int, max_length: int):
    """transformers' ``build_delay_pattern_mask`` for decoding: (prefix ids the decoder reads first,
    the whole (B*K, max_length) pattern with -1 where a token is still to be generated)."""
    return get_base(model).decoder.build_delay_pattern_mask(ids, pad_token_id=pad_token_id,
                                                            max_length=max_length)


def frames_from_pattern(seq, n_frames: int, info: ModelInfo):
    """(B*K, Kc + n) delay-patterned ids -> (B, K, n) frames: the row of a codebook with delay d
    holds its frames at positions d+1 .. d+n (stereo: left/right codebooks are interleaved and share
    a delay)."""
    import torch

    K = info.num_codebooks
    seq = seq.view(-1, K, seq.shape[-1])
    rows = []
    for k in range(K):
        d = k // info.audio_channels  # mono: d = k; stereo: rows 2c and 2c+1 have delay c
        rows.append(seq[:, k, d + 1: d + 1 + n_frames])
    return torch.stack(rows, dim=1)


# --------------------------------------------------------------------------------------------
# The teacher-forced forward and the loss
# --------------------------------------------------------------------------------------------
def teacher_forced_logits(model: nn.Module, info: ModelInfo, codes, lengths, hidden, mask,
                          autocast=contextlib.nullcontext):
    """The one teacher-forced forward: delay-pattern inputs and labels from the codes (B, K, T) and
    their valid lengths (B,), the decoder run on the conditioning of the text states (``condition``)
    under ``autocast`` (a context-manager factory, e.g. ``Accelerator.autocast``). Returns (logits
    (B*K, S, V), labels (B, S, K))."""
    dec_in, labels = build_delay_pattern(codes, lengths, info)
    with autocast():
        logits = model(**condition(hidden, mask), decoder_input_ids=dec_in).logits
    return logits, labels


@dataclass
class CodebookLoss:
    """The cross-entropy of one batch, reduced the ways its users need it.

    ``loss``: the training objective (as transformers / audiocraft): the mean over tokens with a
    label in each codebook, then the mean over codebooks. ``per_codebook`` (K,) those means
    (detached), ``tokens`` (K,) their token counts. ``per_clip()``: summed cross-entropy (float64)
    and token counts per clip and codebook (B, K), so means over any set of clips are exact: CE of
    codebook k = sums[:, k].sum() / tokens[:, k].sum()."""

    loss: object
    per_codebook: object
    tokens: object
    # (B, K, S) float32 per-token cross-entropy (0 where there is no label), detached
    ce: object
    valid: object   # (B, K, S) bool: tokens with a label

    def per_clip(self):
        return (self.ce.double() * self.valid).sum(dim=-1), self.valid.sum(dim=-1)


def codebook_loss(logits, labels) -> CodebookLoss:
    """The one loss: per-token cross-entropy of the logits (B*K, S, V) as the model returns them
    against the labels (B, S', K), -100 = no loss (S' <= S: the last S' logits are scored, as
    transformers does). Computed in float32 (safe under autocast). A codebook without any valid
    token contributes 0 to ``loss``."""
    import torch.nn.functional as F

    b, s, k = labels.shape
    v = logits.shape[-1]
    # One cross-entropy over all codebooks (B, K, s) in the logits' own layout: no per-codebook
    # strided copies of the logits, and one gradient tensor in backward instead of K zero-filled
    # full-size ones.
    logits = logits.reshape(b, k, -1, v)
    # (slicing the whole length would still cost a zero-filled gradient copy)
    if logits.shape[2] != s:
        logits = logits[:, :, -s:]
    logits = logits.float()
    lab = labels.permute(0, 2, 1)  # (B, K, s)
    ce = F.cross_entropy(logits.reshape(-1, v), lab.reshape(-1), ignore_index=-100,
                         reduction="none").view(b, k, s)
    counts = (labels != -100).sum(dim=(0, 1))
    per_t = ce.sum(dim=(0, 2)) / counts.clamp(min=1)
    return CodebookLoss(loss=per_t.mean(), per_codebook=per_t.detach(), tokens=counts.long(),
                        ce=ce.detach(), valid=lab != -100)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def cached_step(model: nn.Module, hidden, mask, ids, cache):
    """One decoder call with transformers' own key/value cache: ids (rows, n) -> (logits of the last
    position (rows, V), the cache to pass next time; None the first time)."""
    out = get_base(model)(**condition(hidden, mask), decoder_input_ids=ids, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache
