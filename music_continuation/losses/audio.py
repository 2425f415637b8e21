"""Waveform and spectral losses: RMS, multi-resolution STFT (Parallel WaveGAN) and log-mel (HiFi-GAN).

Every loss takes the prediction and the reference shaped [B, 1, N] or [B, N] in any float dtype and
computes in float32 with autocast disabled (half-precision FFTs and logs of tiny magnitudes are not
accurate enough). The reference is a constant: it never gets a gradient.

Each loss is a small module stating its formula (X, Y: floored STFT magnitudes of prediction and reference):

    rms_loss                 mean_b rms(pred_b - ref_b), exactly 0 for a perfect prediction
    STFTMagnitude            x -> X = sqrt(clamp(|stft(x)|^2, 1e-7))
    SpectralConvergenceLoss  ||X - Y||_F / ||Y||_F
    LogSTFTMagnitudeLoss     mean |log X - log Y|
    LogMelLoss               mean |log clamp(fb X, 1e-5) - log clamp(fb Y, 1e-5)|
    MultiResolutionSTFTLoss  SC + LogMag, each averaged over FFT 512/1024/2048, hop 128/256/512
    MelSpectrogramLoss       LogMelLoss on the 1024/256 magnitudes
    CombinedLoss             the weighted sum of the four reference components (LOSS_COMPONENTS)

LOSSES also names the two adversarial components (adversarial, feature_matching): they are measured by a
discriminator (music_continuation.adversarial), not against the reference by CombinedLoss, and exist only in
runs that give either of them a weight.

STFTMagnitude is the one module differentiated by hand (`STFTMagnitude.magnitude_backward`: an inverse
real FFT and an overlap-add, a few times fewer tensor operations than autograd through torch.stft, which
matters on CPU: bench/bench_losses.py); everything after the magnitude is ordinary autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from torch.autograd.function import once_differentiable

from music_continuation.codec import SAMPLE_RATE
from music_continuation.settings import (  # noqa: F401  (re-exported)
    ADVERSARIAL_COMPONENTS,
    LOSS_COMPONENTS,
    LOSSES,
    LossComponent,
    adversarial_weighted,
    shown_losses,
)


def check_weights(weights: dict) -> dict:
    """The loss weights {component name: weight} as floats; ValueError naming the flag if one is bad.

    Every reference component must be given (an adversarial one left out is 0), each a finite number >= 0,
    and at least one reference component must be positive.
    """
    names = tuple(component.name for component in LOSSES)
    unknown = sorted(set(weights) - set(names))
    missing = [name for name in LOSS_COMPONENTS if name not in weights]
    if unknown or missing:
        raise ValueError(f"loss weights: unknown {unknown}, missing {missing}; the components are "
                         f"{', '.join(names)}")
    checked = {}
    for component in LOSSES:
        weight = weights.get(component.name, 0.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{component.flag} must be a number >= 0, got {weights.get(component.name)}")
        checked[component.name] = weight
    if not any(checked[name] for name in LOSS_COMPONENTS):
        raise ValueError("all four --loss_weight_* are 0: there is nothing to train on")
    return checked


def weights_from_flags(args) -> dict:
    """{component name: weight} from parsed launcher flags (an argparse Namespace or a dict of flags)."""
    flags = args if isinstance(args, dict) else vars(args)
    return {component.name: flags.get(component.flag[2:], component.default) for component in LOSSES}


MAGNITUDE_FLOOR = 1e-7   # floor on the power re^2 + im^2 before the sqrt (Parallel WaveGAN)
MEL_FLOOR = 1e-5         # floor on the mel magnitude before the log (HiFi-GAN)
RMS_EPS = 1e-8           # mean squared error below which the RMS turns linear (rms_loss): an RMS of 1e-4, -80 dBFS

# The value of a floored bin, sqrt(float32(1e-7)), computed the way the forward computes it.
_FLOORED_MAGNITUDE = torch.tensor(MAGNITUDE_FLOOR, dtype=torch.float32).sqrt().item()


def _as_float_batch(pred: torch.Tensor, ref: torch.Tensor, what: str, min_length: int = 1):
    """Validate a (pred, ref) pair and return both as float32 [B, N]; ref is detached."""
    for name, tensor in (("prediction", pred), ("reference", ref)):
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{what}: {name} must be a floating-point tensor, got {kind}")
        if not (tensor.dim() == 2 or (tensor.dim() == 3 and tensor.shape[1] == 1)):
            raise ValueError(f"{what}: {name} must be shaped [B, 1, N] or [B, N], got {list(tensor.shape)}")
    if pred.shape != ref.shape:
        raise ValueError(f"{what}: prediction {list(pred.shape)} and reference {list(ref.shape)} differ in shape")
    if pred.shape[0] == 0:
        raise ValueError(f"{what}: empty batch {list(pred.shape)}")
    if pred.shape[-1] < min_length:
        raise ValueError(f"{what}: audio {list(pred.shape)} has {pred.shape[-1]} samples, need at least "
                         f"{min_length} (the largest FFT size)")
    pred = pred.reshape(pred.shape[0], -1).float()
    ref = ref.detach().reshape(ref.shape[0], -1).float()
    return pred, ref


def _no_autocast(tensor: torch.Tensor):
    """Losses are always computed in float32, even inside an autocast region."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def rms_loss(pred: torch.Tensor, ref: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Root-mean-square error of each example, averaged over the batch.

        mse_b = mean_t (pred[b, t] - ref[b, t])^2
        rms_b = mse_b / sqrt(max(mse_b, eps))        (= sqrt(mse_b) where mse_b >= eps, mse_b / sqrt(eps) below)
        rms   = mean_b rms_b

    sqrt has an infinite slope at 0; below eps it is replaced by the line from 0 that meets it at eps. So the
    loss is continuous, equals the RMS wherever mse >= eps, is exactly 0 for a perfect prediction, and
    d rms_b / d mse_b <= 1 / sqrt(eps) everywhere (its gradient with respect to pred is 0 at a perfect prediction).
    """
    pred, ref = _as_float_batch(pred, ref, "rms_loss")
    with _no_autocast(pred):
        mse = (pred - ref).square().mean(dim=-1)
        return (mse / mse.clamp(min=eps).sqrt()).mean()


def _floored_magnitude(spec: torch.Tensor) -> torch.Tensor:
    """X = sqrt(clamp(re^2 + im^2, min=1e-7)): the Parallel WaveGAN magnitude (cheaper than complex abs)."""
    parts = torch.view_as_real(spec)
    real, imag = parts[..., 0], parts[..., 1]
    return torch.addcmul(real * real, imag, imag).clamp_(min=MAGNITUDE_FLOOR).sqrt_()


def _overlap_add(frames: torch.Tensor, hop: int, length: int) -> torch.Tensor:
    """Sum frames [B, T, n_fft] placed every `hop` samples into a signal [B, length] (the adjoint of framing)."""
    batch, count, n_fft = frames.shape
    if n_fft % hop == 0:   # the usual case: n_fft / hop shifted block additions, faster than fold
        ratio = n_fft // hop
        blocks = frames.view(batch, count, ratio, hop)
        out = frames.new_zeros(batch, max(count + ratio - 1, -(-length // hop)), hop)
        for j in range(ratio):
            out[:, j:j + count] += blocks[:, :, j]
        return out.view(batch, -1)[:, :length]
    out = F.fold(frames.transpose(1, 2), (1, (count - 1) * hop + n_fft), (1, n_fft), stride=(1, hop)).view(batch, -1)
    return F.pad(out, (0, length - out.shape[-1]))


def _reflect_pad_adjoint(grad_padded: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of F.pad(x, (pad, pad), mode="reflect") on the last dimension: [B, N + 2 pad] -> [B, N].

    Reflect padding copies x[i] to padded[pad - i] and x[N - 1 - i] to padded[pad + N - 1 + i] (1 <= i <= pad),
    so each copy's gradient is added back to the sample it came from (pad < N, as torch.stft requires).
    """
    length = grad_padded.shape[-1] - 2 * pad
    grad = grad_padded[..., pad:pad + length]        # a view; flip() copies, so the sums below do not alias
    grad[..., 1:pad + 1] += grad_padded[..., :pad].flip(-1)
    grad[..., length - 1 - pad:length - 1] += grad_padded[..., pad + length:].flip(-1)
    return grad


class STFTMagnitude(nn.Module):
    """Floored STFT magnitude of one resolution, as in Parallel WaveGAN.

        S = stft(x, periodic Hann window, center=True, reflect padding)      [B, n_fft // 2 + 1, frames]
        X = sqrt( clamp(re(S)^2 + im(S)^2, min=1e-7) )

    A window shorter than the FFT is centred in it with zeros (what torch.stft does with win_length).
    `forward` is differentiable by `magnitude_backward`, not by autograd through the FFT.
    """

    def __init__(self, fft_size: int, hop_size: int, win_length: int | None = None):
        super().__init__()
        win_length = fft_size if win_length is None else win_length
        if not 0 < win_length <= fft_size or hop_size <= 0:
            raise ValueError(f"STFT: need 0 < win_length <= fft_size and hop_size > 0, "
                             f"got fft_size={fft_size}, hop_size={hop_size}, win_length={win_length}")
        self.fft_size, self.hop_size, self.win_length = fft_size, hop_size, win_length
        left = (fft_size - win_length) // 2
        window = F.pad(torch.hann_window(win_length, periodic=True), (left, fft_size - win_length - left))
        # Buffers are non-persistent: they move with .to(device) but are constants, not checkpoint state.
        self.register_buffer("window", window, persistent=False)
        # irfft counts every bin but DC and Nyquist twice (Hermitian symmetry); the adjoint of rfft must not.
        bin_weight = torch.full((fft_size // 2 + 1, 1), 0.5)
        bin_weight[0] = 1.0
        if fft_size % 2 == 0:
            bin_weight[-1] = 1.0
        self.register_buffer("bin_weight", bin_weight, persistent=False)

    @property
    def framing(self) -> tuple[int, int, int]:
        """(fft_size, hop_size, win_length): two STFTMagnitudes with equal framings give equal magnitudes."""
        return self.fft_size, self.hop_size, self.win_length

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """Complex STFT S of x [B, N] -> [B, n_fft // 2 + 1, frames]."""
        return torch.stft(x, self.fft_size, self.hop_size, window=self.window.to(x.dtype), center=True,
                          pad_mode="reflect", return_complex=True)

    def magnitude_backward(self, grad_magnitude: torch.Tensor, spec: torch.Tensor, magnitude: torch.Tensor,
                           length: int) -> torch.Tensor:
        """dL/dx [B, N] from dL/dX, the spectrum S and the magnitude X of x (N = length samples).

            dL/dS_k   = dL/dX_k * S_k / X_k   where re^2 + im^2 > 1e-7 (else 0: the clamp is flat there)
            dL/dframe = Re( sum_k dL/dS_k e^{2 pi i k n / n_fft} ) * window = n_fft * irfft(c_k dL/dS_k) * window
            dL/dx     = adjoint of the reflect padding of the overlap-add of dL/dframe
        (c_k = 1 at DC and Nyquist, 1/2 elsewhere.) This is autograd's gradient through torch.stft, computed
        with a half-size inverse FFT and no scatter instead of a full complex FFT and an index_add.
        """
        scale = grad_magnitude.mul(self.bin_weight.to(magnitude.dtype)).div_(magnitude)
        # A bin is floored where its magnitude is sqrt(1e-7) (bins within one float32 ulp above it count too).
        scale.masked_fill_(magnitude <= _FLOORED_MAGNITUDE, 0.0)
        grad_spec = (spec * scale).transpose(1, 2)               # [B, frames, bins]
        grad_frames = torch.fft.irfft(grad_spec, n=self.fft_size, dim=-1, norm="forward")
        grad_frames.mul_(self.window.to(grad_frames.dtype))
        pad = self.fft_size // 2
        return _reflect_pad_adjoint(_overlap_add(grad_frames, self.hop_size, length + 2 * pad), pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """X of x [B, N] -> [B, n_fft // 2 + 1, frames]."""
        return _STFTMagnitudeFunction.apply(x, self)

    def magnitudes(self, pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y) of a prediction and a reference [B, N]; Y is a constant, computed without autograd."""
        with torch.no_grad():
            ref_mag = self(ref)
        return self(pred), ref_mag


class _STFTMagnitudeFunction(torch.autograd.Function):
    """X = STFTMagnitude(x), differentiated by STFTMagnitude.magnitude_backward."""

    @staticmethod
    def forward(ctx, x, stft):
        spec = stft.spectrum(x)
        magnitude = _floored_magnitude(spec)
        ctx.stft, ctx.length = stft, x.shape[-1]
        ctx.save_for_backward(spec, magnitude)
        return magnitude

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_magnitude):
        spec, magnitude = ctx.saved_tensors
        with _no_autocast(magnitude):
            grad_x = ctx.stft.magnitude_backward(grad_magnitude.float(), spec, magnitude, ctx.length)
        return grad_x, None


class SpectralConvergenceLoss(nn.Module):
    """Spectral convergence over the whole batch, X the prediction's and Y the reference's magnitudes.

        SC = ||X - Y||_F / ||Y||_F            (Parallel WaveGAN's ||Y - X||_F / ||Y||_F)

    Y is floored (every bin >= sqrt(1e-7)), so ||Y||_F > 0 even for silence. Identical inputs give 0 and a
    zero gradient (autograd takes the subgradient 0 of the norm at 0).
    """

    def forward(self, pred_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(pred_mag - ref_mag) / torch.linalg.vector_norm(ref_mag)


class LogSTFTMagnitudeLoss(nn.Module):
    """Log STFT magnitude distance (the magnitudes are floored, so the logs are finite).

        LogMag = mean |log X - log Y|
    """

    def forward(self, pred_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
        return (pred_mag.log() - ref_mag.log()).abs().mean()


class LogMelLoss(nn.Module):
    """HiFi-GAN log-mel L1 distance of two STFT magnitudes X (prediction) and Y (reference).

        M(X) = log( clamp(fb @ X, min=1e-5) )       (fb applied to the magnitude, not the power)
        Mel  = mean | M(X) - M(Y) |

    fb is the Slaney-scale mel filterbank with Slaney area normalisation (librosa's default), [n_mels, bins].
    """

    def __init__(self, sample_rate: int, fft_size: int, n_mels: int, f_min: float, f_max: float):
        super().__init__()
        if not 0 <= f_min < f_max <= sample_rate / 2:
            raise ValueError(f"MelSpectrogramLoss: need 0 <= f_min < f_max <= sample_rate / 2, "
                             f"got f_min={f_min}, f_max={f_max}, sample_rate={sample_rate}")
        fb = torchaudio.functional.melscale_fbanks(fft_size // 2 + 1, f_min, f_max, n_mels, sample_rate,
                                                   norm="slaney", mel_scale="slaney")   # [n_freqs, n_mels]
        self.register_buffer("mel_basis", fb.T.contiguous(), persistent=False)          # [n_mels, n_freqs]

    def log_mel(self, magnitude: torch.Tensor) -> torch.Tensor:
        """M(X) = log(clamp(fb @ X, 1e-5)) -> [B, n_mels, frames]."""
        return torch.matmul(self.mel_basis.to(magnitude.dtype), magnitude).clamp(min=MEL_FLOOR).log()

    def forward(self, pred_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(pred_mag) - self.log_mel(ref_mag)).abs().mean()


class MultiResolutionSTFTLoss(nn.Module):
    """Parallel WaveGAN multi-resolution STFT loss.

        loss = (1 / R) sum_r SC(X_r, Y_r) + (1 / R) sum_r LogMag(X_r, Y_r)

    with X_r, Y_r the STFTMagnitude of prediction and reference at resolution r (win_lengths None: the
    window is the FFT size). `terms(pred, ref)` returns the two averages (SC, LogMag) separately.
    """

    def __init__(self, fft_sizes=(512, 1024, 2048), hop_sizes=(128, 256, 512), win_lengths=None):
        super().__init__()
        fft_sizes, hop_sizes = list(fft_sizes), list(hop_sizes)
        win_lengths = [None] * len(fft_sizes) if win_lengths is None else list(win_lengths)
        if not fft_sizes or not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ValueError(f"MultiResolutionSTFTLoss: fft_sizes {fft_sizes}, hop_sizes {hop_sizes} and "
                             f"win_lengths {win_lengths} must be non-empty and of equal length")
        self.stfts = nn.ModuleList(STFTMagnitude(n, h, w) for n, h, w in zip(fft_sizes, hop_sizes, win_lengths))
        self.spectral_convergence = SpectralConvergenceLoss()
        self.log_magnitude = LogSTFTMagnitudeLoss()
        self.min_length = max(fft_sizes)

    def magnitudes(self, pred: torch.Tensor, ref: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(X_r, Y_r) for each resolution r] of float32 [B, N] audio (validated by the caller)."""
        return [stft.magnitudes(pred, ref) for stft in self.stfts]

    def terms_of(self, magnitudes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(SC, LogMag), each averaged over the resolutions, from `magnitudes`."""
        sc = torch.stack([self.spectral_convergence(x, y) for x, y in magnitudes]).mean()
        log_mag = torch.stack([self.log_magnitude(x, y) for x, y in magnitudes]).mean()
        return sc, log_mag

    def terms(self, pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(SC, LogMag), each averaged over the resolutions."""
        pred, ref = _as_float_batch(pred, ref, "MultiResolutionSTFTLoss", self.min_length)
        with _no_autocast(pred):
            return self.terms_of(self.magnitudes(pred, ref))

    def forward(self, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        sc, log_mag = self.terms(pred, ref)
        return sc + log_mag


class MelSpectrogramLoss(nn.Module):
    """HiFi-GAN log-mel L1 loss: LogMelLoss of the STFTMagnitude (1024/256 by default) of prediction and reference.

        loss = mean | log(clamp(fb @ X, 1e-5)) - log(clamp(fb @ Y, 1e-5)) |
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop_length: int = 256,
                 n_mels: int = 80, f_min: float = 0.0, f_max: float = 8000.0):
        super().__init__()
        self.stft = STFTMagnitude(n_fft, hop_length)
        self.log_mel = LogMelLoss(sample_rate, n_fft, n_mels, f_min, f_max)
        self.min_length = n_fft

    @property
    def mel_basis(self) -> torch.Tensor:
        """The filterbank fb [n_mels, n_fft // 2 + 1]."""
        return self.log_mel.mel_basis

    def forward(self, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        pred, ref = _as_float_batch(pred, ref, "MelSpectrogramLoss", self.min_length)
        with _no_autocast(pred):
            return self.log_mel(*self.stft.magnitudes(pred, ref))


class CombinedLoss(nn.Module):
    """Weighted sum of the four reference losses (LOSS_COMPONENTS).

        total = w_in rms(out, in) + w_tgt rms(out, tgt) + w_spec MRSTFT(out, tgt) + w_mel Mel(out, tgt)

    The adversarial weights are kept in `weights` (the balancer and the trainer read them there) but never enter
    the total: the adversarial terms are measured against a discriminator that changes every step, so they
    cannot rank epochs or runs; the total, best.pt and the skill stay reference-based.

    Returns (total, components), components = {"rms_input", "rms_target", "spectral", "mel"} as detached
    scalar tensors (no host sync). Every component is measured, but those with weight 0 are computed under
    torch.no_grad(): measured-only terms that cost no backward pass (AudioCraft's trained/info split).
    The mel loss reuses the magnitudes of the MR-STFT resolution framed like it (1024/256), so that STFT
    and its backward run once for both.
    """

    def __init__(self, *, rms_input: float = 0.0, rms_target: float = 1.0, spectral: float = 0.0, mel: float = 0.0,
                 adversarial: float = 0.0, feature_matching: float = 0.0, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.weights = check_weights(dict(rms_input=rms_input, rms_target=rms_target, spectral=spectral, mel=mel,
                                          adversarial=adversarial, feature_matching=feature_matching))
        self.spectral = MultiResolutionSTFTLoss()
        self.mel = MelSpectrogramLoss(sample_rate=sample_rate)
        self.min_length = max(self.spectral.min_length, self.mel.min_length)
        # Index of the MR-STFT resolution whose magnitudes the mel loss reuses (None: it computes its own).
        self.shared_resolution = next((r for r, stft in enumerate(self.spectral.stfts)
                                       if stft.framing == self.mel.stft.framing), None)

    def forward(self, output_audio: torch.Tensor, input_audio: torch.Tensor, target_audio: torch.Tensor):
        components = self.terms(output_audio, input_audio, target_audio)
        return self.weighted_sum(components), {name: components[name].detach() for name in LOSS_COMPONENTS}

    def weighted_sum(self, components: dict) -> torch.Tensor:
        """The total: sum of weight x component over the positively weighted components."""
        return sum(self.weights[name] * components[name] for name in LOSS_COMPONENTS if self.weights[name] > 0)

    def terms(self, output_audio: torch.Tensor, input_audio: torch.Tensor, target_audio: torch.Tensor) -> dict:
        """{component: scalar}: the positively weighted ones carry their graph (what the balancer differentiates)."""
        out, inp = _as_float_batch(output_audio, input_audio, "CombinedLoss (output vs input)", self.min_length)
        out, tgt = _as_float_batch(output_audio, target_audio, "CombinedLoss (output vs target)", self.min_length)
        weights, autograd = self.weights, torch.is_grad_enabled()

        def trained(*names):
            """Autograd on only for what a positively weighted component needs."""
            return torch.set_grad_enabled(autograd and any(weights[name] > 0 for name in names))

        components = {}
        with _no_autocast(out):
            with trained("rms_input"):
                components["rms_input"] = rms_loss(out, inp)
            with trained("rms_target"):
                components["rms_target"] = rms_loss(out, tgt)
            with trained("spectral", "mel"):
                magnitudes = self.spectral.magnitudes(out, tgt)
                mel_magnitudes = (self.mel.stft.magnitudes(out, tgt) if self.shared_resolution is None
                                  else magnitudes[self.shared_resolution])
            with trained("spectral"):
                components["spectral"] = sum(self.spectral.terms_of(magnitudes))
            with trained("mel"):
                components["mel"] = self.mel.log_mel(*mel_magnitudes)
        return components
