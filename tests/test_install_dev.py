"""install.sh as the plan and the README use it: from inside lora/ (the plan's step 1), torch pinned
without importing it, and --dev installing what the whole suite needs, the web UI's browser tests
included, the README's test command being CI's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _run(args, cwd, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("CONDA_PYTHON_EXE", "TORCH_INDEX_URL")}
    e.update({"PYTHON": sys.executable, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent), **env})
    return subprocess.run([shutil.which("bash"), *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_install_from_inside_lora_is_the_root_installer(tmp_path):
    """The plan's step 1, `cd .../lora && bash install.sh`: rc 127 on today's main (no such file)."""
    inside = _run(["install.sh", "--check", "--dev"], ROOT / "lora")
    root = _run(["install.sh", "--check", "--dev"], ROOT)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == root.stdout and "nothing was installed" in inside.stdout
    helps = _run(["install.sh", "--help"], ROOT / "lora")
    assert helps.returncode == 0 and "bash install.sh --dev" in helps.stdout


def test_torch_is_pinned_without_importing_it(tmp_path):
    """Importing torch before numpy is installed prints "Failed to initialize NumPy" on a first
    install: the version pinned while the requirements install is read from torch's metadata."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True,
                   timeout=120)
    py = tmp_path / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(
        "import sys\nprint('UserWarning: Failed to initialize NumPy: No module named numpy', file=sys.stderr)\n"
        "__version__ = '2.5.1+cu124'\nclass version:\n    cuda = '12.4'\n")
    (site / "torch-2.5.1+cu124.dist-info").mkdir()
    (site / "torch-2.5.1+cu124.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1+cu124\n")
    r = _run([str(ROOT / "install.sh"), "--check"], tmp_path, PYTHON=str(py),
             VIRTUAL_ENV=str(tmp_path / "venv"))
    assert r.returncode == 0, r.stderr
    assert "torch: keeping the installed 2.5.1+cu124 (CUDA 12.4 build)" in r.stdout
    assert "torch: pinned at 2.5.1 while the requirements install" in r.stdout
    assert "Failed to initialize NumPy" not in r.stdout + r.stderr


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_dev_says_how_to_get_chromium(tmp_path):
    """--dev is what the whole suite needs: it names the chromium the browser tests drive, or how to
    get one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    r = _run([str(ROOT / "install.sh"), "--check", "--dev"], tmp_path, PATH=str(bin_dir))
    assert r.returncode == 0, r.stderr
    assert "requirements-dev.txt" in r.stdout
    assert "chromium     not found" in r.stdout and "sudo apt-get install chromium" in r.stdout
    os.symlink("/bin/true", bin_dir / "chromium")
    r = _run([str(ROOT / "install.sh"), "--check", "--dev"], tmp_path, PATH=str(bin_dir))
    assert f"chromium     {bin_dir / 'chromium'}" in r.stdout


def _requirements(name: str) -> set[str]:
    out = set()
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out |= _requirements(line[3:].strip())
        elif line:
            out.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return out


def test_readme_test_command_is_what_ci_runs():
    """Today's README runs `install.sh --dev` and pytest, while CI also installs gradio and
    playwright: a contributor following the README ran fewer tests than CI."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- docs: ci -->\n```bash\n((?:(?!```).)*python -m pytest[^\n]*\n)```", readme,
                      re.S).group(1)
    documented = [line.strip() for line in block.splitlines() if line.strip()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if re.match(r"\s*(bash install\.sh|python -m )", line)]
    # (CI also runs the web UI's and the vocal removal's own install commands, which --dev has made
    # checks)
    for own in ("bash install.sh --ui", "bash install.sh --separation"):
        assert own in ci and own in readme
    ci = [line for line in ci if line not in ("bash install.sh --ui", "bash install.sh --separation")]
    assert documented == ci == ["bash install.sh --dev", "python -m ruff check .", "python -m pytest -q tests"]
    assert {"pytest", "ruff", "gradio", "playwright"} <= _requirements("requirements-dev.txt")
    assert "separation=1" in (ROOT / "install.sh").read_text()  # --dev installs demucs too
    # the browser tests fail in CI rather than skip
    assert "export CI=true" in (ROOT / ".ci" / "run").read_text()
