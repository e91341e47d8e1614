"""Reviewing captions: the ``captions.csv`` table prepare_data writes next to metadata.json (one row
per clip: clip, split, source recording, offset, caption, where the caption came from, the CLAP tags
with their scores), the user's edits applied back (``prepare_data --data_dir DATA --captions_file
DATA/captions.csv``, or the web UI's Data tab) and the trigger word.

Applying edits reads metadata.json and the table, never audio: a changed caption is taken as it is
(caption_source "edited"); changed tags with an unchanged caption re-write the caption from the
template (caption_source "edited tags"). metadata.json is rewritten atomically with only those
clips changed, and the edits are recorded in prepare_state.json, so a later prepare run keeps them.
The token cache keys text states by the caption's hash: the next training encodes only the
changed captions again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, log
from lora.common.fields import load_yaml
from lora.common.files import atomic_write_json, atomic_write_text
from lora.dataprep.autocaption import caption_values, parse_tags_text, render, tags_text
from lora.dataprep.captions import _csv_rows
from lora.dataprep.ownership import STATE_FILE, _load_state
from lora.dataset import TRIGGER_POSITIONS, metadata_path, resolve_trigger

CAPTIONS_CSV = "captions.csv"
COLUMNS = ("clip", "split", "source", "offset", "caption", "caption_source", "tags")


def _norm(text) -> str:
    return " ".join(str(text or "").split())


def read_metadata_doc(data_dir: Path, metadata_file: str) -> tuple[Path, dict]:
    """(path, the metadata.json document as it is) of a prepared folder; UserError otherwise."""
    mpath = metadata_path(data_dir, metadata_file)
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{mpath} not found: prepare the folder first (prepare_data.py --input_dir "
                        f"YOUR_AUDIO --output_dir {data_dir}).") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{mpath} cannot be read ({e}).") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("clips"), list) or \
            not all(isinstance(c, dict) and isinstance(c.get("audio"), str) for c in doc["clips"]):
        raise UserError(f"{mpath}: expected prepare_data's metadata (an object with a 'clips' list, "
                        f"each with its 'audio').")
    return mpath, doc


# ---- the table ---------------------------------------------------------------------------------
def table_rows(doc: dict) -> list[dict]:
    """One row per clip of a metadata document (the captions without the trigger word)."""
    return [{"clip": c["audio"], "split": c.get("split", ""), "source": c.get("source") or "",
             "offset": c.get("offset", 0.0), "caption": c.get("text", ""),
             "caption_source": c.get("caption_source", ""), "tags": tags_text(c.get("tags"))}
            for c in doc["clips"]]


def table_text(doc: dict) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in table_rows(doc):
        w.writerow([row[k] for k in COLUMNS])
    return buf.getvalue()


def file_sha1(path: Path) -> Optional[str]:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:
        return None


def is_review_table(path: Path) -> bool:
    """A captions table with a 'clip' column (captions.csv), not a file -> caption table."""
    if path.suffix.lower() not in (".csv", ".tsv"):
        return False
    try:
        first = path.read_text(encoding="utf-8-sig").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        return False
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    return bool(first) and "clip" in [c.strip().lower() for c in next(csv.reader(first, delimiter=delim))]


def check_table_free(data_dir: Path, state: dict) -> None:
    """Refuse (before anything is written) to overwrite a captions.csv that is not prepare_data's
    own unchanged table: the user's edits not applied yet, or a file of the user's."""
    path = data_dir / CAPTIONS_CSV
    if not path.exists():
        return
    ours = state.get("captions_csv_sha1")
    if ours and file_sha1(path) == ours:
        return
    if ours and is_review_table(path):
        raise UserError(f"{path} holds edits that are not applied yet; preparing again would "
                        f"overwrite them. Nothing was changed. Apply them first: python "
                        f"lora/prepare_data.py --data_dir {data_dir} --captions_file {path} (then run "
                        f"this command again), or move the file away to drop them.")
    raise UserError(f"{path} was not written by prepare_data (it writes its review table there). "
                    f"Nothing was changed. Move your file out of the data folder (and pass it as "
                    f"--captions_file from there), or choose another --output_dir.")


def write_table(data_dir: Path, doc: dict) -> str:
    """Write captions.csv (UTF-8 with a BOM, so spreadsheets show every character); its sha1."""
    text = table_text(doc)
    atomic_write_text(data_dir / CAPTIONS_CSV, "\ufeff" + text)
    return hashlib.sha1(("\ufeff" + text).encode("utf-8")).hexdigest()


@dataclass
class Edit:
    clip: str                      # the clip's audio path, as metadata.json writes it
    caption: Optional[str]         # None: not given
    tags: Optional[str] = None     # tags as text (tags_text); None: not given
    where: str = ""                # for messages: "captions.csv line 3", "row 2"


def read_table(path: Path) -> list[Edit]:
    """The edits of a review table (columns clip and caption; tags optional). UserError naming the
    file and its lines for a table without those columns or with a clip twice."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"captions file {path} cannot be read ({e}); save it as UTF-8.") from None
    rows = _csv_rows(path, raw, "\t" if path.suffix.lower() == ".tsv" else ",")
    head = [c.strip().lower() for c in rows[0][1]] if rows else []
    if "clip" not in head or "caption" not in head:
        raise UserError(f"{path}: a review table needs the columns clip and caption (the "
                        f"{CAPTIONS_CSV} prepare_data wrote has them). To caption source files "
                        f"instead, run prepare_data with --input_dir and this --captions_file.")
    col = {k: head.index(k) for k in ("clip", "caption", "tags") if k in head}
    edits, seen = [], {}
    for line, r in rows[1:]:
        cells = {k: (r[i] if i < len(r) else "") for k, i in col.items()}
        clip = cells["clip"].strip().replace("\\", "/")
        if not clip:
            raise UserError(f"{path} line {line}: the clip column is empty.")
        if clip in seen:
            raise UserError(f"{path}: clip {clip} is on line {seen[clip]} and line {line}; keep one "
                            f"row per clip. Nothing was changed.")
        seen[clip] = line
        edits.append(Edit(clip, cells["caption"], cells.get("tags"), f"{path.name} line {line}"))
    return edits


# ---- applying edits ------------------------------------------------------------------------------
def _stem(c: dict) -> str:
    return Path(c.get("source") or c["audio"]).stem.replace("_", " ").strip()


def apply_edits(data_dir: Path, metadata_file: str, edits: list[Edit], template: str) -> dict:
    """Apply caption and tag edits to metadata.json (atomically; only the changed clips change) and
    record them in prepare_state.json. No audio is read. Returns {"changed": [clip...],
    "unchanged": n, "not_in_table": n}."""
    mpath, doc = read_metadata_doc(data_dir, metadata_file)
    by_clip = {c["audio"]: c for c in doc["clips"]}
    unknown = [e for e in edits if e.clip not in by_clip]
    if unknown:
        shown = "; ".join(f"{e.where}: {e.clip}" for e in unknown[:10])
        raise UserError(f"{len(unknown)} row(s) name a clip that {mpath.name} does not have ({shown}"
                        f"{' ...' if len(unknown) > 10 else ''}). The clip column must stay as "
                        f"prepare_data wrote it. Nothing was changed.")
    changed = []
    for e in edits:
        c = by_clip[e.clip]
        caption = _norm(e.caption) if e.caption is not None else c.get("text", "")
        tags_changed = e.tags is not None and _norm(e.tags) != _norm(tags_text(c.get("tags")))
        tags = parse_tags_text(e.tags, e.where or e.clip) if tags_changed else c.get("tags")
        if caption != _norm(c.get("text", "")):
            c.update(text=caption, caption_source="edited")
        elif tags_changed:
            c.update(text=render(template, caption_values(tags, c, _stem(c))),
                     caption_source="edited tags")
        else:
            continue
        if tags:
            c["tags"] = tags
        changed.append(c)
    if changed:
        atomic_write_json(mpath, doc)
        _record_edits(data_dir, changed)
    return {"changed": [c["audio"] for c in changed], "unchanged": len(edits) - len(changed),
            "not_in_table": len(by_clip) - len(edits), "doc": doc}


def _record_edits(data_dir: Path, clips: list[dict]) -> None:
    """Keep the edits in prepare_state.json (each clip's "edited"), so a prepare rerun keeps them."""
    state = _load_state(data_dir)
    if not state:
        return
    edited = {c["audio"]: {"text": c["text"], "caption_source": c["caption_source"],
                           **({"tags": c["tags"]} if c.get("tags") else {})} for c in clips}
    for r in state.get("sources", {}).values():
        for c in r.get("clips", []):
            if c.get("file") in edited:
                c["edited"] = edited[c["file"]]
    atomic_write_json(data_dir / STATE_FILE, state)


def carry_edits(prev_sources: dict, results: dict[str, dict]) -> int:
    """A recording decoded again keeps the edited captions of its clips (same clip names)."""
    edits = {c["name"]: c["edited"] for r in prev_sources.values() for c in r.get("clips", [])
             if c.get("edited") and c.get("name")}
    n = 0
    for r in results.values():
        for c in r.get("clips", []):
            if c.get("name") in edits and not c.get("edited"):
                c["edited"] = edits[c["name"]]
                n += 1
    return n


def set_trigger(data_dir: Path, metadata_file: str, word: str, position: str) -> dict:
    """Record the trigger word in metadata.json ('' removes it), atomically. Returns the document."""
    if position not in TRIGGER_POSITIONS:
        raise UserError(f"trigger_position must be one of {', '.join(TRIGGER_POSITIONS)}, got {position!r}.")
    mpath, doc = read_metadata_doc(data_dir, metadata_file)
    word = _norm(word)
    if word:
        doc.update(trigger_word=word, trigger_position=position)
    else:
        doc.pop("trigger_word", None)
        doc.pop("trigger_position", None)
    atomic_write_json(mpath, doc)
    return doc


def sync_table(data_dir: Path, doc: dict, applied: Optional[Path] = None) -> str:
    """Bring captions.csv in step with metadata.json after edits: the applied table itself is kept
    as the user saved it; prepare_data's own unchanged table is rewritten; a table edited but not
    applied is left alone (said). Records the table's hash in prepare_state.json."""
    path = data_dir / CAPTIONS_CSV
    state = _load_state(data_dir)
    if applied is not None and path.exists() and applied.resolve() == path.resolve():
        sha, what = file_sha1(path), f"kept {path} as you saved it"
    elif not path.exists() or (state and file_sha1(path) == state.get("captions_csv_sha1")):
        sha, what = write_table(data_dir, doc), f"rewrote {path}"
    else:
        log.warning("%s was edited and not applied: left as it is (apply it with --captions_file "
                    "%s, or delete it to have it written again)", path, path)
        return "left"
    if state:
        state["captions_csv_sha1"] = sha
        atomic_write_json(data_dir / STATE_FILE, state)
    return what


def folder_template(data_dir: Path, default: str) -> str:
    """The auto-caption template the folder was prepared with (its prepare_config.yaml), else
    ``default``."""
    saved = data_dir / "prepare_config.yaml"
    if saved.is_file():
        return (load_yaml(saved).get("data") or {}).get("auto_caption_template") or default
    return default


def review_folder(cfg) -> str:
    """``prepare_data --data_dir DATA --captions_file TABLE`` and/or ``--trigger_word``: apply the
    table's edits and the trigger word to a prepared folder, reading no audio. Returns what was
    done, for the screen."""
    d = cfg.data
    data_dir = Path(d.data_dir)
    lines = []
    doc = None
    if d.captions_file:
        template = folder_template(data_dir, d.auto_caption_template)
        table = Path(d.captions_file)
        result = apply_edits(data_dir, d.metadata_file, read_table(table), template)
        doc = result["doc"]
        lines.append(f"{len(result['changed'])} caption(s) changed, {result['unchanged']} unchanged"
                     + (f", {result['not_in_table']} clip(s) not in the table (unchanged)"
                        if result["not_in_table"] else "")
                     + f"; {metadata_path(data_dir, d.metadata_file)} "
                     + ("rewritten." if result["changed"] else "left as it was."))
        if result["changed"]:
            lines.append("The next training encodes the text of the changed captions only (the audio "
                         "codes and the other captions come from the token cache).")
        lines.append(f"captions.csv: {sync_table(data_dir, doc, applied=table)}.")
    if d.trigger_word is not None or d.trigger_position == "off":
        doc = set_trigger(data_dir, d.metadata_file, *resolve_trigger(d))
        word = doc.get("trigger_word")
        lines.append(f"trigger word {word!r} ({doc['trigger_position']}) recorded in metadata.json; "
                     f"training puts it in every caption." if word else
                     "no trigger word: removed from metadata.json.")
    return "\n".join(lines)
