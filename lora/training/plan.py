"""The run's plan: how many optimizer steps, how often to validate / save / log (``auto_interval``),
the seeds of micro-batches (data order and dropout depend on (seed, epoch, index) only), and the
train/held-out split.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from lora.common.cli import UserError, clip_text, script_command, shown_path
from lora.config import MAX_EVENTS, Config
from lora.training import samples


# ============================================================================================
# The data plan
# ============================================================================================
def micro_seed(seed: int, epoch: int, micro_index: int) -> int:
    """Seed of the torch RNG for one global micro-batch (model/LoRA dropout): independent of process
    count."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(micro_index) * 104_729 + 17) % (2 ** 63 - 1)


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


# The schema sections train_lora.py takes flags from (the web UI's Train form checks with them)
TRAIN_SECTIONS = ("training", "model", "lora", "data")


def settings_problems(cfg: Config) -> list[str]:
    """train_lora.py's rules that span several settings (each value's own range is checked by the
    schema, lora.config); the web UI checks its Train form with them before it starts a run."""
    t = cfg.training
    p: list[str] = []
    if t.max_steps <= 0 and t.num_epochs <= 0:
        p.append("training.num_epochs must be > 0 (or set training.max_steps)")
    for key in ("eval_steps", "save_steps"):
        problem = every_problem(f"training.{key}", getattr(t, key))
        if problem:
            p.append(problem)
    if t.max_steps > 0 and not p:  # (with num_epochs, set_up checks once the steps are known)
        p.append(events_problem(t.max_steps, run_events(t, t.max_steps)))
    return [x for x in p if x] + samples.config_problems(cfg)


def run_events(t, total_steps: int) -> dict:
    """The run's every-N events: key -> interval in steps (``t``: the training section)."""
    return {"eval_steps": resolve_every(t.eval_steps, total_steps)[0],
            "save_steps": resolve_every(t.save_steps, total_steps)[0],
            "logging_steps": t.logging_steps}


# eval_steps / save_steps 'auto': about this many validations / checkpoints per run
AUTO_PER_RUN = 10


def auto_interval(total_steps: int, per_run: int = AUTO_PER_RUN) -> int:
    """The 'auto' interval of eval_steps / save_steps: total_steps / per_run, rounded to a whole
    step below 7.5 and to a multiple of 5 above (steps 10, 20, 30 of a 90-step run rather than 9,
    18, 27), at least 1."""
    x = total_steps / per_run
    if x < 7.5:
        return max(1, math.floor(x + 0.5))
    return 5 * math.floor(x / 5 + 0.5)


def every_problem(key: str, value) -> Optional[str]:
    """The problem with an eval_steps / save_steps setting ('auto' or a whole number >= 1), naming
    the key."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or not 1 <= n <= 10_000_000:
        return (f"{key} must be 'auto' (about {AUTO_PER_RUN} per run) or a whole number of "
                f"optimizer steps from 1 to 10000000 (got {clip_text(value, 40)!r})")
    return None


def resolve_every(value, total_steps: int) -> tuple[int, bool]:
    """(interval in optimizer steps, whether it came from 'auto') of a checked eval_steps /
    save_steps setting."""
    if str(value).strip().lower() == "auto":
        return auto_interval(total_steps), True
    return int(str(value).strip()), False


def count_events(every: int, total_steps: int) -> int:
    """How many times an every-N event happens in a run (each multiple of ``every``, and the last
    step), by arithmetic: a run of 10^12 steps is planned without a list of its steps."""
    return total_steps // every + (0 if total_steps % every == 0 else 1)


def events_problem(total_steps: int, settings: dict) -> Optional[str]:
    """The problem when a run would validate, checkpoint or log more than MAX_EVENTS times
    (``settings``: key -> interval in steps; each event keeps an entry in the run's history)."""
    for key, every in settings.items():
        n = count_events(int(every), int(total_steps))
        if n > MAX_EVENTS:
            return (f"training.{key} {every} over {total_steps:,} steps is {n:,} events, more than "
                    f"{MAX_EVENTS:,} (each one is kept in the run's history and logs). Use a larger "
                    f"{key} ('auto' = about {AUTO_PER_RUN} per run) or fewer steps.")
    return None


def events_in_run(every: int, total_steps: int) -> list[int]:
    """The optimizer steps at which an every-N event (validation, checkpoint) happens: each multiple
    of ``every`` and the last step."""
    steps = list(range(every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else steps + [total_steps]


class SaveTimer:
    """'A checkpoint at least every ``minutes`` of wall time' (training.save_minutes; 0 = never
    due)."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.seconds, self.clock = 60.0 * minutes, clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = self.clock()

    def due_everywhere(self, num_processes: int, device) -> bool:
        """``due()`` of the main process, for every process (they all save, or none)."""
        if self.seconds <= 0:
            return False
        due = self.due()
        if num_processes > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1.0 if due else 0.0], device=device)
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        return due


def cadence_text(t, total_steps: int, eval_every: int, save_every: int) -> str:
    """When a run validates and checkpoints (``t``: the training section), with what 'auto'
    resolved to."""

    def every(key, value, steps):
        auto = resolve_every(value, total_steps)[1]
        how = f"auto: about {AUTO_PER_RUN} per run" if auto else value
        return (f"every {steps} steps ({key} {how}, {count_events(steps, total_steps)} in "
                f"this run)")

    return (f"validation before the first step and "
            f"{every('eval_steps', t.eval_steps, eval_every)}; checkpoint "
            f"{every('save_steps', t.save_steps, save_every)}"
            + (f" and at least every {t.save_minutes:g} min" if t.save_minutes > 0 else ""))


def split_records(cfg: Config, records: list) -> tuple[list, list]:
    """(train records, valid records); UserError when either split is empty (training validates on
    held-out clips only, never on the training clips)."""
    train = [r for r in records if r.split == "train"]
    valid = [r for r in records if r.split == "valid"]
    if not train:
        raise UserError(f"No training clips (split 'train') in "
                        f"{cfg.data.data_dir}/{cfg.data.metadata_file}. Prepare data with: "
                        f"{script_command('prepare_data.py')} --input_dir YOUR_AUDIO --output_dir "
                        f"{shown_path(cfg.data.data_dir)}")
    if not valid:
        raise UserError(f"No held-out clips (split 'valid') in "
                        f"{cfg.data.data_dir}/{cfg.data.metadata_file}; training needs them to "
                        f"measure progress and pick best_model (it never validates on the training "
                        f"clips). Re-run prepare_data.py with --valid_fraction 0.1 (or higher), or "
                        f"mark some clips \"split\": \"valid\".")
    return train, valid
