"""The data check: is a data folder (clips + metadata.json) ready for training?

``check_data_dir`` checks every clip listed in the metadata (file present and readable, sample rate,
channels, duration against the metadata, empty captions, duplicate ids/files/audio, train/valid
leakage of a recording) and returns a ``DataSummary`` whose ``text()`` is the printed summary (clips
per split, hours, a ``duration_histogram``, caption statistics, warnings, problems). Problems fail
the check; warnings do not. Shared by ``prepare_data.py`` (``--validate``, and the check after
preparing) and ``test_dataset.py``. ``check_token_batches`` (test_dataset.py --model_path) checks what
training reads: the token cache and its batches.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lora.common.cli import human_seconds
from lora.config import Config
from lora.dataprep import audio as A
from lora.dataprep.token_cache import build_token_cache
from lora.dataset import (
    SPLITS,
    CachedTokenDataset,
    ClipRecord,
    bucketed_batches,
    collate_tokens,
    load_metadata,
    metadata_path,
    metadata_trigger,
)
from lora.modeling.loading import load_base_model
from lora.modeling.window import checked_window, longest_caption

if TYPE_CHECKING:
    import torch


INAUDIBLE_DB = -60.0  # a clip whose audible part stays under this level holds nothing to learn


class DataSummary:
    """What check_data_dir found: the records, sample rate and channels, problems (fail) and
    warnings."""

    def __init__(self, data_dir: Path, mpath: Path):
        self.data_dir, self.mpath = data_dir, mpath
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.records: list[ClipRecord] = []
        self.sample_rate: Optional[int] = None
        self.channels: Optional[int] = None
        self.trigger = metadata_trigger(data_dir, mpath.name if mpath.parent == data_dir else str(mpath))

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"Data folder: {self.data_dir}  (metadata: {self.mpath.name})"]
        recs = self.records
        if recs:
            for s in SPLITS:
                rs = [r for r in recs if r.split == s]
                lines.append(f"  {s:5s}: {len(rs):5d} clips, "
                             f"{human_seconds(sum(r.duration for r in rs)):>9s}, "
                             f"{len({r.source or r.id for r in rs})} recordings")
            total = sum(r.duration for r in recs)
            lines.append(f"  total: {len(recs):5d} clips, {total / 3600:.3f} h; "
                         f"{self.sample_rate or '?'} Hz, {self.channels or '?'} channel(s)")
            lines.append("  clip durations (s):")
            lines += ["    " + ln for ln in duration_histogram([r.duration for r in recs])]
            words = np.array([len(r.text.split()) for r in recs])
            lines.append(f"  caption words: min {words.min()}, median {int(np.median(words))}, max "
                         f"{words.max()}; empty {int((words == 0).sum())}; distinct captions "
                         f"{len({r.text for r in recs})}")
            sources = {}
            for r in recs:
                sources[r.caption_source or "not recorded"] = sources.get(r.caption_source or "not recorded", 0) + 1
            if set(sources) != {"not recorded"}:
                lines.append("  captions from: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
            if self.trigger[0]:
                lines.append(f"  trigger word: {self.trigger[0]!r} ({self.trigger[1]}), in every caption "
                             f"training reads")
        for w in self.warnings[:20]:
            lines.append(f"  warning: {w}")
        if len(self.warnings) > 20:
            lines.append(f"  ... and {len(self.warnings) - 20} more warnings")
        if self.problems:
            lines.append(f"PROBLEMS ({len(self.problems)}):")
            lines += [f"  - {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"  ... and {len(self.problems) - 50} more")
        else:
            lines.append("Data check: OK")
        return "\n".join(lines)


def duration_histogram(durations, width: int = 40) -> list[str]:
    """Text bars of clip durations, bins (lo, hi] seconds, from the first to the last non-empty
    bin."""
    edges = [0, 1, 2, 5, 10, 15, 20, 25, 30, 60, math.inf]
    # bins (lo, hi]: a 30 s clip counts as 25-30
    idx = np.clip(np.searchsorted(np.array(edges), np.asarray(durations, dtype=float), side="left")
                  - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return ["(no clips)"]
    top = counts.max()
    out = []
    for i in range(nz[0], nz[-1] + 1):
        hi = "inf" if edges[i + 1] == math.inf else f"{edges[i + 1]:g}"
        bar = "#" * max(1 if counts[i] else 0, int(round(width * counts[i] / top)))
        out.append(f"{edges[i]:>3g}-{hi:<4s} {bar} {counts[i]}")
    return out


def check_data_dir(data_dir, metadata_file: str = "metadata.json", *, sample_rate: Optional[int] = None,
                   hash_content: bool = True, tolerance: float = 0.05) -> DataSummary:
    """Check every clip of a data folder: readable, sample rate, channels, duration vs metadata,
    captions, duplicates, split leakage. Problems fail the check; warnings do not."""
    import soundfile as sf

    data_dir = Path(data_dir)
    mpath = metadata_path(data_dir, metadata_file)
    s = DataSummary(data_dir, mpath)
    s.records = load_metadata(data_dir, metadata_file, check_files=False)
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        doc = {}
    meta = doc if isinstance(doc, dict) else {}
    s.sample_rate = meta.get("sample_rate") or sample_rate
    s.channels = meta.get("channels")
    if sample_rate and meta.get("sample_rate") and meta["sample_rate"] != sample_rate:
        s.problems.append(f"{mpath.name} says sample_rate {meta['sample_rate']}, the config "
                          f"expects {sample_rate}; prepare the data again with --sample_rate "
                          f"{sample_rate}")
    if s.sample_rate and s.sample_rate != A.MUSICGEN_SAMPLE_RATE:
        s.warnings.append(f"the clips are {s.sample_rate} Hz; MusicGen runs at "
                          f"{A.MUSICGEN_SAMPLE_RATE} Hz: training resamples them, and they hold "
                          f"nothing above {s.sample_rate // 2} Hz. Prepare again with --sample_rate "
                          f"{A.MUSICGEN_SAMPLE_RATE} unless your model runs at {s.sample_rate} Hz")
    if not s.records:
        s.problems.append(f"{mpath} lists no clips")
        return s
    hashes = defaultdict(list)  # (an id or file listed twice: load_metadata refuses it for everyone)
    for r in s.records:
        where = f"{r.audio}"
        if not r.path.is_file():
            s.problems.append(f"{where}: file missing")
            continue
        try:
            info = sf.info(str(r.path))
        except (sf.LibsndfileError, RuntimeError) as e:
            s.problems.append(f"{where}: unreadable ({str(e).splitlines()[0]})")
            continue
        if s.sample_rate and info.samplerate != s.sample_rate:
            s.problems.append(f"{where}: {info.samplerate} Hz, expected {s.sample_rate} Hz")
        if s.channels and info.channels != s.channels:
            s.problems.append(f"{where}: {info.channels} channel(s), expected {s.channels}")
        dur = info.frames / info.samplerate
        if r.duration and abs(dur - r.duration) > tolerance:
            s.problems.append(f"{where}: {dur:.2f} s long, metadata says {r.duration:.2f} s")
        if info.frames == 0:
            s.problems.append(f"{where}: empty file")
        elif dur < A.CODEC_FRAME_SECONDS:
            s.problems.append(f"{where}: {dur * 1000:.1f} ms long, shorter than one codec frame "
                              f"({A.CODEC_FRAME_SECONDS * 1000:g} ms): it gives no tokens to train on")
        if not r.text:
            s.warnings.append(f"{where}: empty caption (only trains the unconditional branch)")
        if hash_content:  # (--validate reads every clip: also whether it holds audible sound)
            hashes[A.file_hash(r.path)].append(r.audio)
            y, sr = sf.read(str(r.path), dtype="float32", always_2d=True)
            if info.frames and A.audible_db(y.T, sr) < INAUDIBLE_DB:
                s.problems.append(f"{where}: no audible sound (above {A.AUDIBLE_HZ:g} Hz it stays "
                                  f"under {INAUDIBLE_DB:g} dBFS: silence, a DC offset or infrasound)")
    for same in hashes.values():
        if len(same) > 1:
            s.warnings.append(f"identical audio: {', '.join(same[:5])}")
    by_split = defaultdict(set)
    for r in s.records:
        if r.source:
            by_split[r.split].add(r.source)
    leak = by_split["train"] & by_split["valid"]
    if leak:
        s.problems.append(f"{len(leak)} recording(s) have clips in both train and valid (leakage), "
                          f"e.g. {sorted(leak)[0]}; re-run prepare_data.py to split by recording")
    n_train = sum(r.split == "train" for r in s.records)
    n_valid = len(s.records) - n_train
    if n_train == 0:
        s.problems.append("no train clips")
    if n_valid == 0:
        s.warnings.append("no valid clips: training cannot measure held-out loss (set "
                          "valid_fraction > 0)")
    if n_train and n_train < 50:
        s.warnings.append(f"only {n_train} train clips; 50-100 is a minimum for a real style, "
                          f"200-500 recommended")
    return s


def check_token_batches(cfg: Config, records: list[ClipRecord], num_batches: int,
                        device: torch.device | None = None) -> list[str]:
    """What training reads, checked the way train_lora.py reads it: the base model of ``cfg.model`` builds (or
    reuses) the token cache of ``records`` in data_dir/cache, exactly as training does (so training then reuses
    it), and ``num_batches`` training micro-batches of epoch 0 are drawn through ``CachedTokenDataset``,
    ``bucketed_batches`` and ``collate_tokens`` with the training settings (window, crop, condition dropout).
    Prints each batch; returns the problems found (codes outside the codebook, non-finite text states)."""
    import torch

    model, processor, info = load_base_model(cfg.model)
    t = cfg.training
    max_frames = checked_window(t.max_duration, info, model,
                                **longest_caption(info, processor, [r.text for r in records]))
    train = [r for r in records if r.split == "train"] or records
    clips, stats = build_token_cache(train, model, processor, info, cfg.data.data_dir,
                                     batch_size=t.encode_batch_size, device=device,
                                     text_states=not cfg.lora.train_text_encoder,
                                     verify=cfg.data.verify_cache)
    print(f"Token cache of {info.name_or_path}: {stats['clips_encoded']} clip(s) encoded, "
          f"{stats['clips_reused']} reused (training reuses them)")
    ds = CachedTokenDataset(clips, max_frames, seed=t.seed, train=True, cond_dropout=t.cond_dropout,
                            info=info, melody_dropout=t.melody_dropout)
    problems = []
    print(f"Loading {num_batches} training batch(es) of {t.batch_size} clip(s) as train_lora.py "
          f"reads them:")
    for i, idx in enumerate(bucketed_batches(ds.lengths(), t.batch_size, t.seed, 0)[:num_batches]):
        batch = collate_tokens([ds[j] for j in idx], info.pad_token_id)
        codes, lengths = batch["codes"], batch["lengths"]
        secs = ", ".join(f"{int(n) / info.frame_rate:.1f}" for n in lengths)
        print(f"  batch {i}: codes {tuple(codes.shape)}, seconds {secs}, condition dropped "
              f"{int(batch['dropped'].sum())} of {len(idx)}")
        print(f"    texts: {batch['texts']}")
        real = torch.cat([codes[b, :, :int(n)].reshape(-1) for b, n in enumerate(lengths)])
        if int(real.min()) < 0 or int(real.max()) >= info.vocab_size:
            problems.append(f"batch {i}: codes outside the codebook [0, {info.vocab_size}): "
                            f"rebuild the cache (delete {cfg.data.data_dir}/cache)")
        if "hidden" in batch and not torch.isfinite(batch["hidden"]).all():
            problems.append(f"batch {i} ({', '.join(batch['texts'])}): the cached text states hold "
                            f"NaN or inf")
    return problems
