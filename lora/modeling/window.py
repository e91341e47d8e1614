"""The one window rule: how many codec frames a window of so many seconds holds, and whether it fits the model.

Training (``training.max_duration``), validation, the evaluation's held-out window, test_model.py and generation
(``generation.max_window``) all turn seconds into a window's frames here, and all refuse a window that does not
fit with the same message, naming the setting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora.common.fields import ConfigError
from lora.modeling.loading import family_for
from lora.modeling.text_padding import TEXT_PAD_MULTIPLE, text_length

if TYPE_CHECKING:
    from torch import nn

    from lora.modeling.musicgen import ModelInfo


def window_frames(seconds: float, info: ModelInfo) -> int:
    """Codec frames in a window of ``seconds`` (rounded to the nearest frame)."""
    return int(round(float(seconds) * info.frame_rate))


def max_window_frames(info: ModelInfo, model: nn.Module, prefix: int = 0) -> int:
    """The longest window the decoder's positions hold: the delay pattern adds one position per codebook of a
    channel but the first, so a window of F frames takes F + K - 1 positions, after the ``prefix`` positions of
    a condition the decoder reads in front of the audio (none for MusicGen: its text is cross-attended)."""
    return family_for(info).max_positions(model) - prefix - info.codebooks_per_channel + 1


def checked_window(seconds: float, info: ModelInfo, model: nn.Module, key: str = "training.max_duration",
                   text_length: int = 0, caption: str = "") -> int:
    """``window_frames`` of ``seconds``, or a ConfigError naming ``key`` when the window holds no frame or is
    longer than the model's context. A melody model reads its condition before the audio
    (``prefix_positions``: chroma_length melody frames and the caption's padded ``text_length``), so its window
    is checked after that prefix; ``caption`` says whose caption (the longest), for the message."""
    frames = window_frames(seconds, info)
    if frames < 1:
        raise ConfigError(f"{key} {seconds} s is shorter than one codec frame of this model "
                          f"({1 / info.frame_rate:g} s); use a few seconds or more (30 is MusicGen's).")
    prefix = family_for(info).prefix_positions(info, text_length)
    longest = max_window_frames(info, model, prefix)
    if frames > longest:
        if not prefix:
            raise ConfigError(f"{key} {seconds} s is longer than the model's context "
                              f"({longest / info.frame_rate:.1f} s); lower it (30 is MusicGen's).")
        short = max_window_frames(info, model, family_for(info).prefix_positions(info, TEXT_PAD_MULTIPLE))
        raise ConfigError(
            f"{key} {seconds} s does not fit: this melody model reads {prefix} positions before the audio "
            f"({info.chroma_length} melody frames + {text_length} text positions for "
            f"{caption or 'the caption'}), which leaves {longest / info.frame_rate:.1f} s of its "
            f"{family_for(info).max_positions(model)} positions. Lower {key} to "
            f"{math.floor(10 * longest / info.frame_rate) / 10:g} s or less, or shorten the caption "
            f"(captions of up to {TEXT_PAD_MULTIPLE} tokens leave {short / info.frame_rate:.1f} s).")
    return frames


def longest_caption(info: ModelInfo, processor, texts) -> dict:
    """The keyword arguments of ``checked_window`` for windows conditioned on ``texts``: for a melody
    model the padded length of the longest caption in tokens (as the decoder reads it:
    ``text_length``) and what it is; nothing for MusicGen (its text takes no decoder position)."""
    if not family_for(info).MELODY:
        return {}
    texts = [str(t) for t in texts] or [""]
    counts = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]
    i = max(range(len(texts)), key=counts.__getitem__)
    return {"text_length": text_length(counts[i]), "caption": f"the caption {short_text(texts[i])} "
                                                              f"({counts[i]} tokens)"}


def short_text(text: str, n: int = 60) -> str:
    """A caption in a message: quoted, cut at ``n`` characters."""
    return repr(text[:n].rstrip() + ("..." if len(text) > n else ""))
