"""install.sh's torch step, without installing anything (--check): which torch it keeps and where,
and the warning before a second torch would go next to a CUDA torch of the box's own python that the
environment does not see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _check(python: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("CONDA_PYTHON_EXE", "TORCH_INDEX_URL")}
    e.update(PYTHON=python, VIRTUAL_ENV=str(Path(python).parent.parent), **env)
    return subprocess.run(["bash", str(ROOT / "install.sh"), "--check"], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_check_names_the_torch_it_keeps(tmp_path):
    import torch

    r = _check(sys.executable, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"torch: keeping the installed {torch.__version__}" in r.stdout
    assert str(Path(torch.__file__).parent) in r.stdout and "nothing was installed" in r.stdout
    assert "WARNING" not in r.stderr


def test_warns_before_a_second_torch_next_to_the_box_cuda_torch(tmp_path):
    """An empty venv on a rented box whose conda python has a CUDA torch: install.sh says so, with
    the fix, before it would install torch into the venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True, timeout=120)
    fake = tmp_path / "box" / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.5.1+cu124"\nclass version:\n    cuda = "12.4"\n')
    box_python = tmp_path / "box" / "python"
    box_python.write_text(f'#!/bin/sh\nPYTHONPATH="{fake.parent}" exec "{sys.executable}" "$@"\n')
    box_python.chmod(0o755)
    r = _check(str(tmp_path / "venv" / "bin" / "python"), tmp_path, CONDA_PYTHON_EXE=str(box_python),
               TORCH_INDEX_URL="https://download.pytorch.org/whl/cu124")
    assert r.returncode == 0, r.stderr
    assert f"WARNING: {box_python} has torch 2.5.1+cu124 (CUDA 12.4 build) at {fake}" in r.stderr
    assert "python3 -m venv --system-site-packages .venv" in r.stderr
    assert f"torch: none in {tmp_path / 'venv'}" in r.stdout
    assert "from https://download.pytorch.org/whl/cu124" in r.stdout and "nothing was installed" in r.stdout
