"""Dataset: metadata.json, clip records, the audio Dataset and (below) the on-disk token cache.

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
objects is accepted as well, so a hand-written metadata file works. ``split`` is "train" or "valid"; when
it is missing, the first folder of ``audio`` decides ("train/..." or "valid/...").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .utils import UserError

METADATA_VERSION = 1
SPLITS = ("train", "valid")


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

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d


def metadata_path(data_dir: str | Path, metadata_file: str = "metadata.json") -> Path:
    p = Path(metadata_file)
    return p if p.is_absolute() else Path(data_dir) / p


def load_metadata(data_dir: str | Path, metadata_file: str = "metadata.json", *,
                  split: Optional[str] = None, check_files: bool = True) -> list[ClipRecord]:
    """Read and check metadata; every problem is reported at once, naming the file and entry.

    Raises UserError when the file is missing or malformed, or (check_files) when clips are missing.
    """
    data_dir = Path(data_dir)
    mpath = metadata_path(data_dir, metadata_file)
    if not mpath.is_file():
        hint = (f"Create it with: python lora/prepare_data.py --input_dir YOUR_AUDIO --output_dir {data_dir} "
                f"(or --create_example for a synthetic dataset).")
        if not data_dir.exists():
            raise UserError(f"Data folder {data_dir} does not exist. {hint}")
        raise UserError(f"Metadata file {mpath} not found. {hint}")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e}). Re-create it with prepare_data.py.") from None
    entries = raw.get("clips") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise UserError(f"{mpath}: expected a list of clips (or an object with a 'clips' list).")

    problems: list[str] = []
    records: list[ClipRecord] = []
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
        sp = e.get("split") or Path(audio).parts[0]
        if sp not in SPLITS:
            problems.append(f"{where}: split {sp!r} is neither 'train' nor 'valid'")
            continue
        try:
            duration = float(e.get("duration", 0.0))
        except (TypeError, ValueError):
            problems.append(f"{where}: duration {e.get('duration')!r} is not a number")
            continue
        path = Path(audio) if Path(audio).is_absolute() else data_dir / audio
        if check_files and not path.is_file():
            problems.append(f"{where}: audio file {path} is missing")
            continue
        rec = ClipRecord(id=str(e.get("id") or Path(audio).stem), audio=audio, text=text.strip(),
                         duration=duration, split=sp, source=e.get("source"), offset=float(e.get("offset", 0.0)),
                         path=path)
        records.append(rec)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"{len(problems)} problem(s) in {mpath}:\n  {shown}\nRe-run prepare_data.py, or fix the "
                        f"entries by hand.")
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def metadata_document(records: list[ClipRecord], sample_rate: int, channels: int) -> dict:
    """The JSON document for metadata.json (prepare_data writes it atomically)."""
    return {"version": METADATA_VERSION, "sample_rate": sample_rate, "channels": channels,
            "clips": [r.to_json() for r in records]}
