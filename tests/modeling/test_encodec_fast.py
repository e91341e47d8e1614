"""lora.modeling.encodec_fast: the chunked CPU EnCodec encoder of the token cache against
transformers' EncodecModel."""

from __future__ import annotations

import pytest
import torch

from lora.modeling import encodec_fast as ef


def fitted_codebooks(codec, seed: int = 0) -> None:
    """Codebooks spread like a trained codec's (so that codes depend on the audio, and near-ties
    exist): residual centroids drawn from the codec's own latents of noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = codec.encoder(torch.randn(4, 1, 64000, generator=g) * 0.1)
        res = lat.permute(0, 2, 1).reshape(-1, lat.shape[1])
        for layer in codec.quantizer.layers:
            book = layer.codebook
            pick = res[torch.randint(0, res.shape[0], (book.codebook_size,), generator=g)]
            book.embed.copy_(pick + 0.01 * res.std() * torch.randn(pick.shape, generator=g))
            res = res - book.embed[torch.cdist(res, book.embed).argmin(1)]


@pytest.fixture(scope="module")
def tiny_codec(tiny_model_dir):
    from transformers import MusicgenForConditionalGeneration

    return MusicgenForConditionalGeneration.from_pretrained(str(tiny_model_dir)).audio_encoder.eval()


@pytest.fixture(scope="module")
def encodec_32khz():
    """facebook/encodec_32khz's architecture (MusicGen's codec), random weights, fitted
    codebooks."""
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4],
                        target_bandwidths=[2.2],
                        codebook_size=2048, hidden_size=128, num_filters=64, num_residual_layers=1,
                        num_lstm_layers=2,
                        use_causal_conv=False, normalize=False, chunk_length_s=None, overlap=None,
                        norm_type="weight_norm", pad_mode="reflect", compress=2, trim_right_ratio=1.0,
                        use_conv_shortcut=False, kernel_size=7, last_kernel_size=7,
                        residual_kernel_size=3, dilation_growth_rate=2, codebook_dim=128)
    torch.manual_seed(0)
    codec = EncodecModel(cfg).eval()
    fitted_codebooks(codec)
    return codec


def compare(codec, n: int, batch: int = 2, seed: int = 1, frames_per_chunk=None, whole_from=None):
    x = torch.randn(batch, 1, n, generator=torch.Generator().manual_seed(seed)) * 0.1
    with torch.no_grad():
        ref_lat = codec.encoder(x)
        ref = codec.encode(x, return_dict=True).audio_codes[0]
        lat = ef.encoder_forward(codec.encoder, x, frames_per_chunk, whole_from)
        if whole_from is None:
            codes = ef.encode_codes(codec, x, frames_per_chunk=frames_per_chunk)
        else:
            codes = codec.quantizer.encode(lat, codec.config.target_bandwidths[0]).transpose(0, 1)
    return ref_lat, lat, ref, codes


# lengths: exactly on the chunk grid, odd tails, just past the unchunked limit, shorter than a
# chunk; the stack chunked whole (13 layers) or only its first stage (4), the rest on the whole clip
@pytest.mark.parametrize("whole_from", [13, 4])
@pytest.mark.parametrize("n", [32000 * 5, 32000 * 5 + 333, 64000 * 3 + 17, 101 * 640 + 1, 12345])
def test_chunked_encoder_equals_transformers_encoder(tiny_codec, n, whole_from):
    head = ef.stack_layers(tiny_codec.encoder)[:whole_from]
    per = 50 * 640 // ef.total_stride(head)  # 1-s chunks, as MusicGen's codec gets
    ref_lat, lat, ref, codes = compare(tiny_codec, n, frames_per_chunk=per, whole_from=whole_from)
    assert lat.shape == ref_lat.shape and codes.shape == ref.shape
    scale = ref_lat.abs().max()
    assert (lat - ref_lat).abs().max() <= 1e-5 * scale  # float rounding only
    # codes: the same up to the quantizer's near-ties, which flip on rounding (on the AMD EPYC one
    # code of a 5-s clip differed; on the Xeon none did)
    agree = (codes == ref).float().mean(dim=(0, 2))
    assert bool((agree >= 0.99).all()), agree


def test_unchunked_clips_are_bit_for_bit_transformers(tiny_codec):
    """The tiny codec's 4 filters make chunks of 16 s: its clips run in one piece, bit for bit
    transformers' codes and latents (the in-place ELUs and skipped zero-padding copies change no
    value)."""
    enc = tiny_codec.encoder
    assert not ef.chunked(ef.stack_layers(enc)[:ef.whole_clip_from(enc)], 32000 * 12)
    ref_lat, lat, ref, codes = compare(tiny_codec, 32000 * 6 + 77, batch=3)
    assert torch.equal(lat, ref_lat) and torch.equal(codes, ref)


@pytest.mark.slow
def test_chunked_encoder_on_musicgens_codec_architecture(encodec_32khz):
    """The real codec's layout (64 filters, 2 LSTM layers): 7.3 s clips cross several chunk
    boundaries of its first three stages; its last stage (512 channels) runs on the whole clip. Also
    with every layer chunked."""
    enc = encodec_32khz.encoder
    assert ef.supported(encodec_32khz)
    layers = ef.stack_layers(enc)
    assert ef.total_stride(layers) == 640
    assert ef.whole_clip_from(enc) == 10  # the last stage's residual block, ELU and convolution
    head = layers[:10]
    assert ef.total_stride(head) == 80
    assert ef.halo_samples(head) >= 227 + 80  # the first three stages' receptive field + one frame
    assert ef.chunk_frames(head) == 409  # 8 MiB of 64-channel activations: about 1 s
    x = torch.randn(2, 1, int(7.3 * 32000), generator=torch.Generator().manual_seed(1)) * 0.1
    bandwidth = encodec_32khz.config.target_bandwidths[0]
    with torch.no_grad():
        # transformers' encoder, once (EncodecModel.encode = this + its quantizer here)
        ref_lat = enc(x)
        ref = encodec_32khz.quantizer.encode(ref_lat, bandwidth).transpose(0, 1)
        runs = {"now": (ef.encoder_forward(enc, x), ef.encode_codes(encodec_32khz, x))}
        lat = ef.encoder_forward(enc, x, whole_from=len(layers))
        runs["every layer chunked"] = (lat,
                                       encodec_32khz.quantizer.encode(lat, bandwidth).transpose(0, 1))
    for lat, codes in runs.values():
        assert (lat - ref_lat).abs().max() <= 1e-5 * ref_lat.abs().max()
        agree = (codes == ref).float().mean(dim=(0, 2))
        assert ref[:, 0].unique().numel() > 50  # the codes vary with the audio (fitted codebooks)
        # near-ties may flip on rounding, at fp32's own rate
        assert bool((agree >= 0.999).all()), agree


@pytest.mark.parametrize("whole_from", [13, 4])
def test_a_halo_smaller_than_the_receptive_field_is_caught(tiny_codec, monkeypatch, whole_from):
    """Why the halo is what it is: with none, frames at chunk edges see the chunk's padding, not
    their neighbours."""
    monkeypatch.setattr(ef, "halo_samples", lambda layers: 0)
    head = ef.stack_layers(tiny_codec.encoder)[:whole_from]
    ref_lat, lat, _, _ = compare(tiny_codec, 32000 * 5, frames_per_chunk=50 * 640
                                 // ef.total_stride(head), whole_from=whole_from)
    assert (lat - ref_lat).abs().max() > 1e-3 * ref_lat.abs().max()


def test_codecs_of_other_layouts_use_transformers_encode(tiny_codec):
    import copy

    codec = copy.deepcopy(tiny_codec)
    codec.config.normalize = True  # 48-kHz-style normalisation: not chunked, transformers' own path
    assert not ef.supported(codec)
    x = torch.randn(1, 1, 32000 * 5) * 0.1
    with torch.no_grad():
        assert torch.equal(ef.encode_codes(codec, x), codec.encode(x, return_dict=True).audio_codes[0])


def test_input_is_not_changed_and_batch_rows_are_independent(tiny_codec):
    x = torch.randn(3, 1, 32000 * 4 + 7) * 0.1
    keep = x.clone()
    with torch.no_grad():
        both = ef.encoder_forward(tiny_codec.encoder, x, 50)
    assert torch.equal(x, keep)  # in-place ELUs never touch the caller's audio
    with torch.no_grad():
        alone = ef.encoder_forward(tiny_codec.encoder, x[1:2], 50)
    assert torch.allclose(both[1:2], alone, atol=1e-5 * alone.abs().max())
