"""The MusicGen-Melody model family (``model_type`` ``musicgen_melody``): a sibling of
``lora.modeling.musicgen`` with the same names, for ``facebook/musicgen-melody``, ``-melody-large``
and ``-stereo-melody(-large)``.

What differs from MusicGen, read from transformers' ``models/musicgen_melody`` (5.24):

* **Conditioning is a prefix, not cross-attention.** The decoder reads ``cat([melody, text])``
  before the audio tokens under one causal mask: ``melody`` = ``audio_enc_to_dec_proj(chroma)``
  (chroma: one-hot (T, 12), see ``lora.modeling.chroma``) tiled with ``repeat`` to ``chroma_length``
  frames and cut there; ``text`` = ``enc_to_dec_proj(T5 states) * mask``. No mask is passed on, so
  masked text positions are zero vectors that the decoder still attends to: the text length is part
  of the condition (it moves the positions of the tokens).
* **The null condition** (classifier-free guidance, and what ``generate`` uses when no melody is
  given): the melody is a one-hot on bin 0 (projected, so it is ``W[:, 0] + b``, not zero); the text
  is zeros of the same length as the conditional text.
* The decoder has no cross-attention, so LoRA goes on its self-attention (and optionally the
  feed-forward block and the two projections of the prefix).
* The loss scores only the audio positions: the logits are the last S of prefix + S positions
  (``lora.modeling.musicgen.codebook_loss`` already scores the last S).

The codec, the text encoder, the delay pattern and the loss are MusicGen's and are shared with
``lora.modeling.musicgen``. Functions that take the conditioning take the chroma as ``chroma``: a
float tensor (B, Tc, 12) or None for the null melody.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from lora.common.cli import log
from lora.modeling import musicgen
from lora.modeling.fast_decode import PrefixStaticDecoder
from lora.modeling.musicgen import (  # noqa: F401  (the shared parts of the family interface)
    CodebookLoss,
    attention_implementation,
    audio_codec,
    build_delay_pattern,
    codebook_loss,
    codec_latents,
    compile_decoder,
    decode_audio,
    decoder,
    decoder_param,
    drop_condition,
    encode_audio,
    encode_text,
    frames_from_pattern,
    generation_pattern,
    get_base,
    lm_heads,
    max_positions,
    null_text_states,
    set_decoder_dropout,
    text_encoder_of,
    with_unconditional,
)
from lora.modeling.text_padding import TEXT_PAD_MULTIPLE, text_length  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_TYPE = "musicgen_melody"
MELODY = True  # conditioned on text and a melody (the chroma of a clip / a melody file)
# What a melody family provides beyond MusicGen's interface (called only where ``fam.MELODY`` is
# true).
MELODY_INTERFACE = ("melody_frames", "null_like", "pad_text", "dropped_text",
                    "with_unconditional_melody", "row_text_lengths")


@dataclass
class ModelInfo(musicgen.ModelInfo):
    """MusicGen's ModelInfo plus the melody condition's size."""

    model_type: str = MODEL_TYPE
    # prefix frames of the melody (30 s at 7.8125 frames/s for the released models)
    chroma_length: int = 235
    num_chroma: int = 12


def from_pretrained(path: str, attn: str, **kw):
    """``MusicgenMelodyForConditionalGeneration.from_pretrained`` with the decoder's attention
    kernel set."""
    from transformers import MusicgenMelodyForConditionalGeneration as Model

    if attn == "eager":
        return Model.from_pretrained(path, attn_implementation="eager", **kw)
    try:
        return Model.from_pretrained(path, attn_implementation={"decoder": attn}, **kw)
    except (ValueError, ImportError) as e:
        if "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        log.info("attn_implementation=%s is not available here (%s); falling back to eager "
                 "attention", attn, str(e).splitlines()[0][:200])
        return Model.from_pretrained(path, attn_implementation="eager", **kw)


class TextProcessor:
    """What the toolkit needs of a processor for a melody model: its tokenizer (``.tokenizer``, and
    called with ``text=`` like a processor). transformers' MusicgenMelodyProcessor cannot be built
    without torchaudio (its feature extractor's spectrogram); the chroma is computed by
    ``lora.modeling.chroma`` instead."""

    def __init__(self, tokenizer, feature_extractor_config: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.feature_extractor_config = feature_extractor_config

    def __call__(self, text=None, **kw):
        return self.tokenizer(text, **kw)

    def save_pretrained(self, directory, **kw):
        """The tokenizer files and the model's preprocessor_config.json (the chroma settings), as
        the hub folders have them, so a saved folder (e.g. an export) loads like the one it came
        from."""
        import json
        from pathlib import Path

        out = self.tokenizer.save_pretrained(directory, **kw)
        if self.feature_extractor_config is not None:
            (Path(directory) / "preprocessor_config.json").write_text(
                json.dumps(self.feature_extractor_config, indent=2) + "\n", encoding="utf-8")
        return out


def load_processor(path: str, **kw) -> TextProcessor:
    """The tokenizer, plus the folder's preprocessor_config.json kept as it is (the extractor itself
    needs torchaudio; lora.modeling.chroma computes the same features)."""
    import json

    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    fe_file = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                          **{k: v for k, v in kw.items()
                             if k in ("revision", "local_files_only", "cache_dir",
                                                                  "token")})
    fe = json.loads(open(fe_file, encoding="utf-8").read()) if fe_file else None
    return TextProcessor(AutoTokenizer.from_pretrained(path, **kw), fe)


def model_info(model: nn.Module, name_or_path: str, identity: str,
               hub_revision: Optional[str] = None) -> ModelInfo:
    common = musicgen.model_info(model, name_or_path, identity, hub_revision).to_dict()
    cfg = get_base(model).config
    common.update(model_type=MODEL_TYPE, chroma_length=int(cfg.chroma_length),
                  num_chroma=int(cfg.num_chroma))
    return ModelInfo(**common)


def config_from_musicgen(config, chroma_length: int = 235, num_chroma: int = 12):
    """A MusicgenMelodyConfig with the codec, text encoder and decoder sizes of a MusicgenConfig
    (the tiny melody models are the tiny MusicGens made melody models)."""
    from transformers import MusicgenMelodyConfig, MusicgenMelodyDecoderConfig

    dec = config.decoder.to_dict()
    keep = ("vocab_size", "max_position_embeddings", "num_hidden_layers", "ffn_dim",
            "num_attention_heads",
            "hidden_size", "num_codebooks", "audio_channels", "dropout", "attention_dropout",
            "activation_dropout",
            "activation_function", "layerdrop", "scale_embedding", "tie_word_embeddings",
            "pad_token_id", "bos_token_id", "decoder_start_token_id")
    dec_cfg = MusicgenMelodyDecoderConfig(**{k: dec[k] for k in keep})
    return MusicgenMelodyConfig(text_encoder=config.text_encoder.to_dict(),
                                audio_encoder=config.audio_encoder.to_dict(), decoder=dec_cfg.to_dict(),
                                num_chroma=num_chroma, chroma_length=chroma_length)


# --------------------------------------------------------------------------------------------
# The parts of the model
# --------------------------------------------------------------------------------------------
def _projections(model: nn.Module) -> list:
    base = get_base(model)
    return [m
            for m in (getattr(base, "audio_enc_to_dec_proj", None),
                      getattr(base, "enc_to_dec_proj", None))
            if m is not None]


def decoder_modules(model: nn.Module) -> list:
    """The decoder and the two projections into its width that build the prefix: what every step
    runs."""
    return [get_base(model).decoder, *_projections(model)]


def parameter_counts(model: nn.Module) -> dict:
    base = get_base(model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"decoder": count(base.decoder) + sum(count(m) for m in _projections(model)),
            "text encoder": count(base.text_encoder), "EnCodec": count(base.audio_encoder)}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    musicgen.enable_gradient_checkpointing(model)


# --------------------------------------------------------------------------------------------
# Where LoRA may go
# --------------------------------------------------------------------------------------------
_ATTN_PROJ = r"(?:q_proj|k_proj|v_proj|out_proj)"
_LAYER = r"decoder\.model\.decoder\.layers\.\d+\."
_PREFIX_PROJ = r"(?:audio_enc_to_dec_proj|enc_to_dec_proj)"
LORA_PRESETS = {
    # The decoder's self-attention (there is no cross-attention: the condition is a prefix).
    "attention": rf"{_LAYER}self_attn\.{_ATTN_PROJ}",
    # ... plus the feed-forward block.
    "attention_ffn": rf"{_LAYER}(?:self_attn\.{_ATTN_PROJ}|fc1|fc2)",
    # ... plus the projections of the melody and the text into the decoder's width.
    "attention_ffn_proj": rf"(?:{_LAYER}(?:self_attn\.{_ATTN_PROJ}|fc1|fc2)|{_PREFIX_PROJ})",
}
LORA_PRESETS_HELP = ("'attention' (self-attention q/k/v/out), 'attention_ffn' (+ fc1/fc2), "
                     "'attention_ffn_proj' (+ the melody and text projections)")
LORA_SEARCH_PREFIX = ("decoder.", "audio_enc_to_dec_proj", "enc_to_dec_proj")
LORA_EXAMPLE_LAYER = musicgen.LORA_EXAMPLE_LAYER
DECODER_NAME = "MusicGen-Melody decoder"
TEXT_ENCODER_TARGETS = musicgen.TEXT_ENCODER_TARGETS
DECODER_SHAPE_KEYS = musicgen.DECODER_SHAPE_KEYS


def decoder_shape(config) -> dict:
    """The decoder's architecture plus the melody prefix's (an adapter on the projections depends on
    them)."""
    shape = musicgen.decoder_shape(config)
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    shape.update(num_chroma=get("num_chroma"), chroma_length=get("chroma_length"))
    return shape


# --------------------------------------------------------------------------------------------
# The melody and the prefix
# --------------------------------------------------------------------------------------------
def _chroma_config(model: nn.Module) -> tuple[int, int]:
    cfg = get_base(model).config
    return int(cfg.chroma_length), int(cfg.num_chroma)


def null_melody(batch: int, num_chroma: int = 12, device: torch.device | None = None, dtype=None):
    """The null melody: one frame with bin 0 set, (B, 1, num_chroma), as generate() builds it."""
    import torch

    x = torch.zeros((batch, 1, num_chroma), device=device, dtype=dtype or torch.float32)
    x[:, :, 0] = 1
    return x


def null_like(chroma):
    """The null melody in the shape of ``chroma`` (every frame bin 0): what generate() pairs with a
    melody."""
    import torch

    null = torch.zeros_like(chroma)
    null[..., 0] = 1
    return null


def melody_frames(indices, chroma_length: int):
    """A clip's chroma as the cache holds it (pitch-class index per frame, (T,)) -> the one-hot
    (chroma_length,
    12) the model reads: tiled with ``repeat`` up to chroma_length frames and cut there, as
        transformers does
    after projecting (the projection acts per frame, so tiling before it is the same)."""
    import torch

    one_hot = torch.nn.functional.one_hot(indices.long(), 12).float()
    if one_hot.shape[0] < chroma_length:
        one_hot = one_hot.repeat(int(math.ceil(chroma_length / one_hot.shape[0])), 1)
    return one_hot[:chroma_length]


def melody_states(model: nn.Module, chroma):
    """Projected melody (B, chroma_length, H): ``audio_enc_to_dec_proj(chroma)`` tiled with
    ``repeat`` up to ``chroma_length`` frames and cut there (transformers' forward / generate)."""
    length, _ = _chroma_config(model)
    proj = getattr(get_base(model), "audio_enc_to_dec_proj", None)
    x = proj(chroma.to(next(proj.parameters()).dtype)) if proj is not None else chroma
    if x.shape[1] < length:
        x = x.repeat(1, int(math.ceil(length / x.shape[1])), 1)
    return x[:, :length]


def text_states(model: nn.Module, hidden, mask):
    """Projected text (B, L, H) = ``enc_to_dec_proj(hidden) * mask``: masked positions are zero
    vectors."""
    proj = getattr(get_base(model), "enc_to_dec_proj", None)
    if proj is not None:
        hidden = proj(hidden.to(next(proj.parameters()).dtype))
    return hidden * mask[..., None].to(hidden.dtype)


def prefix(model: nn.Module, hidden, mask, chroma=None):
    """The decoder's conditioning prefix (B, chroma_length + L, H) = cat([melody, text]); ``chroma``
    None is the null melody."""
    import torch

    if chroma is None:
        chroma = null_melody(hidden.shape[0], _chroma_config(model)[1], device=hidden.device)
    chroma = chroma.to(hidden.device)
    return torch.cat([melody_states(model, chroma), text_states(model, hidden, mask)], dim=1)


def prefix_positions(info: ModelInfo, text_length: int = 0) -> int:
    """Decoder positions the prefix takes before the audio: chroma_length melody frames and the
    caption's padded text length (``text_length``)."""
    return int(info.chroma_length) + int(text_length)


def condition(model: nn.Module, hidden, mask, chroma=None) -> dict:
    """The keyword arguments of ``MusicgenMelodyForConditionalGeneration.forward`` for cached text
    states: the prefix built here (passing ``encoder_hidden_states`` makes transformers skip its own
    chroma block)."""
    return {"encoder_hidden_states": prefix(model, hidden, mask, chroma)}


def null_condition(batch: int, info: ModelInfo, length: int = 1, device: torch.device | None = None,
                   dtype=None):
    """Null text (zero states, zero mask) of ``length`` positions: generate's null has the
    conditional text's length, which here changes the decoder's input (not only its mask)."""
    import torch

    dtype = dtype or torch.float32
    hidden = torch.zeros((batch, length, info.text_hidden_size), device=device, dtype=dtype)
    return hidden, torch.zeros((batch, length), device=device, dtype=torch.long)


def pad_text(hidden, mask):
    """One clip's text states (L, D) / (L,) zero-padded (mask 0) to ``text_length`` of its tokens,
    the length generation gives the same caption. Padded positions are zero vectors in the prefix,
    which the decoder attends to, so training and generation must agree on them."""
    import torch

    n = int(hidden.shape[0])
    L = text_length(n)
    if L == n:
        return hidden, mask
    h = torch.zeros((L, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
    m = torch.zeros((L,), dtype=mask.dtype, device=mask.device)
    h[:n], m[:n] = hidden, mask
    return h, m


def dropped_text(hidden, mask):
    """A clip's text states when its condition is dropped in training: zeros of the same length,
    mask 0 (exactly the unconditional half of generate(), whose null text has the conditional text's
    length)."""
    import torch

    return torch.zeros_like(hidden), torch.zeros_like(mask)


def drop_melody_condition(hidden, mask, keep, chroma, keep_melody=None):
    """Conditioning dropout on a batch: rows where ``keep`` is False get the null text (zeros, zero
    mask, same length) and the null melody; rows where only ``keep_melody`` is False keep their text
    and get the null melody (audiocraft's attribute dropout on the melody). Returns (hidden, mask,
    chroma)."""
    import torch

    hidden, mask = drop_condition(hidden, mask, keep)
    melody_on = keep if keep_melody is None else keep & keep_melody
    return hidden, mask, torch.where(melody_on[:, None, None], chroma, null_like(chroma))


def with_unconditional_melody(chroma):
    """The melody of classifier-free guidance's two halves: ``chroma`` then the null melody (as
    generate())."""
    import torch

    return torch.cat([chroma, null_like(chroma)], dim=0)


# --------------------------------------------------------------------------------------------
# The teacher-forced forward, and decoding with transformers' cache
# --------------------------------------------------------------------------------------------
def row_text_lengths(mask, given=None) -> list[int]:
    """Each row's padded text length: ``given`` (the batch's ``text_lengths``, from the items:
    a dropped caption keeps its length with a zero mask) or else ``text_length`` of the row's
    tokens (the mask of captions encoded on the fly, before any dropout)."""
    if given is not None:
        return [int(n) for n in given]
    return [text_length(int(n)) for n in mask.sum(dim=-1)]


def _text_to(hidden, mask, length: int):
    """Text states (B, L, D) / (B, L) cut or zero-padded to ``length`` positions (the positions cut
    are padding: every row of the group has at most ``length`` tokens)."""
    import torch.nn.functional as F

    n = hidden.shape[1]
    if n >= length:
        return hidden[:, :length], mask[:, :length]
    return F.pad(hidden, (0, 0, 0, length - n)), F.pad(mask, (0, length - n))


def teacher_forced_logits(model: nn.Module, info: ModelInfo, codes, lengths, hidden, mask,
                          autocast=contextlib.nullcontext, chroma=None, text_lengths=None):
    """As ``lora.modeling.musicgen.teacher_forced_logits``, with the melody prefix; ``codebook_loss``
    scores the last S positions (the audio), as transformers' loss does.

    ``text_lengths`` (one per row; training, validation and the evaluation pass
    ``row_text_lengths``): each clip reads its text at its own padded length, the length generation
    gives the caption. In a prefix model the padded positions are attended and move the audio's
    positions, so a clip padded to a longer caption of its batch would be another condition (its
    loss would depend on the batch). Rows of one length share a forward; a batch of several lengths
    runs one forward per length and returns the logits of the S audio positions only. None: the
    text as given, one length for the batch (transformers' forward)."""
    import torch

    dec_in, labels = build_delay_pattern(codes, lengths, info)
    L = [int(hidden.shape[1])] * codes.shape[0] if text_lengths is None else [int(n) for n in text_lengths]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(L):
        groups.setdefault(n, []).append(i)
    if len(groups) == 1 and hidden.shape[1] == L[0]:
        with autocast():
            logits = model(**condition(model, hidden, mask, chroma), decoder_input_ids=dec_in).logits
        return logits, labels
    B, S = codes.shape[0], dec_in.shape[-1]
    ids = dec_in.view(B, -1, S)
    parts, order = [], []
    for n, rows in groups.items():
        idx = torch.tensor(rows, device=hidden.device)
        h, m = _text_to(hidden[idx], mask[idx], n)
        c = None if chroma is None else chroma[idx.to(chroma.device)]
        with autocast():
            out = model(**condition(model, h, m, c),
                        decoder_input_ids=ids[idx.to(ids.device)].reshape(-1, S)).logits
        parts.append(out[:, -S:].reshape(len(rows), -1, S, out.shape[-1]))
        order += rows
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(B)
    logits = torch.cat(parts)[inverse.to(parts[0].device)]
    return logits.reshape(-1, S, logits.shape[-1]), labels


def cached_step(model: nn.Module, hidden, mask, ids, cache, chroma=None):
    """One decoder call with transformers' cache: the prefix goes in only on the first call (cache
    None), as in transformers' ``prepare_inputs_for_generation``. Returns (logits of the last
    position, the cache)."""
    kw = condition(model, hidden, mask, chroma) if cache is None else {}
    out = get_base(model)(**kw, decoder_input_ids=ids, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache


def StaticDecoder(base, hidden, mask, rows: int, max_len: int, cuda_graph: bool = False, chroma=None):
    """The static-cache decoding step (lora.modeling.fast_decode) for the melody prefix: the prefix
    of ``hidden``, ``mask`` and ``chroma`` (rows already doubled for guidance) fills positions 0 ..
    P-1 at prefill, then tokens follow."""
    import torch

    with torch.no_grad():
        p = prefix(base, hidden, mask, chroma)
    return PrefixStaticDecoder(base.decoder, p, rows=rows, max_len=max_len, cuda_graph=cuda_graph)
