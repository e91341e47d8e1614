"""Never lose, overwrite or silently change what the user has (training, generation, evaluation,
config side; tests/test_data_safety.py has prepare_data's). Where a case says nothing may change,
the user's files are checksummed before and after."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

TRAIN = ROOT / "lora" / "train_lora.py"


def _sums(folder: Path) -> dict:
    """Checksums of the files in ``folder`` (train_lora.py's hidden lock file, which holds no data,
    aside)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".train_lora.lock"}


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _train_args(tiny_model_dir, data_dir, out, *extra):
    own = {"--max_steps": "2", "--gradient_accumulation_steps": "1", "--eval_steps": "100",
           "--save_steps": "1",
           "--logging_steps": "1", "--mixed_precision": "no", "--max_duration": "1"}
    args = ["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out)]
    for flag, value in own.items():
        if flag not in extra:
            args += [flag, value]
    return args + [str(a) for a in extra]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root only); skipped with the reason where mounting is not permitted."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the "
                    f"disk-full cases need one")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)
