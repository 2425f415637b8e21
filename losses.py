"""Waveform and spectral losses: RMS, multi-resolution STFT (Parallel WaveGAN) and log-mel (HiFi-GAN).

Every loss takes audio shaped [B, 1, N] or [B, N] in any float dtype and computes in float32 with
autocast disabled (half-precision FFTs and logs of tiny magnitudes are not accurate enough).
The reference side is a constant: it never gets a gradient and is computed without autograd.

The spectral losses differentiate by hand (see `_SpectralLossFunction`): per resolution one STFT of
prediction and reference stacked together, the loss terms and their gradient with respect to the
magnitude in the forward pass, and in the backward pass one inverse real FFT and an overlap-add.
That is a few times fewer tensor operations than autograd through torch.stft, which matters on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from torch.autograd.function import once_differentiable

from codec import SAMPLE_RATE



@dataclass(frozen=True)
class LossComponent:
    """One training-loss component and every name it goes by."""
    name: str        # metric key (train_<name>, val_<name>) and CombinedLoss keyword
    flag: str        # launcher flag holding its weight
    short: str       # name in the printed epoch block
    default: float   # default weight
    help: str


# The one table of the loss components, in their canonical order: flags, logs, prints and tests derive from it.
LOSSES = (
    LossComponent("rms_input", "--loss_weight_input", "rms_in", 0.0, "RMS(output, input): reconstruction"),
    LossComponent("rms_target", "--loss_weight_target", "rms_tgt", 1.0, "RMS(output, target): continuation"),
    LossComponent("spectral", "--loss_weight_spectral", "spec", 0.0, "multi-resolution STFT(output, target)"),
    LossComponent("mel", "--loss_weight_mel", "mel", 0.0, "log-mel L1(output, target)"),
)
LOSS_COMPONENTS = tuple(component.name for component in LOSSES)


def check_weights(weights: dict) -> dict:
    """The loss weights {component name: weight} as floats; ValueError naming the flag if one is bad.

    Every component must be given, each a finite number >= 0, and at least one must be positive.
    """
    unknown = sorted(set(weights) - set(LOSS_COMPONENTS))
    missing = [name for name in LOSS_COMPONENTS if name not in weights]
    if unknown or missing:
        raise ValueError(f"loss weights: unknown {unknown}, missing {missing}; the components are "
                         f"{', '.join(LOSS_COMPONENTS)}")
    checked = {}
    for component in LOSSES:
        weight = weights[component.name]
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{component.flag} must be a number >= 0, got {weights[component.name]}")
        checked[component.name] = weight
    if not any(checked.values()):
        raise ValueError("all four --loss_weight_* are 0: there is nothing to train on")
    return checked


def weights_from_flags(args) -> dict:
    """{component name: weight} from parsed launcher flags (an argparse Namespace or a dict of flags)."""
    flags = args if isinstance(args, dict) else vars(args)
    return {component.name: flags[component.flag[2:]] for component in LOSSES}

MAGNITUDE_FLOOR = 1e-7   # floor on the power re^2 + im^2 before the sqrt (Parallel WaveGAN)
MEL_FLOOR = 1e-5         # floor on the mel magnitude before the log (HiFi-GAN)
NORM_FLOOR = 1e-12       # keeps a Frobenius norm that is 0 from dividing by zero (SC of identical signals)
RMS_EPS = 1e-8

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


def _rms(pred: torch.Tensor, ref: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt((pred - ref).square().mean(dim=-1) + eps).mean()


def rms_loss(pred: torch.Tensor, ref: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Root-mean-square error, averaged over the batch.

        rms = mean_b sqrt( mean_t (pred[b, t] - ref[b, t])^2 + eps )

    `eps` keeps the gradient of the sqrt finite when pred == ref (there it is 0 / (2 sqrt(eps)) = 0).
    """
    pred, ref = _as_float_batch(pred, ref, "rms_loss")
    with _no_autocast(pred):
        return _rms(pred, ref, eps)


def _floored_magnitude(spec: torch.Tensor) -> torch.Tensor:
    """X = sqrt(clamp(re^2 + im^2, min=1e-7)): the Parallel WaveGAN magnitude (cheaper than complex abs)."""
    parts = torch.view_as_real(spec)
    real, imag = parts[..., 0], parts[..., 1]
    return torch.addcmul(real * real, imag, imag).clamp_(min=MAGNITUDE_FLOOR).sqrt_()


class STFTMagnitude(nn.Module):
    """Floored STFT magnitude of one resolution, as in Parallel WaveGAN.

        S = stft(x, periodic Hann window, center=True, reflect padding)      [B, n_fft // 2 + 1, frames]
        X = sqrt( clamp(re(S)^2 + im(S)^2, min=1e-7) )

    A window shorter than the FFT is centred in it with zeros (what torch.stft does with win_length).
    `forward` is differentiable (by `magnitude_backward`, not autograd through the FFT).
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

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """Complex STFT S of x [B, N] -> [B, n_fft // 2 + 1, frames]."""
        return torch.stft(x, self.fft_size, self.hop_size, window=self.window.to(x.dtype), center=True,
                          pad_mode="reflect", return_complex=True)

    def magnitude_backward(self, grad_magnitude: torch.Tensor, spec: torch.Tensor, magnitude: torch.Tensor,
                           length: int) -> torch.Tensor:
        """dL/dx [B, N] from dL/dX (overwritten), the spectrum S and the magnitude X of x.

            dL/dS_k  = dL/dX_k * S_k / X_k   where re^2 + im^2 > 1e-7 (else 0: the clamp is flat there)
            dL/dframe = Re( sum_k dL/dS_k e^{2 pi i k n / N} ) * window = N * irfft(c_k dL/dS_k) * window
            dL/dx     = adjoint of the reflect padding of the overlap-add of dL/dframe
        (c_k = 1 at DC and Nyquist, 1/2 elsewhere.) This is exactly autograd's gradient, computed with a
        half-size inverse FFT and no scatter, instead of a full complex FFT and an index_add.
        """
        scale = grad_magnitude.mul_(self.bin_weight.to(magnitude.dtype)).div_(magnitude)
        scale.masked_fill_(magnitude <= _FLOORED_MAGNITUDE, 0.0)
        grad_spec = (spec * scale).transpose(1, 2)               # [B, frames, bins]
        grad_frames = torch.fft.irfft(grad_spec, n=self.fft_size, dim=-1, norm="forward").mul_(self.window.to(grad_spec.real.dtype))
        pad = self.fft_size // 2
        grad_padded = _overlap_add(grad_frames, self.hop_size, length + 2 * pad)
        return torch.ops.aten.reflection_pad1d_backward(grad_padded.unsqueeze(1), grad_padded.new_empty(
            grad_padded.shape[0], 1, length), [pad, pad]).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _STFTMagnitudeFunction.apply(x, self)


def _overlap_add(frames: torch.Tensor, hop: int, length: int) -> torch.Tensor:
    """Sum frames [B, T, n_fft] placed every `hop` samples into a signal [B, length] (adjoint of framing)."""
    batch, count, n_fft = frames.shape
    if n_fft % hop == 0:   # the usual case: n_fft / hop shifted block additions
        ratio = n_fft // hop
        blocks = frames.view(batch, count, ratio, hop)
        out = frames.new_zeros(batch, max(count + ratio - 1, -(-length // hop)), hop)
        for j in range(ratio):
            out[:, j:j + count] += blocks[:, :, j]
        return out.view(batch, -1)[:, :length]
    out = F.fold(frames.transpose(1, 2), (1, (count - 1) * hop + n_fft), (1, n_fft), stride=(1, hop)).view(batch, -1)
    return F.pad(out, (0, length - out.shape[-1]))


class _STFTMagnitudeFunction(torch.autograd.Function):
    """X = STFTMagnitude(x) with the hand-written backward of STFTMagnitude.magnitude_backward."""

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
            grad_x = ctx.stft.magnitude_backward(grad_magnitude.float().clone(), spec, magnitude, ctx.length)
        return grad_x, None


class SpectralConvergenceLoss(nn.Module):
    """Spectral convergence over the whole batch (Y reference, X prediction magnitudes).

        SC = ||Y - X||_F / ||Y||_F                 dSC/dX = (X - Y) / (||Y - X||_F ||Y||_F)

    Both norms are clamped at 1e-12 where they divide: identical inputs give SC = 0 and a zero gradient.
    """

    @staticmethod
    def value_and_grad(pred_mag, ref_mag, need_grad: bool = False):
        diff = pred_mag - ref_mag
        diff_norm = torch.linalg.vector_norm(diff)
        ref_norm = torch.linalg.vector_norm(ref_mag).clamp(min=NORM_FLOOR)
        value = diff_norm / ref_norm
        if not need_grad:
            return value, None
        return value, diff.div_(diff_norm.clamp(min=NORM_FLOOR) * ref_norm)

    def forward(self, pred_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
        return self.value_and_grad(pred_mag, ref_mag)[0]


class LogSTFTMagnitudeLoss(nn.Module):
    """Log STFT magnitude distance (magnitudes are floored, so the logs are finite).

        LogMag = mean |log Y - log X|              dLogMag/dX = sign(log X - log Y) / (n X)
    """

    @staticmethod
    def value_and_grad(pred_log_mag, ref_log_mag, pred_mag=None, need_grad: bool = False):
        log_diff = pred_log_mag - ref_log_mag
        value = log_diff.abs().mean()
        if not need_grad:
            return value, None
        return value, log_diff.sign_().div_(pred_mag).mul_(1.0 / log_diff.numel())

    def forward(self, pred_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
        return self.value_and_grad(pred_mag.log(), ref_mag.log())[0]


class LogMelLoss(nn.Module):
    """HiFi-GAN log-mel L1 distance of two STFT magnitudes X (prediction) and Y (reference).

        M = fb @ X (magnitude, not power),   Mel = mean | log(clamp(M_X, 1e-5)) - log(clamp(M_Y, 1e-5)) |
        dMel/dX = fb^T @ ( sign(log M_X - log M_Y) [M_X >= 1e-5] / (n M_X) )

    fb is the Slaney-scale mel filterbank with Slaney area normalisation (librosa's default).
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
        """log(clamp(fb @ X, 1e-5)) -> [B, n_mels, frames]."""
        return torch.matmul(self.mel_basis.to(magnitude.dtype), magnitude).clamp_(min=MEL_FLOOR).log_()

    def value_and_grad(self, magnitudes, batch: int, need_grad: bool = False):
        """`magnitudes` is X stacked on Y ([2B, bins, frames]): one matmul for both."""
        mel = torch.matmul(self.mel_basis.to(magnitudes.dtype), magnitudes)
        log_mel = mel.clamp(min=MEL_FLOOR).log_()
        log_diff = log_mel[:batch] - log_mel[batch:]
        value = log_diff.abs().mean()
        if not need_grad:
            return value, None
        pred_mel = mel[:batch]
        grad_mel = log_diff.sign_().div_(pred_mel.clamp(min=MEL_FLOOR)).mul_(1.0 / log_diff.numel())
        grad_mel.masked_fill_(pred_mel < MEL_FLOOR, 0.0)
        return value, torch.matmul(self.mel_basis.to(grad_mel.dtype).T, grad_mel)

    def forward(self, pred_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
        return self.value_and_grad(torch.cat([pred_mag, ref_mag]), pred_mag.shape[0])[0]


class _SpectralLossFunction(torch.autograd.Function):
    """(SC, LogMag, Mel) of one STFT resolution, differentiated by hand.

    Forward: one STFT of [pred; ref], the floored magnitudes, the loss terms and, for the terms
    that need it, their gradients dTerm/dX (saved). Backward: dL/dX = sum_term g_term dTerm/dX,
    then STFTMagnitude.magnitude_backward. Terms not asked for come out as non-differentiable zeros
    (`stft_terms` False: SC and LogMag; `log_mel` None: Mel); `grads` says which terms need gradients.
    """

    @staticmethod
    def forward(ctx, pred, ref, stft, log_mel, stft_terms, grads):
        batch = pred.shape[0]
        spec = stft.spectrum(torch.cat([pred, ref]))
        magnitudes = _floored_magnitude(spec)
        pred_mag, ref_mag = magnitudes[:batch], magnitudes[batch:]
        grad_sc = grad_log = grad_mel = None
        sc, log_mag, mel = (torch.zeros((), device=pred.device) for _ in range(3))
        if stft_terms:
            sc, grad_sc = SpectralConvergenceLoss.value_and_grad(pred_mag, ref_mag, grads[0])
            log_magnitudes = magnitudes.log()
            log_mag, grad_log = LogSTFTMagnitudeLoss.value_and_grad(
                log_magnitudes[:batch], log_magnitudes[batch:], pred_mag, grads[1])
        if log_mel is not None:
            mel, grad_mel = log_mel.value_and_grad(magnitudes, batch, grads[2])
        ctx.mark_non_differentiable(*(term for term, grad in zip((sc, log_mag, mel), grads) if not grad))
        if any(grads):
            ctx.stft, ctx.length = stft, pred.shape[-1]
            ctx.save_for_backward(spec[:batch], pred_mag, grad_sc, grad_log, grad_mel)
        return sc, log_mag, mel

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_terms):
        spec, pred_mag, *term_grads = ctx.saved_tensors
        grad_mag = None
        with _no_autocast(pred_mag):
            for grad_term, term_grad in zip(grad_terms, term_grads):
                if term_grad is None:
                    continue
                if grad_mag is None:
                    grad_mag = term_grad * grad_term
                else:
                    grad_mag.addcmul_(term_grad, grad_term)
            grad_x = ctx.stft.magnitude_backward(grad_mag, spec, pred_mag, ctx.length)
        return grad_x, None, None, None, None, None


def _spectral_terms(pred, ref, stft, log_mel=None, stft_terms=True, train_stft=True, train_mel=True):
    """(SC, LogMag, Mel) of one resolution. Only trained terms get gradients, and only if autograd is on:
    when none does, no autograd graph is built at all."""
    need = torch.is_grad_enabled() and pred.requires_grad
    train_stft, train_mel = need and stft_terms and train_stft, need and log_mel is not None and train_mel
    with torch.set_grad_enabled(train_stft or train_mel):
        return _SpectralLossFunction.apply(pred, ref, stft, log_mel, stft_terms,
                                           (train_stft, train_stft, train_mel))


class MultiResolutionSTFTLoss(nn.Module):
    """Parallel WaveGAN multi-resolution STFT loss.

        loss = (1 / R) sum_r [ SC_r + LogMag_r ]
        SC_r = ||Y_r - X_r||_F / ||Y_r||_F,   LogMag_r = mean |log Y_r - log X_r|

    with X_r, Y_r the floored STFT magnitudes (STFTMagnitude) of prediction and reference at
    resolution r (win_lengths None: window = FFT size). `terms(pred, ref)` returns the two
    averages (SC, LogMag) separately, for logging.
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

    def terms(self, pred: torch.Tensor, ref: torch.Tensor):
        """(spectral convergence, log-magnitude), each averaged over the resolutions."""
        pred, ref = _as_float_batch(pred, ref, "MultiResolutionSTFTLoss", self.min_length)
        with _no_autocast(pred):
            per_resolution = [_spectral_terms(pred, ref, stft)[:2] for stft in self.stfts]
            sc, log_mag = (torch.stack(values).mean() for values in zip(*per_resolution))
        return sc, log_mag

    def forward(self, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        sc, log_mag = self.terms(pred, ref)
        return sc + log_mag


class MelSpectrogramLoss(nn.Module):
    """HiFi-GAN log-mel L1 loss.

        loss = mean | log(clamp(fb @ X, 1e-5)) - log(clamp(fb @ Y, 1e-5)) |

    X, Y the floored STFT magnitudes (STFTMagnitude: periodic Hann, centred, reflect padding) of
    prediction and reference, fb the Slaney mel filterbank (LogMelLoss). As in HiFi-GAN the
    filterbank is applied to the magnitude, not the power.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop_length: int = 256,
                 n_mels: int = 80, f_min: float = 0.0, f_max: float = 8000.0):
        super().__init__()
        self.stft = STFTMagnitude(n_fft, hop_length)
        self.log_mel = LogMelLoss(sample_rate, n_fft, n_mels, f_min, f_max)
        self.min_length = n_fft

    @property
    def mel_basis(self) -> torch.Tensor:
        return self.log_mel.mel_basis

    def forward(self, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        pred, ref = _as_float_batch(pred, ref, "MelSpectrogramLoss", self.min_length)
        with _no_autocast(pred):
            return _spectral_terms(pred, ref, self.stft, self.log_mel, stft_terms=False)[2]


def _same_framing(a: STFTMagnitude, b: STFTMagnitude) -> bool:
    return (a.fft_size, a.hop_size, a.win_length) == (b.fft_size, b.hop_size, b.win_length)


class CombinedLoss(nn.Module):
    """Weighted sum of the four training losses.

        total = w_in rms(out, in) + w_tgt rms(out, tgt) + w_spec MRSTFT(out, tgt) + w_mel Mel(out, tgt)

    Returns (total, components), components = {"rms_input", "rms_target", "spectral", "mel"} as
    detached scalar tensors (no host sync). Every component is computed for monitoring, but those
    with weight 0 are computed without autograd and cost no backward pass. The STFT of the mel
    framing (1024/256) is computed once and serves both the MR-STFT and the mel loss.
    """

    def __init__(self, *, rms_input: float = 0.0, rms_target: float = 1.0, spectral: float = 0.0, mel: float = 0.0,
                 sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.weights = check_weights(dict(rms_input=rms_input, rms_target=rms_target, spectral=spectral, mel=mel))
        self.spectral = MultiResolutionSTFTLoss()
        self.mel = MelSpectrogramLoss(sample_rate=sample_rate)
        self.min_length = max(self.spectral.min_length, self.mel.min_length)

    def forward(self, output_audio: torch.Tensor, input_audio: torch.Tensor, target_audio: torch.Tensor):
        out, inp = _as_float_batch(output_audio, input_audio, "CombinedLoss (output vs input)", self.min_length)
        out, tgt = _as_float_batch(output_audio, target_audio, "CombinedLoss (output vs target)", self.min_length)
        w = self.weights
        train_spectral, train_mel = w["spectral"] > 0, w["mel"] > 0
        components = {}
        with _no_autocast(out):
            with torch.set_grad_enabled(torch.is_grad_enabled() and w["rms_input"] > 0):
                components["rms_input"] = _rms(out, inp, RMS_EPS)
            with torch.set_grad_enabled(torch.is_grad_enabled() and w["rms_target"] > 0):
                components["rms_target"] = _rms(out, tgt, RMS_EPS)

            sc, log_mag, mel = [], [], None
            for stft in self.spectral.stfts:
                shared = _same_framing(stft, self.mel.stft)   # this STFT also gives the mel loss
                terms = _spectral_terms(out, tgt, stft, self.mel.log_mel if shared else None,
                                        train_stft=train_spectral, train_mel=train_mel)
                sc.append(terms[0])
                log_mag.append(terms[1])
                mel = terms[2] if shared else mel
            if mel is None:   # no resolution shares the mel framing
                mel = _spectral_terms(out, tgt, self.mel.stft, self.mel.log_mel, stft_terms=False,
                                      train_mel=train_mel)[2]
            components["spectral"] = torch.stack(sc).mean() + torch.stack(log_mag).mean()
            components["mel"] = mel

        total = sum(w[name] * components[name] for name in LOSS_COMPONENTS if w[name] > 0)
        return total, {name: components[name].detach() for name in LOSS_COMPONENTS}
