"""Helpers the test files share: plain functions and constants (the shared fixtures are in
tests/conftest.py). Import them as ``from tests.helpers import ...`` (pytest's ``pythonpath``
puts the repository root on sys.path)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

# The repository root (tests/ is one level below it; the test files sit one or two levels down).
ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "lora" / "train_lora.py"
SR = 32000  # the sample rate of MusicGen's codec (and of the prepared clips)
# The prompt of the user's plan (its inference_lora.py command) and its file name's stem.
SEED_PROMPT = "hip hop 808 beat with trap drums"
SEED_SLUG = "hip-hop-808-beat-with-trap-drums"

# A short fp32 training run on the tiny model: no validation, a checkpoint every step, 1 s windows.
TRAIN_DEFAULTS = {"--max_steps": "2", "--gradient_accumulation_steps": "1", "--eval_steps": "100",
                  "--save_steps": "1", "--logging_steps": "1", "--mixed_precision": "no",
                  "--max_duration": "1"}


def train_args(model_dir, data_dir, out, *extra, **defaults) -> list[str]:
    """train_lora.py's flags for a short run (TRAIN_DEFAULTS, with ``defaults`` replacing some:
    ``max_steps=4`` is ``--max_steps 4``); a flag given in ``extra`` replaces its default (a flag
    may be given once)."""
    own = dict(TRAIN_DEFAULTS, **{f"--{k}": str(v) for k, v in defaults.items()})
    args = ["--model_path", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out)]
    for flag, value in own.items():
        if flag not in extra:
            args += [flag, value]
    return args + [str(a) for a in extra]


def subprocess_env() -> dict:
    """The environment of a script run in a child process: the repository importable, offline, one
    thread."""
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


def sha1s(folder: Path) -> dict[str, str]:
    """sha1 of every file under ``folder`` (symlinks not followed; train_lora.py's hidden lock
    file, which holds no data, aside): what "nothing changed" compares."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = Path(root) / n
            if p.is_file() and not p.is_symlink() and n != ".train_lora.lock":
                out[p.relative_to(folder).as_posix()] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def truncate(path: Path) -> None:
    """Cut a file to half its size (a write that was interrupted)."""
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def music(seconds, sr=SR, seed=0, channels=1, amp=0.3):
    """A non-repeating 'song': a few random partials with a slow tremolo (no two seeds alike)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    y = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(100, 1500, 3))
    y = (amp / 3 * y * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t))).astype(np.float32)
    return np.stack([y * (1 - 0.2 * c) for c in range(channels)], axis=1) if channels > 1 else y


def prepare_report(out: Path) -> dict:
    """The report prepare_data.py writes into its output folder."""
    from lora.dataprep import ownership

    return json.loads((out / ownership.REPORT_FILE).read_text(encoding="utf-8"))


def make_tiny_clap(directory):
    """A tiny random CLAP model + processor saved with save_pretrained (what a user's local folder
    looks like)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizerFast
    from transformers.models.clap.configuration_clap import ClapAudioConfig, ClapTextConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["lofi piano beat", "hip hop 808 trap drums", "ambient synth pad"],
                            trainers.BpeTrainer(vocab_size=300,
                                                special_tokens=["<s>", "<pad>", "</s>", "<unk>",
                                                                "<mask>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    rt = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", mask_token="<mask>")
    tc = ClapTextConfig(vocab_size=len(rt), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, projection_dim=16)
    ac = ClapAudioConfig(num_mel_bins=64, window_size=8, spec_size=256, patch_size=4,
                         patch_stride=4, hidden_size=32,
                         patch_embeds_hidden_size=16, projection_dim=16, depths=[1, 1],
                         num_attention_heads=[2, 2], intermediate_size=37)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=tc.to_dict(), audio_config=ac.to_dict(), projection_dim=16))
    # (truncation rand_trunc, as a real unfused CLAP folder has: what transformers'
    # zero-shot-audio-classification pipeline needs for an unfused model)
    proc = ClapProcessor(feature_extractor=ClapFeatureExtractor(feature_size=64, sampling_rate=48000,
                                                                max_length_s=10, truncation="rand_trunc"),
                         tokenizer=rt)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------
# Generation on the tiny models
# ------------------------------------------------------------------------------------------
def generation_config(model_dir, **generation):
    """lora.config.Config for ``model_dir`` with these generation settings (the tests that compare
    tokens exactly pass ``dtype="float32"``: dtype auto is bf16 on CPUs with AMX/AVX512-BF16)."""
    from lora.config import Config

    cfg = Config()
    cfg.model.model_path = str(model_dir)
    for k, v in generation.items():
        setattr(cfg.generation, k, v)
    return cfg


def request(prompt, seed, duration=1.0, prompt_codes=None, prompt_id="", **sampling):
    """One generation request (lora.generation.requests.Request) with these sampling settings."""
    from lora.generation.requests import Request, SamplingSettings

    return Request(prompt=prompt, seed=seed, duration=duration, sampling=SamplingSettings(**sampling),
                   prompt_codes=prompt_codes, prompt_id=prompt_id)


def generate(bundle, requests, **kw):
    """lora.generation.engine.generate with a loaded (model, processor, info, adapter) bundle, no
    progress bar."""
    from lora.generation.engine import generate as engine_generate

    model, processor, info, _ = bundle
    kw.setdefault("progress", False)
    return engine_generate(model, processor, info, requests, **kw)


def random_adapter(model_dir, out_dir, seed=0, fill=None, **lora) -> Path:
    """A LoRA adapter of our own trainer (lora.modeling.adapter.attach_lora, with these lora
    settings) on ``model_dir`` whose B matrices (and DoRA magnitudes) get random values, so it
    changes the output; ``fill`` sets every B value to it instead (NaN: a broken adapter)."""
    import torch

    from lora.modeling import adapter, loading

    cfg = generation_config(model_dir)
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    model, _, _ = loading.load_base_model(cfg.model)
    peft_model = adapter.attach_lora(model, cfg.lora)
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or "lora_magnitude" in name:
            p.data = p.data + torch.randn(p.shape, generator=g) * 0.5
            if fill is not None:
                p.data.fill_(fill)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def load_model(model_dir):
    """(model, processor, info) of a model folder, loaded the way the scripts load it
    (lora.modeling.loading.load_base_model)."""
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    return load_base_model(ModelConfig(model_path=str(model_dir)))


def tones(freqs, seconds, sr=SR):
    """Sine tones at ``freqs`` (Hz), mixed at equal level (peak at most 1), float32."""
    t = np.arange(int(seconds * sr)) / sr
    return sum(np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32) / len(freqs)


def tune_chroma(seconds=3.0):
    """The chroma (lora.modeling.chroma) of a tune: A, then C, then E, a third of the time each."""
    from lora.modeling import chroma as C

    wav = np.concatenate([tones([440.0], seconds / 3), tones([261.63], seconds / 3),
                          tones([329.63], seconds / 3)])
    return C.chroma(wav, SR)


# --------------------------------------------------------------------------------------------
# The web UI's browser tests (tests/webui/): what they need, and a free port
# --------------------------------------------------------------------------------------------
def require(what: str, ok: bool, module_level: bool = True) -> None:
    """Skip (fail with CI=true, as .ci/run sets it) when ``what`` is missing."""
    import pytest

    if ok:
        return
    msg = f"these tests need {what}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + ": CI=true, so this fails rather than skips", pytrace=False)
    pytest.skip(msg, allow_module_level=module_level)


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def require_demucs() -> None:
    """demucs (bash install.sh --separation; --dev installs it), or skip / fail the module."""
    require("demucs (bash install.sh --separation)", importable("demucs"))


def require_browser(module_level: bool = True) -> str:
    """gradio, playwright and Debian's chromium (its path), or skip / fail the module (or, with
    ``module_level=False``, the test) (require)."""
    import shutil

    require("gradio (bash install.sh --dev)", importable("gradio"), module_level)
    require("playwright (bash install.sh --dev)", importable("playwright"), module_level)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require("Debian's chromium (sudo apt-get install chromium)", chromium is not None, module_level)
    return chromium


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
