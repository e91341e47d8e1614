"""Helpers the test files share: plain functions and constants (the shared fixtures are in
tests/conftest.py). Import them as ``from tests.helpers import ...`` (pytest's ``pythonpath``
puts the repository root on sys.path)."""

from __future__ import annotations

from pathlib import Path

# The repository root (tests/ is one level below it; the test files sit one or two levels down).
ROOT = Path(__file__).resolve().parent.parent


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
    proc = ClapProcessor(feature_extractor=ClapFeatureExtractor(feature_size=64,
                                                                sampling_rate=48000, max_length_s=10),
                         tokenizer=rt)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory
