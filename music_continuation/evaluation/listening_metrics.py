"""Two objective figures for listening tests: does the continuation keep the rhythm, and the harmony?

The training losses (losses/audio.py) compare a continuation with the real one sample by sample or frame
by frame; a continuation that keeps the groove and the key but not the exact notes scores badly on
them. These two figures look at what a listener hears instead:

rhythm_similarity(a, b)
    Pearson correlation of the onset-strength envelopes of a and b, maximised over small lags.
    The onset strength is the spectral flux of the log-mel spectrogram (half-wave rectified, summed
    over mel bands, Böck & Widmer / librosa.onset.onset_strength):

        L[m, t] = log(clamp(fb @ |STFT(x)|, 1e-5))              (losses.MelSpectrogramLoss framing:
                                                                  n_fft 1024, hop 256, 80 mels, 0-8 kHz)
        o[t]    = sum_m max(0, L[m, t] - L[m, t - 1]),           t = 1 .. frames - 1
        rhythm  = max_{|l| <= 50 ms} pearson(o_a[t], o_b[t + l])  (over the overlapping frames)

    In [-1, 1]; 1.0 for identical audio (at lag 0). The lag tolerance (±4 frames of 10.7 ms) forgives
    a continuation whose beats land a few milliseconds early or late.

chroma_similarity(a, b)
    Lin's concordance correlation coefficient of the two pitch-class profiles. A profile is the mean
    power chroma, divided by the chroma of a flat (white) spectrum and normalised to sum to 1:

        P[k, t]   = |STFT(x)|^2                                   (n_fft 4096, hop 1024: 5.9 Hz bins)
        chroma[c] = mean_t sum_k W[c, k] P[k, t]                  (W: chroma_filterbank, 27.5 Hz - 4.2 kHz)
        p[c]      = (chroma[c] / w[c]) / sum_c' (chroma[c'] / w[c']),  w[c] = sum_k W[c, k]
        d         = p - 1/12                                      (the profile's departure from flat)
        chroma    = 2 <d_a, d_b> / (|d_a|^2 + |d_b|^2)

    In [-1, 1]; 1.0 only for identical profiles (same key and the same share of pitched energy).
    Why not the cosine of the raw chroma vectors: chroma vectors are
    non-negative, so any two sounds score well above 0 (noise against music gave 0.92). Dividing by
    w makes white noise's expected profile exactly flat (without it the filterbank alone favours the
    pitch classes whose semitones span more STFT bins: B 1.75x C#); the profiles sum to 1, so their
    means are equal and the concordance coefficient is 2 cov / (var_a + var_b). Unlike a Pearson
    correlation it is not scale-invariant: by Cauchy-Schwarz |chroma| <= 2r / (1 + r^2) with
    r = |d_noise| / |d_music|, so a nearly flat profile (noise: r ~ 0.03) scores near 0 against any
    key, where Pearson would amplify its sampling ripple into an arbitrary correlation. Two chords
    with no common pitch class have sum_c p_a p_b ~ 0 and score 2 (0 - 1/12) / (|d_a|^2 + |d_b|^2) < 0
    (two triads: -1/3). Two atonal signals (noise against noise) score near 0: they share no key.
    It measures key/harmony, not melody order.

Silence: if neither signal has an onset (constant envelope) or any pitched energy, the two agree and
the figure is 1.0; if only one of them is silent it is 0.0. (Likewise, two profiles that are both
exactly flat agree, 1.0.)

Runtime uses torch only (the STFT and mel filterbank come from losses/audio.py, so the spectrograms are
the ones the losses see); librosa is a test-time reference only.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from music_continuation.codec import SAMPLE_RATE
from music_continuation.losses.audio import MAGNITUDE_FLOOR, MEL_FLOOR, MelSpectrogramLoss, STFTMagnitude

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
RHYTHM_MAX_LAG_SECONDS = 0.05
CHROMA_N_FFT = 4096
CHROMA_HOP = 1024
CHROMA_F_MIN = 27.5        # A0, the lowest piano key
CHROMA_F_MAX = 4200.0      # just above C8, the highest piano key
FLAT_EPS = 1e-8            # below this a standard deviation / norm counts as "no signal"

_mel_spectrogram = None    # built on first use: one MelSpectrogramLoss shared by every call
_chroma_stft = None        # (STFTMagnitude, filterbank), built on first use


def _mono(audio) -> torch.Tensor:
    """Any of [N], [1, N], [1, 1, N] (tensor or numpy) -> float32 CPU tensor [N]."""
    tensor = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio)
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.dim() > 1:
        if tensor.numel() != tensor.shape[-1]:
            raise ValueError(f"expected one mono signal, got shape {list(tensor.shape)}")
        tensor = tensor.reshape(-1)
    return tensor


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad short signals so that a centred, reflect-padded STFT of `length` is defined."""
    return torch.nn.functional.pad(x, (0, length - x.shape[-1])) if x.shape[-1] < length else x


def mel_module() -> MelSpectrogramLoss:
    """The shared log-mel framing (losses.MelSpectrogramLoss defaults)."""
    global _mel_spectrogram
    if _mel_spectrogram is None:
        _mel_spectrogram = MelSpectrogramLoss(sample_rate=SAMPLE_RATE)
    return _mel_spectrogram


def log_mel(audio) -> torch.Tensor:
    """Natural-log mel spectrogram [n_mels, frames] of a mono signal, exactly as the mel loss sees it."""
    mel = mel_module()
    x = _pad_to(_mono(audio), mel.min_length)
    with torch.no_grad():
        # Only .stft, .mel_basis and MEL_FLOOR of losses/audio.py are used: L = log(clamp(fb @ X, 1e-5)).
        return torch.matmul(mel.mel_basis, mel.stft(x[None])[0]).clamp(min=MEL_FLOOR).log()


def onset_strength(audio) -> torch.Tensor:
    """Spectral flux of the log-mel spectrogram: o[t] = sum_m max(0, L[m,t] - L[m,t-1]) -> [frames - 1]."""
    spec = log_mel(audio)
    return (spec[:, 1:] - spec[:, :-1]).clamp(min=0).sum(dim=0)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a < FLAT_EPS and norm_b < FLAT_EPS:
        return 1.0          # neither has any onset: same (absent) rhythm
    if norm_a < FLAT_EPS or norm_b < FLAT_EPS:
        return 0.0
    return float(min(1.0, (a @ b) / (norm_a * norm_b)))   # clamp the rounding of identical envelopes


def rhythm_similarity(a, b, max_lag_seconds: float = RHYTHM_MAX_LAG_SECONDS) -> float:
    """Max over |lag| <= max_lag_seconds of the Pearson correlation of the onset envelopes (module docstring)."""
    env_a, env_b = onset_strength(a), onset_strength(b)
    frames = min(env_a.shape[0], env_b.shape[0])
    env_a, env_b = env_a[:frames], env_b[:frames]
    max_lag = int(round(max_lag_seconds * SAMPLE_RATE / mel_module().stft.hop_size))
    max_lag = min(max_lag, max(frames - 2, 0))     # keep at least two overlapping frames
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        # o_a[t] against o_b[t + lag] over the frames where both exist
        shifted_a = env_a[max(0, -lag): frames - max(0, lag)]
        shifted_b = env_b[max(0, lag): frames - max(0, -lag)]
        best = max(best, _pearson(shifted_a, shifted_b))
    return best


def chroma_filterbank(n_fft: int = CHROMA_N_FFT, sample_rate: int = SAMPLE_RATE,
                      f_min: float = CHROMA_F_MIN, f_max: float = CHROMA_F_MAX) -> torch.Tensor:
    """Weights W [12, n_fft // 2 + 1] mapping STFT bins to pitch classes (index 0 = C, 9 = A).

    Bin k has frequency f_k = k * sr / n_fft and fractional MIDI pitch p_k = 69 + 12 log2(f_k / 440),
    so its pitch class is q_k = p_k mod 12. Its weight is split linearly between the two nearest
    pitch classes, W[c, k] = max(0, 1 - d(q_k, c)) with d the circular distance on the 12-tone
    circle, so a bin halfway between A and A# counts half for each; each bin's weights sum to 1.
    Bins outside [f_min, f_max] get weight 0 (sub-audio rumble and cymbal hiss have no pitch).
    """
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    in_range = (freqs >= f_min) & (freqs <= f_max)
    pitch = 69.0 + 12.0 * torch.log2(freqs.clamp(min=1e-6) / 440.0)
    pitch_class = torch.remainder(pitch, 12.0)                                   # [bins]
    classes = torch.arange(12, dtype=torch.float64)[:, None]                     # [12, 1]
    distance = torch.remainder(pitch_class[None] - classes, 12.0)
    distance = torch.minimum(distance, 12.0 - distance)                          # circular, in [0, 6]
    weights = (1.0 - distance).clamp(min=0.0) * in_range[None]
    return weights.float()


def _chroma_tools() -> tuple[STFTMagnitude, torch.Tensor]:
    """(the chroma STFT, the filterbank W), built on first use and shared by every call."""
    global _chroma_stft
    if _chroma_stft is None:
        _chroma_stft = (STFTMagnitude(CHROMA_N_FFT, CHROMA_HOP), chroma_filterbank())
    return _chroma_stft


def mean_chroma(audio) -> torch.Tensor:
    """Mean over frames of the power chroma (module docstring) -> [12]; not normalised."""
    stft, weights = _chroma_tools()
    x = _pad_to(_mono(audio), CHROMA_N_FFT)
    with torch.no_grad():
        power = stft(x[None])[0].square()          # [bins, frames]; floored at MAGNITUDE_FLOOR by STFTMagnitude
    return (weights @ power).mean(dim=1)


def _profile(chroma: torch.Tensor) -> torch.Tensor:
    """Mean chroma -> the whitened, sum-1 pitch-class profile p (module docstring), float64 [12]."""
    whitened = chroma.double() / _chroma_tools()[1].sum(dim=1).double()   # a flat spectrum -> a flat profile
    return whitened / whitened.sum()


def pitch_profile(audio) -> torch.Tensor:
    """The pitch-class profile p of the module docstring -> float64 [12], summing to 1."""
    return _profile(mean_chroma(audio))


def _is_silent(chroma: torch.Tensor) -> bool:
    """No pitched energy. Digital silence has the chroma W @ MAGNITUDE_FLOOR (the STFT's power floor);
    anything within 10x of that norm counts as silence too."""
    return float(chroma.norm()) < 10.0 * MAGNITUDE_FLOOR * float(_chroma_tools()[1].sum(dim=1).norm())


def concordance(p_a: torch.Tensor, p_b: torch.Tensor) -> float:
    """Lin's concordance 2 <d_a, d_b> / (|d_a|^2 + |d_b|^2) of two sum-1 profiles, d = p - mean(p)."""
    d_a, d_b = p_a - p_a.mean(), p_b - p_b.mean()
    spread = d_a @ d_a + d_b @ d_b
    if spread < FLAT_EPS ** 2:
        return 1.0          # both exactly flat: the same (absent) key
    return float((2.0 * (d_a @ d_b) / spread).clamp(-1.0, 1.0))   # clamp the rounding of identical profiles


def chroma_similarity(a, b) -> float:
    """Concordance of the pitch-class profiles of a and b (module docstring), in [-1, 1]."""
    chroma_a, chroma_b = mean_chroma(a), mean_chroma(b)
    quiet_a, quiet_b = _is_silent(chroma_a), _is_silent(chroma_b)
    if quiet_a and quiet_b:
        return 1.0
    if quiet_a or quiet_b:
        return 0.0
    return concordance(_profile(chroma_a), _profile(chroma_b))


def listening_metrics(continuation, target) -> dict:
    """{"rhythm": rhythm_similarity, "chroma": chroma_similarity} of a continuation against the real one."""
    return {"rhythm": rhythm_similarity(continuation, target), "chroma": chroma_similarity(continuation, target)}


__all__ = ["PITCH_CLASSES", "chroma_filterbank", "chroma_similarity", "concordance", "listening_metrics", "log_mel",
           "mean_chroma", "onset_strength", "pitch_profile", "rhythm_similarity"]

if __name__ == "__main__":  # pragma: no cover - a quick self-check: python listening_metrics.py
    t = torch.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
    a4 = torch.sin(2 * math.pi * 440.0 * t)
    print("A4 chroma argmax:", PITCH_CLASSES[int(mean_chroma(a4).argmax())])
    print("identical:", listening_metrics(a4, a4))
