"""How often the evaluation's summary names a winner: simulated evaluations run through the
evaluation's own functions (lora.scoring.null_simulation), with no true difference (the share must
be at most 5%) and with one (the share that finds it).

    python bench/bench_verdicts.py                  # every scenario, 2000 evaluations each
    python bench/bench_verdicts.py --n 500 --only defaults

Writes bench/results/verdicts.json and prints a table for BENCHMARKS.md ("Evaluation verdicts").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENARIOS = {
    # name: (Scenario keyword arguments, what it shows)
    "defaults": ({}, "8 prompts x 2 seeds (seeds of a prompt correlate at 0.8), 10 recordings x 3 "
                     "clips, CLAP; no difference"),
    "seeds_rho_0.5": ({"rho": 0.5}, "the same, seeds correlated at 0.5"),
    "independent_seeds": ({"rho": 0.0}, "the same, independent seeds"),
    "16_prompts": ({"prompts": 16}, "16 prompts x 2 seeds (random sign patterns, not all 2^15)"),
    **{f"{r}_recordings": ({"recordings": r, "generation": False},
                           f"held-out likelihood alone, {r} recordings x 3 clips")
       for r in (2, 3, 5, 6, 7, 10)},
    "2_recordings_with_generation": ({"recordings": 2}, "defaults with 2 recordings"),
    "pairs_as_units": ({"units": "clip/pair"}, "the mistake: every clip and (prompt, seed) pair "
                                               "taken as independent"),
    "effect_0.3": ({"effect": 0.3}, "a true difference (LoRA better), small"),
    "effect_0.6": ({"effect": 0.6}, "a true difference (LoRA better), larger"),
}
# scenarios run with a quarter of --n: they are slow (random sign patterns) or need no precision
QUARTER = {"pairs_as_units", "16_prompts", "effect_0.3", "effect_0.6"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="simulated evaluations per scenario")
    ap.add_argument("--only", nargs="*", help="scenario names (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "verdicts.json"))
    a = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from lora.scoring import null_simulation as ns

    out = {"n": a.n, "machine": os.uname().machine, "date": time.strftime("%Y-%m-%d"), "scenarios": {}}
    with threadpool_limits(1):
        for name, (kw, what) in SCENARIOS.items():
            if a.only and name not in a.only:
                continue
            t0 = time.perf_counter()
            n = max(1, a.n // 4) if name in QUARTER else a.n
            r = ns.run(ns.Scenario(**kw), n, seed=1)
            r.update(what=what, seconds=time.perf_counter() - t0,
                     upper_95=min(1.0, r["any_winner"] + 1.96 * r["mc_error"]) if r["any_winner"] else
                     3.0 / n)
            out["scenarios"][name] = r
            print(f"{name:30s} any winner {100 * r['any_winner']:5.2f}% +- {100 * r['mc_error']:.2f} "
                  f"(95% upper {100 * r['upper_95']:.2f}%), LoRA named {100 * r['lora_named']:5.1f}%, "
                  f"{r['seconds']:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print("| scenario | what | evaluations | any winner (MC s.e.) | LoRA named |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in out["scenarios"].items():
        print(f"| {name} | {r['what']} | {r['n']} | {100 * r['any_winner']:.2f}% "
              f"({100 * r['mc_error']:.2f}) | {100 * r['lora_named']:.1f}% |")
    return 0 if math.isfinite(sum(r["any_winner"] for r in out["scenarios"].values())) else 1


if __name__ == "__main__":
    sys.exit(main())
