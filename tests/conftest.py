"""Shared pytest fixtures: tiny models, example data and a trained adapter, built once per session.

Nothing here downloads: models are tiny random MusicGens built from config (lora.modeling), data is the
synthetic example set (lora.prepare_data --create_example).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny mono MusicGen saved with save_pretrained (loadable with from_pretrained)."""
    from lora.modeling import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_model") / "mono", stereo=False)


@pytest.fixture(scope="session")
def tiny_stereo_model_dir(tmp_path_factory) -> Path:
    from lora.modeling import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_model") / "stereo", stereo=True)


@pytest.fixture(scope="session")
def example_data_dir(tmp_path_factory) -> Path:
    """The synthetic example dataset (small), prepared once per session. Treat as read-only."""
    from lora import prepare_data

    out = tmp_path_factory.mktemp("example_data") / "data"
    rc = prepare_data.main(["--create_example", "--output_dir", str(out), "--example_clips", "16",
                            "--example_seconds", "4"])
    assert rc == 0
    return out
