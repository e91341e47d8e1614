"""Every size a user controls is checked before anything is allocated (the schema's ranges,
lora/config.py's MAX_* bounds, the YAML reader's limits, the memory floors of lora/modeling/memory.py),
and every message shows the values cut to a sane length. Each case of the issue runs the real
script in a process limited to 3 GB of address space: before the bounds it died of MemoryError (or
was killed); now it ends at once with exit code 2 and one short message naming the setting."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

LIMIT = 3 * 2 ** 30


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _run(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "lora" / script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit, cwd=ROOT)


def _alias_bomb(path: Path) -> Path:
    """9^9 strings from 1 KB of YAML, inside a known key."""
    parts, prev = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'], "a"
    for name in "bcdefghi":
        parts.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    path.write_text("generation:\n  prompts: [" + ", ".join(parts) + "]\n", encoding="utf-8")
    return path


def _case(case: str, tmp: Path, tiny: Path, data: Path) -> tuple[str, list, str]:
    """(script, arguments, what the message must say) of each case."""
    gen = ["--base_model_path", tiny, "--lora_model_path", "none", "--duration", "0.5",
           "--output_dir", tmp / "gen"]
    train = ["--model_path", tiny, "--data_dir", data, "--output_dir", tmp / "out",
             "--mixed_precision", "no"]
    if case == "caption_as_prompt":
        return "inference_lora.py", gen + ["--prompts", "lofi " * 20_000], "characters long, more than 2,000"
    if case == "caption_in_metadata":
        meta = json.loads((data / "metadata.json").read_text())
        meta["clips"][0]["text"] = "lofi " * 20_000
        (data / "metadata.json").write_text(json.dumps(meta))
        return "train_lora.py", train + ["--max_steps", "1"], "characters long, more than 2,000"
    if case == "num_samples":
        return "inference_lora.py", gen + ["--prompts", "x", "--num_samples", 3_000_000_000], \
            "num_samples must be at most 1000"
    if case == "batch_size":
        return "test_model.py", ["--model_path", tiny, "--batch_size", 200_000], \
            "batch_size must be at most 4096"
    if case == "max_steps":
        return "train_lora.py", train + ["--max_steps", 10 ** 12, "--eval_steps", 1], \
            "max_steps must be at most 10000000"
    if case == "events":
        return "train_lora.py", train + ["--max_steps", 5_000_000, "--logging_steps", 1], \
            "5,000,000 events, more than 1,000,000"
    if case == "prompts_file":
        f = tmp / "prompts.txt"
        f.write_text("".join(f"prompt {i}\n" for i in range(20_000)))
        return "inference_lora.py", gen + ["--prompts_file", f], "at most 10,000 per run"
    if case == "seed":
        return "inference_lora.py", gen + ["--prompts", "x", "--seed", 2 ** 32 - 2, "--num_samples", 3], \
            "would use 4294967296"
    if case == "alias_bomb":
        return "inference_lora.py", ["--config", _alias_bomb(tmp / "bomb.yaml"), "--prompts", "x"], \
            "generation.prompts"
    raise AssertionError(case)


CASES = ["caption_as_prompt", "caption_in_metadata", "num_samples", "batch_size", "max_steps",
         "events", "prompts_file", "seed", "alias_bomb"]


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
@pytest.mark.parametrize("case", CASES)
def test_every_size_a_user_controls_is_bounded_before_anything_is_allocated(
        case, tmp_path, tiny_model_dir, example_data_dir):
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    script, args, expect = _case(case, tmp_path, tiny_model_dir, data)
    r = _run(script, *args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    assert expect in r.stderr, r.stderr[-3000:]
    assert len(r.stderr) < 20_000  # values are cut in messages (the alias bomb's is 2 GB whole)
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").glob("*.wav"))


def test_a_batch_beyond_the_machines_memory_is_refused_before_it_is_allocated(
        monkeypatch, tiny_model_dir, capsys):
    """The memory floor (lora/modeling/memory.py) against the machine: on a machine with 1 KB the
    tiny model's training step of 2 x 1 s cannot run, and test_model says so before the batch."""
    from lora import test_model
    from lora.modeling import memory

    monkeypatch.setattr(memory, "total_memory", lambda device: 1024)
    rc = test_model.main(["--model_path", str(tiny_model_dir), "--batch_size", "2", "--max_duration", "1",
                          "--mixed_precision", "no", "--skip_generation"])
    out = capsys.readouterr().out
    assert rc == 1 and "batch_size 2 x 1 s needs at least" in out and "memory (RAM)" in out, out
    assert "== training step" not in out  # refused before the batch was made
