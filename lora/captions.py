"""Captions of source recordings, for ``prepare_data.py --input_dir``.

Where the caption of a recording comes from, first match wins: a sidecar ``.txt``/``.json`` next to the
audio file, the ``captions_file`` (CSV/TSV, JSON or JSONL), ``metadata.jsonl``/``metadata.csv`` of the
Hugging Face audiofolder layout in the input folder, ``default_text``, then ``caption_template`` (built from
the file name). ``Captioner`` applies that order and remembers which table entries matched no audio file;
``read_captions_file`` reads one captions table; ``caption_from_obj`` turns a JSON object (or string) into a
caption. Used by lora/prepare_data.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from lora.utils import UserError, log

CAPTION_KEYS = ("text", "caption", "description", "prompt")
FILE_KEYS = ("file_name", "file", "filename", "path", "audio")


def caption_from_obj(obj) -> Optional[str]:
    """The caption a JSON value holds: the string itself, the first non-empty CAPTION_KEYS field, or one
    composed from audiocraft-style fields (genre, moods, instruments, keywords, bpm, key); None if none."""
    if isinstance(obj, str):
        return obj.strip()
    if not isinstance(obj, dict):
        return None
    for k in CAPTION_KEYS:
        if isinstance(obj.get(k), str) and obj[k].strip():
            return obj[k].strip()
    # audiocraft-style metadata: compose from fields
    parts = []
    for k in ("genre", "moods", "mood", "instrument", "instruments", "keywords"):
        v = obj.get(k)
        if isinstance(v, list):
            v = ", ".join(str(x) for x in v if x)
        if v:
            parts.append(str(v))
    if obj.get("bpm"):
        parts.append(f"{obj['bpm']} BPM")
    if obj.get("key"):
        parts.append(str(obj["key"]))
    return ", ".join(parts) or None


def read_captions_file(path: Path) -> dict[str, str]:
    """CSV (columns file_name,text or two columns), JSON ({file: text} or a list of objects) or JSONL."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"captions file {path} cannot be read ({e}); save it as UTF-8.") from None
    out: dict[str, str] = {}

    def add(obj, where):
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected an object with file_name and text")
        f = next((obj[k] for k in FILE_KEYS if isinstance(obj.get(k), str)), None)
        t = caption_from_obj(obj)
        if f is None:
            raise UserError(f"{where}: no file column (one of {', '.join(FILE_KEYS)})")
        out[f.replace("\\", "/")] = t or ""

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    add(json.loads(line), f"{path} line {i}")
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i} is not valid JSON ({e}).") from None
    elif suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}).") from None
        if isinstance(data, dict) and isinstance(data.get("clips"), list):
            data = data["clips"]
        if isinstance(data, dict):
            for k, v in data.items():
                out[k.replace("\\", "/")] = caption_from_obj(v) or ""
        elif isinstance(data, list):
            for i, obj in enumerate(data):
                add(obj, f"{path} entry {i}")
        else:
            raise UserError(f"{path}: expected {{file: caption}} or a list of objects.")
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.reader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        rows = [r for r in rows if r and any(c.strip() for c in r)]
        if not rows:
            return out
        head = [c.strip().lower() for c in rows[0]]
        fcol = next((head.index(k) for k in FILE_KEYS if k in head), None)
        tcol = next((head.index(k) for k in CAPTION_KEYS if k in head), None)
        if fcol is not None and tcol is not None:
            body = rows[1:]
        else:
            fcol, tcol, body = 0, 1, rows
        for i, r in enumerate(body):
            if len(r) <= max(fcol, tcol):
                raise UserError(f"{path} row {i + 2}: expected a file name and a caption, got {r!r}")
            out[r[fcol].strip().replace("\\", "/")] = r[tcol].strip()
    else:
        raise UserError(f"captions file {path}: use .csv, .tsv, .json or .jsonl")
    return out


class Captioner:
    """Caption of a recording: sidecar .txt/.json > captions_file > metadata.jsonl/csv in input_dir >
    default_text > caption_template."""

    def __init__(self, input_dir: Path, captions_file: Optional[str], default_text: Optional[str], template: str):
        self.input_dir = input_dir
        self.default_text = default_text
        self.template = template
        self.tables: list[tuple[str, dict[str, str]]] = []
        if captions_file:
            self.tables.append(("captions_file", read_captions_file(Path(captions_file))))
        for name in ("metadata.jsonl", "metadata.csv"):
            p = input_dir / name
            if p.is_file():
                self.tables.append((name, read_captions_file(p)))
        self.used_keys: set[tuple[str, str]] = set()

    def __call__(self, src: Path, rel: str) -> tuple[str, str]:
        """(caption, where it came from)."""
        for ext in (".txt", ".json"):
            side = src.with_suffix(ext)
            if side.is_file() and side != src:
                try:
                    raw = side.read_text(encoding="utf-8-sig")
                except (OSError, UnicodeDecodeError) as e:
                    log.warning("caption file %s unreadable (%s); ignored", side, e)
                    continue
                if ext == ".txt":
                    text = " ".join(raw.split())
                else:
                    try:
                        text = caption_from_obj(json.loads(raw)) or ""
                    except json.JSONDecodeError:
                        log.warning("caption file %s is not valid JSON; ignored", side)
                        continue
                if text:
                    return text, "sidecar"
        name = Path(rel).name
        for label, table in self.tables:
            for key in (rel, name, Path(rel).stem):
                if key in table and table[key]:
                    self.used_keys.add((label, key))
                    return " ".join(table[key].split()), label
        if self.default_text:
            return self.default_text, "default_text"
        if self.template:
            p = Path(rel)
            folder = p.parent.name if p.parent.as_posix() != "." else self.input_dir.name
            text = self.template.format(stem=p.stem.replace("_", " ").strip(), folder=folder, name=p.name)
            return " ".join(text.split()), "template"
        return "", "none"

    def unused(self) -> list[str]:
        out = []
        for label, table in self.tables:
            names = {k for (lb, k) in self.used_keys if lb == label}
            out += [f"{label}: {k}" for k in table if k not in names]
        return out
