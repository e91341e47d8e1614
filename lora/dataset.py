"""Dataset: metadata.json, clip records, the audio Dataset and (below) the on-disk token cache.

metadata.json (written by prepare_data.py, read here) is::

    {
      "version": 1,
      "sample_rate": 32000,
      "channels": 1,
      "clips": [
        {"id": "a1b2c3_000", "audio": "train/a1b2c3_000.wav", "text": "lofi hip hop, piano, 80 BPM",
         "duration": 30.0, "split": "train", "source": "albums/x/track01.flac", "offset": 0.0},
        ...
      ]
    }

``audio`` is relative to the data dir (absolute paths are accepted too). A plain JSON list of clip
objects is accepted as well, so a hand-written metadata file works. ``split`` is "train" or "valid"; when
it is missing, the first folder of ``audio`` decides ("train/..." or "valid/...").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from lora import chroma
from lora.audio import audio_info, file_hash, load_audio
from lora.encodec_fast import ENCODER_PRECISION
from lora.loading import family_for
from lora.musicgen import null_text_states
from lora.utils import UserError, atomic_path, log

METADATA_VERSION = 1
SPLITS = ("train", "valid")


@dataclass
class ClipRecord:
    id: str
    audio: str  # as written in metadata (relative to data_dir, or absolute)
    text: str
    duration: float
    split: str
    source: Optional[str] = None
    offset: float = 0.0
    path: Optional[Path] = None  # resolved absolute path (not written back)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d


def metadata_path(data_dir: str | Path, metadata_file: str = "metadata.json") -> Path:
    p = Path(metadata_file)
    return p if p.is_absolute() else Path(data_dir) / p


def load_metadata(data_dir: str | Path, metadata_file: str = "metadata.json", *,
                  split: Optional[str] = None, check_files: bool = True) -> list[ClipRecord]:
    """Read and check metadata; every problem is reported at once, naming the file and entry.

    Raises UserError when the file is missing or malformed, or (check_files) when clips are missing.
    """
    data_dir = Path(data_dir)
    mpath = metadata_path(data_dir, metadata_file)
    if not mpath.is_file():
        hint = (f"Create it with: python lora/prepare_data.py --input_dir YOUR_AUDIO --output_dir {data_dir} "
                f"(from inside lora/: python prepare_data.py ...; or --create_example for a synthetic dataset).")
        if not data_dir.exists():
            raise UserError(f"Data folder {data_dir} does not exist. {hint}")
        raise UserError(f"Metadata file {mpath} not found. {hint}")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e}). Re-create it with prepare_data.py.") from None
    entries = raw.get("clips") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise UserError(f"{mpath}: expected a list of clips (or an object with a 'clips' list).")

    problems: list[str] = []
    records: list[ClipRecord] = []
    for i, e in enumerate(entries):
        where = f"{mpath.name} entry {i}"
        if not isinstance(e, dict):
            problems.append(f"{where}: expected an object, got {type(e).__name__}")
            continue
        audio = e.get("audio") or e.get("file_name") or e.get("path")
        if not audio or not isinstance(audio, str):
            problems.append(f"{where}: no 'audio' path")
            continue
        where = f"{mpath.name} entry {i} ({audio})"
        text = e.get("text", e.get("caption", ""))
        if not isinstance(text, str):
            problems.append(f"{where}: 'text' must be a string")
            continue
        sp = e.get("split") or Path(audio).parts[0]
        if sp not in SPLITS:
            problems.append(f"{where}: split {sp!r} is neither 'train' nor 'valid'")
            continue
        bad = _wrong_types(e)
        if bad:
            problems += [f"{where}: {b}" for b in bad]
            continue
        duration, offset = float(e.get("duration", 0.0)), float(e.get("offset", 0.0))
        path = Path(audio) if Path(audio).is_absolute() else data_dir / audio
        if check_files and not path.is_file():
            problems.append(f"{where}: audio file {path} is missing")
            continue
        rec = ClipRecord(id=str(e.get("id") or Path(audio).stem), audio=audio, text=text.strip(),
                         duration=duration, split=sp, source=e.get("source"), offset=offset, path=path)
        records.append(rec)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"{len(problems)} problem(s) in {mpath}:\n  {shown}\nRe-run prepare_data.py, or fix the "
                        f"entries by hand.")
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def _wrong_types(e: dict) -> list[str]:
    """What is wrong with the types of a clip entry's optional fields (a hand-edited metadata file)."""
    import math

    out = []
    for key in ("duration", "offset"):
        v = e.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            out.append(f"'{key}' must be a number of seconds >= 0, got {v!r}")
    if not isinstance(e.get("id", ""), (str, int)) or isinstance(e.get("id"), bool):
        out.append(f"'id' must be text, got {e.get('id')!r}")
    if e.get("source") is not None and not isinstance(e.get("source"), str):
        out.append(f"'source' (the recording the clip was cut from) must be text or null, got {e.get('source')!r}")
    return out


def metadata_document(records: list[ClipRecord], sample_rate: int, channels: int) -> dict:
    """The JSON document for metadata.json (prepare_data writes it atomically)."""
    return {"version": METADATA_VERSION, "sample_rate": sample_rate, "channels": channels,
            "clips": [r.to_json() for r in records]}


# ============================================================================================
# Token cache: EnCodec codes and frozen text-encoder states, computed once and kept on disk.
#
# Layout (one safetensors file per clip / caption; loaded with safetensors, never pickle):
#     data_dir/cache/<model identity>-v<CACHE_VERSION>/codes/<sha1 of clip file>-sr<rate>-ch<channels>-<precision>.safetensors
#         "codes": int16 (K, T)     clips are batched only with clips of the same length, never zero-padded
#                                   (EnCodec is not causal), so no clip's codes depend on another clip's audio;
#                                   <precision> is the encoder's (lora.encodec_fast.ENCODER_PRECISION: "fp32", also
#                                   in the file's metadata), so codes made in another precision are never mixed in
#     data_dir/cache/<model identity>-v<CACHE_VERSION>/text/<sha1 of caption>.safetensors
#         "hidden": float32 (L, D)   T5 last_hidden_state (before the decoder's projection), valid tokens only
#         "mask":   int8 (L,)
# The model identity (lora.loading.model_identity) hashes the whole config, tokenizer, processor and weight files.
# A rerun reuses every file whose key still matches; a changed clip (new bytes -> new hash) or another model
# (new identity) is encoded again, and only that. Each file is written atomically (temp file + rename).
# ============================================================================================
CACHE_VERSION = 3  # 2: no clip padded to its batch (version-1 codes of shorter clips depended on their batch);
#                   3: the codes' key names the encoder precision; codes from the chunked CPU encoder (encodec_fast)


@dataclass
class CachedClip:
    """One clip's training inputs: codes (int16 (K, T)) and, unless the text encoder trains, its text states."""
    id: str
    text: str
    split: str
    codes: "object"                  # torch.int16 (K, T)
    hidden: "Optional[object]" = None  # torch.float32 (L, D), or None when text states are not cached
    mask: "Optional[object]" = None    # torch.long (L,)
    chroma: "Optional[object]" = None  # melody models: torch.int8 (Tc,) pitch class of each chroma frame

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[-1])


def cache_root(data_dir: str | Path, info) -> Path:
    """The cache folder of one model: data_dir/cache/<model identity>-v<CACHE_VERSION>."""
    return Path(data_dir) / "cache" / f"{info.identity}-v{CACHE_VERSION}"


def _sha1_text(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _codes_path(root: Path, file_sha1: str, info) -> Path:
    return root / "codes" / f"{file_sha1}-sr{info.sample_rate}-ch{info.audio_channels}-{ENCODER_PRECISION}.safetensors"


def _text_path(root: Path, text: str) -> Path:
    return root / "text" / f"{_sha1_text(text)}.safetensors"


def _save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".tmp") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})


def _load_tensors(path: Path) -> Optional[dict]:
    """Tensors of a cache file, or None when it is missing or unreadable (then it is simply re-encoded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        log.warning("Cache file %s is unreadable (%s); encoding it again.", path, e)
        return None


def warn_channel_mixing(paths: list[Path], info) -> dict:
    """Say once when clips are mixed to the model's channel count: stereo clips for a mono model are mixed down,
    mono clips for a stereo model are copied to both channels (no real stereo to learn). Returns the counts."""
    from collections import Counter

    counts = Counter(audio_info(p).channels for p in paths)
    mixed = {c: n for c, n in counts.items() if c != info.audio_channels}
    for c, n in sorted(mixed.items()):
        if info.audio_channels == 1:
            how = f"{'stereo' if c == 2 else f'{c}-channel'} but the model is mono: they are mixed down to mono"
        else:
            how = ("mono but the model is stereo: each is copied to both channels, so there is no stereo image to "
                   "learn (prepare the data with --channels 2 from stereo sources)")
        log.warning("%d of %d clip(s) are %s", n, len(paths), how)
    return mixed


def _batches(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def equal_length_batches(waves, batch_size: int, max_waiting: Optional[int] = None):
    """Group (key, wave (C, N)) pairs into batches of at most ``batch_size`` whose waves all have the same N, so
    that no clip is ever zero-padded to a longer neighbour (EnCodec is not causal: padding changes the codes of a
    clip's last frames, so its codes would depend on its batch). Yields lists of pairs as soon as a length has a
    full batch; a length with fewer clips is encoded as a smaller batch (a length seen once: alone). At most
    ``max_waiting`` (default 2 x batch_size) clips wait in unfinished batches: past that the longest-waiting
    batch goes as it is, so memory stays bounded whatever order the clips come in."""
    size = max(1, int(batch_size))
    limit = max(size, int(max_waiting or 2 * size))
    waiting: dict[int, list] = {}  # samples -> pairs (insertion order = the order lengths first came)
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


def _loaded_waves(order: list[str], todo: dict[str, ClipRecord], info):
    """(hash, wave) of each clip to encode, decoded at the model's rate and channel count; UserError for one
    without samples."""
    for h in order:
        wave = load_audio(todo[h].path, info.sample_rate, info.audio_channels)
        if wave.shape[1] == 0:
            raise UserError(f"Audio file without samples: {todo[h].path}. Remove it from the metadata or re-run "
                            f"prepare_data.py.")
        yield h, wave


def clip_chroma(wave, info):
    """A clip's melody for the cache: the pitch class (int8) of every chroma frame of its whole audio (C, N) (the
    training crop takes the frames that cover it; lora.chroma)."""
    import torch

    return chroma.chroma(wave, info.sample_rate, max_seconds=None).argmax(dim=-1).to(torch.int8)


def _encode_clips(todo: dict[str, ClipRecord], root: Path, model, info, batch_size: int, device,
                  show_progress: bool) -> dict[str, object]:
    """EnCodec codes of the clips in ``todo`` (by file hash), each written to the cache. Batches hold clips of one
    length only (``equal_length_batches``): a clip of a length no other clip has is encoded alone, and no clip's
    codes depend on the audio of its batch neighbours. (Against encoding a batched clip alone, argmin near-ties
    of the quantizer may still flip: EnCodec's LSTM rounds differently for another batch size.)"""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    fam = family_for(info)
    warn_channel_mixing([todo[h].path for h in todo], info)
    hop = info.sample_rate / info.frame_rate
    order = sorted(todo, key=lambda h: todo[h].duration)  # equal lengths come together: full batches
    codes: dict[str, object] = {}
    bar = tqdm(total=len(order), desc="encoding audio (EnCodec)", unit="clip", disable=not show_progress)
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


def _encode_texts(texts: list[str], root: Path, model, processor, info, batch_size: int, device,
                  show_progress: bool) -> dict[str, tuple]:
    """Frozen text-encoder states (valid tokens only) of each caption, each written to the cache."""
    import torch
    from tqdm.auto import tqdm

    fam = family_for(info)
    states: dict[str, tuple] = {}
    bar = tqdm(total=len(texts), desc="encoding captions (text encoder)", unit="text", disable=not show_progress)
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


def build_token_cache(records: list[ClipRecord], model, processor, info, data_dir: str | Path, *,
                      batch_size: int = 8, device=None, text_states: bool = True,
                      show_progress: bool = True) -> tuple[list[CachedClip], dict]:
    """Encode every clip (EnCodec codes) and caption (frozen text-encoder states) not yet cached; load all.

    Returns the cached clips in the order of ``records`` and counts {"clips_encoded", "clips_reused",
    "texts_encoded", "texts_reused"}. ``text_states=False`` skips the text cache (the text encoder trains).
    ``batch_size`` clips of the same length are encoded together; a clip is never padded (its codes do not
    depend on the other clips).
    """
    from tqdm.auto import tqdm

    root = cache_root(data_dir, info)
    stats = {"clips_encoded": 0, "clips_reused": 0, "texts_encoded": 0, "texts_reused": 0}
    hashes = [file_hash(r.path) for r in tqdm(records, desc="hashing clips", unit="clip", disable=not show_progress,
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
            states.update(_encode_texts(missing, root, model, processor, info, batch_size, device, show_progress))
            stats["texts_encoded"] += len(missing)

    clips = []
    for r, h in zip(records, hashes):
        hid, msk = states.get(r.text, (None, None))
        clips.append(CachedClip(id=r.id, text=r.text, split=r.split, codes=codes[h]["codes"], hidden=hid, mask=msk,
                                chroma=codes[h].get("chroma")))
    log.info("Token cache %s: %d clip(s) encoded, %d reused; %d caption(s) encoded, %d reused", root,
             stats["clips_encoded"], stats["clips_reused"], stats["texts_encoded"], stats["texts_reused"])
    return clips, stats


# --------------------------------------------------------------------------------------------
# Dataset over cached tokens, collate, length-bucketed batches
# --------------------------------------------------------------------------------------------
def sample_rng(seed: int, epoch: int, index: int, purpose: int = 0):
    """A numpy Generator determined by (seed, epoch, index, purpose) only: per-sample randomness is the same
    whatever process, worker or batch reads the sample (exact resume, identical multi-GPU runs)."""
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(purpose)])


class CachedTokenDataset:
    """Items of cached clips for training or validation.

    Training (``train=True``): each epoch a clip longer than ``max_frames`` gets a random window of
    ``max_frames``, and with probability ``cond_dropout`` its text condition is replaced by the null condition
    (zero hidden states, zero mask: what classifier-free guidance uses at inference). Both draws depend only on
    (seed, epoch, clip index). Validation (``train=False``): the first window, never dropped.
    """

    def __init__(self, clips: list[CachedClip], max_frames: int, *, seed: int = 0, train: bool = True,
                 cond_dropout: float = 0.0, info=None, melody_dropout: float = 0.0):
        self.clips = clips
        self.max_frames = int(max_frames)
        self.seed = int(seed)
        self.train = train
        self.cond_dropout = float(cond_dropout) if train else 0.0
        self.epoch = 0
        # Melody models (``info`` of the melody family): each item also carries its melody, and a second draw
        # drops the melody alone with probability melody_dropout.
        self.info = info if info is not None and family_for(info).MELODY else None
        self.melody_dropout = float(melody_dropout) if train and self.info is not None else 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips)

    def lengths(self) -> list[int]:
        """Frames each item will have (after cropping)."""
        return [min(c.num_frames, self.max_frames) for c in self.clips]

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        T = clip.num_frames
        drop = False
        start = 0
        if self.train:
            rng = sample_rng(self.seed, self.epoch, index)
            drop = bool(rng.random() < self.cond_dropout)
            if T > self.max_frames:
                start = int(rng.integers(0, T - self.max_frames + 1))
        codes = clip.codes[:, start:start + self.max_frames].long()
        item = {"index": index, "codes": codes, "text": clip.text, "dropped": drop}
        if self.info is not None:
            # (a third draw, after the two above: the draws of text-only models are unchanged)
            melody_drop = self.train and bool(rng.random() < self.melody_dropout)
            return self._melody_item(item, clip, start, codes.shape[1], drop, melody_drop)
        if clip.hidden is not None:
            if drop:
                item["hidden"], item["mask"] = null_text_states(clip.hidden.shape[-1], dtype=clip.hidden.dtype)
            else:
                item["hidden"], item["mask"] = clip.hidden, clip.mask
        return item

    def _melody_item(self, item: dict, clip: CachedClip, start: int, frames: int, drop: bool, melody_drop: bool):
        """A melody model's item: the chroma frames that cover the crop (the clip's own melody, as audiocraft and
        transformers train), one-hot and tiled to chroma_length, or the null melody when dropped; the text states
        padded to the length generation uses (``text_length``: in a prefix model, padding positions are attended, so
        the padded length is part of the condition), or the null text of that same length when dropped."""
        fam = family_for(self.info)
        hop = self.info.sample_rate / self.info.frame_rate  # audio samples per codec frame
        first = int(round(start * hop / chroma.HOP))
        n = chroma.frames(int(round(frames * hop)))
        indices = clip.chroma[first:first + n] if clip.chroma is not None else None
        if indices is None or indices.numel() == 0:
            raise ValueError(f"clip {clip.id!r} has no cached chroma (rebuild the token cache)")
        melody = fam.melody_frames(indices, self.info.chroma_length)
        item["chroma"] = fam.null_like(melody) if (drop or melody_drop) else melody
        item["melody_dropped"] = bool(drop or melody_drop)
        if clip.hidden is not None:
            hidden, mask = fam.pad_text(clip.hidden, clip.mask)
            item["hidden"], item["mask"] = fam.dropped_text(hidden, mask) if drop else (hidden, mask)
        return item


def collate_tokens(items: list[dict], pad_token_id: int) -> dict:
    """Pad a list of dataset items: codes (B, K, T) padded with pad_token_id plus ``lengths``; text states
    (B, L, D) zero-padded with their mask (B, L); ``dropped`` (B,) bool; ``index`` (B,); ``texts``."""
    import torch

    B = len(items)
    K = items[0]["codes"].shape[0]
    lengths = torch.tensor([it["codes"].shape[1] for it in items], dtype=torch.long)
    codes = torch.full((B, K, int(lengths.max())), int(pad_token_id), dtype=torch.long)
    for i, it in enumerate(items):
        codes[i, :, :it["codes"].shape[1]] = it["codes"]
    batch = {"codes": codes, "lengths": lengths, "index": torch.tensor([it["index"] for it in items]),
             "dropped": torch.tensor([it["dropped"] for it in items], dtype=torch.bool),
             "texts": [it["text"] for it in items]}
    if "hidden" in items[0]:
        L = max(it["hidden"].shape[0] for it in items)
        D = items[0]["hidden"].shape[1]
        hidden = torch.zeros(B, L, D, dtype=items[0]["hidden"].dtype)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, it in enumerate(items):
            n = it["hidden"].shape[0]
            hidden[i, :n] = it["hidden"]
            mask[i, :n] = it["mask"]
        batch["hidden"], batch["mask"] = hidden, mask
    if "chroma" in items[0]:  # melody models: (B, chroma_length, 12), each already tiled to chroma_length
        batch["chroma"] = torch.stack([it["chroma"] for it in items])
        batch["melody_dropped"] = torch.tensor([it["melody_dropped"] for it in items], dtype=torch.bool)
    return batch


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, *, multiple_of: int = 1,
                     bucket_batches: int = 50) -> list[list[int]]:
    """The epoch's micro-batches of item indices, grouped by similar length (little padding).

    Items are shuffled (seeded by (seed, epoch)), cut into buckets of ``bucket_batches`` batches, sorted by length
    inside each bucket and cut into batches; the batch order is then shuffled. The list is extended by wrapping
    around to a multiple of ``multiple_of`` (= gradient_accumulation_steps x processes), so that every optimizer
    step sees the same number of batches, split across processes and micro-steps identically.
    """
    import numpy as np

    n = len(lengths)
    if n == 0:
        return []
    rng = sample_rng(seed, epoch, -1 & 0xFFFFFFFF, purpose=1)
    perm = rng.permutation(n)
    lens = np.asarray(lengths)
    batches: list[list[int]] = []
    span = max(1, batch_size * bucket_batches)
    for b in range(0, n, span):
        bucket = perm[b:b + span]
        bucket = bucket[np.argsort(-lens[bucket], kind="stable")]
        batches += [bucket[i:i + batch_size].tolist() for i in range(0, len(bucket), batch_size)]
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
    if multiple_of > 1 and len(batches) % multiple_of:
        extra = multiple_of - len(batches) % multiple_of
        batches += [batches[i % len(batches)] for i in range(extra)]
    return batches
