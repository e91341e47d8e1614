"""The held-out likelihood of the evaluation: teacher-forced cross-entropy per codebook on the
held-out clips' cached tokens, for the base model (adapter disabled) and the LoRA model, and the
cluster bootstrap of their difference over recordings.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lora.common.cli import log
from lora.common.fields import ConfigError, load_yaml
from lora.config import Config
from lora.dataset import CachedTokenDataset, collate_tokens
from lora.modeling.adapter import (
    text_encoder_has_lora,
)
from lora.modeling.loading import family_for
from lora.modeling.window import checked_window, longest_caption
from lora.scoring import intervals, verdicts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo


# --------------------------------------------------------------------------------------------
# Held-out likelihood
# --------------------------------------------------------------------------------------------
def _model_context(model: nn.Module, which: str):
    """base: the adapter disabled (peft), same weights in memory; lora: as loaded."""
    if which == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def heldout_likelihood(model: nn.Module, clips, info: ModelInfo, max_frames: int, batch_size: int,
                       device: torch.device, processor=None) -> dict:
    """Teacher-forced per-clip, per-codebook CE on cached tokens (the first max_frames of every
    clip).

    With ``processor`` the captions are encoded by the model's own (possibly adapted) text encoder
    instead of using the cached base states."""
    import torch
    from tqdm.auto import tqdm

    fam = family_for(info)
    K = info.num_codebooks
    # (melody models: each clip's own melody)
    ds = CachedTokenDataset(clips, max_frames, train=False, info=info)
    lengths = ds.lengths()
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    ce_sum = np.zeros((len(ds), K))
    n_tok = np.zeros((len(ds), K), dtype=np.int64)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for b in tqdm(batches, desc="held-out likelihood", unit="batch", leave=False):
            batch = collate_tokens([ds[i] for i in b], info.pad_token_id)
            if processor is not None:
                hidden, mask = fam.encode_text(model, processor, batch["texts"], device=device)
            else:
                hidden, mask = batch["hidden"].to(device), batch["mask"].to(device)
            melody = {}
            if fam.MELODY:  # each clip at its own text length, as generation and training
                melody = {"chroma": batch["chroma"].to(device),
                          "text_lengths": fam.row_text_lengths(mask, batch.get("text_lengths"))}
            logits, labels = fam.teacher_forced_logits(model, info, batch["codes"].to(device),
                                                       batch["lengths"].to(device), hidden, mask,
                                                       **melody)
            s, n = fam.codebook_loss(logits, labels).per_clip()
            ce_sum[b] = s.cpu().numpy()
            n_tok[b] = n.cpu().numpy()
    per_cb = ce_sum.sum(0) / np.maximum(n_tok.sum(0), 1)
    clip_tokens = n_tok.sum(1)
    clip_ce = ce_sum.sum(1) / np.maximum(clip_tokens, 1)
    ce = float(per_cb.mean())
    return {
        "ce": ce, "ppl": float(math.exp(min(ce, 50.0))),
        "ce_per_codebook": per_cb.tolist(),
        "ppl_per_codebook": [float(math.exp(min(v, 50.0))) for v in per_cb],
        "n_clips": len(ds), "n_tokens": int(n_tok.sum()),
        "n_tokens_per_codebook": n_tok.sum(0).tolist(),
        "per_clip": [{"id": c.id, "ce": float(v), "tokens": int(t)} for c, v,
                     t in zip(clips, clip_ce, clip_tokens)],
    }


def likelihood_section(model: nn.Module, processor, info: ModelInfo, clips, cfg: Config,
                       models: list[str], device: torch.device,
                       cache_stats: dict, recordings: list, adapter=None) -> tuple[dict, str]:
    """Held-out likelihood of each model and (both evaluated) the paired cluster bootstrap of their
    difference over ``recordings`` (one key per clip: the recording it was cut from); returns (the
    results.json section, a note when the evidence is thin or None)."""
    seconds, window_source = heldout_window(cfg, adapter)
    max_frames = checked_window(seconds, info, model, key=f"training.max_duration of {window_source}",
                                **longest_caption(info, processor, [c.text for c in clips]))
    lk: dict = {"window_seconds": max_frames / info.frame_rate, "split": "valid", "cache": cache_stats,
                "n_clips": len(clips), "n_recordings": len(set(recordings)),
                "window": {"max_duration": seconds, "source": window_source, "frames": max_frames}}
    log.info("Held-out window %.2f s (training.max_duration from %s)", lk["window_seconds"],
             window_source)
    text_lora = text_encoder_has_lora(model)
    if text_lora:
        log.info("The adapter has LoRA layers in the text encoder: captions are encoded on the fly")
    lk["text_states"] = "encoded on the fly (adapter trains the text encoder)" if text_lora else "cached"
    for m in models:
        with _model_context(model, m):
            lk[m] = heldout_likelihood(model, clips, info, max_frames, cfg.training.batch_size, device,
                                       processor=processor if text_lora else None)
        log.info("%s model: held-out cross-entropy %.4f (perplexity %.2f) over %d clips, %d tokens",
                 m, lk[m]["ce"], lk[m]["ppl"], lk[m]["n_clips"], lk[m]["n_tokens"])
    if "base" not in models or "lora" not in models:
        return lk, None
    diff = likelihood_difference([c["ce"] for c in lk["base"]["per_clip"]],
                                 [c["ce"] for c in lk["lora"]["per_clip"]],
                                 [c["tokens"] for c in lk["base"]["per_clip"]], recordings,
                                 n_boot=cfg.evaluation.bootstrap_samples, seed=cfg.generation.seed,
                                 max_patterns=cfg.evaluation.permutations)
    lk["difference"] = diff
    alpha = verdicts.alphas(True, not cfg.evaluation.skip_generation)["likelihood"]
    return lk, thin_evidence_note(diff["n_clips"], diff["n_recordings"], alpha)


def likelihood_difference(base_ce, lora_ce, tokens, recordings, *, n_boot: int, seed: int,
                          max_patterns: int = verdicts.DEFAULT_PATTERNS) -> dict:
    """LoRA minus base held-out cross-entropy over clips (token-weighted), its cluster bootstrap
    interval and its sign-flip permutation test (lora.scoring.verdicts), both over recordings (one
    key per clip, None = a recording of its own): the units clips cut from one recording are not
    independent of each other."""
    diff = intervals.paired_bootstrap_ci(base_ce, lora_ce, weights=tokens, clusters=recordings,
                                         n_boot=n_boot, seed=seed)
    diff["n_clips"], diff["n_recordings"] = diff["n"], diff.pop("n_clusters")
    test = verdicts.sign_flip_test(base_ce, lora_ce, verdicts.unit_ids([[r] for r in recordings]),
                                   weights=tokens, max_patterns=max_patterns, seed=seed)
    diff.update(p_permutation=test["p"], n_patterns=test["n_patterns"], exact=test["exact"])
    diff["what"] = ("LoRA minus base held-out cross-entropy (token-weighted over clips); negative "
                    "= LoRA better. Cluster bootstrap interval and sign-flip permutation test: "
                    "whole recordings resampled / swapped (a clip without a source is its own "
                    "recording)")
    diff["ppl_ratio"] = float(math.exp(diff["diff"]))
    diff["excludes_zero"] = bool(diff["ci_high"] < 0 or diff["ci_low"] > 0)
    return diff


def thin_evidence_note(n_clips: int, n_recordings: int, alpha: float = verdicts.ALPHA) -> Optional[str]:
    """The note for a held-out set too small to name a winner (fewer recordings, the units the
    test swaps, than ``verdicts.min_units(alpha)``) or too small to trust its interval."""
    counts = (f"{n_recordings} held-out recording{'s' if n_recordings != 1 else ''} "
              f"({n_clips} held-out clip{'s' if n_clips != 1 else ''})")
    need = verdicts.min_units(alpha)
    if n_recordings < need:
        return (f"Only {counts}: the held-out likelihood cannot name a better model yet; it needs "
                f"at least {need} recordings ({need - n_recordings} more; clips of one recording "
                f"count once). Hold out clips from more recordings (prepare_data.py "
                f"--valid_fraction).")
    if n_recordings < 10:
        return (f"Only {counts}: the confidence interval of the likelihood difference is rough (a "
                f"bootstrap over few recordings is too narrow; the verdict comes from the "
                f"permutation test); hold out more recordings (prepare_data.py --valid_fraction).")
    return None


def heldout_window(cfg: Config, adapter=None) -> tuple[float, str]:
    """(seconds, where they come from) of the held-out window: training.max_duration of the
    adapter's own config.yaml (written by training into the adapter folder), so the evaluated window
    is the trained one; else config.yaml's training.max_duration (evaluate.py takes no training
    flags)."""
    if adapter:
        path = Path(adapter) / "config.yaml"
        value = None
        if path.is_file():
            try:
                training = load_yaml(path).get("training")
                value = training.get("max_duration") if isinstance(training, dict) else None
            except ConfigError as e:
                log.warning("The adapter's %s cannot be read (%s)", path, e)
            ok = isinstance(value, (int, float)) and not isinstance(value,
                                                                    bool) and math.isfinite(value) and value > 0
            if ok:
                return float(value), f"the adapter's training config ({path}: training.max_duration)"
            log.warning("%s has no usable training.max_duration (%r); the held-out window comes "
                        "from config.yaml", path, value)
        else:
            log.info("%s has no config.yaml; the held-out window comes from config.yaml", adapter)
    where = cfg.config_file or "no config file: the built-in default"
    return float(cfg.training.max_duration), f"config.yaml ({where}: training.max_duration)"
