"""CLAP (transformers' ``ClapModel``): loading a hub id or local folder, its 10-second audio windows
and normalised embeddings. Shared by the evaluation's text-audio score (lora.scoring) and the
auto-captions of prepare_data (lora.dataprep.autocaption).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from lora.common.cli import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

CLAP_SAMPLE_RATE = 48000


def load_clap(path: str, *, device: "torch.device | str" = "cpu", local_files_only: bool = False,
              what: str = "a CLAP model"):
    """(model, processor) of a transformers CLAP folder or hub id, in eval mode on ``device``;
    UserError naming it when it cannot be loaded."""
    from transformers import ClapModel, ClapProcessor

    try:
        model = ClapModel.from_pretrained(path, local_files_only=local_files_only).to(device).eval()
        processor = ClapProcessor.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load {what} from {path} ({str(e).splitlines()[0][:300]}). It must "
                        f"be a transformers CLAP folder (config.json, weights, tokenizer and "
                        f"preprocessor files) or a hub id; offline, download it once with hf download "
                        f"ID --local-dir FOLDER and pass the folder.") from None
    return model, processor


def audio_windows(wav, sample_rate: int, *, target_rate: int = CLAP_SAMPLE_RATE,
                  window_seconds: float = 10.0, min_fraction: float = 0.5) -> list[np.ndarray]:
    """Mono mix resampled to target_rate (soxr) and cut into windows of window_seconds; a tail
    shorter than min_fraction of a window is dropped (unless it is the only audio), a longer one
    kept as it is (float32 arrays)."""
    import soxr

    y = np.asarray(wav, dtype=np.float64)
    y = (y[None] if y.ndim == 1 else y).mean(axis=0).astype(np.float32)
    if sample_rate != target_rate:
        y = soxr.resample(y, sample_rate, target_rate).astype(np.float32)
    L = int(round(window_seconds * target_rate))
    n_full, tail = divmod(len(y), L)
    wins = [y[i * L:(i + 1) * L] for i in range(n_full)]
    if tail and (tail >= min_fraction * L or n_full == 0):
        wins.append(y[n_full * L:])
    return wins


def clap_windows(wav, sample_rate: int, *, target_rate: int = CLAP_SAMPLE_RATE,
                 window_seconds: float = 10.0, min_fraction: float = 0.5) -> list[np.ndarray]:
    """The evaluation's CLAP windows: ``audio_windows`` (full windows, then a tail of at least
    min_fraction of a window, or the only audio). A kept tail stays at its own length: the CLAP
    feature extractor fills it to a window with ``padding="repeatpad"`` (the audio repeated, as
    CLAP was trained and as laion_clap and audiocraft's CLAP metric feed it), not with silence,
    which would lower every score (an 8-s clip would carry 2 s of it)."""
    return [w.astype(np.float32) for w in audio_windows(wav, sample_rate, target_rate=target_rate,
                                                        window_seconds=window_seconds,
                                                        min_fraction=min_fraction)]


def features(out):
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def text_embeddings(model: "nn.Module", processor, texts: Sequence[str]) -> "torch.Tensor":
    """Normalised text embeddings (N, D), tokenized as transformers' zero-shot audio pipeline does
    (padding, no truncation)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    tin = processor.tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = features(model.get_text_features(**{k: v.to(device) for k, v in tin.items()}))
    return F.normalize(out.float(), dim=-1).cpu()


def window_embeddings(model: "nn.Module", processor, windows: Sequence[np.ndarray]) -> "torch.Tensor":
    """Normalised audio embeddings (W, D) of 48-kHz windows, each featurised alone with the feature
    extractor's own settings (its padding of a short window included), exactly as transformers'
    zero-shot-audio-classification pipeline featurises one clip (so a window's scores equal the
    pipeline's)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    fe = processor.feature_extractor
    out = []
    for w in windows:
        ain = fe([np.asarray(w, dtype=np.float32)], sampling_rate=fe.sampling_rate, return_tensors="pt")
        with torch.no_grad():
            emb = features(model.get_audio_features(**{k: v.to(device) for k, v in ain.items()}))
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


def audio_scale(model: "nn.Module") -> float:
    """The factor of ``logits_per_audio`` (exp of the audio logit scale)."""
    return float(model.logit_scale_a.detach().exp())
