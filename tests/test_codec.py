"""The codec module: loading paths, fingerprints, chunked encoding and the frozen decoder."""
import urllib.error

import pytest
import torch

from music_continuation import codec
from music_continuation.codec import CHECKPOINT_NAME, HOP_LENGTH, LATENT_DIM, CodecLoadError, FrozenDecoder, load_codec


@pytest.fixture(scope="module")
def random_codec():
    return load_codec("random")


def test_constants_agree_with_the_model(random_codec):
    audio = torch.zeros(1, 1, 7 * HOP_LENGTH)
    latents = codec.encode(random_codec, audio)
    assert latents.shape == (1, LATENT_DIM, 7)
    assert codec.SAMPLE_RATE == random_codec.sample_rate
    assert codec.FRAME_RATE * HOP_LENGTH == codec.SAMPLE_RATE


def test_local_checkpoint_file_and_directory_load_the_same_weights(random_codec, tmp_path):
    torch.save(random_codec.state_dict(), tmp_path / CHECKPOINT_NAME)
    expected = codec.codec_fingerprint(random_codec)
    assert codec.codec_fingerprint(load_codec(str(tmp_path))) == expected
    assert codec.codec_fingerprint(load_codec(str(tmp_path / CHECKPOINT_NAME))) == expected


def test_fingerprint_sees_a_single_changed_weight(random_codec):
    other = load_codec("random")
    with torch.no_grad():
        next(other.decoder.parameters()).view(-1)[0] += 1e-3
    assert codec.codec_fingerprint(other) != codec.codec_fingerprint(random_codec)
    with pytest.raises(CodecLoadError, match="garbage"):
        codec.check_fingerprint(codec.codec_fingerprint(random_codec), codec.codec_fingerprint(other), "the cache")


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"not a checkpoint", "not a readable"),
                                              ({"x": 1}, "not an EnCodec")])
def test_bad_weights_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "weights.th"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CodecLoadError, match=message) as error:
        load_codec(str(path))
    assert "\n" not in str(error.value)


def test_offline_pretrained_names_both_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CodecLoadError) as error:
        load_codec("pretrained")
    assert "--encodec_weights random" in str(error.value) and CHECKPOINT_NAME in str(error.value)


def test_chunked_encoding_matches_one_pass(random_codec):
    audio = torch.randn(1, 1, 3 * codec.SAMPLE_RATE + 100)   # a partial last frame is dropped
    whole = random_codec.encoder(audio[..., : audio.shape[-1] // HOP_LENGTH * HOP_LENGTH])
    chunked = codec.encode(random_codec, audio, chunk_seconds=1.0, context_seconds=0.5)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-3)


def test_frozen_decoder_matches_codec_and_passes_gradients_only(random_codec):
    decoder = FrozenDecoder(random_codec)
    latents = torch.randn(2, LATENT_DIM, 6, requires_grad=True)
    with torch.no_grad():
        reference = random_codec.decoder(latents)
    audio = decoder(latents)
    torch.testing.assert_close(audio, reference, atol=1e-5, rtol=1e-4)
    audio.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters())
    decoder.eval()
    assert decoder.decoder.training, "the decoder stays in train mode (cuDNN LSTM backward needs it)"


def test_decoder_checkpointing_gives_the_same_gradients(random_codec):
    latents = torch.randn(3, LATENT_DIM, 5)
    grads = []
    for checkpointing in (False, True):
        leaf = latents.clone().requires_grad_(True)
        FrozenDecoder(random_codec, checkpointing=checkpointing)(leaf).square().mean().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
