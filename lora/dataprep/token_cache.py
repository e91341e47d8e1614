"""The token cache: EnCodec codes and frozen text-encoder states, computed once and kept in
``data_dir/cache`` (``build_token_cache``); training and evaluation read tokens, never audio.

What a start costs grows with new audio only:

* **A warm start reads no audio.** The cache index (lora.dataprep.cache_store) remembers each clip
  file's content hash by its device, inode, size, mtime_ns and ctime_ns; a file whose stat still
  matches is not opened. A new or changed file is read once: its bytes are hashed and those same
  bytes are decoded and encoded, so an entry is always keyed by the audio it holds (a file rewritten
  while the cache is built can never be encoded under its old hash). ``verify=True``
  (``--verify_cache``) trusts no index entry: every clip file is read and hashed again, and every
  shard is checked against its checksum.
* **Bounded memory per process.** Entries live in a few shard files; the clips training reads are
  views into them, memory-mapped (safetensors), shared through the page cache by every process
  that reads them, not copied into each process's heap. Text states are kept in float16 (the
  rounding's effect on the held-out loss is measured in BENCHMARKS.md, "Scale").
* **The build is shared.** With several processes (``Ranks``: one per GPU under accelerate or
  torchrun), the first plans, each encodes every world-th batch of the clips and captions to encode
  (the batches, and so the codes, are the same for any number of processes), writes its parts as
  it goes, and the first joins them into shards that every process then reads. The first
  process's progress bars count every process's work. An interrupted build keeps its parts: the
  next one reuses them.

A rerun reuses every entry whose key still matches; a changed clip (new bytes -> new hash) or
another model (new identity: lora.modeling.loading.model_identity) is encoded again, and only that.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from lora.common.cli import UserError, log
from lora.dataprep import cache_store as store
from lora.dataprep import melody_stems
from lora.dataprep.audio import audio_info, load_audio
from lora.dataprep.cache_store import CACHE_VERSION
from lora.dataset import CachedClip, ClipRecord
from lora.modeling import chroma
from lora.modeling.encodec_fast import ENCODER_PRECISION
from lora.modeling.loading import family_for

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

__all__ = ["CACHE_VERSION", "Ranks", "build_token_cache", "cache_root", "clip_chroma",
           "equal_length_batches"]


def cache_root(data_dir: str | Path, info: ModelInfo) -> Path:
    """The cache folder of one model: data_dir/cache/<model identity>-v<CACHE_VERSION>."""
    return Path(data_dir) / "cache" / f"{info.identity}-v{CACHE_VERSION}"


def codes_key(sha1: str, info: ModelInfo) -> str:
    """A clip's key: the sha1 of its file's bytes, the rate and channels it was decoded to and the
    encoder's precision (lora.modeling.encodec_fast.ENCODER_PRECISION), so codes made in another
    precision are never mixed in."""
    return f"{sha1}-sr{info.sample_rate}-ch{info.audio_channels}-{ENCODER_PRECISION}"


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _nothing() -> None:
    return None


def _same(obj):
    return obj


def _alone(obj) -> list:
    return [obj]


@dataclass
class Ranks:
    """The processes that build one cache together (one per GPU): this one's rank, how many, and
    the collective calls train_lora.py takes from accelerate (``broadcast``: the first process's
    object, returned on every process; ``gather``: every process's object, in rank order, on every
    process). One process: the defaults."""

    rank: int = 0
    world: int = 1
    broadcast: Callable[[object], object] = _same
    gather: Callable[[object], list] = _alone


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


def clip_chroma(wave, info: ModelInfo):
    """A clip's melody for the cache: the pitch class (int8) of every chroma frame of its whole
    audio (C, N) (the training crop takes the frames that cover it; lora.modeling.chroma)."""
    import torch

    return chroma.chroma(wave, info.sample_rate, max_seconds=None).argmax(dim=-1).to(torch.int8)


def warn_channel_mixing(counts: Counter, info: ModelInfo) -> dict:
    """Say once when clips are mixed to the model's channel count: stereo clips for a mono model are
    mixed down, mono clips for a stereo model are copied to both channels (no real stereo to learn).
    ``counts``: source channels -> clips (of the clips encoded). Returns the mixed counts."""
    total = sum(counts.values())
    mixed = {int(c): n for c, n in counts.items() if int(c) != info.audio_channels}
    for c, n in sorted(mixed.items()):
        if info.audio_channels == 1:
            how = f"{'stereo' if c == 2 else f'{c}-channel'} but the model is mono: they are mixed down to mono"
        else:
            how = ("mono but the model is stereo: each is copied to both channels, so there is no "
                   "stereo image to learn (prepare the data with --channels 2 from stereo sources)")
        log.warning("%d of %d clip(s) are %s", n, total, how)
    return mixed


# ============================================================================================
# The plan: what to read and encode, in batches (made by the first process)
# ============================================================================================
@dataclass
class Plan:
    """What a build does. ``paths``: each clip file once (record order); ``keys``: its clip key where
    the index knows it and the cache holds it (not read), else None; ``clip_batches``: indices into
    ``paths`` to read, batch j for process j % world; ``text_batches``: indices into the captions
    (each process lists them the same way) to encode."""

    build: str
    keys: list
    clip_batches: list[list[int]] = field(default_factory=list)
    text_batches: list[list[int]] = field(default_factory=list)

    @property
    def work(self) -> bool:
        return bool(self.clip_batches or self.text_batches)


def _index_name(record: ClipRecord) -> str:
    """A clip file's name in the cache index: as metadata.json gives it (relative to the data folder),
    or absolute."""
    return record.audio if not os.path.isabs(record.audio) else os.path.abspath(record.audio)


def _paths(records: list[ClipRecord]) -> list[ClipRecord]:
    """One record per clip file, in record order."""
    seen: dict[str, ClipRecord] = {}
    for r in records:
        seen.setdefault(str(r.path), r)
    return list(seen.values())


def _texts(records: list[ClipRecord]) -> list[str]:
    return list(dict.fromkeys(r.text for r in records))


def make_plan(files: list[ClipRecord], texts: list[str], cat: store.Catalog, info: ModelInfo,
              batch_size: int, text_states: bool, verify: bool) -> Plan:
    """Which clip files must be read (not in the index with their current stat, or their entry not
    cached; all of them with ``verify``), in batches of one planned length (duration order, as
    equal_length_batches makes them), and which captions must be encoded."""
    index = {} if verify else store.read_index(cat.root)
    keys: list = []
    to_read: list[int] = []
    for i, r in enumerate(files):
        known = index.get(_index_name(r))
        key = None
        if known is not None:
            try:
                st = os.stat(r.path)
            except OSError:
                st = None
            if st is not None and store.stat_key(st) == known[:5]:
                key = codes_key(known[5], info)
        if key is not None and key in cat.clips:
            keys.append(key)
        else:
            keys.append(None)
            to_read.append(i)
    size = max(1, int(batch_size))
    to_read.sort(key=lambda i: files[i].duration)
    clip_batches: list[list[int]] = []
    last = None
    for i in to_read:
        length = round(files[i].duration * info.sample_rate)
        if length != last or len(clip_batches[-1]) == size:
            clip_batches.append([])
        clip_batches[-1].append(i)
        last = length
    missing = [j for j, t in enumerate(texts) if text_key(t) not in cat.texts] if text_states else []
    text_batches = [missing[k:k + size] for k in range(0, len(missing), size)]
    return Plan(build=f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}", keys=keys,
                clip_batches=clip_batches, text_batches=text_batches)


# ============================================================================================
# One process's share: read, hash and encode its batches, write parts
# ============================================================================================
def read_clip(path: Path) -> tuple[bytes, list, bool]:
    """A clip file's bytes, read once, with its stat key and whether the index may remember it
    (settled, and unchanged while it was read)."""
    started = time.time_ns()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        data = fh.read()
        after = os.fstat(fh.fileno())
    same = store.stat_key(before) == store.stat_key(after)
    return data, store.stat_key(before), same and store.settled(before, started)


def _source_channels(path: Path, data: bytes) -> int:
    import io

    import soundfile as sf

    try:
        return int(sf.info(io.BytesIO(data)).channels)
    except (RuntimeError, ValueError, sf.LibsndfileError):
        return audio_info(path).channels


class PartWriter:
    """Collects one process's entries and reads, and writes them as parts every PART_ENTRIES entries
    or PART_BYTES bytes, and at the end."""

    def __init__(self, root: Path, build: str, rank: int, identity: dict):
        self.root, self.build, self.rank, self.identity = root, build, rank, identity
        self.items: dict[str, list] = {"clips": [], "texts": []}
        self.reads: dict[str, list] = {}
        self.bytes, self.seq = 0, 0

    def add(self, kind: str, key: str, order: int, pieces: dict) -> None:
        self.items[kind].append((key, order, pieces))
        self.bytes += sum(p.numel() * p.element_size() for p in pieces.values())
        if len(self.items[kind]) >= store.PART_ENTRIES or self.bytes >= store.PART_BYTES:
            self.flush()

    def flush(self) -> None:
        for kind in store.KINDS:
            if self.items[kind] or (kind == "clips" and self.reads):
                store.write_part(self.root, self.build, self.rank, self.seq, kind, self.items[kind],
                                 self.reads if kind == "clips" else {}, self.identity)
                self.seq += 1
                if kind == "clips":
                    self.reads = {}
        self.items = {"clips": [], "texts": []}
        self.bytes = 0


@dataclass
class Share:
    """What one process did: files read, entries encoded, source channel counts."""

    read: int = 0
    texts: int = 0
    channels: Counter = field(default_factory=Counter)
    reads: dict = field(default_factory=dict)  # clip file (index name) -> sha1 of the bytes read

    def state(self, status: str = "running", error: str = "") -> dict:
        return {"clips": self.read, "texts": self.texts, "state": status, "error": error}


def _encode_clip_batch(j: int, batch: list[int], files: list[ClipRecord], ctx: "Context",
                       out: PartWriter, share: Share) -> None:
    """Read the batch's files (hash the bytes, decode the same bytes), and encode those whose key is
    not cached, in groups of one length (a file whose decoded length differs from the plan's is
    encoded with the files of its own length)."""
    import numpy as np
    import torch

    info, fam = ctx.info, family_for(ctx.info)
    waves, seen = [], set()
    for i in batch:
        r = files[i]
        try:
            data, stat, settled = read_clip(r.path)
        except OSError as e:
            raise UserError(f"Cannot read the clip {r.path} ({e.strerror or e}); the metadata lists "
                            f"it. Re-run prepare_data.py (was it changed or removed meanwhile?), "
                            f"or remove it from the metadata.") from None
        sha1 = hashlib.sha1(data).hexdigest()
        out.reads[_index_name(r)] = stat + [sha1, settled]
        share.reads[_index_name(r)] = sha1
        share.read += 1
        key = codes_key(sha1, info)
        if key in ctx.cached or key in seen:
            continue
        seen.add(key)
        wave = load_audio(r.path, info.sample_rate, info.audio_channels, data=data)
        if wave.shape[1] == 0:
            raise UserError(f"Audio file without samples: {r.path}. Remove it from the metadata or "
                            f"re-run prepare_data.py.")
        share.channels[_source_channels(r.path, data)] += 1
        waves.append((key, wave))
    hop = info.sample_rate / info.frame_rate
    for group in equal_length_batches(waves, ctx.batch_size):
        batch_t = torch.from_numpy(np.stack([w for _, w in group]))
        with torch.no_grad():
            dev = batch_t.to(ctx.device) if ctx.device is not None else batch_t
            codes = fam.encode_audio(ctx.model, dev, info).cpu()
        n = group[0][1].shape[1]
        frames = min(codes.shape[-1], max(1, math.ceil(n / hop)))
        for k, (key, wave) in enumerate(group):
            pieces = {"codes": codes[k, :, :frames].to(torch.int16).T.contiguous()}
            if fam.MELODY:  # the clip's own melody: its chroma, kept beside its codes (same key)
                pieces["chroma"] = clip_chroma(wave, info)
            out.add("clips", key, j, pieces)


def _encode_text_batch(j: int, batch: list[int], texts: list[str], ctx: "Context",
                       out: PartWriter, share: Share) -> None:
    """Frozen text-encoder states (valid tokens only) of a batch of captions."""
    import torch

    chunk = [texts[k] for k in batch]
    with torch.no_grad():
        hidden, mask = family_for(ctx.info).encode_text(ctx.model, ctx.processor, chunk, device=ctx.device)
    hidden, mask = hidden.float().cpu(), mask.long().cpu()
    for i, text in enumerate(chunk):
        valid = max(1, int(mask[i].sum()))
        out.add("texts", text_key(text), j, {"hidden": store.narrow_text(hidden[i, :valid].clone()),
                                             "mask": mask[i, :valid].to(torch.int8)})
    share.texts += len(chunk)


@dataclass
class Context:
    """What encoding needs, for one process."""

    model: object
    processor: object
    info: object
    device: object
    batch_size: int
    cached: set


def _bars(plan: Plan, show: bool):
    from tqdm.auto import tqdm

    n_clips = sum(len(b) for b in plan.clip_batches)
    n_texts = sum(len(b) for b in plan.text_batches)
    clips = tqdm(total=n_clips, desc="encoding audio (EnCodec)", unit="clip",
                 disable=not show or not n_clips)
    texts = tqdm(total=n_texts, desc="encoding captions (text encoder)", unit="text",
                 disable=not show or not n_texts, position=1 if n_clips else 0)
    return clips, texts


def _show(bars, progress: dict[int, dict]) -> None:
    for bar, what in zip(bars, ("clips", "texts")):
        done = sum(p.get(what, 0) for p in progress.values())
        bar.update(done - bar.n)


def _run_share(plan: Plan, files, texts, ctx: Context, root: Path, ranks: Ranks, identity: dict,
               show: bool) -> Share:
    """This process's batches; progress written after each (the first process shows everyone's);
    the first process waits until every process is done (a failed one stops it with its message)."""
    share = Share()
    out = PartWriter(root, plan.build, ranks.rank, identity)
    bars = _bars(plan, show and ranks.rank == 0)
    mine = [("clips", j, b) for j, b in enumerate(plan.clip_batches) if j % ranks.world == ranks.rank]
    mine += [("texts", j, b) for j, b in enumerate(plan.text_batches) if j % ranks.world == ranks.rank]
    try:
        for kind, j, batch in mine:
            if kind == "clips":
                _encode_clip_batch(j, batch, files, ctx, out, share)
            else:
                _encode_text_batch(j, batch, texts, ctx, out, share)
            _progress(root, plan, ranks, share, bars)
        out.flush()
    except BaseException as e:
        if ranks.world > 1:
            store.write_progress(root, plan.build, ranks.rank, share.state("failed", str(e)[:500]))
        raise
    if ranks.world > 1:
        store.write_progress(root, plan.build, ranks.rank, share.state("done"))
    if ranks.rank == 0 and ranks.world > 1:
        store.wait_for(root, plan.build, ranks.world, lambda p: _all_done(p, bars))
    for bar in bars:
        bar.close()
    return share


def _progress(root: Path, plan: Plan, ranks: Ranks, share: Share, bars) -> None:
    if ranks.world > 1:
        store.write_progress(root, plan.build, ranks.rank, share.state())
    if ranks.rank == 0:
        prog = store.read_progress(root, plan.build, ranks.world) if ranks.world > 1 else {}
        prog[0] = share.state()
        _show(bars, prog)


def _all_done(progress: dict[int, dict], bars) -> bool:
    _show(bars, progress)
    for r, p in progress.items():
        if p.get("state") == "failed":
            raise UserError(f"Process {r} of the token cache build failed: {p.get('error')}. Its "
                            f"finished parts are kept; fix the cause and start again to resume.")
    return all(p.get("state") == "done" for p in progress.values())


# ============================================================================================
# The build
# ============================================================================================
def build_token_cache(records: list[ClipRecord], model: nn.Module, processor, info: ModelInfo,
                      data_dir: str | Path, *,
                      batch_size: int = 8, device: torch.device | None = None, text_states: bool = True,
                      show_progress: bool = True, verify: bool = False,
                      ranks: Optional[Ranks] = None, melody_separator=None) -> tuple[list[CachedClip], dict]:
    """Encode every clip (EnCodec codes) and caption (frozen text-encoder states) not yet cached;
    return all, memory-mapped.

    Returns the cached clips in the order of ``records`` and counts {"clips_encoded",
    "clips_reused", "texts_encoded", "texts_reused", "clips_read", "by_rank"} (the same on every
    process). ``text_states=False`` skips the text cache (the text encoder trains). ``batch_size``
    clips of the same length are encoded together; a clip is never padded (its codes do not depend
    on the other clips). ``verify``: read and hash every clip file and check every shard (the cache
    index is not trusted). ``ranks``: the processes that build it together (every one calls this).
    Melody models: ``melody_separator`` (lora.dataprep.melody_stems) makes each clip's chroma from
    its stems instead of the mix.
    """
    ranks = ranks or Ranks()
    root = cache_root(data_dir, info)
    files, texts = _paths(records), _texts(records) if text_states else []
    plan = None
    if ranks.rank == 0:
        if verify and root.is_dir():
            with store.locked(root):
                store.verify_shards(root)
        with store.locked(root, write=False):
            cat = store.scan(root)
        plan = make_plan(files, texts, cat, info, batch_size, text_states, verify)
    if ranks.world > 1:
        plan = ranks.broadcast(plan)
        if ranks.rank != 0 and plan.work:
            cat = store.scan(root, exclude_build=plan.build)
    stats = {"clips_read": 0, "by_rank": {}}
    keys = list(plan.keys)
    if plan.work:
        identity = {"model": str(info.name_or_path), "identity": str(info.identity),
                    "precision": ENCODER_PRECISION, "sample_rate": str(info.sample_rate),
                    "channels": str(info.audio_channels)}
        ctx = Context(model, processor, info, device, batch_size, set(cat.clips))
        share = _run_share(plan, files, texts, ctx, root, ranks, identity, show_progress)
        shares = ranks.gather((share.reads, dict(share.channels)))  # (every process is done)
        reads = {k: v for r, _ in shares for k, v in r.items()}
        for i, r in enumerate(files):
            if keys[i] is None and _index_name(r) in reads:
                keys[i] = codes_key(reads[_index_name(r)], info)
        if ranks.rank == 0:
            warn_channel_mixing(sum((Counter(c) for _, c in shares), Counter()), info)
            started = time.perf_counter()
            joined = store.join(root, plan.build, identity)
            by_rank = {r: joined.by_rank.get(r, {"clips": 0, "texts": 0}) for r in range(ranks.world)}
            stats = {"clips_read": len(reads), "by_rank": by_rank,
                     "join_seconds": round(time.perf_counter() - started, 3)}
        if ranks.world > 1:
            stats = ranks.broadcast(stats)
    clips, stats = _assemble(records, files, keys, root, info, text_states, stats)
    if melody_separator is not None and family_for(info).MELODY:
        by_path = {str(r.path): k for r, k in zip(files, keys)}
        clip_keys = [by_path[str(r.path)] for r in records]
        # the first process separates what is missing (demucs once per clip, not once per process);
        # the others wait for it, then read the stems' chroma it wrote
        if ranks.rank == 0:
            clips, computed = melody_stems.stem_chromas(clips, records, clip_keys, root, info,
                                                        melody_separator, show_progress)
        if ranks.world > 1:
            computed = ranks.broadcast(computed if ranks.rank == 0 else None)
            if ranks.rank != 0:
                clips, _ = melody_stems.stem_chromas(clips, records, clip_keys, root, info,
                                                     melody_separator, False)
        stats["stem_chromas_computed"] = computed
    return clips, stats


def _assemble(records, files, keys, root: Path, info: ModelInfo, text_states: bool,
              stats: dict) -> tuple[list[CachedClip], dict]:
    """Every record's clip: views into the memory-mapped shards (under the lock: a join elsewhere
    cannot remove a file between the listing and the mapping)."""
    by_path = {str(r.path): k for r, k in zip(files, keys)}
    with store.locked(root, write=False):
        cat = store.scan(root)
        clips, missing = [], []
        for r in records:
            key = by_path[str(r.path)]
            f = cat.clips.get(key) if key else None
            t = cat.texts.get(text_key(r.text)) if text_states else None
            if f is None or (text_states and t is None):
                missing.append(r.audio if f is None else f"caption of {r.audio}")
                continue
            pieces = f.get(key)
            hid = t.get(text_key(r.text)) if t is not None else {}
            clips.append(CachedClip(id=r.id, text=r.text, split=r.split, codes=pieces["codes"].T,
                                    hidden=hid.get("hidden"), mask=hid.get("mask"),
                                    chroma=pieces.get("chroma")))
    if missing:
        raise UserError(f"The token cache {root} lacks {len(missing)} entr(ies) it was just built "
                        f"with (e.g. {missing[0]}): another process changed it meanwhile. Start "
                        f"again (it reuses what is there).")
    enc = {k: sum(c.get(k, 0) for c in stats["by_rank"].values()) for k in ("clips", "texts")}
    stats.update(clips_encoded=enc["clips"], clips_reused=len(set(keys)) - enc["clips"],
                 texts_encoded=enc["texts"],
                 texts_reused=(len({r.text for r in records}) - enc["texts"]) if text_states else 0)
    _log(root, stats)
    if len(stats["by_rank"]) <= 1:  # one process: the totals say it all
        stats.pop("by_rank")
    return clips, stats


def _log(root: Path, stats: dict) -> None:
    log.info("Token cache %s: %d clip(s) encoded, %d reused; %d caption(s) encoded, %d reused", root,
             stats["clips_encoded"], stats["clips_reused"], stats["texts_encoded"],
             stats["texts_reused"])
    if stats["clips_read"]:
        log.info("  %d clip file(s) read (new, changed, or not yet in the cache index); the others "
                 "are known by their size and times, not read", stats["clips_read"])
    if len(stats["by_rank"]) > 1:  # several processes built it
        log.info("  encoded by rank: %s (joined in %.1f s)", "; ".join(
            f"{r}: {c['clips']} clip(s), {c['texts']} caption(s)" for r, c in sorted(stats["by_rank"].items())),
                 stats.get("join_seconds", 0.0))
