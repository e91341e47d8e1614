"""The one configuration schema of the toolkit.

Every setting is a field of one of the section dataclasses below; its default is written here and
nowhere else (``config.yaml`` repeats the defaults with a comment each, and a test keeps the two
in step). Precedence, lowest first:

    dataclass defaults  <  config.yaml (or --config PATH)  <  command-line flags

Command-line flags are generated from the fields: ``--<field name>`` (plus the aliases in a
field's metadata, e.g. ``--base_model_path`` for ``model_path``). Each script says which sections
it takes flags from; the whole YAML file is always validated, so a typo anywhere is reported.

Paths: a relative path on the command line is relative to the current directory; in a YAML file it
is relative to that file's folder; a default is relative to the repository root. So both
``python lora/train_lora.py --data_dir data`` and ``cd lora && python train_lora.py --data_dir
../data`` work.

Imports: lora.common.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lora.common import fields as fields_mod

# the bounds belong to the schema (scripts import them from here)
from lora.common.bounds import (  # noqa: F401
    MAX_EVENTS,
    MAX_FILES,
    MAX_PROMPTS,
    MAX_SEED,
    MAX_TEXT_CHARS,
    MAX_TEXT_TOKENS,
    seed_problem,
    text_problem,
)
from lora.common.fields import (
    ConfigError,
    _f,
    value_problem,
)
from lora.common.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"

# Names of built-in model presets that are not paths (lora.modeling.tiny_model builds them).
BUILTIN_MODELS = ("tiny", "tiny-stereo", "tiny-melody", "tiny-stereo-melody")

SEED_RANGE = dict(ge=0, le=MAX_SEED, hint="a whole number from 0 to 2^32-1 (4294967295)")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    model_path: str = _f(
        "facebook/musicgen-small",
        "Base MusicGen: a hub id (facebook/musicgen-small|medium|large, *-stereo-*), a local folder, "
        "or 'tiny' / 'tiny-stereo' (MusicGen) / 'tiny-melody' / 'tiny-stereo-melody' "
        "(MusicGen-Melody) for the built-in random test models",
        aliases=("base_model_path",), kind="model")
    tiny_model_dir: str = _f("output/tiny_model",
                             "Where the built-in tiny models are built once and cached",
                             kind="path")
    revision: Optional[str] = _f(None,
                                 "Hub revision (branch, tag or commit) of a hub model; ignored for "
                                 "local folders")
    local_files_only: bool = _f(False, "Never contact the hub (also set by HF_HUB_OFFLINE=1)")
    attn_implementation: str = _f("sdpa", "Attention kernel of the decoder", choices=("sdpa", "eager"))
    separation_model: str = _f("htdemucs", "demucs model that removes vocals (prepare_data --separate): a demucs "
                               "name (htdemucs, htdemucs_ft: the hub's adefossez/HTDemucs...) or a folder in demucs' "
                               "hub layout (<name>.yaml + .safetensors); bash install.sh --separation",
                               kind="name_or_path")
    melody_chroma: str = _f("auto", "Melody models: the chroma from the vocals + other stems (demucs, as "
                            "audiocraft) or the mix; auto = stems when demucs and separation_model are there",
                            choices=("auto", "stems", "mix"))

@dataclass
class LoraSection:
    lora_rank: int = _f(12, "LoRA rank r: capacity of the adapter; 8-32 is typical",
                        aliases=("lora_r",), ge=1, le=1024,
                         hint="8-32 is typical")
    lora_alpha: float = _f(24.0, "LoRA alpha: scale of the update is alpha/r; usually 2x rank", gt=0.0,
                            hint="usually 2x lora_rank")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input during training", ge=0.0, lt=1.0)
    lora_targets: str = _f(
        "attention",
        "Which layers get LoRA: 'attention' (decoder self+cross q/k/v/out), 'attention_ffn' (+ fc1/fc2), "
        "or a comma-separated list of module-name suffixes or a regex")
    train_text_encoder: bool = _f(False,
                                  "Also put LoRA on the T5 text encoder (disables text-state caching)")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA, peft); slower, sometimes better")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r) (peft); helps at high ranks")


@dataclass
class DataConfig:
    data_dir: str = _f("data", "Dataset folder: clips in train/ and valid/, plus the metadata file",
                       kind="path", aliases=("output_dir",))
    metadata_file: str = _f("metadata.json", "Metadata file name inside data_dir (or an absolute path)")
    input_dir: Optional[str] = _f(None, "prepare_data: folder of your audio, scanned recursively",
                                  kind="path")
    create_example: bool = _f(False, "prepare_data: write the small synthetic example dataset instead")
    validate: bool = _f(False, "prepare_data: check an existing data_dir and metadata, change nothing")
    example_clips: int = _f(160, "prepare_data --create_example: number of synthetic clips (160 x 6 s: "
                            "seconds to write, enough for the seed's 5-epoch run to show learning on "
                            "the tiny model)", ge=8, le=100_000,
                            hint="the example set has 4 styles, each needs a train and a valid clip")
    example_seconds: float = _f(6.0, "prepare_data --create_example: length of each synthetic clip, s",
                                gt=0.0, le=600.0)
    sample_rate: int = _f(32000, "Sample rate of the prepared clips, Hz; must equal the model's (32000)",
                          ge=1, le=384_000, hint="MusicGen uses 32000")
    channels: int = _f(1, "1 = mix down to mono (mono models); 2 = keep stereo (stereo models)",
                       choices=(1, 2))
    segment_seconds: float = _f(30.0, "Long recordings are cut into clips of this length, s (MusicGen's "
                                "context is 30)", gt=0.0, le=3600.0)
    min_seconds: float = _f(5.0, "Clips (and file tails) shorter than this are not used, s", ge=0.0, le=3600.0)
    trim_silence: bool = _f(True, "Trim leading/trailing silence before cutting")
    silence_db: float = _f(-50.0, "Level below which audio counts as silence, dBFS", lt=0.0, hint="e.g. -50")
    valid_fraction: float = _f(0.1, "Share of source recordings held out for validation (split by "
                               "recording)", ge=0.0, lt=1.0, hint="0.1 = 10% of recordings")
    split_seed: int = _f(1234, "Seed of the deterministic train/valid split", **SEED_RANGE)
    captions_file: Optional[str] = _f(None, "CSV / JSON / JSONL mapping file name to caption",
                                      kind="path")
    default_text: Optional[str] = _f(None,
                                     "Caption for files that have no sidecar or captions-file entry")
    caption_template: str = _f("{stem}", "Fallback caption pattern; {stem} = file name without extension, "
                                         "{folder} = parent folder name; '' = leave uncaptioned")
    enrich_captions: bool = _f(False, "Append estimated tempo (BPM) and key to every caption (librosa)")
    num_workers: int = _f(0, "Worker processes for preparation; 0 = one per CPU core",
                          ge=0, le=256, hint="0 = one per CPU core")
    overwrite: bool = _f(False, "prepare_data: redo clips that already exist")
    verify_cache: bool = _f(False, "train_lora / evaluate / test_dataset: read and hash every clip file again "
                            "and check every token-cache shard, instead of trusting the cache index (size "
                            "and times); a clip whose bytes changed is encoded again")
    separate: str = _f("none", "prepare_data: remove vocals with demucs before cutting (bash install.sh --separation): "
                       "none; vocals = keep every stem but vocals, summed; auto = only for recordings whose vocal "
                       "stem reaches vocal_threshold_db", choices=("none", "vocals", "auto"))
    vocal_threshold_db: float = _f(-15.0, "separate auto: a recording has vocals when its vocal stem, in the loudest "
                                   "tenth of its 1-s windows, reaches this level relative to the mix, dB (a reasoned "
                                   "default, not measured here: DATA_PREPARATION.md)", ge=-100.0, le=0.0)
    separation_device: str = _f("auto", "Where demucs runs: auto = the GPU when there is one",
                                choices=("auto", "cpu", "cuda"))
    auto_caption: bool = _f(False, "prepare_data: write captions from CLAP zero-shot tags (genre, mood, "
                                   "instruments, ...) for recordings you gave no caption")
    auto_caption_model: str = _f("laion/larger_clap_music", "CLAP model of auto_caption: a hub id or a local "
                                 "folder (transformers ClapModel)", kind="model")
    caption_vocabulary: Optional[str] = _f(None, "YAML of the tag vocabularies auto_caption chooses from; null = "
                                           "lora/dataprep/caption_vocabulary.yaml (copy and edit it)", kind="path")
    auto_caption_template: str = _f("{genre}, {mood}, {instruments}, {bpm} BPM, {key}",
                                    "Caption of auto_caption: the vocabularies' names, {bpm}, {key} (librosa) and "
                                    "{stem}; a part whose value is missing is left out")
    auto_caption_per_clip: bool = _f(False, "Tag each clip on its own (default: one set of tags per recording, "
                                            "from its clips' averaged CLAP embeddings)")
    auto_caption_replace: bool = _f(False, "Also replace the captions you gave (sidecar, captions_file, "
                                           "default_text) by auto captions")
    trigger_word: Optional[str] = _f(None, "A word put in every caption to call up the style in prompts "
                                           "(dreambooth's instance prompt), recorded in metadata.json and the "
                                           "adapter; null = keep the data folder's")
    trigger_position: str = _f("start", "Where trigger_word goes: start or end of each caption, replace (the "
                                        "caption is the word alone); off = no trigger word",
                               choices=("start", "end", "replace", "off"))


@dataclass
class TrainingConfig:
    output_dir: str = _f("output", "Where checkpoints/, best_model/, final_model/ and logs/ are written",
                         kind="path")
    num_epochs: float = _f(5.0, "Passes over the training clips", aliases=("num_train_epochs",), ge=0.0,
                         le=100_000.0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 = use num_epochs",
                        ge=1, le=10_000_000, also=(-1,),
                        hint="-1 = use num_epochs; a LoRA run is usually 500-20,000 steps")
    batch_size: int = _f(2, "Clips per step per device; 2-4 on a 24 GB GPU for musicgen-small",
                         aliases=("per_device_train_batch_size",), ge=1, le=4096)
    gradient_accumulation_steps: int = _f(4, "Steps accumulated per update: effective batch = "
                                          "batch_size x this x GPUs", ge=1, le=100_000)
    learning_rate: float = _f(3e-4, "Peak learning rate of AdamW; 1e-4..5e-4 for LoRA",
                              gt=0.0, hint="1e-4..5e-4 is usual for LoRA")
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = _f(100, "Linear warm-up, optimizer steps (capped at a tenth of the run when the "
                           "run is short)", ge=0, le=10_000_000)
    lr_scheduler_type: str = _f("cosine", "Schedule after warm-up",
                                choices=("cosine", "linear", "constant"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 = off", ge=0.0, hint="0 = no clipping")
    max_duration: float = _f(30.0,
                             "Training window, s: longer cached clips get a random crop of this "
                             "length per epoch", gt=0.0, le=3600.0, hint="MusicGen's context is 30 s")
    cond_dropout: float = _f(0.3,
                             "Probability of replacing a caption by the null condition, so "
                             "classifier-free "
                                  "guidance has a trained unconditional branch (audiocraft's MusicGen: "
                                  "classifier_free_guidance.training_dropout 0.3)",
                                      ge=0.0, lt=1.0, hint="audiocraft uses 0.3")
    melody_dropout: float = _f(0.5,
                               "Melody models only: probability of replacing a clip's melody (its "
                               "chroma) by the "
                                    "null melody while its caption stays, so the model also learns "
                                    "from text alone (audiocraft's attribute dropout on the "
                                    "melody); cond_dropout drops both together",
                               ge=0.0, lt=1.0, hint="audiocraft uses 0.5")
    mixed_precision: str = _f("auto",
                              "auto = bf16 where the hardware runs it fast, fp16 on older GPUs, "
                              "else fp32", choices=("auto", "fp16", "bf16", "no"))
    fp16: bool = _f(False,
                    "Same as mixed_precision=fp16 (the seed's flag); on CPU falls back with a warning")
    bf16: bool = _f(False, "Same as mixed_precision=bf16")
    base_weights_dtype: str = _f("auto",
                                 "Storage dtype of the frozen decoder matmul weights: auto = "
                                 "bfloat16 when "
                                         "training in bf16 (half the memory, no per-step cast), "
                                         "else float32; LoRA weights and optimizer state stay float32",
                                 choices=("auto", "float32", "bfloat16"))
    decoder_dropout: Optional[float] = _f(0.0,
                                          "Hidden-state dropout inside the frozen MusicGen decoder "
                                          "while LoRA "
                                               "trains; null = keep the checkpoint's value (0.1 in "
                                               "the converted transformers configs). 0.0 because "
                                               "audiocraft trained MusicGen without it "
                                               "(transformer_lm.dropout: 0.), and it costs CPU "
                                               "time; LoRA's own dropout is lora_dropout", ge=0.0, lt=1.0,
                                          hint="0.0 is what audiocraft trained MusicGen with, null "
                                               "keeps the checkpoint's value")
    gradient_checkpointing: bool = _f(False,
                                      "Recompute activations in backward: less memory, slower "
                                      "(musicgen-small "
                                             "on an H100: 4.8 -> 1.7 GB, 2.4x slower, BENCHMARKS.md)")
    save_steps: str = _f("auto",
                         "Save a resumable checkpoint every N optimizer steps; auto = about 10 per run "
                                 "(run's steps / 10, rounded to a multiple of 5 above 7); always "
                                 "at the end")
    save_minutes: float = _f(30.0,
                             "Also save a checkpoint when this many minutes of wall time have "
                             "passed since the "
                                   "last one (a lost session loses at most this much); 0 = off",
                             ge=0.0, hint="0 = off")
    save_total_limit: int = _f(3, "Keep only the newest N checkpoints (best_model is kept apart)", ge=1,
                               le=1000)
    eval_steps: str = _f("auto",
                         "Validate on the held-out split every N optimizer steps (and before the "
                         "first, and "
                                 "at the end); auto = about 10 per run, as for save_steps")
    logging_steps: int = _f(10, "Log training loss every N optimizer steps", ge=1, le=10_000_000)
    sample_every: str = _f("auto", "Generate the sample prompts at step 0 (base) and every N optimizer "
                            "steps into output_dir/samples; 0 = off; auto = at every validation on "
                            "a GPU (on a CPU only for models under 50M decoder parameters)")
    sample_prompts: list = _f([], "Prompts of the samples; [] = up to 3 held-out captions")
    sample_seconds: float = _f(5.0, "Length of each training sample, s", gt=0.0, le=30.0)
    early_stopping_patience: int = _f(0, "Stop after N validations without improvement; 0 = off",
                                      ge=0, le=1_000_000, hint="0 = off")
    max_nan_steps: int = _f(10,
                            "Stop after this many non-finite losses in a row (each one is skipped "
                            "and counted)", ge=1, le=1_000_000)
    resume_from_checkpoint: Optional[str] = _f(
        None, "'latest' or a checkpoint folder to continue from: the same base model, LoRA settings, "
              "learning rate and schedule as the run (a difference is refused, named); more steps "
              "continue")
    resume_with_changed_data: bool = _f(
        False, "Let a resume continue on other clips (or another max_duration) than the run's; "
               "the run's history marks the step where they changed")
    overwrite_output_dir: bool = _f(False,
                                    "Start a fresh run even if output_dir holds an earlier run: its "
                                           "checkpoints/, best_model/ and final_model/ are deleted "
                                           "first, but only what train_lora.py wrote (anything "
                                           "else there stops the run)")
    seed: int = _f(42, "Random seed: data order, LoRA init, dropout", **SEED_RANGE)
    dataloader_num_workers: int = _f(0,
                                     "DataLoader workers (training reads cached tokens; 0 is "
                                     "usually enough)", ge=0, le=256)
    encode_batch_size: int = _f(8,
                                "Clips per batch when computing the EnCodec / text-encoder cache", ge=1,
                                le=4096)
    torch_compile: bool = _f(False,
                             "torch.compile the decoder (inductor) with static shapes: each batch "
                             "is padded to "
                                    "batch_size clips and a multiple of 5 s of frames, its text "
                                    "states to 32/64/128/256/512 tokens (no loss on the padding), "
                                    "so a run compiles at most ceil(max_duration / 5 s) x 5 shape "
                                    "variants for training and as many for validation (logged at "
                                    "start; 6 x 5 at 30 s). Off by default: slower on CPU; measure "
                                    "first (BENCHMARKS.md)")
    compile_mode: str = _f("default",
                           "With torch_compile: torch.compile's mode; reduce-overhead = also capture "
                                      "CUDA graphs of the decoder step (CUDA only; on CPU the "
                                      "default mode is used)",
                           choices=("default", "reduce-overhead"))


@dataclass
class GenerationConfig:
    lora_model_path: Optional[str] = _f(
        "output/best_model",
        "LoRA adapter folder to apply, or several to mix (a list; one lora_scale each); '' or none "
        "= base model alone. Default: output/best_model when it exists, else the base model alone",
        kind="path", many=True)
    prompts: list = _f([], "Text prompts, e.g. --prompts \"lofi piano\" \"808 trap beat\"")
    prompts_file: Optional[str] = _f(None,
                                     "txt (one prompt per line) or JSON/JSONL with per-prompt settings",
                                     kind="path")
    output_dir: str = _f("output/generated", "Where wavs and manifest.json are written", kind="path")
    num_samples: int = _f(1, "Samples per prompt (seeds seed, seed+1, ...)", ge=1, le=1000)
    batch_size: int = _f(4, "Prompts generated together", ge=1, le=1024)
    duration: float = _f(10.0, "Length of each piece, s; over 30 s uses windowed continuation",
                         gt=0.0, le=3600.0, hint="it is in seconds")
    guidance_scale: float = _f(3.0, "Classifier-free guidance strength; 1 = off, 3 = MusicGen default",
                               ge=1.0, hint="1 = no guidance, 3 = MusicGen's default")
    temperature: float = _f(1.0, "Sampling temperature; lower = safer, higher = more varied")
    do_sample: bool = _f(True,
                         "false = greedy decoding (always the most likely token): deterministic but "
                              "repetitive; for tests and debugging")
    top_k: int = _f(250, "Top-k sampling (audiocraft default 250); 0 = off",
                    ge=0, hint="0 = off; 250 is MusicGen's default")
    top_p: float = _f(0.0,
                      "Nucleus sampling threshold; 0 = off; when set it replaces top_k (as in "
                      "audiocraft)", ge=0.0, le=1.0, hint="0 = off")
    seed: int = _f(0, "Seed of the first sample; every sample's seed is recorded in the manifest",
                   **SEED_RANGE)
    lora_scale: float = _f(1.0,
                           "Adapter strength: 0 = base model, 1 = full adapter, in between blends; with "
                                "several adapters one number each (a list), e.g. --lora_scale 0.7 0.4",
                           ge=0.0, hint="0 = base model, 1 = full adapter", many=True)
    merge: Optional[bool] = _f(None,
                               "Fold LoRA into the weights (faster); default: merge when every "
                               "lora_scale is 1")
    extend_stride: float = _f(18.0,
                              "For long pieces: seconds generated per new window (the rest is context)",
                              gt=0.0, le=3600.0, hint="audiocraft uses 18 of 30")
    max_window: float = _f(30.0,
                           "Longest stretch generated in one pass, s (MusicGen was trained on 30 s); "
                                 "longer pieces continue window by window", gt=0.0, le=3600.0,
                           hint="MusicGen: 30")
    audio_prompt: Optional[str] = _f(None, "Audio file whose music is continued", kind="path")
    melody_audio: Optional[str] = _f(None,
                                     "Melody models only (musicgen-melody, tiny-melody): an audio "
                                     "file whose tune "
                                           "(its chroma) every prompt follows; a prompts file can "
                                           "give a prompt its own 'melody'. Without one: the null "
                                           "melody (text only)", kind="path")
    unconditional: bool = _f(False, "Allow generation without a text prompt")
    output_format: str = _f("pcm16", "WAV sample format", choices=("pcm16", "float"))
    normalize: bool = _f(True, "Peak-normalise each file (no clipping)")
    overwrite: bool = _f(False,
                         "Replace output files an earlier run of inference_lora.py wrote (a file it "
                         "did not write is never replaced)")
    dtype: str = _f("auto",
                    "Weights dtype for generation: auto = bf16 on GPUs and on CPUs with AMX/AVX512-BF16, "
                             "fp16 on older GPUs, else fp32",
                    choices=("auto", "float32", "bfloat16", "float16"))
    decoding: str = _f("auto",
                       "Decoder step: auto = static key/value cache, replayed as a CUDA graph on a "
                       "GPU; transformers = the model's own cache; same music either way (tested), "
                       "only speed differs",
                       choices=("auto", "transformers", "static", "cuda_graph"))


@dataclass
class EvaluationConfig:
    output_dir: str = _f("output/evaluation",
                         "Where results.json, report.html and audio are written", kind="path")
    compare: bool = _f(False, "Evaluate the base model and the LoRA model side by side")
    num_prompts: int = _f(8,
                          "Prompts used for generation metrics (from the valid captions or "
                          "prompts_file)", ge=1, le=MAX_PROMPTS)
    eval_duration: float = _f(8.0, "Length of each generated clip for the generation metrics, s", gt=0.0,
                              le=600.0)
    eval_seeds: int = _f(2, "Seeds per prompt (for diversity across seeds)", ge=1, le=1000)
    bootstrap_samples: int = _f(2000, "Bootstrap resamples for confidence intervals",
                                ge=100, le=1_000_000, hint="2000 is a good default")
    permutations: int = _f(1000,
                           "Sign patterns per permutation test behind the summary's verdicts, when "
                           "the units (prompts, recordings) are too many to try all 2^(n-1); more "
                           "= finer p-values, slower", ge=100, le=1_000_000, hint="1000 is a good default")
    clap_model_path: Optional[str] = _f(None,
                                        "Local CLAP model folder (e.g. laion/larger_clap_music) "
                                        "for text-audio "
                                              "scores; skipped when unset", kind="path")
    skip_generation: bool = _f(False, "Only compute held-out likelihood (fast)")
    copy_min_seconds: float = _f(1.0, "Copy check: shortest copied passage counted in the copy share, s "
                                 "(also for the training samples)", gt=0.0)
    exclude_failed_clips: bool = _f(True,
                                    "Leave generated clips that fail a signal check (silent, "
                                    "clipping, DC "
                                          "offset, mostly silent) out of FAD/KAD/diversity/CLAP; "
                                          "NaN/Inf clips are always left out")


@dataclass
class ExportConfig:
    lora_model_path: Optional[str] = _f(
        "output/best_model",
        "Adapter folder to merge into the base (best_model, final_model or a training checkpoint "
        "checkpoints/step-N), or several to merge as a mix (a list; one lora_scale each)",
        kind="path", many=True)
    lora_scale: float = _f(1.0,
                           "Strength merged in: 1 = the adapter as trained; with several adapters "
                           "one number "
                                "each, e.g. --lora_scale 0.7 0.4", ge=0.0,
                           hint="1 = the adapter as trained", many=True)
    output_dir: str = _f("output/merged_model",
                         "The standalone merged model folder written (plain transformers "
                                                "MusicGen: loads with from_pretrained, no peft)",
                         kind="path")
    dtype: str = _f("float32",
                    "Dtype of the exported decoder (with its LoRA merged in): float32 = exact merge; "
                    "float16 / bfloat16 = about half the size. EnCodec and the text encoder stay "
                    "float32 (see cast_encoders)", choices=("float32", "float16", "bfloat16"))
    cast_encoders: bool = _f(False,
                             "Also store EnCodec and the text encoder in dtype: a smaller file, but "
                             "an export used as a base then encodes audio and captions otherwise "
                             "(12-31% of the tiny model's codes change in bfloat16)")
    overwrite: bool = _f(False,
                         "Replace an earlier export in output_dir (otherwise the export stops before "
                         "writing; a folder holding anything else is never replaced)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSection,
    "data": DataConfig,
    "training": TrainingConfig,
    "generation": GenerationConfig,
    "evaluation": EvaluationConfig,
    "export": ExportConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    config_file: Optional[str] = None  # the YAML file that was read, if any

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def save(self, path: str | os.PathLike, note: str = "") -> Path:
        """Write the resolved config as YAML (atomically) and return the path; ``note``: a header
        line more."""
        import yaml

        text = "# Resolved configuration (defaults < config.yaml < flags) that produced these files\n"
        text += f"# config file read: {self.config_file or 'none (defaults and flags only)'}\n"
        text += f"# {note}\n" if note else ""
        text += yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        return atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# Types and values
# --------------------------------------------------------------------------------------------
def field_problem(section: str, name: str, value, label: Optional[str] = None) -> Optional[str]:
    """``value_problem`` for ``section.name`` of the schema (also for values given elsewhere, e.g. a
    per-prompt setting in a prompts file, with their own ``label``)."""
    f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    return value_problem(f.metadata, value, label or f"{section}.{name}")


def range_problems(cfg: "Config", sections=None) -> list[str]:
    """Every value of the listed sections (default: all) outside its declared range, each naming its
    key."""
    problems = []
    for section in sections or SECTIONS:
        obj = getattr(cfg, section) if isinstance(cfg, Config) else cfg
        for f in dataclasses.fields(SECTIONS[section]):
            value = getattr(obj, f.name)
            many = f.metadata.get("many") and isinstance(value, list)
            for i, v in enumerate(value if many else [value]):
                problem = value_problem(f.metadata, v, f"{section}.{f.name}" + (f"[{i}]" if many else ""))
                if problem:
                    problems.append(problem)
    return problems


def _resolve_path(value: Optional[str], kind: Optional[str], base: Path) -> Optional[str]:
    return fields_mod.resolve_path(value, kind, base, BUILTIN_MODELS)


def parse_config(argv=None, *, description: str = "", sections: tuple[str, ...] = tuple(SECTIONS),
                 extra=None, rules=None) -> tuple[Config, argparse.Namespace]:
    """Resolve defaults < YAML < flags, then check every value against its declared range and the
    script's own ``rules(cfg, ns) -> list of problems`` (those that span several settings); one
    ConfigError lists every problem found. Returns (config, namespace of extra, non-schema
    arguments)."""
    parser, owners = build_parser(description, sections, extra)
    cfg = Config()
    ns = fields_mod.parse_into(cfg, SECTIONS, argv, parser, owners, DEFAULT_CONFIG, REPO_ROOT,
                               _resolve_path)
    finalize(cfg)
    problems = range_problems(cfg)
    if rules is not None:
        problems += rules(cfg, ns)
    validate(problems)
    return cfg, ns


def finalize(cfg: Config) -> None:
    """Cross-field rules that hold for every script."""
    t = cfg.training
    if t.fp16 and t.bf16:
        raise ConfigError("--fp16 and --bf16 were both given; choose one (or mixed_precision: auto).")
    flag = "fp16" if t.fp16 else "bf16" if t.bf16 else None
    if flag and t.mixed_precision not in ("auto", flag):
        raise ConfigError(f"--{flag} asks for {flag}, but training.mixed_precision is "
                          f"{t.mixed_precision!r}: they contradict each other. Give one of them (set "
                          f"mixed_precision: auto in the config to let --{flag} decide).")
    if t.fp16:
        t.mixed_precision = "fp16"
    elif t.bf16:
        t.mixed_precision = "bf16"
    for g in (cfg.generation, cfg.export):
        if isinstance(g.lora_model_path, list):
            if any(_is_none(p) for p in g.lora_model_path):
                raise ConfigError(f"lora_model_path {g.lora_model_path}: 'none' cannot be one of "
                                  f"several adapters; give the adapter folders only, or none alone "
                                  f"for the base model.")
        elif _is_none(g.lora_model_path):
            g.lora_model_path = None


def _is_none(path) -> bool:
    return path is None or (isinstance(path, str) and path.strip().lower() in ("", "none", "null"))


def adapter_paths(g) -> list[str]:
    """The adapter folders of ``lora_model_path`` (of the generation or export section): [] (base
    model alone), [one], or several to mix."""
    if g.lora_model_path is None:
        return []
    return list(g.lora_model_path) if isinstance(g.lora_model_path, list) else [g.lora_model_path]


def adapter_scales(g, n: int) -> list[float]:
    """One scale per adapter: ``lora_scale`` as a list of ``n``, or one number for one adapter (or
    1, the default, for every adapter of a mix). ConfigError naming both keys when the counts
    differ."""
    scales = g.lora_scale if isinstance(g.lora_scale, list) else [g.lora_scale]
    if len(scales) == max(n, 1):
        return [float(s) for s in scales]
    if len(scales) == 1 and float(scales[0]) == 1.0:
        return [1.0] * n
    raise ConfigError(f"lora_scale has {len(scales)} value(s) "
                      f"({' '.join(f'{float(s):g}' for s in scales)}) but lora_model_path names "
                      f"{n} adapter(s): give one scale per adapter, in the same order (e.g. "
                      f"--lora_scale {' '.join(['1'] * max(n, 1))}), or leave lora_scale out for 1 each.")


def validate(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem found (scripts collect them all first)."""
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError("Please fix these settings:\n" + "\n".join(f"  - {p}" for p in problems))


def apply_yaml(cfg: Config, data: dict, source: str, base: Path) -> None:
    """Validate a YAML mapping against the schema and write its values into cfg."""
    fields_mod.apply_yaml(cfg, SECTIONS, data, source, lambda v, kind: _resolve_path(v, kind, base))


def build_parser(description: str, sections: tuple[str, ...],
                 extra=None) -> tuple[argparse.ArgumentParser, dict]:
    """An argparse parser whose flags come from the listed sections' fields
    (lora.common.fields.build_parser)."""
    return fields_mod.build_parser(description, {name: SECTIONS[name] for name in sections}, extra,
                                   f"YAML config file (default: {DEFAULT_CONFIG.name} at the "
                                   f"repository root, if present)")


def markdown_reference() -> str:
    """Every config key and flag as Markdown tables (USAGE.md embeds this; a test keeps it in step)."""
    return fields_mod.markdown_reference(SECTIONS)


def update_usage(path: Path = REPO_ROOT / "USAGE.md") -> None:
    """Rewrite the reference section of USAGE.md from the schema."""
    fields_mod.replace_section(path, "reference", markdown_reference())


if __name__ == "__main__":  # python -m lora.config --markdown | --update-usage
    if "--markdown" in sys.argv:
        print(markdown_reference())
    elif "--update-usage" in sys.argv:
        update_usage()
    else:
        print(__doc__)
