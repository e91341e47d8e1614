"""The melody of melody models (musicgen-melody) from demucs stems, as audiocraft computes it.

audiocraft's ``ChromaStemConditioner`` (audiocraft/modules/conditioners.py, ``_get_stemmed_wav``)
does not take the chroma of the mix: it separates the audio with htdemucs (``apply_model`` on the
audio at demucs' rate and channels, not normalised), keeps the ``vocals`` and ``other`` stems (drums
and bass removed: they would dominate the chroma), sums them, mixes to mono at the model's rate, and
only then computes the chroma. The released melody weights learned from that chroma, and audiocraft
separates the tune given at generation the same way. ``model.melody_chroma`` chooses: ``stems``
(this), ``mix`` (the chroma of the mix, the documented fallback), ``auto`` (stems when demucs is
installed and ``model.separation_model`` can be had, else the mix, said in the log). One difference
is deliberate: ``shifts=0`` (audiocraft's default ``shifts=1`` adds a random time shift), so a clip's
cached chroma does not depend on chance.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import numpy as np

from lora.common.cli import UserError, log
from lora.common.files import atomic_path
from lora.dataprep import audio as A
from lora.dataprep import separation as S
from lora.modeling import chroma

MELODY_STEMS = ("vocals", "other")  # audiocraft's ChromaStemConditioner.stem_indices


def melody_separator(model_cfg) -> Optional[S.Separator]:
    """The separator the melody's chroma comes from, or None for the chroma of the mix."""
    mode = getattr(model_cfg, "melody_chroma", "mix")
    if mode == "mix":
        return None
    if mode == "auto" and importlib.util.find_spec("demucs") is None:
        log.info("melody chroma: from the mix (demucs is not installed; bash install.sh --separation "
                 "computes it from the stems, as audiocraft does)")
        return None
    try:
        files = S.separator_files(model_cfg.separation_model, local_files_only=model_cfg.local_files_only)
        sep = S.load_separator(files)
    except UserError as e:
        if mode == "stems":
            raise UserError(f"model.melody_chroma stems: {e}") from None
        log.warning("melody chroma: from the mix, the fallback (the separation model is not available: "
                    "%s)", str(e).splitlines()[0][:300])
        return None
    missing = [s for s in MELODY_STEMS if s not in sep.sources]
    if missing:
        raise UserError(f"model.separation_model {model_cfg.separation_model} has no "
                        f"{', '.join(missing)} stem: the melody needs {' + '.join(MELODY_STEMS)}.")
    log.info("melody chroma: from the %s stems of %s (as audiocraft), on %s", " + ".join(MELODY_STEMS),
             model_cfg.separation_model, sep.device)
    return sep


def chroma_source(sep: Optional[S.Separator]) -> str:
    """What a chroma was computed from: "mix", or "stems-<separation model identity>"."""
    return "mix" if sep is None else f"stems-{sep.files.identity}"


def melody_wave(sep: S.Separator, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """The part of the audio (C, N) at ``sample_rate`` that holds the melody: demucs' vocals + other
    stems summed, mono, at ``sample_rate`` (1, N), as audiocraft's ``_get_stemmed_wav``."""
    import torch
    from demucs.apply import apply_model

    x = A.resample(A.mix_channels(np.asarray(wav, dtype=np.float32), sep.model.audio_channels),
                   sample_rate, sep.samplerate)
    stems = apply_model(sep.model, torch.from_numpy(np.ascontiguousarray(x))[None], shifts=0, split=True,
                        overlap=S.OVERLAP, device=sep.device)[0]
    keep = [sep.sources.index(s) for s in MELODY_STEMS]
    mono = stems[keep].sum(0).mean(0, keepdim=True).numpy()
    out = A.resample(mono, sep.samplerate, sample_rate)
    n = np.asarray(wav).shape[-1]
    return np.pad(out, ((0, 0), (0, max(0, n - out.shape[1]))))[:, :n]


def stem_chromas(clips: list, records: list, keys: list[str], root, info, sep: S.Separator,
                 show_progress: bool = True) -> tuple[list, int]:
    """Melody models with ``model.melody_chroma`` stems: each clip's chroma from its stems instead of
    its mix, kept in the token cache beside the shards (``chroma/<clip key>-<chroma_source>``: the
    clip key names the clip's bytes and the model, the source the separation model), computed for
    the clips that lack it. Returns (the clips with that chroma, how many were computed)."""
    import dataclasses
    from pathlib import Path

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    folder = Path(root) / "chroma"
    source = chroma_source(sep)
    found: dict[str, object] = {}
    todo: dict[str, object] = {}
    for r, key in zip(records, keys):
        path = folder / f"{key}-{source}.safetensors"
        if key in found or key in todo:
            continue
        try:
            found[key] = load_file(str(path))["chroma"] if path.is_file() else None
        except (SafetensorError, OSError, RuntimeError, KeyError) as e:
            log.warning("Cache file %s is unreadable (%s); computing it again.", path, e)
            found[key] = None
        if found[key] is None:
            del found[key]
            todo[key] = r
    for key, r in tqdm(todo.items(), desc="melody stems (demucs)", unit="clip", disable=not show_progress):
        wave = A.load_audio(r.path, info.sample_rate, info.audio_channels)
        c = chroma.chroma(melody_wave(sep, wave, info.sample_rate), info.sample_rate,
                          max_seconds=None).argmax(dim=-1).to(torch.int8)
        with atomic_path(folder / f"{key}-{source}.safetensors", suffix=".tmp") as tmp:
            save_file({"chroma": c.contiguous()}, str(tmp),
                      metadata={"source": str(r.audio), "chroma": source, "identity": str(info.identity)})
        found[key] = c
    return [dataclasses.replace(c, chroma=found[k]) for c, k in zip(clips, keys)], len(todo)
