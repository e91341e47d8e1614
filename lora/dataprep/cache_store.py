"""The token cache on disk: shard files of many entries, memory-mapped when read; the parts a build
writes as it goes and their join into shards; the cache index that tells a clip file's content hash
from its stat, so that a warm start reads no audio.

Layout of ``data_dir/cache/<model identity>-v<CACHE_VERSION>/``::

    shards/clips-<sha1 of the file>.safetensors   codes of many clips, joined (immutable; the name is
                                                  the file's own sha1, which --verify_cache checks)
    shards/texts-<sha1 of the file>.safetensors   text-encoder states of many captions, joined
    parts/<build>-r<rank>-<n>.safetensors         what one process of a build has encoded so far;
                                                  joined into shards at the build's end (an
                                                  interrupted build's parts are kept: the next build
                                                  reuses them and joins them)
    parts/progress-<build>-r<rank>.json           how far each process is (the progress bar of the
                                                  first process counts every process's work)
    index.json                                    clip file -> (device, inode, size, mtime_ns,
                                                  ctime_ns, sha1 of its bytes)
    join.lock                                     joins and reads take turns

A shard or part is a safetensors file: each tensor is the concatenation, along its first dimension,
of every entry's piece, and the metadata's ``entries`` says where each entry's pieces are::

    clips:  "codes"  int16 (sum T, K)    a clip's codes are rows [start, start + T), i.e. (K, T) transposed
            "chroma" int8 (sum Tc,)      melody models: each chroma frame's pitch class
    texts:  "hidden" float16 (sum L, D)  T5 states of the valid tokens (float32 only where a state would
                                         not fit float16)
            "mask"   int8 (sum L,)
    metadata "token_cache" (JSON): format, version, kind ("clips" | "texts"), names (the tensors),
              entries: [[key, order, start_0, length_0, start_1, length_1, ...], ...], the model's
              identity, sample rate, channels and encoder precision, and in parts also build, rank
              and reads (the clip files read: path -> stat key, sha1, settled)

Every file is written whole to a temporary name and renamed into place (lora.common.files.atomic_path):
a process killed while writing leaves a ``.*.tmp`` file that nothing reads, never a part or shard
that looks valid. No file is ever changed in place, only written under a new name and removed
(a mapped file truncated under a process that reads it would crash that process with SIGBUS;
removing it is safe: the process keeps the pages it mapped).

Keys: a clip's is the sha1 of the bytes that were decoded and encoded (with the sample rate,
channels and encoder precision); a caption's is the sha1 of its text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import log
from lora.common.files import atomic_path, atomic_write_json, file_lock, fsync_dir

if TYPE_CHECKING:
    import torch

FORMAT = "musicgen-lora-token-cache"
META_KEY = "token_cache"  # the safetensors metadata key that holds the file's description (JSON)
# 4: shards of many entries (memory-mapped), text states in float16, keys from the bytes decoded
# 3: the codes' key names the encoder precision; 2: no clip padded to its batch
CACHE_VERSION = 4
INDEX_VERSION = 1
# A joined shard holds about this many bytes of tensors (a few shards per 100 hours of audio).
SHARD_BYTES = 256 << 20
# A build writes a part after this many entries or bytes (what an interrupted build can lose).
PART_ENTRIES = 1024
PART_BYTES = 64 << 20
# More shards of a kind than this: the join rewrites the small ones into one (incremental builds).
MAX_SHARDS = 16
# A clip file changed less than this before it was read is not remembered by its stat: a second
# change within the file system's timestamp granularity could keep the stat (see ``settled``).
RACY_SECONDS = 2.0
KINDS = ("clips", "texts")


class DamagedFile(Exception):
    """A shard or part that cannot be read, or whose entries do not fit its tensors."""


# --------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------
@dataclass
class CacheFile:
    """A shard or part: its entry table (read from the header alone) and, when an entry is asked
    for, its tensors, memory-mapped (safetensors): the pages are the file's, shared by every
    process that maps it, not this process's heap."""

    path: Path
    kind: str
    names: list[str]
    entries: dict[str, tuple]            # key -> (order, start_0, length_0, ...)
    reads: dict[str, list] = field(default_factory=dict)
    build: str = ""
    rank: int = 0
    _tensors: Optional[dict] = None

    @classmethod
    def open(cls, path: Path) -> "CacheFile":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
                raise DamagedFile(f"not a token cache file of this format ({meta.get('format')!r})")
            names = list(meta["names"])
            entries = {row[0]: tuple(row[1:]) for row in meta["entries"]}
            reads = dict(meta.get("reads", {}))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedFile(str(e)[:300]) from None
        for key, row in entries.items():
            spans = row[1:]
            if len(spans) != 2 * len(names) or any(
                    s < 0 or n < 0 or s + n > shapes.get(name, [0])[0]
                    for name, s, n in zip(names, spans[0::2], spans[1::2])):
                raise DamagedFile(f"entry {key} lies outside the file's tensors")
        return cls(path=path, kind=meta["kind"], names=names, entries=entries, reads=reads,
                   build=meta.get("build", ""), rank=int(meta.get("rank", 0)))

    def tensors(self) -> dict:
        if self._tensors is None:
            from safetensors.torch import load_file

            self._tensors = load_file(str(self.path))  # memory-mapped (safetensors' default backend)
        return self._tensors

    def get(self, key: str) -> dict:
        """An entry's pieces: views into the mapped tensors (no copy)."""
        row, t = self.entries[key], self.tensors()
        return {name: t[name][s:s + n] for name, s, n in zip(self.names, row[1::2], row[2::2])}


# --------------------------------------------------------------------------------------------
# What the cache holds
# --------------------------------------------------------------------------------------------
@dataclass
class Catalog:
    """Every entry of a cache folder: key -> the file holding it, per kind. Shards come first, then
    parts (of earlier, interrupted builds, or of builds running now in other processes)."""

    root: Path
    clips: dict[str, CacheFile] = field(default_factory=dict)
    texts: dict[str, CacheFile] = field(default_factory=dict)
    files: list[CacheFile] = field(default_factory=list)
    damaged: list[tuple[Path, str]] = field(default_factory=list)

    def of(self, kind: str) -> dict[str, CacheFile]:
        return self.clips if kind == "clips" else self.texts


def _listed(folder: Path) -> list[Path]:
    """The finished files of a folder (a name starting with "." is one being written)."""
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))


def shard_files(root: Path) -> list[Path]:
    return _listed(root / "shards")


def part_files(root: Path) -> list[Path]:
    return _listed(root / "parts")


def scan(root: Path, exclude_build: str = "") -> Catalog:
    """The catalog of ``root`` (headers only: nothing is mapped yet). Parts of ``exclude_build`` (the
    build running now) are left out. A damaged file is logged and set aside (renamed to
    ``*.damaged``; its entries are then encoded again)."""
    cat = Catalog(root)
    for path in shard_files(root) + part_files(root):
        try:
            f = CacheFile.open(path)
        except FileNotFoundError:
            continue  # joined and removed by another process since it was listed
        except DamagedFile as e:
            log.warning("Token cache file %s is damaged (%s); its entries are encoded again.", path, e)
            cat.damaged.append((path, str(e)))
            with contextlib.suppress(OSError):  # set aside: said once, not read again
                os.replace(path, path.with_suffix(".damaged"))
            continue
        if exclude_build and f.build == exclude_build:
            continue
        cat.files.append(f)
        table = cat.of(f.kind)
        for key in f.entries:
            table.setdefault(key, f)
    return cat


@contextlib.contextmanager
def locked(root: Path, write: bool = True):
    """Joins (and the reads that must see a whole join) take turns, across processes. A reader
    (``write=False``) of a cache it cannot write to (a read-only disk) reads without the lock:
    nobody joins there."""
    import errno

    with contextlib.ExitStack() as stack:
        if write:
            root.mkdir(parents=True, exist_ok=True)
        try:
            stack.enter_context(file_lock(root / "join.lock"))
        except OSError as e:
            if write or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                raise
        yield


def verify_shards(root: Path) -> list[Path]:
    """Re-hash every shard and compare with its name; a shard whose bytes changed is renamed to
    ``*.damaged`` (its entries are then encoded again). Returns those."""
    bad = []
    for path in shard_files(root):
        digest = path.stem.split("-", 1)[-1]
        if _file_sha1(path)[:len(digest)] != digest:
            log.warning("Token cache shard %s does not match its checksum; its entries are encoded "
                        "again.", path)
            os.replace(path, path.with_suffix(".damaged"))
            bad.append(path)
    return bad


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for b in iter(lambda: fh.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The cache index: clip file stat -> content hash
# --------------------------------------------------------------------------------------------
def stat_key(st: os.stat_result) -> list[int]:
    """What says a clip file is the one that was hashed: device, inode, size, modification and
    status-change times (ns). A rewrite, a copy over it, a rename of another file onto its path, or
    restoring its mtime afterwards (which sets ctime) each change it."""
    return [int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns)]


def settled(st: os.stat_result, read_started_ns: int) -> bool:
    """True when a file read from ``read_started_ns`` on may be remembered by its stat: its last
    change is RACY_SECONDS older than the read, so a later change gets another mtime or ctime even
    on a file system with coarse timestamps."""
    return read_started_ns - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_SECONDS * 1e9


def index_path(root: Path) -> Path:
    return root / "index.json"


def read_index(root: Path) -> dict[str, list]:
    """{clip file: stat_key + [sha1]}; {} when missing or damaged (then files are hashed again)."""
    path = index_path(root)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or doc.get("version") != INDEX_VERSION:
            return {}
        return {k: v for k, v in doc["files"].items() if isinstance(v, list) and len(v) == 6}
    except (OSError, ValueError, AttributeError, KeyError) as e:
        log.warning("Token cache index %s is damaged (%s); clip files are hashed again.", path,
                    str(e)[:200])
        return {}


def _write_index(root: Path, files: dict[str, list]) -> None:
    atomic_write_json(index_path(root), {"format": FORMAT, "version": INDEX_VERSION,
                                         "files": dict(sorted(files.items()))})


# --------------------------------------------------------------------------------------------
# Writing: parts, shards
# --------------------------------------------------------------------------------------------
def narrow_text(hidden: torch.Tensor) -> torch.Tensor:
    """A caption's states as the cache keeps them: float16, unless a value does not fit (then
    float32, unchanged)."""
    import torch

    if hidden.dtype == torch.float16:
        return hidden
    h16 = hidden.to(torch.float16)
    return h16 if bool(torch.isfinite(h16).all()) else hidden.float()


def _concat(kind: str, items: list[tuple[str, int, dict]]) -> tuple[dict, list[str], list[list]]:
    """Tensors, tensor names and entry rows of entries (key, order, {name: piece})."""
    import torch

    names = list(items[0][2]) if items else []
    if any(list(p) != names for _, _, p in items):
        raise ValueError("entries of one file must have the same tensors")
    rows, starts = [], dict.fromkeys(names, 0)
    for key, order, pieces in items:
        row = [key, int(order)]
        for name in names:
            n = int(pieces[name].shape[0])
            row += [starts[name], n]
            starts[name] += n
        rows.append(row)
    tensors = {}
    for name in names:
        parts = [p[name] for _, _, p in items]
        if name == "hidden" and any(p.dtype != torch.float16 for p in parts):
            parts = [p.float() for p in parts]  # a state that does not fit float16: the file is float32
        tensors[name] = torch.cat(parts).contiguous()
    return tensors, names, rows


def _write(path: Path, kind: str, items: list[tuple[str, int, dict]], extra: dict) -> None:
    from safetensors.torch import save_file

    tensors, names, rows = _concat(kind, items)
    doc = {"format": FORMAT, "version": CACHE_VERSION, "kind": kind, "names": names, "entries": rows,
           **extra}
    # one metadata key, its JSON sorted: safetensors writes several keys in no fixed order, and the
    # same entries must make the same bytes
    meta = {META_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))}
    with atomic_path(path, suffix=".tmp") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def write_part(root: Path, build: str, rank: int, seq: int, kind: str, items: list, reads: dict,
               identity: dict) -> Path:
    """One part of a build: entries (key, order, {name: piece}) and the clip files read."""
    path = root / "parts" / f"{build}-r{rank:03d}-{seq:05d}.safetensors"
    _write(path, kind, items, {"build": build, "rank": rank, "reads": reads, **identity})
    return path


def write_shards(root: Path, kind: str, items: list[tuple[str, int, dict]], identity: dict) -> list[Path]:
    """Entries (sorted by key) into shards of about SHARD_BYTES, each named by its own sha1."""
    items = sorted(items, key=lambda it: it[0])
    out, group, size = [], [], 0
    for it in items:
        group.append(it)
        size += sum(p.numel() * p.element_size() for p in it[2].values())
        if size >= SHARD_BYTES or it is items[-1]:
            tmp = root / "shards" / f".{kind}-new.safetensors"
            _write(tmp, kind, [(k, 0, p) for k, _, p in group], identity)
            final = root / "shards" / f"{kind}-{_file_sha1(tmp)}.safetensors"
            os.replace(tmp, final)
            fsync_dir(final.parent)
            out.append(final)
            group, size = [], 0
    return out


# --------------------------------------------------------------------------------------------
# The join
# --------------------------------------------------------------------------------------------
@dataclass
class JoinResult:
    added: dict[str, int]                    # kind -> new entries now in shards
    by_rank: dict[int, dict[str, int]]       # this build's new entries, by the rank that encoded them
    reads: dict[str, list]                   # clip file -> stat + [sha1, settled] (this build's parts)


def join(root: Path, build: str, identity: dict) -> JoinResult:
    """Under the lock: every part's entries that no shard holds go into new shards (for one key in
    several parts: the lowest order of the earliest build), the index gains the parts' settled
    reads, the parts and this build's progress files go. The shards depend only on the entries, not
    on how many processes made them."""
    with locked(root):
        cat = scan(root)
        shards = {k: {key for key, f in cat.of(k).items() if f.path.parent.name == "shards"} for k in KINDS}
        parts = [f for f in cat.files if f.path.parent.name == "parts"]
        chosen: dict[str, dict[str, tuple]] = {k: {} for k in KINDS}
        for f in parts:
            for key, row in f.entries.items():
                if key in shards[f.kind]:
                    continue
                best = chosen[f.kind].get(key)
                if best is None or (row[0], f.path.name) < (best[1], best[0].path.name):
                    chosen[f.kind][key] = (f, row[0])
        by_rank: dict[int, dict[str, int]] = {}
        for kind in KINDS:
            for f, _ in chosen[kind].values():
                if f.build == build:
                    counts = by_rank.setdefault(f.rank, {"clips": 0, "texts": 0})
                    counts[kind] += 1
            items = [(key, 0, f.get(key)) for key, (f, _) in chosen[kind].items()]
            if items:
                write_shards(root, kind, items, identity)
            compact(root, kind, identity)
        reads, this_build = {}, {}
        for f in parts:
            reads.update(f.reads)
            if f.build == build:
                this_build.update(f.reads)
        index = read_index(root)
        stale = [p for p, r in this_build.items() if p in index and index[p][:5] == r[:5]
                 and index[p][5] != r[5]]
        if stale:  # (only --verify_cache reads a file the index knows by its current stat)
            log.warning("%d clip file(s) changed without a change of size or times (e.g. %s): the "
                        "cache index is corrected and they are encoded again.", len(stale), stale[0])
        for p, r in reads.items():  # r: stat_key + [sha1, settled]
            if r[6]:
                index[p] = r[:6]
            else:
                index.pop(p, None)
        _write_index(root, {p: r for p, r in index.items() if os.path.exists(_abs(root, p))})
        for f in parts:
            f.path.unlink(missing_ok=True)
        day = time.time() - 86400
        ended = {build} | _failed_builds(root)  # (a build with a failed process is over)
        for p in (root / "parts").glob("progress-*.json"):  # those builds', and any a day old
            with contextlib.suppress(OSError):
                if any(p.name.startswith(f"progress-{b}-") for b in ended) or p.stat().st_mtime < day:
                    p.unlink()
        fsync_dir(root / "parts")
        return JoinResult({k: len(chosen[k]) for k in KINDS}, by_rank, this_build)


def _failed_builds(root: Path) -> set[str]:
    """Builds one of whose processes wrote "failed" in its progress file: over (their first process
    stopped with that error), so their progress files can go. A running build's are kept."""
    out = set()
    for p in (root / "parts").glob("progress-*-r*.json"):
        try:
            state = json.loads(p.read_text(encoding="utf-8")).get("state")
        except (OSError, ValueError, AttributeError):
            continue
        if state == "failed":
            out.add(p.name[len("progress-"):].rsplit("-r", 1)[0])
    return out


def _abs(root: Path, path: str) -> str:
    """An index key (relative to the data folder, or absolute) as a path."""
    return path if os.path.isabs(path) else str(root.parent.parent / path)


def compact(root: Path, kind: str, identity: dict) -> None:
    """More than MAX_SHARDS shards of a kind (many small incremental builds): the small ones (under
    half of SHARD_BYTES) are rewritten into one, then removed."""
    files = [p for p in shard_files(root) if p.name.startswith(f"{kind}-")]
    small = [p for p in files if p.stat().st_size < SHARD_BYTES // 2]
    if len(files) <= MAX_SHARDS or len(small) < 2:
        return
    opened = [CacheFile.open(p) for p in small]
    items = {}
    for f in opened:
        for key in f.entries:
            items.setdefault(key, (key, 0, f.get(key)))
    write_shards(root, kind, list(items.values()), identity)
    for p in small:
        p.unlink()


# --------------------------------------------------------------------------------------------
# Progress of every process of a build
# --------------------------------------------------------------------------------------------
def progress_path(root: Path, build: str, rank: int) -> Path:
    return root / "parts" / f"progress-{build}-r{rank:03d}.json"


def write_progress(root: Path, build: str, rank: int, state: dict) -> None:
    """How far this process is (no fsync: it only feeds the progress bar)."""
    path = progress_path(root, build, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, path)


def read_progress(root: Path, build: str, world: int) -> dict[int, dict]:
    out = {}
    for r in range(world):
        try:
            out[r] = json.loads(progress_path(root, build, r).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            out[r] = {}
    return out


def wait_for(root: Path, build: str, world: int, done, poll: float = 0.2) -> dict[int, dict]:
    """Poll the progress of every process until ``done(progress)``; returns the last progress."""
    while True:
        prog = read_progress(root, build, world)
        if done(prog):
            return prog
        time.sleep(poll)
