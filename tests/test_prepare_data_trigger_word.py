"""The trigger word end to end: recorded in a prepared folder, put in every caption training reads
(its text states are the triggered captions), recorded in the adapter's saved config, shown by
inference_lora.py and written in its manifest."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

from lora import inference_lora, prepare_data, train_lora
from lora.dataprep.token_cache import text_key
from lora.modeling.adapter import adapter_identity


@pytest.mark.slow
def test_trigger_word_reaches_training_the_adapter_and_inference(tmp_path, example_data_dir,
                                                                 tiny_model_dir, caplog):
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    assert prepare_data.main(["--data_dir", str(data), "--trigger_word", "zxq", "--trigger_position",
                              "end"]) == 0
    plain = [c["text"] for c in json.loads((data / "metadata.json").read_text())["clips"]]
    out = tmp_path / "out"
    assert train_lora.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data), "--output_dir",
                            str(out), "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1",
                            "--mixed_precision", "no", "--batch_size", "2"]) == 0
    saved = yaml.safe_load((out / "best_model" / "config.yaml").read_text())["data"]
    assert saved["trigger_word"] == "zxq" and saved["trigger_position"] == "end"
    # the text states training cached are those of the triggered captions
    assert _cached_text_keys(data) == {text_key(f"{t}, zxq") for t in set(plain)}
    assert adapter_identity(out / "best_model")["trigger_word"] == {"word": "zxq", "position": "end"}
    lora_log = logging.getLogger("lora")  # (it does not propagate once a script set up logging)
    lora_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lora"):
            assert inference_lora.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path",
                                        str(out / "best_model"), "--prompts", "lofi piano", "--duration",
                                        "0.5", "--output_dir", str(tmp_path / "gen")]) == 0
    finally:
        lora_log.removeHandler(caplog.handler)
    assert "trained with the trigger word 'zxq'" in caplog.text and "lack it" in caplog.text
    entry = json.loads((tmp_path / "gen" / "manifest.json").read_text())["files"][0]
    assert entry["adapter"]["trigger_word"] == {"word": "zxq", "position": "end"}


def _cached_text_keys(data) -> set[str]:
    """The captions whose text states training cached (their keys: lora.dataprep.token_cache.text_key),
    from the cache's shards (lora.dataprep.cache_store)."""
    from lora.dataprep import cache_store

    out = set()
    for cache in (data / "cache").iterdir():
        if cache.is_dir() and (cache / "shards").is_dir():
            out |= set(cache_store.scan(cache).texts)
    assert out
    return out
