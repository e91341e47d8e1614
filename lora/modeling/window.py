"""The one window rule: how many codec frames a window of so many seconds holds, and whether it fits the model.

Training (``training.max_duration``), validation, the evaluation's held-out window, test_model.py and generation
(``generation.max_window``) all turn seconds into a window's frames here, and all refuse a window that does not
fit with the same message, naming the setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora.common.fields import ConfigError
from lora.modeling.loading import family_for

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
                   prefix: int = 0) -> int:
    """``window_frames`` of ``seconds``, or a ConfigError naming ``key`` when the window holds no frame or is
    longer than the model's context (after ``prefix`` positions, as ``max_window_frames``)."""
    frames = window_frames(seconds, info)
    if frames < 1:
        raise ConfigError(f"{key} {seconds} s is shorter than one codec frame of this model "
                          f"({1 / info.frame_rate:g} s); use a few seconds or more (30 is MusicGen's context).")
    longest = max_window_frames(info, model, prefix)
    if frames > longest:
        raise ConfigError(f"{key} {seconds} s is longer than the model's context ({longest / info.frame_rate:.1f} "
                          f"s); lower it (30 is MusicGen's).")
    return frames
