"""Evaluate a MusicGen LoRA adapter against its base model (or one model alone).

    cd lora && python evaluate.py --base_model_path MODEL --lora_model_path ../output/best_model \
        --output_dir ../output/evaluation --compare

What is measured (everything offline; CLAP only when you point at a local CLAP model):

1. Held-out likelihood (always; cheap and the most sensitive): teacher-forced cross-entropy and perplexity per
   codebook on the valid split's cached EnCodec tokens (the token cache of dataset.py, built if missing), for
   the base model (the adapter disabled with peft's ``disable_adapter()``: one model in memory) and for the
   LoRA model, plus a paired cluster bootstrap confidence interval for the difference LoRA - base that resamples
   recordings (clips cut from one recording, ``ClipRecord.source``, are not independent; a clip without a source
   is a recording of its own). The window is the one the adapter was trained on (its folder's config.yaml,
   training.max_duration), else config.yaml's training.max_duration.
2. Generation metrics (unless --skip_generation): both models generate the same prompts (the valid captions,
   or --prompts / --prompts_file) with the same seeds and settings. Each clip gets signal checks (NaN/Inf,
   clipping, DC, loudness, silence, flatness). Both models are scored on ONE set: the (prompt, seed) pairs whose
   clips pass for every model (a model that breaks more clips is not judged on its good ones only; the failure
   shares are reported apart). Those clips are compared with the valid reference audio by FAD and KAD on the
   base model's frozen EnCodec encoder latents and on librosa features (every clip loudness-normalised first),
   next to the noise floor (FAD between two halves of the reference) and the codec floor (reference vs its own
   EnCodec round-trip). Diversity across prompts and across seeds. CLAP text-audio score with a shuffled-prompt
   baseline when --clap_model_path is a local CLAP folder. Each difference LoRA - base (FAD, KAD, CLAP, failure
   share) gets a paired bootstrap interval over the (prompt, seed) pairs; the summary names a winner only when
   it excludes 0.

Writes output_dir/results.json (every number with its n, the settings, model and adapter identity, library
versions), output_dir/report.html (players, spectrograms, charts, training loss curve), output_dir/audio/ and
prints a summary table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

import numpy as np

import lora
from lora import chroma as melody_chroma
from lora import metrics
from lora import config as config_module
from lora.adapter import adapter_identity, check_adapter_files, check_mix_bases, describe_choice, load_adapters, \
    text_encoder_has_lora
from lora.audio import load_audio, save_wav
from lora.config import Config, ConfigError, GenerationConfig, adapter_paths, adapter_scales, load_yaml, parse_config
from lora.cpu_speed import keep_freed_memory
from lora.dataset import CachedTokenDataset, build_token_cache, collate_tokens, load_metadata
from lora.generation import GenerationError, cast_for_generation, generate_audio, melody_from_audio, pick_device, \
    temperature_problem
from lora.loading import family_for, load_base_model
from lora.precision import generation_dtype
from lora.prompts import read_prompt_texts
from lora.report import MIN_CLIPS_FOR_A_VERDICT, format_table, save_spectrogram, summary_rows, write_report
from lora.utils import UserError, atomic_write_json, check_free_space, check_output_dir, log, on_interrupt, run_main

LOUDNESS_TARGET_LUFS = -23.0   # every clip is normalised to this before embedding (EBU R128)
KAD_MAX_FRAMES = 2000          # frames per set for KAD (kernel matrices are O(n²)); subsampled with seed 0
KAD_KERNEL = "rbf"             # Gaussian kernel, median-distance bandwidth (KAD paper / kadtk)
GEN_BOOTSTRAP_MAX = 200        # resamples for the FAD/KAD intervals (each one a d x d eigendecomposition / kernel
                               # sums per model and space); CLAP and failure shares use evaluation.bootstrap_samples


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def config_problems(cfg: Config, ns=None) -> list[str]:
    """What must hold before anything loads, besides each value's range (the schema's): rules between settings and
    the files they name."""
    ev, g = cfg.evaluation, cfg.generation
    problems = []
    if not ev.skip_generation:
        problems.append(temperature_problem(g.temperature, g.do_sample))
    if ev.clap_model_path and not Path(ev.clap_model_path).is_dir():
        problems.append(f"evaluation.clap_model_path {ev.clap_model_path} is not a folder. Download a CLAP model "
                        f"once (e.g. `hf download laion/larger_clap_music --local-dir models/clap`) "
                        f"and pass that folder, or leave clap_model_path unset to skip the CLAP score.")
    if g.prompts_file and not Path(g.prompts_file).is_file():
        problems.append(f"generation.prompts_file {g.prompts_file} does not exist.")
    paths = adapter_paths(g)
    try:
        adapter_scales(g, len(paths))
    except ConfigError as e:
        problems.append(str(e))
    if ev.compare and not paths:
        problems.append("--compare needs a LoRA adapter: pass --lora_model_path (e.g. ../output/best_model).")
    for adapter in paths:
        if (ev.compare or len(paths) > 1) and not Path(adapter).is_dir():
            problems.append(f"{'--compare: ' if ev.compare else ''}the LoRA adapter folder {adapter} does not "
                            f"exist. Train one with train_lora.py, or pass the right --lora_model_path.")
        elif Path(adapter).is_dir():
            try:
                check_adapter_files(adapter)  # complete and whole, before the model loads
            except UserError as e:
                problems.append(f"lora_model_path: {e}")
    if len(paths) > 1 and all(Path(p).is_dir() for p in paths):
        problems += [p for p in check_mix_bases(paths) if p not in problems]
    try:
        check_output_dir(ev.output_dir, "--output_dir")
    except UserError as e:
        problems.append(str(e))
    return [p for p in problems if p]


def evaluation_plan(cfg: Config) -> dict:
    """Which models are evaluated: {"models": ["base", "lora"] | ["lora"] | ["base"], "adapter": the (first)
    adapter folder or None, "adapters": every adapter folder (several: a mix), "scales": their scales}."""
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
    """The fixed prompt set: --prompts, else --prompts_file, else the distinct non-empty valid captions (in
    metadata order); the first num_prompts of it. Returns (prompts, where they came from)."""
    g = cfg.generation
    if g.prompts:
        prompts, source = [p.strip() for p in g.prompts if p.strip()], "--prompts"
    elif g.prompts_file:
        prompts, source = read_prompt_texts(g.prompts_file), str(g.prompts_file)
    else:
        prompts = list(dict.fromkeys(r.text.strip() for r in valid if r.text.strip()))
        source = "valid captions"
        if not prompts:
            raise UserError(f"The valid clips in {cfg.data.data_dir} have no captions to use as prompts; pass "
                            f"--prompts_file FILE (one prompt per line) or --skip_generation.")
    return prompts[:cfg.evaluation.num_prompts], source


# --------------------------------------------------------------------------------------------
# Held-out likelihood
# --------------------------------------------------------------------------------------------
def _model_context(model, which: str):
    """base: the adapter disabled (peft), same weights in memory; lora: as loaded."""
    if which == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def heldout_likelihood(model, clips, info, max_frames: int, batch_size: int, device, processor=None) -> dict:
    """Teacher-forced per-clip, per-codebook CE on cached tokens (the first max_frames of every clip).

    With ``processor`` the captions are encoded by the model's own (possibly adapted) text encoder instead of
    using the cached base states."""
    import torch
    from tqdm.auto import tqdm

    fam = family_for(info)
    K = info.num_codebooks
    ds = CachedTokenDataset(clips, max_frames, train=False, info=info)  # (melody models: each clip's own melody)
    lengths = ds.lengths()
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    ce_sum = np.zeros((len(ds), K))
    n_tok = np.zeros((len(ds), K), dtype=np.int64)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for b in tqdm(batches, desc="held-out likelihood", unit="batch", leave=False):
            batch = collate_tokens([ds[i] for i in b], info.pad_token_id)
            if processor is not None:
                hidden, mask = fam.encode_text(model, processor, batch["texts"], device=device)
            else:
                hidden, mask = batch["hidden"].to(device), batch["mask"].to(device)
            melody = {"chroma": batch["chroma"].to(device)} if "chroma" in batch else {}
            logits, labels = fam.teacher_forced_logits(model, info, batch["codes"].to(device),
                                                       batch["lengths"].to(device), hidden, mask, **melody)
            s, n = fam.codebook_loss(logits, labels).per_clip()
            ce_sum[b] = s.cpu().numpy()
            n_tok[b] = n.cpu().numpy()
    per_cb = ce_sum.sum(0) / np.maximum(n_tok.sum(0), 1)
    clip_tokens = n_tok.sum(1)
    clip_ce = ce_sum.sum(1) / np.maximum(clip_tokens, 1)
    ce = float(per_cb.mean())
    return {
        "ce": ce, "ppl": float(math.exp(min(ce, 50.0))),
        "ce_per_codebook": per_cb.tolist(), "ppl_per_codebook": [float(math.exp(min(v, 50.0))) for v in per_cb],
        "n_clips": len(ds), "n_tokens": int(n_tok.sum()), "n_tokens_per_codebook": n_tok.sum(0).tolist(),
        "per_clip": [{"id": c.id, "ce": float(v), "tokens": int(t)} for c, v, t in zip(clips, clip_ce, clip_tokens)],
    }


# --------------------------------------------------------------------------------------------
# Generation metrics
# --------------------------------------------------------------------------------------------
def codec_roundtrip(model, wav: np.ndarray, info) -> np.ndarray:
    """The clip after the base model's codec: encode, decode (what a perfect token model could reproduce)."""
    import torch

    fam = family_for(info)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
    codes = fam.encode_audio(model, x, info)
    y = fam.decode_audio(model, codes, info)[0].float().cpu().numpy()
    return y[..., :wav.shape[-1]]


def _embed_all(model, wavs, info) -> list[dict]:
    """Per clip: loudness-normalised EnCodec frames (the base model's codec latents) and librosa frame features."""
    from tqdm.auto import tqdm

    fam = family_for(info)
    out = []
    for w in tqdm(wavs, desc="embedding", unit="clip", leave=False):
        x = metrics.loudness_normalize(w, info.sample_rate, LOUDNESS_TARGET_LUFS)
        out.append({"encodec": fam.codec_latents(model, x),
                    "librosa": metrics.librosa_frame_features(x, info.sample_rate)})
    return out


def _distances(gen: list[dict], ref: list[dict], transform: dict) -> dict:
    """FAD and KAD in both embedding spaces between generated and reference frame sets."""
    res = {}
    for space in ("encodec", "librosa"):
        x = transform[space](np.concatenate([g[space] for g in gen]))
        y = transform[space](np.concatenate([r[space] for r in ref]))
        kad = metrics.kernel_audio_distance(metrics.subsample_rows(x, KAD_MAX_FRAMES),
                                            metrics.subsample_rows(y, KAD_MAX_FRAMES), kernel=KAD_KERNEL)
        res[space] = {"fad": metrics.frechet_audio_distance(x, y), "kad": kad, "n_clips": len(gen),
                      "n_reference_clips": len(ref), "n_frames": int(len(x)), "n_reference_frames": int(len(y))}
    # One vector per clip (mean and std of the standardised librosa frames): KAD is unbiased at small n, FAD is
    # not (and its covariance would be singular), so only KAD here.
    cs = np.stack([metrics.clip_statistics(transform["librosa"](g["librosa"])) for g in gen])
    cr = np.stack([metrics.clip_statistics(transform["librosa"](r["librosa"])) for r in ref])
    res["librosa"]["kad_clip_statistics"] = (metrics.kernel_audio_distance(cs, cr, kernel=KAD_KERNEL)
                                             if len(cs) >= 2 and len(cr) >= 2 else None)
    return res


def generate_clips(model, processor, info, which: str, prompts, seeds, cfg: Config, melodies=None) -> list:
    """Audio (C, N) per (prompt, seed) pair in prompt-major order; None where generation produced NaN/inf.
    ``melodies`` (melody models): one chroma per prompt."""
    g, ev = cfg.generation, cfg.evaluation
    pairs = [(p, s, None if melodies is None else melodies[i]) for i, p in enumerate(prompts) for s in seeds]
    out: list = []
    for i in range(0, len(pairs), g.batch_size):
        chunk = pairs[i:i + g.batch_size]
        try:
            with _model_context(model, which):
                out += generate_audio(model, processor, info, [p for p, _, _ in chunk], [s for _, s, _ in chunk],
                                      duration=ev.eval_duration, guidance_scale=g.guidance_scale,
                                      temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                      do_sample=g.do_sample, batch_size=g.batch_size, max_window=g.max_window,
                                      extend_stride=g.extend_stride, decoding=g.decoding,
                                      melodies=[m for _, _, m in chunk])
        except GenerationError as e:
            log.warning("%s model: generation failed for %d clip(s): %s", which, len(chunk), e)
            out += [None] * len(chunk)
    return out


def usable_clips(checks: list[dict], exclude_failed: bool = True) -> list[int]:
    """Indices of the clips that enter FAD/KAD/diversity/CLAP: those that passed every signal check, or (when
    exclude_failed is False) every finite one. Clips with NaN/Inf are never usable."""
    return [j for j, c in enumerate(checks)
            if c.get("finite", True) and "non_finite" not in c["failures"]
            and (not exclude_failed or not c["failures"])]


def generation_metrics(model, processor, info, cfg: Config, models: list[str], valid_recs, prompts: list[str],
                       out_dir: Path, device) -> dict:
    """Generate the prompt set with each model, check and save every clip, and compare the clips of the shared set
    (the (prompt, seed) pairs usable for every model) with the held-out reference audio (FAD/KAD next to their
    floors, diversity, CLAP when asked), each difference with a paired bootstrap interval."""
    ev, g = cfg.evaluation, cfg.generation
    seeds = [g.seed + j for j in range(ev.eval_seeds)]
    res: dict = {"prompts": prompts, "seeds": seeds, "clips": [], "signal": {}, "distances": {}, "diversity": {},
                 "thresholds": metrics.thresholds_dict()}
    # after the held-out likelihood (fp32): generation.dtype (auto = bf16 on GPUs and AMX/AVX512-BF16 CPUs)
    gen_dtype = generation_dtype(g.dtype, device)
    cast_for_generation(model, gen_dtype)  # decoder (with its LoRA layers) only; EnCodec and T5 stay fp32
    res["decoder_dtype"] = str(gen_dtype).replace("torch.", "")
    audio: dict[str, list] = {}
    melody = melody_prompts(info, valid_recs, prompts)
    t0 = time.perf_counter()
    for m in models:
        log.info("Generating %d clip(s) of %.1f s with the %s model", len(prompts) * len(seeds), ev.eval_duration, m)
        audio[m] = generate_clips(model, processor, info, m, prompts, seeds, cfg,
                                  melodies=None if melody is None else melody["chroma"])
    res["generation_seconds"] = time.perf_counter() - t0
    checks = {m: _check_and_save_clips(res, m, audio[m], prompts, seeds, info.sample_rate, out_dir) for m in models}
    res["exclude_failed_clips"] = ev.exclude_failed_clips

    log.info("Embedding %d reference clip(s) and the generated clips", len(valid_recs))
    loaded = [(r, load_audio(r.path, info.sample_rate, info.audio_channels)) for r in valid_recs]
    valid_recs = [r for r, w in loaded if w.shape[-1] > 0]  # (empty files were already refused by the cache)
    ref_wavs = [w for _, w in loaded if w.shape[-1] > 0]
    ref = _embed_all(model, ref_wavs, info)
    lib_std = metrics.standardizer(np.concatenate([r["librosa"] for r in ref]))
    transform = {"encodec": lambda x: x, "librosa": lib_std}
    res["reference"] = {"n_clips": len(ref), "seconds": float(sum(w.shape[-1] for w in ref_wavs) / info.sample_rate)}
    res["floors"] = _floors(model, info, ref, ref_wavs, transform)
    scored = score_generated(lambda m, idx: _embed_all(model, [audio[m][j] for j in idx], info), checks, ref,
                             transform, len(seeds), ev.exclude_failed_clips, ev.bootstrap_samples, g.seed)
    shared = scored["distance_set"]["pair_indices"]
    scored["distance_set"]["pairs"] = [[j // len(seeds), seeds[j % len(seeds)]] for j in shared]
    _mark_distance_set(res, shared, checks, ev.exclude_failed_clips)
    res["notes"] = scored.pop("notes")
    res.update(scored)
    if melody is not None:
        res["melody"] = melody_similarity(melody, audio, models, shared, len(seeds), info.sample_rate,
                                          ev.bootstrap_samples, g.seed)
        if "interval" in res["melody"] and res.get("intervals"):
            res["intervals"]["metrics"]["chroma"] = res["melody"].pop("interval")
    if ev.clap_model_path:
        res["clap"] = clap_metrics(ev.clap_model_path, models, audio, shared, prompts, seeds, valid_recs, ref_wavs,
                                   info.sample_rate, device, n_boot=ev.bootstrap_samples, seed=g.seed)
        if "interval" in res["clap"] and res.get("intervals"):
            res["intervals"]["metrics"]["clap"] = res["clap"].pop("interval")
    else:
        res["clap"] = {"skipped": "CLAP score skipped: no --clap_model_path given. For a text-audio score, download "
                                  "a CLAP model once (e.g. laion/larger_clap_music) into a folder and pass "
                                  "--clap_model_path FOLDER."}
    return res


def melody_prompts(info, valid_recs, prompts: list[str]) -> Optional[dict]:
    """Melody models: the tune each prompt follows in the evaluation, taken from the held-out clips themselves (the
    clip whose caption the prompt is, else the held-out clips in turn): {"sources": paths, "chroma": one-hot
    chromas}. None for text-only models."""
    if not family_for(info).MELODY:
        return None
    by_caption = {}
    for r in valid_recs:
        by_caption.setdefault(r.text.strip(), r)
    sources, chromas = [], []
    for i, p in enumerate(prompts):
        rec = by_caption.get(p.strip(), valid_recs[i % len(valid_recs)])
        try:
            chroma, _ = melody_from_audio(load_audio(rec.path, info.sample_rate, 1), info)
        except GenerationError as e:  # (a silent held-out clip has no tune to follow)
            raise UserError(f"held-out clip {rec.path} is the melody of prompt {p!r}, but: {e} Remove the clip "
                            f"from the metadata, or pass --prompts / --prompts_file with other captions.") from None
        sources.append(str(rec.path))
        chromas.append(chroma)
    return {"sources": sources, "chroma": chromas}


def melody_similarity(melody: dict, audio: dict, models: list[str], shared: list[int], n_seeds: int, sr: int,
                      n_boot: int, seed: int) -> dict:
    """audiocraft's chroma cosine similarity of each generated clip of the shared set to the melody it was given,
    per model, beside its floor: the similarity of the same clips to another prompt's melody (a shuffled pairing:
    what following no tune in particular scores). With both models, the paired bootstrap interval of LoRA minus
    base over the (prompt, seed) pairs."""
    n_prompts = len(melody["chroma"])
    out: dict = {"sources": melody["sources"],
                 "what": "per-frame cosine of the one-hot chroma of each clip and its melody source, averaged "
                         "(audiocraft ChromaCosineSimilarityMetric); floor: the same clips against another "
                         "prompt's melody"}
    per: dict = {}
    for m in models:
        own, other = [], []
        for j in shared:
            pi = j // n_seeds
            got = melody_chroma.chroma(audio[m][j], sr)
            own.append(melody_chroma.cosine_similarity(got, melody["chroma"][pi]))
            other.append(melody_chroma.cosine_similarity(got, melody["chroma"][(pi + 1) % n_prompts])
                         if n_prompts > 1 else None)
        per[m] = own
        floor = [x for x in other if x is not None]
        out[m] = {"mean": float(np.mean(own)) if own else None,
                  "shuffled_mean": float(np.mean(floor)) if floor else None, "per_clip": own}
    if {"base", "lora"} <= set(models) and len(shared) >= 2:
        r = metrics.paired_bootstrap_ci(per["base"], per["lora"], n_boot=n_boot, seed=seed)
        out["interval"] = _paired_interval(r, "LoRA minus base chroma similarity to the given melody; positive = "
                                              "LoRA follows the melody more closely")
    return out


def _check_and_save_clips(res: dict, m: str, wavs: list, prompts, seeds, sr: int, out_dir: Path) -> list[dict]:
    """Signal checks of one model's clips; each finite clip is written (WAV + spectrogram) and listed in
    res["clips"]; returns the checks, one per (prompt, seed) pair in prompt-major order."""
    checks = []
    for j, wav in enumerate(wavs):
        pi, sd = divmod(j, len(seeds))
        seed = seeds[sd]
        stem = f"p{pi:03d}_s{seed}"
        clip = {"model": m, "prompt_index": pi, "prompt": prompts[pi], "seed": seed, "pair_index": j}
        if wav is None:
            c = {"finite": False, "failures": ["non_finite"], "note": "generation produced NaN/inf logits"}
        else:
            c = metrics.signal_checks(wav, sr)
            wav_rel = f"audio/{m}/{stem}.wav"
            png_rel = f"spectrograms/{m}/{stem}.png"
            save_wav(out_dir / wav_rel, np.nan_to_num(wav), sr)
            save_spectrogram(wav, sr, out_dir / png_rel, f"{m} | seed {seed} | {prompts[pi]}")
            clip.update(wav=wav_rel, spectrogram=png_rel)
        clip["checks"] = c
        checks.append(c)
        res["clips"].append(clip)
    res["signal"][m] = metrics.summarize_checks(checks)
    return checks


def _mark_distance_set(res: dict, shared: list[int], checks: dict, exclude_failed: bool) -> None:
    """Which clips entered the distances (the shared set, for every model), and how many each model had usable."""
    keep = set(shared)
    for clip in res["clips"]:
        if clip["pair_index"] in keep:
            clip["used_in_distances"] = True
    for m, c in checks.items():
        res["signal"][m]["n_used_in_distances"] = len(shared)
        res["signal"][m]["n_usable_alone"] = len(usable_clips(c, exclude_failed))


def _floors(model, info, ref: list[dict], ref_wavs: list, transform: dict) -> dict:
    """The scale of the distances: two halves of the reference (noise floor) and the reference against its own
    codec round-trip (codec floor)."""
    floors: dict = {}
    if len(ref) >= 2:
        floors["noise"] = _distances(ref[0::2], ref[1::2], transform)
        floors["noise"]["note"] = ("reference clips split in two halves (even / odd): the distance between two samples "
                                   "of one distribution at this size")
    else:
        floors["noise"] = None
    rt = _embed_all(model, [codec_roundtrip(model, w, info) for w in ref_wavs], info)
    floors["codec"] = _distances(rt, ref, transform)
    floors["codec"]["note"] = "reference vs its own EnCodec round-trip: the best a MusicGen model can reach"
    return floors


def distance_set(checks: dict[str, list[dict]], exclude_failed: bool = True) -> list[int]:
    """The (prompt, seed) pairs whose clips enter FAD/KAD/diversity/CLAP: those usable (usable_clips) for EVERY
    model, so the models are scored on the same set and a model that breaks more clips is not judged on its good
    ones alone."""
    sets = [set(usable_clips(c, exclude_failed)) for c in checks.values()]
    return sorted(set.intersection(*sets)) if sets else []


def score_generated(embed, checks: dict[str, list[dict]], ref: list[dict], transform: dict, n_seeds: int,
                    exclude_failed: bool, n_boot: int, seed: int) -> dict:
    """FAD/KAD and diversity of every model on the shared set, and (two models) the paired bootstrap intervals of
    the differences. ``embed(model, pair_indices)`` returns the clips' embeddings (_embed_all). Returns
    {"distance_set", "distances", "diversity", "intervals", "notes"}."""
    models = list(checks)
    shared = distance_set(checks, exclude_failed)
    n_pairs = len(next(iter(checks.values()))) if checks else 0
    usable = "passing every signal check" if exclude_failed else "finite"
    out: dict = {"distance_set": {
        "rule": (f"the (prompt, seed) pairs whose clips are {usable} for every evaluated model "
                 f"({', '.join(models)}); each model's failures are in the signal section"),
        "n_pairs": len(shared), "n_pairs_generated": n_pairs, "pair_indices": shared,
        "n_usable_alone": {m: len(usable_clips(checks[m], exclude_failed)) for m in models}},
        "distances": {}, "diversity": {}, "intervals": None, "notes": []}
    if len(shared) < 2:
        out["distances"] = {m: None for m in models}
        out["diversity"] = {m: None for m in models}
        out["notes"].append(
            f"FAD/KAD/diversity not computed: only {len(shared)} of {n_pairs} (prompt, seed) pairs have clips "
            f"{usable} for {'both models' if len(models) > 1 else 'the model'}; see the signal checks."
            + (" --exclude_failed_clips false keeps clips that fail a check." if exclude_failed else ""))
        log.warning(out["notes"][-1])
        return out
    emb = {m: embed(m, shared) for m in models}
    for m in models:
        out["distances"][m] = _distances(emb[m], ref, transform)
        clip_emb = np.stack([e["encodec"].mean(axis=0) for e in emb[m]])
        out["diversity"][m] = metrics.diversity(clip_emb, [j // n_seeds for j in shared],
                                                [j % n_seeds for j in shared])
        out["diversity"][m]["space"] = "mean EnCodec latent per clip, cosine distance"
    if "base" in models and "lora" in models:
        t0 = time.perf_counter()
        out["intervals"] = distance_intervals(emb, out["distances"], ref, transform, n_boot, seed)
        out["intervals"]["metrics"]["failed_share"] = failure_interval(checks, n_boot, seed)
        out["intervals"]["seconds"] = time.perf_counter() - t0
        if len(shared) < 10:
            out["notes"].append(f"The intervals of the generated-audio differences rest on only {len(shared)} (prompt, "
                                f"seed) pairs: rough (a bootstrap over few pairs is too narrow); raise --num_prompts "
                                f"or --eval_seeds.")
    return out


def distance_intervals(emb: dict, dist: dict, ref: list[dict], transform: dict, n_boot: int, seed: int) -> dict:
    """Paired bootstrap of LoRA - base FAD/KAD: the shared (prompt, seed) pairs resampled with replacement, both
    models' distances to the (fixed) reference recomputed on the same resample."""
    n = len(emb["base"])
    b = min(n_boot, GEN_BOOTSTRAP_MAX)
    counts = metrics.bootstrap_counts(n, b, seed)
    res: dict = {"resampled": "the shared (prompt, seed) pairs, with replacement; both models on the same "
                              "resample (paired); the reference set fixed",
                 "n_pairs": n, "n_boot_fad_kad": b,
                 "n_boot_note": f"FAD/KAD intervals use at most {GEN_BOOTSTRAP_MAX} resamples (cost); CLAP and the "
                                f"failure share use evaluation.bootstrap_samples", "metrics": {}}
    for space in ("encodec", "librosa"):
        y = transform[space](np.concatenate([r[space] for r in ref]))
        clips = {m: [transform[space](e[space]) for e in emb[m]] for m in ("base", "lora")}
        fad = {m: metrics.frechet_bootstrap(clips[m], y, counts) for m in clips}
        kad = {m: metrics.kernel_bootstrap(clips[m], y, counts, kernel=KAD_KERNEL, max_rows=KAD_MAX_FRAMES)
               for m in clips}
        res["metrics"][f"{space}.fad"] = _interval(fad, dist, (space, "fad"), n, f"FAD ({space})")
        res["metrics"][f"{space}.kad"] = _interval(kad, dist, (space, "kad", "value"), n, f"KAD x100 ({space})")
    if dist["base"]["librosa"]["kad_clip_statistics"] is not None:
        y = np.stack([metrics.clip_statistics(transform["librosa"](r["librosa"])) for r in ref])
        kad = {m: metrics.kernel_bootstrap([metrics.clip_statistics(transform["librosa"](e["librosa"]))[None]
                                            for e in emb[m]], y, counts, kernel=KAD_KERNEL) for m in emb}
        res["metrics"]["librosa.kad_clip_statistics"] = _interval(
            kad, dist, ("librosa", "kad_clip_statistics", "value"), n, "KAD x100 (librosa clip statistics)")
    return res


def _interval(boot: dict, dist: dict, keys: tuple, n: int, label: str) -> dict:
    point = {}
    for m in ("base", "lora"):
        v = dist[m]
        for k in keys:
            v = v[k]
        point[m] = v
    out = metrics.percentile_interval(boot["lora"] - boot["base"], point["lora"] - point["base"])
    out.update(n_pairs=n, what=f"LoRA minus base {label}; negative = LoRA closer to the reference")
    return out


def failure_interval(checks: dict, n_boot: int, seed: int) -> dict:
    """Paired bootstrap over every generated (prompt, seed) pair of LoRA - base share of clips failing a check."""
    failed = {m: [1.0 if c["failures"] else 0.0 for c in checks[m]] for m in ("base", "lora")}
    r = metrics.paired_bootstrap_ci(failed["base"], failed["lora"], n_boot=n_boot, seed=seed)
    return _paired_interval(r, "LoRA minus base share of generated clips failing a signal check (every pair); "
                               "negative = LoRA fails less")


def _paired_interval(r: dict, what: str) -> dict:
    """A paired_bootstrap_ci result in the form of the other intervals of the generation section."""
    return {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "confidence": r["confidence"],
            "n_boot": r["n_boot"], "p_two_sided": r["p_two_sided"],
            "excludes_zero": bool(r["ci_high"] < 0 or r["ci_low"] > 0), "n_pairs": r["n"], "what": what}


def clap_metrics(path, models, audio, shared, prompts, seeds, valid_recs, ref_wavs, sr, device, *,
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """CLAP text-audio scores of every model on the shared (prompt, seed) pairs (the set of the distances), the
    valid clips against their captions, and (two models) the paired bootstrap interval of LoRA - base."""
    from transformers import ClapModel, ClapProcessor

    try:
        model = ClapModel.from_pretrained(path, local_files_only=True).to(device).eval()
        processor = ClapProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load a CLAP model from {path} ({str(e).splitlines()[0][:300]}). It must be a "
                        f"transformers CLAP folder (config.json, weights, tokenizer and preprocessor files).") from None
    res: dict = {"model": str(path), "window_seconds": 10.0, "sample_rate": 48000}
    for m in models:
        if not shared:
            res[m] = None
            continue
        res[m] = metrics.clap_scores(model, processor, [prompts[j // len(seeds)] for j in shared],
                                     [audio[m][j] for j in shared], sr, device=device)
        res[m]["n_pairs"] = len(shared)
    if "base" in models and "lora" in models and len(shared) >= 2:
        r = metrics.paired_bootstrap_ci(res["base"]["scores"], res["lora"]["scores"], n_boot=n_boot, seed=seed)
        res["interval"] = _paired_interval(r, "LoRA minus base CLAP text-audio score on the shared pairs; positive "
                                              "= LoRA follows the prompts better")
    pairs = [(r.text, w) for r, w in zip(valid_recs, ref_wavs) if r.text.strip()]
    if pairs:
        res["reference"] = metrics.clap_scores(model, processor, [t for t, _ in pairs], [w for _, w in pairs], sr,
                                       device=device)
        res["reference"]["note"] = "the valid clips scored against their own captions"
    return res


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "lora_toolkit": lora.__version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "numpy", "scipy", "librosa", "pyloudnorm", "soxr",
                "soundfile"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def jsonable(x):
    """Plain JSON: numpy scalars to Python, non-finite floats to None (JSON has no NaN/Infinity)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_config(argv, description="Evaluate a MusicGen LoRA adapter: held-out likelihood, generation "
                                            "metrics (FAD/KAD, signal checks, diversity, CLAP), HTML report.",
                          sections=("evaluation", "model", "generation", "data"), rules=config_problems)
    plan = evaluation_plan(cfg)
    log.info("Evaluating %s on %s/%s -> %s", " and ".join(plan["models"]), cfg.data.data_dir, cfg.data.metadata_file,
             cfg.evaluation.output_dir)
    default = (not plan["adapters"] or os.path.normpath(plan["adapters"][0]) == os.path.normpath(
        config_module.REPO_ROOT / GenerationConfig.__dataclass_fields__["lora_model_path"].default)) \
        and not any(a == "--lora_model_path" or a.startswith("--lora_model_path=") for a in argv)
    missing = f"nothing at lora_model_path {adapter_paths(cfg.generation)[0]}" if adapter_paths(cfg.generation) else ""
    log.info(describe_choice(cfg.model.model_path, plan["adapters"], plan["scales"], bool(default and plan["adapters"]),
                             missing))
    log.info("  evaluation: %s", json.dumps(dataclasses.asdict(cfg.evaluation)))
    g = cfg.generation
    log.info("  sampling: guidance %g, temperature %g, top_k %d, top_p %g, first seed %d, batch %d",
             g.guidance_scale, g.temperature, g.top_k, g.top_p, g.seed, g.batch_size)
    return evaluate(cfg, plan)


def evaluate(cfg: Config, plan: dict) -> int:
    """Load, build the token cache, load the adapter; then held-out likelihood, generation metrics, results."""
    import torch

    ev, g = cfg.evaluation, cfg.generation
    out_dir = Path(ev.output_dir)
    models, adapter = plan["models"], plan["adapter"]
    torch.manual_seed(g.seed)
    t_start = time.perf_counter()

    records = load_metadata(cfg.data.data_dir, cfg.data.metadata_file)
    valid = [r for r in records if r.split == "valid"]
    if not valid:
        raise UserError(f"No held-out clips (split 'valid') in {cfg.data.data_dir}/{cfg.data.metadata_file}: the "
                        f"evaluation needs clips the adapter never trained on. Re-run prepare_data.py with "
                        f"--valid_fraction 0.1 (or higher).")

    device = pick_device()
    if device.type == "cpu" and keep_freed_memory():
        log.info("CPU memory: freed tensors stay in the process for reuse (glibc malloc; fewer page faults)")
    model, processor, info = load_base_model(cfg.model, device=device)
    # Cache (built once, shared with training) before the adapter goes on: codes and text states are the base's.
    clips, cache_stats = build_token_cache(valid, model, processor, info, cfg.data.data_dir,
                                           batch_size=cfg.training.encode_batch_size, device=device)
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
            identity["lora"] = {"adapters": ids, "base": identity["base"]["name_or_path"], "scale": plan["scales"]}
    model.eval()

    source_of = {r.id: r.source for r in valid}
    recordings = [("source", source_of[c.id]) if source_of.get(c.id) else ("clip", c.id) for c in clips]
    lk, few_note = likelihood_section(model, processor, info, clips, cfg, models, device, cache_stats, recordings,
                                      adapter)
    results: dict = {
        "models_evaluated": models, "identity": identity, "likelihood": lk, "versions": versions(),
        "settings": {"evaluation": dataclasses.asdict(ev), "data_dir": cfg.data.data_dir,
                     "metadata_file": cfg.data.metadata_file, "device": str(device),
                     "sampling": {"guidance_scale": g.guidance_scale, "temperature": g.temperature, "top_k": g.top_k,
                                  "top_p": g.top_p, "do_sample": g.do_sample, "first_seed": g.seed,
                                  "batch_size": g.batch_size, "max_window": g.max_window,
                                  "extend_stride": g.extend_stride, "duration": ev.eval_duration},
                     "loudness_target_lufs": LOUDNESS_TARGET_LUFS, "kad_kernel": KAD_KERNEL,
                     "kad_scale": 100, "kad_max_frames": KAD_MAX_FRAMES, "config_file": cfg.config_file},
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
        n_clips = len(prompts) * ev.eval_seeds * len(models)
        check_free_space(out_dir, n_clips * (ev.eval_duration * info.sample_rate * info.audio_channels * 2 + 2e5)
                         + 5 * 2 ** 20, f"{n_clips} generated clip(s) with spectrograms, and the report")
        with on_interrupt(lambda: f"results.json and report.html are written at the end, so none were; the audio "
                                  f"generated so far is in {out_dir / 'audio'}. Run again, with --skip_generation "
                                  f"for the held-out likelihood alone (fast)"):
            gen = generation_metrics(model, processor, info, cfg, models, valid, prompts, out_dir, device)
        results["generation"] = gen
        results["notes"] += gen.pop("notes", [])
        if gen["clap"].get("skipped"):
            results["notes"].append(gen["clap"]["skipped"])
    results["seconds"] = time.perf_counter() - t_start
    write_results(cfg, results, out_dir, adapter)
    return 0


def likelihood_section(model, processor, info, clips, cfg: Config, models: list[str], device, cache_stats: dict,
                       recordings: list, adapter=None) -> tuple[dict, str]:
    """Held-out likelihood of each model and (both evaluated) the paired cluster bootstrap of their difference over
    ``recordings`` (one key per clip: the recording it was cut from); returns (the results.json section, a note
    when the evidence is thin or None)."""
    fam = family_for(info)
    seconds, window_source = heldout_window(cfg, adapter)
    max_frames = min(int(round(seconds * info.frame_rate)), fam.max_positions(model) - info.codebooks_per_channel + 1)
    lk: dict = {"window_seconds": max_frames / info.frame_rate, "split": "valid", "cache": cache_stats,
                "n_clips": len(clips), "n_recordings": len(set(recordings)),
                "window": {"max_duration": seconds, "source": window_source, "frames": max_frames,
                           "cut_to_the_model_context": max_frames < int(round(seconds * info.frame_rate))}}
    log.info("Held-out window %.2f s (training.max_duration from %s)", lk["window_seconds"], window_source)
    text_lora = text_encoder_has_lora(model)
    if text_lora:
        log.info("The adapter has LoRA layers in the text encoder: captions are encoded on the fly")
    lk["text_states"] = "encoded on the fly (adapter trains the text encoder)" if text_lora else "cached"
    for m in models:
        with _model_context(model, m):
            lk[m] = heldout_likelihood(model, clips, info, max_frames, cfg.training.batch_size, device,
                                       processor=processor if text_lora else None)
        log.info("%s model: held-out cross-entropy %.4f (perplexity %.2f) over %d clips, %d tokens", m, lk[m]["ce"],
                 lk[m]["ppl"], lk[m]["n_clips"], lk[m]["n_tokens"])
    if "base" not in models or "lora" not in models:
        return lk, None
    diff = metrics.paired_bootstrap_ci(
        [c["ce"] for c in lk["base"]["per_clip"]], [c["ce"] for c in lk["lora"]["per_clip"]],
        weights=[c["tokens"] for c in lk["base"]["per_clip"]], clusters=recordings,
        n_boot=cfg.evaluation.bootstrap_samples, seed=cfg.generation.seed)
    diff["n_clips"], diff["n_recordings"] = diff["n"], diff.pop("n_clusters")
    diff["what"] = ("LoRA minus base held-out cross-entropy (token-weighted over clips); negative = LoRA better. "
                    "Cluster bootstrap: whole recordings resampled (a clip without a source is its own recording)")
    diff["ppl_ratio"] = float(math.exp(diff["diff"]))
    diff["excludes_zero"] = bool(diff["ci_high"] < 0 or diff["ci_low"] > 0)
    lk["difference"] = diff
    return lk, thin_evidence_note(diff["n_clips"], diff["n_recordings"])


def thin_evidence_note(n_clips: int, n_recordings: int) -> Optional[str]:
    """The note for a held-out set too small to trust: counted in recordings, the units the interval resamples."""
    counts = (f"{n_recordings} held-out recording{'s' if n_recordings != 1 else ''} "
              f"({n_clips} held-out clip{'s' if n_clips != 1 else ''})")
    if n_clips < MIN_CLIPS_FOR_A_VERDICT:
        return (f"Only {counts}: too little evidence to call either model better (no row names a winner); hold "
                f"out more clips (prepare_data.py --valid_fraction).")
    if n_recordings < MIN_CLIPS_FOR_A_VERDICT:
        return (f"Only {counts}: clips of one recording are not independent, so the held-out likelihood names no "
                f"winner; hold out clips from more recordings (prepare_data.py --valid_fraction).")
    if n_recordings < 10:
        return (f"Only {counts}: the confidence interval of the likelihood difference is rough (a bootstrap over "
                f"few recordings is too narrow); hold out more recordings (prepare_data.py --valid_fraction).")
    return None


def heldout_window(cfg: Config, adapter=None) -> tuple[float, str]:
    """(seconds, where they come from) of the held-out window: training.max_duration of the adapter's own
    config.yaml (written by training into the adapter folder), so the evaluated window is the trained one; else
    config.yaml's training.max_duration (evaluate.py takes no training flags)."""
    if adapter:
        path = Path(adapter) / "config.yaml"
        value = None
        if path.is_file():
            try:
                training = load_yaml(path).get("training")
                value = training.get("max_duration") if isinstance(training, dict) else None
            except ConfigError as e:
                log.warning("The adapter's %s cannot be read (%s)", path, e)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if ok:
                return float(value), f"the adapter's training config ({path}: training.max_duration)"
            log.warning("%s has no usable training.max_duration (%r); the held-out window comes from config.yaml",
                        path, value)
        else:
            log.info("%s has no config.yaml; the held-out window comes from config.yaml", adapter)
    where = cfg.config_file or "no config file: the built-in default"
    return float(cfg.training.max_duration), f"config.yaml ({where}: training.max_duration)"


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
