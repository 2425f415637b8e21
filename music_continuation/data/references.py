"""Decoded references: every segment of the cache decoded once by the frozen decoder, memory-mapped.

With `--target_audio codec` a window's input and target are scored against what the frozen decoder makes of
their true latents. Windows lie on a grid (ContinuationDataset: starts 0, S, 2S, ... with stride S =
segment_frames T by default), so segment [kT, (k+1)T) is window k's input and window k-1's target: decoding
each segment once, before the first epoch, replaces the two decoder forwards every step made.

    CACHE/references/T<T>-S<S>/set.json      identity (codec fingerprint, T, S, cache dtype), per track the
                                             latents it was decoded from (frames, bytes, CRC-32) and its
                                             segment count, and whether the set is complete
    CACHE/references/T<T>-S<S>/<id>.npy      float32 [segments, T * 320]: segment j is the decoder's audio of
                                             frames [starts[j], starts[j] + T) of the track (segment_starts)

A segment is decoded alone, as the trainer decodes a window, in float32 without autocast and without
gradients, from the cache's latents (no normalisation round trip). Only segments some window uses are stored
(a track's tail shorter than a segment, and tracks shorter than one window, are not).

Building (build_references) is collective: every rank of a job calls it. Rank 0 checks the set: a set made for
another codec, segment length, stride or cache dtype is deleted and rebuilt ("stale"), tracks whose latents
changed or that are missing are (re)decoded ("partial"), each with one line saying so; the ranks then decode
the missing tracks round-robin, each track written atomically (a hidden temporary renamed into place), so an
interrupted build resumes where it stopped, and rank 0 marks the set complete. Only a complete set that
matches the cache is ever opened (open_references); anything else is never used. Rank 0 holds a lock
(ROOT/.T<T>-S<S>.lock, POSIX) for the whole build, so two runs sharing a folder build it once: the second waits,
then finds it complete.

Where (references_root): `--references_dir DIR` if given; else CACHE/references when the set is already there
or the cache is writable; else, for a read-only cache (a shared dataset), a per-user folder named after the
cache and keyed by its identity (its tracks and their latents' CRC-32) and the codec fingerprint, said in one
line:

    ~/.cache/music_continuation/references/<cache name>-<identity>-<codec>/T<T>-S<S>/   (integrity.user_cache_dir)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from music_continuation.codec import HOP_LENGTH, LATENT_DIM, SAMPLE_RATE
from music_continuation.data.cache import CACHE_DTYPES, MAX_OPEN_TRACKS, CacheError, cache_dtype, track_paths
from music_continuation.data.integrity import user_cache_dir
from music_continuation.utils import TEMPORARY_NAME, atomic_path, write_json

REFERENCES_DIR = "references"
SET_NAME = "set.json"
SET_FORMAT = 1
DECODE_BATCH = 16            # segments decoded per decoder call while building
BYTES_PER_SAMPLE = 4         # float32


def set_dir(cache_dir, segment_frames: int, stride_frames: int, root=None) -> Path:
    """The folder of one set: ROOT/T<T>-S<S>, ROOT = `root` or CACHE/references."""
    root = Path(cache_dir) / REFERENCES_DIR if root is None else Path(root)
    return root / f"T{int(segment_frames)}-S{int(stride_frames)}"


def cache_identity(manifest: dict, cache_dir) -> str:
    """What the decoded references of a cache depend on, as a short hash: its tracks (id, frames, the latents'
    CRC-32) and its array types. The same dataset at another path (another mount) has the same identity."""
    tracks = sorted((t["id"], t["frames"], ((t.get("files") or {}).get("latents") or {}).get("crc32"))
                    for t in manifest["tracks"])
    return hashlib.sha1(json.dumps([cache_dtype(manifest, cache_dir), tracks]).encode()).hexdigest()[:12]


def user_root(cache_dir, manifest: dict, fingerprint: str) -> Path:
    """The per-user folder of this cache's references (for a cache that cannot be written)."""
    name = f"{Path(cache_dir).resolve().name}-{cache_identity(manifest, cache_dir)}-{fingerprint}"
    return user_cache_dir() / REFERENCES_DIR / name


def references_root(cache_dir, manifest: dict, fingerprint: str, segment_frames: int, stride_frames: int,
                    references_dir=None) -> Path:
    """Where a set is built: `references_dir` if given, else CACHE/references if the set is complete there or the
    cache can be written, else the per-user folder (user_root), said in one line."""
    if references_dir is not None:
        return Path(references_dir).expanduser().resolve()
    in_cache = Path(cache_dir) / REFERENCES_DIR
    if (in_cache.exists() and not in_cache.is_dir()) or _writable(in_cache if in_cache.exists() else Path(cache_dir)) \
            or open_references(cache_dir, manifest, fingerprint, segment_frames, stride_frames, in_cache) is not None:
        return in_cache             # (something in the way of the folder is the cache's fault: said when writing)
    root = user_root(cache_dir, manifest, fingerprint)
    if _rank_and_world()[0] == 0:
        _say(f"{cache_dir} cannot be written; the decoded references go to {root} "
             f"(--references_dir puts them elsewhere)")
    return root


def find_references(cache_dir, manifest: dict, fingerprint: str, segment_frames: int,
                    stride_frames: int | None = None, references_dir=None) -> "ReferenceSet | None":
    """The complete set of this cache, codec, T and S in `references_dir` if given, else in CACHE/references or
    the per-user folder, or None: what evaluation reads (it never decodes a set)."""
    roots = ([Path(references_dir)] if references_dir is not None
             else [Path(cache_dir) / REFERENCES_DIR, user_root(cache_dir, manifest, fingerprint)])
    for root in roots:
        found = open_references(cache_dir, manifest, fingerprint, segment_frames, stride_frames, root)
        if found is not None:
            return found
    return None


def _writable(folder: Path) -> bool:
    """True if files can be created in `folder` (access(2): also False on a read-only mount, even for root)."""
    return os.access(folder, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Hold ROOT/.T<T>-S<S>.lock (POSIX lockf: between hosts of a shared file system too; gone with its process)
    while one job builds the set; another job waits here, saying so once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            _say(f"another run is building {folder}; waiting for it")
            fcntl.lockf(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def segment_starts(frames: int, segment_frames: int, stride_frames: int) -> np.ndarray:
    """First frames of the segments a track of `frames` frames needs: the inputs (k * S) and targets (k * S + T)
    of its windows k * S + 2T <= frames (cache.ContinuationDataset's grid), sorted, each once. With S = T
    these are 0, T, 2T, ... (frames // T segments): every segment serves two windows."""
    span = 2 * segment_frames
    if frames < span:
        return np.zeros(0, dtype=np.int64)
    inputs = np.arange(0, frames - span + 1, stride_frames, dtype=np.int64)
    return np.union1d(inputs, inputs + segment_frames)


def identity(manifest: dict, cache_dir, fingerprint: str, segment_frames: int, stride_frames: int) -> dict:
    """What a set is valid for as a whole; a set with another identity is stale."""
    return {"format": SET_FORMAT, "codec_fingerprint": fingerprint, "segment_frames": int(segment_frames),
            "stride_frames": int(stride_frames), "cache_dtype": cache_dtype(manifest, cache_dir),
            "sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH}


def track_keys(manifest: dict, segment_frames: int, stride_frames: int) -> dict:
    """{track id: what its segments were decoded from}, for the tracks that have at least one window."""
    keys = {}
    for track in manifest["tracks"]:
        count = len(segment_starts(track["frames"], segment_frames, stride_frames))
        if count:
            record = (track.get("files") or {}).get("latents") or {}
            keys[track["id"]] = {"frames": track["frames"], "bytes": record.get("bytes"),
                                 "crc32": record.get("crc32"), "segments": count}
    return keys


def _read_set(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SET_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_set(folder: Path, content: dict) -> None:
    write_json(folder / SET_NAME, content)


def _track_file(folder: Path, track_id: str) -> Path:
    return folder / f"{track_id}.npy"


def _track_file_ok(path: Path, segments: int, segment_frames: int) -> bool:
    """The file holds float32 [segments, T * 320] (a header check: files are only ever renamed into place whole)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.dtype == np.float32 and array.shape == (segments, segment_frames * HOP_LENGTH)


# ------------------------------------------------------------------------------------------- building

def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _say(message: str) -> None:
    print(f"references: {message}", file=sys.stderr, flush=True)


def _prepare_folder(folder: Path, wanted_identity: dict, keys: dict) -> None:
    """Rank 0: delete what is stale, say what will be decoded, record the set as incomplete (unless complete)."""
    existing = _read_set(folder)
    if existing is not None and existing.get("complete") and existing.get("identity") == wanted_identity \
            and existing.get("tracks") == keys and all(
                _track_file_ok(_track_file(folder, track), key["segments"], wanted_identity["segment_frames"])
                for track, key in keys.items()):
        return
    if existing is not None and existing.get("identity") != wanted_identity:
        before = existing.get("identity") or {}
        changed = ", ".join(f"{name} {before.get(name)!r} -> {value!r}" for name, value in wanted_identity.items()
                            if before.get(name) != value)
        _say(f"{folder} is stale ({changed}); rebuilding it")
        shutil.rmtree(folder)
        existing = None
    folder.mkdir(parents=True, exist_ok=True)
    old_keys = (existing or {}).get("tracks") or {}
    for path in folder.glob("*.npy"):       # tracks gone from the cache, or whose latents changed
        track = path.name[: -len(".npy")]
        if track not in keys or old_keys.get(track) != keys[track]:
            path.unlink()
    for path in folder.glob(".*.tmp-*"):    # a killed build's temporaries; never those of a live process (a
        match = TEMPORARY_NAME.match(path.name)       # concurrent job building the same set on this host)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
    done = sum(_track_file_ok(_track_file(folder, t), k["segments"], wanted_identity["segment_frames"])
               for t, k in keys.items())
    segments = sum(key["segments"] for key in keys.values())
    cost = segments * wanted_identity["segment_frames"] * HOP_LENGTH * BYTES_PER_SAMPLE
    if existing is not None:
        _say(f"{folder} is partial ({done} of {len(keys)} tracks decoded); decoding the rest")
    else:
        _say(f"decoding {segments} segments of {len(keys)} tracks once into {folder} ({cost / 1e6:.1f} MB)")
    _write_set(folder, {"identity": wanted_identity, "tracks": keys, "complete": False})


@torch.no_grad()
def _decode_track(folder: Path, cache_dir, track: dict, dtype: str, decoder, segment_frames: int,
                  stride_frames: int, device, bar, check_stop) -> None:
    latent_path, _ = track_paths(cache_dir, track["id"])
    latents = np.load(latent_path, mmap_mode="r")
    if latents.shape != (LATENT_DIM, track["frames"]) or latents.dtype != CACHE_DTYPES[dtype][0]:
        raise CacheError(f"{latent_path}: holds {latents.dtype} {latents.shape}, the manifest says "
                         f"{CACHE_DTYPES[dtype][0]} {(LATENT_DIM, track['frames'])}; re-run prepare_data.py")
    starts = segment_starts(track["frames"], segment_frames, stride_frames)
    path = _track_file(folder, track["id"])
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                        shape=(len(starts), segment_frames * HOP_LENGTH))
        for first in range(0, len(starts), DECODE_BATCH):
            check_stop()
            chunk = starts[first: first + DECODE_BATCH]
            windows = np.stack([latents[:, s: s + segment_frames] for s in chunk])
            audio = decoder(torch.from_numpy(windows).to(device=device, dtype=torch.float32))
            out[first: first + len(chunk)] = audio[:, 0].float().cpu().numpy()
            bar.update(len(chunk))
        out.flush()
        del out


def build_references(cache_dir, manifest: dict, decoder, fingerprint: str, segment_frames: int,
                     stride_frames: int | None = None, device="cpu", progress: bool | None = None,
                     check_stop=lambda: None, references_dir=None) -> "ReferenceSet":
    """Make (or resume, or check) the set for this cache, codec, T and S, and open it; in references_root's
    folder. Collective: every rank of an initialised process group calls it (three barriers, the same on every
    rank); without one, one process does all. `check_stop` is called between decoder calls (the trainer's: raise
    once SIGINT/SIGTERM arrived). Raises CacheError (one line) if the set cannot be written."""
    stride_frames = int(segment_frames if stride_frames is None else stride_frames)
    rank, world = _rank_and_world()
    root = references_root(cache_dir, manifest, fingerprint, segment_frames, stride_frames, references_dir)
    folder = set_dir(cache_dir, segment_frames, stride_frames, root)
    try:
        with _build_lock(folder) if rank == 0 else contextlib.nullcontext():
            _build(folder, cache_dir, manifest, decoder, fingerprint, segment_frames, stride_frames, device, progress,
                   check_stop)
    except OSError as error:
        raise CacheError(f"cannot write the decoded references in {folder}: {error.strerror or error}") from None
    opened = open_references(cache_dir, manifest, fingerprint, segment_frames, stride_frames, root)
    if opened is None:
        raise CacheError(f"{folder}: the decoded references are not complete after building them")
    return opened


def _build(folder: Path, cache_dir, manifest: dict, decoder, fingerprint: str, segment_frames: int,
           stride_frames: int, device, progress, check_stop) -> None:
    """build_references' collective work in `folder` (rank 0 holds the build lock)."""
    wanted = identity(manifest, cache_dir, fingerprint, segment_frames, stride_frames)
    keys = track_keys(manifest, segment_frames, stride_frames)
    rank, world = _rank_and_world()
    if rank == 0:
        _prepare_folder(folder, wanted, keys)
    _barrier()
    recorded = _read_set(folder)
    if not (recorded or {}).get("complete"):
        dtype = wanted["cache_dtype"]
        tracks = {track["id"]: track for track in manifest["tracks"]}
        todo = [t for t in sorted(keys) if not _track_file_ok(_track_file(folder, t), keys[t]["segments"],
                                                              segment_frames)]
        mine = todo[rank::world]
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=sum(keys[t]["segments"] for t in mine), desc=f"decoding references (rank {rank})",
                   unit="segment", file=sys.stderr, disable=rank != 0 or not show, leave=False)
        for track in mine:
            _decode_track(folder, cache_dir, tracks[track], dtype, decoder, segment_frames, stride_frames,
                          device, bar, check_stop)
        bar.close()
        _barrier()
        if rank == 0:
            missing = [t for t in keys if not _track_file_ok(_track_file(folder, t), keys[t]["segments"],
                                                             segment_frames)]
            if missing:
                raise CacheError(f"{folder}: {len(missing)} track(s) were not decoded (e.g. {missing[0]})")
            _write_set(folder, {"identity": wanted, "tracks": keys, "complete": True})
            _say(f"{folder} complete")
        _barrier()


def open_references(cache_dir, manifest: dict, fingerprint: str, segment_frames: int,
                    stride_frames: int | None = None, root=None) -> "ReferenceSet | None":
    """The complete set that matches this cache, codec, T and S in ROOT (default CACHE/references), or None (never
    a stale or partial one)."""
    stride_frames = int(segment_frames if stride_frames is None else stride_frames)
    folder = set_dir(cache_dir, segment_frames, stride_frames, root)
    recorded = _read_set(folder)
    keys = track_keys(manifest, segment_frames, stride_frames)
    if not recorded or not recorded.get("complete") or recorded.get("tracks") != keys or \
            recorded.get("identity") != identity(manifest, cache_dir, fingerprint, segment_frames, stride_frames):
        return None
    return ReferenceSet(folder, segment_frames, stride_frames, keys)


# -------------------------------------------------------------------------------------------- reading

class ReferenceSet:
    """Reads decoded segments by (track id, first frame), memory-mapped per track, opened lazily in each
    process (nothing open is pickled, so it travels to DataLoader workers with its dataset)."""

    def __init__(self, folder: Path, segment_frames: int, stride_frames: int, keys: dict):
        self.folder, self.segment_frames, self.stride_frames = Path(folder), segment_frames, stride_frames
        self.keys = keys
        self._maps: OrderedDict = OrderedDict()
        self._owner_pid = os.getpid()

    def segment(self, track_id: str, start: int) -> np.ndarray:
        """float32 [T * 320]: the decoded segment of frames [start, start + T) of the track (a memory-map view)."""
        if self._owner_pid != os.getpid():
            self._maps, self._owner_pid = OrderedDict(), os.getpid()
        opened = self._maps.get(track_id)
        if opened is not None:
            self._maps.move_to_end(track_id)
        else:
            key = self.keys.get(track_id)
            if key is None:
                raise CacheError(f"{self.folder}: no decoded references for track {track_id}")
            path = _track_file(self.folder, track_id)
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise CacheError(f"{path}: cannot open the decoded references ({error})") from None
            if array.shape != (key["segments"], self.segment_frames * HOP_LENGTH) or array.dtype != np.float32:
                raise CacheError(f"{path}: holds {array.dtype} {array.shape}, the set says float32 "
                                 f"{(key['segments'], self.segment_frames * HOP_LENGTH)}")
            starts = segment_starts(key["frames"], self.segment_frames, self.stride_frames)
            opened = self._maps[track_id] = (array, starts)
            if len(self._maps) > MAX_OPEN_TRACKS:      # each map holds a file descriptor, as the dataset's do
                self._maps.popitem(last=False)
        array, starts = opened
        index = int(np.searchsorted(starts, start))
        if index >= len(starts) or starts[index] != start:
            raise IndexError(f"track {track_id}: no decoded segment starts at frame {start}")
        return array[index]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state
