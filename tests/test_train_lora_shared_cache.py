"""train_lora.py under torchrun: the processes share the token cache build (each encodes about
half), the cache they make is the one-process cache byte for byte, the first process's progress bar
counts both, and a process that fails leaves no shard (and nothing that looks valid); the next run
resumes and ends with the same cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "lora" / "train_lora.py"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1", "--batch_size", "2",
            "--gradient_accumulation_steps", "1", "--mixed_precision", "no", "--max_duration", "2",
            "--encode_batch_size", "2"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(SCRIPT), *args],
                          env=_env(), capture_output=True, text=True, timeout=600)


def _cache(data: Path) -> Path:
    (root,) = (data / "cache").iterdir()
    return root


def _files(root: Path) -> dict[str, bytes]:
    """Every file of the cache but its lock and index (whose stat keys name this copy's inodes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("join.lock", "index.json")}


def _settle() -> None:
    """Wait until the copied clips are older than the cache index's racy window
    (lora.dataprep.cache_store.settled), so both runs index every clip whatever the machine's load."""
    import time

    from lora.dataprep import cache_store

    time.sleep(cache_store.RACY_SECONDS + 0.2)


def _index_hashes(root: Path) -> dict[str, str]:
    import json

    return {k: v[5] for k, v in json.loads((root / "index.json").read_text())["files"].items()}


@pytest.mark.slow
def test_two_processes_share_the_build_and_make_the_one_process_cache(tmp_path, tiny_model_dir,
                                                                      example_data_dir):
    from lora import train_lora

    pytest.importorskip("torch.distributed.run")
    one, two = (shutil.copytree(example_data_dir, tmp_path / n, ignore=shutil.ignore_patterns("cache"))
                for n in ("one", "two"))
    _settle()
    assert train_lora.main(_args(tiny_model_dir, one, tmp_path / "out1")) == 0
    r = _torchrun(_args(tiny_model_dir, two, tmp_path / "out2"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _files(_cache(one)), _files(_cache(two))
    assert a == b and len(a) == 2 and all(k.startswith("shards/") for k in a)  # byte for byte
    assert _index_hashes(_cache(one)) == _index_hashes(_cache(two))
    # Each process encoded half (16 clips, 16 captions, batches of 2, every other batch), and the
    # first process's bars counted both.
    assert "encoded by rank: 0: 8 clip(s), 8 caption(s); 1: 8 clip(s), 8 caption(s)" in r.stderr
    assert "16 clip(s) encoded, 0 reused; 16 caption(s) encoded, 0 reused" in r.stderr
    assert re.search(r"encoding audio \(EnCodec\): 100%\|[^|]*\| 16/16", r.stderr)
    assert re.search(r"encoding captions \(text encoder\): 100%\|[^|]*\| 16/16", r.stderr)

    # A warm start under torchrun reads no clip file and encodes nothing.
    r = _torchrun(_args(tiny_model_dir, two, tmp_path / "out3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 clip(s) encoded, 16 reused; 0 caption(s) encoded, 16 reused" in r.stderr
    assert "clip file(s) read" not in r.stderr


@pytest.mark.slow
def test_a_failed_process_leaves_no_shard_and_the_next_run_resumes(tmp_path, tiny_model_dir,
                                                                   example_data_dir):
    from lora import train_lora
    from lora.dataprep import cache_store
    from lora.dataset import load_metadata

    pytest.importorskip("torch.distributed.run")
    one, two = (shutil.copytree(example_data_dir, tmp_path / n, ignore=shutil.ignore_patterns("cache"))
                for n in ("one", "two"))
    _settle()
    assert train_lora.main(_args(tiny_model_dir, one, tmp_path / "out1")) == 0
    # The last clip (batch 7 of 8: the second process's) cannot be decoded.
    bad = load_metadata(two)[-1].path
    good = bad.read_bytes()
    bad.write_bytes(b"RIFF-not-really-audio" * 10)
    r = _torchrun(_args(tiny_model_dir, two, tmp_path / "out2"))
    assert r.returncode != 0
    # the failed process names the file; the first stops with it (torchrun then adds its own report)
    assert f"error: {bad}: not a readable audio file (Error opening the file's bytes" in r.stderr
    assert "error: Process 1 of the token cache build failed: " in r.stderr or "SIGTERM" in r.stderr
    root = _cache(two)
    assert not cache_store.shard_files(root)
    # Every file a reader would list is whole (a part of the first process at most); nothing else
    # looks like a cache file.
    for p in cache_store.part_files(root):
        cache_store.CacheFile.open(p)
    assert {p.suffix for p in root.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".lock",
                                                                   ".tmp"}
    kept = sum(len(cache_store.CacheFile.open(p).entries) for p in cache_store.part_files(root))

    bad.write_bytes(good)
    r = _torchrun(_args(tiny_model_dir, two, tmp_path / "out3"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"(\d+) clip\(s\) encoded, (\d+) reused; (\d+) caption\(s\) encoded, (\d+) reused",
                  r.stderr)
    assert m and int(m[1]) + int(m[2]) == 16 and int(m[2]) + int(m[4]) == kept
    assert not cache_store.part_files(root)
    # Whole batches were kept: the rest are encoded in the batches the uninterrupted build made.
    assert _files(_cache(one)) == _files(root)
