"""Reading audio files of any format as mono float32 at the codec's SAMPLE_RATE, whole or in blocks.

Two decoders, chosen by the file's first bytes, not its name:

    libsndfile (soundfile)  WAV, FLAC, Ogg Vorbis/Opus, AIFF, AU, W64, CAF: exact and fast
    FFmpeg (PyAV)           MP3, and everything else FFmpeg demuxes: AAC/ALAC in .m4a/.mp4, Opus/Vorbis
                            in .webm/.mkv, raw AAC, WMA, ... (and what libsndfile fails to open)

MP3 goes to FFmpeg although libsndfile reads it: libsndfile stops at the frame count of the file's
Xing/Info header, so an MP3 whose header under-promises (two streams joined, an edited file) loses its
tail, while FFmpeg decodes every frame. On files whose header is right both give the same samples.

Both give the same reader (open_audio): .name, .samplerate, .channels, .frames (the header's estimate,
which can be wrong either way, 0 if unknown: the decoded length is the truth) and .read(n) -> float32
[m, channels], m < n only at the end. Channels are averaged and the audio resampled with torchaudio
whatever the format, so every format is treated alike. Every failure is AudioLoadError('PATH: reason').
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import av
import numpy as np
import soundfile
import torch
import torchaudio.functional

from music_continuation.codec import SAMPLE_RATE
from music_continuation.utils import UserError, one_line

# First bytes of the formats libsndfile reads; any other file goes to FFmpeg. (libsndfile takes a file
# that only its name calls .mp3 for MPEG and prints mpg123's complaints about it on stderr.)
LIBSNDFILE_SIGNATURES = (b"RIFF", b"RIFX", b"RF64", b"BW64", b"riff",   # WAV, RF64, W64
                         b"FORM", b"fLaC", b"OggS", b".snd", b"dns.", b"caff")   # AIFF ... CAF


class AudioLoadError(UserError, ValueError):
    """An audio file cannot be used; the message is one line: 'PATH: reason'."""


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Read an audio file (any format open_audio reads) as mono float32 at SAMPLE_RATE: [1, N].

    Channels are averaged (mono = mean over channels), then the audio is resampled with
    torchaudio's band-limited sinc interpolation.
    """
    with open_audio(path) as handle:
        samples, rate = handle.read(-1, dtype="float32", always_2d=True), handle.samplerate   # [N, C]
    if samples.shape[0] == 0:
        raise AudioLoadError(f"{path}: empty (no audio samples)")
    check_finite_samples(samples, path)
    mono = torch.from_numpy(mix_to_mono(samples, path)).unsqueeze(0)   # [1, N]
    if rate != SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, int(rate), SAMPLE_RATE)
        check_finite_samples(mono, path, RESAMPLED)
    return mono.contiguous()


@contextlib.contextmanager
def open_audio(path: str | os.PathLike) -> Iterator[soundfile.SoundFile | FFmpegReader]:
    """The file opened for block-wise reading: libsndfile if its first bytes are a format libsndfile reads
    and it opens, else FFmpeg. AudioLoadError('PATH: ...') if neither can, or later while reading (a file
    can be corrupt past its header)."""
    handle = _open_reader(path)
    try:
        with handle:
            yield handle
    except soundfile.SoundFileError as error:      # FFmpegReader raises AudioLoadError itself
        raise AudioLoadError(f"{path}: unreadable or not audio ({one_line(error)})") from None


def _open_reader(path) -> soundfile.SoundFile | FFmpegReader:
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as error:
        raise AudioLoadError(f"{path}: unreadable ({error.strerror})") from None
    reasons = []
    if head.startswith(LIBSNDFILE_SIGNATURES):
        try:
            return soundfile.SoundFile(str(path))
        except Exception as error:  # noqa: BLE001 - libsndfile raises several types for bad files
            reasons.append(f"libsndfile: {getattr(error, 'error_string', None) or one_line(error)}")
    try:
        return FFmpegReader(path)
    except AudioLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - av.FFmpegError mostly, but any failure here is the file's
        reasons.append(f"FFmpeg: {getattr(error, 'strerror', None) or one_line(error)}")
    raise AudioLoadError(f"{path}: unreadable or not audio ({'; '.join(reasons)})")


class FFmpegReader:
    """The best audio stream of a file FFmpeg demuxes, decoded by PyAV, with soundfile.SoundFile's reading
    interface (what iter_mono_blocks and load_audio use). Decodes as it reads: memory is one read's samples.

    Samples are what FFmpeg's decoder outputs, after the priming and padding it knows to skip (encoder
    delay from an MP4 edit list, Opus pre-skip, LAME's gapless header); .frames is the container's duration.
    """

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        # "file:" so that a name like "concat:x" or "pipe:1" is never taken for an FFmpeg protocol;
        # metadata in another encoding than UTF-8 (old tags) must not fail the audio
        self._container = av.open("file:" + os.path.abspath(path), metadata_errors="replace")
        try:
            self._stream = self._container.streams.best("audio")
            if self._stream is None:
                raise AudioLoadError(self._no_audio_reason())
            context = self._stream.codec_context
            self.samplerate, self.channels = context.sample_rate, context.channels
            if not self.samplerate or not self.channels:
                raise AudioLoadError(f"{path}: unreadable (FFmpeg finds no sample rate or channel count "
                                     f"for its {context.name} audio)")
        except BaseException:
            self._container.close()
            raise
        self.frames = self._estimated_frames()
        self._decoded = self._decode()
        self._pending = np.zeros((0, self.channels), np.float32)   # decoded, not yet read

    def _no_audio_reason(self) -> str:
        kinds = sorted({stream.type for stream in self._container.streams})
        if not kinds or "audio" in kinds:   # FFmpeg may take any bytes for the format their name suggests
            return f"{self.name}: unreadable or not audio (FFmpeg finds no decodable audio stream in it)"
        return (f"{self.name}: not audio (FFmpeg finds {' and '.join(kinds)} but no audio in this "
                f"{self._container.format.name} file)")

    def _estimated_frames(self) -> int:
        """The stream's duration in samples, else the container's, else 0 (unknown)."""
        if self._stream.duration is not None:
            seconds = float(self._stream.duration * self._stream.time_base)
        elif self._container.duration is not None:
            seconds = self._container.duration / av.time_base
        else:
            return 0
        return max(0, round(seconds * self.samplerate))

    def read(self, frames: int = -1, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """The next `frames` samples (all that are left if frames < 0) as float32 [m, channels]; m < frames
        only at the end of the file."""
        if dtype != "float32" or not always_2d:
            raise ValueError("FFmpegReader.read gives float32 [frames, channels] only")
        parts, count = [self._pending], len(self._pending)
        while frames < 0 or count < frames:
            samples = next(self._decoded, None)
            if samples is None:
                break
            parts.append(samples)
            count += len(samples)
        samples = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if 0 <= frames < len(samples):
            samples, self._pending = samples[:frames], samples[frames:].copy()   # a copy frees the rest
        else:
            self._pending = np.zeros((0, self.channels), np.float32)
        return samples

    def _decode(self) -> Iterator[np.ndarray]:
        """Every decoded frame as float32 [n, channels]; AudioLoadError on corrupt data."""
        decoded = 0
        try:
            for packet in self._container.demux(self._stream):
                for frame in packet.decode():
                    if frame.sample_rate != self.samplerate:
                        raise AudioLoadError(f"{self.name}: the sample rate changes from {self.samplerate} to "
                                             f"{frame.sample_rate} Hz after {decoded / self.samplerate:.2f} s")
                    samples = frame_to_float(frame)
                    if samples.shape[1] != self.channels:
                        # the layout changed mid-stream (broadcast recordings): keep the mono mix, which is
                        # all that is used, in the stream's channel count
                        samples = np.repeat(samples.mean(axis=1, keepdims=True), self.channels, axis=1)
                    decoded += len(samples)
                    yield samples
        except av.FFmpegError as error:
            raise AudioLoadError(f"{self.name}: corrupt after {decoded / self.samplerate:.2f} s of audio "
                                 f"(FFmpeg: {error.strerror or one_line(error)})") from None

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> FFmpegReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# FFmpeg's sample formats (the same with a "p" suffix are planar: one plane per channel) -> numpy type
# and the scale to +-1, as libsndfile and FFmpeg's own converter scale integers: s16 / 2**15, u8 offset by 128.
SAMPLE_FORMATS = {"u8": (np.uint8, 2.0 ** -7), "s16": (np.int16, 2.0 ** -15), "s32": (np.int32, 2.0 ** -31),
                  "s64": (np.int64, 2.0 ** -63), "flt": (np.float32, 1.0), "dbl": (np.float64, 1.0)}


def frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame of any sample format, planar or packed, as float32 [samples, channels].

    Read from the planes directly: PyAV's to_ndarray does not take every format (s64)."""
    kind, scale = SAMPLE_FORMATS[frame.format.name.removesuffix("p")]
    count, channels = frame.samples, frame.layout.nb_channels
    if frame.format.is_planar:
        samples = np.stack([np.frombuffer(plane, kind, count) for plane in frame.planes[:channels]], axis=1)
    else:
        samples = np.frombuffer(frame.planes[0], kind, count * channels).reshape(count, channels)
    if kind == np.uint8:
        return (samples.astype(np.float32) - 128) * np.float32(scale)
    with np.errstate(over="ignore"):      # a double beyond float32's range becomes inf: check_finite_samples says so
        return samples.astype(np.float32) * np.float32(scale)


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


def iter_mono_blocks(handle, block_seconds: float) -> Iterator[np.ndarray]:
    """The open file (open_audio's reader) as mono float32 at SAMPLE_RATE, in blocks of about block_seconds;
    their concatenation is load_audio's result (within float32 rounding), and memory stays at a few blocks
    for any length.

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
