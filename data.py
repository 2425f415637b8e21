"""Reading audio and the prepared latent cache: audio loading, latent normalisation, the continuation dataset.

The cache (written by prepare_data.py) is a folder:

    CACHE/manifest.json                 codec fingerprint, statistics, tracks, split, skipped files
    CACHE/tracks/<id>.latents.npy       float32 [LATENT_DIM, F]   continuous EnCodec latents of one track
    CACHE/tracks/<id>.audio.npy         float32 [F * HOP_LENGTH]  the matching 24 kHz mono audio

Training opens the .npy files memory-mapped, one track at a time, so a corpus far larger than RAM works
and nothing holds the whole corpus in any process.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional
from torch import nn

from codec import FRAME_RATE, HOP_LENGTH, LATENT_DIM, SAMPLE_RATE
from utils import one_line

MANIFEST_NAME = "manifest.json"
TRACKS_DIR = "tracks"
CACHE_FORMAT_VERSION = 1
SPLITS = ("train", "val")
MAX_OPEN_TRACKS = 64      # memory maps kept open per process; each one holds a file descriptor


class AudioLoadError(ValueError):
    """An audio file cannot be used; the message is one line: 'PATH: reason'."""


class CacheError(ValueError):
    """The prepared cache is missing, incomplete or inconsistent; the message names the file."""


# ----------------------------------------------------------------------------------------------- audio

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
    if not np.isfinite(samples).all():
        raise AudioLoadError(f"{path}: corrupt (contains NaN or infinite samples)")
    mono = torch.from_numpy(samples.mean(axis=1, dtype=np.float32)).unsqueeze(0)   # [1, N]
    if rate != SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, int(rate), SAMPLE_RATE)
    return mono.contiguous()


# ----------------------------------------------------------------------------------------- normaliser

class LatentNormalizer(nn.Module):
    """Per-channel standardisation of latents [B, 128, T]: z = (x - mean) / std, x = z * std + mean."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(1, -1, 1)
        std = torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(1, -1, 1)
        if mean.shape[1] != LATENT_DIM or std.shape[1] != LATENT_DIM:
            raise ValueError(f"latent statistics must have {LATENT_DIM} channels, got {mean.shape[1]} and {std.shape[1]}")
        if not bool((std > 0).all()):
            raise ValueError("latent std must be positive in every channel")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.mean) / self.std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.std + self.mean


# ------------------------------------------------------------------------------------------- manifest

def manifest_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def track_paths(cache_dir: str | os.PathLike, track_id: str) -> tuple[Path, Path]:
    """(latents .npy, audio .npy) of one track in the cache."""
    folder = Path(cache_dir) / TRACKS_DIR
    return folder / f"{track_id}.latents.npy", folder / f"{track_id}.audio.npy"


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The cache's manifest; raises CacheError('CACHE/manifest.json: ...') if it is missing or unreadable."""
    path = manifest_path(cache_dir)
    if not path.is_file():
        raise CacheError(f"{path}: no such file; make the cache with "
                         f"`python prepare_data.py --audio_dir DIR --out_dir {cache_dir}` (or --demo)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{path}: not a readable JSON manifest ({error})") from None
    required = ("codec_fingerprint", "encodec_weights", "sample_rate", "hop_length", "latent_dim", "tracks")
    missing = [key for key in required if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise CacheError(f"{path}: not a cache manifest (missing {', '.join(missing)})")
    if (manifest["sample_rate"], manifest["hop_length"], manifest["latent_dim"]) != (SAMPLE_RATE, HOP_LENGTH, LATENT_DIM):
        raise CacheError(f"{path}: made for sample rate {manifest['sample_rate']}, hop {manifest['hop_length']}, "
                         f"latent dim {manifest['latent_dim']}; this code uses {SAMPLE_RATE}, {HOP_LENGTH}, {LATENT_DIM}")
    return manifest


def require_complete(manifest: dict, cache_dir: str | os.PathLike) -> None:
    """A cache whose preparation was interrupted has no split or statistics yet: refuse it with the fix."""
    if not manifest.get("complete") or manifest.get("latent_mean") is None:
        raise CacheError(f"{manifest_path(cache_dir)}: preparation did not finish; re-run prepare_data.py "
                         f"with the same --audio_dir and --out_dir to resume it")


# -------------------------------------------------------------------------------------------- dataset

class ContinuationDataset(torch.utils.data.Dataset):
    """Pairs (input window, the window that follows it) of normalised latents and the matching audio.

    Window k starts at frame s of one track and gives
        input  = frames [s, s + T)        audio samples [s * 320, (s + T) * 320)
        target = frames [s + T, s + 2T)   (with unity_test, target = input)
    Starts are s = 0, stride, 2 * stride, ... while s + 2T <= F, so a window never crosses a track
    boundary, and unity mode uses exactly the same windows as the real task.
    The .npy files are memory-mapped on first use in each process (DataLoader worker); no open
    file or memory map is pickled, so the dataset works with worker processes and DistributedSampler.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str, segment_frames: int,
                 unity_test: bool = False, stride_frames: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if int(segment_frames) < 1:
            raise ValueError(f"segment_frames must be at least 1, got {segment_frames}")
        stride_frames = int(segment_frames) if stride_frames is None else int(stride_frames)
        if stride_frames < 1:
            raise ValueError(f"stride_frames must be at least 1, got {stride_frames}")
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        require_complete(self.manifest, cache_dir)
        self.split = split
        self.segment_frames = int(segment_frames)
        self.stride_frames = stride_frames
        self.unity_test = bool(unity_test)
        self.codec_fingerprint = self.manifest["codec_fingerprint"]
        self.encodec_weights = self.manifest["encodec_weights"]
        self.latent_mean = torch.tensor(self.manifest["latent_mean"], dtype=torch.float32)
        self.latent_std = torch.tensor(self.manifest["latent_std"], dtype=torch.float32)
        # Own copies, never numpy views of the tensors above: pickling the dataset for DataLoader workers
        # inside a spawned rank moves the tensors to shared memory and a view would then read freed memory.
        self._mean = np.array(self.manifest["latent_mean"], dtype=np.float32).reshape(-1, 1)
        self._std = np.array(self.manifest["latent_std"], dtype=np.float32).reshape(-1, 1)

        self.tracks = [track for track in self.manifest["tracks"] if track["split"] == split]
        span = 2 * self.segment_frames
        frames = np.array([track["frames"] for track in self.tracks], dtype=np.int64)
        windows_per_track = np.where(frames >= span, (frames - span) // stride_frames + 1, 0)
        # window k belongs to the track t with first_window[t] <= k < first_window[t + 1]
        self._first_window = np.concatenate([[0], np.cumsum(windows_per_track)])
        if self._first_window[-1] == 0:
            longest = int(frames.max()) if len(frames) else 0
            raise ValueError(
                f"{self.cache_dir}: the {split!r} split ({len(self.tracks)} tracks, longest {longest} frames = "
                f"{longest / FRAME_RATE:.2f} s) has no window of 2 x {self.segment_frames} frames "
                f"({span / FRAME_RATE:.2f} s); use a smaller segment or longer tracks")
        self._open_tracks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._owner_pid = os.getpid()

    def __len__(self) -> int:
        return int(self._first_window[-1])

    def window_location(self, index: int) -> tuple[str, int]:
        """(track id, first input frame) of window `index`."""
        track_index, start = self._locate(index)
        return self.tracks[track_index]["id"], start

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        track_index = int(np.searchsorted(self._first_window, index, side="right") - 1)
        start = int(index - self._first_window[track_index]) * self.stride_frames
        return track_index, start

    def _track_arrays(self, track_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps (latents [128, F], audio [F*320]) of a track, opened lazily, at most MAX_OPEN_TRACKS kept."""
        if self._owner_pid != os.getpid():     # a forked worker must not share the parent's maps
            self._open_tracks = OrderedDict()
            self._owner_pid = os.getpid()
        arrays = self._open_tracks.get(track_index)
        if arrays is not None:
            self._open_tracks.move_to_end(track_index)
            return arrays
        track = self.tracks[track_index]
        latent_path, audio_path = track_paths(self.cache_dir, track["id"])
        frames = track["frames"]
        arrays = (_open_npy(latent_path, (LATENT_DIM, frames)), _open_npy(audio_path, (frames * HOP_LENGTH,)))
        self._open_tracks[track_index] = arrays
        if len(self._open_tracks) > MAX_OPEN_TRACKS:
            self._open_tracks.popitem(last=False)
        return arrays

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        track_index, start = self._locate(index)
        latents, audio = self._track_arrays(track_index)
        length = self.segment_frames
        target_start = start if self.unity_test else start + length
        input_latent = self._normalized(latents[:, start: start + length])
        input_audio = _audio_window(audio, start, length)
        if self.unity_test:
            target_latent, target_audio = input_latent.clone(), input_audio.clone()
        else:
            target_latent = self._normalized(latents[:, target_start: target_start + length])
            target_audio = _audio_window(audio, target_start, length)
        return {"input_latent": input_latent, "target_latent": target_latent,
                "input_audio": input_audio, "target_audio": target_audio}

    def _normalized(self, latents: np.ndarray) -> torch.Tensor:
        # the subtraction reads the memory-mapped slice into a fresh writable array
        return torch.from_numpy(((latents - self._mean) / self._std).astype(np.float32, copy=False))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open_tracks"] = OrderedDict()    # memory maps (and their descriptors) never cross processes
        return state


def _audio_window(audio: np.ndarray, start_frame: int, frames: int) -> torch.Tensor:
    chunk = np.array(audio[start_frame * HOP_LENGTH: (start_frame + frames) * HOP_LENGTH], dtype=np.float32)
    return torch.from_numpy(chunk).unsqueeze(0)


def _open_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise CacheError(f"{path}: cannot open the cached array ({error}); re-run prepare_data.py") from None
    if array.shape != shape or array.dtype != np.float32:
        raise CacheError(f"{path}: holds {array.dtype} {array.shape}, the manifest says float32 {shape}; "
                         f"re-run prepare_data.py")
    return array
