"""Discriminator shapes per scale, the hinge and feature-matching losses against direct recomputation, EMA."""
from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from music_continuation.adversarial.discriminator import MultiScaleSTFTDiscriminator
from music_continuation.adversarial.losses import FeatureMatchingLoss, HingeDiscriminatorLoss, HingeGeneratorLoss
from music_continuation.optim.ema import ModelEMA

# AudioCraft config/solver/compression/default.yaml, msstftd: n_ffts, hop_lengths, win_lengths, filters 32
AUDIOCRAFT_SCALES = ((1024, 256, 1024), (2048, 512, 2048), (512, 128, 512), (256, 64, 256), (128, 32, 128))


def test_each_scale_has_audiocrafts_shapes_and_spectrogram():
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator()
    samples = 4800
    x = torch.randn(2, 1, samples)
    logits, maps = disc(x)
    assert len(logits) == len(maps) == 5
    for scale, (n_fft, hop, win), logit, fmaps in zip(disc.scales, AUDIOCRAFT_SCALES, logits, maps):
        assert (scale.n_fft, scale.hop_length, scale.win_length) == (n_fft, hop, win)
        frames = 1 + (samples - n_fft) // hop            # center=False
        bins = n_fft // 2 + 1
        widths = [bins]
        for _ in range(3):                                 # kernel 9, padding 4, stride 2 on frequency
            widths.append((widths[-1] + 2 * 4 - 9) // 2 + 1)
        widths.append(widths[-1])                          # the (3, 3) convolution keeps the size
        assert [list(m.shape) for m in fmaps] == [[2, 32, frames, width] for width in widths]
        strided = widths[-1]
        assert list(logit.shape) == [2, 1, frames, strided]
        # the input is torchaudio's normalised complex spectrogram, real and imaginary parts as channels
        reference = torchaudio.transforms.Spectrogram(n_fft, win, hop, normalized=True, center=False,
                                                      power=None)(x[:, 0])                # [B, bins, frames]
        expected = torch.stack([reference.real, reference.imag], 1).transpose(2, 3)
        torch.testing.assert_close(scale.spectrogram(x), expected, rtol=1e-5, atol=1e-6)
    weight_normed = [name for name, _ in disc.named_parameters() if "original0" in name]
    assert len(weight_normed) == 5 * 5                     # all convolutions but the first of each scale


def test_hinge_losses_against_direct_recomputation():
    torch.manual_seed(1)
    real = [torch.randn(2, 1, 5, 7) * 2 for _ in range(3)]
    fake = [torch.randn(2, 1, 5, 7) * 2 for _ in range(3)]
    expected_d = sum(sum(max(0.0, 1 - v) for v in r.flatten().tolist()) / r.numel()
                     + sum(max(0.0, 1 + v) for v in f.flatten().tolist()) / f.numel()
                     for r, f in zip(real, fake)) / 3
    assert HingeDiscriminatorLoss()(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    expected_g = sum(-sum(f.flatten().tolist()) / f.numel() for f in fake) / 3
    assert HingeGeneratorLoss()(fake).item() == pytest.approx(expected_g, rel=1e-6, abs=1e-7)


def test_feature_matching_is_the_normalised_l1_and_the_reference_is_constant():
    torch.manual_seed(2)
    real = [[torch.randn(2, 3, 4, 5) for _ in range(2)] for _ in range(3)]
    fake = [[torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(2)] for _ in range(3)]
    total = 0.0
    for fake_scale, real_scale in zip(fake, real):
        for f, r in zip(fake_scale, real_scale):
            diff = [abs(a - b) for a, b in zip(f.flatten().tolist(), r.flatten().tolist())]
            total += (sum(diff) / len(diff)) / (sum(abs(v) for v in r.flatten().tolist()) / r.numel())
    loss = FeatureMatchingLoss()(fake, [[r.requires_grad_() for r in s] for s in real])
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)
    loss.backward()
    assert all(r.grad is None for s in real for r in s)
    for fake_scale, real_scale in zip(fake, real):    # d/dy of mean|y - x| / mean|x|, over the 6 maps
        for f, r in zip(fake_scale, real_scale):
            expected = torch.sign(f.detach() - r.detach()) / (f.numel() * r.detach().abs().mean() * 6)
            torch.testing.assert_close(f.grad, expected, rtol=1e-6, atol=0)
    same = [[r.clone() for r in s] for s in real]
    assert FeatureMatchingLoss()(same, real).item() == 0.0


def test_losses_are_float32_under_bf16_autocast():
    disc = MultiScaleSTFTDiscriminator(filters=4)
    x = torch.randn(1, 1, 2048)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, maps = disc(x)
        loss = HingeDiscriminatorLoss()(logits, logits) + FeatureMatchingLoss()(maps, maps)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_ema_is_the_bias_corrected_average_and_swaps_back_exactly():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, 0.9)
    history = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        history.append(model[0].weight.detach().clone())
        ema.update(model)
    weights = [0.9 ** (3 - t) for t in range(4)]
    expected = sum(w * h for w, h in zip(weights, history)) / sum(weights)
    torch.testing.assert_close(ema.average["0.weight"], expected, rtol=1e-6, atol=1e-6)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model):
        torch.testing.assert_close(model[0].weight, expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    assert ema.state_dict_for(model)["1.num_batches_tracked"].dtype == torch.int64
    copy = ModelEMA(model, 0.5)
    copy.load_state_dict(ema.state_dict())
    assert copy.count == ema.count and all(torch.equal(copy.average[k], v) for k, v in ema.average.items())
