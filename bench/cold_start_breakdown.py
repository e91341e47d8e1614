"""Where the time goes in one run of the peer bench (../shared/peer-bench/cold_start.sh), ours and
the peer's, side by side: one table from the run's logs.

    bash ../shared/peer-bench/cold_start.sh | tee /tmp/cold_start.txt
    python bench/cold_start_breakdown.py /tmp/cold_start.txt [--json bench/results/cold_start.json]

The input is cold_start.sh's output: its last line gives both whole-process times (measured outside
each process) and the logs folder. Ours: the run's logs/timing.json (train_lora.py's own clock,
lora.training.run_log.PhaseClock). The peer (HF's dreambooth_musicgen.py) has no such table: its
phases come from the timestamps of its log lines (1-s resolution) and the Trainer's own
train_runtime; its start is its end (the log's last write) minus its whole time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

LINE = re.compile(r"(\d+) steps, .*?ours (\d+) s, peer .*?(\d+) s, ratio ([\d.]+)x\s+\(logs: (\S+)\)")
STAMP = re.compile(r"^(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d) - ")


def parse_run(text: str) -> dict:
    m = None
    for line in text.splitlines():
        m = LINE.search(line) or m
    if m is None:
        raise SystemExit("no result line of cold_start.sh found (\"N steps, ... ours X s, peer Y "
                         "s, ratio Rx (logs: DIR)\"): pass the saved output of a finished run")
    return {"steps": int(m.group(1)), "ours_s": float(m.group(2)), "peer_s": float(m.group(3)),
            "ratio": float(m.group(4)), "logs": Path(m.group(5))}


def ours(logs: Path) -> dict:
    t = json.loads((logs / "out" / "logs" / "timing.json").read_text())
    steps = t.get("all steps", 0.0)
    return {"start-up (interpreter, imports, config)": t.get("start-up", 0.0),
            "model load": t.get("load", 0.0),
            "audio + text encoding (token cache)": t.get("token cache", 0.0),
            "LoRA set-up": t.get("LoRA set-up", 0.0) + t.get("other set-up", 0.0),
            "held-out loss (base, then final)": t.get("base held-out loss", 0.0)
            + t.get("validation", 0.0), "training steps": steps,
            "save and the rest": t["total"] - sum(t.get(k, 0.0) for k in (
                "start-up", "load", "token cache", "LoRA set-up", "other set-up", "base held-out loss",
                "validation")) - steps,
            "_first_step": t.get("first step"), "_steady_step": t.get("steady step")}


def peer(logs: Path, total: float) -> dict:
    log = logs / "peer.log"
    text = log.read_text(errors="replace")
    end = log.stat().st_mtime
    start = end - total

    def stamp(pattern: str):
        for line in text.splitlines():
            m = STAMP.match(line)
            if m and re.search(pattern, line):
                return time.mktime(datetime.strptime(m.group(1), "%m/%d/%Y %H:%M:%S").timetuple())
        return None

    first = stamp(r".")
    mapping = stamp(r"datasets\.|Map|map")
    lora = stamp(r"Modules with Lora")
    m = re.search(r"'train_runtime': ([\d.]+)", text)
    if first is None or lora is None or m is None:
        raise SystemExit(f"{log}: the peer's log lines this reads (first line, 'Modules with "
                         f"Lora', train_runtime) are missing")
    runtime = float(m.group(1))
    mapping = mapping if mapping is not None and first <= mapping <= lora else first
    # the log's stamps are whole seconds in local time; the first one (start-up) is at most 1 s
    # early
    return {"start-up (interpreter, imports, config)": first - start,
            "model load": None,
            "dataset load + model load": mapping - first,
            "audio encoding (datasets.map) + LoRA set-up": lora - mapping,
            "training steps (Trainer train_runtime; text encoded every step)": runtime,
            "save and the rest": total - (lora - start) - runtime}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="the saved output of cold_start.sh")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    saved = Path(a.output)
    if not saved.is_file():
        raise SystemExit(f"{saved}: not a file. Pass the saved output of cold_start.sh (e.g. `bash "
                         f"../shared/peer-bench/cold_start.sh | tee cold.log`, then cold.log), not "
                         f"its logs folder.")
    run = parse_run(saved.read_text())
    o, p = ours(run["logs"]), peer(run["logs"], run["peer_s"])
    import machine

    m = machine.describe()
    print(f"Peer bench, {run['steps']} steps, musicgen-small architecture, cold start | "
          f"{m['cpu']}, {m['cores']} cores | {time.strftime('%Y-%m-%d')} | ours "
          f"{run['ours_s']:.0f} s, peer {run['peer_s']:.0f} s, ratio {run['ratio']:.2f}x\n")
    print("| ours: phase | s | peer: phase | s |\n|---|---:|---|---:|")
    ok, pk = [k for k in o if not k.startswith("_")], [k for k in p if p[k] is not None]
    for i in range(max(len(ok), len(pk))):
        left = f"{ok[i]} | {o[ok[i]]:.1f}" if i < len(ok) else " | "
        right = f"{pk[i]} | {p[pk[i]]:.0f}" if i < len(pk) else " | "
        print(f"| {left} | {right} |")
    print(f"| **whole process** | **{run['ours_s']:.0f}** | **whole process** | "
          f"**{run['peer_s']:.0f}** |")
    if o["_first_step"] is not None:
        print(f"\nOurs: first step {o['_first_step']:.2f} s, steady step {o['_steady_step']:.2f} s "
              f"(median); the peer's {run['steps']} steps took "
              f"{p['training steps (Trainer train_runtime; text encoded every step)']:.0f} s "
              f"({p['training steps (Trainer train_runtime; text encoded every step)'] / run['steps']:.2f} s each).")
    if a.json:
        machine.save_json(a.json,
                          {"machine": m, "run": {k: str(v) for k, v in run.items()}, "ours": o,
                           "peer": p})
    return 0


if __name__ == "__main__":
    sys.exit(main())
