"""lora/export_model.py: base + adapter(s) -> one plain transformers MusicGen folder, loaded in a
fresh process that never imports peft, by from_pretrained and by transformers' text-to-audio
pipeline; and bad input writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora.common.cli import UserError
from lora.common.fields import ConfigError
from tests.helpers import random_adapter

PROMPT = "lofi piano with soft drums"

# Run in a fresh interpreter: loads the exported folder with transformers alone, generates greedily
# with guidance (from_pretrained + generate, and the text-to-audio pipeline), records the codes
# EnCodec decoded, and reports whether peft was ever imported.
FRESH = textwrap.dedent('''
    import json, sys
    import torch
    from transformers import AutoProcessor, MusicgenForConditionalGeneration, pipeline

    folder, frames, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def spy_on(model, seen):
        decode = model.audio_encoder.decode
        def spy(audio_codes, *a, **k):
            seen.append(audio_codes[0].tolist())
            return decode(audio_codes, *a, **k)
        model.audio_encoder.decode = spy
    model = MusicgenForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    seen_model, seen_pipe = [], []
    spy_on(model, seen_model)
    k = model.config.decoder.num_codebooks // model.config.decoder.audio_channels
    kw = dict(do_sample=False, guidance_scale=3.0, max_new_tokens=frames + k - 1)
    with torch.no_grad():
        audio = model.generate(**processor(text=[%r], padding=True, return_tensors="pt"), **kw)
    pipe = pipeline("text-to-audio", model=folder)
    spy_on(pipe.model, seen_pipe)
    result = pipe(%r, forward_params=kw)
    json.dump({"model_codes": seen_model, "pipeline_codes": seen_pipe, "sampling_rate": result["sampling_rate"],
               "pipeline_audio_shape": list(result["audio"].shape), "audio_shape": list(audio.shape),
               "dtype": str(model.dtype), "peft_imported": any(m == "peft" or m.startswith("peft.")
                                                               for m in sys.modules)}, open(out, "w"))
''' % (PROMPT, PROMPT))


def _export(args) -> int:
    from lora import export_model

    return export_model.main([str(a) for a in args])


def _our_merged_codes(model_dir, adapters, scales, frames_s=1.0):
    """Greedy guided tokens of our own engine with the adapter(s) merged, fp32."""
    from lora.config import Config
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings

    cfg = Config()
    cfg.model.model_path = str(model_dir)
    cfg.generation.dtype, cfg.generation.merge = "float32", True
    cfg.generation.lora_scale = scales if len(scales) > 1 else scales[0]
    model, processor, info, _ = load_generation_model(cfg, adapter_path=[str(a) for a in adapters])
    req = Request(prompt=PROMPT, seed=0, duration=frames_s, sampling=SamplingSettings(guidance_scale=3.0,
                                                                                      do_sample=False))
    return generate(model, processor, info, [req], progress=False)[0].codes, info


def _fresh_process(folder: Path, frames: int, tmp_path: Path) -> dict:
    out = tmp_path / "fresh.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(frames), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _as_codes(seen: list, stereo: bool, k: int):
    """The (K, T) codes EnCodec decoded (stereo: generate decodes left = even and right = odd
    codebooks apart)."""
    if not stereo:
        return torch.tensor(seen[0][0])
    left, right = torch.tensor(seen[0][0]), torch.tensor(seen[1][0])
    return torch.stack([left, right], dim=1).reshape(k, -1)


@pytest.mark.slow
@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_export_loads_without_peft_and_generates_our_merged_tokens(stereo, tiny_model_dir,
                                                                   tiny_stereo_model_dir,
                                                                  trained_output_dir, tmp_path):
    model_dir = tiny_stereo_model_dir if stereo else tiny_model_dir
    adapter = (random_adapter(model_dir, tmp_path / "stereo_adapter") if stereo
               else trained_output_dir / "best_model")
    folder = tmp_path / "merged"
    assert _export(["--base_model_path", model_dir, "--lora_model_path", adapter, "--output_dir",
                    folder]) == 0
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
              "export_info.json"):
        assert (folder / f).is_file(), f
    assert (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert not any("lora" in key for key in fh.keys())
        assert {fh.get_slice(key).get_dtype() for key in fh.keys()} == {"F32"}

    ours, info = _our_merged_codes(model_dir, [adapter], [1.0])
    fresh = _fresh_process(folder, info.frames(1.0), tmp_path)
    assert fresh["peft_imported"] is False
    assert torch.equal(_as_codes(fresh["model_codes"], stereo, info.num_codebooks), ours)
    assert torch.equal(_as_codes(fresh["pipeline_codes"], stereo, info.num_codebooks), ours)
    assert fresh["sampling_rate"] == info.sample_rate
    card = (folder / "README.md").read_text()
    identity = json.loads((folder / "export_info.json").read_text())["adapters"][0]
    assert str(Path(model_dir).resolve()) in card and identity["weights_sha256"] in card and "scale 1" in card
    if not stereo:  # our trainer's adapter: its data and held-out loss are on the card
        state = json.loads((adapter / "trainer_state.json").read_text())
        assert f"base model {state['base_val_loss']:.4f}" in card
        assert "training clips" in card and "metadata.json" in card


@pytest.mark.slow
def test_exported_model_is_a_base_for_our_scripts(tiny_model_dir, trained_output_dir,
                                                  example_data_dir, tmp_path):
    """Generate with the fine-tune alone, and train a new adapter on top of it."""
    from lora import inference_lora, train_lora

    folder = tmp_path / "merged"
    assert _export(["--base_model_path", tiny_model_dir, "--lora_model_path", trained_output_dir
                    / "best_model", "--output_dir", folder, "--dtype", "bfloat16"]) == 0
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        dtypes = {key: fh.get_slice(key).get_dtype() for key in fh.keys()}
    # the decoder in bfloat16; EnCodec and the text encoder stay float32 (issue 28: a token cache
    # built on the export is the base's), unless --cast_encoders
    assert {d for k, d in dtypes.items() if k.startswith("decoder.")} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.startswith(("audio_encoder.", "text_encoder."))} == {"F32"}
    assert inference_lora.main(["--model_path", str(folder), "--lora_model_path", "none",
                                "--prompts", "lofi piano",
                                "--duration", "0.5", "--output_dir", str(tmp_path / "gen")]) == 0
    entry = json.loads((tmp_path / "gen" / "manifest.json").read_text())["files"][0]
    assert entry["model"]["name_or_path"] == str(folder.resolve()) and entry["adapter"] is None
    out = tmp_path / "on_top"
    assert train_lora.main(["--model_path", str(folder), "--data_dir", str(example_data_dir),
                            "--output_dir", str(out),
                            "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1",
                            "--batch_size", "2", "--mixed_precision", "no"]) == 0
    recorded = json.loads((out / "final_model"
                           / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(folder.resolve())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["exists", "scales", "bases", "dtype", "inside_adapter", "no_adapter"])
def test_bad_export_input_is_a_clear_error_and_writes_nothing(case, tiny_model_dir,
                                                              trained_output_dir, tmp_path):
    from lora import export_model
    from lora.common.cli import run_main

    adapter = trained_output_dir / "best_model"
    out = tmp_path / "merged"
    args = ["--base_model_path", tiny_model_dir, "--lora_model_path", adapter, "--output_dir", out]
    before = sorted(p.name for p in tmp_path.iterdir())
    if case == "exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        before = sorted(p.name for p in tmp_path.iterdir())
        expect = "did not write"  # (mine.txt: the ownership rule, lora.common.ownership)
    elif case == "scales":
        args += ["--lora_scale", "0.5", "0.5"]
        expect = "lora_scale has 2 value(s)"
    elif case == "bases":
        other = tmp_path / "other"
        other.mkdir()
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            (other / f).write_bytes((adapter / f).read_bytes())
        cfg = json.loads((other / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "facebook/musicgen-medium"
        (other / "adapter_config.json").write_text(json.dumps(cfg))
        before = sorted(p.name for p in tmp_path.iterdir())
        args[3:4] = [adapter, other]
        expect = "cannot be mixed"
    elif case == "dtype":
        args += ["--dtype", "int8"]
        expect = "'int8' is not allowed; choose one of float32, float16, bfloat16"
    elif case == "inside_adapter":
        args[-1] = adapter / "merged"
        expect = "would overwrite or sit inside the adapter"
    else:
        args[3] = "none"
        expect = "export needs an adapter"
    adapter_files = {p.name: p.stat().st_mtime_ns for p in adapter.iterdir()}
    with pytest.raises(UserError) as e:
        _export(args)
    assert expect in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {p.name: p.stat().st_mtime_ns for p in adapter.iterdir()} == adapter_files
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    # the exit code of every script's user error
    assert run_main(export_model.main, [str(a) for a in args]) == 2
    assert isinstance(e.value, (UserError, ConfigError))
