"""The generated-audio half of the evaluation: both models generate the same prompts and seeds;
signal checks, FAD/KAD against the held-out audio with their noise and codec floors, diversity,
melody adherence, CLAP, and the paired bootstrap intervals of the differences.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lora.common.cli import UserError, log
from lora.config import Config
from lora.dataprep.audio import load_audio, save_wav
from lora.dataprep.melody_stems import chroma_source, melody_separator
from lora.generation.engine import generate, melody_from_audio
from lora.generation.model import cast_for_generation
from lora.generation.requests import GenerationError, Request, SamplingSettings
from lora.modeling import chroma as melody_chroma
from lora.modeling.clap import load_clap
from lora.modeling.loading import family_for
from lora.modeling.precision import generation_dtype
from lora.scoring import copy_check, differences, intervals, metrics, verdicts
from lora.scoring.likelihood import _model_context
from lora.scoring.plots import save_spectrogram
from lora.scoring.verdicts import DEFAULT_PATTERNS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

LOUDNESS_TARGET_LUFS = -23.0   # every clip is normalised to this before embedding (EBU R128)
# frames per set for KAD (kernel matrices are O(n²)); subsampled with seed 0
KAD_MAX_FRAMES = 2000
KAD_KERNEL = "rbf"             # Gaussian kernel, median-distance bandwidth (KAD paper / kadtk)
# resamples for the FAD/KAD intervals (each one a d x d eigendecomposition / kernel
GEN_BOOTSTRAP_MAX = 200


# --------------------------------------------------------------------------------------------
# Generation metrics
# --------------------------------------------------------------------------------------------
def codec_roundtrip(model: nn.Module, wav: np.ndarray, info: ModelInfo) -> np.ndarray:
    """The clip after the base model's codec: encode, decode (what a perfect token model could
    reproduce)."""
    import torch

    fam = family_for(info)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
    codes = fam.encode_audio(model, x, info)
    y = fam.decode_audio(model, codes, info)[0].float().cpu().numpy()
    return y[..., :wav.shape[-1]]


def _embed_all(model: nn.Module, wavs, info: ModelInfo) -> list[dict]:
    """Per clip: loudness-normalised EnCodec frames (the base model's codec latents) and librosa
    frame features."""
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
                                            metrics.subsample_rows(y, KAD_MAX_FRAMES),
                                            kernel=KAD_KERNEL)
        res[space] = {"fad": metrics.frechet_audio_distance(x, y), "kad": kad, "n_clips": len(gen),
                      "n_reference_clips": len(ref), "n_frames": int(len(x)),
                      "n_reference_frames": int(len(y))}
    # One vector per clip (mean and std of the standardised librosa frames): KAD is unbiased at
    # small n, FAD is not (and its covariance would be singular), so only KAD here.
    cs = np.stack([metrics.clip_statistics(transform["librosa"](g["librosa"])) for g in gen])
    cr = np.stack([metrics.clip_statistics(transform["librosa"](r["librosa"])) for r in ref])
    res["librosa"]["kad_clip_statistics"] = (metrics.kernel_audio_distance(cs, cr, kernel=KAD_KERNEL)
                                             if len(cs) >= 2 and len(cr) >= 2 else None)
    return res


def generate_clips(model: nn.Module, processor, info: ModelInfo, which: str, prompts, seeds,
                   cfg: Config, melodies=None) -> tuple[list, list]:
    """(audio (C, N), codes (K, T)) per (prompt, seed) pair in prompt-major order; None where
    generation produced NaN/inf. ``melodies`` (melody models): ``melody_prompts``' {"chroma",
    "samples"}, one tune per prompt."""
    g, ev = cfg.generation, cfg.evaluation
    sampling = SamplingSettings(guidance_scale=float(g.guidance_scale), temperature=float(g.temperature),
                                top_k=int(g.top_k), top_p=float(g.top_p), do_sample=bool(g.do_sample))
    reqs = [Request(prompt=p, seed=int(s), duration=float(ev.eval_duration), sampling=sampling,
                    melody=None if melodies is None else melodies["condition"][i],
                    melody_samples=0 if melodies is None else int(melodies["samples"][i]))
            for i, p in enumerate(prompts) for s in seeds]
    audio: list = []
    codes: list = []
    for i in range(0, len(reqs), g.batch_size):
        chunk = reqs[i:i + g.batch_size]
        try:
            with _model_context(model, which):
                done = generate(model, processor, info, chunk, batch_size=g.batch_size,
                                max_window=g.max_window, extend_stride=g.extend_stride,
                                decoding=g.decoding)
            audio += [r.audio for r in done]
            codes += [r.codes for r in done]
        except GenerationError as e:
            log.warning("%s model: generation failed for %d clip(s): %s", which, len(chunk), e)
            audio += [None] * len(chunk)
            codes += [None] * len(chunk)
    return audio, codes


def usable_clips(checks: list[dict], exclude_failed: bool = True) -> list[int]:
    """Indices of the clips that enter FAD/KAD/diversity/CLAP: those that passed every signal check,
    or (when exclude_failed is False) every finite one. Clips with NaN/Inf are never usable."""
    return [j for j, c in enumerate(checks)
            if c.get("finite", True) and "non_finite" not in c["failures"]
            and (not exclude_failed or not c["failures"])]


def generation_metrics(model: nn.Module, processor, info: ModelInfo, cfg: Config, models: list[str],
                       valid_recs, prompts: list[str], out_dir: Path, device: torch.device,
                       index: Optional[copy_check.CopyIndex] = None) -> dict:
    """Generate the prompt set with each model, check and save every clip, and compare the clips of
    the shared set (the (prompt, seed) pairs usable for every model) with the held-out reference
    audio (FAD/KAD next to their floors, diversity, CLAP when asked), each difference with a paired
    bootstrap interval; with ``index`` (the training clips' tokens), the copy check of every clip
    (lora.scoring.copy_check)."""
    ev, g = cfg.evaluation, cfg.generation
    seeds = [g.seed + j for j in range(ev.eval_seeds)]
    res: dict = {"prompts": prompts, "seeds": seeds, "clips": [], "signal": {}, "distances": {},
                 "diversity": {}, "thresholds": metrics.thresholds_dict()}
    # after the held-out likelihood (fp32): generation.dtype (auto = bf16 on GPUs and
    # AMX/AVX512-BF16 CPUs)
    gen_dtype = generation_dtype(g.dtype, device)
    # decoder (with its LoRA layers) only; EnCodec and T5 stay fp32
    cast_for_generation(model, gen_dtype)
    res["decoder_dtype"] = str(gen_dtype).replace("torch.", "")
    audio: dict[str, list] = {}
    codes: dict[str, list] = {}
    melody = melody_prompts(info, valid_recs, prompts, cfg.model)
    t0 = time.perf_counter()
    for m in models:
        log.info("Generating %d clip(s) of %.1f s with the %s model", len(prompts) * len(seeds),
                 ev.eval_duration, m)
        audio[m], codes[m] = generate_clips(model, processor, info, m, prompts, seeds, cfg, melodies=melody)
    res["generation_seconds"] = time.perf_counter() - t0
    checks = {m: _check_and_save_clips(res, m, audio[m], prompts, seeds, info.sample_rate, out_dir)
              for m in models}
    if index is not None:
        res["copy_check"] = copy_check.copy_section(index, codes, res["clips"], len(seeds),
                                                    ev.copy_min_seconds, ev.bootstrap_samples, g.seed)
    res["exclude_failed_clips"] = ev.exclude_failed_clips

    log.info("Embedding %d reference clip(s) and the generated clips", len(valid_recs))
    loaded = [(r, load_audio(r.path, info.sample_rate, info.audio_channels)) for r in valid_recs]
    # (empty files were already refused by the cache)
    valid_recs = [r for r, w in loaded if w.shape[-1] > 0]
    ref_wavs = [w for _, w in loaded if w.shape[-1] > 0]
    ref = _embed_all(model, ref_wavs, info)
    lib_std = metrics.standardizer(np.concatenate([r["librosa"] for r in ref]))
    transform = {"encodec": lambda x: x, "librosa": lib_std}
    res["reference"] = {"n_clips": len(ref),
                        "seconds": float(sum(w.shape[-1] for w in ref_wavs) / info.sample_rate)}
    res["floors"] = _floors(model, info, ref, ref_wavs, transform)
    # (fewer prompts than --num_prompts: there are no more to take; the verdicts' units are prompts,
    # so more seeds narrow the intervals but cannot settle a verdict)
    more = ("raise --num_prompts" if len(prompts) >= ev.num_prompts else
            f"give more prompts with --prompts_file (only {len(prompts)} were there to take; more "
            f"--num_prompts cannot help)")
    family = differences.Family(pair_units(prompts, len(seeds), melody), ev.permutations, g.seed)
    scored = score_generated(lambda m, idx: _embed_all(model, [audio[m][j] for j in idx], info),
                             checks, ref, transform, len(seeds), ev.exclude_failed_clips,
                             ev.bootstrap_samples, g.seed, family, more)
    shared = scored["distance_set"]["pair_indices"]
    scored["distance_set"]["pairs"] = [[j // len(seeds), seeds[j % len(seeds)]] for j in shared]
    _mark_distance_set(res, shared, checks, ev.exclude_failed_clips)
    res["notes"] = scored.pop("notes")
    comparison = (res.get("copy_check") or {}).get("comparison")
    if comparison:
        res["notes"].append(f"Copy check: {comparison['verdict']}: {comparison['note']}.")
    res.update(scored)
    if melody is not None:
        res["melody"] = melody_similarity(melody, audio, models, shared, len(seeds), info.sample_rate,
                                          ev.bootstrap_samples, g.seed, family)
        if "interval" in res["melody"] and res.get("intervals"):
            res["intervals"]["metrics"]["chroma"] = res["melody"].pop("interval")
    if ev.clap_model_path:
        res["clap"] = clap_metrics(ev.clap_model_path, models, audio, shared, prompts, seeds,
                                   valid_recs, ref_wavs,
                                   info.sample_rate, device, n_boot=ev.bootstrap_samples, seed=g.seed,
                                   family=family)
        if "interval" in res["clap"] and res.get("intervals"):
            res["intervals"]["metrics"]["clap"] = res["clap"].pop("interval")
    else:
        res["clap"] = {"skipped": "CLAP score skipped: no --clap_model_path given. For a "
                                  "text-audio score, download a CLAP model once (e.g. "
                                  "laion/larger_clap_music) into a folder and pass "
                                  "--clap_model_path FOLDER."}
    if res.get("intervals"):  # every row's family-adjusted p (lora.scoring.verdicts)
        res["intervals"]["test"] = family.finish(res["intervals"]["metrics"])
    return res


def pair_units(prompts: list[str], n_seeds: int, melody: Optional[dict] = None) -> list[int]:
    """The independent unit of every (prompt, seed) pair, prompt-major: its prompt, merged with
    every prompt of the same caption and (melody models) of the same tune (its seeds, and prompts
    that share a caption or a tune, give correlated clips)."""
    keys = []
    for pi, prompt in enumerate(prompts):
        k = [("prompt", prompt.strip())] + ([("melody", melody["sources"][pi])] if melody else [])
        keys += [k] * n_seeds
    return verdicts.unit_ids(keys).tolist()


def melody_prompts(info: ModelInfo, valid_recs, prompts: list[str], model_cfg=None) -> Optional[dict]:
    """Melody models: the tune each prompt follows in the evaluation, taken from the held-out clips
    themselves (the clip whose caption the prompt is, else the held-out clips in turn): {"sources":
    paths, "chroma": one-hot chromas of the clips (the similarity's reference, as audiocraft's
    chroma_cosine takes the reference audio itself), "condition": what the model follows (the
    chroma of the vocals + other stems under model.melody_chroma, as at generation), "samples":
    the tunes' lengths}. None for text-only models."""
    if not family_for(info).MELODY:
        return None
    separator = melody_separator(model_cfg) if model_cfg is not None else None
    by_caption = {}
    for r in valid_recs:
        by_caption.setdefault(r.text.strip(), r)
    sources, chromas, conditions, samples = [], [], [], []
    for i, p in enumerate(prompts):
        rec = by_caption.get(p.strip(), valid_recs[i % len(valid_recs)])
        wav = load_audio(rec.path, info.sample_rate, 1)
        try:
            chroma, _ = melody_from_audio(wav, info)
            conditions.append(chroma if separator is None else melody_from_audio(
                load_audio(rec.path, info.sample_rate, 2), info, separator)[0])
        except GenerationError as e:  # (a silent held-out clip has no tune to follow)
            raise UserError(f"held-out clip {rec.path} is the melody of prompt {p!r}, but: {e} "
                            f"Remove the clip from the metadata, or pass --prompts / "
                            f"--prompts_file with other captions.") from None
        sources.append(str(rec.path))
        chromas.append(chroma)
        samples.append(int(wav.shape[-1]))
    return {"sources": sources, "chroma": chromas, "condition": conditions, "samples": samples,
            "chroma_from": chroma_source(separator)}


def melody_similarity(melody: dict, audio: dict, models: list[str], shared: list[int], n_seeds: int,
                      sr: int, n_boot: int, seed: int,
                      family: Optional[differences.Family] = None) -> dict:
    """audiocraft's chroma cosine similarity of each generated clip of the shared set to the melody
    it was given, per model, beside its floor: the similarity of the same clips to another prompt's
    melody (a shuffled pairing: what following no tune in particular scores). With both models, the
    paired bootstrap interval of LoRA minus base over the (prompt, seed) pairs."""
    n_prompts = len(melody["chroma"])
    out: dict = {"sources": melody["sources"],
                 "what": "per-frame cosine of the one-hot chroma of each clip and its melody "
                         "source, averaged (audiocraft ChromaCosineSimilarityMetric); floor: the "
                         "same clips against another prompt's melody"}
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
    if {"base", "lora"} <= set(models) and len(shared) >= 2 and family is not None:
        out["interval"] = differences.paired_row(
            family, "chroma", per["base"], per["lora"], shared, n_boot, seed,
            "LoRA minus base chroma similarity to the given melody; positive = LoRA follows the "
            "melody more closely")
    return out


def _check_and_save_clips(res: dict, m: str, wavs: list, prompts, seeds, sr: int,
                          out_dir: Path) -> list[dict]:
    """Signal checks of one model's clips; each finite clip is written (WAV + spectrogram) and
    listed in res["clips"]; returns the checks, one per (prompt, seed) pair in prompt-major
    order."""
    checks = []
    for j, wav in enumerate(wavs):
        pi, sd = divmod(j, len(seeds))
        seed = seeds[sd]
        stem = f"p{pi:03d}_s{seed}"
        clip = {"model": m, "prompt_index": pi, "prompt": prompts[pi], "seed": seed, "pair_index": j}
        if wav is None:
            c = {"finite": False, "failures": ["non_finite"],
                 "note": "generation produced NaN/inf logits"}
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
    """Which clips entered the distances (the shared set, for every model), and how many each model
    had usable."""
    keep = set(shared)
    for clip in res["clips"]:
        if clip["pair_index"] in keep:
            clip["used_in_distances"] = True
    for m, c in checks.items():
        res["signal"][m]["n_used_in_distances"] = len(shared)
        res["signal"][m]["n_usable_alone"] = len(usable_clips(c, exclude_failed))


def _floors(model: nn.Module, info: ModelInfo, ref: list[dict], ref_wavs: list,
            transform: dict) -> dict:
    """The scale of the distances: two halves of the reference (noise floor) and the reference
    against its own codec round-trip (codec floor)."""
    floors: dict = {}
    if len(ref) >= 2:
        floors["noise"] = _distances(ref[0::2], ref[1::2], transform)
        floors["noise"]["note"] = ("reference clips split in two halves (even / odd): the distance "
                                   "between two samples of one distribution at this size")
    else:
        floors["noise"] = None
    rt = _embed_all(model, [codec_roundtrip(model, w, info) for w in ref_wavs], info)
    floors["codec"] = _distances(rt, ref, transform)
    floors["codec"]["note"] = "reference vs its own EnCodec round-trip: the best a MusicGen model can reach"
    return floors


def distance_set(checks: dict[str, list[dict]], exclude_failed: bool = True) -> list[int]:
    """The (prompt, seed) pairs whose clips enter FAD/KAD/diversity/CLAP: those usable
    (usable_clips) for EVERY model, so the models are scored on the same set and a model that breaks
    more clips is not judged on its good ones alone."""
    sets = [set(usable_clips(c, exclude_failed)) for c in checks.values()]
    return sorted(set.intersection(*sets)) if sets else []


def score_generated(embed, checks: dict[str, list[dict]], ref: list[dict], transform: dict,
                    n_seeds: int, exclude_failed: bool, n_boot: int, seed: int,
                    family: Optional[differences.Family] = None,
                    more: str = "raise --num_prompts") -> dict:
    """FAD/KAD and diversity of every model on the shared set, and (two models) the differences:
    intervals resampling whole prompts and their statistics in ``family`` (the generated-audio
    rows tested together; default: each prompt its own unit, evaluation.permutations' default).
    ``embed(model, pair_indices)`` returns the clips' embeddings (_embed_all); ``more``: how to get
    more prompts, for the note on too few. Returns
    {"distance_set", "distances", "diversity", "intervals", "notes"}."""
    models = list(checks)
    shared = distance_set(checks, exclude_failed)
    n_pairs = len(next(iter(checks.values()))) if checks else 0
    if family is None:
        family = differences.Family([j // n_seeds for j in range(n_pairs)], DEFAULT_PATTERNS, seed)
    usable = "passing every signal check" if exclude_failed else "finite"
    out: dict = {"distance_set": {
        "rule": (f"the (prompt, seed) pairs whose clips are {usable} for every evaluated model "
                 f"({', '.join(models)}); each model's failures are in the signal section"),
        "n_pairs": len(shared), "n_pairs_generated": n_pairs, "pair_indices": shared,
        "n_usable_alone": {m: len(usable_clips(checks[m], exclude_failed)) for m in models}},
        "distances": {}, "diversity": {}, "intervals": None, "notes": []}
    both = "base" in models and "lora" in models
    if len(shared) < 2:
        out["distances"] = {m: None for m in models}
        out["diversity"] = {m: None for m in models}
        out["notes"].append(
            f"FAD/KAD/diversity not computed: only {len(shared)} of {n_pairs} (prompt, seed) pairs "
            f"have clips {usable} for {'both models' if len(models) > 1 else 'the model'}; see the "
            f"signal checks."
            + (" --exclude_failed_clips false keeps clips that fail a check." if exclude_failed
               else ""))
        log.warning(out["notes"][-1])
        if both:  # the failure shares are still compared, over every pair
            out["intervals"] = {"metrics": {"failed_share": failure_interval(checks, family, n_boot,
                                                                             seed)}}
        return out
    emb = {m: embed(m, shared) for m in models}
    for m in models:
        out["distances"][m] = _distances(emb[m], ref, transform)
        clip_emb = np.stack([e["encodec"].mean(axis=0) for e in emb[m]])
        out["diversity"][m] = metrics.diversity(clip_emb, [j // n_seeds for j in shared],
                                                [j % n_seeds for j in shared])
        out["diversity"][m]["space"] = "mean EnCodec latent per clip, cosine distance"
    if both:
        t0 = time.perf_counter()
        out["intervals"] = distance_intervals(emb, out["distances"], ref, transform, n_boot, seed,
                                              family, shared)
        out["intervals"]["metrics"]["failed_share"] = failure_interval(checks, family, n_boot, seed)
        out["intervals"]["seconds"] = time.perf_counter() - t0
        if len(shared) < 10:
            out["notes"].append(f"The intervals of the generated-audio differences rest on only "
                                f"{len(shared)} (prompt, seed) pairs: rough (a bootstrap over few "
                                f"prompts is too narrow; the verdicts come from the permutation "
                                f"test); {more}.")
    return out


def distance_intervals(emb: dict, dist: dict, ref: list[dict], transform: dict, n_boot: int,
                       seed: int, family: differences.Family, shared: list[int]) -> dict:
    """LoRA - base FAD/KAD on the shared pairs: the bootstrap intervals resampling whole prompts
    (both models on the same resample, the reference fixed) and the permutation statistics of the
    family (lora.scoring.differences)."""
    b = min(n_boot, GEN_BOOTSTRAP_MAX)

    def kad(rows: int):
        return lambda clips, y, counts: intervals.kernel_bootstrap(clips, y, counts, kernel=KAD_KERNEL,
                                                                   max_rows=rows)

    rows = differences.distance_rows(family, emb, dist, ref, transform, shared, b, seed,
                                     kad=kad(KAD_MAX_FRAMES), kad_pool=kad(2 * KAD_MAX_FRAMES),
                                     clip_statistics=metrics.clip_statistics)
    return {"resampled": "whole prompts (the shared (prompt, seed) pairs of a prompt together), with "
                         "replacement; both models on the same resample (paired); the reference set "
                         "fixed",
            "n_pairs": len(shared), "n_boot_fad_kad": b,
            "n_boot_note": f"FAD/KAD intervals use at most {GEN_BOOTSTRAP_MAX} resamples (cost); CLAP "
                           f"and the failure share use evaluation.bootstrap_samples",
            "metrics": rows}


def failure_interval(checks: dict, family: differences.Family, n_boot: int, seed: int) -> dict:
    """LoRA - base share of clips failing a check over every generated (prompt, seed) pair."""
    failed = {m: [1.0 if c["failures"] else 0.0 for c in checks[m]] for m in ("base", "lora")}
    return differences.paired_row(family, "failed_share", failed["base"], failed["lora"],
                                  list(range(len(failed["base"]))), n_boot, seed,
                                  "LoRA minus base share of generated clips failing a signal check "
                                  "(every pair); negative = LoRA fails less")


def clap_metrics(path, models, audio, shared, prompts, seeds, valid_recs, ref_wavs, sr,
                 device: torch.device, *, n_boot: int = 2000, seed: int = 0,
                 family: Optional[differences.Family] = None) -> dict:
    """CLAP text-audio scores of every model on the shared (prompt, seed) pairs (the set of the
    distances), the valid clips against their captions, and (two models) the paired bootstrap
    interval of LoRA - base."""
    model, processor = load_clap(path, device=device, local_files_only=True)
    res: dict = {"model": str(path), "window_seconds": 10.0, "sample_rate": 48000}
    for m in models:
        if not shared:
            res[m] = None
            continue
        res[m] = metrics.clap_scores(model, processor, [prompts[j // len(seeds)] for j in shared],
                                     [audio[m][j] for j in shared], sr, device=device)
        res[m]["n_pairs"] = len(shared)
    if "base" in models and "lora" in models and len(shared) >= 2 and family is not None:
        res["interval"] = differences.paired_row(
            family, "clap", res["base"]["scores"], res["lora"]["scores"], shared, n_boot, seed,
            "LoRA minus base CLAP text-audio score on the shared pairs; positive = LoRA follows the "
            "prompts better")
    pairs = [(r.text, w) for r, w in zip(valid_recs, ref_wavs) if r.text.strip()]
    if pairs:
        res["reference"] = metrics.clap_scores(model, processor, [t for t, _ in pairs],
                                               [w for _, w in pairs], sr,
                                       device=device)
        res["reference"]["note"] = "the valid clips scored against their own captions"
    return res
