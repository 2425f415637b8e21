"""Specification of losses.py, checked against independent re-computations.

    python -m pytest -q tests/losses/test_spectral_losses.py   # one small named test per property
    python test_spectral_losses.py     # the same tests: one ✓ line per group (the guide's five
                                                  # lines), then the counts; exit 1 if any fails

The references are written another way on purpose: framing, windowing and FFT in float64 NumPy for the
loss values (not torch.stft), the Slaney mel filterbank from its formula (and librosa where installed),
and float64 autograd through torch.stft for the gradients (losses.py differentiates the STFT by hand).

Tolerances follow from what is compared:
  - the same float32 computation reached two ways (a component of CombinedLoss and the loss alone, bf16
    inputs and their float32 cast, inside and outside autocast) must agree exactly;
  - a float32 loss against its float64 reference: RTOL (the issue's bar; observed errors are ~1e-6);
  - float32 gradients against float64 autograd: relative error in norm (see MAGNITUDE_GRAD_RTOL, GRAD_RTOL).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from music_continuation.codec import LATENT_DIM, SAMPLE_RATE, FrozenDecoder, load_codec
from music_continuation.losses import audio as losses
from music_continuation.losses.audio import (
    LOSS_COMPONENTS,
    MAGNITUDE_FLOOR,
    MEL_FLOOR,
    RMS_EPS,
    CombinedLoss,
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    STFTMagnitude,
    rms_loss,
)

FFT_SIZES, HOP_SIZES = (512, 1024, 2048), (128, 256, 512)
N_SAMPLES = 6000         # 0.25 s: longer than the 2048-point FFT, short enough to be fast
F32_EPS = torch.finfo(torch.float32).eps
RTOL = 1e-4              # the bar for float32 loss values against float64 references
# The hand-written STFT backward in float32 against float64 autograd, relative in norm: the FFT's rounding
# is relative to a frame's energy and is divided by each bin's magnitude (S / X), so bins far below the
# frame's level amplify it; measured 5e-6 to 1e-5 on these signals.
MAGNITUDE_GRAD_RTOL = 5e-5
# A whole loss's gradient: as above, plus |log X - log Y| and |M(X) - M(Y)| whose sign flips between
# float32 and float64 where the two are within rounding of each other (each flip moves a bin's term by 2/n).
GRAD_RTOL = 2e-3


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


def half_silent(seed: int = 0) -> torch.Tensor:
    """music_like with its second half exactly 0: about 40 % of the STFT bins lie at the magnitude floor."""
    x = music_like(seed=seed)
    x[:, N_SAMPLES // 2:] = 0.0
    return x


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


SLANEY_BANK = slaney_mel_filterbank(SAMPLE_RATE, 1024, 80, 0.0, 8000.0)


def mel_centres_hz(sr=SAMPLE_RATE, n_mels=80, f_min=0.0, f_max=8000.0) -> np.ndarray:
    """Centre frequency of each Slaney mel band (where its triangle peaks)."""
    bank = slaney_mel_filterbank(sr, 1 << 16, n_mels, f_min, f_max)      # fine grid: the peak is the centre
    return np.linspace(0, sr / 2, bank.shape[1])[bank.argmax(axis=1)]


def numpy_mel_loss(pred: np.ndarray, ref: np.ndarray) -> float:
    def log_mel(x):
        return np.log(np.maximum(np.einsum("mk,bkt->bmt", SLANEY_BANK, numpy_magnitude(x, 1024, 256)), 1e-5))
    return np.abs(log_mel(pred) - log_mel(ref)).mean()


def numpy_rms(pred: np.ndarray, ref: np.ndarray) -> float:
    """mean_b of mse_b / sqrt(max(mse_b, 1e-8)), in float64."""
    mse = ((pred - ref) ** 2).mean(axis=-1)
    return float(np.mean(mse / np.sqrt(np.maximum(mse, 1e-8))))


def torch_magnitude64(x: torch.Tensor, fft_size: int, hop: int, win_length: int | None = None) -> torch.Tensor:
    """Float64 autograd reference of the floored magnitude (the gradient path losses.py does by hand)."""
    window = torch.from_numpy(centred_window(fft_size, win_length or fft_size))
    spec = torch.stft(x, fft_size, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    return torch.sqrt(torch.clamp(spec.real ** 2 + spec.imag ** 2, min=1e-7))


def torch_mrstft64(pred, ref, fft_sizes=FFT_SIZES, hop_sizes=HOP_SIZES, win_lengths=(None, None, None)):
    total = 0.0
    for fft_size, hop, win in zip(fft_sizes, hop_sizes, win_lengths):
        x, y = torch_magnitude64(pred, fft_size, hop, win), torch_magnitude64(ref, fft_size, hop, win)
        total = total + torch.linalg.norm(y - x) / torch.linalg.norm(y) + (y.log() - x.log()).abs().mean()
    return total / len(fft_sizes)


def torch_mel64(pred, ref):
    bank = torch.from_numpy(SLANEY_BANK)

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


def assert_close(actual: float, expected: float, rtol: float, what: str, atol: float = 1e-7) -> None:
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol), \
        f"{what}: {actual:.8g} != reference {expected:.8g} (difference {actual - expected:.2e})"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Relative error in norm, ||actual - expected|| / ||expected|| < rtol (gradients, or any tensor)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < rtol, f"{what}: differs from the reference by {error:.2e} (relative, in norm; bound {rtol:.1e})"


def value_and_grad(loss, pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = pred.clone().requires_grad_(True)
    value = loss(leaf, ref)
    value.backward()
    return value.detach(), leaf.grad


# ------------------------------------------------------------- properties every loss module shares

def combined_target_only(pred, ref):
    """CombinedLoss with every component trained, the reference as both input and target."""
    return CombinedLoss(rms_input=1.0, rms_target=1.0, spectral=1.0, mel=1.0)(pred, ref, ref)[0]


LOSS_FACTORIES = {"rms": lambda: rms_loss, "stft": MultiResolutionSTFTLoss, "mel": MelSpectrogramLoss,
                  "combined": lambda: combined_target_only}
MODULES = {"stft": MultiResolutionSTFTLoss, "mel": MelSpectrogramLoss, "combined": CombinedLoss}


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_identical_inputs_give_exactly_zero_and_a_zero_gradient(name):
    pred = music_like(seed=1).float()
    value, grad = value_and_grad(LOSS_FACTORIES[name](), pred, pred)
    assert value.item() == 0.0, f"{name} of identical inputs is {value.item()}, not 0"
    assert torch.isfinite(grad).all() and grad.abs().max() == 0, f"{name}: gradient at a perfect match"


@pytest.mark.parametrize("case", ["silence_vs_silence", "audio_vs_silence", "silence_vs_audio"])
@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_silence_gives_finite_values_and_gradients(name, case):
    audio, zeros = music_like(batch=2, seed=2).float(), torch.zeros(2, N_SAMPLES)
    pred, ref = {"silence_vs_silence": (zeros, zeros), "audio_vs_silence": (audio, zeros),
                 "silence_vs_audio": (zeros, audio)}[case]
    value, grad = value_and_grad(LOSS_FACTORIES[name](), pred, ref)
    assert torch.isfinite(value), f"{name}, {case}: loss is {value.item()}"
    assert torch.isfinite(grad).all(), f"{name}, {case}: non-finite gradient"
    if case == "silence_vs_silence":
        assert value.item() == 0.0, f"{name} of silence against silence is {value.item()}, not 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    loss = LOSS_FACTORIES[name]()
    pred, ref = music_like(seed=3).to(dtype), music_like(seed=4).to(dtype)
    low = loss(pred, ref)
    assert low.dtype == torch.float32, f"{name}: {dtype} inputs gave a {low.dtype} loss"
    assert low.item() == loss(pred.float(), ref.float()).item(), f"{name}: {dtype} is not cast to float32 first"
    leaf = pred.clone().requires_grad_(True)
    loss(leaf, ref).backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all(), f"{name}: {dtype} gradient"


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_autocast_regions_compute_in_float32(name):
    loss = LOSS_FACTORIES[name]()
    pred, ref = music_like(seed=3).float(), music_like(seed=4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(pred, ref)
    assert inside.dtype == torch.float32, f"{name}: autocast gave a {inside.dtype} loss"
    assert inside.item() == loss(pred, ref).item(), f"{name}: autocast changed the value"


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_the_reference_gets_no_gradient(name):
    constant = music_like(seed=4).float().requires_grad_(True)
    LOSS_FACTORIES[name]()(music_like(seed=3).float().requires_grad_(True), constant).backward()
    assert constant.grad is None, f"{name} sent a gradient to the reference"


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_mismatched_shapes_are_rejected(name):
    loss, pred = LOSS_FACTORIES[name](), music_like(seed=3).float()
    with pytest.raises(ValueError, match="differ in shape"):
        loss(pred, pred[:, :-1])
    with pytest.raises(ValueError, match="differ in shape"):
        loss(pred, pred[:2])
    with pytest.raises(ValueError, match=r"\[B, 1, N\]"):
        loss(pred[:, None].expand(-1, 2, -1), pred[:, None])
    with pytest.raises(ValueError, match="floating-point"):
        loss(pred.long(), pred.long())


@pytest.mark.parametrize("name", MODULES)
def test_buffers_are_non_persistent_and_move_with_to(name):
    """Windows and filterbanks move with .to() but are constants, not checkpoint state."""
    module = MODULES[name]()
    assert list(module.buffers()) and not module.state_dict(), f"{name}: persistent {list(module.state_dict())}"
    module.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in module.buffers()), f"{name}: .to() did not move the buffers"


# ------------------------------------------------------------------------------------------- RMS

def test_rms_matches_float64_on_b_n_and_b_1_n():
    pred, ref = music_like(seed=1), music_like(seed=2)
    expected = numpy_rms(pred.numpy(), ref.numpy())
    assert_close(rms_loss(pred.float(), ref.float()).item(), expected, RTOL, "rms_loss [B, N]")
    assert_close(rms_loss(pred.float()[:, None], ref.float()[:, None]).item(), expected, RTOL, "rms_loss [B, 1, N]")


def test_rms_is_the_root_mean_square_error_above_eps():
    pred, ref = music_like(seed=1), music_like(seed=2)
    plain = float(np.mean(np.sqrt(((pred - ref).numpy() ** 2).mean(axis=-1))))
    assert_close(rms_loss(pred.float(), ref.float()).item(), plain, RTOL, "rms_loss = mean_b sqrt(mse_b)")


@pytest.mark.parametrize("mse_over_eps", [0.0, 1e-6, 0.25, 0.999, 1.0, 1.001, 4.0])
def test_rms_is_linear_below_eps_and_continuous_at_it(mse_over_eps):
    """A constant error e gives mse = e^2; the loss is mse / sqrt(max(mse, eps)) in float64."""
    error = math.sqrt(mse_over_eps * RMS_EPS)
    ref = music_like(seed=1)
    pred = ref + error
    mse = float(((pred.float().double() - ref.float().double()) ** 2).mean())   # what float32 inputs hold
    expected = mse / math.sqrt(max(mse, RMS_EPS))
    # relative only: the values go down to 1e-10, far below the absolute tolerance used elsewhere
    assert_close(rms_loss(pred.float(), ref.float()).item(), expected, RTOL, f"rms_loss at mse = {mse_over_eps} eps",
                 atol=0.0)


@pytest.mark.parametrize("scale", [1e-6, 3e-4, 1.0], ids=["mse_below_eps", "mse_near_eps", "mse_above_eps"])
def test_rms_gradient_matches_float64_autograd(scale):
    """d rms / d pred = 2 (p - r) / (B N sqrt(max(mse_b, eps))) below eps, (p - r) / (B N sqrt(mse_b)) above."""
    ref = music_like(seed=1)
    pred = ref + scale * (music_like(seed=2) - ref)
    _, grad = gradient32(rms_loss, pred, ref)

    def reference(p, r):
        mse = (p - r).square().mean(dim=-1)
        return (mse / mse.clamp(min=1e-8).sqrt()).mean()
    _, expected = gradient64(reference, pred, ref)
    # no FFT and no sign flips: float32 rounding of the differences' squares and sums only
    assert_grad_close(grad, expected, 1e-5, f"rms_loss at scale {scale}")
    assert grad.abs().max() <= 2 * (pred - ref).abs().max() / (pred.numel() * math.sqrt(RMS_EPS)) * (1 + 1e-3), \
        "the gradient exceeds its bound 2 |p - r| / (B N sqrt(eps))"


def test_rms_of_half_precision_inputs_is_float32():
    pred, ref = music_like(seed=1), music_like(seed=2)
    bf16 = rms_loss(pred.bfloat16(), ref.bfloat16())
    assert bf16.dtype == torch.float32 and bf16.item() == rms_loss(pred.bfloat16().float(), ref.bfloat16().float())


# -------------------------------------------------------------------------------- STFT machinery

FRAMINGS = {"block_overlap_add": (512, 128, None), "fold_overlap_add": (1024, 240, None),
            "short_window": (1024, 256, 600), "short_window_fold": (1024, 240, 600), "odd_fft": (511, 128, None),
            "largest": (2048, 512, None)}


@pytest.mark.parametrize("signal", ["music", "half_silent"])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_stft_magnitude_gradient_matches_float64_autograd(framing, signal):
    """The hand-written backward of X = STFTMagnitude(x) for an arbitrary dL/dX, against torch.stft + autograd.

    Covers both overlap-add paths (n_fft % hop == 0 or not), windows shorter than the FFT, an odd FFT size
    and bins at the magnitude floor (which must get no gradient).
    """
    fft_size, hop, win = FRAMINGS[framing]
    x64 = music_like(seed=3) if signal == "music" else half_silent(seed=3)
    stft = STFTMagnitude(fft_size, hop, win)
    x = x64.float().requires_grad_(True)
    magnitude = stft(x)
    weights = torch.randn(magnitude.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (magnitude * weights.float()).sum().backward()
    x_ref = x64.float().double().requires_grad_(True)
    magnitude_ref = torch_magnitude64(x_ref, fft_size, hop, win)
    (magnitude_ref * weights).sum().backward()
    # float32 FFT rounding is ~eps log2(n_fft) of a frame's energy: 8 eps in norm bounds it for these sizes
    assert_grad_close(magnitude.double(), magnitude_ref.detach(), 8 * F32_EPS, f"STFTMagnitude {framing} values")
    assert_grad_close(x.grad.double(), x_ref.grad, MAGNITUDE_GRAD_RTOL, f"STFTMagnitude {framing}, {signal}")
    if signal == "half_silent":
        floored = (magnitude_ref <= math.sqrt(MAGNITUDE_FLOOR)).double().mean().item()
        assert floored > 0.3, f"only {floored:.0%} of the bins are at the floor: the case is not exercised"


@pytest.mark.parametrize("pad", [0, 1, 5, 256, 998])
def test_stft_reflect_pad_adjoint_matches_autograd(pad):
    """_reflect_pad_adjoint is the transpose of F.pad(mode="reflect"), including pads where both mirrors overlap."""
    length = 1000
    x = torch.randn(2, 1, length, dtype=torch.float64, requires_grad=True)
    grad_padded = torch.randn(2, length + 2 * pad, dtype=torch.float64)
    F.pad(x, (pad, pad), mode="reflect").backward(grad_padded[:, None])
    adjoint = losses._reflect_pad_adjoint(grad_padded.clone(), pad)
    assert torch.allclose(adjoint, x.grad[:, 0], rtol=4 * torch.finfo(torch.float64).eps, atol=0)


@pytest.mark.parametrize("fft_size, hop", [(512, 128), (1024, 240), (511, 128), (64, 64), (64, 100)])
def test_stft_overlap_add_matches_a_loop(fft_size, hop):
    frames = torch.randn(2, 7, fft_size, dtype=torch.float64)
    length = 6 * hop + fft_size + 3          # longer than the frames cover: the tail is zero
    expected = torch.zeros(2, length, dtype=torch.float64)
    for t in range(frames.shape[1]):
        expected[:, t * hop:t * hop + fft_size] += frames[:, t]
    assert torch.allclose(losses._overlap_add(frames, hop, length), expected, rtol=0, atol=1e-12)


def test_stft_magnitude_rejects_bad_framings():
    with pytest.raises(ValueError, match="win_length <= fft_size"):
        STFTMagnitude(512, 128, 1024)
    with pytest.raises(ValueError, match="hop_size > 0"):
        STFTMagnitude(512, 0)


def test_stft_magnitude_api_used_by_listening_metrics():
    """listening_metrics.log_mel computes log(clamp(mel.mel_basis @ mel.stft(x[None])[0], MEL_FLOOR)) under no_grad."""
    mel = MelSpectrogramLoss()
    x = music_like(batch=1, seed=5).float()[0]
    with torch.no_grad():
        spectrogram = torch.matmul(mel.mel_basis, mel.stft(x[None])[0]).clamp(min=MEL_FLOOR).log()
    frames = 1 + N_SAMPLES // mel.stft.hop_size
    assert spectrogram.shape == (80, frames) and mel.min_length == 1024 and mel.stft.hop_size == 256
    assert torch.equal(spectrogram, mel.log_mel.log_mel(mel.stft(x[None]))[0].detach())


# ----------------------------------------------------------------------------------- MR-STFT loss

def test_stft_terms_match_float64_numpy():
    pred, ref = music_like(seed=3), music_like(seed=4)
    per_resolution = [numpy_stft_terms(pred.numpy(), ref.numpy(), n, h) for n, h in zip(FFT_SIZES, HOP_SIZES)]
    sc, log_mag = (float(np.mean(values)) for values in zip(*per_resolution))
    got_sc, got_log_mag = MultiResolutionSTFTLoss().terms(pred.float(), ref.float())
    assert_close(got_sc.item(), sc, RTOL, "spectral convergence")
    assert_close(got_log_mag.item(), log_mag, RTOL, "log STFT magnitude")
    loss = MultiResolutionSTFTLoss()(pred.float()[:, None], ref.float()[:, None])
    assert_close(loss.item(), sc + log_mag, RTOL, "MR-STFT [B, 1, N]")


@pytest.mark.parametrize("framing", ["short_window", "fold_overlap_add", "short_window_fold"])
def test_stft_single_resolution_matches_float64_numpy(framing):
    """A window shorter than the FFT is centred in it with zeros; hops need not divide the FFT size."""
    fft_size, hop, win = FRAMINGS[framing]
    pred, ref = music_like(seed=3), music_like(seed=4)
    loss = MultiResolutionSTFTLoss(fft_sizes=(fft_size,), hop_sizes=(hop,), win_lengths=(win,))
    expected = sum(numpy_stft_terms(pred.numpy(), ref.numpy(), fft_size, hop, win))
    assert_close(loss(pred.float(), ref.float()).item(), expected, RTOL, f"MR-STFT {framing}")


STFT_GRADIENT_CASES = {"default": None, "fold_overlap_add": "fold_overlap_add", "short_window": "short_window",
                       "short_window_fold": "short_window_fold"}


@pytest.mark.parametrize("signal", ["music", "half_silent"])
@pytest.mark.parametrize("case", STFT_GRADIENT_CASES)
def test_stft_loss_value_and_gradient_match_float64_autograd(case, signal):
    pred, ref = (music_like(seed=3) if signal == "music" else half_silent(seed=3)), music_like(seed=4)
    if STFT_GRADIENT_CASES[case] is None:
        loss, reference = MultiResolutionSTFTLoss(), torch_mrstft64
    else:
        fft_size, hop, win = FRAMINGS[STFT_GRADIENT_CASES[case]]
        loss = MultiResolutionSTFTLoss(fft_sizes=(fft_size,), hop_sizes=(hop,), win_lengths=(win,))

        def reference(p, r):
            return torch_mrstft64(p, r, (fft_size,), (hop,), (win,))
    value, grad = gradient32(loss, pred, ref)
    ref_value, ref_grad = gradient64(reference, pred, ref)
    assert_close(value, ref_value, RTOL, f"MR-STFT {case} against float64 torch")
    assert_grad_close(grad, ref_grad, GRAD_RTOL, f"MR-STFT {case}, {signal}")


def test_stft_loss_rejects_audio_shorter_than_the_largest_fft():
    pred = music_like(seed=3).float()[:, :2000]
    with pytest.raises(ValueError, match="2048"):
        MultiResolutionSTFTLoss()(pred, pred)


def test_stft_loss_rejects_unequal_resolution_lists():
    with pytest.raises(ValueError, match="equal length"):
        MultiResolutionSTFTLoss(fft_sizes=(512, 1024), hop_sizes=(128,))


# --------------------------------------------------------------------------------------- mel loss

def test_mel_filterbank_matches_the_slaney_formula():
    # float32 cancellation in a triangle's far tail leaves ~1e-6 of the largest weight: compare on that scale
    atol = 1e-5 * SLANEY_BANK.max()
    assert np.allclose(MelSpectrogramLoss().mel_basis.double().numpy(), SLANEY_BANK, rtol=1e-4, atol=atol)


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    reference = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0)
    atol = 1e-5 * SLANEY_BANK.max()
    assert np.allclose(MelSpectrogramLoss().mel_basis.numpy(), reference, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("band", [5, 30, 60, 75])
def test_mel_sine_at_a_band_centre_peaks_in_that_band(band):
    loss, centre = MelSpectrogramLoss(), mel_centres_hz()[band]
    t = torch.arange(SAMPLE_RATE // 2, dtype=torch.float64) / SAMPLE_RATE
    sine = torch.sin(2 * math.pi * centre * t).float()
    with torch.no_grad():
        mel = loss.mel_basis @ loss.stft(sine[None])[0]
    peak = int(mel.mean(dim=1).argmax())
    assert peak == band, f"a {centre:.0f} Hz sine peaks in mel band {peak}, not {band}"


def test_mel_loss_matches_float64_numpy():
    pred, ref = music_like(seed=5), music_like(seed=6)
    expected = numpy_mel_loss(pred.numpy(), ref.numpy())
    assert_close(MelSpectrogramLoss()(pred.float(), ref.float()).item(), expected, RTOL, "mel loss")


@pytest.mark.parametrize("signal", ["music", "half_silent"])
def test_mel_loss_value_and_gradient_match_float64_autograd(signal):
    pred, ref = (music_like(seed=5) if signal == "music" else half_silent(seed=5)), music_like(seed=6)
    value, grad = gradient32(MelSpectrogramLoss(), pred, ref)
    ref_value, ref_grad = gradient64(torch_mel64, pred, ref)
    assert_close(value, ref_value, RTOL, "mel loss against float64 torch")
    assert_grad_close(grad, ref_grad, GRAD_RTOL, f"mel loss, {signal}")


def test_mel_loss_rejects_short_audio_and_bad_band_limits():
    pred = music_like(seed=5).float()[:, :1000]
    with pytest.raises(ValueError, match="1024"):
        MelSpectrogramLoss()(pred, pred)
    with pytest.raises(ValueError, match="f_max"):
        MelSpectrogramLoss(f_max=20000.0)


# ---------------------------------------------------------------------------------- combined loss

WEIGHTS = dict(rms_input=0.3, rms_target=0.4, spectral=0.2, mel=0.1)


def combined_inputs():
    return tuple(music_like(seed=s).float()[:, None] for s in (7, 8, 9))


def test_combined_components_are_the_separate_losses_detached():
    pred, inp, tgt = combined_inputs()
    _, components = CombinedLoss(**WEIGHTS)(pred, inp, tgt)
    assert tuple(components) == LOSS_COMPONENTS
    expected = {"rms_input": rms_loss(pred, inp), "rms_target": rms_loss(pred, tgt),
                "spectral": MultiResolutionSTFTLoss()(pred, tgt), "mel": MelSpectrogramLoss()(pred, tgt)}
    for name, value in expected.items():
        assert components[name].item() == value.item(), f"component {name}: {components[name]} != {value}"
        assert not components[name].requires_grad and components[name].dim() == 0, f"component {name}"


def test_combined_total_is_the_weighted_sum():
    pred, inp, tgt = combined_inputs()
    total, components = CombinedLoss(**WEIGHTS)(pred, inp, tgt)
    weighted = sum(WEIGHTS[name] * components[name].double().item() for name in LOSS_COMPONENTS)
    assert_close(total.item(), weighted, 8 * F32_EPS, "total = weighted sum (four float32 products and sums)")


def test_combined_gradient_is_the_weighted_sum_of_the_separate_gradients():
    pred, inp, tgt = combined_inputs()
    leaf = pred.clone().requires_grad_(True)
    CombinedLoss(**WEIGHTS)(leaf, inp, tgt)[0].backward()
    separate = pred.clone().requires_grad_(True)
    (0.3 * rms_loss(separate, inp) + 0.4 * rms_loss(separate, tgt) + 0.2 * MultiResolutionSTFTLoss()(separate, tgt)
     + 0.1 * MelSpectrogramLoss()(separate, tgt)).backward()
    # the same terms, only summed in another order before one shared backward: float32 rounding of the sums
    assert_grad_close(leaf.grad.double(), separate.grad.double(), 1e-5, "combined loss")


@pytest.fixture
def spectral_work(monkeypatch):
    """Record, per loss term, whether autograd was on when it was computed, and which STFTs ran a backward."""
    work = {"trained": [], "measured": [], "backward_ffts": []}

    def record(name, function):
        def recorded(*args, **kwargs):
            work["trained" if torch.is_grad_enabled() else "measured"].append(name)
            return function(*args, **kwargs)
        return recorded
    for cls in (losses.SpectralConvergenceLoss, losses.LogSTFTMagnitudeLoss, losses.LogMelLoss):
        monkeypatch.setattr(cls, "forward", record(cls.__name__, cls.forward))
    monkeypatch.setattr(losses, "rms_loss", record("rms_loss", losses.rms_loss))
    original_backward = losses.STFTMagnitude.magnitude_backward

    def backward(self, *args):
        work["backward_ffts"].append(self.fft_size)
        return original_backward(self, *args)
    monkeypatch.setattr(losses.STFTMagnitude, "magnitude_backward", backward)
    return work


SC, LOG_MAG, MEL, RMS = "SpectralConvergenceLoss", "LogSTFTMagnitudeLoss", "LogMelLoss", "rms_loss"


@pytest.mark.parametrize("weights, trained, backward_ffts", [
    (dict(rms_input=0.5, rms_target=0.5), [RMS, RMS], []),
    (dict(rms_target=0.0, mel=1.0), [MEL], [1024]),
    (dict(rms_target=0.0, spectral=1.0), [SC] * 3 + [LOG_MAG] * 3, [512, 1024, 2048]),
    (dict(rms_target=1.0, spectral=1.0, mel=1.0), [RMS] + [SC] * 3 + [LOG_MAG] * 3 + [MEL], [512, 1024, 2048]),
], ids=["rms_only", "mel_only", "spectral_only", "all_but_rms_input"])
def test_combined_zero_weight_components_are_measured_without_autograd(spectral_work, weights, trained,
                                                                       backward_ffts):
    """Only positively weighted terms are computed with autograd; the mel loss shares the 1024/256 STFT's backward."""
    pred, inp, tgt = combined_inputs()
    total, components = CombinedLoss(**weights)(pred.clone().requires_grad_(True), inp, tgt)
    total.backward()
    assert all(value > 0 for value in components.values()), f"a zero-weight component was not measured: {components}"
    assert sorted(spectral_work["trained"]) == sorted(trained), spectral_work
    assert len(spectral_work["trained"]) + len(spectral_work["measured"]) == 2 + 3 + 3 + 1, spectral_work
    assert sorted(spectral_work["backward_ffts"]) == backward_ffts, spectral_work


def test_combined_without_autograd_builds_no_graph():
    pred, inp, tgt = combined_inputs()
    with torch.no_grad():
        total, _ = CombinedLoss(**WEIGHTS)(pred.clone().requires_grad_(True), inp, tgt)
    assert not total.requires_grad


def test_combined_rms_only_total():
    pred, inp, tgt = combined_inputs()
    total, _ = CombinedLoss(rms_input=0.5, rms_target=0.5)(pred, inp, tgt)
    expected = 0.5 * rms_loss(pred, inp).double().item() + 0.5 * rms_loss(pred, tgt).double().item()
    assert_close(total.item(), expected, 4 * F32_EPS, "RMS-only total")


def test_combined_perfect_prediction_scores_exactly_zero():
    pred, inp, tgt = combined_inputs()
    _, same = CombinedLoss()(tgt, inp, tgt)
    assert all(same[name] == 0 for name in ("rms_target", "spectral", "mel")), f"identical output and target: {same}"
    _, same = CombinedLoss()(inp, inp, tgt)
    assert same["rms_input"] == 0, f"identical output and input: {same}"


def test_combined_rejects_bad_weights_and_audio():
    pred, inp, tgt = combined_inputs()
    with pytest.raises(ValueError, match="--loss_weight_input must be a number >= 0"):
        CombinedLoss(rms_input=-1.0)
    with pytest.raises(ValueError, match=r"all four --loss_weight_\* are 0"):
        CombinedLoss(rms_target=0.0)
    loss = CombinedLoss(**WEIGHTS)
    with pytest.raises(ValueError, match="differ in shape"):
        loss(pred, inp[..., :-1], tgt)
    with pytest.raises(ValueError, match="2048"):
        loss(pred[..., :2000], inp[..., :2000], tgt[..., :2000])


# -------------------------------------------------------------- gradients through the frozen decoder

class TinyTransformer(torch.nn.Module):
    """A transformer-like latent predictor: [B, 128, T] -> [B, 128, T]."""

    def __init__(self, d_model: int = 32):
        super().__init__()
        self.inp = torch.nn.Linear(LATENT_DIM, d_model)
        self.block = torch.nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, batch_first=True)
        self.out = torch.nn.Linear(d_model, LATENT_DIM)

    def forward(self, latents):
        return self.out(self.block(self.inp(latents.transpose(1, 2)))).transpose(1, 2)


@pytest.fixture(scope="module")
def decoder_step():
    """One SGD step of a tiny model through the frozen decoder with all four losses, and the state around it."""
    torch.manual_seed(0)
    codec = load_codec("random")
    decoder = FrozenDecoder(codec)
    before = [{k: v.clone() for k, v in module.state_dict().items()} for module in (decoder, codec)]
    model = TinyTransformer()
    frames = 8                                               # 8 x 320 = 2560 samples >= the 2048-point FFT
    audio = decoder(model(torch.randn(2, LATENT_DIM, frames)))
    input_audio, target_audio = 0.1 * torch.randn_like(audio), 0.1 * torch.randn_like(audio)
    total, _ = CombinedLoss(rms_input=0.25, rms_target=0.25, spectral=0.25, mel=0.25)(audio, input_audio, target_audio)
    total.backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return dict(audio=audio, grads=grads, codec=codec, decoder=decoder, before=before)


def test_gradients_decoder_output_is_frames_times_hop(decoder_step):
    assert decoder_step["audio"].shape == (2, 1, 8 * 320), f"decoder output {list(decoder_step['audio'].shape)}"


def test_gradients_reach_every_model_parameter_finite_and_nonzero(decoder_step):
    for name, grad in decoder_step["grads"].items():
        assert grad is not None, f"{name}: no gradient"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        assert grad.abs().sum() > 0, f"{name}: zero gradient"


def test_gradients_never_reach_the_frozen_decoder(decoder_step):
    parameters = list(decoder_step["decoder"].named_parameters()) + list(decoder_step["codec"].named_parameters())
    for name, parameter in parameters:
        assert not parameter.requires_grad and parameter.grad is None, f"decoder weight {name} got a gradient"


def test_gradients_leave_the_decoder_weights_unchanged_by_a_step(decoder_step):
    for module, before in zip((decoder_step["decoder"], decoder_step["codec"]), decoder_step["before"]):
        changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed, f"decoder weights changed: {changed[:3]}"


# ------------------------------------------------------------------------------------ script mode
