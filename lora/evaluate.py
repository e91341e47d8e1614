"""Evaluate a MusicGen LoRA adapter against its base model (or one model alone).

    cd lora && python evaluate.py --base_model_path MODEL --lora_model_path ../output/best_model \\
        --output_dir ../output/evaluation --compare

What is measured (everything offline; CLAP only when you point at a local CLAP model):

1. Held-out likelihood (always; cheap and the most sensitive): teacher-forced cross-entropy and
   perplexity per codebook on the valid split's cached EnCodec tokens (the token cache of
   lora/dataprep/token_cache.py, built if missing), for the base model (the adapter disabled with peft's
   ``disable_adapter()``: one model in memory) and for the LoRA model, plus a paired cluster
   bootstrap confidence interval for the difference LoRA - base that resamples recordings (clips cut
   from one recording, ``ClipRecord.source``, are not independent; a clip without a source is a
   recording of its own). The window is the one the adapter was trained on (its folder's
   config.yaml, training.max_duration), else config.yaml's training.max_duration.
2. Generation metrics (unless --skip_generation): both models generate the same prompts (the valid
   captions, or --prompts / --prompts_file) with the same seeds and settings. Each clip gets signal
   checks (NaN/Inf, clipping, DC, loudness, silence, flatness). Both models are scored on ONE set:
   the (prompt, seed) pairs whose clips pass for every model (a model that breaks more clips is not
   judged on its good ones only; the failure shares are reported apart). Those clips are compared
   with the valid reference audio by FAD and KAD on the base model's frozen EnCodec encoder latents
   and on librosa features (every clip loudness-normalised first), next to the noise floor (FAD
   between two halves of the reference) and the codec floor (reference vs its own EnCodec
   round-trip). Diversity across prompts and across seeds. CLAP text-audio score with a
   shuffled-prompt baseline when --clap_model_path is a local CLAP folder. Each difference LoRA -
   base (FAD, KAD, CLAP, failure share) gets a paired bootstrap interval resampling whole prompts
   and a sign-flip permutation test over prompts.
3. Verdicts (lora/scoring/verdicts.py): the summary names a model better on a row only where its
   test says so, the rows adjusted together, so that with no true difference it names any winner
   at most 5% of the time; below the fewest recordings / prompts any test could use it says how
   many more it needs.

Writes output_dir/results.json (every number with its n, the settings, model and adapter identity,
library versions), output_dir/report.html (players, spectrograms, charts, training loss curve),
output_dir/audio/ and prints a summary table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora import config
from lora.common.cli import UserError, log, on_interrupt, run_main
from lora.common.files import atomic_write_json, check_free_space
from lora.common.ownership import record_written, remove_entries
from lora.config import (
    Config,
    GenerationConfig,
    adapter_paths,
    adapter_scales,
    parse_config,
)
from lora.dataprep.melody_stems import melody_separator
from lora.dataprep.token_cache import build_token_cache
from lora.dataset import cache_note, data_dir_lock, load_metadata, resolve_trigger
from lora.generation.model import pick_device
from lora.generation.prompts import read_prompt_texts
from lora.modeling.adapter import (
    adapter_identity,
    describe_choice,
    load_adapters,
)
from lora.modeling.cpu_speed import keep_freed_memory
from lora.modeling.loading import family_for, load_base_model
from lora.scoring import copy_check
from lora.scoring.generated import (
    KAD_KERNEL,
    KAD_MAX_FRAMES,
    LOUDNESS_TARGET_LUFS,
    generation_metrics,
)
from lora.scoring.likelihood import likelihood_section
from lora.scoring.report import format_table, jsonable, summary_rows, versions, write_report
from lora.scoring.settings import EVALUATE_SECTIONS, OUTPUTS, TOOL, config_problems, earlier_evaluation
from lora.training import samples

                               # sums per model and space); CLAP and failure shares use
                               # evaluation.bootstrap_samples


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def evaluation_plan(cfg: Config) -> dict:
    """Which models are evaluated: {"models": ["base", "lora"] | ["lora"] | ["base"], "adapter": the
    (first) adapter folder or None, "adapters": every adapter folder (several: a mix), "scales":
    their scales}."""
    ev, paths = cfg.evaluation, adapter_paths(cfg.generation)
    have_adapter = bool(paths) and all(Path(p).is_dir() for p in paths)
    if ev.compare:
        models = ["base", "lora"]
    elif have_adapter:
        models = ["lora"]
    else:
        if paths:
            log.warning("No adapter at %s: evaluating the BASE MODEL ONLY", paths[0])
        models = ["base"]
    used = paths if "lora" in models else []
    return {"models": models, "adapter": used[0] if used else None, "adapters": used,
            "scales": adapter_scales(cfg.generation, len(used)) if used else []}


def choose_prompts(cfg: Config, valid) -> tuple[list[str], str]:
    """The fixed prompt set: --prompts, else --prompts_file, else the distinct non-empty valid
    captions (in metadata order); the first num_prompts of it. Returns (prompts, where they came
    from)."""
    g = cfg.generation
    if g.prompts:
        prompts, source = [p.strip() for p in g.prompts if p.strip()], "--prompts"
    elif g.prompts_file:
        prompts, source = read_prompt_texts(g.prompts_file), str(g.prompts_file)
    else:
        prompts = list(dict.fromkeys(r.text.strip() for r in valid if r.text.strip()))
        source = "valid captions"
        if not prompts:
            raise UserError(f"The valid clips in {cfg.data.data_dir} have no captions to use as "
                            f"prompts; pass --prompts_file FILE (one prompt per line) or "
                            f"--skip_generation.")
    return prompts[:cfg.evaluation.num_prompts], source


def prompts_note(prompts: list[str], source: str, num_prompts: int) -> str:
    """What to say when fewer prompts were there to take than --num_prompts asks for ('' when
    not)."""
    if len(prompts) >= num_prompts:
        return ""
    where = "distinct held-out caption(s)" if source == "valid captions" else f"prompt(s) in {source}"
    return (f"Generation metrics use {len(prompts)} prompt(s), not --num_prompts {num_prompts}: there "
            f"are only {len(prompts)} {where}. For more, pass --prompts_file FILE (one prompt per "
            f"line) or hold out clips with more captions.")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_config(argv,
                          description="Evaluate a MusicGen LoRA adapter: held-out likelihood, generation "
                                            "metrics (FAD/KAD, signal checks, diversity, CLAP), "
                                            "HTML report.",
                          sections=EVALUATE_SECTIONS, rules=config_problems)
    plan = evaluation_plan(cfg)
    log.info("Evaluating %s on %s/%s -> %s", " and ".join(plan["models"]), cfg.data.data_dir,
             cfg.data.metadata_file, cfg.evaluation.output_dir)
    default = (not plan["adapters"] or os.path.normpath(plan["adapters"][0]) == os.path.normpath(
        config.REPO_ROOT / GenerationConfig.__dataclass_fields__["lora_model_path"].default)) \
        and not any(a == "--lora_model_path" or a.startswith("--lora_model_path=") for a in argv)
    missing = f"nothing at lora_model_path {adapter_paths(cfg.generation)[0]}" if adapter_paths(cfg.generation) else ""
    log.info(describe_choice(cfg.model.model_path, plan["adapters"], plan["scales"],
                             bool(default and plan["adapters"]), missing))
    log.info("  evaluation: %s", json.dumps(dataclasses.asdict(cfg.evaluation)))
    g = cfg.generation
    log.info("  sampling: guidance %g, temperature %g, top_k %d, top_p %g, first seed %d, batch %d",
             g.guidance_scale, g.temperature, g.top_k, g.top_p, g.seed, g.batch_size)
    with data_dir_lock(cfg.data.data_dir, writer=False):  # prepare_data waits for the evaluation
        return evaluate(cfg, plan)


def evaluate(cfg: Config, plan: dict) -> int:
    """Load, build the token cache, load the adapter; then held-out likelihood, generation metrics,
    results."""
    import torch

    ev, g = cfg.evaluation, cfg.generation
    out_dir = Path(ev.output_dir)
    models, adapter = plan["models"], plan["adapter"]
    torch.manual_seed(g.seed)
    t_start = time.perf_counter()

    earlier = earlier_evaluation(cfg)
    records = load_metadata(cfg.data.data_dir, cfg.data.metadata_file, trigger=resolve_trigger(cfg.data))
    valid = [r for r in records if r.split == "valid"]
    if not valid:
        raise UserError(f"No held-out clips (split 'valid') in "
                        f"{cfg.data.data_dir}/{cfg.data.metadata_file}: the evaluation needs clips "
                        f"the adapter never trained on. Re-run prepare_data.py with "
                        f"--valid_fraction 0.1 (or higher).")

    device = pick_device()
    if device.type == "cpu" and keep_freed_memory():
        log.info("CPU memory: freed tensors stay in the process for reuse (glibc malloc; fewer "
                 "page faults)")
    model, processor, info = load_base_model(cfg.model, device=device)
    # Cache (built once, shared with training) before the adapter goes on: codes and text states are
    # the base's.
    with on_interrupt(lambda: cache_note(cfg.data.data_dir)):
        clips, cache_stats = build_token_cache(valid, model, processor, info, cfg.data.data_dir,
                                               batch_size=cfg.training.encode_batch_size, device=device,
                                               verify=cfg.data.verify_cache,
                                               melody_separator=melody_separator(cfg.model)
                                               if family_for(info).MELODY else None)
        # the copy check's index of the training clips' tokens (their cache, shared with training)
        index = None if ev.skip_generation else copy_check.training_index(
            records, model, processor, info, cfg.data.data_dir, cfg.training.encode_batch_size, device)
    identity = {"base": {k: v for k, v in info.to_dict().items()
                         if k in ("name_or_path", "identity", "hub_revision", "sample_rate", "frame_rate",
                                  "num_codebooks", "audio_channels")}}
    if adapter:
        model, ids = load_adapters(model, plan["adapters"], plan["scales"])
        if plan["scales"] != [1.0]:
            log.info("Adapter scale(s) %s (--lora_scale)", " ".join(f"{s:g}" for s in plan["scales"]))
        if len(ids) == 1:
            identity["lora"] = dict(adapter_identity(adapter), base=identity["base"]["name_or_path"],
                                    scale=g.lora_scale)
        else:
            identity["lora"] = {"adapters": ids, "base": identity["base"]["name_or_path"],
                                "scale": plan["scales"]}
    model.eval()

    source_of = {r.id: r.source for r in valid}
    recordings = [("source", source_of[c.id]) if source_of.get(c.id) else ("clip", c.id) for c in clips]
    lk, few_note = likelihood_section(model, processor, info, clips, cfg, models, device,
                                      cache_stats, recordings, adapter)
    # The first write: an earlier evaluation's files go (only evaluate.py's), the new ones are
    # recorded as evaluate.py's before they are written.
    remove_entries(earlier)
    record_written(out_dir, TOOL, OUTPUTS, keep=False)
    results: dict = {
        "models_evaluated": models, "identity": identity, "likelihood": lk, "versions": versions(),
        "settings": settings_record(cfg, device),
        "notes": [],
    }
    if few_note:
        results["notes"].append(few_note)
        log.warning(few_note)

    if ev.skip_generation:
        results["generation"] = {"skipped": "generation metrics skipped (--skip_generation)"}
        results["notes"].append("Generation metrics skipped (--skip_generation): likelihood only.")
    else:
        prompts, source = choose_prompts(cfg, valid)
        results["settings"]["prompts_source"] = source
        if prompts_note(prompts, source, ev.num_prompts):
            results["notes"].append(prompts_note(prompts, source, ev.num_prompts))
            log.warning(results["notes"][-1])
        n_clips = len(prompts) * ev.eval_seeds * len(models)
        check_free_space(out_dir, n_clips
                         * (ev.eval_duration * info.sample_rate * info.audio_channels * 2 + 2e5)
                         + 5 * 2 ** 20, f"{n_clips} generated clip(s) with spectrograms, and the report")
        with on_interrupt(lambda: f"results.json and report.html are written at the end, so none "
                                  f"were; the audio generated so far is in {out_dir / 'audio'}. "
                                  f"Run again, with --skip_generation for the held-out likelihood "
                                  f"alone (fast)"):
            gen = generation_metrics(model, processor, info, cfg, models, valid, prompts, out_dir, device,
                                     index)
        results["generation"] = gen
        results["notes"] += gen.pop("notes", [])
        if gen["clap"].get("skipped"):
            results["notes"].append(gen["clap"]["skipped"])
    if adapter:  # the run's samples during training, for the report's progression
        results["training_samples"] = samples.progression(adapter, out_dir)
    results["seconds"] = time.perf_counter() - t_start
    write_results(cfg, results, out_dir, adapter)
    return 0


def settings_record(cfg: Config, device) -> dict:
    """The settings an evaluation ran with, for results.json."""
    ev, g = cfg.evaluation, cfg.generation
    return {"evaluation": dataclasses.asdict(ev), "data_dir": cfg.data.data_dir,
            "metadata_file": cfg.data.metadata_file, "device": str(device),
            "sampling": {"guidance_scale": g.guidance_scale, "temperature": g.temperature, "top_k": g.top_k,
                         "top_p": g.top_p, "do_sample": g.do_sample, "first_seed": g.seed,
                         "batch_size": g.batch_size, "max_window": g.max_window,
                         "extend_stride": g.extend_stride, "duration": ev.eval_duration},
            "loudness_target_lufs": LOUDNESS_TARGET_LUFS, "kad_kernel": KAD_KERNEL,
            "kad_scale": 100, "kad_max_frames": KAD_MAX_FRAMES, "config_file": cfg.config_file}


def write_results(cfg: Config, results: dict, out_dir: Path, adapter) -> None:
    """results.json, config.yaml, report.html, and the summary table on stdout."""
    results["summary"] = summary_rows(results)
    results = jsonable(results)
    atomic_write_json(out_dir / "results.json", results)
    cfg.save(out_dir / "config.yaml")
    report = write_report(results, out_dir, adapter_dir=adapter)
    print()
    print(format_table(results["summary"]))
    for note in results["notes"]:
        print(f"* {note}")
    print()
    print(f"results: {out_dir / 'results.json'}")
    print(f"report:  {report}")


if __name__ == "__main__":
    sys.exit(run_main(main))
