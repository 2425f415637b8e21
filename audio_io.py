"""Reading audio files as mono float32 at the codec's SAMPLE_RATE, whole (load_audio) or in blocks
(open_audio + iter_mono_blocks). Every failure is AudioLoadError('PATH: reason')."""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import numpy as np
import soundfile
import torch
import torchaudio.functional

from codec import SAMPLE_RATE
from utils import one_line


class AudioLoadError(ValueError):
    """An audio file cannot be used; the message is one line: 'PATH: reason'."""

def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Read any file libsndfile understands (WAV, FLAC, OGG, MP3, ...) as mono float32 at SAMPLE_RATE: [1, N].

    Channels are averaged (mono = mean over channels), then the audio is resampled with
    torchaudio's band-limited sinc interpolation.
    """
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)   # [N, C]
    except Exception as error:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise AudioLoadError(f"{path}: unreadable or not audio ({one_line(error)})") from None
    if samples.shape[0] == 0:
        raise AudioLoadError(f"{path}: empty (no audio samples)")
    check_finite_samples(samples, path)
    mono = torch.from_numpy(mix_to_mono(samples, path)).unsqueeze(0)   # [1, N]
    if rate != SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, int(rate), SAMPLE_RATE)
        check_finite_samples(mono, path, RESAMPLED)
    return mono.contiguous()


@contextlib.contextmanager
def open_audio(path: str | os.PathLike) -> Iterator[soundfile.SoundFile]:
    """The file opened for block-wise reading; AudioLoadError('PATH: ...') if libsndfile cannot read it,
    when opening or later while reading (a file can be corrupt past its header)."""
    try:
        handle = soundfile.SoundFile(str(path))
    except Exception as error:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise AudioLoadError(f"{path}: unreadable or not audio ({one_line(error)})") from None
    try:
        with handle:
            yield handle
    except soundfile.SoundFileError as error:
        raise AudioLoadError(f"{path}: unreadable or not audio ({one_line(error)})") from None


def resampled_length(samples: int, rate: int) -> int:
    """Samples that torchaudio.functional.resample makes of `samples` at `rate`: ceil(samples * 24000 / rate)."""
    return samples if rate == SAMPLE_RATE else -(-samples * SAMPLE_RATE // rate)


def _resample_context(rate: int) -> tuple[int, int]:
    """(period, context) in input samples for resampling a long file in blocks.

    torchaudio's resampler is a polyphase filter: output samples come in groups of new/g per
    period of orig/g input samples (g = gcd), and each group reads input within `width` samples of
    its period, width = ceil(6 * orig / (0.99 * min(orig, new))) (lowpass_filter_width 6, rolloff
    0.99, its defaults). A block that starts on a period boundary and has `context` >= width extra
    input samples each side therefore yields the whole-file result; context is twice width, whole periods.
    """
    gcd = math.gcd(rate, SAMPLE_RATE)
    orig, new = rate // gcd, SAMPLE_RATE // gcd
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))
    return orig, orig * math.ceil(2 * width / orig)


def iter_mono_blocks(handle: soundfile.SoundFile, block_seconds: float) -> Iterator[np.ndarray]:
    """The open file as mono float32 at SAMPLE_RATE, in blocks of about block_seconds; their concatenation
    is load_audio's result (within float32 rounding), and memory stays at a few blocks for any length.

    A file of at most one block is read and resampled whole, exactly as load_audio does.
    """
    path, rate = handle.name, handle.samplerate
    period, context = _resample_context(rate) if rate != SAMPLE_RATE else (1, 0)
    block = period * max(1, round(block_seconds * rate / period))
    pending, pending_start, next_start = np.zeros(0, np.float32), 0, 0   # pending: input from pending_start on
    while True:
        samples = handle.read(block, dtype="float32", always_2d=True)
        check_finite_samples(samples, path)
        end_of_file = len(samples) < block
        pending = np.concatenate([pending, mix_to_mono(samples, path)])
        available = pending_start + len(pending)
        # a block is resampled once it has `context` input beyond its end, or the file has ended
        while next_start < available and (end_of_file or available >= next_start + block + context):
            left, stop = max(0, next_start - context), min(available, next_start + block + context)
            last = end_of_file and next_start + block >= available
            yield _resample_block(pending[left - pending_start: stop - pending_start], rate,
                                  (next_start - left) // period, None if last else block // period, path)
            next_start += block
            drop = max(0, next_start - context - pending_start)
            pending, pending_start = pending[drop:], pending_start + drop
        if end_of_file:
            return


def _resample_block(samples: np.ndarray, rate: int, skip_periods: int, periods: int | None, path) -> np.ndarray:
    """Resample input samples (starting on a period boundary) and keep `periods` periods of output after
    the first `skip_periods` (the left context); periods None keeps everything to the end."""
    if rate == SAMPLE_RATE:
        return samples
    new = SAMPLE_RATE // math.gcd(rate, SAMPLE_RATE)
    resampled = torchaudio.functional.resample(torch.from_numpy(samples).unsqueeze(0), rate, SAMPLE_RATE)[0]
    check_finite_samples(resampled, path, RESAMPLED)
    stop = None if periods is None else (skip_periods + periods) * new
    return resampled[skip_periods * new: stop].numpy()


def mix_to_mono(samples: np.ndarray, path) -> np.ndarray:
    """[N, C] -> [N] float32: the mean over channels (the one definition the loaders share), checked finite."""
    with np.errstate(over="ignore"):      # an overflow is reported just below, naming the file
        mono = samples.mean(axis=1, dtype=np.float32)
    check_finite_samples(mono, path, "after mixing the channels to mono")
    return mono


RESAMPLED = f"after resampling to {SAMPLE_RATE} Hz"


def check_finite_samples(samples, path, stage: str = "") -> None:
    """AudioLoadError unless every sample is finite. Finite input can still overflow float32 when channels
    are summed or the resampling filter adds neighbours (a float file holding 3e38), hence `stage`."""
    finite = torch.isfinite(samples).all() if isinstance(samples, torch.Tensor) else np.isfinite(samples).all()
    if not finite:
        where = f" {stage}" if stage else ""
        raise AudioLoadError(f"{path}: corrupt (NaN or infinite samples{where}; "
                             f"float files must hold finite values of about +-1)")

