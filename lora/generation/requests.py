"""What a generation is asked and what it returns: sampling settings, requests, windows
(audiocraft's continuation plan) and results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lora.common.cli import UserError
from lora.config import field_problem


class GenerationError(UserError):
    """Generation produced something unusable (NaN/inf), or a request cannot be generated."""


# --------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are chosen. Defaults are MusicGen's (audiocraft): CFG 3, top-k 250, temperature
    1."""

    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    do_sample: bool = True

    def problems(self, where: str = "") -> list[str]:
        """Every setting outside the range the config schema declares for it (lora.config), plus the
        rule that sampling needs a temperature > 0."""
        w = f"{where}: " if where else ""
        p = [field_problem("generation", k, getattr(self, k), f"{w}{k}")
             for k in ("guidance_scale", "top_k", "top_p")]
        p.append(temperature_problem(self.temperature, self.do_sample, f"{w}temperature"))
        return [x for x in p if x]


def temperature_problem(temperature: float, do_sample: bool, label: str = "generation.temperature"):
    """Sampling needs a temperature > 0 (greedy decoding ignores it); None when the pair is fine."""
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        return (f"{label} must be > 0 (got {temperature:g}); 1 = the model's own distribution. For "
                f"deterministic output use do_sample: false.")
    return None


@dataclass
class Request:
    """One sample to generate: text (\"\" = unconditional), seed, total duration in seconds."""

    prompt: str
    seed: int
    duration: float
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # optional LongTensor (K, P): audio prompt to continue (its frames start the piece)
    prompt_codes: object = None
    # identifies prompt_codes (requests with different audio prompts never share a batch)
    prompt_id: str = ""
    # melody models: float one-hot chroma (Tm, 12) of the whole tune to follow
    # (lora.modeling.chroma); None = the null melody. A piece longer than one window extends the
    # tune periodically, as audiocraft does (lora.generation.engine.window_melody).
    melody: object = None
    # the tune's length in samples at the model's rate (0: Tm chroma hops)
    melody_samples: int = 0
    melody_id: str = ""          # identifies the melody (a hash of its chroma)
    # the melody's audio file and its content hash (sha1, for the manifest)
    melody_file: str = ""
    melody_sha1: str = ""
    melody_from: str = "mix"     # the chroma's source: the mix, or stems-<separation model identity>


@dataclass
class Window:
    """One pass of the decoder: ``context`` known frames (the prompt) followed by ``new`` generated
    frames, starting at frame ``start`` of the piece."""

    start: int
    context: int
    new: int


@dataclass
class Result:
    request: Request
    # float32 (channels, samples) at info.sample_rate, exactly duration long
    audio: np.ndarray
    # LongTensor (K, T) on CPU: the whole piece's tokens (audio prompt included)
    codes: object
    windows: list              # list[Window]
    # per window: LongTensor (K, context) the tokens it was prompted with (CPU)
    window_prompts: list
    # per window: LongTensor (K, context) the first frames that window output (= prompt)
    window_heads: list
    # seconds of wall time spent on this sample (its batch's time / batch size)
    generation_time: float
    batch_time: float          # wall time of the batch it was generated in, s
    batch_size: int
    # L: the text states' padded length the decoder cross-attended to (text_length)
    text_length: int = 0
    decoding: str = ""         # the decoder step used (resolve_decoding)


# --------------------------------------------------------------------------------------------
# Window planning (audiocraft's continuation)
# --------------------------------------------------------------------------------------------
def plan_windows(total: int, prompt: int, window: int, stride: int) -> list[Window]:
    """Windows that produce ``total`` frames, the first ``prompt`` of which are given: audiocraft's
    ``BaseGenModel._generate_tokens`` (audiocraft/models/genmodel.py) in frames.

    One window when everything fits in ``window`` frames: the whole prompt is its context. Otherwise
    window i starts at frame ``i * stride`` and spans ``min(window, total - i * stride)`` frames;
    the first is prompted with the whole audio prompt, each next one with the last ``window -
    stride`` frames of the window before it, and the windows go on while their context ends before
    ``total``. The prompt must be shorter than ``window`` and than ``total`` (audiocraft asserts it:
    ``LMModel.generate`` needs a frame to generate).
    """
    if not 0 < stride < window:
        raise ValueError(f"stride ({stride}) must be in (0, window={window})")
    if not 0 <= prompt < min(total, window):
        raise ValueError(f"the prompt ({prompt} frames) must be shorter than the piece ({total}) "
                         f"and the window ({window})")
    out = []
    offset, ctx = 0, prompt
    while offset + ctx < total:
        span = min(window, total - offset)
        out.append(Window(start=offset, context=ctx, new=span - ctx))
        ctx = span - stride
        offset += stride
    return out


def validate_request(r: Request, where: str = "") -> list[str]:
    """The request's duration and sampling settings against the ranges of the config schema."""
    w = f"{where}: " if where else ""
    p = [field_problem("generation", "duration", r.duration, f"{w}duration")]
    return [x for x in p if x] + r.sampling.problems(where)


def settings_dict(r: Request) -> dict:
    d = asdict(r.sampling)
    d["duration"] = r.duration
    return d
