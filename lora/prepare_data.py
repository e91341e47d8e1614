"""Prepare a MusicGen fine-tuning dataset: clips + captions + metadata.json.

    # the small synthetic example set (seconds)
    python lora/prepare_data.py --create_example --output_dir data
    # your own audio (any of wav flac ogg opus mp3 aiff; m4a/aac with PyAV)
    python lora/prepare_data.py --input_dir /path/to/audio --output_dir data --metadata_file metadata.json
    # check an existing data folder
    python lora/prepare_data.py --validate --data_dir data
    # real songs: vocals removed (demucs), captions from CLAP tags, a trigger word
    python lora/prepare_data.py --input_dir songs --output_dir data --separate vocals --auto_caption \
        --trigger_word "zxq style"
    # your edits of data/captions.csv applied (no audio is decoded again)
    python lora/prepare_data.py --data_dir data --captions_file data/captions.csv

What --input_dir does (DATA_PREPARATION.md has the details): scan the folder recursively; caption
each recording (sidecar .txt/.json, captions_file, metadata.jsonl/.csv of the HF audiofolder layout,
then default_text / caption_template); decode block by block in worker processes, resample to
sample_rate, mix to mono (or stereo), trim leading/trailing silence, cut into segment_seconds clips;
split train/valid by recording; write PCM16 WAVs into data/train and data/valid, metadata.json,
prepare_report.json (every skipped file with its reason) and prepare_state.json (lets a rerun skip
work already done). Source files are only read, never changed: input and output folders that overlap
(the input is the output's train/ or valid/, a file it writes would replace one it reads) are
refused before anything is written, and so is a damaged prepare_state.json (without --overwrite).
What it changes in the audio is said: clips above 0 dBFS scaled down, a few NaN/inf samples set to
0, channels mixed. Symlinked folders are followed; what cannot be read is reported, and a source of
the last run that cannot be read now keeps its clips.

--separate vocals|auto keeps every stem but vocals (demucs, bash install.sh --separation; each source
separated once and cached in data/cache/separation; auto only where the vocal stem is loud);
--auto_caption writes captions from CLAP zero-shot tags where you gave none; every run writes
captions.csv (one row per clip) for you to review, and --captions_file captions.csv without
--input_dir applies your edits to metadata.json; --trigger_word puts a word in every caption (the
adapter records it).

This script parses the settings, checks them and calls the library in lora/dataprep: the run
(prepare.py: reuse and checkpoints, duplicates, split, the report), the scan (scan.py), the per-file
worker (worker.py), the ownership of the output folder (ownership.py), where a caption comes from
(captions.py), the synthetic --create_example set (example_data.py), the --validate check
(data_check.py, shared with test_dataset.py), vocal removal (separation.py, vocal_removal.py),
auto captions (autocaption.py) and the review table (review.py).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora.common.cli import UserError, log, script_command, shown_path
from lora.config import Config, parse_config
from lora.dataprep.autocaption import read_vocabularies, template_problems
from lora.dataprep.data_check import check_data_dir
from lora.dataprep.prepare import create_example, prepare_folder
from lora.dataprep.review import is_review_table, review_folder
from lora.dataprep.separation import INSTALL_HINT
from lora.dataset import data_dir_lock, metadata_path

EXAMPLES = """examples:
  python lora/prepare_data.py --create_example --output_dir data
  python lora/prepare_data.py --input_dir /path/to/audio/files --output_dir data --metadata_file metadata.json
  python lora/prepare_data.py --validate --data_dir data
  python lora/prepare_data.py --input_dir songs --output_dir data --separate vocals --auto_caption
  python lora/prepare_data.py --data_dir data --captions_file data/captions.csv   (apply your edits)
  (from inside lora/: python prepare_data.py --create_example --output_dir ../data)"""


# ============================================================================================
# Entry point
# ============================================================================================
def main(argv=None) -> int:
    cfg, _ = parse_config(argv, description=__doc__.split("\n\n")[0] + "\n\n" + EXAMPLES,
                          sections=("data", "model"), rules=lambda cfg, ns: check_settings(cfg))
    d = cfg.data
    log.info("data settings: %s", json.dumps({k: v for k, v in vars(d).items()}, ensure_ascii=False))
    if d.validate:
        with data_dir_lock(d.data_dir, writer=False):
            summary = check_data_dir(d.data_dir, d.metadata_file, sample_rate=d.sample_rate)
        print(summary.text())
        return 0 if summary.ok else 1
    with data_dir_lock(d.data_dir, writer=True):  # no training reads the clips while they change
        if is_review(d):
            print(review_folder(cfg))
            return 0
        if d.create_example:
            create_example(cfg)
        else:
            prepare_folder(cfg)
    summary = check_data_dir(d.data_dir, d.metadata_file, sample_rate=d.sample_rate, hash_content=False)
    print(summary.text())
    print(f"Next: {script_command('test_dataset.py')} --data_dir {shown_path(d.data_dir)}")
    return 0 if summary.ok else 1


def check_settings(cfg: Config) -> list[str]:
    """What must hold before anything is read or written, besides each value's range (the schema's):
    one mode, the input files, settings that depend on each other."""
    d = cfg.data
    p: list[str] = []
    modes = [n for n, on in (("--create_example", d.create_example), ("--input_dir", d.input_dir),
                             ("--validate", d.validate)) if on]
    if not modes and not is_review(d):
        p.append("Nothing to do: pass --input_dir YOUR_AUDIO_FOLDER, --create_example or "
                 "--validate (or --captions_file captions.csv to apply your caption edits).\n"
                 + EXAMPLES)
    elif len(modes) > 1:
        p.append(f"Choose one of {', '.join(modes)} (they were given together).")
    if d.input_dir and not d.create_example and not d.validate and not Path(d.input_dir).is_dir():
        p.append(f"data.input_dir: folder {d.input_dir} does not exist (pass --input_dir with your "
                 f"audio folder).")
    if d.captions_file and not Path(d.captions_file).is_file():
        p.append(f"data.captions_file: {d.captions_file} not found.")
    elif d.captions_file and d.input_dir and is_review_table(Path(d.captions_file)):
        p.append(f"data.captions_file: {d.captions_file} is a review table (one row per clip, "
                 f"prepare_data's captions.csv): apply it to the prepared folder without --input_dir: "
                 f"python lora/prepare_data.py --data_dir {d.data_dir} --captions_file "
                 f"{d.captions_file}")
    p += new_feature_problems(d)
    if d.min_seconds > d.segment_seconds:
        p.append(f"data.min_seconds must be between 0 and segment_seconds ({d.segment_seconds}), "
                 f"got {d.min_seconds}.")
    try:
        d.caption_template.format(stem="x", folder="y", name="z.wav")
    except (KeyError, IndexError, ValueError) as e:
        p.append(f"data.caption_template {d.caption_template!r} is not a valid pattern ({e!r}); use the "
                 f"placeholders {{stem}}, {{folder}} and {{name}}, e.g. '{{folder}}, {{stem}}'.")
    return p


def clap_model_problems(model: str) -> list[str]:
    """A CLAP model given as a folder must be one (a hub id is checked when it loads)."""
    path = Path(model).expanduser()
    looks_like_path = path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1
    if looks_like_path and not (path / "config.json").is_file():
        return [f"data.auto_caption_model: {model} is not a CLAP model folder (no config.json). Pass "
                f"a hub id (laion/larger_clap_music) or a folder made with hf download ID --local-dir "
                f"FOLDER."]
    return []


def is_review(d) -> bool:
    """Applying caption edits or a trigger word to a prepared folder (no audio is read)."""
    return not (d.create_example or d.input_dir or d.validate) and \
        bool(d.captions_file or d.trigger_word is not None or d.trigger_position == "off")


def new_feature_problems(d) -> list[str]:
    """Separation, auto captions and the trigger word: what must hold before anything runs."""
    p = []
    if d.separate != "none" and importlib.util.find_spec("demucs") is None:
        p.append(f"data.separate {d.separate}: demucs is not installed; {INSTALL_HINT}.")
    if d.separate != "none" and d.separation_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.append("data.separation_device cuda: no CUDA GPU is visible to torch; use auto or cpu.")
    if d.auto_caption:
        try:
            names = read_vocabularies(d.caption_vocabulary).names
            p += template_problems(d.auto_caption_template, names)
        except UserError as e:
            p.append(str(e))
        p += clap_model_problems(d.auto_caption_model)
    if d.trigger_word is not None and (not d.trigger_word.strip() or "\n" in d.trigger_word
                                       or len(d.trigger_word) > 200):
        p.append(f"data.trigger_word: a word or phrase on one line of at most 200 characters, got "
                 f"{d.trigger_word[:60]!r} (to remove the trigger word: --trigger_position off).")
    if d.trigger_word is not None and d.trigger_position == "off":
        p.append("data.trigger_word was given with trigger_position off (no trigger word): choose "
                 "start, end or replace, or leave trigger_word out.")
    if is_review(d) and not metadata_path(d.data_dir, d.metadata_file).is_file():
        p.append(f"--captions_file / --trigger_word without --input_dir apply to a prepared folder, "
                 f"but {metadata_path(d.data_dir, d.metadata_file)} does not exist: pass --data_dir "
                 f"with the folder prepare_data wrote.")
    return p


if __name__ == "__main__":
    from lora.common.cli import run_main

    sys.exit(run_main(main))
