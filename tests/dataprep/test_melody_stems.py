"""The melody's chroma from demucs stems (lora/dataprep/melody_stems.py), as audiocraft's
ChromaStemConditioner computes it: vocals + other, summed, mono, at the model's rate; in the
training cache (kept beside the codes, computed once) and for --melody_audio (recorded in the
manifest); the mix as the fallback that ``auto`` says it takes.

Without demucs these tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import require_demucs

require_demucs()  # (skips without demucs; fails with CI=true: .ci/run installs it)

import torch  # noqa: E402

from lora.common.cli import UserError  # noqa: E402
from lora.config import ModelConfig  # noqa: E402
from lora.dataprep import audio as A  # noqa: E402
from lora.dataprep import melody_stems as M  # noqa: E402
from lora.dataprep import separation as S  # noqa: E402
from lora.modeling import chroma  # noqa: E402

SR = 32000


@pytest.fixture(scope="module")
def sep_dir(tmp_path_factory) -> Path:
    return S.random_separator(tmp_path_factory.mktemp("sep") / "htdemucs")


def _tune(seconds=3.0, channels=2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    notes = np.repeat([261.63, 329.63, 392.0, 523.25], t.size // 4 + 1)[:t.size]
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(notes) / SR) + 0.2 * np.sin(2 * np.pi * 55 * t)
    return np.stack([x * (1 - 0.2 * c) for c in range(channels)]).astype(np.float32) \
        + 0.01 * rng.normal(size=(channels, t.size)).astype(np.float32)


def test_melody_wave_is_vocals_plus_other_of_demucs(sep_dir):
    sep = S.load_separator(S.separator_files(str(sep_dir)), "cpu")
    wav = _tune()
    ours = M.melody_wave(sep, wav, SR)
    # audiocraft's _get_stemmed_wav with demucs' own API (shifts=0; soxr for the rate conversions)
    from demucs.apply import apply_model

    x = torch.from_numpy(A.resample(wav, SR, 44100))[None]
    stems = apply_model(sep.model, x, shifts=0, split=True, overlap=0.25)[0]
    keep = [sep.model.sources.index("vocals"), sep.model.sources.index("other")]
    ref = A.resample(stems[keep].sum(0).mean(0, keepdim=True).numpy(), 44100, SR)[:, :wav.shape[1]]
    assert ours.shape == (1, wav.shape[1])
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # drums and bass are not in it: not the mix, not all stems
    everything = A.resample(stems.sum(0).mean(0, keepdim=True).numpy(), 44100, SR)[:, :wav.shape[1]]
    assert np.abs(ours - everything).max() > 1e-3


def test_the_choice_of_source(sep_dir, monkeypatch, caplog):
    assert M.melody_separator(ModelConfig(melody_chroma="mix")) is None
    sep = M.melody_separator(ModelConfig(melody_chroma="stems", separation_model=str(sep_dir)))
    assert isinstance(sep, S.Separator) and M.chroma_source(sep) == f"stems-{sep.files.identity}"
    # auto: the mix when the separation model cannot be had (offline, not downloaded) ...
    missing = ModelConfig(melody_chroma="auto", separation_model="nobody/htdemucs_none", local_files_only=True)
    assert M.melody_separator(missing) is None
    with pytest.raises(UserError, match="model.melody_chroma stems"):
        M.melody_separator(ModelConfig(melody_chroma="stems", separation_model="nobody/htdemucs_none",
                                       local_files_only=True))
    # ... or demucs is not installed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "demucs" else real(n, *a))
    assert M.melody_separator(ModelConfig(melody_chroma="auto", separation_model=str(sep_dir))) is None


def test_training_cache_takes_the_chroma_of_the_stems_once(sep_dir, tmp_path):
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import ClipRecord
    from lora.modeling.loading import load_base_model
    from lora.modeling.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(tmp_path / "tiny_melody", melody=True)
    model, processor, info = load_base_model(ModelConfig(model_path=str(model_dir)))
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    recs = []
    for i in range(2):
        sf.write(data / f"train/c{i}.wav", _tune(4.0, 1, seed=i)[0], SR)
        recs.append(ClipRecord(id=f"c{i}", audio=f"train/c{i}.wav", text="piano", duration=4.0,
                               split="train", path=data / f"train/c{i}.wav"))
    mix, _ = build_token_cache(recs, model, processor, info, data, show_progress=False)
    sep = S.load_separator(S.separator_files(str(sep_dir)), "cpu")
    stems, stats = build_token_cache(recs, model, processor, info, data, show_progress=False,
                                     melody_separator=sep)
    assert stats["clips_encoded"] == 0 and stats["stem_chromas_computed"] == 2
    for rec, a, b in zip(recs, mix, stems):
        wav = A.load_audio(rec.path, SR, 1)
        expect = chroma.chroma(M.melody_wave(sep, wav, SR), SR, max_seconds=None).argmax(-1)
        assert torch.equal(b.chroma.long(), expect) and torch.equal(a.codes, b.codes)
    assert any(not torch.equal(a.chroma, b.chroma) for a, b in zip(mix, stems))
    _, again = build_token_cache(recs, model, processor, info, data, show_progress=False,
                                 melody_separator=sep)
    assert again["stem_chromas_computed"] == 0
    # the mix's chroma is still there for a run without separation
    back, _ = build_token_cache(recs, model, processor, info, data, show_progress=False)
    assert all(torch.equal(a.chroma, c.chroma) for a, c in zip(mix, back))


@pytest.mark.slow
def test_melody_audio_follows_its_stems_and_the_manifest_says_so(sep_dir, tmp_path):
    from lora import inference_lora

    tune = tmp_path / "tune.wav"
    sf.write(tune, _tune(2.0).T, SR)
    base = ["--base_model_path", "tiny-melody", "--tiny_model_dir", str(tmp_path / "tiny"), "--lora_model_path",
            "none", "--prompts", "piano", "--duration", "0.5", "--melody_audio", str(tune)]
    entries = {}
    for mode in ("mix", "stems"):
        out = tmp_path / mode
        assert inference_lora.main(base + ["--output_dir", str(out), "--melody_chroma", mode,
                                           "--separation_model", str(sep_dir)]) == 0
        entries[mode] = json.loads((out / "manifest.json").read_text())["files"][0]["melody"]
    identity = S.separator_files(str(sep_dir)).identity
    assert entries["mix"]["chroma_from"] == "mix" and entries["stems"]["chroma_from"] == f"stems-{identity}"
    assert entries["mix"]["chroma_id"] != entries["stems"]["chroma_id"]
    shutil.rmtree(tmp_path / "tiny", ignore_errors=True)
