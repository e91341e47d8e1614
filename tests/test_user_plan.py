"""The user's plan (shared/seeds/000_790563979447e7ba.txt, "使用流程"), copied step by step, runs green
from inside lora/ on a fresh copy of the repository, right after the README's quick start.

Copied as written, with three stand-ins: `tiny` for the plan's local model folder
(/root/autodl-tmp/musicgen/local/musicgen-small), a small folder of generated audio for
/path/to/audio/files, and config.yaml's model set to `tiny` too (the plan's `python test_model.py`
takes the model from config.yaml, where a user names their local folder). Step 1 runs the installer
from lora/ with --check: the same file, which here must not install into the environment the tests
run in (CI runs the real install.sh first).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

LOCAL_MODEL = "/root/autodl-tmp/musicgen/local/musicgen-small"
AUDIO = "/path/to/audio/files"

# The plan's steps 1-6, in its order (step 2's two ways, one after the other).
PLAN = [
    "bash install.sh",
    "python prepare_data.py --create_example --output_dir ../data",
    f"python prepare_data.py --input_dir {AUDIO} --output_dir ../data --metadata_file metadata.json",
    "python test_dataset.py",
    "python test_model.py",
    f"""python train_lora.py \\
    --model_path {LOCAL_MODEL} \\
    --data_dir ../data \\
    --metadata_file metadata.json \\
    --output_dir ../output \\
    --lora_rank 12 \\
    --lora_alpha 24 \\
    --batch_size 2 \\
    --num_epochs 5 \\
    --fp16""",
    f"""python inference_lora.py \\
    --base_model_path {LOCAL_MODEL} \\
    --lora_model_path ../output/best_model \\
    --prompts "hip hop 808 beat with trap drums" \\
    --output_dir ../output/generated""",
    f"""python evaluate.py \\
    --base_model_path {LOCAL_MODEL} \\
    --lora_model_path ../output/best_model \\
    --output_dir ../output/evaluation \\
    --compare""",
]


def _audio_folder(path: Path) -> None:
    """'Your audio': a longer stereo 44.1 kHz song with a sidecar caption and a short mono riff."""
    import numpy as np
    import soundfile as sf

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(44100 * 12)) / 44100
    song = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1) * 0.3
    sf.write(path / "song one.flac", song + rng.normal(0, 0.01, song.shape), 44100)
    (path / "song one.txt").write_text("mellow two-tone drone, 90 BPM", encoding="utf-8")
    t = np.arange(int(32000 * 7)) / 32000
    sf.write(path / "riff.wav", 0.4 * np.sign(np.sin(2 * np.pi * 110 * t)), 32000)


def _fresh_copy(work: Path) -> None:
    """The repository's files as a clone has them (git ls-files, as in the working tree), in a new
    git repository, so that `git status` shows what the plan leaves outside data/ and output/."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
                           ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)


def _run(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, (f"`{cmd}` in {cwd} failed (exit {p.returncode}):\n--- stdout ---\n"
                               f"{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-5000:]}")
    return p


@pytest.mark.slow
def test_the_plan_runs_from_lora_right_after_the_quick_start(tmp_path, tiny_model_dir):
    work = tmp_path / "finetune"
    work.mkdir()
    _fresh_copy(work)
    # the built-in tiny model is built once per session (the copy's output/ is git-ignored)
    shutil.copytree(tiny_model_dir, work / "output" / "tiny_model" / "mono")
    config = work / "config.yaml"
    text = config.read_text(encoding="utf-8")
    config.write_text(re.sub(r"(?m)^(  model_path:) \S+", r"\1 tiny", text, count=1), encoding="utf-8")
    subprocess.run(["git", "commit", "-qam", "the local model"], cwd=work, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))
    audio = tmp_path / "my_audio"
    _audio_folder(audio)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHON=sys.executable, VIRTUAL_ENV=str(Path(sys.executable).parent.parent))

    _run("bash quick_start.sh", work, env)  # the README's order: the quick start first
    assert (work / "output" / "quick_start" / "best_model" / "adapter_model.safetensors").is_file()

    lora = work / "lora"
    outputs = {}
    for step in PLAN:
        cmd = step.replace(LOCAL_MODEL, "tiny").replace(AUDIO, shlex.quote(str(audio)))
        if cmd == "bash install.sh":
            cmd += " --check"
        outputs[step.split()[1]] = _run(cmd, lora, env)

    # what the steps promise
    assert "install.sh --check: nothing was installed" in outputs["install.sh"].stdout
    ok = next(ln for ln in outputs["test_model.py"].stdout.splitlines() if ln.startswith("OK — next step:"))
    assert ok.startswith("OK — next step: python train_lora.py --model_path tiny --data_dir ../data "
                         "--output_dir ../output"), ok
    assert "next: python test_model.py --model_path tiny" in outputs["test_dataset.py"].stdout
    out = work / "output"
    assert (out / "best_model" / "adapter_model.safetensors").is_file()
    assert list((out / "generated").glob("*.wav"))
    assert (out / "evaluation" / "results.json").is_file() and (out / "evaluation" / "report.html").is_file()
    # the quick start's run is still there, its own
    assert (out / "quick_start" / "evaluation" / "results.json").is_file()
    # nothing left outside the git-ignored data/ and output/ (no lora/output, no lock file)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=work,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status
