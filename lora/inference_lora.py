"""Generate music from text with MusicGen and a LoRA adapter; write WAV files and a manifest.

The seed's command (from inside lora/)::

    python inference_lora.py --base_model_path /path/to/musicgen-small --lora_model_path ../output/best_model \\
        --prompts "hip hop 808 beat with trap drums" --output_dir ../output/generated

More::

    --prompts "lofi piano" "dark techno"     several prompts (each gets --num_samples samples)
    --prompts_file prompts.txt               one prompt per line (blank lines and lines starting with # skipped)
    --prompts_file prompts.jsonl             per-prompt settings: {"text": ..., "duration": 20, "seed": 7,
                                             "guidance_scale": 4, "temperature": 1, "top_k": 250, "top_p": 0,
                                             "num_samples": 2}   (.json: a list of such objects or strings)
    --duration 60                            seconds; beyond max_window (30 s) windowed continuation is used
    --audio_prompt intro.wav                 continue a piece (the duration includes it)
    --lora_scale 0.5                         half-strength adapter (0 = base model); --lora_model_path none = base
    --lora_model_path A B --lora_scale 0.7 0.4   mix two adapters (each at its own strength)
    --merge false                            keep LoRA unmerged (default: merged when lora_scale is 1)
    --seed 3 --num_samples 4                 seeds 3, 4, 5, 6; each file's seed is in manifest.json
    --output_format float --normalize false  32-bit float WAVs, no peak normalisation
    --overwrite                              replace existing files (otherwise nothing is generated)

Each file is named ``<prompt-slug>_s<seed>.wav``; ``output_dir/manifest.json`` lists for every file the
prompt, seed, all settings, the model and adapter identity (path + hash of the adapter weights), duration,
generation time and real-time factor. Any sample can be regenerated alone from its seed and settings: on a CPU
token for token in the default dtype too (bf16 on CPUs with AVX512-BF16/AMX); on a GPU in the same batch
(``batch_files``). The manifest records what that needs: dtype, device type, decoding, the padded text length,
the batch, and the torch/transformers/peft versions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora import config
from lora.common.cli import UserError, human_seconds, log, on_interrupt, run_main
from lora.common.fields import ConfigError
from lora.common.files import check_free_space, check_output_dir
from lora.config import (
    MAX_FILES,
    MAX_PROMPTS,
    GenerationConfig,
    adapter_paths,
    adapter_scales,
    field_problem,
    parse_config,
    seed_problem,
    text_problem,
)
from lora.dataprep.audio import audio_info
from lora.generation import engine
from lora.generation import model as generation_model
from lora.generation.manifest import (
    CONFIG_FILE,
    ManifestWriter,
    add_audio_prompt,
    add_melodies,
    check_melody_files,
    check_outputs,
)
from lora.generation.prompts import read_prompts_file
from lora.generation.requests import Request, SamplingSettings, temperature_problem
from lora.modeling.adapter import adapter_trigger, check_adapter_files, check_mix_bases, describe_choice, trigger_note
from lora.modeling.loading import local_model_folder

DESCRIPTION = "Generate music with MusicGen + a LoRA adapter (WAV files + manifest.json)."
PER_PROMPT_RANGED = ("duration", "guidance_scale", "top_k", "top_p", "num_samples", "seed")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
@dataclass
class PromptSpec:
    text: str
    where: str          # "--prompts #2" or "prompts.jsonl line 3": used in error messages
    duration: float
    seed: int
    num_samples: int
    sampling: SamplingSettings
    melody: str | None = None  # melody models: the audio file whose tune this prompt follows


def build_prompt_specs(g: GenerationConfig, problems: list[str]) -> list[PromptSpec]:
    entries = [(f"--prompts #{i + 1}" if len(g.prompts) > 1 else "--prompts", {"text": t})
               for i, t in enumerate(g.prompts)]
    if g.prompts_file:
        entries += read_prompts_file(g.prompts_file, problems)
    if not entries and not problems:
        if g.unconditional:
            entries = [("--unconditional", {"text": ""})]
        else:
            problems.append("No prompt given. Pass --prompts \"your description\" (several allowed), or "
                            "--prompts_file FILE, or --unconditional to generate without text.")
    if len(entries) > MAX_PROMPTS:
        problems.append(f"{len(entries):,} prompts were given; at most {MAX_PROMPTS:,} per run. Split "
                        f"them into several runs (several --output_dir, or one with other seeds).")
        return []
    specs = []
    for where, e in entries:
        text = str(e.get("text", "")).strip()
        if not text and not g.unconditional:
            problems.append(f"{where}: the prompt is empty. Write a description of the music, or pass "
                            f"--unconditional to generate without text on purpose.")
            continue
        # Per-prompt settings: the same ranges as the flags they override (the flags were checked by
        # the schema).
        own = [field_problem("generation", k, e[k], f"{where}: {k}") for k in PER_PROMPT_RANGED if k in e]
        own.append(text_problem(text, where))
        if not any(own):  # the last sample's seed is a seed too
            own.append(seed_problem(e.get("seed", g.seed), int(e.get("num_samples", g.num_samples)),
                                    f"{where}: seed"))
        if "temperature" in e:
            own.append(temperature_problem(e["temperature"], g.do_sample, f"{where}: temperature"))
        own = [x for x in own if x]
        if own:
            problems += own
            continue
        sampling = SamplingSettings(
            guidance_scale=float(e.get("guidance_scale", g.guidance_scale)),
            temperature=float(e.get("temperature", g.temperature)), top_k=int(e.get("top_k", g.top_k)),
            top_p=float(e.get("top_p", g.top_p)), do_sample=bool(g.do_sample))
        specs.append(PromptSpec(text=text, where=where, duration=float(e.get("duration", g.duration)),
                                seed=int(e.get("seed", g.seed)),
                                num_samples=int(e.get("num_samples", g.num_samples)),
                                sampling=sampling, melody=e.get("melody", g.melody_audio)))
    n_files = sum(spec.num_samples for spec in specs)
    if n_files > MAX_FILES:
        problems.append(f"{n_files:,} files would be generated (prompts x num_samples); at most "
                        f"{MAX_FILES:,} per run. Split the prompts into several runs.")
    return specs


# --------------------------------------------------------------------------------------------
# Adapter choice
# --------------------------------------------------------------------------------------------
def _flag_given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _default_adapter_path() -> str:
    default = GenerationConfig.__dataclass_fields__["lora_model_path"].default
    return os.path.normpath(config.REPO_ROOT / default)


def choose_adapter(g: GenerationConfig, argv: list[str], problems: list[str]) -> tuple[list[str], bool]:
    """(the adapter folders to use: [] for the base model alone, one, or several to mix; whether
    they come from the default lora_model_path, output/best_model: used when it exists, else the
    base model alone). Problems with them are added to ``problems``."""
    paths = adapter_paths(g)
    if not paths:
        return [], False
    try:
        adapter_scales(g, len(paths))
    except ConfigError as e:
        problems.append(str(e))
    explicit = (_flag_given(argv, "--lora_model_path") or len(paths) > 1
                or os.path.normpath(paths[0]) != _default_adapter_path())
    if not explicit and not Path(paths[0]).exists():
        log.warning("No LoRA adapter at the default location %s (nothing trained yet?): generating "
                    "with the BASE MODEL ONLY. Train one with train_lora.py, or pass "
                    "--lora_model_path FOLDER.", paths[0])
        return [], True
    ok = True
    for path in paths:
        if not Path(path).exists():
            problems.append(f"LoRA adapter folder not found: {path} (lora_model_path). Pass the folder "
                            f"train_lora.py wrote (e.g. ../output/best_model), or "
                            f"--lora_model_path none for the base model alone.")
        elif not Path(path).is_dir():
            problems.append(f"lora_model_path {path} is a file; it must be an adapter folder (with "
                            f"adapter_config.json and adapter_model.safetensors).")
        else:
            try:
                check_adapter_files(path)  # complete and whole, before the model loads
                continue
            except UserError as e:
                problems.append(f"lora_model_path: {e}")
        ok = False
    if ok and len(paths) > 1:
        problems += check_mix_bases(paths)  # the same base for all, before the model loads
    return paths, not explicit


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan: dict = {}

    def rules(cfg, ns) -> list[str]:
        """Everything checked before anything loads, besides each value's range (the schema's): the
        prompts and their per-prompt settings, settings that depend on each other, the input files,
        the adapter."""
        g = cfg.generation
        problems: list[str] = []
        plan["specs"] = build_prompt_specs(g, problems)
        problems.append(temperature_problem(g.temperature, g.do_sample))
        if not g.extend_stride < g.max_window:
            problems.append(f"extend_stride ({g.extend_stride} s) must be > 0 and smaller than "
                            f"max_window ({g.max_window} s); audiocraft uses 18 of 30.")
        check_melody_files([s.melody for s in plan["specs"]], problems)
        if g.audio_prompt and not Path(g.audio_prompt).is_file():
            problems.append(f"audio_prompt file not found: {g.audio_prompt}.")
        elif g.audio_prompt:
            try:
                audio_info(g.audio_prompt)  # readable audio, before the model loads
            except UserError as e:
                problems.append(f"audio_prompt: {e}")
        plan["adapters"], plan["default_adapter"] = choose_adapter(g, argv, problems)
        return [p for p in problems if p]

    cfg, _ = parse_config(argv, description=DESCRIPTION, sections=("generation", "model"), rules=rules)
    g, specs, adapters = cfg.generation, plan["specs"], plan["adapters"]
    log.info(describe_choice(cfg.model.model_path, adapters, adapter_scales(g, len(adapters))
                             if adapters else [],
                             plan["default_adapter"],
                             f"nothing at the default lora_model_path {g.lora_model_path}"
                             if plan["default_adapter"] else ""))
    if not adapters and g.merge:
        log.info("merge: true has no effect without an adapter")
    for folder in adapters:
        _say_trigger(folder, [spec.text for spec in specs])
    requests = [Request(prompt=spec.text, seed=spec.seed + j, duration=spec.duration,
                        sampling=spec.sampling,
                        melody_file=spec.melody or "") for spec in specs for j in range(spec.num_samples)]
    out_dir = check_output_dir(g.output_dir, "--output_dir")
    models = [("the base model", local_model_folder(cfg.model))] + [("the adapter", a) for a in adapters]
    names = check_outputs(requests, out_dir, g.overwrite, models)
    log.info("Resolved settings: %s", json.dumps({"generation": dataclasses.asdict(g),
                                                  "model": dataclasses.asdict(cfg.model)}, default=str))
    log.info("%d prompt(s) x samples = %d file(s), %s of audio, into %s", len(specs), len(requests),
             human_seconds(sum(r.duration for r in requests)), out_dir)

    # ---- build
    import torch

    torch.manual_seed(g.seed)
    model, processor, info, adapter_info = generation_model.load_generation_model(cfg,
                                                                                  adapter_path=adapters or None)
    if g.audio_prompt:
        add_audio_prompt(model, info, g.audio_prompt, requests)
    add_melodies(info, requests, model_cfg=cfg.model)

    # ---- generate, writing each batch as it is ready
    bytes_per_sample = 2 if g.output_format == "pcm16" else 4
    check_free_space(out_dir, sum(r.duration for r in requests) * info.sample_rate * info.audio_channels
                     * bytes_per_sample * 1.05 + 2 ** 20, f"{len(requests)} WAV file(s)")
    writer = ManifestWriter(g, out_dir, requests, names, model, info, adapter_info)
    t0 = time.perf_counter()
    with on_interrupt(lambda: interrupt_note(writer, requests, out_dir)):
        results = engine.generate(model, processor, info, requests, batch_size=g.batch_size,
                                      max_window=g.max_window, extend_stride=g.extend_stride,
                                  progress=True,
                                      on_batch=writer.write_batch, decoding=g.decoding)
    wall = time.perf_counter() - t0
    cfg.save(out_dir / CONFIG_FILE)
    gen_time = sum(r.generation_time for r in results)
    audio_s = sum(r.audio.shape[-1] for r in results) / info.sample_rate
    rtf = gen_time / audio_s if audio_s else float("nan")
    print(f"Wrote {len(results)} file(s) to {out_dir} ({human_seconds(audio_s)} of audio in "
          f"{human_seconds(wall)}); real-time factor {rtf:.3f} "
          f"({1 / rtf if rtf else float('inf'):.2f}x real time). Manifest: {writer.path}")
    return 0


def interrupt_note(writer: ManifestWriter, requests: list, out_dir) -> str:
    """What Ctrl-C leaves, and the command that goes on from there."""
    if not writer.written:
        return (f"no file was finished yet (nothing was written to {out_dir}); run the same command "
                f"again")
    return (f"{len(writer.written)} of {len(requests)} file(s) were written to {out_dir} and are "
            f"listed in {writer.path}; the same command plus --overwrite generates them all again, "
            f"or pass --seed with a new first seed for other samples")
def _say_trigger(folder: str, prompts: list[str]) -> None:
    """Show the adapter's trigger word (the manifest records it too); warn when no prompt has it."""
    note = trigger_note(folder)
    if not note:
        return
    word = adapter_trigger(folder)["word"]
    missing = [p for p in prompts if word.lower() not in p.lower()]
    if missing:
        log.warning("%s; %d of %d prompt(s) lack it, e.g. %r", note, len(missing), len(prompts),
                    missing[0][:80])
    else:
        log.info(note)


if __name__ == "__main__":
    sys.exit(run_main(main))
