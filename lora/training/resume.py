"""What a resume may change: ``--resume_from_checkpoint`` continues the run its checkpoint belongs to,
so this command's settings are compared with the run's (the checkpoint's config.yaml and
trainer_state.json) before anything trains.

- Refused, naming each difference: another base model (its identity: the whole config, tokenizer and
  weight files), another LoRA shape (any key of the lora section: rank, alpha, targets, ...), and
  another optimizer or schedule (learning_rate, weight_decay, lr_scheduler_type, warmup_steps: the
  optimizer and schedule state come from the checkpoint, so a new value would not take effect).
- Refused unless ``training.resume_with_changed_data``: other training clips, other held-out clips or
  another training window (max_duration), compared by content (each clip's id, caption and EnCodec
  codes), so a moved data folder is the same data. Allowed, the run's history marks the step where
  they changed (an ``"event": "resume"`` line in logs/metrics.jsonl and trainer_state.json); after a
  change of held-out clips the base model and the adapter are measured again on the new ones, and
  best_model is chosen among the validations on them only (a loss on other clips is another scale).
- Continued and said: more (or fewer, but not fewer than done) steps, with the learning-rate schedule
  re-planned for the new length from the step reached; any other setting (batch size, seed, precision,
  logging and saving cadence, ...) with each change named.

The run's config.yaml then holds the settings now in effect, with a header line saying where the run
resumed; what changed, and from what, is in its history.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log
from lora.common.fields import ConfigError, load_yaml
from lora.config import Config
from lora.training.checkpoints import Checkpoint, newest_checkpoint

if TYPE_CHECKING:
    from lora.dataset import CachedClip
    from lora.modeling.musicgen import ModelInfo

DATA_FLAG = "--resume_with_changed_data"
# training settings the optimizer / scheduler state of the checkpoint fixes
SCHEDULE_KEYS = ("learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps")
# settings that say how to start, not what the run is
NOT_COMPARED = {("training", "resume_from_checkpoint"), ("training", "overwrite_output_dir"),
                ("training", "fp16"), ("training", "bf16"), ("training", "max_steps"),
                ("training", "num_epochs"), ("training", "resume_with_changed_data"),
                ("model", "model_path"), ("model", "revision"), ("model", "tiny_model_dir"),
                ("model", "local_files_only")}
# of the data section, only where the clips are read from belongs to the run (the rest is
# prepare_data's)
DATA_KEYS = ("data_dir", "metadata_file")


@dataclass
class ResumePlan:
    """What this resume changes in the run (filled step by step: settings, model, data, length)."""

    checkpoint: Path
    changed: dict = field(default_factory=dict)   # "section.key" -> [the run's, now]
    total_steps: Optional[list] = None            # [the run's, now] when the length changed
    train_changed: bool = False
    heldout_changed: bool = False
    data_note: str = ""
    run_model: Optional[str] = None               # the run's --model_path, as it was given

    @property
    def any(self) -> bool:
        return bool(self.changed or self.total_steps or self.train_changed or self.heldout_changed)


def _run_config(ck: Checkpoint) -> dict:
    try:
        return load_yaml(ck.path / "config.yaml")
    except ConfigError as e:
        raise UserError(f"{ck.path / 'config.yaml'} cannot be read ({e}): without it the settings of "
                        f"the run cannot be compared with this command's. Resume from another "
                        f"checkpoint, or start a new run.") from None


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (str, type(None), bool)) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def check_settings(cfg: Config, ck: Checkpoint) -> ResumePlan:
    """Compare this command's settings with the run's, before anything loads: UserError naming every
    key that cannot change (the lora section, the optimizer and schedule); the other differences
    are kept to be said and recorded."""
    run_cfg = _run_config(ck)
    now = cfg.to_dict()
    plan, refused = ResumePlan(checkpoint=ck.path), []
    plan.run_model = (run_cfg.get("model") or {}).get("model_path")
    for section in ("lora", "training", "model", "data"):
        before = run_cfg.get(section) or {}
        for key, value in now[section].items():
            if (section, key) in NOT_COMPARED or key not in before or before[key] == value:
                continue
            if section == "data" and key not in DATA_KEYS:
                continue
            what = f"{section}.{key}: the run has {_shown(before[key])}, this command {_shown(value)}"
            if section == "lora" or (section == "training" and key in SCHEDULE_KEYS):
                refused.append(what)
            else:
                plan.changed[f"{section}.{key}"] = [before[key], value]
    if refused:
        raise UserError(
            f"--resume_from_checkpoint {ck.path}: this command differs from the run in what a resume "
            f"cannot change:\n  " + "\n  ".join(refused) + "\nThe LoRA shape is the adapter's, and "
            f"the optimizer and learning-rate schedule continue from the checkpoint. Give the run's "
            f"values (its settings: {ck.path / 'config.yaml'}), or start a new run in another "
            f"--output_dir.")
    return plan


def check_model(plan: ResumePlan, ck: Checkpoint, info: ModelInfo) -> None:
    """UserError when the base model loaded is not the run's (by identity when the checkpoint
    records it, else by path)."""
    before_id, before_name = ck.state.get("base_identity"), ck.state.get("base_model")
    same = before_id == info.identity if before_id else before_name in (None, info.name_or_path)
    if not same:
        raise UserError(f"--resume_from_checkpoint {ck.path}: the run trained on the base model "
                        f"{before_name}, this command loads {info.name_or_path}"
                        + (" (the same path, other files)" if before_name == info.name_or_path else "")
                        + ". An adapter continues on the base it was trained on: pass --model_path "
                          f"{plan.run_model or before_name}, or start a new run in another "
                          f"--output_dir.")


def data_identity(clips: list[CachedClip], window_frames: int, data_dir: str) -> dict:
    """The run's data by content: per split a hash of every clip's id, caption and EnCodec codes,
    the clip count, and the training window (frames); where it was read from, for messages."""
    out: dict = {"data_dir": str(data_dir), "window_frames": int(window_frames)}
    for split in ("train", "valid"):
        h = hashlib.sha256()
        mine = sorted((c for c in clips if c.split == split), key=lambda c: c.id)
        for c in mine:
            h.update(f"{c.id}\0{c.text}\0{tuple(c.codes.shape)}\0".encode("utf-8"))
            h.update(c.codes.contiguous().cpu().numpy().tobytes())
        out[split] = {"clips": len(mine), "sha256": h.hexdigest()[:16]}
    return out


def check_data(plan: ResumePlan, ck: Checkpoint, now: dict, allowed: bool) -> None:
    """Compare the clips (and the window) with the run's: UserError naming what differs unless
    ``allowed``, else mark them changed."""
    before = ck.state.get("data")
    if not isinstance(before, dict):
        log.warning("%s does not record the run's data (written by an older version): the data "
                    "cannot be compared with the run's", ck.path / "trainer_state.json")
        return
    diffs = []
    window = before.get("window_frames") != now["window_frames"]
    if window:
        diffs.append(f"training window: {before.get('window_frames')} frames before, "
                     f"{now['window_frames']} now (training.max_duration)")
    for split, name in (("train", "training clips"), ("valid", "held-out clips")):
        b, n = before.get(split) or {}, now[split]
        other = b.get("sha256") != n["sha256"]
        if other:
            diffs.append(f"{name}: {b.get('clips')} in {before.get('data_dir')} before, "
                         f"{n['clips']} in {now['data_dir']} now, not the same clips")
        if split == "train":
            plan.train_changed = window or other
        else:
            plan.heldout_changed = window or other
    if not diffs:
        return
    plan.data_note = "; ".join(diffs)
    if not allowed:
        raise UserError(
            f"--resume_from_checkpoint {ck.path}: the data is not the run's:\n  " + "\n  ".join(diffs)
            + f"\nResuming would train the run's adapter on other clips and draw held-out losses "
              f"of different clips as one curve. Give the run's data (--data_dir "
              f"{before.get('data_dir')}), start a new run (another --output_dir), or pass "
              f"{DATA_FLAG} to continue on this data: the run's history then marks the step where "
              f"it changed.")
    log.warning("%s: continuing on changed data (%s); the run's history marks it at step %s",
                DATA_FLAG, plan.data_note, ck.state.get("global_step"))


def check_length(plan: ResumePlan, ck: Checkpoint, total_steps: int) -> None:
    """More steps continue (the schedule re-planned for the new length); fewer than done are
    refused."""
    done, before = ck.state.get("global_step", 0), ck.state.get("total_steps")
    if total_steps < done:
        raise UserError(f"--resume_from_checkpoint {ck.path}: the run is at step {done}, but this "
                        f"command plans {total_steps} steps in all. Ask for more (--max_steps or "
                        f"--num_epochs), or use the run's final_model / best_model as they are.")
    if isinstance(before, int) and before != total_steps:
        plan.total_steps = [before, total_steps]


def apply(plan: ResumePlan, run, ck_state: dict) -> None:
    """Say what this resume changes in ``run`` (train_lora.py's Run, its checkpoint loaded), record
    it in the run's history, re-plan the learning rate for a new length from the step reached, and
    start a new held-out baseline when the held-out clips changed."""
    state = run.state
    if ck_state.get("precision") not in (None, run.precision):
        plan.changed["precision"] = [ck_state["precision"], run.precision]
    if plan.total_steps:
        sched = run.scheduler  # (a LambdaLR: its lambdas are this run's, the step the checkpoint's)
        before = sched.get_last_lr()[0]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(run.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
        log.info("The run continues to step %d (it was planned for %d): the learning-rate schedule "
                 "is re-planned for %d steps from step %d (lr %.3g -> %.3g)", run.total_steps,
                 plan.total_steps[0], run.total_steps, state.global_step, before, lrs[0])
    for key, (before, now) in plan.changed.items():
        log.info("Resuming with %s %s (the run had %s)", key, _shown(now), _shown(before))
    if not plan.any:
        return
    if plan.heldout_changed:  # losses on other clips are another scale: a new baseline and best
        state.base_val_loss = state.best_metric = state.best_step = None
        state.evals_without_improvement = 0
    run.runlog.event({"step": state.global_step, "epoch": round(state.epoch, 4), "event": "resume",
                      "checkpoint": str(plan.checkpoint), "changed": plan.changed,
                      **({"total_steps": plan.total_steps} if plan.total_steps else {}),
                      "train_data_changed": plan.train_changed,
                      "heldout_changed": plan.heldout_changed,
                      **({"data": plan.data_note} if plan.data_note else {})})


def config_note(plan: Optional[ResumePlan], step: int) -> str:
    """The header line of the run's config.yaml after a resume."""
    if plan is None:
        return ""
    what = "what changed is" if plan.any else "nothing changed; its history is"
    return (f"resumed at step {step} from {plan.checkpoint}; these are the settings in effect since "
            f"then ({what} in logs/metrics.jsonl)")


def measure_base(model, measure) -> dict:
    """The base model's held-out loss at a resume onto new held-out clips: ``measure()`` with the
    adapter switched off (peft's ``disable_adapter``)."""
    with model.disable_adapter():
        return measure()


def heldout_note(history: list[dict]) -> str:
    """For the run's closing line: where the held-out clips last changed, if they did."""
    step = next((h["step"] for h in reversed(history) if h.get("heldout_changed")), None)
    return "" if step is None else (f" (on the held-out clips used since step {step}, where the "
                                    f"data changed)")


def interrupt_note(out: Path, save_every: int, save_minutes: float) -> str:
    """What Ctrl-C leaves behind in the run folder, and how to go on from there."""
    ck = newest_checkpoint(out)
    if ck is None:
        return (f"no checkpoint was saved yet (every {save_every} steps or {save_minutes:g} "
                f"minutes): run the same command again to start over (add --overwrite_output_dir "
                f"if it says best_model/ holds trained steps), or save more often with --save_steps "
                f"/ --save_minutes")
    return (f"the newest checkpoint is {ck} (step {ck.name[5:].lstrip('0') or 0}); continue with "
            f"the same command plus --resume_from_checkpoint latest")
