"""The docs stay true: every shell block in README, README.zh-CN, USAGE and DATA_PREPARATION is run
here, run by CI, or marked as needing a GPU / the network; the flag reference in USAGE.md matches
the schema.

Markers (an HTML comment on the line before a ```bash block):
  <!-- docs: run -->        run by test_documented_commands_run (in a scratch copy of the repository, with the
                            tiny model; /path/to/audio/files is replaced by a folder of generated audio and the
                            plan's local model path /root/autodl-tmp/musicgen/local/musicgen-small by `tiny`)
  <!-- docs: ci -->         run by .ci/run on a fresh clone (install, tests, quick start); checked to be there
  <!-- docs: needs ... -->  needs a GPU or the network (a hub download), which tests cannot have
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT

DOCS = ["README.md", "README.zh-CN.md", "USAGE.md", "DATA_PREPARATION.md"]
MARK = re.compile(r"<!--\s*docs:\s*(run|ci|needs [^>]+?)\s*-->")
FENCE = re.compile(r"^```(bash|sh|shell)\s*$")
SUBSTITUTIONS = {
    "/path/to/audio/files": "{audio_dir}",
    "/root/autodl-tmp/musicgen/local/musicgen-small": "tiny",
}


def shell_blocks(path: Path) -> list[tuple[str | None, str, int]]:
    """(marker, code, line number) of every bash/sh block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i].strip()):
            start = i
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            m = MARK.search(prev)
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            out.append((m.group(1) if m else None, "\n".join(body), start + 1))
        i += 1
    return out


def commands(code: str) -> list[str]:
    """Command lines of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    cmds = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            cmds.append(re.sub(r"\s+", " ", line))
    return cmds


def test_every_shell_block_is_run_or_marked():
    for name in DOCS:
        for marker, code, line in shell_blocks(ROOT / name):
            assert marker is not None, (f"{name}:{line}: a shell block without a <!-- docs: "
                                        f"run|ci|needs ... --> marker:\n{code}")
            if marker.startswith("needs"):
                assert re.search(r"gpu|network",
                                 marker), f"{name}:{line}: 'needs' must say gpu or network"


def test_ci_blocks_are_what_ci_runs():
    ci = [re.sub(r"\s+", " ", line.strip()) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for name in DOCS:
        for marker, code, line in shell_blocks(ROOT / name):
            if marker != "ci":
                continue
            for cmd in commands(code):
                parts = [p.strip() for p in cmd.split("&&")]
                for part in parts:
                    if part.startswith("python3 -m venv") or part.startswith(". .venv"):
                        continue  # CI makes its own fresh virtualenv (.venv-ci)
                    assert any(part in c for c in ci), f"{name}:{line}: `{part}` is not run by .ci/run"


def test_usage_reference_matches_the_schema():
    from lora.config import markdown_reference

    text = (ROOT / "USAGE.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- reference:start -->\n(.*)\n<!-- reference:end -->", text, flags=re.S)
    assert m, "USAGE.md lost its reference markers"
    assert m.group(1).strip() == markdown_reference().strip(), \
        "USAGE.md's flag reference is out of date: regenerate it: `python -m lora.config --update-usage`"


def test_chinese_readme_has_the_same_commands():
    en = [commands(c) for _, c, _ in shell_blocks(ROOT / "README.md")]
    zh = [commands(c) for _, c, _ in shell_blocks(ROOT / "README.zh-CN.md")]
    assert en == zh, "README.zh-CN.md must give the same commands as README.md"


def _make_audio_folder(path: Path) -> None:
    """A small folder of 'your audio': a longer stereo 44.1 kHz track with a caption, a short mono
    mp3, a broken file."""
    import soundfile as sf

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(44100 * 12)) / 44100
    song = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1) * 0.3
    song += rng.normal(0, 0.01, song.shape)
    sf.write(path / "song one.flac", song, 44100)
    (path / "song one.txt").write_text("mellow two-tone drone, 90 BPM", encoding="utf-8")
    t = np.arange(int(32000 * 7)) / 32000
    sf.write(path / "riff.wav", 0.4 * np.sign(np.sin(2 * np.pi * 110 * t)), 32000)
    (path / "broken.wav").write_text("not audio")


RUN_DOCS = ["README.md", "USAGE.md", "DATA_PREPARATION.md"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_DOCS)
def test_documented_commands_run(name, tmp_path, tiny_model_dir):
    """Run every `docs: run` block of one document, in order, in a fresh scratch copy of the
    repository."""
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("lora", "config.yaml", "quick_start.sh"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / item)
    # `--model_path tiny` builds the tiny model under output/tiny_model once; reuse the session's
    # build.
    shutil.copytree(tiny_model_dir, work / "output" / "tiny_model" / "mono")
    audio_dir = tmp_path / "my_audio"
    _make_audio_folder(audio_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # `python` is this interpreter
    ran = 0
    for marker, code, line in shell_blocks(ROOT / name):
        if marker != "run":
            continue
        script = code
        for old, new in SUBSTITUTIONS.items():
            script = script.replace(old, new.format(audio_dir=audio_dir))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (f"{name}:{line} failed (exit {proc.returncode}):\n{script}\n"
                                      f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                                      f"{proc.stderr[-5000:]}")
        ran += 1
    assert ran >= 1
    out = work / "output"
    if name != "DATA_PREPARATION.md":  # what the documented commands promise to leave behind
        assert (out / "best_model" / "adapter_model.safetensors").is_file()
        assert (out / "logs" / "loss_curve.png").is_file()
    if name == "USAGE.md":
        assert (out / "evaluation" / "report.html").is_file()
        assert list((out / "long").glob("*.wav"))
    if name == "README.md":
        assert (out / "evaluation" / "results.json").is_file()
        assert list((out / "generated").glob("*.wav"))


# ------------------------------------------------------------------------------------------
# Every command the docs name exists here and runs far enough to prove it (--help)
# ------------------------------------------------------------------------------------------
COMMAND_DOCS = ["README.md", "README.zh-CN.md", "USAGE.md", "DATA_PREPARATION.md"]
BUILTINS = {"cd", "export", ".", "source", "set", "echo", "unset", "true"}
# An inline `...` span is a command when it starts (after VAR=value assignments) with one of these
# programs, or with any program-like word and has a --flag (`huggingface-cli download X --local-dir
# Y`; captions have no --flags).
TOOLS = ("python", "python3", "bash", "hf", "accelerate", "torchrun", "tensorboard", "pip")
INLINE = re.compile(r"(?<!`)`((?:[A-Z_][A-Z0-9_]*=\S+ +)*(?:(?:" + "|".join(TOOLS) + r")(?: [^`\n]*)?"
                    r"|[a-z][a-z0-9_-]*(?: [^`\n]*)? --[a-z][^`\n]*))`(?!`)")


def _shell_words(cmd: str) -> list[list[str]]:
    """The simple commands of one command line (split on && || | ; and $( ... )), env assignments
    dropped."""
    import shlex

    out = []
    inner = re.findall(r"\$\(([^()]*)\)", cmd)  # command substitutions are commands of their own
    cmd = re.sub(r"\$\(([^()]*)\)", "X", cmd)
    for c in [cmd, *inner]:
        # operators (&& || | ;) end a simple command, outside quotes only
        lex = shlex.shlex(c, posix=True, punctuation_chars="|&;")
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:
            tokens = c.split()
        words: list[str] = []
        for tok in [*tokens, ";"]:
            if tok and set(tok) <= set("|&;"):
                if words:  # a subshell: ( cd lora && ... )
                    words[0], words[-1] = words[0].removeprefix("("), words[-1].removesuffix(")")
                    words = [w for w in words if w]
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                    words = words[1:]
                if words:
                    out.append(words)
                words = []
            else:
                words.append(tok)
    return out


def documented_commands() -> dict[tuple, str]:
    """{the check to run (argv): where the docs name it} for every command in a shell block or an
    inline code span of the user docs. Our scripts (python X.py, bash X.sh) get `--help`; python -m
    MODULE gets `-m MODULE --help`; other programs get `PROGRAM [SUBCOMMAND] --help`."""
    found: dict[tuple, str] = {}
    for name in COMMAND_DOCS:
        # inline spans outside the fenced blocks (those are read whole by shell_blocks), line
        # numbers kept
        text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"),
                      (ROOT / name).read_text(encoding="utf-8"), flags=re.S | re.M)
        lines = [(c, f"{name}:{line}") for _, code, line in shell_blocks(ROOT / name)
                 for c in commands(code)]
        lines += [(m.group(1), f"{name}:{text[:m.start()].count(chr(10)) + 1}")
                  for m in INLINE.finditer(text)]
        for cmd, where in lines:
            for words in _shell_words(cmd):
                prog, rest = words[0], words[1:]
                if prog in BUILTINS or prog.startswith("<"):
                    continue
                if prog in ("python", "python3", "bash"):
                    if rest[:1] == ["-c"]:
                        continue  # a one-line program: the docs' run test runs it
                    if rest[:1] == ["-m"]:
                        check = (prog, "-m", rest[1], "--help")
                    else:
                        script = rest[0]
                        path = next((p for p in (ROOT / script, ROOT / "lora" / script)
                                     if p.is_file()), None)
                        assert path is not None, f"{where}: `{cmd}` names {script}, which is not in the repository"
                        check = (prog, str(path.relative_to(ROOT)), "--help")
                else:
                    sub = rest[:1] if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]) else []
                    check = (prog, *sub, "--help")
                found.setdefault(check, where)
    return found


# Programs the docs name that run on the user's own computer, not in this environment.
ELSEWHERE = {"ssh"}  # README "Web UI": the SSH tunnel from a laptop to a rented GPU box


@pytest.mark.slow
def test_every_documented_command_exists_and_runs():
    """`huggingface-cli download` was removed from huggingface-hub 1.x while the docs still named
    it: every program and script the docs name must be installed (on PATH, in this environment) and
    answer --help with exit 0."""
    from concurrent.futures import ThreadPoolExecutor

    found = {c: where for c, where in documented_commands().items() if c[0] not in ELSEWHERE}
    progs = {c[0] for c in found} | {c[1] for c in found if c[0] in ("python", "bash") and c[1] != "-m"}
    # The parser sees what the docs name (a parser that found nothing would pass everything).
    for must in ("hf", "accelerate", "torchrun", "tensorboard", "lora/train_lora.py",
                 "lora/test_model.py", "install.sh", "quick_start.sh"):
        assert must in progs, f"no documented command runs {must}: the parser is broken"
    assert ("hf", "download", "--help") in found and ("accelerate", "launch", "--help") in found
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")

    def run(check):
        if shutil.which(check[0], path=env["PATH"]) is None:
            return check, None
        p = subprocess.run(list(check), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        return check, p

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, sorted(found)))
    bad = []
    for check, p in results:
        if p is None:
            bad.append(f"{found[check]}: `{check[0]}` is not installed (not on PATH)")
        elif p.returncode != 0:
            bad.append(f"{found[check]}: `{' '.join(check)}` exited {p.returncode}: "
                       f"{(p.stderr or p.stdout)[-400:]}")
    assert not bad, "documented commands that do not work here:\n" + "\n".join(bad)
