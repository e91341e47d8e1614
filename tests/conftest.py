"""Shared pytest fixtures: tiny models (folders, and loaded once per test module), an adapter with
random weights, example data, a short and a longer training run, and a small disk. The expensive
ones are built once per session; treat them as read-only. Plain helper functions: tests/helpers.py.

Nothing here downloads: models are tiny random MusicGens built from config
(lora.modeling.tiny_model), data is the synthetic example set (lora.prepare_data --create_example).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# (pytest's pythonpath puts the repository root on sys.path too; this is before tests.helpers
# can be imported)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The model-file digests (lora.modeling.loading) are remembered in $XDG_CACHE_HOME: keep the suite's
# out of the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lora-tests-cache-")

import torch  # noqa: E402

from tests.helpers import load_model, random_adapter, train_args  # noqa: E402

# The models in tests are tiny: their ops are too small to gain from threads, and with 2 cores a
# second thread mostly adds contention. Subprocess tests set their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny mono MusicGen saved with save_pretrained (loadable with from_pretrained)."""
    from lora.modeling.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_model") / "mono", stereo=False)


@pytest.fixture(scope="session")
def tiny_stereo_model_dir(tmp_path_factory) -> Path:
    from lora.modeling.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_model") / "stereo", stereo=True)


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    """The tiny mono MusicGen loaded: (model, processor, info), once per test module. Do not
    change the model (load your own to attach an adapter)."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def stereo(tiny_stereo_model_dir):
    """The tiny stereo MusicGen loaded: (model, processor, info), once per test module."""
    return load_model(tiny_stereo_model_dir)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter (default settings) on the tiny mono model, its B matrices random (seed 0) so
    that it changes the output; saved as .../best_model. Treat as read-only."""
    return random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "best_model")


@pytest.fixture(scope="session")
def example_data_dir(tmp_path_factory) -> Path:
    """The synthetic example dataset (small), prepared once per session. Treat as read-only."""
    from lora import prepare_data

    out = tmp_path_factory.mktemp("example_data") / "data"
    rc = prepare_data.main(["--create_example", "--output_dir", str(out), "--example_clips", "16",
                            "--example_seconds", "4"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def trained_output_dir(tmp_path_factory, tiny_model_dir, example_data_dir) -> Path:
    """A short LoRA training run (tiny model, example data, fp32 on CPU) with the seed's flags;
    settings that the seed passes no flag for come from a YAML config file (so the test also proves
    config files are read).

    Returns the output dir: best_model/, final_model/, checkpoints/step-*/, logs/ (metrics.jsonl,
    TensorBoard, loss_curve.png), config.yaml. Treat as read-only. (Training writes its token cache
    to example_data_dir/cache.)
    """
    from lora import train_lora

    root = tmp_path_factory.mktemp("trained")
    yaml_file = root / "train.yaml"
    yaml_file.write_text("training:\n  max_steps: 4\n  eval_steps: 2\n  save_steps: 2\n  "
                         "logging_steps: 1\n  learning_rate: 0.003\n  mixed_precision: 'no'\n",
                         encoding="utf-8")
    out = root / "output"
    rc = train_lora.main(["--config", str(yaml_file), "--model_path", str(tiny_model_dir),
                          "--data_dir", str(example_data_dir), "--metadata_file", "metadata.json",
                          "--output_dir", str(out), "--lora_rank", "12", "--lora_alpha", "24",
                          "--batch_size", "2", "--num_epochs", "5"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, tiny_model_dir, example_data_dir) -> Path:
    """A 3-step training run (tests.helpers.train_args) with a checkpoint at every step. Treat as
    read-only: copy it to damage it."""
    from lora import train_lora

    out = tmp_path_factory.mktemp("short") / "out"
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--max_steps", "3")) == 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000001",
                                                                         "step-000002", "step-000003"]
    return out


@pytest.fixture
def small_disk(tmp_path, request):
    """A small tmpfs: 1 MB, or the size a test asks for with
    ``@pytest.mark.parametrize("small_disk", ["2m"], indirect=True)``. It needs root and permission
    to mount: the test is skipped, with the reason, where mounting is not permitted."""
    size = getattr(request, "param", "1m")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode}): "
                    f"the disk-full cases need one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory) -> Path:
    from tests.helpers import make_tiny_clap

    return make_tiny_clap(tmp_path_factory.mktemp("tiny_clap") / "clap")


def write_songs(folder: Path, n: int = 3, seconds: float = 7.0, sample_rate: int = 44100,
                channels: int = 2, seed: int = 0) -> list[Path]:
    """``n`` short synthetic "songs" (tones + noise, different per song) as float WAVs."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(sample_rate * (seconds + i))) / sample_rate
        x = np.stack([0.3 * np.sin(2 * np.pi * (220 + 55 * i) * (c + 1) * t) for c in range(channels)])
        x = (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
        out.append(folder / f"song_{i}.wav")
        sf.write(out[-1], x.T, sample_rate, subtype="FLOAT")
    return out
