"""What training reads: metadata.json and its clip records, the Dataset over cached tokens
(``CachedTokenDataset``: crops, condition dropout), ``collate_tokens`` and length-bucketed batches.

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
objects is accepted as well, so a hand-written metadata file works. ``split`` is "train" or "valid";
when it is missing, the first folder of ``audio`` decides ("train/..." or "valid/...").

The token cache these items come from is built by lora.dataprep.token_cache.

Imports: lora.common, lora.config, lora.modeling.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log, script_command, shown_path
from lora.common.files import folder_lock
from lora.config import text_problem
from lora.modeling import chroma
from lora.modeling.loading import family_for
from lora.modeling.musicgen import null_text_states

if TYPE_CHECKING:
    from lora.modeling.musicgen import ModelInfo

METADATA_VERSION = 1
SPLITS = ("train", "valid")
# Control characters (NUL, BEL, ESC, ...; tab and line breaks aside): never part of a caption
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
    # where the caption came from (sidecar, captions_file, auto, edited, ...), the CLAP tags of
    # --auto_caption ({vocabulary: [{"label", "score"}]}), the tempo/key estimates; written only
    # when known
    caption_source: Optional[str] = None
    tags: Optional[dict] = None
    bpm: Optional[float] = None
    key: Optional[str] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("path")
        for k in OPTIONAL_FIELDS:
            if d[k] is None:
                d.pop(k)
        return d


OPTIONAL_FIELDS = ("caption_source", "tags", "bpm", "key")
TRIGGER_POSITIONS = ("start", "end", "replace")
# load_metadata's default: the trigger word the metadata file records
FROM_METADATA = "metadata"


def apply_trigger(text: str, word: Optional[str], position: str) -> str:
    """A caption with the trigger word (dreambooth's instance prompt): at its start or end, or as
    the whole caption (replace); a caption that already holds the word is left as it is."""
    word = (word or "").strip()
    if not word:
        return text
    if position == "replace" or not text.strip():
        return word
    if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.I):
        return text
    return f"{word}, {text}" if position == "start" else f"{text}, {word}"


def metadata_trigger(data_dir: str | Path, metadata_file: str = "metadata.json") -> tuple[str, str]:
    """(word, position) of the trigger word metadata.json records; ("", "start") without one (or
    without a readable file: load_metadata reports that)."""
    try:
        raw = json.loads(metadata_path(data_dir, metadata_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "", "start"
    return _trigger_of(raw)


def _trigger_of(raw) -> tuple[str, str]:
    if not isinstance(raw, dict):
        return "", "start"
    word, pos = raw.get("trigger_word") or "", raw.get("trigger_position") or "start"
    return (word, pos) if isinstance(word, str) and pos in TRIGGER_POSITIONS else ("", "start")


def resolve_trigger(data_cfg) -> tuple[str, str]:
    """The trigger word in effect: none with trigger_position off; data.trigger_word when given;
    else the one the data folder's metadata.json records."""
    if data_cfg.trigger_position == "off":
        return "", "start"
    if data_cfg.trigger_word is not None:
        return " ".join(data_cfg.trigger_word.split()), data_cfg.trigger_position
    return metadata_trigger(data_cfg.data_dir, data_cfg.metadata_file)


def metadata_path(data_dir: str | Path, metadata_file: str = "metadata.json") -> Path:
    p = Path(metadata_file)
    return p if p.is_absolute() else Path(data_dir) / p


def load_metadata(data_dir: str | Path, metadata_file: str = "metadata.json", *,
                  split: Optional[str] = None, check_files: bool = True,
                  trigger=FROM_METADATA) -> list[ClipRecord]:
    """Read and check metadata; every problem is reported at once, naming the file and entry.

    Each record's ``text`` is the caption training reads: with the trigger word put in
    (``apply_trigger``; ``trigger`` is (word, position), by default the one the file records).
    Raises UserError when the file is missing or malformed, or (check_files) when clips are missing.
    """
    data_dir = Path(data_dir)
    mpath = metadata_path(data_dir, metadata_file)
    if not mpath.is_file():
        hint = (f"Create it with: {script_command('prepare_data.py')} --input_dir YOUR_AUDIO "
                f"--output_dir {shown_path(data_dir)} (or --create_example for a synthetic dataset).")
        if not data_dir.exists():
            raise UserError(f"Data folder {data_dir} does not exist. {hint}")
        raise UserError(f"Metadata file {mpath} not found. {hint}")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e}). Re-create it with "
                        f"prepare_data.py.") from None
    entries = raw.get("clips") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise UserError(f"{mpath}: expected a list of clips (or an object with a 'clips' list).")

    problems: list[str] = []
    records: list[ClipRecord] = []
    word, position = _trigger_of(raw) if trigger == FROM_METADATA else trigger
    base = str(data_dir)
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
        bad_text = text_problem(text, f"{where}: 'text'")
        if bad_text or CONTROL_CHARS.search(text):
            problems.append(bad_text or f"{where}: 'text' holds control characters "
                                        f"({', '.join(sorted({repr(c) for c in CONTROL_CHARS.findall(text)}))}); "
                                        f"remove them")
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
        full = audio if os.path.isabs(audio) else os.path.join(base, audio)
        if check_files and not os.path.isfile(full):
            problems.append(f"{where}: audio file {Path(full)} is missing")
            continue
        path = Path(full)
        rec = ClipRecord(id=str(e.get("id") or path.stem), audio=audio,
                         text=apply_trigger(text.strip(), word, position),
                         duration=duration, split=sp, source=e.get("source"), offset=offset, path=path,
                         **{k: e[k] for k in OPTIONAL_FIELDS if e.get(k) is not None})
        records.append(rec)
    problems += _repeated(records)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                              if len(problems) > 20 else "")
        raise UserError(f"{len(problems)} problem(s) in {mpath}:\n  {shown}\nRe-run "
                        f"prepare_data.py, or fix the entries by hand.")
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def warn_sample_rate(data_dir: str | Path, metadata_file: str, model_rate: int) -> None:
    """Say when the sample rate metadata.json gives its clips (prepare_data writes it) is not the
    model's: the clips are resampled for the model and lack what lies above their own band."""
    try:
        doc = json.loads(metadata_path(data_dir, metadata_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    rate = doc.get("sample_rate") if isinstance(doc, dict) else None
    if isinstance(rate, int) and not isinstance(rate, bool) and rate != model_rate:
        log.warning("The clips of %s are %d Hz, the model runs at %d Hz: they are resampled, and hold "
                    "nothing above %d Hz. Prepare the data with --sample_rate %d for the full "
                    "bandwidth.", data_dir, rate, model_rate, rate // 2, model_rate)


def cache_note(data_dir: str | Path) -> str:
    """What Ctrl-C while the token cache of ``data_dir`` is being built leaves."""
    return (f"while building the token cache in {Path(data_dir) / 'cache'}: every clip encoded so "
            f"far is kept (each file is written whole) and reused when you run the same command "
            f"again; nothing else was written yet")


def _repeated(records: list[ClipRecord]) -> list[str]:
    """The one rule for repeated entries (training, evaluation, the data check): an id or an audio
    file listed twice is a problem (it would be trained on twice as often, or its cache and results
    would be mixed up)."""
    out = []
    for what, counts in (("id", Counter(r.id for r in records)),
                         ("audio file", Counter(str(r.path) for r in records))):
        out += [f"{what} {k} is listed {n} times; list each clip once" for k, n in counts.items()
                if n > 1]
    return out


def _wrong_types(e: dict) -> list[str]:
    """What is wrong with the types of a clip entry's optional fields (a hand-edited metadata
    file)."""
    out = []
    for key in ("duration", "offset"):
        v = e.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            out.append(f"'{key}' must be a number of seconds >= 0, got {v!r}")
    if not isinstance(e.get("id", ""), (str, int)) or isinstance(e.get("id"), bool):
        out.append(f"'id' must be text, got {e.get('id')!r}")
    for key, types, what in (("caption_source", str, "text"), ("key", str, "text"),
                             ("tags", dict, "an object {vocabulary: [tags]}"),
                             ("bpm", (int, float), "a number")):
        if e.get(key) is not None and (not isinstance(e[key], types) or isinstance(e[key], bool)):
            out.append(f"'{key}' must be {what}, got {e[key]!r}")
    if e.get("source") is not None and not isinstance(e.get("source"), str):
        out.append(f"'source' (the recording the clip was cut from) must be text or null, got "
                   f"{e.get('source')!r}")
    return out


def data_dir_lock(data_dir: str | Path, *, writer: bool):
    """Keep prepare_data.py and the readers of a data folder apart (lora.common.files.folder_lock on
    the folder itself: nothing is written into it): prepare_data holds it as the one writer while it writes clips and
    metadata; training, evaluation and test_dataset.py hold it shared while they run (they read the
    clips into the token cache). Either side stops at once, with a message, when the other holds it:
    a cache built while the clips change would hold codes of audio that is no longer there."""
    if writer:
        busy = (f"{data_dir} is being read by another process (a training run, an evaluation or "
                f"test_dataset.py, which read its clips into the token cache): preparing it now would "
                f"change the clips under that run. Nothing was changed. Wait for it to finish (or "
                f"stop it), or prepare into another --output_dir")
    else:
        busy = (f"prepare_data.py is writing {data_dir} right now: reading it now would encode clips "
                f"that are being replaced. Wait for it to finish, then run this again")
    return folder_lock(data_dir, None, shared=not writer, busy=busy)


def metadata_document(records: list[ClipRecord], sample_rate: int, channels: int,
                      trigger: tuple[str, str] = ("", "start")) -> dict:
    """The JSON document for metadata.json (prepare_data writes it atomically); the trigger word,
    when there is one, is recorded beside the clips (their "text" stays the caption without it)."""
    doc = {"version": METADATA_VERSION, "sample_rate": sample_rate, "channels": channels}
    if trigger[0]:
        doc.update(trigger_word=trigger[0], trigger_position=trigger[1])
    return dict(doc, clips=[r.to_json() for r in records])


@dataclass
class CachedClip:
    """One clip's training inputs: codes and, unless the text encoder trains, its text states. From
    the token cache these are views into its memory-mapped shard files (no copy in the heap), in
    the cache's dtypes; the dataset's items convert them (float32 states, long mask)."""
    id: str
    text: str
    split: str
    codes: "object"                  # integer (K, T): int16 from the cache
    # float (L, D): float16 from the cache (float32 where a value does not fit), or None when text
    # states are not cached
    hidden: "Optional[object]" = None
    mask: "Optional[object]" = None    # integer (L,): int8 from the cache
    # melody models: torch.int8 (Tc,) pitch class of each chroma frame
    chroma: "Optional[object]" = None

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[-1])


# --------------------------------------------------------------------------------------------
# Dataset over cached tokens, collate, length-bucketed batches
# --------------------------------------------------------------------------------------------
def sample_rng(seed: int, epoch: int, index: int, purpose: int = 0):
    """A numpy Generator determined by (seed, epoch, index, purpose) only: per-sample randomness is
    the same whatever process, worker or batch reads the sample (exact resume, identical multi-GPU
    runs)."""
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(purpose)])


class CachedTokenDataset:
    """Items of cached clips for training or validation.

    Training (``train=True``): each epoch a clip longer than ``max_frames`` gets a random window of
    ``max_frames``, and with probability ``cond_dropout`` its text condition is replaced by the null
    condition (zero hidden states, zero mask: what classifier-free guidance uses at inference). Both
    draws depend only on (seed, epoch, clip index). Validation (``train=False``): the first window,
    never dropped.
    """

    def __init__(self, clips: list[CachedClip], max_frames: int, *, seed: int = 0, train: bool = True,
                 cond_dropout: float = 0.0, info: ModelInfo | None = None, melody_dropout: float = 0.0):
        self.clips = clips
        self.max_frames = int(max_frames)
        self.seed = int(seed)
        self.train = train
        self.cond_dropout = float(cond_dropout) if train else 0.0
        self.epoch = 0
        # Melody models (``info`` of the melody family): each item also carries its melody, and a
        # second draw drops the melody alone with probability melody_dropout.
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
                item["hidden"], item["mask"] = null_text_states(clip.hidden.shape[-1])
            else:
                item["hidden"], item["mask"] = text_states(clip)
        return item

    def _melody_item(self, item: dict, clip: CachedClip, start: int, frames: int, drop: bool,
                     melody_drop: bool):
        """A melody model's item: the chroma frames that cover the crop (the clip's own melody, as
        audiocraft and transformers train), one-hot and tiled to chroma_length, or the null melody
        when dropped; the text states padded to the length generation uses (``text_length``: in a
        prefix model, padding positions are attended, so the padded length is part of the
        condition), or the null text of that same length when dropped."""
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
            hidden, mask = fam.pad_text(*text_states(clip))
            item["hidden"], item["mask"] = fam.dropped_text(hidden, mask) if drop else (hidden, mask)
            item["text_length"] = int(hidden.shape[0])
        return item


def text_states(clip: CachedClip):
    """A clip's text states as the model reads them: float32 (L, D) and a long mask (L,) (the cache
    keeps float16 and int8)."""
    return clip.hidden.float(), clip.mask.long()


def collate_tokens(items: list[dict], pad_token_id: int) -> dict:
    """Pad a list of dataset items: codes (B, K, T) padded with pad_token_id plus ``lengths``; text
    states (B, L, D) zero-padded with their mask (B, L) (melody models: and each clip's own padded
    length, ``text_lengths``); ``dropped`` (B,) bool; ``index`` (B,); ``texts``."""
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
    # melody models: each clip's own padded text length (the collate pads to the batch's longest;
    # the model reads each clip at its own: lora.modeling.musicgen_melody.teacher_forced_logits)
    if "text_length" in items[0]:
        batch["text_lengths"] = [it["text_length"] for it in items]
    # melody models: (B, chroma_length, 12), each already tiled to chroma_length
    if "chroma" in items[0]:
        batch["chroma"] = torch.stack([it["chroma"] for it in items])
        batch["melody_dropped"] = torch.tensor([it["melody_dropped"] for it in items], dtype=torch.bool)
    return batch


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, *,
                     multiple_of: int = 1, bucket_batches: int = 50) -> list[list[int]]:
    """The epoch's micro-batches of item indices, grouped by similar length (little padding).

    Items are shuffled (seeded by (seed, epoch)), cut into buckets of ``bucket_batches`` batches,
    sorted by length inside each bucket and cut into batches; the batch order is then shuffled. The
    list is extended by wrapping around to a multiple of ``multiple_of`` (=
    gradient_accumulation_steps x processes), so that every optimizer step sees the same number of
    batches, split across processes and micro-steps identically.
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
