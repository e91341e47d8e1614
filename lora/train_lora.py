"""Fine-tune MusicGen with LoRA on your clips (one GPU, several GPUs, or a CPU for a dry run).

    python lora/train_lora.py --model_path facebook/musicgen-small --data_dir data --output_dir output
    cd lora && python train_lora.py --model_path tiny --data_dir ../data --metadata_file metadata.json \
        --output_dir ../output --lora_rank 12 --lora_alpha 24 --batch_size 2 --num_epochs 5 --fp16
    accelerate launch lora/train_lora.py ...      # or: torchrun --nproc_per_node N lora/train_lora.py ...

Reads config.yaml (sections training, model, lora, data); every key is also a flag. The script runs top to
bottom: setup (precision, model, token cache, LoRA, data plan, optimizer, resume) / train loop / evaluate /
save. It writes, under output_dir:

    checkpoints/step-NNNNNN/   resumable state every save_steps (adapter, optimizer, scheduler, scaler, RNG,
                               data position, trainer_state.json, config.yaml); the newest save_total_limit kept
    best_model/  final_model/  PEFT adapters (adapter_config.json + adapter_model.safetensors) + config.yaml,
                               trainer_state.json, eval_results.json and a model card README.md
    logs/                      metrics.jsonl, TensorBoard events, loss_curve.png, train.log
    config.yaml                the resolved configuration of the run

Training reads tokens only: EnCodec codes and text-encoder states are computed once into data_dir/cache
(lora.dataset.build_token_cache), then both encoders leave the GPU.

Data order is a pure function of (seed, epoch): each epoch's length-bucketed micro-batches are split over
optimizer steps, micro-steps and processes the same way for any number of processes (N processes with
gradient_accumulation_steps G train like 1 process with N*G), and all per-sample randomness (crop, condition
dropout) and per-micro-batch randomness (LoRA/model dropout) is seeded by the sample / micro-batch index, so
--resume_from_checkpoint continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

from lora.config import Config, ConfigError, parse_config, validate  # noqa: E402
from lora.utils import UserError, atomic_dir, atomic_path, atomic_write_json, atomic_write_text, log, run_main, \
    setup_logging  # noqa: E402

SECTIONS = ("training", "model", "lora", "data")
STATE_FILE = "trainer_state.json"


# ============================================================================================
# Setup
# ============================================================================================
def check_config(cfg: Config) -> None:
    t, lo = cfg.training, cfg.lora
    p: list[str] = []
    if t.batch_size < 1:
        p.append(f"training.batch_size must be at least 1 (got {t.batch_size})")
    if t.gradient_accumulation_steps < 1:
        p.append(f"training.gradient_accumulation_steps must be at least 1 (got {t.gradient_accumulation_steps})")
    if t.max_steps <= 0 and t.num_epochs <= 0:
        p.append("training.num_epochs must be > 0 (or set training.max_steps)")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"training.max_steps must be a positive number of steps, or -1 to use num_epochs (got {t.max_steps})")
    if not t.learning_rate > 0:
        p.append(f"training.learning_rate must be > 0 (got {t.learning_rate}); 1e-4..5e-4 is usual for LoRA")
    if t.weight_decay < 0:
        p.append(f"training.weight_decay must be >= 0 (got {t.weight_decay})")
    if t.warmup_steps < 0:
        p.append(f"training.warmup_steps must be >= 0 (got {t.warmup_steps})")
    if t.max_grad_norm < 0:
        p.append(f"training.max_grad_norm must be >= 0, 0 = no clipping (got {t.max_grad_norm})")
    if not t.max_duration > 0:
        p.append(f"training.max_duration must be > 0 seconds (got {t.max_duration}); MusicGen's context is 30 s")
    if t.decoder_dropout is not None and not 0 <= t.decoder_dropout < 1:
        p.append(f"training.decoder_dropout must be in [0, 1) or null (got {t.decoder_dropout}); 0.0 is what "
                 f"audiocraft trained MusicGen with, null keeps the checkpoint's value")
    if not 0 <= t.cond_dropout < 1:
        p.append(f"training.cond_dropout must be in [0, 1) (got {t.cond_dropout}); audiocraft uses 0.3")
    for name in ("save_steps", "eval_steps", "logging_steps", "save_total_limit", "max_nan_steps",
                 "encode_batch_size"):
        if getattr(t, name) < 1:
            p.append(f"training.{name} must be at least 1 (got {getattr(t, name)})")
    if t.early_stopping_patience < 0:
        p.append(f"training.early_stopping_patience must be >= 0, 0 = off (got {t.early_stopping_patience})")
    if t.dataloader_num_workers < 0:
        p.append(f"training.dataloader_num_workers must be >= 0 (got {t.dataloader_num_workers})")
    if lo.lora_rank < 1:
        p.append(f"lora.lora_rank must be at least 1 (got {lo.lora_rank})")
    if not 0 <= lo.lora_dropout < 1:
        p.append(f"lora.lora_dropout must be in [0, 1) (got {lo.lora_dropout})")
    validate(p)


def micro_seed(seed: int, epoch: int, micro_index: int) -> int:
    """Seed of the torch RNG for one global micro-batch (model/LoRA dropout): independent of process count."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(micro_index) * 104_729 + 17) % (2 ** 63 - 1)


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    """'latest' -> the complete checkpoint with the highest global_step; else the given folder (checked)."""
    if spec.strip().lower() == "latest":
        root = output_dir / "checkpoints"
        found = []
        for d in sorted(root.glob("step-*")) if root.is_dir() else []:
            try:
                found.append((json.loads((d / STATE_FILE).read_text(encoding="utf-8"))["global_step"], d))
            except (OSError, ValueError, KeyError):
                log.warning("Ignoring incomplete checkpoint %s (no readable %s)", d, STATE_FILE)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {root}. Start without "
                            f"--resume_from_checkpoint, or pass a checkpoint folder.")
        return max(found)[1]
    path = Path(spec).expanduser().resolve()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {spec}: {path} is not a complete checkpoint (no {STATE_FILE}). "
                        f"Use 'latest' or a folder like {output_dir / 'checkpoints' / 'step-000200'}.")
    return path


def clear_earlier_run(out: Path, overwrite: bool, is_main: bool = True) -> None:
    """A fresh run must not mix with an earlier run's files: its checkpoints would be taken for this run's by
    --resume_from_checkpoint latest, and its best_model would look like this run's if this one stops early."""
    earlier = [out / n for n in ("checkpoints", "best_model", "final_model") if (out / n).exists()]
    if not earlier:
        return
    if not overwrite:
        names = ", ".join(p.name + "/" for p in earlier)
        raise UserError(f"{out} already holds an earlier training run ({names}). Continue it with "
                        f"--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir "
                        f"to delete those folders and start over.")
    if is_main:
        for p in earlier:
            log.warning("--overwrite_output_dir: deleting %s of an earlier run", p)
            shutil.rmtree(p)


def plan_steps(cfg: Config, n_batches: int, group: int) -> tuple[int, int, int, str]:
    """(steps per epoch, total steps, warmup steps, note about warmup)."""
    t = cfg.training
    steps_per_epoch = max(1, n_batches // group)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_epochs * steps_per_epoch))
    warmup, note = t.warmup_steps, ""
    cap = math.ceil(0.1 * total)
    if warmup > cap:
        note = (f"warmup_steps {t.warmup_steps} is more than 10% of this short run ({total} steps); "
                f"capped at {cap}")
        warmup = cap
    return steps_per_epoch, total, warmup, note


def set_decoder_dropout(model, p: float | None) -> float | None:
    """training.decoder_dropout: the hidden-state dropout of the frozen MusicGen decoder while LoRA trains
    (``MusicgenDecoder.dropout`` after the embeddings and ``MusicgenDecoderLayer.dropout`` after self-attention,
    cross-attention and the feed-forward block; attention_dropout / activation_dropout stay as the config has
    them). None keeps the checkpoint's value. Only the module attributes change, not the model config: the
    saved adapter is the same, and evaluation / generation run in eval mode, where dropout is off anyway.
    Returns the value in effect (logged)."""
    from lora.modeling import get_base

    dec = get_base(model).decoder.model.decoder
    if p is None:
        log.info("Decoder hidden-state dropout: %g (the checkpoint's, training.decoder_dropout: null)", dec.dropout)
        return float(dec.dropout)
    before = {float(dec.dropout)} | {float(layer.dropout) for layer in dec.layers}
    dec.dropout = float(p)
    for layer in dec.layers:
        layer.dropout = float(p)
    log.info("Decoder hidden-state dropout: %g (training.decoder_dropout; the checkpoint has %s)", p,
             "/".join(f"{v:g}" for v in sorted(before)))
    return float(p)


def configure_step(model, device, checkpointing: bool = False, torch_compile: bool = False,
                   decoder_dropout: float | None = 0.0) -> None:
    """The step's speed/memory options on the LoRA-wrapped model (shared with bench/bench_train.py):
    the decoder's hidden-state dropout (training.decoder_dropout, ``set_decoder_dropout``); on CPU (not under
    torch.compile: inductor has its own RNG and kernels) FastDropout for the LoRA dropout and SDPA's math kernel
    for the cross-attention over the text tokens; gradient checkpointing of the decoder layers; torch.compile of
    the decoder."""
    from lora.modeling import get_base
    from lora.precision import MATH_CROSS_ATTENTION_MAX_KEYS, use_cpu_train_attention, use_fast_dropout

    base = get_base(model)
    set_decoder_dropout(model, decoder_dropout)
    if device.type == "cpu" and not torch_compile:
        if use_fast_dropout(model):
            log.info("LoRA dropout: FastDropout (CPU: the default dropout's random numbers are slow)")
        if use_cpu_train_attention(base.decoder):
            log.info("Cross-attention: SDPA math kernel while training with <= %d text tokens (CPU: the "
                     "flash-attention backward is slow for so few keys)", MATH_CROSS_ATTENTION_MAX_KEYS)
    if checkpointing:
        base.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        for emb in base.decoder.model.decoder.embed_tokens:  # the input-grad hook peft uses for checkpointing
            emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    if torch_compile:
        base.decoder.compile()


def batch_loss(model, processor, info, batch, device, autocast, cache_text: bool):
    """The training (and validation) forward of one micro-batch -> (loss, per-codebook loss, tokens per codebook).

    Delay-pattern targets from the cached codes; the decoder reads the cached text states (or, when the text
    encoder trains, encodes the captions here and applies the null condition to dropped samples). ``autocast``
    is a context-manager factory (``Accelerator.autocast``). bench/bench_train.py times exactly this function.
    """
    from lora.modeling import build_delay_pattern, codebook_losses, encode_text

    codes = batch["codes"].to(device, non_blocking=True)
    dec_in, labels = build_delay_pattern(codes, batch["lengths"].to(device, non_blocking=True), info)
    if cache_text:
        hidden = batch["hidden"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
    else:  # the text encoder trains: encode every step, then apply the null condition to dropped samples
        with autocast():
            hidden, mask = encode_text(model, processor, batch["texts"], device=device)
        keep = ~batch["dropped"].to(device)
        hidden = hidden * keep[:, None, None].to(hidden.dtype)
        mask = mask * keep[:, None]
    with autocast():
        logits = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dec_in).logits
    return codebook_losses(logits.float(), labels)


def decoder_to(model, device, text_encoder: bool = False) -> None:
    """Move what the train step runs to ``device``: the decoder (with its LoRA layers), enc_to_dec_proj and, when
    asked, the text encoder. train_lora.py calls it after attach_lora + prepare_frozen_weights, so the decoder
    reaches a GPU already in its training dtype (shared with bench/bench_train.py)."""
    from lora.modeling import get_base

    base = get_base(model)
    base.decoder.to(device)
    if getattr(base, "enc_to_dec_proj", None) is not None:
        base.enc_to_dec_proj.to(device)
    if text_encoder:
        base.text_encoder.to(device)


def prepare_frozen_weights(model, precision: str, setting: str) -> str:
    """Apply training.base_weights_dtype after LoRA is attached: with bfloat16, every frozen decoder (and
    enc_to_dec_proj) weight and buffer is stored in bf16 and peft's cast of each LoRA input to float32 is turned
    off (autocast runs the LoRA matmuls in bf16 anyway), so the step does no per-layer dtype casts. LoRA weights
    (and so the optimizer state and the saved adapter) stay float32. Returns the dtype name used."""
    import torch

    from lora.modeling import get_base
    from lora.precision import cast_frozen_weights, resolve_base_weights_dtype

    name, why = resolve_base_weights_dtype(setting, precision)
    if name == "bfloat16":
        base = get_base(model)
        n = cast_frozen_weights(base.decoder, torch.bfloat16)
        if getattr(base, "enc_to_dec_proj", None) is not None:
            n += cast_frozen_weights(base.enc_to_dec_proj, torch.bfloat16)
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):  # peft LoRA layers
                m.cast_input_dtype_enabled = False
        log.info("Frozen base weights: bfloat16 (%s; %.1fM parameters cast)", why, n / 1e6)
    else:
        log.info("Frozen base weights: float32 (%s)", why)
    return name


# ============================================================================================
# Artifacts
# ============================================================================================
class RunLog:
    """metrics.jsonl, TensorBoard and loss_curve.png under output_dir/logs (main process only)."""

    def __init__(self, logs_dir: Path, history: list[dict], enabled: bool):
        self.dir, self.history, self.enabled = logs_dir, history, enabled
        self.tb = None
        if enabled:
            logs_dir.mkdir(parents=True, exist_ok=True)
            # Rewrite metrics.jsonl from the (restored) history: lines past a resumed checkpoint are dropped.
            atomic_write_text(logs_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(logs_dir))

    def add(self, entry: dict, prefix: str) -> None:
        self.history.append(entry)
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        for k, v in entry.items():
            if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, entry["step"])
        self.tb.flush()

    def plot(self, base_loss) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = [(h["step"], h["loss"]) for h in self.history if "loss" in h]
        va = [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", alpha=0.8)
        if va:
            ax.plot(*zip(*va), "o-", label="held-out loss")
        if base_loss is not None:
            ax.axhline(base_loss, color="gray", ls="--", lw=1, label=f"base model (held-out) {base_loss:.3f}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (mean over codebooks)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(self.dir / "loss_curve.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def model_card(cfg: Config, info, state: dict, kind: str, n_train: int, train_hours: float, where: Path) -> str:
    base = info.name_or_path
    best, base_loss = state.get("best_metric"), state.get("base_val_loss")
    lines = [
        f"# MusicGen LoRA adapter ({kind})", "",
        f"- Base model: `{base}`",
        f"- Data: {n_train} training clips ({train_hours:.2f} h) from `{cfg.data.data_dir}`",
        f"- Training: {state['global_step']} optimizer steps (epoch {state['epoch']:.2f}), LoRA rank "
        f"{cfg.lora.lora_rank}, alpha {cfg.lora.lora_alpha}, targets `{cfg.lora.lora_targets}`, "
        f"lr {cfg.training.learning_rate}, effective batch {state['effective_batch']}, precision {state['precision']}",
    ]
    if base_loss is not None:
        lines.append(f"- Held-out loss (cross-entropy, mean over codebooks): base model {base_loss:.4f}, "
                     f"best {best:.4f} at step {state.get('best_step')}"
                     + (f", this adapter {state['eval']['val_loss']:.4f}" if state.get("eval") else ""))
    lines += [
        "", "## Use", "", "```bash",
        f"python lora/inference_lora.py --base_model_path {base} --lora_model_path {where} "
        f"--prompts \"your prompt\"", "```", "", "```python",
        "from transformers import AutoProcessor, MusicgenForConditionalGeneration",
        "from peft import PeftModel", "",
        f"base = MusicgenForConditionalGeneration.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {str(where)!r})",
        f"processor = AutoProcessor.from_pretrained({base!r})",
        "inputs = processor(text=['your prompt'], padding=True, return_tensors='pt')",
        "audio = model.generate(**inputs, do_sample=True, guidance_scale=3.0, max_new_tokens=500)", "```", "",
        "`config.yaml` holds the full configuration of the run; `eval_results.json` the held-out metrics.", ""]
    return "\n".join(lines)


# ============================================================================================
# main
# ============================================================================================
def main(argv=None) -> int:
    cfg, _ = parse_config(argv, description=__doc__.splitlines()[0], sections=SECTIONS)
    check_config(cfg)
    setup_logging()
    import torch

    handlers, level = list(log.handlers), log.level
    try:
        return train(cfg)
    except torch.OutOfMemoryError as e:
        t = cfg.training
        raise UserError(
            f"Out of GPU memory ({str(e).splitlines()[0][:200]}). Try: a smaller --batch_size (now {t.batch_size}) "
            f"with more --gradient_accumulation_steps (now {t.gradient_accumulation_steps}) to keep the effective "
            f"batch; a shorter --max_duration (now {t.max_duration} s); --gradient_checkpointing; or "
            f"--mixed_precision bf16/fp16.") from None
    finally:
        for h in [h for h in log.handlers if h not in handlers]:
            log.removeHandler(h)
            h.close()
        log.setLevel(level)


def train(cfg: Config) -> int:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from lora.dataset import CachedTokenDataset, bucketed_batches, build_token_cache, collate_tokens, load_metadata
    from lora.modeling import attach_lora, get_base, load_base_model
    from lora.precision import choose_precision, resolve_base_weights_dtype

    t = cfg.training
    out = Path(t.output_dir)

    # ---------------------------------------------------------------- setup: processes, precision
    # Several processes without CUDA (torchrun on CPUs): accelerate needs cpu=True to use gloo.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    state0 = PartialState(cpu=cpu)
    precision, why = choose_precision(t.mixed_precision, state0.device)
    AcceleratorState._reset_state()  # main() may run several times in one process (tests)
    acc = Accelerator(mixed_precision=precision, cpu=cpu)
    main_proc, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    device = acc.device
    if not main_proc:
        log.setLevel("WARNING")
    else:  # logs/train.log: the same lines as the console (main() removes the handler again)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(out / "logs" / "train.log", encoding="utf-8")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_log)
    log.info("Precision: %s (%s)", precision, why)
    resolve_base_weights_dtype(t.base_weights_dtype, precision)  # a bad combination fails before the model loads

    # ---------------------------------------------------------------- setup: data records
    records = load_metadata(cfg.data.data_dir, cfg.data.metadata_file)
    train_recs = [r for r in records if r.split == "train"]
    valid_recs = [r for r in records if r.split == "valid"]
    if not train_recs:
        raise UserError(f"No training clips (split 'train') in {cfg.data.data_dir}/{cfg.data.metadata_file}. "
                        f"Prepare data with: python lora/prepare_data.py --input_dir YOUR_AUDIO --output_dir "
                        f"{cfg.data.data_dir}")
    if not valid_recs:
        raise UserError(f"No held-out clips (split 'valid') in {cfg.data.data_dir}/{cfg.data.metadata_file}; "
                        f"training needs them to measure progress and pick best_model (it never validates on the "
                        f"training clips). Re-run prepare_data.py with --valid_fraction 0.1 (or higher), or mark "
                        f"some clips \"split\": \"valid\".")

    ck = find_checkpoint(out, t.resume_from_checkpoint) if t.resume_from_checkpoint else None  # fail early
    if ck is None:
        clear_earlier_run(out, t.overwrite_output_dir, is_main=PartialState().is_main_process)

    # ---------------------------------------------------------------- setup: model and token cache
    set_seed(t.seed)
    # Loaded on the CPU: only the encoders go to the device for the token cache; the decoder follows after LoRA is
    # attached (an fp32 init, the same in every precision) and its frozen weights are cast, so a GPU never holds
    # the fp32 decoder (musicgen-large: ~7 GB of bf16 weights instead of ~14 GB while loading).
    model, processor, info = load_base_model(cfg.model)
    base = get_base(model)
    base.audio_encoder.to(device)
    base.text_encoder.to(device)
    max_frames = int(round(t.max_duration * info.frame_rate))
    max_pos = int(getattr(base.config.decoder, "max_position_embeddings", 10 ** 9))
    kc = info.num_codebooks // info.audio_channels
    if max_frames + kc - 1 > max_pos:
        raise ConfigError(f"training.max_duration {t.max_duration} s is longer than the model's context "
                          f"({(max_pos - kc + 1) / info.frame_rate:.1f} s); lower it (30 is MusicGen's).")
    cache_text = not cfg.lora.train_text_encoder
    with acc.main_process_first():
        clips, _ = build_token_cache(records, model, processor, info, cfg.data.data_dir,
                                     batch_size=t.encode_batch_size, device=device, text_states=cache_text,
                                     show_progress=main_proc)
    train_clips = [c for c in clips if c.split == "train"]
    valid_clips = [c for c in clips if c.split == "valid"]
    # Training reads tokens only: the codec (and the frozen text encoder) leave the accelerator.
    base.audio_encoder.to("cpu")
    if cache_text:
        base.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("EnCodec%s moved off %s: training reads cached tokens", "" if not cache_text else " and text encoder",
             device)

    set_seed(t.seed)  # LoRA init does not depend on what the cache step consumed
    model = attach_lora(model, cfg.lora)  # peft creates the LoRA weights next to the layers they adapt
    prepare_frozen_weights(model, precision, t.base_weights_dtype)
    decoder_to(model, device, text_encoder=not cache_text)  # (without cached text states T5 runs in every step)
    configure_step(model, device, checkpointing=t.gradient_checkpointing, torch_compile=t.torch_compile,
                   decoder_dropout=t.decoder_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    def set_train_mode():
        model.train()
        base.audio_encoder.eval()
        if cache_text:
            base.text_encoder.eval()

    # ---------------------------------------------------------------- setup: data plan
    train_ds = CachedTokenDataset(train_clips, max_frames, seed=t.seed, train=True, cond_dropout=t.cond_dropout)
    valid_ds = CachedTokenDataset(valid_clips, max_frames, seed=t.seed, train=False)
    ga, group = t.gradient_accumulation_steps, t.gradient_accumulation_steps * world
    n_batches = len(bucketed_batches(train_ds.lengths(), t.batch_size, t.seed, 0, multiple_of=group))
    steps_per_epoch, total_steps, warmup, warm_note = plan_steps(cfg, n_batches, group)
    if warm_note:
        log.info(warm_note)
    collate = lambda items: collate_tokens(items, info.pad_token_id)  # noqa: E731

    # ---------------------------------------------------------------- setup: optimizer, schedule
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched_name = {"constant": "constant_with_warmup"}.get(t.lr_scheduler_type, t.lr_scheduler_type)
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    optimizer = acc.prepare(optimizer)  # fp16: GradScaler steps; the scheduler is stepped by hand

    # ---------------------------------------------------------------- setup: resume
    st = {"global_step": 0, "epoch": 0.0, "data_epoch": 0, "step_in_epoch": 0, "best_metric": None,
          "best_step": None, "base_val_loss": None, "nan_steps_total": 0, "nan_in_a_row": 0,
          "evals_without_improvement": 0, "log_history": []}
    if ck is not None:
        saved = json.loads((ck / STATE_FILE).read_text(encoding="utf-8"))
        for key in ("batch_size", "gradient_accumulation_steps", "world_size", "seed"):
            now = {"world_size": world}.get(key, getattr(t, key, None))
            if saved.get("run", {}).get(key) not in (None, now):
                log.warning("Resuming with %s=%s but the checkpoint used %s: the data order will differ from an "
                            "uninterrupted run.", key, now, saved["run"][key])
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ck / "adapter_model.safetensors"), device=str(device)))
        optimizer.load_state_dict(torch.load(ck / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
        if acc.scaler is not None and (ck / "scaler.pt").is_file():
            acc.scaler.load_state_dict(torch.load(ck / "scaler.pt", weights_only=True))
        rng = torch.load(ck / "rng_state.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        st.update({k: saved[k] for k in st if k in saved})
        log.info("Resumed from %s at step %d (epoch %d, batch %d of the epoch)", ck, st["global_step"],
                 st["data_epoch"], st["step_in_epoch"])

    # ---------------------------------------------------------------- banner
    secs = sum(c.num_frames for c in train_clips) / info.frame_rate
    eff = t.batch_size * ga * world
    log.info("=" * 78)
    log.info("Training LoRA on %s -> %s", info.name_or_path, out)
    log.info("  clips: %d train (%.2f h of audio), %d held-out | window %.1f s | cond dropout %.2f",
             len(train_clips), secs / 3600, len(valid_clips), max_frames / info.frame_rate, t.cond_dropout)
    log.info("  batch %d x accumulation %d x %d process(es) = effective batch %d", t.batch_size, ga, world, eff)
    log.info("  %d steps per epoch, %d steps in total (%.2f epochs), warmup %d, %s schedule, lr %g",
             steps_per_epoch, total_steps, total_steps / steps_per_epoch, warmup, t.lr_scheduler_type,
             t.learning_rate)
    log.info("  trainable parameters: %s of %s (%.3f%%) | device %s | precision %s%s", f"{n_trainable:,}",
             f"{n_total:,}", 100 * n_trainable / n_total, device, precision,
             " | gradient checkpointing" if t.gradient_checkpointing else "")
    log.info("=" * 78)

    runlog = RunLog(out / "logs", st["log_history"], enabled=main_proc)
    if main_proc:
        cfg.save(out / "config.yaml")
        log.info("Resolved config: %s", out / "config.yaml")

    # ---------------------------------------------------------------- helpers of the loop
    def forward_loss(batch):
        return batch_loss(model, processor, info, batch, device, acc.autocast, cache_text)

    def evaluate() -> dict:
        model.eval()
        K = info.num_codebooks
        sums = torch.zeros(K, dtype=torch.float64, device=device)
        counts = torch.zeros(K, dtype=torch.float64, device=device)
        lengths = valid_ds.lengths()
        order = sorted(range(len(valid_ds)), key=lambda i: -lengths[i])
        batches = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)][rank::world]
        with torch.no_grad():
            for b in batches:
                _, per_cb, n = forward_loss(collate([valid_ds[i] for i in b]))
                sums += per_cb.double() * n.double()
                counts += n.double()
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        set_train_mode()
        per_cb = (sums / counts.clamp(min=1)).tolist()
        res = {"val_loss": sum(per_cb) / K, "val_ppl": math.exp(min(50.0, sum(per_cb) / K))}
        for k, v in enumerate(per_cb):
            res[f"val_loss_cb{k}"] = v
            res[f"val_ppl_cb{k}"] = math.exp(min(50.0, v))
        res["val_tokens"] = int(counts.sum().item())
        return res

    def snapshot(stage: str) -> dict:
        return dict(st, epoch=st["epoch"], stage=stage, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                    effective_batch=eff, precision=precision, base_model=info.name_or_path,
                    run={"batch_size": t.batch_size, "gradient_accumulation_steps": ga, "world_size": world,
                         "seed": t.seed})

    def save_adapter(path: Path, kind: str, evaluation: dict | None) -> None:
        s = snapshot(kind)
        s["eval"] = evaluation
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            cfg.save(tmp / "config.yaml")
            atomic_write_json(tmp / STATE_FILE, s)
            atomic_write_json(tmp / "eval_results.json", {"step": st["global_step"], "base_val_loss":
                                                          st["base_val_loss"], **(evaluation or {})})
            atomic_write_text(tmp / "README.md", model_card(cfg, info, s, kind, len(train_clips), secs / 3600,
                                                                path))

    def save_checkpoint() -> None:
        root = out / "checkpoints"
        path = root / f"step-{st['global_step']:06d}"
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng_state.pt")
            cfg.save(tmp / "config.yaml")
            atomic_write_json(tmp / STATE_FILE, snapshot("checkpoint"))  # written last: marks it complete
        ckpts = sorted(root.glob("step-*"))
        for old in ckpts[:-t.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("Saved checkpoint %s", path)

    def validate_and_track() -> bool:
        """Validate, log, keep best_model; returns True when early stopping says stop."""
        res = evaluate()
        entry = {"step": st["global_step"], "epoch": round(st["epoch"], 4), **res}
        if st["base_val_loss"] is None:
            st["base_val_loss"] = res["val_loss"]
            entry["base"] = True
        runlog.add(entry, "eval")
        improved = st["best_metric"] is None or res["val_loss"] < st["best_metric"]
        log.info("step %d: held-out loss %.4f (ppl %.2f) per codebook [%s]%s", st["global_step"], res["val_loss"],
                 res["val_ppl"], ", ".join(f"{res[f'val_loss_cb{k}']:.3f}" for k in range(info.num_codebooks)),
                 " (best so far)" if improved else "")
        if improved:
            st["best_metric"], st["best_step"], st["evals_without_improvement"] = res["val_loss"], st["global_step"], 0
            if main_proc:
                save_adapter(out / "best_model", "best_model", res)
        else:
            st["evals_without_improvement"] += 1
        if main_proc:
            runlog.plot(st["base_val_loss"])
        acc.wait_for_everyone()
        return bool(t.early_stopping_patience and st["evals_without_improvement"] >= t.early_stopping_patience)

    # ================================================================ train loop
    set_train_mode()
    last_eval = {}
    stop_reason = None
    if st["global_step"] == 0 and st["base_val_loss"] is None:
        log.info("Held-out loss of the base model (LoRA at init) ...")
        validate_and_track()
    bar = tqdm(total=total_steps, initial=st["global_step"], desc="training", unit="step", disable=not main_proc,
               dynamic_ncols=True)
    interval_loss = torch.zeros((), device=device)
    interval_cb = torch.zeros(info.num_codebooks, device=device)
    interval_n, t_interval = 0, time.time()
    interval_dropped = interval_samples = 0
    grad_norm = torch.zeros((), device=device)
    while st["global_step"] < total_steps and stop_reason is None:
        ep = st["data_epoch"]
        train_ds.set_epoch(ep)
        batches = bucketed_batches(train_ds.lengths(), t.batch_size, t.seed, ep, multiple_of=group)
        first = st["step_in_epoch"]
        mine = [(s * group + m * world + rank) for s in range(first, steps_per_epoch) for m in range(ga)]
        loader = DataLoader(train_ds, batch_sampler=[batches[i] for i in mine], collate_fn=collate,
                            num_workers=t.dataloader_num_workers)
        it = iter(loader)
        for s in range(first, steps_per_epoch):
            if st["global_step"] >= total_steps:
                break
            loss_sum = torch.zeros((), device=device)
            cb_sum = torch.zeros(info.num_codebooks, device=device)
            for m in range(ga):
                batch = next(it)
                torch.manual_seed(micro_seed(t.seed, ep, s * group + m * world + rank))
                loss, per_cb, _ = forward_loss(batch)
                acc.backward(loss / ga)
                loss_sum += loss.detach()
                cb_sum += per_cb.detach()
                interval_dropped += int(batch["dropped"].sum())  # CPU tensor: no device sync
                interval_samples += len(batch["dropped"])
            # One all-reduce of every LoRA gradient (+ the loss) across processes: the same as one process with
            # world x accumulation micro-batches.
            if world > 1:
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                                  for p in params] + [loss_sum.view(1).float()])
                dist.all_reduce(flat)
                flat /= world
                off = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[off:off + n].view_as(p).to(p.dtype).clone()
                    off += n
                loss_sum = flat[-1]
            # NaN guard: the one host sync per optimizer step (not per micro-batch).
            if not bool(torch.isfinite(loss_sum)):
                st["nan_steps_total"] += 1
                st["nan_in_a_row"] += 1
                log.warning("step %d: non-finite loss (%s); optimizer step skipped (%d in a row, %d in total)",
                            st["global_step"] + 1, float(loss_sum), st["nan_in_a_row"], st["nan_steps_total"])
                if st["nan_in_a_row"] >= t.max_nan_steps:
                    raise UserError(
                        f"Training stopped: the loss was NaN/inf in {st['nan_in_a_row']} optimizer steps in a row "
                        f"(training.max_nan_steps = {t.max_nan_steps}). Try a lower --learning_rate (now "
                        f"{t.learning_rate}), --mixed_precision bf16 instead of fp16 (or no), a smaller "
                        f"--max_grad_norm, and check the data with python lora/test_dataset.py.")
            else:
                st["nan_in_a_row"] = 0
                if t.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                interval_loss += loss_sum / ga
                interval_cb += cb_sum / ga
                interval_n += 1
            with warnings.catch_warnings():  # a skipped (NaN) first step still advances the schedule
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            st["global_step"] += 1
            st["step_in_epoch"] = s + 1
            st["epoch"] = ep + (s + 1) / steps_per_epoch
            bar.update(1)
            gs = st["global_step"]

            if gs % t.logging_steps == 0 or gs == total_steps:
                n = max(1, interval_n)
                entry = {"step": gs, "epoch": round(st["epoch"], 4),
                         "loss": (interval_loss / n).item() if interval_n else float("nan"),
                         "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                         "nan_steps_total": st["nan_steps_total"], "samples": interval_samples,
                         "null_cond_frac": interval_dropped / max(1, interval_samples),
                         "steps_per_s": interval_n / max(1e-9, time.time() - t_interval)}
                entry.update({f"loss_cb{k}": v / n for k, v in enumerate(interval_cb.tolist())})
                runlog.add(entry, "train")
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
                log.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | grad norm %.3f | %.2f steps/s%s", gs,
                         total_steps, st["epoch"], entry["loss"], entry["lr"], entry["grad_norm"],
                         entry["steps_per_s"], f" | {st['nan_steps_total']} NaN steps skipped"
                         if st["nan_steps_total"] else "")
                interval_loss.zero_()
                interval_cb.zero_()
                interval_n, t_interval = 0, time.time()
                interval_dropped = interval_samples = 0
            if gs % t.eval_steps == 0 or gs == total_steps:
                last_eval = {"step": gs}
                if validate_and_track():
                    stop_reason = (f"early stopping: no held-out improvement in {t.early_stopping_patience} "
                                   f"validations")
            if gs % t.save_steps == 0 or gs == total_steps or stop_reason:
                if main_proc:
                    save_checkpoint()
                acc.wait_for_everyone()
            if stop_reason:
                break
        else:
            st["data_epoch"] = ep + 1
            st["step_in_epoch"] = 0
    bar.close()

    # ================================================================ evaluate / save
    if last_eval.get("step") != st["global_step"]:
        validate_and_track()
    final_eval = next(h for h in reversed(st["log_history"]) if "val_loss" in h)
    if main_proc:
        save_adapter(out / "final_model", "final_model", final_eval)
        runlog.plot(st["base_val_loss"])
    runlog.close()
    acc.wait_for_everyone()
    if stop_reason:
        log.info("Stopped: %s", stop_reason)
    log.info("Done in %d steps. Held-out loss: base %.4f -> best %.4f (step %s) -> final %.4f. Adapter: %s",
             st["global_step"], st["base_val_loss"], st["best_metric"], st["best_step"], final_eval["val_loss"],
             out / "best_model")
    log.info("Listen: python lora/inference_lora.py --base_model_path %s --lora_model_path %s --prompts \"...\"",
             info.name_or_path, out / "best_model")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
