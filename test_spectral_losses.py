"""Checks of losses.py against independent re-computations, as a script and under pytest.

    python test_spectral_losses.py        # prints one ✓ line per group, exits 1 naming the failing check
    python -m pytest test_spectral_losses.py

The references are written another way on purpose: framing, windowing and FFT in float64 NumPy for the
loss values (not torch.stft), the Slaney mel filterbank from its formula (and librosa where installed),
and float64 autograd through torch.stft for the gradients (losses.py differentiates by hand).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import sys
import traceback

import numpy as np
import torch

import losses
from codec import LATENT_DIM, SAMPLE_RATE, FrozenDecoder, load_codec
from losses import CombinedLoss, MelSpectrogramLoss, MultiResolutionSTFTLoss, rms_loss

FFT_SIZES, HOP_SIZES = (512, 1024, 2048), (128, 256, 512)
RTOL = 1e-4          # the bar for loss values
GRAD_RTOL = 2e-3     # float32 hand-written backward against float64 autograd, relative in norm
N_SAMPLES = 6000     # 0.25 s: longer than the 2048-point FFT, short enough to be fast


# ------------------------------------------------------------------------------------ references

def music_like(batch: int = 3, n: int = N_SAMPLES, seed: int = 0) -> torch.Tensor:
    """Float64 [batch, n]: a few sines with a decaying envelope plus a little noise (no bin is near the floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    rows = []
    for _ in range(batch):
        tone = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 6000) * t + rng.uniform(0, 6))
                   for _ in range(4))
        rows.append(tone * np.exp(-t * rng.uniform(0, 4)) + 0.01 * rng.standard_normal(n))
    return torch.from_numpy(np.stack(rows))


def hann_periodic(length: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)


def centred_window(fft_size: int, win_length: int) -> np.ndarray:
    left = (fft_size - win_length) // 2
    return np.pad(hann_periodic(win_length), (left, fft_size - win_length - left))


def numpy_magnitude(x: np.ndarray, fft_size: int, hop: int, win_length: int | None = None) -> np.ndarray:
    """[B, N] -> [B, bins, frames]: reflect-pad n_fft/2, frame every hop, window, rfft, sqrt(max(power, 1e-7))."""
    window = centred_window(fft_size, win_length or fft_size)
    padded = np.pad(x, ((0, 0), (fft_size // 2, fft_size // 2)), mode="reflect")
    frames = 1 + (padded.shape[1] - fft_size) // hop
    index = np.arange(fft_size)[None, :] + hop * np.arange(frames)[:, None]
    spectrum = np.fft.rfft(padded[:, index] * window, axis=-1)             # [B, frames, bins]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return np.sqrt(np.maximum(power, 1e-7)).transpose(0, 2, 1)


def numpy_stft_terms(pred: np.ndarray, ref: np.ndarray, fft_size: int, hop: int, win_length=None):
    x, y = numpy_magnitude(pred, fft_size, hop, win_length), numpy_magnitude(ref, fft_size, hop, win_length)
    sc = np.sqrt(((y - x) ** 2).sum()) / np.sqrt((y ** 2).sum())
    return sc, np.abs(np.log(y) - np.log(x)).mean()


def slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """[n_mels, bins]: Slaney's Auditory Toolbox mel scale (linear below 1 kHz, log above), area-normalised."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / log_step, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(log_step * (m - min_log_mel)), f_sp * m)

    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    bank = np.zeros((n_mels, freqs.size))
    for m in range(n_mels):
        rising = (freqs - edges[m]) / (edges[m + 1] - edges[m])
        falling = (edges[m + 2] - freqs) / (edges[m + 2] - edges[m + 1])
        bank[m] = np.maximum(0, np.minimum(rising, falling)) * 2.0 / (edges[m + 2] - edges[m])
    return bank


def mel_centres_hz(sr=SAMPLE_RATE, n_mels=80, f_min=0.0, f_max=8000.0) -> np.ndarray:
    """Centre frequency of each Slaney mel band (where its triangle peaks)."""
    bank = slaney_mel_filterbank(sr, 1 << 16, n_mels, f_min, f_max)      # fine grid: the peak is the centre
    return np.linspace(0, sr / 2, bank.shape[1])[bank.argmax(axis=1)]


def numpy_mel_loss(pred: np.ndarray, ref: np.ndarray) -> float:
    bank = slaney_mel_filterbank(SAMPLE_RATE, 1024, 80, 0.0, 8000.0)
    def log_mel(x):
        return np.log(np.maximum(np.einsum("mk,bkt->bmt", bank, numpy_magnitude(x, 1024, 256)), 1e-5))
    return np.abs(log_mel(pred) - log_mel(ref)).mean()


def torch_magnitude64(x: torch.Tensor, fft_size: int, hop: int) -> torch.Tensor:
    """Float64 autograd reference of the floored magnitude (the gradient path losses.py does by hand)."""
    window = torch.from_numpy(hann_periodic(fft_size))
    spec = torch.stft(x, fft_size, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    return torch.sqrt(torch.clamp(spec.real ** 2 + spec.imag ** 2, min=1e-7))


def torch_mrstft64(pred, ref):
    total = 0.0
    for fft_size, hop in zip(FFT_SIZES, HOP_SIZES):
        x, y = torch_magnitude64(pred, fft_size, hop), torch_magnitude64(ref, fft_size, hop)
        total = total + torch.linalg.norm(y - x) / torch.linalg.norm(y) + (y.log() - x.log()).abs().mean()
    return total / len(FFT_SIZES)


def torch_mel64(pred, ref):
    bank = torch.from_numpy(slaney_mel_filterbank(SAMPLE_RATE, 1024, 80, 0.0, 8000.0))
    def log_mel(x):
        return torch.clamp(bank @ torch_magnitude64(x, 1024, 256), min=1e-5).log()
    return (log_mel(pred) - log_mel(ref)).abs().mean()


def gradient32(loss, pred64: torch.Tensor, ref64: torch.Tensor) -> tuple[float, torch.Tensor]:
    pred = pred64.float().requires_grad_(True)
    value = loss(pred, ref64.float())
    value.backward()
    return value.item(), pred.grad.double()


def gradient64(reference, pred64: torch.Tensor, ref64: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The reference evaluated at the float32-rounded inputs, so only the arithmetic differs."""
    pred = pred64.float().double().requires_grad_(True)
    value = reference(pred, ref64.float().double())
    value.backward()
    return value.item(), pred.grad


def assert_close(actual: float, expected: float, rtol: float, what: str) -> None:
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-7), \
        f"{what}: {actual:.8g} != reference {expected:.8g} (relative error {abs(actual - expected) / abs(expected):.2e})"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite gradient"
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < GRAD_RTOL, f"{what}: gradient differs from float64 autograd by {error:.2e} (relative, in norm)"


def assert_value_error(call, fragment: str) -> None:
    try:
        call()
    except ValueError as error:
        assert fragment in str(error), f"ValueError {str(error)!r} does not mention {fragment!r}"
        return
    raise AssertionError(f"expected a ValueError mentioning {fragment!r}")


def assert_finite_loss_and_grad(loss, pred: torch.Tensor, ref: torch.Tensor, what: str) -> torch.Tensor:
    pred = pred.clone().requires_grad_(True)
    value = loss(pred, ref)
    value.backward()
    assert torch.isfinite(value), f"{what}: loss is {value.item()}"
    assert torch.isfinite(pred.grad).all(), f"{what}: non-finite gradient"
    return value.detach()


# ---------------------------------------------------------------------------------------- checks

def check_rms() -> None:
    pred, ref = music_like(seed=1), music_like(seed=2)
    expected = np.mean([math.sqrt(np.mean((p - r) ** 2) + 1e-8) for p, r in zip(pred.numpy(), ref.numpy())])
    assert_close(rms_loss(pred.float(), ref.float()).item(), expected, RTOL, "rms_loss [B, N]")
    assert_close(rms_loss(pred.float()[:, None], ref.float()[:, None]).item(), expected, RTOL, "rms_loss [B, 1, N]")
    # a perfect match: sqrt(eps) per item and a zero, finite gradient (eps keeps the sqrt differentiable)
    same = pred.float().requires_grad_(True)
    value = rms_loss(same, pred.float())
    value.backward()
    assert_close(value.item(), 1e-4, 1e-3, "rms_loss of identical inputs")
    assert torch.isfinite(same.grad).all() and same.grad.abs().max() == 0, "rms_loss gradient at a perfect match"
    # the gradient is the formula's: (p - r) / (B N rms_b)
    p = pred.float().requires_grad_(True)
    rms_loss(p, ref.float()).backward()
    diff = pred - ref
    analytic = diff / (pred.shape[0] * pred.shape[1] * torch.sqrt(diff.square().mean(1, keepdim=True) + 1e-8))
    assert_grad_close(p.grad.double(), analytic, "rms_loss")
    bf16 = rms_loss(pred.bfloat16(), ref.bfloat16())
    assert bf16.dtype == torch.float32, f"rms_loss of bf16 inputs returned {bf16.dtype}"
    assert_close(bf16.item(), rms_loss(pred.bfloat16().float(), ref.bfloat16().float()).item(), 1e-6, "rms bf16")
    assert_value_error(lambda: rms_loss(pred.float(), ref.float()[:, :100]), "differ in shape")
    assert_value_error(lambda: rms_loss(pred.float()[:, None].expand(-1, 2, -1), ref.float()[:, None]), "[B, 1, N]")


def check_stft() -> None:
    pred, ref = music_like(seed=3), music_like(seed=4)
    loss = MultiResolutionSTFTLoss()
    per_resolution = [numpy_stft_terms(pred.numpy(), ref.numpy(), n, h) for n, h in zip(FFT_SIZES, HOP_SIZES)]
    sc, log_mag = (float(np.mean(values)) for values in zip(*per_resolution))
    got_sc, got_log_mag = loss.terms(pred.float(), ref.float())
    assert_close(got_sc.item(), sc, RTOL, "spectral convergence")
    assert_close(got_log_mag.item(), log_mag, RTOL, "log STFT magnitude")
    assert_close(loss(pred.float()[:, None], ref.float()[:, None]).item(), sc + log_mag, RTOL, "MR-STFT [B, 1, N]")

    # a window shorter than the FFT is centred in it with zeros
    short = MultiResolutionSTFTLoss(fft_sizes=(1024,), hop_sizes=(240,), win_lengths=(600,))
    expected = sum(numpy_stft_terms(pred.numpy(), ref.numpy(), 1024, 240, 600))
    assert_close(short(pred.float(), ref.float()).item(), expected, RTOL, "MR-STFT with win_length 600")

    value, grad = gradient32(loss, pred, ref)
    ref_value, ref_grad = gradient64(torch_mrstft64, pred, ref)
    assert_close(value, ref_value, RTOL, "MR-STFT against float64 torch")
    assert_grad_close(grad, ref_grad, "MR-STFT")

    # the reference side is a constant: no gradient reaches it even when it requires one
    constant = ref.float().requires_grad_(True)
    loss(pred.float().requires_grad_(True), constant).backward()
    assert constant.grad is None, "MR-STFT sent a gradient to the reference"

    zeros = torch.zeros(2, N_SAMPLES)
    same = assert_finite_loss_and_grad(loss, pred.float(), pred.float(), "MR-STFT identical")
    assert same.item() == 0.0, f"MR-STFT of identical inputs is {same.item()}, not 0"
    assert_finite_loss_and_grad(loss, zeros, zeros, "MR-STFT silence vs silence")
    assert_finite_loss_and_grad(loss, pred.float()[:2], zeros, "MR-STFT audio vs silence")
    assert_finite_loss_and_grad(loss, zeros, ref.float()[:2], "MR-STFT silence vs audio")

    assert_value_error(lambda: loss(pred.float()[:, :2000], ref.float()[:, :2000]), "2048")
    assert_value_error(lambda: loss(pred.float(), ref.float()[:2]), "differ in shape")
    assert_value_error(lambda: MultiResolutionSTFTLoss(fft_sizes=(512, 1024), hop_sizes=(128,)), "equal length")
    check_half_precision(loss, pred.float(), ref.float(), "MR-STFT")
    check_buffers(loss, "MR-STFT")


def check_mel() -> None:
    loss = MelSpectrogramLoss()
    bank = slaney_mel_filterbank(SAMPLE_RATE, 1024, 80, 0.0, 8000.0)
    # float32 cancellation in a triangle's far tail leaves ~1e-6 of the largest weight: compare on that scale
    atol = 1e-5 * bank.max()
    assert np.allclose(loss.mel_basis.double().numpy(), bank, rtol=1e-4, atol=atol), "mel filterbank != Slaney formula"
    try:
        import librosa
    except ImportError:
        librosa = None
    if librosa is not None:
        reference = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0)
        assert np.allclose(loss.mel_basis.numpy(), reference, rtol=1e-4, atol=atol), "mel filterbank != librosa"

    # a sine at a band's centre frequency peaks in that band
    centres = mel_centres_hz()
    t = torch.arange(SAMPLE_RATE // 2, dtype=torch.float64) / SAMPLE_RATE
    for band in (5, 30, 60, 75):
        sine = torch.sin(2 * math.pi * centres[band] * t).float()
        mel = loss.mel_basis @ loss.stft(sine[None])[0]
        peak = int(mel.mean(dim=1).argmax())
        assert peak == band, f"a {centres[band]:.0f} Hz sine peaks in mel band {peak}, not {band}"

    pred, ref = music_like(seed=5), music_like(seed=6)
    assert_close(loss(pred.float(), ref.float()).item(), numpy_mel_loss(pred.numpy(), ref.numpy()), RTOL, "mel loss")
    value, grad = gradient32(loss, pred, ref)
    ref_value, ref_grad = gradient64(torch_mel64, pred, ref)
    assert_close(value, ref_value, RTOL, "mel loss against float64 torch")
    assert_grad_close(grad, ref_grad, "mel loss")

    zeros = torch.zeros(2, N_SAMPLES)
    same = assert_finite_loss_and_grad(loss, pred.float(), pred.float(), "mel identical")
    assert same.item() == 0.0, f"mel loss of identical inputs is {same.item()}, not 0"
    silence = assert_finite_loss_and_grad(loss, zeros, zeros, "mel silence vs silence")
    assert silence.item() == 0.0, "mel loss of silence against silence is not 0"
    assert_finite_loss_and_grad(loss, pred.float()[:2], zeros, "mel audio vs silence")
    assert_value_error(lambda: loss(pred.float()[:, :1000], ref.float()[:, :1000]), "1024")
    assert_value_error(lambda: MelSpectrogramLoss(f_max=20000.0), "f_max")
    check_half_precision(loss, pred.float(), ref.float(), "mel")
    check_buffers(loss, "mel")


def check_half_precision(loss, pred: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """bf16 / fp16 inputs and autocast regions are computed in float32."""
    for dtype in (torch.bfloat16, torch.float16):
        low = loss(pred.to(dtype), ref.to(dtype))
        assert low.dtype == torch.float32, f"{what}: {dtype} inputs gave a {low.dtype} loss"
        assert_close(low.item(), loss(pred.to(dtype).float(), ref.to(dtype).float()).item(), 1e-6, f"{what} {dtype}")
        leaf = pred.to(dtype).requires_grad_(True)
        loss(leaf, ref.to(dtype)).backward()
        assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all(), f"{what}: {dtype} gradient"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(pred, ref)
    assert inside.dtype == torch.float32, f"{what}: autocast gave a {inside.dtype} loss"
    assert_close(inside.item(), loss(pred, ref).item(), 1e-6, f"{what} under autocast")


def check_buffers(module: torch.nn.Module, what: str) -> None:
    """Windows and filterbanks move with .to() but are not checkpoint state."""
    buffers = dict(module.named_buffers())
    assert buffers and not module.state_dict(), f"{what}: buffers {list(module.state_dict())} are persistent"
    moved = module.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in moved.buffers()), f"{what}: .to() did not move the buffers"
    module.to(torch.float32)


@contextlib.contextmanager
def recording_spectral_work():
    """Record which spectral terms prepare a gradient in the forward and which STFTs run a backward."""
    work = {"gradient_prepared": [], "backward_ffts": []}
    originals = (losses.SpectralConvergenceLoss.value_and_grad, losses.LogSTFTMagnitudeLoss.value_and_grad,
                 losses.LogMelLoss.value_and_grad, losses.STFTMagnitude.magnitude_backward)

    def recorded(function):
        signature = inspect.signature(function)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            work["gradient_prepared"].append(bool(bound.arguments["need_grad"]))
            return function(*args, **kwargs)
        return wrapper

    def backward(self, *args, **kwargs):
        work["backward_ffts"].append(self.fft_size)
        return originals[3](self, *args, **kwargs)
    losses.SpectralConvergenceLoss.value_and_grad = staticmethod(recorded(originals[0]))
    losses.LogSTFTMagnitudeLoss.value_and_grad = staticmethod(recorded(originals[1]))
    losses.LogMelLoss.value_and_grad = recorded(originals[2])
    losses.STFTMagnitude.magnitude_backward = backward
    try:
        yield work
    finally:
        (losses.SpectralConvergenceLoss.value_and_grad, losses.LogSTFTMagnitudeLoss.value_and_grad,
         losses.LogMelLoss.value_and_grad, losses.STFTMagnitude.magnitude_backward) = (
            staticmethod(originals[0]), staticmethod(originals[1]), originals[2], originals[3])


def check_combined() -> None:
    pred, inp, tgt = (music_like(seed=s).float()[:, None] for s in (7, 8, 9))
    weights = dict(rms_input=0.3, rms_target=0.4, spectral=0.2, mel=0.1)
    loss = CombinedLoss(**weights)
    total, components = loss(pred, inp, tgt)
    assert set(components) == {"rms_input", "rms_target", "spectral", "mel"}, sorted(components)
    expected = {"rms_input": rms_loss(pred, inp).item(), "rms_target": rms_loss(pred, tgt).item(),
                "spectral": MultiResolutionSTFTLoss()(pred, tgt).item(), "mel": MelSpectrogramLoss()(pred, tgt).item()}
    for name, value in expected.items():
        assert_close(components[name].item(), value, 1e-6, f"component {name}")
        assert not components[name].requires_grad, f"component {name} is not detached"
    weighted = sum(w * expected[name] for w, name in zip(weights.values(), expected))
    assert_close(total.item(), weighted, 1e-6, "total = weighted sum")

    # the gradient of the total is the weighted sum of the separate losses' gradients
    leaf = pred.clone().requires_grad_(True)
    loss(leaf, inp, tgt)[0].backward()
    separate = pred.clone().requires_grad_(True)
    (0.3 * rms_loss(separate, inp) + 0.4 * rms_loss(separate, tgt) + 0.2 * MultiResolutionSTFTLoss()(separate, tgt)
     + 0.1 * MelSpectrogramLoss()(separate, tgt)).backward()
    assert_grad_close(leaf.grad.double(), separate.grad.double(), "combined loss")

    # Zero-weight components are measured but never differentiated: record, per spectral term, whether
    # the forward prepared its gradient, and count the backward passes through an STFT.
    with recording_spectral_work() as work:
        rms_only = CombinedLoss(rms_input=0.5, rms_target=0.5)
        total, components = rms_only(pred.clone().requires_grad_(True), inp, tgt)
        total.backward()
        assert components["spectral"] > 0 and components["mel"] > 0, "zero-weight components were not measured"
        assert not any(work["gradient_prepared"]), f"zero-weight terms prepared gradients: {work}"
        assert work["backward_ffts"] == [], f"zero-weight spectral/mel losses cost backward passes: {work}"
        assert_close(total.item(), 0.5 * expected["rms_input"] + 0.5 * expected["rms_target"], 1e-6, "RMS-only total")
    with recording_spectral_work() as work:
        mel_only = CombinedLoss(rms_target=0.0, mel=1.0)
        mel_only(pred.clone().requires_grad_(True), inp, tgt)[0].backward()
        assert work["gradient_prepared"].count(True) == 1, f"only the mel term needs a gradient: {work}"
        assert work["backward_ffts"] == [1024], f"the mel loss alone backpropagates one 1024 STFT: {work}"

    _, same = CombinedLoss()(tgt, inp, tgt)
    assert same["spectral"] == 0 and same["mel"] == 0, f"identical output and target: {same}"
    zeros = torch.zeros_like(pred)
    total, silent = CombinedLoss(rms_input=1, rms_target=1, spectral=1, mel=1)(zeros.clone().requires_grad_(True), zeros, zeros)
    assert all(torch.isfinite(v) for v in silent.values()) and torch.isfinite(total), f"silence: {silent}"
    assert_value_error(lambda: CombinedLoss(rms_input=-1.0), "--loss_weight_input must be a number >= 0")
    assert_value_error(lambda: CombinedLoss(rms_target=0.0), "all four --loss_weight_* are 0")
    assert_value_error(lambda: loss(pred, inp[..., :-1], tgt), "differ in shape")
    assert_value_error(lambda: loss(pred[..., :2000], inp[..., :2000], tgt[..., :2000]), "2048")


class TinyTransformer(torch.nn.Module):
    """A transformer-like latent predictor: [B, 128, T] -> [B, 128, T]."""

    def __init__(self, d_model: int = 32):
        super().__init__()
        self.inp = torch.nn.Linear(LATENT_DIM, d_model)
        self.block = torch.nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, batch_first=True)
        self.out = torch.nn.Linear(d_model, LATENT_DIM)

    def forward(self, latents):
        return self.out(self.block(self.inp(latents.transpose(1, 2)))).transpose(1, 2)


def check_gradients() -> None:
    torch.manual_seed(0)
    codec = load_codec("random")
    decoder = FrozenDecoder(codec)
    frozen_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    codec_before = {k: v.clone() for k, v in codec.state_dict().items()}
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    frames = 8                                               # 8 x 320 = 2560 samples >= the 2048-point FFT
    latents = torch.randn(2, LATENT_DIM, frames)
    audio = decoder(model(latents))
    assert audio.shape == (2, 1, frames * 320), f"decoder output {list(audio.shape)}"
    input_audio, target_audio = 0.1 * torch.randn_like(audio), 0.1 * torch.randn_like(audio)
    total, _ = CombinedLoss(rms_input=0.25, rms_target=0.25, spectral=0.25, mel=0.25)(audio, input_audio, target_audio)
    total.backward()
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        assert grad is not None, f"{name}: no gradient"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        assert grad.abs().sum() > 0, f"{name}: zero gradient"
    for name, parameter in list(decoder.named_parameters()) + list(codec.named_parameters()):
        assert not parameter.requires_grad and parameter.grad is None, f"decoder weight {name} got a gradient"
    optimizer.step()
    for before, after in ((frozen_before, decoder.state_dict()), (codec_before, codec.state_dict())):
        changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
        assert not changed, f"decoder weights changed: {changed[:3]}"


CHECKS = (("RMS loss: works", check_rms), ("STFT loss: works", check_stft), ("Mel loss: works", check_mel),
          ("Combined loss: works", check_combined), ("Gradients: flow correctly", check_gradients))


# ---------------------------------------------------------------------------------------- pytest

def test_rms_loss():
    check_rms()


def test_stft_loss():
    check_stft()


def test_mel_loss():
    check_mel()


def test_combined_loss():
    check_combined()


def test_gradients_flow_through_the_frozen_decoder():
    check_gradients()


def main() -> int:
    for label, check in CHECKS:
        try:
            check()
        except Exception as error:  # noqa: BLE001 - report any failure by the check's name
            traceback.print_exc()
            print(f"✗ {label.split(':')[0]}: FAILED ({type(error).__name__}: {error})")
            return 1
        print(f"✓ {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
