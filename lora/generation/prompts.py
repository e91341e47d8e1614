"""Prompt files: the one reader behind ``--prompts_file`` of inference_lora.py and evaluate.py.

Formats (chosen by the extension):

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.jsonl``: one JSON value per line: a prompt string, or an object with ``text`` (or ``prompt`` /
  ``caption``) and optional per-prompt settings (``duration``, ``seed``, ``guidance_scale``,
  ``temperature``, ``top_k``, ``top_p``, ``num_samples``; for melody models ``melody``: an audio
  file whose tune guides that prompt, relative to the prompts file's folder unless absolute);
* ``.json``: a list of such values, or ``{"prompts": [...]}``.

The file is read as UTF-8 (a byte-order mark is allowed). Every problem is collected, naming the
file and line or item, so a user sees them all at once. inference_lora.py applies the per-prompt
settings; evaluate.py uses the texts only (every model is scored with the same settings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora.common.cli import UserError, log
from lora.config import MAX_PROMPTS, MAX_TEXT_CHARS, text_problem

TEXT_KEYS = ("text", "prompt", "caption")
# (MAX_PROMPTS lines of MAX_TEXT_CHARS, with their settings)
MAX_PROMPTS_FILE_BYTES = MAX_PROMPTS * (MAX_TEXT_CHARS + 500)
PER_PROMPT_KEYS = {"text": str, "prompt": str, "caption": str, "duration": float, "seed": int,
                   "guidance_scale": float, "temperature": float, "top_k": int, "top_p": float,
                   "num_samples": int, "melody": str}


def _entry_value(key, value, where, problems):
    want = PER_PROMPT_KEYS[key]
    if isinstance(value, bool) or value is None:
        problems.append(f"{where}: '{key}' must be {want.__name__}, got {value!r}.")
        return None
    if want is str:
        if not isinstance(value, str):
            problems.append(f"{where}: '{key}' must be text, got {value!r}.")
            return None
        return value
    if want is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            problems.append(f"{where}: '{key}' must be an integer, got {value!r}.")
            return None
        return value
    if not isinstance(value, (int, float)):
        problems.append(f"{where}: '{key}' must be a number, got {value!r}.")
        return None
    return float(value)


def read_prompts_file(path: str | os.PathLike, problems: list[str]) -> list[tuple[str, dict]]:
    """Entries (where, {text, and optional per-prompt settings}) of a .txt / .json / .jsonl prompts
    file."""
    p = Path(path)
    if not p.is_file():
        problems.append(f"prompts_file not found: {p}. Pass a .txt (one prompt per line), .json or "
                        f".jsonl file.")
        return []
    if p.stat().st_size > MAX_PROMPTS_FILE_BYTES:
        problems.append(f"prompts_file {p} is {p.stat().st_size:,} bytes; a prompts file holds at "
                        f"most {MAX_PROMPTS:,} prompts ({MAX_PROMPTS_FILE_BYTES:,} bytes). Split it.")
        return []
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"prompts_file {p} cannot be read as UTF-8 text ({e}).")
        return []
    raw: list[tuple[str, object]] = []
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append((f"{p.name} line {n}", json.loads(line)))
            except ValueError as e:
                problems.append(f"{p.name} line {n} is not valid JSON ({e}). Each line must be a "
                                f"JSON object like "
                                f'{{"text": "lofi piano", "duration": 10}} or a JSON string.')
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            problems.append(f"{p} is not valid JSON ({e}).")
            return []
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            problems.append(f"{p}: expected a JSON list of prompts (strings or objects with 'text'), or "
                            f'{{"prompts": [...]}}; got {type(data).__name__}.')
            return []
        raw = [(f"{p.name} item {i + 1}", item) for i, item in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s and not s.startswith("#"):
                raw.append((f"{p.name} line {n}", s))
    if len(raw) > MAX_PROMPTS:
        problems.append(f"{p} holds {len(raw):,} prompts; at most {MAX_PROMPTS:,} per run. Split it.")
        return []
    out = []
    for where, item in raw:
        if isinstance(item, str):
            out.append((where, {"text": item}))
            continue
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a prompt string or an object with 'text', got {item!r}.")
            continue
        unknown = sorted(set(item) - set(PER_PROMPT_KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                            f"{', '.join(sorted(PER_PROMPT_KEYS))}.")
            continue
        given = [k for k in TEXT_KEYS if k in item]
        if len(given) > 1:
            problems.append(f"{where}: give one of {', '.join(repr(k) for k in given)}, not several.")
            continue
        entry = {}
        for key, value in item.items():
            v = _entry_value(key, value, where, problems)
            if v is not None:
                entry["text" if key in TEXT_KEYS else key] = v
        # a path: relative to the prompts file, as YAML paths are to their file
        if "melody" in entry:
            entry["melody"] = str((p.parent / os.path.expanduser(entry["melody"])).resolve())
        if "text" not in entry and not any(f"{where}:" in q for q in problems):
            problems.append(f"{where}: no 'text' (the prompt); e.g. {{\"text\": \"lofi piano\"}}.")
            continue
        out.append((where, entry))
    return out


def read_prompt_texts(path: str | os.PathLike) -> list[str]:
    """The non-empty prompt texts of a prompts file, in file order (evaluate.py); UserError listing
    every problem. Per-prompt settings are not used here (a note says so)."""
    problems: list[str] = []
    entries = read_prompts_file(path, problems)
    problems += [q for where, e in entries if (q := text_problem(e.get("text", ""), where))]
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the prompts file {path}:\n  "
                        + "\n  ".join(problems))
    ignored = sorted({k for _, e in entries for k in e if k != "text"})
    if ignored:
        log.info("%s: per-prompt settings (%s) are not used by the evaluation (every model is "
                 "scored with the same settings)", path, ", ".join(ignored))
    texts = [e["text"].strip() for _, e in entries if e["text"].strip()]
    if not texts:
        raise UserError(f"{path} holds no prompts.")
    return texts
