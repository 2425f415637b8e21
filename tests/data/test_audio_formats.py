"""Every format a player decodes: real encodings made here with PyAV's encoders (AAC, Opus, FLAC), read
through audio_io (libsndfile for what it reads, FFmpeg for the rest, chosen by content) and prepare_data.

The source is a stereo sweep (left 0.5, right 0.25 of a 220 -> 3520 Hz chirp), so the mono mix is 0.375 x the
chirp: a reference computed from the formula at 24 kHz, independent of every decoder and resampler here.
"""
from __future__ import annotations

import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from music_continuation.codec import HOP_LENGTH, SAMPLE_RATE
from music_continuation.data import audio_io
from music_continuation.data import cache as data
from music_continuation.data import prepare as prepare_data
from music_continuation.data.journal import read_skipped

SECONDS = 1.6         # exactly 120 latent frames at 24 kHz (see test_prepare_data_reads_a_folder_of_real_encodings)
MONO_LEVEL = 0.375    # the mean of the channels' amplitudes 0.5 and 0.25
# name -> (encoder, container, sample rate, priming samples the decoded audio still holds, codec frame size)
LOSSY = {
    "aac.m4a": ("aac", None, 44_100, 0, 1024),            # the MP4 edit list tells FFmpeg to skip the priming
    "aac.mp4": ("aac", None, 48_000, 0, 1024),
    "opus.webm": ("libopus", None, 48_000, 0, 960),       # Opus pre-skip: in the WebM header, skipped
    "opus.opus": ("libopus", "ogg", 48_000, 0, 960),      # Ogg Opus: libsndfile's
    "adts_aac.mp3": ("aac", "adts", 44_100, 1024, 1024),  # raw AAC named .mp3: nothing says the 1024 are priming
    "no_extension": ("aac", "mp4", 44_100, 0, 1024),
}


def chirp(rate: int, seconds: float = SECONDS, delay: float = 0.0, f0: float = 220.0, f1: float = 3520.0):
    """sin(2 pi (f0 t + (f1 - f0) t^2 / 2T)) at t = n / rate - delay (zero before the delay), float32."""
    t = np.arange(round((seconds + delay) * rate)) / rate - delay
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds))
    return np.where(t >= 0, np.sin(phase), 0).astype(np.float32)


def encode(path: Path, encoder: str, rate: int, container: str | None = None, seconds: float = SECONDS,
           options: dict | None = None, layout: str = "stereo") -> np.ndarray:
    """Write the sweep (stereo, or its mono mix) with one of PyAV's encoders, as a real file of that format;
    returns the samples encoded, [channels, N]."""
    sweep = chirp(rate, seconds)
    signal = np.stack([0.5 * sweep, 0.25 * sweep]) if layout == "stereo" else MONO_LEVEL * sweep[None]
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        stream = out.add_stream(encoder, rate=rate, layout=layout)
        size = stream.codec_context.frame_size or 1024
        convert = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate,
                                    frame_size=size)      # the encoder's sample format, in its frame size
        frame = av.AudioFrame.from_ndarray(signal, format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)   # pts: the muxer's edit list
        for chunk in convert.resample(frame) + convert.resample(None) + [None]:
            for packet in stream.encode(chunk):
                out.mux(packet)
    return signal


def png_bytes() -> bytes:
    """A valid 4 x 4 grey PNG (a cover image)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * 4 for _ in range(4)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))


def best_lag(x: np.ndarray, reference: np.ndarray, max_lag: int) -> int:
    """The shift of x (0..max_lag samples) that best matches the reference (FFT cross-correlation)."""
    size = 1 << int(np.ceil(np.log2(len(x) + len(reference))))
    cross = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(reference, size)), size)
    return int(np.argmax(cross[: max_lag + 1]))


# --------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("name", LOSSY)
def test_lossy_encodings_decode_to_the_source(tmp_path, name):
    encoder, container, rate, priming, frame_size = LOSSY[name]
    encode(tmp_path / name, encoder, rate, container)
    with audio_io.open_audio(tmp_path / name) as handle:
        backend = type(handle)
        assert (handle.samplerate, handle.channels) == (rate, 2)
    assert backend is (soundfile.SoundFile if name.endswith(".opus") else audio_io.FFmpegReader)

    audio = audio_io.load_audio(tmp_path / name)[0].numpy()
    delay = priming / rate
    reference = MONO_LEVEL * chirp(SAMPLE_RATE, delay=delay)      # the source as it should come out, priming too
    # the length: the source plus the priming and at most one codec frame of end padding (at 24 kHz, rounded up)
    extra = audio_io.resampled_length(frame_size, rate)
    assert len(reference) <= len(audio) <= len(reference) + extra
    # aligned as promised: the best match is where the priming puts it (one sample for the fractional part)
    assert abs(best_lag(audio, MONO_LEVEL * chirp(SAMPLE_RATE), 2 * extra) - round(delay * SAMPLE_RATE)) <= 1
    # a lossy codec at its default bit rate keeps a loud sweep's error more than 15 dB below it (error/signal
    # r < 0.18, correlation 1/sqrt(1 + r^2) > 0.98) and its level within 5 %; a decoding error (sample format,
    # channel order, rate, offset) gives a correlation near 0 or a level off by a factor. The first and last
    # 0.1 s are left out: the codecs' transients at the cut edges of the sweep.
    middle = slice(round((delay + 0.1) * SAMPLE_RATE), len(reference) - SAMPLE_RATE // 10)
    assert correlation(audio[middle], reference[middle]) > 0.98
    level = np.sqrt(np.mean(audio[middle] ** 2) / np.mean(reference[middle] ** 2))
    assert abs(level - 1) < 0.05


def test_what_libsndfile_fails_to_open_goes_to_ffmpeg(tmp_path):
    """Ogg FLAC starts like any Ogg file (libsndfile's), but libsndfile cannot decode it; FFmpeg decodes it
    losslessly: the 16-bit samples of the source within the one step of the encoder's rounding to 16 bits."""
    signal = encode(tmp_path / "flac.oga", "flac", 44_100, "ogg")
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.SoundFile(tmp_path / "flac.oga")
    with audio_io.open_audio(tmp_path / "flac.oga") as handle:
        assert isinstance(handle, audio_io.FFmpegReader)
        samples = handle.read(-1)
    assert samples.shape == signal.T.shape
    np.testing.assert_allclose(samples, signal.T, rtol=0, atol=2 ** -15)


def test_ffmpeg_reader_streams_like_load_audio(tmp_path):
    """Reads of n give n samples until the end; iter_mono_blocks over the reader gives load_audio's samples
    exactly (AAC at 24 kHz: no resampling, so the blocks' boundaries, unaligned with the 1024-sample frames,
    are the only difference); the header's length estimate is within one frame and the priming of the truth."""
    path = tmp_path / "aac24.m4a"
    encode(path, "aac", SAMPLE_RATE, seconds=1.0)
    whole = audio_io.load_audio(path)[0].numpy()
    with audio_io.open_audio(path) as handle:
        sizes = []
        while not sizes or sizes[-1] == 1000:
            sizes.append(len(handle.read(1000)))
    assert sum(sizes) == len(whole) and all(size == 1000 for size in sizes[:-1])
    with audio_io.open_audio(path) as handle:
        assert abs(handle.frames - len(whole)) <= 2 * 1024
        blocks = list(audio_io.iter_mono_blocks(handle, block_seconds=0.1))
    assert max(len(block) for block in blocks) == 0.1 * SAMPLE_RATE
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


def test_a_stream_that_changes_layout_or_rate(tmp_path):
    """Raw AAC is a sequence of self-contained frames, so two files joined are one stream whose channel count
    (or rate) changes, as in broadcast recordings. Mono then stereo reads as the stream's first channel count,
    each part's mono mix kept: two sweeps of the same level, one after the other. A rate change is an error."""
    encode(tmp_path / "mono.aac", "aac", 44_100, "adts", layout="mono")
    encode(tmp_path / "stereo.aac", "aac", 44_100, "adts")
    encode(tmp_path / "stereo48.aac", "aac", 48_000, "adts")
    (tmp_path / "both.aac").write_bytes((tmp_path / "mono.aac").read_bytes() + (tmp_path / "stereo.aac").read_bytes())
    audio = audio_io.load_audio(tmp_path / "both.aac")[0].numpy()
    with audio_io.open_audio(tmp_path / "mono.aac") as handle:
        first = handle.read(-1)[:, 0]         # the first part alone: where the second one starts
    reference = MONO_LEVEL * chirp(SAMPLE_RATE)
    start = audio_io.resampled_length(len(first), 44_100)
    middle = slice(SAMPLE_RATE // 10, len(reference) - SAMPLE_RATE // 10)
    for part in (audio[:start], audio[start:]):
        lag = best_lag(part, reference, 2 * 1024)                           # each part's priming
        aligned = part[lag: lag + len(reference)]
        assert correlation(aligned[middle], reference[middle]) > 0.98       # as in the lossy-codecs test
        assert abs(np.sqrt(np.mean(aligned[middle] ** 2) / np.mean(reference[middle] ** 2)) - 1) < 0.05
    (tmp_path / "rates.aac").write_bytes((tmp_path / "stereo.aac").read_bytes()
                                         + (tmp_path / "stereo48.aac").read_bytes())
    with pytest.raises(audio_io.AudioLoadError, match="rates.aac: the sample rate changes from 44100 to 48000 Hz"):
        audio_io.load_audio(tmp_path / "rates.aac")


@pytest.mark.parametrize("layout", ["mono", "5.1"])
def test_every_sample_format_converts_as_ffmpeg_converts(layout):
    """frame_to_float on random samples of each of FFmpeg's 12 sample formats (packed and planar) equals
    FFmpeg's own conversion to float (swresample), exactly: both scale integers by powers of 2."""
    rng = np.random.default_rng(0)
    for name in [kind + planar for kind in audio_io.SAMPLE_FORMATS for planar in ("", "p")]:
        frame = av.AudioFrame(format=name, layout=layout, samples=7)
        frame.sample_rate = 8000
        dtype = np.dtype(audio_io.SAMPLE_FORMATS[name.removesuffix("p")][0])
        channels = frame.layout.nb_channels
        if dtype.kind in "iu":
            values = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (channels, 7), dtype, endpoint=True)
        else:
            values = rng.uniform(-1, 1, (channels, 7)).astype(dtype)
        planes = list(values) if frame.format.is_planar else [values.T.reshape(-1)]
        for plane, part in zip(frame.planes, planes):
            plane.update(part.tobytes().ljust(plane.buffer_size, b"\0"))
        expected = av.AudioResampler(format="flt", layout=layout, rate=8000).resample(frame)[0]
        expected = np.frombuffer(expected.planes[0], np.float32, 7 * channels).reshape(7, channels)
        np.testing.assert_array_equal(audio_io.frame_to_float(frame), expected, err_msg=name)


def test_what_is_not_audio_fails_in_one_line_and_quietly(tmp_path, capfd):
    """Text or an image with an audio name, or a truncated .m4a: AudioLoadError naming the file, nothing else on
    stderr (libsndfile, given a non-MP3 named .mp3, would let mpg123 print its complaints)."""
    (tmp_path / "notes.m4a").write_text("not audio\n" * 50)
    (tmp_path / "cover.mp3").write_bytes(png_bytes())
    (tmp_path / "cover").write_bytes(png_bytes())
    (tmp_path / "text.mp3").write_text("hello\n" * 200)
    encode(tmp_path / "whole.m4a", "aac", 44_100)                                   # FFmpeg writes moov last
    encode(tmp_path / "whole_faststart.m4a", "aac", 44_100, options={"movflags": "+faststart"})
    for name in ("whole.m4a", "whole_faststart.m4a"):
        cut = (tmp_path / name).read_bytes()
        (tmp_path / name.replace("whole", "cut")).write_bytes(cut[: len(cut) // 2])
    expected = {"notes.m4a": "unreadable or not audio (FFmpeg: ", "text.mp3": "unreadable or not audio (FFmpeg: ",
                "cover.mp3": "not audio (FFmpeg finds video but no audio", "cover": "not audio (FFmpeg finds video",
                "cut.m4a": "unreadable or not audio (FFmpeg: ", "cut_faststart.m4a": "corrupt after 0."}
    for name, reason in expected.items():
        with pytest.raises(audio_io.AudioLoadError) as error:
            audio_io.load_audio(tmp_path / name)
        assert str(error.value).startswith(f"{tmp_path / name}: {reason}") and "\n" not in str(error.value)
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------------------ preparing

def test_prepare_data_reads_a_folder_of_real_encodings(tmp_path, capfd):
    """The real path: every encoding above is prepared (.opus read by its content, not refused by its name; AAC in a
    file named .mp3 or with no extension found by its content), stored exactly as load_audio decodes it; each file
    that is not audio is skipped with one warning line (a named pipe without being opened), and nothing else
    is printed."""
    audio_dir = tmp_path / "music"
    audio_dir.mkdir()
    for name, (encoder, container, rate, _, _) in LOSSY.items():
        # raw AAC's header length is FFmpeg's guess from the bit rate: whether it agrees with the decoded
        # length on whole frames is luck, so that file is left out
        if name != "adts_aac.mp3":
            encode(audio_dir / name, encoder, rate, container)
    encode(audio_dir / "really_m4a.mp3", "aac", 44_100, "mp4")                 # a renamed purchase
    (audio_dir / "cover.mp3").write_bytes(png_bytes())
    (audio_dir / "cover.jpg").write_bytes(png_bytes())
    (audio_dir / "notes.m4a").write_text("not audio\n" * 50)
    os.mkfifo(audio_dir / "pipe.wav")                               # opening it to read its content would block
    skipped = {"cover.mp3": "not audio (FFmpeg finds video", "cover.jpg": "not an audio file (extension '.jpg')",
               "notes.m4a": "unreadable or not audio", "pipe.wav": "empty file (0 bytes)"}

    cache = tmp_path / "cache"
    manifest = prepare_data.prepare(audio_dir, cache, encodec_weights="random", device="cpu", min_seconds=1.0,
                                    workers=2, progress=False, cache_dtype="float32", verbose=True)
    good = {path.name for path in audio_dir.iterdir()} - set(skipped)
    assert {track["source"] for track in manifest["tracks"]} == good
    for track in manifest["tracks"]:
        decoded = audio_io.load_audio(audio_dir / track["source"])[0].numpy()
        # SECONDS is exactly 120 frames; the codecs' end padding (< 1 frame) and the containers' estimates
        # (WebM's over-promises by 192 samples at 24 kHz) stay inside the 121st, so decoded and header
        # lengths give the same whole frames
        assert track["frames"] == len(decoded) // HOP_LENGTH == SECONDS * SAMPLE_RATE // HOP_LENGTH
        stored = np.load(data.track_paths(cache, track["id"])[1])
        np.testing.assert_array_equal(stored, decoded[: track["frames"] * HOP_LENGTH])
    reasons = {entry["source"]: entry["reason"] for entry in read_skipped(cache)}
    assert set(reasons) == set(skipped)
    for name, reason in skipped.items():
        assert reasons[name].startswith(reason), reasons[name]
    lines = capfd.readouterr().err.splitlines()
    summary = [line for line in lines if line.startswith("skipped ")]
    assert len(summary) == 1 and summary[0].startswith(f"skipped {len(skipped)} of {len(good) + len(skipped)} files: ")
    assert sorted(set(lines) - set(summary)) == sorted(f"warning: {audio_dir / name}: {reasons[name]}"
                                                       for name in skipped)
