"""The web UI's Data tab (``build_tab``, its widgets; gradio is passed in): prepare_data.py run as a
subprocess with the form's flags (the same command a user would type), its progress read from its
log, the table of clips with their captions and tags, edits saved through lora.dataprep.review
(what ``prepare_data --captions_file captions.csv`` does: metadata.json rewritten atomically, no
audio decoded), and a clip's audio for the player.

The prepared data folder is written (and its clips served to the player) only under the UI's
output root, as every folder the UI writes (lora.webui.runs.under_root); the folder of songs is
only read. Every text the tab shows in Markdown is escaped (md_text).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lora.common.cli import UserError
from lora.config import REPO_ROOT, Config, DataConfig
from lora.dataprep import review
from lora.dataprep.audio import load_audio, to_pcm16
from lora.dataset import data_dir_lock, resolve_trigger
from lora.webui.runs import Processes, log_tail, md_text, page_message, under_root

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
    """A folder the tab only reads (the songs): relative to the repository root."""
    p = Path(str(text or "").strip()).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def data_folder(text: str, out_root: Path) -> Path:
    """The prepared data folder the form names: under the UI's output root (relative names are taken
    under it), else a UserError saying so."""
    return under_root(text, out_root, "data folder")


def prepare_argv(f: DataForm, config_file: Optional[str], out_root: Path) -> list[str]:
    """The prepare_data.py command for the form; UserError for what can be seen before it runs (the
    data folder must lie under ``out_root``)."""
    if not str(f.input_dir or "").strip() or not _folder(f.input_dir).is_dir():
        raise UserError(f"Audio folder not found: {f.input_dir or '(none given)'}. Give the folder "
                        f"that holds your songs.")
    data_dir = data_folder(f.data_dir, out_root)
    if f.separate not in SEPARATE_CHOICES:
        raise UserError(f"Vocal removal must be one of {', '.join(SEPARATE_CHOICES)}.")
    argv = [sys.executable, str(SCRIPTS_DIR / "prepare_data.py")]
    if config_file:
        argv += ["--config", config_file]
    argv += ["--input_dir", str(_folder(f.input_dir)), "--output_dir", str(data_dir),
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


def load_table(data_dir: str, out_root: Path, metadata_file: str = "metadata.json") -> tuple[list[list], str]:
    """(rows of TABLE_COLUMNS, a Markdown line about the folder: clips, trigger word)."""
    folder = data_folder(data_dir, out_root)
    _, doc = review.read_metadata_doc(folder, metadata_file)
    rows = [[r[k] for k in TABLE_COLUMNS] for r in review.table_rows(doc)]
    word = doc.get("trigger_word")
    note = f"{len(rows)} clip(s) in {md_text(folder)}" + (
        f" · trigger word **{md_text(word)}** ({md_text(doc.get('trigger_position', 'start'))})" if word else "")
    return rows, note


def save_table(data_dir: str, rows: list[list], out_root: Path, metadata_file: str = "metadata.json",
               template: Optional[str] = None) -> str:
    """Apply the table's captions and tags to metadata.json (review.apply_edits); what changed."""
    folder = data_folder(data_dir, out_root)
    if not rows:
        raise UserError("Nothing to save: prepare a folder (or load one) first.")
    idx = {k: TABLE_COLUMNS.index(k) for k in ("clip", "caption", "tags")}
    edits = [review.Edit(str(r[idx["clip"]]), str(r[idx["caption"]] or ""), str(r[idx["tags"]] or ""),
                         f"row {i + 1}") for i, r in enumerate(rows)]
    template = template or review.folder_template(folder, DataConfig().auto_caption_template)
    with data_dir_lock(folder, writer=True):  # (as prepare_data: no run reads the folder meanwhile)
        result = review.apply_edits(folder, metadata_file, edits, template)
        table = review.sync_table(folder, result["doc"])
    n = len(result["changed"])
    return (f"Saved: {n} caption(s) changed" + (f" ({', '.join(Path(c).name for c in result['changed'][:5])}"
                                                  f"{' ...' if n > 5 else ''})" if n else "")
            + f"; metadata.json {'rewritten' if n else 'unchanged'}; captions.csv: {table}.")


def clip_audio(data_dir: str, clip: str, out_root: Path) -> tuple[int, np.ndarray]:
    """(sample rate, int16 (samples, channels)) of a clip of the folder, for the player."""
    folder = data_folder(data_dir, out_root)
    path = (folder / clip).resolve()
    if folder.resolve() not in path.parents:
        raise UserError(f"{clip} is not a clip of {folder}.")
    import soundfile as sf

    sr = sf.info(str(path)).samplerate
    audio = load_audio(path, sr, sf.info(str(path)).channels)
    return sr, to_pcm16(audio).T


def trigger_of(data_dir: str, out_root: Path) -> str:
    """The trigger word line of a prepared folder ('' without one), as Markdown."""
    word, pos = resolve_trigger(DataConfig(data_dir=str(data_folder(data_dir, out_root))))
    return f"trigger word **{md_text(word)}** ({md_text(pos)})" if word else ""


def build_tab(gr, cfg: Config, procs: Processes, config_file: Optional[str], out_root: Path):
    """Prepare a folder of songs (prepare_data.py with the form's flags), review its captions, save
    them, and hand the folder to the Train form. Returns the "train on this" button and the data
    folder box."""
    d = cfg.data
    with gr.Row():
        input_dir = gr.Textbox(label="Folder of your songs (--input_dir)", elem_id="data_input", scale=3)
        data_dir = gr.Textbox(value="data", label=f"Prepared data folder (--output_dir; under {out_root})",
                              elem_id="data_dir", scale=3)
        channels = gr.Radio([1, 2], value=d.channels, label="Channels", elem_id="data_channels", scale=1)
    with gr.Row():
        separate = gr.Radio(list(SEPARATE_CHOICES), value=d.separate,
                            label="Remove vocals (demucs: bash install.sh --separation)",
                            elem_id="data_separate")
        auto = gr.Checkbox(value=d.auto_caption, label="Write captions with CLAP tags (auto_caption)",
                           elem_id="data_auto_caption")
        clap_model = gr.Textbox(value=d.auto_caption_model, label="CLAP model (hub id or folder)",
                                elem_id="data_clap_model")
    with gr.Row():
        trigger = gr.Textbox(value=d.trigger_word or "", label="Trigger word (optional)",
                             elem_id="data_trigger")
        position = gr.Radio(["start", "end", "replace"], value="start", label="Trigger word goes at",
                            elem_id="data_trigger_position")
    with gr.Row():
        prepare = gr.Button("Prepare", variant="primary", elem_id="data_prepare")
        load = gr.Button("Load the folder's captions", elem_id="data_load")
    status = gr.Markdown(elem_id="data_status")
    table = gr.Dataframe(headers=list(TABLE_COLUMNS), datatype="str", interactive=True,
                         static_columns=[i for i, c in enumerate(TABLE_COLUMNS)
                                         if c not in EDITABLE],
                         wrap=True, label="Clips (edit caption and tags; click a row to listen)",
                         elem_id="data_table")
    player = gr.Audio(label="Clip", interactive=False, elem_id="data_player")
    with gr.Row():
        save = gr.Button("Save captions", variant="primary", elem_id="data_save")
        to_train = gr.Button("Train on this", elem_id="data_train")
    saved = gr.Markdown(elem_id="data_saved")

    def on_prepare(*values):
        form = DataForm(*values)
        try:
            argv = prepare_argv(form, config_file, out_root)
            p = procs.start(str(data_folder(form.data_dir, out_root)), argv, "prepare")
        except Exception as e:
            yield md_text(page_message(e)), gr.skip()
            return
        while p.popen.poll() is None:
            time.sleep(1.0)
            yield (f"Preparing: {md_text(p.command)}  \n{md_text(progress_text(p.log_path))}  \n"
                   f"```\n{log_tail(p.log_path, 4).replace('`', chr(0x2018))}\n```"), gr.skip()
        if p.popen.returncode != 0:
            yield (f"prepare_data.py failed (exit code {p.popen.returncode}):\n```\n"
                   f"{log_tail(p.log_path).replace('`', chr(0x2018))}\n```"), gr.skip()
            return
        yield on_load(form.data_dir)

    def on_load(folder):
        try:
            rows, note = load_table(folder, out_root)
        except Exception as e:
            return md_text(page_message(e)), gr.skip()
        return f"Ready: {note}. Edit captions or tags below, then Save.", rows

    def on_select(folder, rows, evt: gr.SelectData):
        try:
            clip = rows.values[evt.index[0]][0] if hasattr(rows, "values") else rows[evt.index[0]][0]
            return clip_audio(folder, str(clip), out_root)
        except Exception as e:
            gr.Warning(page_message(e))
            return None

    on_select.__annotations__["evt"] = gr.SelectData  # (gradio passes the selection by this type)

    def on_save(folder, rows):
        try:
            values = rows.values.tolist() if hasattr(rows, "values") else rows
            return md_text(save_table(folder, values, out_root))
        except Exception as e:
            return md_text(page_message(e))

    form = [input_dir, data_dir, separate, auto, clap_model, trigger, position, channels]
    prepare.click(on_prepare, form, [status, table], concurrency_id="procs", concurrency_limit=None)
    load.click(on_load, [data_dir], [status, table], queue=False)
    table.select(on_select, [data_dir, table], [player], queue=False)
    save.click(on_save, [data_dir, table], [saved], concurrency_id="procs", concurrency_limit=None)
    return to_train, data_dir
