"""train_lora.py's whole cold start, this working tree against another git revision, in alternating
fresh processes.

    python bench/cold_start_ab.py --against HEAD~1 --data_dir /tmp/cs/data --model /tmp/peer/models/small-arch
    python bench/cold_start_ab.py --against e6a0215 --rounds 4 --steps 12 --json bench/results/cold_start_ab.json

A change to the set-up, the token cache or the step moves the whole process by a few percent, less
than this kind of VM's drift between two runs minutes apart (BENCHMARKS.md). So both sides run the
same command in turn (this tree, the revision, this tree, ...), each a fresh process with an empty
token cache (a cold start: the cache is deleted before every run; the data itself is copied once
into a scratch folder and never touched), and each pair gives one ratio. Per run: wall time, the
process's own user and system CPU time, minor page faults and peak resident memory (os.wait4), and
train_lora.py's own breakdown (logs/timing.json). The revision is checked out in a temporary git
worktree, removed at the end. Run nothing else meanwhile.

--data_dir: a prepared data folder (prepare_data.py's output: metadata.json + clips), e.g. the peer
bench's 40 x 10-s clips after ``python lora/prepare_data.py --input_dir /tmp/peer/data --output_dir
/tmp/cs/data``; default: the synthetic example dataset. --model: a model folder, tiny
(train_lora.py's built-in test model: a smoke run), or a bench/musicgen_arch.py name (small, medium,
large: random weights, built once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

PHASES = ("token cache", "LoRA set-up", "base held-out loss", "first step", "steady step", "total")


def run_once(root: Path, model: str, data: Path, out: Path, steps: int) -> dict:
    """One cold start of ``root``'s train_lora.py: wall, CPU times, page faults, peak memory,
    timing.json."""
    shutil.rmtree(data / "cache", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(root / "lora" / "train_lora.py"), "--model_path", model,
           "--data_dir", str(data),
           "--output_dir", str(out), "--batch_size", "2", "--gradient_accumulation_steps", "1",
           "--max_steps",
           str(steps), "--eval_steps", "100000", "--save_steps", "100000", "--seed", "1"]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train_lora.py of {root} failed: see {log}\n" + log.read_text()[-2000:])
    timing = json.loads((out / "logs" / "timing.json").read_text())
    return {"wall_s": round(wall, 2), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "minor_faults": ru.ru_minflt, "peak_rss_mb": round(ru.ru_maxrss / 1024), "timing": timing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="git revision to compare this working tree with")
    ap.add_argument("--model", default="small", help="model folder, 'tiny' (the built-in test "
                    "model), or small / medium / large (random weights with that architecture)")
    ap.add_argument("--data_dir", default=None,
                    help="prepared data folder (default: the synthetic example)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side (A B A B ...)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--json", default=None, help="also write the runs to this JSON file")
    args = ap.parse_args(argv)

    import machine
    from musicgen_arch import model_path

    model = model_path(args.model)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against], check=True,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="cold-ab-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        if args.data_dir:
            shutil.copytree(args.data_dir, data, ignore=shutil.ignore_patterns("cache"))
        else:
            subprocess.run([sys.executable, str(ROOT / "lora" / "prepare_data.py"), "--create_example",
                            "--output_dir", str(data)], check=True, capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "rev"),
                        rev], check=True,
                       capture_output=True)
        sides = {"this tree": ROOT, rev: tmp / "rev"}
        runs = {name: [] for name in sides}
        try:
            if Path(model).is_dir():
                machine.read_folder_once(model)  # a process cold start, not a disk one
            for r in range(args.rounds):
                for name, root in sides.items():
                    runs[name].append(run_once(root, model, data, tmp / f"out{len(runs[name])}",
                                               args.steps))
                    print(f"round {r + 1}, {name}: {runs[name][-1]['wall_s']:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "rev")],
                           capture_output=True)

    m = machine.describe()
    command = "python bench/cold_start_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ntrain_lora.py cold start, {args.steps} steps, batch 2, {args.rounds} rounds A B A B "
          f"| {m['cpu']}, {m['cores']} cores, torch {m['torch']} | "
          f"{time.strftime('%Y-%m-%d %H:%M')} | `{command.strip()}`\n")
    print(f"| median of {args.rounds} | this tree | {rev} |\n|---|---:|---:|")
    rows = [("whole process (wall), s", "wall_s", ".1f"), ("user CPU, s", "user_s", ".1f"),
            ("system CPU, s", "sys_s", ".1f"), ("minor page faults", "minor_faults", ",.0f"),
            ("peak resident memory, MB", "peak_rss_mb", ".0f")]
    a, b = runs["this tree"], runs[rev]
    for label, key, fmt in rows:
        va, vb = statistics.median(x[key] for x in a), statistics.median(x[key] for x in b)
        print(f"| {label} | {va:{fmt}} | {vb:{fmt}} |")
    for ph in PHASES:
        va, vb = [x["timing"].get(ph) for x in a], [x["timing"].get(ph) for x in b]
        if None not in va + vb:
            print(f"| {ph}, s | {statistics.median(va):.2f} | {statistics.median(vb):.2f} |")
    ratios = [x["wall_s"] / y["wall_s"] for x, y in zip(a, b)]
    print(f"\nwall, this tree / {rev}, pair by pair: " + ", ".join(f"{q:.3f}" for q in ratios)
          + f" (median {statistics.median(ratios):.3f})")
    if args.json:
        machine.save_json(args.json,
                          {"machine": m, "command": command.strip(), "against": rev, "steps": args.steps,
                                      "runs": runs, "wall_ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
