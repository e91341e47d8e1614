"""The on-disk token cache: EnCodec codes and frozen text-encoder states, computed once and kept in
``data_dir/cache`` (``build_token_cache``); training and evaluation read tokens, never audio.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log
from lora.common.files import atomic_path
from lora.dataprep.audio import audio_info, file_hash, load_audio
from lora.dataprep.melody_stems import chroma_source, melody_wave
from lora.dataset import CachedClip, ClipRecord
from lora.modeling import chroma
from lora.modeling.encodec_fast import ENCODER_PRECISION
from lora.modeling.loading import family_for

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

# ============================================================================================
# Token cache: EnCodec codes and frozen text-encoder states, computed once and kept on disk.
#
# Layout (one safetensors file per clip / caption; loaded with safetensors, never pickle):
#     data_dir/cache/<model identity>-v<CACHE_VERSION>/codes/
#             <sha1 of clip file>-sr<rate>-ch<channels>-<precision>.safetensors
#         "codes": int16 (K, T)     clips are batched only with clips of the same length, never zero-padded
#                                   (EnCodec is not causal), so no clip's codes depend on another clip's audio;
#                                   <precision> is the encoder's (lora.modeling.encodec_fast.ENCODER_PRECISION:
#                                   "fp32", also in the file's metadata), so codes made in another precision are
#                                   never mixed in
#     data_dir/cache/<model identity>-v<CACHE_VERSION>/text/<sha1 of caption>.safetensors
#         "hidden": float32 (L, D)   T5 last_hidden_state (before the decoder's projection), valid tokens only
#         "mask":   int8 (L,)
# The model identity (lora.modeling.loading.model_identity) hashes the whole config, tokenizer, processor and
# weight files.
# A rerun reuses every file whose key still matches; a changed clip (new bytes -> new hash) or another model
# (new identity) is encoded again, and only that. Each file is written atomically (temp file + rename).
# ============================================================================================
# 2: no clip padded to its batch (version-1 codes of shorter clips depended on their batch);
CACHE_VERSION = 3


def cache_root(data_dir: str | Path, info: ModelInfo) -> Path:
    """The cache folder of one model: data_dir/cache/<model identity>-v<CACHE_VERSION>."""
    return Path(data_dir) / "cache" / f"{info.identity}-v{CACHE_VERSION}"


def _sha1_text(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _codes_path(root: Path, file_sha1: str, info: ModelInfo) -> Path:
    return root / "codes" / f"{file_sha1}-sr{info.sample_rate}-ch{info.audio_channels}-{ENCODER_PRECISION}.safetensors"


def _text_path(root: Path, text: str) -> Path:
    return root / "text" / f"{_sha1_text(text)}.safetensors"


def _save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".tmp") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})


def _load_tensors(path: Path) -> Optional[dict]:
    """Tensors of a cache file, or None when it is missing or unreadable (then it is simply
    re-encoded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        log.warning("Cache file %s is unreadable (%s); encoding it again.", path, e)
        return None


def warn_channel_mixing(paths: list[Path], info: ModelInfo) -> dict:
    """Say once when clips are mixed to the model's channel count: stereo clips for a mono model are
    mixed down, mono clips for a stereo model are copied to both channels (no real stereo to learn).
    Returns the counts."""
    from collections import Counter

    counts = Counter(audio_info(p).channels for p in paths)
    mixed = {c: n for c, n in counts.items() if c != info.audio_channels}
    for c, n in sorted(mixed.items()):
        if info.audio_channels == 1:
            how = f"{'stereo' if c == 2 else f'{c}-channel'} but the model is mono: they are mixed down to mono"
        else:
            how = ("mono but the model is stereo: each is copied to both channels, so there is no "
                   "stereo image to learn (prepare the data with --channels 2 from stereo sources)")
        log.warning("%d of %d clip(s) are %s", n, len(paths), how)
    return mixed


def _batches(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def equal_length_batches(waves, batch_size: int, max_waiting: Optional[int] = None):
    """Group (key, wave (C, N)) pairs into batches of at most ``batch_size`` whose waves all have
    the same N, so that no clip is ever zero-padded to a longer neighbour (EnCodec is not causal:
    padding changes the codes of a clip's last frames, so its codes would depend on its batch).
    Yields lists of pairs as soon as a length has a full batch; a length with fewer clips is encoded
    as a smaller batch (a length seen once: alone). At most ``max_waiting`` (default 2 x batch_size)
    clips wait in unfinished batches: past that the longest-waiting batch goes as it is, so memory
    stays bounded whatever order the clips come in."""
    size = max(1, int(batch_size))
    limit = max(size, int(max_waiting or 2 * size))
    # samples -> pairs (insertion order = the order lengths first came)
    waiting: dict[int, list] = {}
    count = 0
    for key, wave in waves:
        group = waiting.setdefault(int(wave.shape[-1]), [])
        group.append((key, wave))
        count += 1
        if len(group) == size:
            count -= len(group)
            yield waiting.pop(int(wave.shape[-1]))
        while count > limit:
            oldest = next(iter(waiting))
            count -= len(waiting[oldest])
            yield waiting.pop(oldest)
    yield from waiting.values()


def _loaded_waves(order: list[str], todo: dict[str, ClipRecord], info: ModelInfo):
    """(hash, wave) of each clip to encode, decoded at the model's rate and channel count; UserError
    for one without samples."""
    for h in order:
        wave = load_audio(todo[h].path, info.sample_rate, info.audio_channels)
        if wave.shape[1] == 0:
            raise UserError(f"Audio file without samples: {todo[h].path}. Remove it from the "
                            f"metadata or re-run prepare_data.py.")
        yield h, wave


def clip_chroma(wave, info: ModelInfo, separator=None):
    """A clip's melody for the cache: the pitch class (int8) of every chroma frame of its whole
    audio (C, N) (the training crop takes the frames that cover it; lora.modeling.chroma); with a
    ``separator``, of its vocals + other stems (lora.dataprep.melody_stems, as audiocraft)."""
    import torch

    if separator is not None:
        wave = melody_wave(separator, wave, info.sample_rate)
    return chroma.chroma(wave, info.sample_rate, max_seconds=None).argmax(dim=-1).to(torch.int8)


def _stem_chromas(records: list[ClipRecord], hashes: list[str], codes: dict, root: Path, info: ModelInfo,
                  separator, show_progress: bool) -> int:
    """Melody models with ``model.melody_chroma`` stems: each clip's chroma from its stems, kept in
    the cache beside the codes (chroma/<clip hash>-...-stems-<separation model identity>), computed
    for the clips that lack it. Replaces the mix's chroma in ``codes``. Returns how many were
    computed."""
    from tqdm.auto import tqdm

    source = chroma_source(separator)
    todo: dict[str, ClipRecord] = {}
    for r, h in zip(records, hashes):
        path = root / "chroma" / f"{h}-sr{info.sample_rate}-ch{info.audio_channels}-{source}.safetensors"
        t = _load_tensors(path) if h not in todo else None
        if t is not None and "chroma" in t:
            codes[h] = dict(codes[h], chroma=t["chroma"])
        else:
            todo[h] = r
    for h, r in tqdm(todo.items(), desc="melody stems (demucs)", unit="clip", disable=not show_progress):
        c = clip_chroma(load_audio(r.path, info.sample_rate, info.audio_channels), info, separator)
        _save_tensors(root / "chroma" / f"{h}-sr{info.sample_rate}-ch{info.audio_channels}-{source}.safetensors",
                      {"chroma": c}, {"source": r.audio, "chroma": source, "identity": info.identity})
        codes[h] = dict(codes[h], chroma=c)
    return len(todo)


def _encode_clips(todo: dict[str, ClipRecord], root: Path, model: nn.Module, info: ModelInfo,
                  batch_size: int, device: torch.device, show_progress: bool) -> dict[str, object]:
    """EnCodec codes of the clips in ``todo`` (by file hash), each written to the cache. Batches
    hold clips of one length only (``equal_length_batches``): a clip of a length no other clip has
    is encoded alone, and no clip's codes depend on the audio of its batch neighbours. (Against
    encoding a batched clip alone, argmin near-ties of the quantizer may still flip: EnCodec's LSTM
    rounds differently for another batch size.)"""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    fam = family_for(info)
    warn_channel_mixing([todo[h].path for h in todo], info)
    hop = info.sample_rate / info.frame_rate
    # equal lengths come together: full batches
    order = sorted(todo, key=lambda h: todo[h].duration)
    codes: dict[str, object] = {}
    bar = tqdm(total=len(order), desc="encoding audio (EnCodec)", unit="clip",
               disable=not show_progress)
    for group in equal_length_batches(_loaded_waves(order, todo, info), batch_size):
        batch = torch.from_numpy(np.stack([w for _, w in group]))
        with torch.no_grad():
            out = fam.encode_audio(model, batch.to(device) if device is not None else batch, info).cpu()
        n = group[0][1].shape[1]
        frames = min(out.shape[-1], max(1, math.ceil(n / hop)))
        for i, (h, wave) in enumerate(group):
            c = out[i, :, :frames].to(torch.int16)
            tensors = {"codes": c}
            if fam.MELODY:  # the clip's own melody: its chroma, kept beside its codes (same key)
                tensors["chroma"] = clip_chroma(wave, info)
            _save_tensors(_codes_path(root, h, info), tensors,
                          {"source": todo[h].audio, "samples": n, "model": info.name_or_path,
                           "identity": info.identity, "cache_version": CACHE_VERSION,
                           "precision": ENCODER_PRECISION})
            codes[h] = tensors
        bar.update(len(group))
    bar.close()
    return codes


def _encode_texts(texts: list[str], root: Path, model: nn.Module, processor, info: ModelInfo,
                  batch_size: int, device: torch.device, show_progress: bool) -> dict[str, tuple]:
    """Frozen text-encoder states (valid tokens only) of each caption, each written to the cache."""
    import torch
    from tqdm.auto import tqdm

    fam = family_for(info)
    states: dict[str, tuple] = {}
    bar = tqdm(total=len(texts), desc="encoding captions (text encoder)", unit="text",
               disable=not show_progress)
    for chunk in _batches(texts, batch_size):
        with torch.no_grad():
            hidden, mask = fam.encode_text(model, processor, chunk, device=device)
        hidden, mask = hidden.float().cpu(), mask.long().cpu()
        for i, text in enumerate(chunk):
            valid = max(1, int(mask[i].sum()))
            h_i, m_i = hidden[i, :valid].clone(), mask[i, :valid].clone()
            _save_tensors(_text_path(root, text), {"hidden": h_i, "mask": m_i.to(torch.int8)},
                          {"text": text[:2000], "model": info.name_or_path, "identity": info.identity})
            states[text] = (h_i, m_i)
        bar.update(len(chunk))
    bar.close()
    return states


def build_token_cache(records: list[ClipRecord], model: nn.Module, processor, info: ModelInfo,
                      data_dir: str | Path, *,
                      batch_size: int = 8, device: torch.device | None = None, text_states: bool = True,
                      show_progress: bool = True, melody_separator=None) -> tuple[list[CachedClip], dict]:
    """Encode every clip (EnCodec codes) and caption (frozen text-encoder states) not yet cached;
    load all.

    Returns the cached clips in the order of ``records`` and counts {"clips_encoded",
    "clips_reused", "texts_encoded", "texts_reused"}. ``text_states=False`` skips the text cache
    (the text encoder trains). ``batch_size`` clips of the same length are encoded together; a clip
    is never padded (its codes do not depend on the other clips). Melody models: ``melody_separator``
    (lora.dataprep.melody_stems) makes each clip's chroma from its stems instead of the mix.
    """
    from tqdm.auto import tqdm

    root = cache_root(data_dir, info)
    stats = {"clips_encoded": 0, "clips_reused": 0, "texts_encoded": 0, "texts_reused": 0}
    hashes = [file_hash(r.path)
              for r in tqdm(records, desc="hashing clips", unit="clip", disable=not show_progress,
                                              leave=False)]

    codes: dict[str, object] = {}
    todo: dict[str, ClipRecord] = {}
    for r, h in zip(records, hashes):
        if h in codes or h in todo:
            continue
        t = _load_tensors(_codes_path(root, h, info))
        if t is not None and "codes" in t and t["codes"].ndim == 2 and t["codes"].shape[0] == info.num_codebooks \
                and ("chroma" in t or not family_for(info).MELODY):
            codes[h] = t
            stats["clips_reused"] += 1
        else:
            todo[h] = r
    if todo:
        codes.update(_encode_clips(todo, root, model, info, batch_size, device, show_progress))
        stats["clips_encoded"] += len(todo)
    if melody_separator is not None and family_for(info).MELODY:
        stats["stem_chromas_computed"] = _stem_chromas(records, hashes, codes, root, info, melody_separator,
                                                       show_progress)

    states: dict[str, tuple] = {}
    if text_states:
        missing = []
        for text in dict.fromkeys(r.text for r in records):
            t = _load_tensors(_text_path(root, text))
            if t is not None and "hidden" in t and "mask" in t and t["hidden"].shape[-1] == info.text_hidden_size:
                states[text] = (t["hidden"].float(), t["mask"].long())
                stats["texts_reused"] += 1
            else:
                missing.append(text)
        if missing:
            states.update(_encode_texts(missing, root, model, processor, info, batch_size, device,
                                        show_progress))
            stats["texts_encoded"] += len(missing)

    clips = []
    for r, h in zip(records, hashes):
        hid, msk = states.get(r.text, (None, None))
        clips.append(CachedClip(id=r.id, text=r.text, split=r.split, codes=codes[h]["codes"],
                                hidden=hid, mask=msk, chroma=codes[h].get("chroma")))
    log.info("Token cache %s: %d clip(s) encoded, %d reused; %d caption(s) encoded, %d reused", root,
             stats["clips_encoded"], stats["clips_reused"], stats["texts_encoded"],
             stats["texts_reused"])
    return clips, stats
