"""The web UI's Data tab (its widgets are in lora/app.py): prepare_data.py run as a subprocess with
the form's flags (the same command a user would type), its progress read from its log, the table of
clips with their captions and tags, edits saved through lora.dataprep.review (what
``prepare_data --captions_file captions.csv`` does: metadata.json rewritten atomically, no audio
decoded), and a clip's audio for the player.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lora.common.cli import UserError
from lora.config import REPO_ROOT, DataConfig
from lora.dataprep import review
from lora.dataprep.audio import load_audio, to_pcm16
from lora.dataset import resolve_trigger

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
TABLE_COLUMNS = ("clip", "source", "caption", "tags", "caption_source")
EDITABLE = ("caption", "tags")
SEPARATE_CHOICES = ("none", "vocals", "auto")


@dataclass
class DataForm:
    """What the Data tab sends (one field per control)."""

    input_dir: str
    data_dir: str
    separate: str = "none"
    auto_caption: bool = False
    clap_model: str = ""
    trigger_word: str = ""
    trigger_position: str = "start"
    channels: int = 1


def _folder(text: str) -> Path:
    p = Path(str(text or "").strip()).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def prepare_argv(f: DataForm, config_file: Optional[str]) -> list[str]:
    """The prepare_data.py command for the form; UserError for what can be seen before it runs."""
    if not str(f.input_dir or "").strip() or not _folder(f.input_dir).is_dir():
        raise UserError(f"Audio folder not found: {f.input_dir or '(none given)'}. Give the folder "
                        f"that holds your songs.")
    if not str(f.data_dir or "").strip():
        raise UserError("Give a data folder to write the prepared clips to.")
    if f.separate not in SEPARATE_CHOICES:
        raise UserError(f"Vocal removal must be one of {', '.join(SEPARATE_CHOICES)}.")
    argv = [sys.executable, str(SCRIPTS_DIR / "prepare_data.py")]
    if config_file:
        argv += ["--config", config_file]
    argv += ["--input_dir", str(_folder(f.input_dir)), "--output_dir", str(_folder(f.data_dir)),
             "--channels", str(int(f.channels)), "--separate", f.separate]
    if f.auto_caption:
        argv += ["--auto_caption"]
        if str(f.clap_model or "").strip():
            argv += ["--auto_caption_model", str(f.clap_model).strip()]
    if str(f.trigger_word or "").strip():
        argv += ["--trigger_word", " ".join(str(f.trigger_word).split()), "--trigger_position",
                 f.trigger_position]
    return argv


def progress_text(log_path: Path) -> str:
    """The newest progress bar of the run's log (tqdm writes them with carriage returns), e.g.
    'separating vocals: 40%|... 12.0/30.0 [00:10<00:15]'; '' when there is none."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    bars = [b.strip() for b in re.split(r"[\r\n]", text) if "%|" in b]
    return re.sub(r"\|[^|]*\|", " ", bars[-1]) if bars else ""


def load_table(data_dir: str, metadata_file: str = "metadata.json") -> tuple[list[list], str]:
    """(rows of TABLE_COLUMNS, a line about the folder: clips, trigger word)."""
    folder = _folder(data_dir)
    _, doc = review.read_metadata_doc(folder, metadata_file)
    rows = [[r[k] for k in TABLE_COLUMNS] for r in review.table_rows(doc)]
    word = doc.get("trigger_word")
    note = f"{len(rows)} clip(s) in `{folder}`" + (f" · trigger word **{word}** "
                                                     f"({doc.get('trigger_position', 'start')})"
                                                     if word else "")
    return rows, note


def save_table(data_dir: str, rows: list[list], metadata_file: str = "metadata.json",
               template: Optional[str] = None) -> str:
    """Apply the table's captions and tags to metadata.json (review.apply_edits); what changed."""
    folder = _folder(data_dir)
    if not rows:
        raise UserError("Nothing to save: prepare a folder (or load one) first.")
    idx = {k: TABLE_COLUMNS.index(k) for k in ("clip", "caption", "tags")}
    edits = [review.Edit(str(r[idx["clip"]]), str(r[idx["caption"]] or ""), str(r[idx["tags"]] or ""),
                         f"row {i + 1}") for i, r in enumerate(rows)]
    template = template or review.folder_template(folder, DataConfig().auto_caption_template)
    result = review.apply_edits(folder, metadata_file, edits, template)
    table = review.sync_table(folder, result["doc"])
    n = len(result["changed"])
    return (f"Saved: {n} caption(s) changed" + (f" ({', '.join(Path(c).name for c in result['changed'][:5])}"
                                                  f"{' ...' if n > 5 else ''})" if n else "")
            + f"; metadata.json {'rewritten' if n else 'unchanged'}; captions.csv: {table}.")


def clip_audio(data_dir: str, clip: str) -> tuple[int, np.ndarray]:
    """(sample rate, int16 (samples, channels)) of a clip of the folder, for the player."""
    folder = _folder(data_dir)
    path = (folder / clip).resolve()
    if folder.resolve() not in path.parents:
        raise UserError(f"{clip} is not a clip of {folder}.")
    import soundfile as sf

    sr = sf.info(str(path)).samplerate
    audio = load_audio(path, sr, sf.info(str(path)).channels)
    return sr, to_pcm16(audio).T


def trigger_of(data_dir: str) -> str:
    """The trigger word line of a prepared folder ('' without one)."""
    word, pos = resolve_trigger(DataConfig(data_dir=str(_folder(data_dir))))
    return f"trigger word **{word}** ({pos})" if word else ""
