"""Who wrote what in an output folder: the one ownership rule of every script that writes a folder
(prepare_data, train_lora, inference_lora, evaluate, export_model, and the web UI through them).

The rule, checked before anything is written:

1. a model's folder is never an output: no entry a script writes may be, lie inside or hold the
   base model or an adapter it reads, nor any folder that holds a model or an adapter (config.json of
   a model, adapter_config.json) that the script did not write itself;
2. an entry the script would write or delete that it did not write is refused, naming it, and
   nothing is changed (the user moves it, or chooses another folder);
3. what the script wrote earlier is replaced only with its overwrite flag (--overwrite,
   --overwrite_output_dir), or, for a script whose rerun is the way to update its results
   (evaluate.py, prepare_data.py), by the rerun itself; never anything else.

What a script wrote is known from its record: a small ``.written_by_<script>.json`` next to what it
wrote (``record_written`` adds names to it before they are written, so a crash leaves a name
recorded, never a file unrecorded), or from the script's own state files where it keeps them
(prepare_data's prepare_state.json, train_lora's trainer_state.json, inference's manifest.json): a
script passes that knowledge as ``ours``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

from lora.common.cli import UserError, clip_text
from lora.common.files import atomic_write_json

RECORD_VERSION = 1
SHOWN = 10  # entries named in a message (then "... and N more")


def record_path(folder: str | os.PathLike, tool: str) -> Path:
    """The record of ``tool`` (a script name such as "evaluate.py") in ``folder``."""
    return Path(folder) / f".written_by_{Path(tool).stem}.json"


def read_record(folder: str | os.PathLike, tool: str) -> set[str]:
    """The names (relative paths) ``tool`` recorded as written in ``folder``; empty when there is no
    readable record (then nothing there counts as the tool's, unless its ``ours`` says so)."""
    try:
        doc = json.loads(record_path(folder, tool).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    names = doc.get("written") if isinstance(doc, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def record_document(tool: str, names: Iterable[str]) -> dict:
    return {"version": RECORD_VERSION, "tool": tool,
            "about": f"What {tool} wrote in this folder: it replaces or deletes only these, and "
                     f"refuses to write over anything else.",
            "written": sorted(set(names))}


def record_written(folder: str | os.PathLike, tool: str, names: Iterable[str],
                   keep: bool = True) -> None:
    """Add ``names`` to the record (``keep=False``: the record becomes exactly ``names``). Call it
    before writing them."""
    names = set(names) | (read_record(folder, tool) if keep else set())
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path(folder, tool), record_document(tool, names))


def _overlaps(a: Path, b: Path) -> bool:
    """a is b, lies inside b, or holds b."""
    return a == b or b in a.parents or a in b.parents


def looks_like_model(folder: Path) -> Optional[str]:
    """'a model' / 'a LoRA adapter' when ``folder`` holds one (config.json of a transformers model,
    adapter_config.json of a peft adapter), else None."""
    if (folder / "adapter_config.json").is_file():
        return "a LoRA adapter"
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(doc, dict) and "model_type" in doc:
            return "a model"
    return None


def _listing(paths: list[Path]) -> str:
    shown = "\n  ".join(clip_text(str(p), 300) for p in paths[:SHOWN])
    more = f"\n  ... and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return f"\n  {shown}{more}"


def _targets(folder: Path, writes: Optional[Iterable[str]]) -> list[Path]:
    """The entries a script writes or deletes: ``folder / name`` for each name of ``writes``, or
    every entry of the folder (None: the folder is replaced as a whole)."""
    if writes is None:
        return sorted(folder.iterdir()) if folder.is_dir() else []
    return [folder / n for n in dict.fromkeys(writes)]


def _model_paths(models: Iterable) -> list[tuple[str, Path]]:
    """(label, resolved folder) of each model a script reads: a path, or (label, path)."""
    out = []
    for m in models:
        label, path = m if isinstance(m, tuple) else ("the model", m)
        if path and Path(str(path)).expanduser().exists():
            out.append((label, Path(str(path)).expanduser().resolve()))
    return out


def check_not_model(folder: Path, targets: list[Path], models: Iterable, tool: str, flag: str,
                    recorded: set[str]) -> None:
    """Rule 1: a model's folder (the base model, an adapter, or any folder that holds one) is never
    an output. ``models``: the folders the script reads, each a path or (label, path)."""
    folder = folder.resolve()
    for label, m in _model_paths(models):
        hit = folder if (m == folder or m in folder.parents) else next(
            (t for t in targets if _overlaps(t.resolve(), m)), None)
        if hit is not None:
            raise UserError(f"{flag} {folder} would overwrite or sit inside {label} {m} that {tool} "
                            f"reads: a model's folder is never an output. Nothing was written. "
                            f"Choose a folder of its own (e.g. a new folder under output/).")
    kind = looks_like_model(folder) if folder.is_dir() else None
    mine = {"config.json", "adapter_config.json"} & recorded
    if kind and not mine:
        raise UserError(f"{flag} {folder} holds {kind} that {tool} did not write: a model's folder "
                        f"is never an output. Nothing was written. Choose a folder of its own "
                        f"(e.g. a new folder under output/).")


def claim_output(folder: str | os.PathLike, tool: str, *, writes: Optional[Iterable[str]] = None,
                 ours: Optional[Callable[[Path], list[Path]]] = None,
                 overwrite: Optional[bool] = None, models: Iterable = (),
                 flag: str = "--output_dir", overwrite_flag: str = "--overwrite",
                 earlier_hint: str = "") -> list[Path]:
    """The ownership rule (module docstring), checked before anything is written; UserError when
    it does not hold, and nothing is changed. Returns the entries of an earlier run of ``tool``
    that this run will replace.

    ``writes``: the names (relative to ``folder``) the script writes or deletes; None: it replaces
    the folder as a whole (every entry counts). ``ours(entry)``: the parts of an existing entry that
    the script did not write ([] = all of it is the script's; default: the entry is the script's
    when its name is in the record). ``overwrite``: None = a rerun replaces the script's earlier
    output; False = it is refused (naming ``overwrite_flag``, plus ``earlier_hint``); True = it is
    replaced. ``models``: the model folders the script reads."""
    folder = Path(folder)
    recorded = read_record(folder, tool)
    targets = _targets(folder, writes)
    check_not_model(folder, targets, models, tool, flag, recorded)
    if ours is None:
        def ours(entry: Path) -> list[Path]:
            return [] if entry.relative_to(folder).as_posix() in recorded else [entry]
    skip = {record_path(folder, tool).name}
    earlier, foreign = [], []
    for t in targets:
        if t.name in skip or not (t.exists() or t.is_symlink()):
            continue
        alien = [t] if t.is_symlink() else ours(t)
        if alien:
            foreign += alien
        else:
            earlier.append(t)
    if foreign:
        raise UserError(f"{folder} holds files that {tool} did not write, where it would write:"
                        f"{_listing(foreign)}\nNothing was deleted or changed. {overwrite_flag} "
                        f"replaces only what {tool} wrote: move these elsewhere, or choose another "
                        f"{flag}.")
    if earlier and overwrite is False:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in earlier[:SHOWN])
        how = f"{earlier_hint}{'p' if earlier_hint else 'P'}ass {overwrite_flag}"
        raise UserError(f"{folder} already holds what an earlier run of {tool} wrote ({names}). "
                        f"Nothing was changed. {how} to replace it (only what {tool} wrote), or "
                        f"choose another {flag}.")
    return earlier


def remove_entries(paths: Iterable[Path]) -> None:
    """Delete entries ``claim_output`` returned as the script's own (files and folders)."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
