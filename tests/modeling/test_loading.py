"""Loading a model (lora.modeling.loading): the tiny models by name, and the errors a user gets for
a model of another kind, an incomplete folder, a missing folder or an unreachable hub id."""

from __future__ import annotations

import json
import shutil

import pytest

from lora.common.cli import UserError
from lora.config import ModelConfig
from lora.modeling.loading import load_base_model, resolve_model_path
from tests.helpers import load_model


def test_resolve_tiny_uses_cache_dir(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "mono")
    cfg = ModelConfig(model_path="tiny", tiny_model_dir=str(tmp_path))
    assert resolve_model_path(cfg) == str((tmp_path / "mono").resolve())
    assert resolve_model_path(ModelConfig(model_path="facebook/musicgen-small")) == "facebook/musicgen-small"


def test_a_model_of_another_kind_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bark"}))
    with pytest.raises(UserError, match="not a MusicGen model.*'bark'"):
        load_model(tmp_path)


def test_incomplete_local_folder_names_missing_files(tmp_path, tiny_model_dir):
    d = tmp_path / "musicgen-small"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    (d / "preprocessor_config.json").unlink()
    (d / "processor_config.json").unlink()
    with pytest.raises(UserError) as e:
        load_model(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "preprocessor_config.json" in msg and "hf download" in msg
    assert "config.json;" not in msg  # config.json is present, so it is not reported


def test_missing_folder_and_unreachable_hub_id(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "no_such_model")
    cfg = ModelConfig(model_path="nobody-xyz/not-a-musicgen", local_files_only=True)
    with pytest.raises(UserError) as e:
        load_base_model(cfg)
    assert "HF_ENDPOINT" in str(e.value) and "--local-dir" in str(e.value) and "Offline" in str(e.value)
