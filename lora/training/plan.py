"""The run's plan: how many optimizer steps, how often to validate / save / log (``auto_interval``),
the seeds of micro-batches (data order and dropout depend on (seed, epoch, index) only), and the
train/held-out split.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from lora.common.cli import UserError, script_command, shown_path
from lora.config import Config


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
    if n is None or n < 1:
        return (f"{key} must be 'auto' (about {AUTO_PER_RUN} per run) or a whole number of "
                f"optimizer steps, at least 1 (got {value!r})")
    return None


def resolve_every(value, total_steps: int) -> tuple[int, bool]:
    """(interval in optimizer steps, whether it came from 'auto') of a checked eval_steps /
    save_steps setting."""
    if str(value).strip().lower() == "auto":
        return auto_interval(total_steps), True
    return int(str(value).strip()), False


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
        return (f"every {steps} steps ({key} {how}, {len(events_in_run(steps, total_steps))} in "
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
