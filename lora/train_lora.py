"""Fine-tune MusicGen with LoRA on your clips (one GPU, several GPUs, or a CPU for a dry run).

    python lora/train_lora.py --model_path facebook/musicgen-small --data_dir data --output_dir output
    cd lora && python train_lora.py --model_path tiny --data_dir ../data --metadata_file metadata.json \
        --output_dir ../output --lora_rank 12 --lora_alpha 24 --batch_size 2 --num_epochs 5 --fp16
    accelerate launch lora/train_lora.py ...      # or: torchrun --nproc_per_node N lora/train_lora.py ...

Reads config.yaml (sections training, model, lora, data); every key is also a flag. The script runs top to
bottom: setup (precision, model, token cache, LoRA, data plan, optimizer, resume) / train loop / evaluate /
save. It writes, under output_dir:

    checkpoints/step-NNNNNN/   resumable state every save_steps and save_minutes (adapter, optimizer, scheduler,
                               scaler, RNG, data position, trainer_state.json, config.yaml); the newest
                               save_total_limit kept
    best_model/  final_model/  PEFT adapters (adapter_config.json + adapter_model.safetensors) + config.yaml,
                               trainer_state.json, eval_results.json and a model card README.md
    samples/step-NNNNNN/       the samples (sample_NN.wav + manifest.json) at step 0 (the base model) and
                               every sample_every steps (auto: every validation), with their copy check
    logs/                      metrics.jsonl, TensorBoard events, loss_curve.png, train.log, timing.json (where
                               the wall time went: start-up, load, token cache, LoRA set-up, steps, ...)
    config.yaml                the resolved configuration of the run

Training reads tokens only: EnCodec codes and text-encoder states are computed once into data_dir/cache
(lora.dataprep.token_cache.build_token_cache; with several processes each encodes its share), then both
encoders leave the GPU. The step, validation,
checkpoints and logs are lora/training's (the same step bench/bench_train.py times and test_model.py checks);
this script tells the story.

Data order is a pure function of (seed, epoch): each epoch's length-bucketed micro-batches are split over
optimizer steps, micro-steps and processes the same way for any number of processes (N processes with
gradient_accumulation_steps G train like 1 process with N*G), and all per-sample randomness (crop, condition
dropout) and per-micro-batch randomness (LoRA/model dropout) is seeded by the sample / micro-batch index, so
--resume_from_checkpoint continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora.common.cli import (
    UserError,
    fault_message,
    log,
    on_interrupt,
    process_start_time,
    run_main,
    script_command,
    setup_logging,
    shown_model,
    shown_path,
)
from lora.common.files import atomic_write_json, check_free_space, check_output_dir
from lora.config import Config, parse_config, validate
from lora.dataprep.melody_stems import melody_separator
from lora.dataprep.token_cache import build_token_cache
from lora.dataset import (
    CachedTokenDataset,
    bucketed_batches,
    cache_note,
    collate_tokens,
    data_dir_lock,
    load_metadata,
    resolve_trigger,
    warn_sample_rate,
)
from lora.modeling.loading import family_for, load_base_model, local_model_folder
from lora.modeling.memory import check_fits, training_floor
from lora.modeling.window import checked_window, longest_caption
from lora.training import checkpoints, model_prep, plan, processes, resume, run_log, samples
from lora.training import step as training_step
from lora.training.checkpoints import TrainState

SECTIONS = plan.TRAIN_SECTIONS


def config_problems(cfg: Config, ns=None) -> list[str]:
    """Rules that span several settings (each value's own range is checked by the schema,
    lora.config); the web UI checks its Train form with the same rules."""
    return plan.settings_problems(cfg)


def check_config(cfg: Config) -> None:
    """ConfigError when ``config_problems`` finds any (for a Config built in code)."""
    validate(config_problems(cfg))


def main(argv=None) -> int:
    cfg, _ = parse_config(argv, description=__doc__.splitlines()[0], sections=SECTIONS,
                          rules=config_problems)
    setup_logging()
    import torch

    out = check_output_dir(cfg.training.output_dir, "--output_dir")
    load_metadata(cfg.data.data_dir, cfg.data.metadata_file)  # no data: nothing is made in out
    handlers, level = list(log.handlers), log.level
    try:  # one run per output folder (only the first process of a multi-process run holds it)
        with checkpoints.output_lock(out, enabled=os.environ.get("RANK", "0") == "0"), \
                data_dir_lock(cfg.data.data_dir, writer=False):  # prepare_data waits for the run
            return train(cfg)
    except torch.OutOfMemoryError as e:
        t = cfg.training
        raise UserError(
            f"Out of GPU memory ({str(e).splitlines()[0][:200]}). Try: a smaller --batch_size (now "
            f"{t.batch_size}) with more --gradient_accumulation_steps (now "
            f"{t.gradient_accumulation_steps}) to keep the effective batch; a shorter "
            f"--max_duration (now {t.max_duration} s); --gradient_checkpointing; or "
            f"--mixed_precision bf16/fp16.") from None
    except OSError as e:  # a full or read-only disk: a message naming the file
        message = fault_message(e, "training writes checkpoints, adapters and logs into "
                                   f"{cfg.training.output_dir}")
        if message is None:
            raise
        raise UserError(message) from None
    finally:
        for h in [h for h in log.handlers if h not in handlers]:
            log.removeHandler(h)
            h.close()
        log.setLevel(level)


def train(cfg: Config) -> int:
    run = set_up(cfg)
    with on_interrupt(lambda: resume.interrupt_note(run.out, run.save_every,
                                                    cfg.training.save_minutes)):
        train_loop(run)
    finish(run)
    return 0


# ============================================================================================
# Set-up
# ============================================================================================
@dataclass
class Run:
    """Everything the loop works with, set up once by ``set_up``."""

    cfg: Config
    acc: object                  # accelerate.Accelerator
    device: object
    precision: str
    model: object                # the PEFT model
    processor: object
    info: object                 # the family's ModelInfo
    params: list                 # the trainable (LoRA) parameters
    optimizer: object
    scheduler: object
    train_ds: CachedTokenDataset
    valid_ds: CachedTokenDataset
    collate: object
    cache_text: bool             # text states come from the cache (the text encoder does not train)
    steps_per_epoch: int
    total_steps: int
    train_seconds: float         # audio in the training clips
    # training.eval_steps / save_steps resolved ('auto' -> about 10 per run)
    eval_every: int = 0
    save_every: int = 0
    state: TrainState = field(default_factory=TrainState)
    runlog: run_log.RunLog = None
    stop_reason: str = None
    clock: run_log.PhaseClock = None  # where the time goes (logged at the end, logs/timing.json)
    sampler: samples.Sampler = None   # the samples at step 0 and every sample_every steps (or None)
    identity: dict = field(default_factory=dict)  # the base model and data trained on (resume checks)

    @property
    def out(self) -> Path:
        return Path(self.cfg.training.output_dir)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def loss(self, batch):
        return training_step.step_loss(self.model, self.processor, self.info, batch, self.device,
                                       self.acc.autocast, self.cache_text)

    def snapshot(self, stage: str) -> dict:
        t, acc = self.cfg.training, self.acc
        return self.state.snapshot(
            stage, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            effective_batch=t.batch_size * t.gradient_accumulation_steps * acc.num_processes,
            precision=self.precision, base_model=self.info.name_or_path,
            run={"batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                 "world_size": acc.num_processes, "seed": t.seed}, **self.identity)


def load_and_cache(cfg: Config, acc, records, clock: run_log.PhaseClock, ck=None, resumed=None):
    """The base model (on the CPU) and every clip's cached tokens; only the encoders visit the
    device, for the cache, and leave it again when their output is cached. A resume's base model
    must be the run's (checked before the cache is built)."""
    import torch

    t, device = cfg.training, acc.device
    # Loaded on the CPU: the decoder follows after LoRA is attached (an fp32 init, the same in every
    # precision) and its frozen weights are cast, so a GPU never holds the fp32 decoder.
    model, processor, info = load_base_model(cfg.model)
    if ck is not None:
        resume.check_model(resumed, ck, info)
    clock.lap("load")
    warn_sample_rate(cfg.data.data_dir, cfg.data.metadata_file, info.sample_rate)
    fam = family_for(info)
    fam.audio_codec(model).to(device)
    fam.text_encoder_of(model).to(device)
    max_frames = checked_window(t.max_duration, info, model,
                                **longest_caption(info, processor, [r.text for r in records]))
    cache_text = not cfg.lora.train_text_encoder
    # Every process encodes its share of what is not cached yet; the first joins the shares.
    with on_interrupt(lambda: cache_note(cfg.data.data_dir)):
        clips, _ = build_token_cache(records, model, processor, info, cfg.data.data_dir,
                                     batch_size=t.encode_batch_size, device=device, text_states=cache_text,
                                     show_progress=acc.is_main_process, verify=cfg.data.verify_cache,
                                     ranks=processes.cache_ranks(acc),
                                     melody_separator=melody_separator(cfg.model) if fam.MELODY else None)
    # Training reads tokens only: the codec (and the frozen text encoder) leave the accelerator.
    fam.audio_codec(model).to("cpu")
    if cache_text:
        fam.text_encoder_of(model).to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("EnCodec%s moved off %s: training reads cached tokens", "" if not cache_text
             else " and text encoder", device)
    clock.lap("token cache")
    return model, processor, info, clips, max_frames


def set_up(cfg: Config) -> Run:
    import torch
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t = cfg.training
    out = Path(t.output_dir)
    clock = run_log.PhaseClock(process_start_time())
    # the trigger word in effect (the flag, else metadata.json's) is recorded in every saved config
    trigger = resolve_trigger(cfg.data)
    cfg.data.trigger_word, cfg.data.trigger_position = trigger
    records = load_metadata(cfg.data.data_dir, cfg.data.metadata_file, trigger=trigger)
    if trigger[0]:
        log.info("trigger word %r (%s of every caption): put it in your prompts to call up the style",
                 trigger[0], trigger[1] if trigger[1] != "replace" else "replaces")
    plan.split_records(cfg, records)
    # Read whole before anything loads: a damaged checkpoint stops here ('latest' falls back to an
    # older one).
    ck = checkpoints.find_checkpoint(out, t.resume_from_checkpoint) if t.resume_from_checkpoint else None
    resumed = resume.check_settings(cfg, ck) if ck is not None else None  # (refuses another LoRA)
    # before this run writes anything (the first process deletes, the others only check)
    if ck is None:
        checkpoints.clear_earlier_run(out, t.overwrite_output_dir,
                                      is_main=os.environ.get("RANK", "0") == "0",
                                      models=[("the base model", local_model_folder(cfg.model))])
    acc, precision = processes.start_processes(cfg)

    set_seed(t.seed)
    clock.lap("start-up")
    model, processor, info, clips, max_frames = load_and_cache(cfg, acc, records, clock, ck, resumed)
    data_id = resume.data_identity(clips, max_frames, cfg.data.data_dir)
    if ck is not None:
        resume.check_data(resumed, ck, data_id, t.resume_with_changed_data)
    set_seed(t.seed)  # LoRA init does not depend on what the cache step consumed
    model, params = model_prep.prepare_model(model, cfg, precision, acc.device)
    clock.lap("LoRA set-up")
    check_fits(training_floor(model, t.batch_size, max_frames), acc.device,
               f"A training step of batch_size {t.batch_size} x {t.max_duration:g} s",
               "Lower --batch_size (raise --gradient_accumulation_steps to keep the effective batch) "
               "or --max_duration.")
    check_free_space(out, checkpoints.disk_space_needed(params, t.save_total_limit),
                     "training (checkpoints, best_model, final_model, logs)")

    # The data plan: the same for any number of processes.
    train_clips = [c for c in clips if c.split == "train"]
    train_ds = CachedTokenDataset(train_clips, max_frames, seed=t.seed, train=True,
                                  cond_dropout=t.cond_dropout,
                                  info=info, melody_dropout=t.melody_dropout)
    valid_ds = CachedTokenDataset([c for c in clips if c.split == "valid"], max_frames, seed=t.seed,
                                  train=False, info=info)
    group = t.gradient_accumulation_steps * acc.num_processes
    n_batches = len(bucketed_batches(train_ds.lengths(), t.batch_size, t.seed, 0, multiple_of=group))
    steps_per_epoch, total_steps, warmup, warm_note = plan.plan_steps(cfg, n_batches, group)
    if warm_note:
        log.info(warm_note)
    too_many = plan.events_problem(total_steps, plan.run_events(t, total_steps))
    if too_many:
        raise UserError(too_many)
    if ck is not None:
        resume.check_length(resumed, ck, total_steps)

    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched_name = {"constant": "constant_with_warmup"}.get(t.lr_scheduler_type, t.lr_scheduler_type)
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    optimizer = acc.prepare(optimizer)  # fp16: GradScaler steps; the scheduler is stepped by hand
    run = Run(cfg=cfg, acc=acc, device=acc.device, precision=precision, model=model, processor=processor,
              info=info, params=params, optimizer=optimizer, scheduler=scheduler, train_ds=train_ds,
              valid_ds=valid_ds, collate=lambda items: collate_tokens(items, info.pad_token_id),
              cache_text=not cfg.lora.train_text_encoder, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps,
              train_seconds=sum(c.num_frames for c in train_clips) / info.frame_rate,
              eval_every=plan.resolve_every(t.eval_steps, total_steps)[0],
              save_every=plan.resolve_every(t.save_steps, total_steps)[0], clock=clock,
              identity={"base_identity": info.identity, "data": data_id})
    if ck is not None:
        checkpoints.load_checkpoint(ck, model, optimizer, scheduler, acc.scaler, acc.device, run.state,
                                 {"batch_size": t.batch_size, "gradient_accumulation_steps":
                                  t.gradient_accumulation_steps, "world_size": acc.num_processes,
                                  "seed": t.seed})
    banner(run, warmup)
    resumed_at = run.state.global_step if ck is not None else None
    run.runlog = run_log.RunLog(out / "logs", run.state.log_history, enabled=acc.is_main_process,
                                resumed_at=resumed_at)
    if ck is not None:
        resume.apply(resumed, run, ck.state)
    run.sampler = samples.create(cfg, model, info, acc.device, records, clips, run.eval_every,
                                 acc.is_main_process, resumed_at)
    if acc.is_main_process:
        cfg.save(out / "config.yaml", note=resume.config_note(resumed, run.state.global_step))
        log.info("Resolved config: %s", out / "config.yaml")
    clock.lap("other set-up")
    return run


def banner(run: Run, warmup: int) -> None:
    t, info, acc = run.cfg.training, run.info, run.acc
    n_trainable = sum(p.numel() for p in run.params)
    n_total = sum(p.numel() for p in run.model.parameters())
    log.info("=" * 78)
    log.info("Training LoRA on %s -> %s", info.name_or_path, run.out)
    log.info("  clips: %d train (%.2f h of audio), %d held-out | window %.1f s | cond dropout %.2f",
             len(run.train_ds), run.train_seconds / 3600, len(run.valid_ds), run.train_ds.max_frames
             / info.frame_rate, t.cond_dropout)
    log.info("  batch %d x accumulation %d x %d process(es) = effective batch %d", t.batch_size,
             t.gradient_accumulation_steps, acc.num_processes,
             t.batch_size * t.gradient_accumulation_steps * acc.num_processes)
    log.info("  %d steps per epoch, %d steps in total (%.2f epochs), warmup %d, %s schedule, lr %g",
             run.steps_per_epoch, run.total_steps, run.total_steps / run.steps_per_epoch, warmup,
             t.lr_scheduler_type, t.learning_rate)
    log.info("  trainable parameters: %s of %s (%.3f%%) | device %s | precision %s%s", f"{n_trainable:,}",
             f"{n_total:,}", 100 * n_trainable / n_total, run.device, run.precision,
             " | gradient checkpointing" if t.gradient_checkpointing else "")
    log.info("  %s", plan.cadence_text(t, run.total_steps, run.eval_every, run.save_every))
    log.info("=" * 78)


# ============================================================================================
# The train loop
# ============================================================================================
def train_loop(run: Run) -> None:
    """Optimizer steps until total_steps (or early stopping): each accumulates
    gradient_accumulation_steps micro-batches on every process, all-reduces the LoRA gradients,
    skips the update on a non-finite loss, then logs, validates and checkpoints on their
    schedules."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    t, st, acc = run.cfg.training, run.state, run.acc
    rank, world, ga = acc.process_index, acc.num_processes, t.gradient_accumulation_steps
    group = ga * world
    model_prep.set_train_mode(run.model, run.cache_text)
    if st.base_val_loss is None:  # a fresh run; or a resume onto other held-out clips
        log.info("Held-out loss of the base model (%s) ...", "the adapter switched off"
                 if st.global_step else "LoRA at init")
        if st.global_step:
            track_base(run, resume.measure_base(run.model, lambda: heldout(run)))
        validate_and_track(run)
        run.clock.lap("base held-out loss")
        take_samples(run)
    bar = tqdm(total=run.total_steps, initial=st.global_step, desc="training", unit="step",
               disable=not run.main, dynamic_ncols=True)
    interval = run_log.Interval.start(run.device, run.info.num_codebooks)
    grad_norm = torch.zeros((), device=run.device)
    last_eval = None
    timer = plan.SaveTimer(t.save_minutes)
    while st.global_step < run.total_steps and run.stop_reason is None:
        ep = st.data_epoch
        run.train_ds.set_epoch(ep)
        batches = bucketed_batches(run.train_ds.lengths(), t.batch_size, t.seed, ep, multiple_of=group)
        first = st.step_in_epoch
        mine = [(s * group + m * world + rank) for s in range(first, run.steps_per_epoch)
                for m in range(ga)]
        loader = DataLoader(run.train_ds, batch_sampler=[batches[i] for i in mine],
                            collate_fn=run.collate, num_workers=t.dataloader_num_workers)
        it = iter(loader)
        for s in range(first, run.steps_per_epoch):
            if st.global_step >= run.total_steps:
                break
            # ---- one optimizer step: gradient_accumulation_steps micro-batches on every process, token-weighted
            step = training_step.accumulate(run.loss, [next(it) for _ in range(ga)], acc.backward,
                                       [plan.micro_seed(t.seed, ep, s * group + m * world + rank)
                                        for m in range(ga)], world=world, device=run.device)
            if world > 1:
                step = training_step.all_reduce_step(run.params, step)
            norm = optimizer_step(run, step.loss)
            interval.dropped += step.dropped
            interval.samples += step.samples
            if norm is not None:
                grad_norm = norm
                interval.loss += step.loss
                interval.per_codebook += step.per_codebook
                interval.steps += 1
            # a skipped (NaN) first step still advances the schedule
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            st.global_step += 1
            st.step_in_epoch = s + 1
            st.epoch = ep + (s + 1) / run.steps_per_epoch
            bar.update(1)
            gs = st.global_step
            run.clock.step()

            # ---- log, validate, checkpoint
            if gs % t.logging_steps == 0 or gs == run.total_steps:
                log_interval(run, interval, grad_norm, bar)
                interval = run_log.Interval.start(run.device, run.info.num_codebooks)
                run.clock.lap("logging")
            if gs % run.eval_every == 0 or gs == run.total_steps:
                last_eval = gs
                if validate_and_track(run):
                    run.stop_reason = (f"early stopping: no held-out improvement in "
                                       f"{t.early_stopping_patience} validations")
                run.clock.lap("validation")
            take_samples(run)
            if (gs % run.save_every == 0 or gs == run.total_steps or run.stop_reason
                    or timer.due_everywhere(acc.num_processes, run.device)):
                if run.main:
                    checkpoints.save_checkpoint(run.out / "checkpoints", run.model, run.optimizer,
                                                run.scheduler, acc.scaler, run.cfg,
                                                run.snapshot("checkpoint"), t.save_total_limit)
                acc.wait_for_everyone()
                timer.reset()
                run.clock.lap("checkpoints")
            if run.stop_reason:
                break
        else:
            st.data_epoch = ep + 1
            st.step_in_epoch = 0
    bar.close()
    if last_eval != st.global_step:
        validate_and_track(run)
        run.clock.lap("validation")


def take_samples(run: Run) -> None:
    """The samples of this step when they are due (training.sample_every): the main process
    generates, the others wait."""
    st = run.state
    if run.sampler is not None and run.sampler.due(st.global_step, run.total_steps):
        if run.main:
            run.sampler.render(run.model, run.processor, run.info, st.global_step, st.epoch, run.runlog)
        run.acc.wait_for_everyone()
        run.clock.lap("samples")


def optimizer_step(run: Run, loss_sum):
    """The update after accumulation, guarded against a non-finite loss (the one host sync per
    optimizer step): clip and step, returning the gradient norm (a tensor; 0 when clipping is off);
    or skip, count, and stop the run after training.max_nan_steps in a row, returning None."""
    import torch

    t, st = run.cfg.training, run.state
    if not bool(torch.isfinite(loss_sum)):
        st.nan_steps_total += 1
        st.nan_in_a_row += 1
        log.warning("step %d: non-finite loss (%s); optimizer step skipped (%d in a row, %d in total)",
                    st.global_step + 1, float(loss_sum), st.nan_in_a_row, st.nan_steps_total)
        if st.nan_in_a_row >= t.max_nan_steps:
            raise UserError(
                f"Training stopped: the loss was NaN/inf in {st.nan_in_a_row} optimizer steps in a row "
                f"(training.max_nan_steps = {t.max_nan_steps}). Try a lower --learning_rate (now "
                f"{t.learning_rate}), --mixed_precision bf16 instead of fp16 (or no), a smaller "
                f"--max_grad_norm, and check the data with {script_command('test_dataset.py')} "
                f"--data_dir {shown_path(run.cfg.data.data_dir)}.")
        return None
    st.nan_in_a_row = 0
    norm = torch.zeros((), device=run.device)
    if t.max_grad_norm > 0:
        norm = run.acc.clip_grad_norm_(run.params, t.max_grad_norm)
    run.optimizer.step()
    return norm


def log_interval(run: Run, interval: run_log.Interval, grad_norm, bar) -> None:
    st = run.state
    gs, n = st.global_step, max(1, interval.steps)
    entry = {"step": gs, "epoch": round(st.epoch, 4),
             "loss": (interval.loss / n).item() if interval.steps else float("nan"),
             "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
             "nan_steps_total": st.nan_steps_total, "samples": interval.samples,
             "null_cond_frac": interval.dropped / max(1, interval.samples),
             "steps_per_s": interval.steps / max(1e-9, time.time() - interval.since)}
    entry.update({f"loss_cb{k}": v / n for k, v in enumerate(interval.per_codebook.tolist())})
    run.runlog.add(entry, "train")
    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
    log.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | grad norm %.3f | %.2f steps/s%s", gs, run.total_steps,
             st.epoch, entry["loss"], entry["lr"], entry["grad_norm"], entry["steps_per_s"],
             f" | {st.nan_steps_total} NaN steps skipped" if st.nan_steps_total else "")


def heldout(run: Run) -> dict:
    """The held-out loss of the model as it is (lora.training.step.heldout_loss)."""
    res = training_step.heldout_loss(run.model, run.processor, run.info, run.valid_ds, run.collate,
                                     run.cfg.training.batch_size, run.device, run.acc.autocast,
                                     run.cache_text, run.acc.process_index, run.acc.num_processes)
    model_prep.set_train_mode(run.model, run.cache_text)
    return res


def track_base(run: Run, res: dict) -> None:
    """The base model's held-out loss, measured at a resume onto other held-out clips."""
    st = run.state
    st.base_val_loss = res["val_loss"]
    run.runlog.add({"step": st.global_step, "epoch": round(st.epoch, 4), **res, "base": True}, "eval")
    log.info("step %d: held-out loss of the base model %.4f on the new held-out clips",
             st.global_step, res["val_loss"])


def validate_and_track(run: Run) -> bool:
    """Validate, log, keep best_model; returns True when early stopping says stop."""
    t, st, info = run.cfg.training, run.state, run.info
    res = heldout(run)
    entry = {"step": st.global_step, "epoch": round(st.epoch, 4), **res}
    if st.base_val_loss is None:
        st.base_val_loss = res["val_loss"]
        entry["base"] = True
    run.runlog.add(entry, "eval")
    improved = st.best_metric is None or res["val_loss"] < st.best_metric
    log.info("step %d: held-out loss %.4f (ppl %.2f) per codebook [%s]%s", st.global_step,
             res["val_loss"], res["val_ppl"],
             ", ".join(f"{res[f'val_loss_cb{k}']:.3f}" for k in range(info.num_codebooks)),
             " (best so far)" if improved else "")
    if improved:
        st.best_metric, st.best_step, st.evals_without_improvement = res["val_loss"], st.global_step, 0
        if run.main:
            save_adapter(run, "best_model", res)
    else:
        st.evals_without_improvement += 1
    if run.main:
        run.runlog.plot(st.base_val_loss)
    run.acc.wait_for_everyone()
    return bool(t.early_stopping_patience and st.evals_without_improvement >= t.early_stopping_patience)


def save_adapter(run: Run, kind: str, evaluation: dict) -> None:
    path, snap = run.out / kind, run.snapshot(kind)
    card = checkpoints.model_card(run.cfg, run.info, dict(snap, eval=evaluation), kind, len(run.train_ds),
                               run.train_seconds / 3600, path)
    checkpoints.save_adapter(path, run.model, run.cfg, snap, evaluation, card)


# ============================================================================================
# Save
# ============================================================================================
def finish(run: Run) -> None:
    st = run.state
    final_eval = next(h for h in reversed(st.log_history) if "val_loss" in h)
    if run.main:
        save_adapter(run, "final_model", final_eval)
        run.runlog.plot(st.base_val_loss)
    run.runlog.close()
    run.acc.wait_for_everyone()
    run.clock.lap("final save")
    log.info("Where the time went: %s", run.clock.line())
    if run.main:  # read by bench/bench_train.py --cold_start
        atomic_write_json(run.out / "logs" / "timing.json", run.clock.report())
    if run.stop_reason:
        log.info("Stopped: %s", run.stop_reason)
    log.info("Done in %d steps. Held-out loss: base %.4f -> best %.4f (step %s) -> final %.4f%s. "
             "Adapter: %s", st.global_step, st.base_val_loss, st.best_metric, st.best_step,
             final_eval["val_loss"], resume.heldout_note(st.log_history), run.out / "best_model")
    log.info("Listen: %s --base_model_path %s --lora_model_path %s --prompts \"...\"",
             script_command("inference_lora.py"), shown_model(run.cfg.model.model_path),
             shown_path(run.out / "best_model"))


if __name__ == "__main__":
    sys.exit(run_main(main))
