"""Captions of source recordings, for ``prepare_data.py --input_dir``.

Where the caption of a recording comes from, first match wins: a sidecar ``.txt``/``.json`` next to
the audio file, the ``captions_file`` (CSV/TSV, JSON or JSONL), ``metadata.jsonl``/``metadata.csv``
of the Hugging Face audiofolder layout in the input folder, ``default_text``, then
``caption_template`` (built from the file name). ``Captioner`` applies that order and remembers
which table entries matched no audio file; ``read_captions_file`` reads one captions table (with the
csv module: a caption holding a comma must be quoted, and a row with more fields than the header is
an error naming its line; one audio file given two different captions is an error too, the same
caption repeated a warning); ``caption_from_obj`` turns a JSON object (or string) into a caption.
Used by lora/prepare_data.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, log
from lora.config import MAX_TEXT_CHARS, MAX_TEXT_TOKENS, text_problem
from lora.dataprep.autocaption import caption_values, render
from lora.dataset import CONTROL_CHARS

CAPTION_KEYS = ("text", "caption", "description", "prompt")
FILE_KEYS = ("file_name", "file", "filename", "path", "audio")


def caption_from_obj(obj) -> Optional[str]:
    """The caption a JSON value holds: the string itself, the first non-empty CAPTION_KEYS field, or
    one composed from audiocraft-style fields (genre, moods, instruments, keywords, bpm, key); None
    if none."""
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
    """CSV (columns file_name,text or two columns), JSON ({file: text} or a list of objects) or
    JSONL.

    UserError (naming the file and its lines) for a CSV row with more fields than the header (an
    unquoted comma in a caption) and for one audio file given different captions; identical repeats
    are a warning."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"captions file {path} cannot be read ({e}); save it as UTF-8.") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        entries = _jsonl_entries(path, raw)
    elif suffix == ".json":
        entries = _json_entries(path, raw)
    elif suffix in (".csv", ".tsv"):
        entries = _csv_entries(path, raw, "\t" if suffix == ".tsv" else ",")
    else:
        raise UserError(f"captions file {path}: use .csv, .tsv, .json or .jsonl")
    return _one_caption_per_file(path, entries)


# (audio file key, caption, where in the captions file: "line 3" / "entry 2")
Entry = tuple[str, str, str]


def _entry(obj, path: Path, where: str) -> Entry:
    if not isinstance(obj, dict):
        raise UserError(f"{path} {where}: expected an object with file_name and text")
    f = next((obj[k] for k in FILE_KEYS if isinstance(obj.get(k), str)), None)
    if f is None:
        raise UserError(f"{path} {where}: no file column (one of {', '.join(FILE_KEYS)})")
    return f.replace("\\", "/"), caption_from_obj(obj) or "", where


def _jsonl_entries(path: Path, raw: str) -> list[Entry]:
    out = []
    for i, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i} is not valid JSON ({e}).") from None
            out.append(_entry(obj, path, f"line {i}"))
    return out


class _Pairs(dict):
    """A JSON object that remembers its (key, value) pairs in order, repeated keys included."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def _json_entries(path: Path, raw: str) -> list[Entry]:
    try:
        data = json.loads(raw, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    if isinstance(data, dict) and isinstance(data.get("clips"), list):
        data = data["clips"]
    if isinstance(data, dict):
        return [(k.replace("\\", "/"), caption_from_obj(v) or "", f"entry {i}")
                for i, (k, v) in enumerate(data.pairs)]
    if isinstance(data, list):
        return [_entry(obj, path, f"entry {i}") for i, obj in enumerate(data)]
    raise UserError(f"{path}: expected {{file: caption}} or a list of objects.")


def _csv_rows(path: Path, raw: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(first line, fields) of each non-empty row, read with the csv module (quoted fields may hold
    the delimiter, quotes and line breaks)."""
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter, strict=True)
    rows, start = [], 1
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((start, r))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path} line {start} is not valid CSV ({e}): put a caption that contains "
                        f"quotes in "
                        f'double quotes and double the quotes inside it ("a ""quoted"" word").') from None
    return rows


def _csv_entries(path: Path, raw: str, delimiter: str) -> list[Entry]:
    rows = _csv_rows(path, raw, delimiter)
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0][1]]
    fcol = next((head.index(k) for k in FILE_KEYS if k in head), None)
    tcol = next((head.index(k) for k in CAPTION_KEYS if k in head), None)
    if fcol is not None and tcol is not None:
        body, width = rows[1:], len(head)
        what = f"more fields than the header ({', '.join(c.strip() for c in rows[0][1])})"
    else:
        fcol, tcol, body, width = 0, 1, rows, 2
        what = "more than two fields (a file name and a caption)"
    too_many = [line for line, r in body if any(c.strip() for c in r[width:])]
    if too_many:
        quote = ("a caption that contains a tab must be in double quotes" if delimiter == "\t" else
                 'a caption that contains a comma must be in double quotes, e.g. song.wav,"lofi '
                 'hip hop, dusty drums, 80 BPM"')
        raise UserError(f"{path}: {_lines(too_many)} {'has' if len(too_many) == 1 else 'have'} "
                        f"{what}: {quote}. Nothing was written.")
    out = []
    for line, r in body:
        if len(r) <= max(fcol, tcol):
            raise UserError(f"{path} line {line}: expected a file name and a caption, got {r!r}")
        out.append((r[fcol].strip().replace("\\", "/"), r[tcol].strip(), f"line {line}"))
    return out


def _lines(numbers: list[int], most: int = 50) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    more = f" ... ({len(numbers)} lines in all)" if len(numbers) > most else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _one_caption_per_file(path: Path, entries: list[Entry]) -> dict[str, str]:
    """{audio file: caption}. Different captions for one audio file: UserError listing every such
    file with its lines/entries; the same caption repeated: a warning (used once)."""
    by_key: dict[str, list[tuple[str, str]]] = {}
    for key, text, where in entries:
        by_key.setdefault(key, []).append((where, text))
    conflicts, repeats = [], []
    for key, items in by_key.items():
        if len({t for _, t in items}) > 1:
            conflicts.append(f"  {key}: " + "; ".join(f"{w}: {t!r}" for w, t in items))
        elif len(items) > 1:
            repeats.append(f"{key} ({', '.join(w for w, _ in items)})")
    if conflicts:
        more = f"\n  ... and {len(conflicts) - 20} more" if len(conflicts) > 20 else ""
        raise UserError(f"{path} gives different captions for the same audio file "
                        f"({len(conflicts)} file(s)):\n"
                        + "\n".join(conflicts[:20]) + more
                        + "\nKeep one row per audio file (delete or merge the "
                        "others) and run the same command again. Nothing was written.")
    if repeats:
        log.warning("%s lists %d audio file(s) more than once with the same caption (used once): "
                    "%s", path,
                    len(repeats), "; ".join(repeats[:10]) + (" ..." if len(repeats) > 10 else ""))
    return {key: items[-1][1] for key, items in by_key.items()}


class Captioner:
    """Caption of a recording: sidecar .txt/.json > captions_file > metadata.jsonl/csv in input_dir
    > default_text > caption_template."""

    def __init__(self, input_dir: Path, captions_file: Optional[str], default_text: Optional[str],
                 template: str):
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
        # what was changed or left out without failing: {"file", "warning"} (prepare_report.json)
        self.notes: list[dict] = []

    def __call__(self, src: Path, rel: str) -> tuple[str, str]:
        """(caption, where it came from), cleaned: control characters (NUL, BEL, ESC, ...) removed,
        cut to MAX_TEXT_CHARS; each change, and a sidecar left out, is a note for the report."""
        text, where = self._find(src, rel)
        clean = CONTROL_CHARS.sub("", text)
        if clean != text:
            self.notes.append({"file": rel, "warning": f"the caption ({where}) held "
                               f"{len(text) - len(clean)} control character(s) (NUL, BEL, ESC, ...); "
                               f"they were removed"})
        if text_problem(clean, ""):
            self.notes.append({"file": rel, "warning": f"the caption ({where}) is {len(clean):,} "
                               f"characters long; it was cut to {MAX_TEXT_CHARS:,} (the text encoder "
                               f"reads at most {MAX_TEXT_TOKENS} tokens)"})
            clean = clean[:MAX_TEXT_CHARS].rsplit(" ", 1)[0].strip() or clean[:MAX_TEXT_CHARS]
        return clean, where

    def _sidecar_json(self, side: Path, raw: str, rel: str) -> str:
        """The caption of a .json sidecar; a value that is not text is left out with a note."""
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            self.notes.append({"file": rel, "warning": f"caption file {side.name} is not valid JSON; "
                                                       f"ignored"})
            return ""
        bad = [k for k in CAPTION_KEYS if isinstance(obj, dict) and k in obj
               and not isinstance(obj[k], str)]
        if bad or not isinstance(obj, (dict, str)):
            what = (f"its {', '.join(repr(k) for k in bad)} is not text" if bad
                    else f"it holds a JSON {type(obj).__name__}, not a caption")
            self.notes.append({"file": rel, "warning": f"caption file {side.name}: {what}; "
                                                       f"{'that value was ' if bad else ''}ignored"})
        return caption_from_obj(obj) or ""

    def _find(self, src: Path, rel: str) -> tuple[str, str]:
        for ext in (".txt", ".json"):
            side = src.with_suffix(ext)
            try:
                is_sidecar = side.is_file() and side != src
            except OSError as e:  # its folder cannot be read (no permission)
                log.warning("caption file %s cannot be read (%s); ignored", side, e.strerror or e)
                continue
            if is_sidecar:
                try:
                    raw = side.read_text(encoding="utf-8-sig")
                except (OSError, UnicodeDecodeError) as e:
                    log.warning("caption file %s unreadable (%s); ignored", side, e)
                    continue
                text = " ".join(raw.split()) if ext == ".txt" else self._sidecar_json(side, raw, rel)
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


# ---- the caption of one clip ---------------------------------------------------------------------
# caption sources that are not the user's own words (--auto_caption replaces them)
NOT_GIVEN = ("template", "none")


def enrich_text(text: str, c: dict) -> str:
    """--enrich_captions: the clip's estimated tempo and key appended, unless the caption has them."""
    add = []
    if c.get("bpm") and "bpm" not in text.lower():
        add.append(f"{c['bpm']:.0f} BPM")
    if c.get("key") and not re.search(r"\b(major|minor)\b", text.lower()):
        add.append(c["key"])
    if not add:
        return text
    return ", ".join([text] + add) if text else ", ".join(add)


def clip_caption(d, text: str, where: str, r: dict, c: dict, stem: str
                 ) -> tuple[str, str, Optional[dict]]:
    """(caption, where it came from, tags) of one clip of recording ``r`` whose own caption is
    (``text``, ``where``): the user's edit (captions.csv, the web UI) first; then the auto caption
    (--auto_caption: its tags in auto_caption_template) where the recording's caption is not the
    user's (or --auto_caption_replace); else the recording's caption (plus tempo/key under
    --enrich_captions)."""
    tags = c.get("tags") or r.get("tags")
    if c.get("edited"):
        e = c["edited"]
        return e["text"], e.get("caption_source", "edited"), e.get("tags") or tags
    if d.auto_caption and tags and (where in NOT_GIVEN or d.auto_caption_replace):
        return render(d.auto_caption_template, caption_values(tags, c, stem)), "auto", tags
    return (enrich_text(text, c) if d.enrich_captions else text), where, tags
