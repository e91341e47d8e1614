"""evaluate.py's settings: the rules that span several settings (``config_problems``, also the web
UI's check of its Evaluate form before it starts a run) and what an evaluation writes into its
output folder (the ownership rule of lora.common.ownership: ``earlier_evaluation``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lora.common.cli import UserError
from lora.common.fields import ConfigError
from lora.common.files import check_output_dir
from lora.common.ownership import claim_output, read_record
from lora.config import Config, adapter_paths, adapter_scales, seed_problem, text_problem
from lora.generation.requests import temperature_problem
from lora.modeling.adapter import check_adapter_files, check_mix_bases
from lora.modeling.loading import local_model_folder

# The schema sections evaluate.py takes flags from
EVALUATE_SECTIONS = ("evaluation", "model", "generation", "data")


def config_problems(cfg: Config, ns=None) -> list[str]:
    """What must hold before anything loads, besides each value's range (the schema's): rules
    between settings and the files they name."""
    ev, g = cfg.evaluation, cfg.generation
    problems = []
    if not ev.skip_generation:
        problems.append(temperature_problem(g.temperature, g.do_sample))
        problems.append(seed_problem(g.seed, ev.eval_seeds, "generation.seed"))
        problems += [text_problem(t, f"--prompts #{i + 1}") for i, t in enumerate(g.prompts)]
    if ev.clap_model_path and not Path(ev.clap_model_path).is_dir():
        problems.append(f"evaluation.clap_model_path {ev.clap_model_path} is not a folder. "
                        f"Download a CLAP model once (e.g. `hf download laion/larger_clap_music "
                        f"--local-dir models/clap`) and pass that folder, or leave clap_model_path "
                        f"unset to skip the CLAP score.")
    if g.prompts_file and not Path(g.prompts_file).is_file():
        problems.append(f"generation.prompts_file {g.prompts_file} does not exist.")
    paths = adapter_paths(g)
    try:
        adapter_scales(g, len(paths))
    except ConfigError as e:
        problems.append(str(e))
    if ev.compare and not paths:
        problems.append("--compare needs a LoRA adapter: pass --lora_model_path (e.g. "
                        "../output/best_model).")
    for adapter in paths:
        if (ev.compare or len(paths) > 1) and not Path(adapter).is_dir():
            problems.append(f"{'--compare: ' if ev.compare else ''}the LoRA adapter folder "
                            f"{adapter} does not exist. Train one with train_lora.py, or pass the "
                            f"right --lora_model_path.")
        elif Path(adapter).is_dir():
            try:
                check_adapter_files(adapter)  # complete and whole, before the model loads
            except UserError as e:
                problems.append(f"lora_model_path: {e}")
    if len(paths) > 1 and all(Path(p).is_dir() for p in paths):
        problems += [p for p in check_mix_bases(paths) if p not in problems]
    try:
        check_output_dir(ev.output_dir, "--output_dir")
        earlier_evaluation(cfg)  # the ownership rule: nothing of the user's is written over
    except UserError as e:
        problems.append(str(e))
    return [p for p in problems if p]


TOOL = "evaluate.py"
# What evaluate.py writes into output_dir (a rerun replaces its own earlier evaluation there)
OUTPUTS = ("results.json", "config.yaml", "report.html", "audio", "spectrograms", "charts", "training_samples")
# what evaluate.py writes inside its folders: audio/<model>/pNNN_sK.wav, spectrograms/<model>/pNNN_sK.png,
# charts/*.png, training_samples/step-NNNNNN/sample_NN.wav (and the temporary files of atomic writes)
_OWN_FILES = {"audio": re.compile(r"[^/]+/p\d{3}_s\d+\.wav"),
              "spectrograms": re.compile(r"[^/]+/p\d{3}_s\d+\.png"),
              "charts": re.compile(r"[^/]+\.png"),
              "training_samples": re.compile(r"step-\d+/sample_\d+\.wav")}
_TEMPORARY = re.compile(r"(.*/)?\..+\.tmp")


def _foreign_inside(folder: Path) -> list[Path]:
    """The files (and links) in one of evaluate.py's folders that it does not write there: a rerun
    replaces the folder, so these would be lost; the ownership rule refuses instead."""
    if folder.is_symlink() or not folder.is_dir():
        return [folder]
    own = _OWN_FILES[folder.name]
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink() or (p.is_file() and not (own.fullmatch(rel) or _TEMPORARY.fullmatch(rel))):
            out.append(p)
    return out


def _ours(out: Path):
    """evaluate.py's entries in ``out``: those its record lists, or, in a folder an earlier version
    wrote (its results.json, no record), the entries an evaluation writes."""
    recorded = read_record(out, TOOL)
    if not recorded and (out / "results.json").is_file():
        try:
            doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and "models_evaluated" in doc and "likelihood" in doc:
            recorded = set(OUTPUTS)

    def ours(entry: Path) -> list[Path]:
        if entry.name not in recorded:
            return [entry]
        return _foreign_inside(entry) if entry.name in _OWN_FILES else []

    return ours


def earlier_evaluation(cfg: Config) -> list[Path]:
    """The entries of an earlier evaluation in output_dir, which this one replaces; UserError (the
    ownership rule, lora.common.ownership) when something there is not evaluate.py's, or when
    output_dir is a model's or an adapter's folder."""
    out = Path(cfg.evaluation.output_dir)
    models = [("the base model", local_model_folder(cfg.model))]
    models += [("the adapter", a) for a in adapter_paths(cfg.generation)]
    return claim_output(out, TOOL, writes=OUTPUTS, ours=_ours(out), overwrite=None, models=models)
