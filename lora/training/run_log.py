"""The run's log: metrics.jsonl, TensorBoard, loss_curve.png (``RunLog``), where the wall time went
(``PhaseClock``, logs/timing.json), and the training statistics since the last log line
(``Interval``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.files import atomic_path, atomic_write_text
from lora.scoring.plots import loss_figure

if TYPE_CHECKING:
    import torch


class PhaseClock:
    """Where a run's wall time goes, from the process start to the last file written: the set-up
    phases in order (``lap``), then the train loop's steps (``step``: the first apart, then the
    steady ones) and the time spent validating and checkpointing between them. ``report()`` is the
    table train_lora.py logs and writes to logs/timing.json, and bench/bench_train.py --cold_start
    reads."""

    def __init__(self, started: float):
        # process start, time.time() scale (lora.common.cli.process_start_time)
        self.started = started
        self.phases: dict[str, float] = {}
        self.steps: list[float] = []
        self.mark = time.time()
        self.phases["start-up"] = self.mark - started

    def lap(self, name: str) -> float:
        """Close the phase that ran since the last lap (or the start-up) under ``name``; its
        seconds."""
        now = time.time()
        seconds = now - self.mark
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.mark = now
        return seconds

    def step(self) -> None:
        """One optimizer step ended (since the last lap)."""
        now = time.time()
        self.steps.append(now - self.mark)
        self.mark = now

    def report(self) -> dict:
        out = {k: round(v, 3) for k, v in self.phases.items()}
        if self.steps:
            out["first step"] = round(self.steps[0], 3)
            rest = self.steps[1:]
            out["steady step"] = round(statistics.median(rest), 3) if rest else None
            out["steady steps"] = len(rest)
            out["all steps"] = round(sum(self.steps), 3)
        out["total"] = round(time.time() - self.started, 3)
        return out

    def line(self) -> str:
        r = self.report()
        parts = [f"{k} {r[k]:.1f} s" for k in self.phases]
        if self.steps:
            parts.append(f"first step {r['first step']:.1f} s")
            if r["steady step"] is not None:
                parts.append(f"steady step {r['steady step']:.2f} s (median of {r['steady steps']})")
        return " | ".join(parts) + f" | total {r['total']:.1f} s"


# ============================================================================================
# Logs
# ============================================================================================
class RunLog:
    """metrics.jsonl, TensorBoard and loss_curve.png under output_dir/logs (main process only)."""

    def __init__(self, logs_dir: Path, history: list[dict], enabled: bool,
                 resumed_at: Optional[int] = None):
        """``resumed_at``: the step of the checkpoint a resumed run starts from (None: a fresh
        run)."""
        self.dir, self.history, self.enabled = logs_dir, history, enabled
        self.tb = None
        if enabled:
            logs_dir.mkdir(parents=True, exist_ok=True)
            # Rewrite metrics.jsonl from the (restored) history: lines past a resumed checkpoint are
            # dropped.
            atomic_write_text(logs_dir / "metrics.jsonl",
                              "".join(json.dumps(h) + "\n" for h in history))
            from torch.utils.tensorboard import SummaryWriter

            # The same for TensorBoard: its events past the checkpoint (all of them for a fresh run
            # over an earlier run's logs) are purged, so no step shows twice.
            purge = 0 if resumed_at is None else resumed_at + 1
            self.tb = SummaryWriter(log_dir=str(logs_dir), purge_step=purge)

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

    def event(self, entry: dict) -> None:
        """A line of the run's history that is not a measurement (a resume that changed the run):
        metrics.jsonl and trainer_state.json, not TensorBoard."""
        self.history.append(entry)
        if self.enabled:
            with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")

    def plot(self, base_loss) -> None:
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        fig = loss_figure(self.history, base_loss)
        with atomic_path(self.dir / "loss_curve.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class Interval:
    """Training statistics since the last log line (device tensors: no host sync per step)."""

    loss: object
    per_codebook: object
    steps: int = 0
    dropped: int = 0
    samples: int = 0
    since: float = field(default_factory=time.time)

    @classmethod
    def start(cls, device: torch.device, num_codebooks: int) -> "Interval":
        import torch

        return cls(loss=torch.zeros((), device=device),
                   per_codebook=torch.zeros(num_codebooks, device=device))
