"""Reading, resampling and encoding one track, block by block (BLOCK_FRAMES), into its files in the cache: the
24 kHz audio, the latents [LATENT_DIM, F] and their moments. Memory stays at a few blocks whatever the track's
length, and what decodes is stored (a header's length is only an estimate)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from music_continuation.codec import ENCODER_CONTEXT_FRAMES, FRAME_RATE, HOP_LENGTH, LATENT_DIM, encode
from music_continuation.data.audio_io import AudioLoadError, iter_mono_blocks, open_audio, resampled_length
from music_continuation.data.cache import CACHE_DTYPES, TRACKS_DIR, audio_to_int16, track_paths, track_stats_path
from music_continuation.data.integrity import file_record
from music_continuation.data.scan import (
    SKIP_NOT_FINITE,
    _check_header_length,
    _check_length,
    _check_source,
    _unusable,
    source_stamp,
    track_id_for,
)
from music_continuation.data.stats import Moments
from music_continuation.data.writes import (
    GrowingNpy,
    _npy_header,
    _npy_temporary,
    _pwrite_all,
    _scratch_file,
    save_npy_atomic,
    writing,
)
from music_continuation.utils import one_line, warn

# Latent frames encoded per encoder call (15 s; the audio is read and resampled in blocks of the same length).
# The encoder's activations take ~16 MB per second of audio (measured: 60 s -> +1 GB), so 15 s keeps a
# worker near +0.27 GB over the codec's ~0.6 GB process; codec.encode runs one call (< its 60 s chunk) as a
# single pass, so a track of at most BLOCK_FRAMES is encoded exactly as before, whole.
BLOCK_FRAMES = 1125
FLOAT16_MAX = float(np.finfo(np.float16).max)     # 65504: larger latents cannot be stored compact


def _track_files(out_dir: Path, track_id: str) -> dict[str, Path]:
    """{kind: path} of a track's files: its latents, audio and moments."""
    latents, audio = track_paths(out_dir, track_id)
    return {"latents": latents, "audio": audio, "stats": track_stats_path(out_dir, track_id)}


def _encode_track(codec, path: Path, source: str, out_dir: Path, device: torch.device, min_seconds: float,
                  dtype: str) -> dict:
    """Read, encode and store one track (runs in a worker thread); AudioLoadError if the file is unusable,
    CacheWriteError if the cache cannot be written.

    The file streams through in blocks (iter_mono_blocks -> _encode_blocks): the audio straight into its .npy
    temporary, the latents, frame by frame, into a nameless scratch file (both lengths are known only when the
    file has decoded to its end), which is then written out as the [LATENT_DIM, F] .npy temporary. Memory stays
    at a few blocks whatever the track's length.
    """
    _check_source(path)
    track_id = track_id_for(source)
    stamp = source_stamp(path)         # before reading: a file changed meanwhile is re-encoded next run
    paths = _track_files(out_dir, track_id)
    with open_audio(path) as handle:
        _check_header_length(handle, min_seconds, path)
        with _npy_temporary(paths["audio"]) as audio_file, \
                _scratch_file(out_dir / TRACKS_DIR, paths["latents"]) as scratch:
            moments, frames = _encode_to(codec, handle, path, paths, audio_file, scratch, device, min_seconds, dtype)
    save_npy_atomic(paths["stats"], moments.as_array())
    return {"id": track_id, "source": source, "duration": frames / FRAME_RATE, "frames": frames,
            "split": None, **stamp, "files": {kind: file_record(file) for kind, file in paths.items()}}


def _encode_to(codec, handle, path: Path, paths: dict, audio_file: int, scratch: int, device: torch.device,
               min_seconds: float, dtype: str) -> tuple[Moments, int]:
    """Stream the open file into the audio temporary and, through the scratch file, the latents temporary;
    (the latents' moments, frames)."""
    latent_dtype, audio_dtype = CACHE_DTYPES[dtype]
    audio = GrowingNpy(audio_file, audio_dtype, (), paths["audio"])
    latents = GrowingNpy(scratch, latent_dtype, (LATENT_DIM,), paths["latents"])
    moments = _encode_blocks(codec, _source_blocks(handle, path), audio, latents, device, path, min_seconds)
    audio.finish(latents.rows * HOP_LENGTH)          # whole frames: drops the last partial frame
    with _npy_temporary(paths["latents"]) as latent_file:
        _write_transposed(latents, latent_file, paths["latents"])
    _check_promised_length(handle, latents.rows, path)
    return moments, latents.rows


def _source_blocks(handle, path: Path):
    """iter_mono_blocks of the source; an OSError while reading it (a failing disk) is the file's AudioLoadError,
    never mistaken for a write error of the cache."""
    try:
        yield from iter_mono_blocks(handle, BLOCK_FRAMES / FRAME_RATE)
    except OSError as error:
        raise AudioLoadError(f"{path}: cannot read it ({error.strerror or one_line(error)})") from None


def _encode_blocks(codec, blocks, audio_out: GrowingNpy, latents_out: GrowingNpy, device: torch.device, path: Path,
                   min_seconds: float) -> Moments:
    """Append the 24 kHz blocks to audio_out and their latents [F, LATENT_DIM] to latents_out; return the
    latents' moments. AudioLoadError if less than min_seconds (in whole latent frames) decodes.

    The decoded length is the truth: the header's is an estimate. Frames are encoded BLOCK_FRAMES at a time as
    soon as they have decoded, the remainder once the file has ended; each call also gets the
    ENCODER_CONTEXT_FRAMES of audio before its block (their latents dropped), so only about two blocks of audio are
    held at once, and the calls are exactly those of a file whose length was known in advance.
    """
    pending, pending_start = np.zeros(0, np.float32), 0     # 24 kHz audio from sample pending_start on
    decoded, moments = 0, Moments()
    for block in itertools.chain(blocks, [None]):
        ended = block is None
        if not ended:
            audio_out.append(audio_to_int16(block) if audio_out.dtype == np.int16 else block)
            pending = np.concatenate([pending, block])
            decoded += len(block)
        frames = decoded // HOP_LENGTH
        if ended:
            _check_length(decoded, min_seconds, path)
        while frames - latents_out.rows >= (1 if ended else BLOCK_FRAMES):
            first = latents_out.rows
            stop = min(frames, first + BLOCK_FRAMES)
            left = max(0, first - ENCODER_CONTEXT_FRAMES)
            segment = torch.from_numpy(pending[left * HOP_LENGTH - pending_start: stop * HOP_LENGTH - pending_start])
            latents = encode(codec, segment.to(device).view(1, 1, -1))[0, :, first - left:].float().cpu().numpy()
            _check_latents(latents, latents_out.dtype, path)
            moments.add_frames(latents)
            latents_out.append(latents.T)              # frame by frame; rounded to the cache's type here
            drop = max(0, (stop - ENCODER_CONTEXT_FRAMES) * HOP_LENGTH - pending_start)
            pending, pending_start = pending[drop:], pending_start + drop
    return moments


def _check_promised_length(handle, frames: int, path: Path) -> None:
    """Warn when the header promised at least a block (15 s) more than decoded: probably a truncated file (what
    decoded is stored). Less is ordinary: a compressed file's header length is an estimate."""
    if handle.frames > 0:
        promised = resampled_length(handle.frames, handle.samplerate) // HOP_LENGTH
        if promised - frames >= BLOCK_FRAMES:
            warn(f"{path}: {frames / FRAME_RATE:.2f} s of audio decoded, its header promises "
                  f"{promised / FRAME_RATE:.2f} s (truncated?); stored what decoded")


def _check_latents(latents: np.ndarray, stored_dtype: np.dtype, path: Path) -> None:
    """AudioLoadError if the latents are not finite, or too large for float16 in a compact cache."""
    if not np.isfinite(latents).all():
        raise _unusable(SKIP_NOT_FINITE,
                        f"{path}: the encoder's latents are not finite (are the samples far outside +-1?)")
    peak = float(np.abs(latents).max(initial=0.0))
    if stored_dtype == np.float16 and peak > FLOAT16_MAX:
        raise _unusable(SKIP_NOT_FINITE, f"{path}: latents reach {peak:.3g}, beyond float16's {FLOAT16_MAX:g}; "
                             f"prepare with --cache_dtype float32")


def _write_transposed(frames_major: GrowingNpy, descriptor: int, name: Path) -> None:
    """Write the rows [F, LATENT_DIM] of `frames_major` as the .npy latents [LATENT_DIM, F] into `descriptor`,
    BLOCK_FRAMES frames at a time (each into LATENT_DIM rows of the file), so only one block is in memory."""
    frames, dtype = frames_major.rows, frames_major.dtype
    header = _npy_header(dtype, (LATENT_DIM, frames))
    with writing(name):
        _pwrite_all(descriptor, header, 0)
        for start in range(0, frames, BLOCK_FRAMES):
            block = frames_major.read(start, min(BLOCK_FRAMES, frames - start)).T
            for channel, row in enumerate(np.ascontiguousarray(block)):
                _pwrite_all(descriptor, row, len(header) + (channel * frames + start) * dtype.itemsize)
