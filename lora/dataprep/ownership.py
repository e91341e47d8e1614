"""Ownership of a prepared data folder: prepare_data.py's state file lists what it wrote, so it
never clobbers what another run or the user wrote, and refuses input and output folders that overlap
before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, log
from lora.common.ownership import claim_output
from lora.config import Config
from lora.dataprep import audio as A
from lora.dataset import SPLITS, metadata_path
from lora.modeling.loading import local_model_folder

STATE_FILE = "prepare_state.json"
REPORT_FILE = "prepare_report.json"
CONFIG_FILE = "prepare_config.yaml"
STATE_VERSION = 1


# ============================================================================================
# Ownership of the output folder (never clobber what another run or the user wrote)
# ============================================================================================
def _load_state(data_dir: Path, overwrite: bool = False) -> dict:
    """prepare_state.json of data_dir ({} when there is none). A damaged one (not JSON, not an
    object) is a UserError: without it prepare_data cannot tell its own clips from other files;
    --overwrite rebuilds."""
    p = data_dir / STATE_FILE
    if not p.is_file():
        return {}
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
        damage = "" if isinstance(s, dict) else f"it holds a JSON {type(s).__name__}, not an object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        damage = f"it is not valid JSON: {e}"
    except OSError as e:
        damage = f"it cannot be read: {e.strerror or e}"
    if damage and overwrite:
        log.warning("%s is damaged (%s); --overwrite: rebuilding the dataset (files it listed that "
                    "are not made again are left in place)", p, damage)
        return {}
    if damage:
        raise UserError(f"{p} is damaged ({damage}). It records which files in {data_dir} "
                        f"prepare_data made, so without it nothing there can be reused or cleaned "
                        f"up safely; nothing was changed. Pass --overwrite to rebuild the dataset "
                        f"(every clip is made again; files it cannot tell are its own are not "
                        f"deleted), or restore the file.")
    return s if s.get("version") == STATE_VERSION else {}


def _looks_prepared(entry: Path) -> bool:
    """A file prepare_data.py writes, recognised by its content (for a folder whose
    prepare_state.json is missing or damaged): the metadata document, the report, the config."""
    try:
        text = entry.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if entry.name == CONFIG_FILE or entry.suffix in (".yaml", ".yml"):
        return text.startswith("# Resolved configuration")
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    if entry.name == REPORT_FILE:
        return isinstance(doc, dict) and "data_dir" in doc
    return isinstance(doc, dict) and set(doc) == {"version", "sample_rate", "channels", "clips"}


def _claim_files(cfg: Config, state: dict) -> None:
    """The ownership rule of every script (lora.common.ownership) for the files prepare_data.py
    writes beside its clips (metadata file, state, report, config): one it did not write is refused,
    naming it, --overwrite or not; the data folder is never a model's folder. Its own: those of a
    folder with its state file, else recognised by their content."""
    d = cfg.data
    data_dir = Path(d.data_dir)
    mpath = metadata_path(data_dir, d.metadata_file)

    def ours(entry: Path) -> list[Path]:
        if entry.name == STATE_FILE and d.overwrite:
            return []  # (a damaged one, rebuilt on request: _load_state)
        return [] if state or _looks_prepared(entry) else [entry]

    for folder, names in ((data_dir, [STATE_FILE, REPORT_FILE, CONFIG_FILE]),
                          (mpath.parent, [mpath.name])):
        claim_output(folder, "prepare_data.py", writes=names, ours=ours, overwrite=None,
                     models=[("the base model", local_model_folder(cfg.model))])


def _check_owner(cfg: Config, state: dict, mode: str, input_dir: Optional[str]) -> None:
    d = cfg.data
    data_dir = Path(d.data_dir)
    _claim_files(cfg, state)
    if d.overwrite or not state:
        return
    if state.get("mode") == "input" and mode == "example":
        raise UserError(f"{data_dir} holds a dataset prepared from {state.get('input_dir')}; "
                        f"--create_example would replace it. Choose another --output_dir (e.g. "
                        f"data_example), or pass --overwrite.")
    if mode == "input" and state.get("mode") == "input" and state.get("input_dir") != input_dir:
        raise UserError(f"{data_dir} holds a dataset prepared from {state.get('input_dir')}, not "
                        f"from {input_dir}. Choose another --output_dir, or pass --overwrite to "
                        f"replace it.")


def _inside(path: str, folder: str) -> bool:
    """Real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_split_overlap(input_dir: Path, data_dir: Path) -> None:
    """Refuse an --input_dir that is data_dir/train or data_dir/valid or lies inside one:
    prepare_data writes its clips there and deletes the clips of earlier runs, so the user's
    recordings could be deleted, and the clips would come back as new recordings on the next run.
    Checked before anything is written."""
    real_in = os.path.realpath(input_dir)
    for split in SPLITS:
        split_dir = data_dir / split
        if _inside(real_in, os.path.realpath(split_dir)):
            where = "is" if real_in == os.path.realpath(split_dir) else f"lies inside {split_dir},"
            raise UserError(
                f"--input_dir {input_dir} {where} the {split}/ folder of --output_dir {data_dir}: "
                f"prepare_data writes its clips there and deletes the clips of earlier runs, so "
                f"your recordings there could be deleted, and the clips would be read back as new "
                f"recordings on the next run. Nothing was changed. Move your recordings to a "
                f"folder of their own (e.g. {data_dir / 'recordings'}) and pass that as "
                f"--input_dir, or leave them where they are and pass another --output_dir (e.g. "
                f"{data_dir.parent / (data_dir.name + '_prepared')}).")


def _check_written_files(d, input_dir: Path, data_dir: Path, owned: bool) -> None:
    """Refuse when a file prepare_data writes (metadata file, state, report, config) is a file it
    reads (captions_file, metadata.jsonl/.csv of the input folder), or a file of the input folder it
    did not write."""
    written = [metadata_path(data_dir, d.metadata_file), data_dir / STATE_FILE, data_dir / REPORT_FILE,
               data_dir / CONFIG_FILE]
    read = ([Path(d.captions_file)] if d.captions_file else []) + [input_dir / n
                                                                   for n in ("metadata.jsonl",
                                                                                            "metadata.csv")]
    read_real = {os.path.realpath(r): r for r in read if r.is_file()}
    real_in = os.path.realpath(input_dir)
    for w in written:
        rw = os.path.realpath(w)
        if rw in read_real:
            raise UserError(f"{w} is read as captions ({read_real[rw]}) and prepare_data would "
                            f"overwrite it with its own {w.name}. Nothing was changed. Copy the "
                            f"captions to a file of their own, or choose another --output_dir / "
                            f"--metadata_file.")
        if not owned and _inside(rw, real_in) and os.path.lexists(w):
            raise UserError(f"{w} is a file in --input_dir {input_dir} that prepare_data did not "
                            f"write (no readable {STATE_FILE} in {data_dir} lists it); preparing "
                            f"would overwrite it. Nothing was changed. Choose an --output_dir "
                            f"outside --input_dir, or a new subfolder (e.g. {input_dir / 'prepared'}).")


def _check_foreign_audio(input_dir: Path, data_dir: Path, state: dict) -> None:
    """When the scan met the output folder (it is the input folder or inside it), refuse if
    data_dir/train or data_dir/valid hold audio that prepare_data did not write (not in its state's
    clip_files): that audio would be left out of the scan without a word, and the folders are where
    prepare_data writes and cleans."""
    ours = set(state.get("clip_files") or ())
    for split in SPLITS:
        foreign = []
        for root, dirs, names in os.walk(data_dir / split):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            foreign += [Path(root) / n for n in sorted(names) if not n.startswith(".")
                        and A.is_audio_file(n)
                        and (Path(root) / n).relative_to(data_dir).as_posix() not in ours]
        if foreign:
            raise UserError(
                f"{data_dir / split} holds {len(foreign)} audio file(s) that prepare_data did not "
                f"write (e.g. {', '.join(p.name for p in foreign[:3])}), and it lies in "
                f"--input_dir {input_dir}: prepare_data writes and deletes its clips there and "
                f"never scans it, so these would be left out without a word. Nothing was changed. "
                f"Move them to a folder of their own inside --input_dir (e.g. "
                f"{input_dir / 'recordings'}), or pass an --output_dir outside --input_dir.")


def _remove_stale(data_dir: Path, old_files, new_files) -> int:
    """Delete clip files an earlier run wrote that the new dataset no longer uses (only ours, only
    clips)."""
    n = 0
    keep = set(new_files)
    for rel in old_files or ():
        if rel in keep or Path(rel).parts[0] not in SPLITS or ".." in Path(rel).parts:
            continue
        p = data_dir / rel
        if p.is_file():
            p.unlink()
            n += 1
    return n
