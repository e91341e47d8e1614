"""Shared pytest fixtures: tiny models, example data and a trained adapter, built once per session.

Nothing here downloads: models are tiny random MusicGens built from config
(lora.modeling.tiny_model), data is the synthetic example set (lora.prepare_data --create_example).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

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


def make_tiny_clap(directory: Path) -> Path:
    """A tiny random CLAP (transformers ClapModel + ClapProcessor) saved with save_pretrained, as a
    real unfused CLAP folder is: its feature extractor truncates with rand_trunc (what
    pipeline("zero-shot-audio-classification") needs for an unfused model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizerFast
    from transformers.models.clap.configuration_clap import ClapAudioConfig, ClapTextConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["lofi piano beat", "hip hop 808 trap drums", "ambient synth pad",
                             "This is rock music.", "This music sounds calm."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>",
                                                                                "<unk>", "<mask>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    rt = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", mask_token="<mask>")
    tc = ClapTextConfig(vocab_size=len(rt), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, projection_dim=16)
    ac = ClapAudioConfig(num_mel_bins=64, window_size=8, spec_size=256, patch_size=4, patch_stride=4,
                         hidden_size=32, patch_embeds_hidden_size=16, projection_dim=16, depths=[1, 1],
                         num_attention_heads=[2, 2], intermediate_size=37)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=tc.to_dict(), audio_config=ac.to_dict(), projection_dim=16))
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=10, truncation="rand_trunc")
    model.save_pretrained(directory)
    ClapProcessor(feature_extractor=fe, tokenizer=rt).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_clap_dir(tmp_path_factory) -> Path:
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
