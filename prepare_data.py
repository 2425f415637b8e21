"""Turn a folder of audio into a cache of EnCodec latents that training opens memory-mapped.

    python prepare_data.py --audio_dir DIR --out_dir CACHE [--encodec_weights pretrained] \
        [--val_fraction 0.1] [--seed 0] [--min_seconds 4] [--device cuda]
    python prepare_data.py --demo [--out_dir data_cache/demo]      # the built-in synthetic corpus

Each track is read (any rate / channel count), mixed to mono, resampled to 24 kHz, trimmed to whole
latent frames and encoded whole (codec.encode works in bounded-memory chunks). Latents and audio go to
CACHE/tracks/<id>.{latents,audio}.npy and the manifest is rewritten atomically after every track, so an
interrupted run loses at most the track in progress and a re-run resumes (finished tracks are
recognised by source path, size and modification time) and picks up new files. Once every file is
done the tracks are split into train/val by track, and per-channel latent statistics are computed over
the training split.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec import (FRAME_RATE, HOP_LENGTH, LATENT_DIM, SAMPLE_RATE, WEIGHT_CHOICES_HELP, CodecLoadError,
                   check_fingerprint, codec_fingerprint, encode, load_codec)
from data import (CACHE_FORMAT_VERSION, TRACKS_DIR, AudioLoadError, CacheError, load_audio, manifest_path,
                  read_manifest, track_paths)
from utils import atomic_path

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64", ".caf")
DEFAULT_MIN_SECONDS = 4.0    # one training example at the default segment: 2 x 150 frames = 2 x 2 s
DEFAULT_VAL_FRACTION = 0.1
STD_FLOOR = 1e-5             # latent std is clamped to this so normalising never divides by ~0
DEMO_CACHE_DIR = Path(__file__).resolve().parent / "data_cache" / "demo"
DEMO_SOURCE_DIR_NAME = "audio"


class NoUsableAudioError(ValueError):
    """The audio folder has nothing that can be used (message names the folder)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------- file scan

def find_files(audio_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Every non-hidden file under audio_dir (sorted), minus anything inside `exclude` (the cache itself)."""
    files = []
    for root, dirs, names in os.walk(audio_dir, followlinks=True):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (root_path / d).resolve() != exclude))
        files.extend(root_path / name for name in sorted(names) if not name.startswith("."))
    return files


def track_id_for(relative_source: str) -> str:
    """A stable id from the path relative to the audio folder: the same file always gets the same id."""
    return hashlib.sha1(relative_source.encode()).hexdigest()[:16]


def source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


# ---------------------------------------------------------------------------------------- atomic I/O

def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp_path:
        np.save(tmp_path, np.ascontiguousarray(array, dtype=np.float32))


def write_manifest_atomic(cache_dir: Path, manifest: dict) -> None:
    with atomic_path(manifest_path(cache_dir)) as tmp_path:
        tmp_path.write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------------- split & stats

def split_tracks(track_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign whole tracks to 'train' or 'val', reproducibly from the seed.

    Each track gets a key u = hash(seed, id); the n_val tracks with the smallest keys are validation,
    n_val = round(val_fraction * n) clamped to [1, n - 1] when val_fraction > 0 and n >= 2 (else 0).
    The choice depends only on the ids, not on the order files were found, and adding files to the
    folder moves few existing tracks between the splits.
    """
    count = len(track_ids)
    num_val = 0
    if val_fraction > 0 and count >= 2:
        num_val = min(max(1, round(val_fraction * count)), count - 1)
    ranked = sorted(track_ids, key=lambda tid: hashlib.sha1(f"{seed}:{tid}".encode()).hexdigest())
    val_ids = set(ranked[:num_val])
    return {tid: ("val" if tid in val_ids else "train") for tid in track_ids}


def latent_statistics(cache_dir: Path, tracks: list[dict]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every frame of `tracks`, two passes in float64:
    mean_c = sum_t x[c,t] / N,  std_c = max(sqrt(sum_t (x[c,t] - mean_c)^2 / N), STD_FLOOR).
    Tracks are read memory-mapped one at a time, so memory stays at one track."""
    total = np.zeros(LATENT_DIM, dtype=np.float64)
    count = 0
    for track in tracks:
        latents = np.load(track_paths(cache_dir, track["id"])[0], mmap_mode="r")
        total += latents.sum(axis=1, dtype=np.float64)
        count += latents.shape[1]
    mean = total / max(count, 1)
    squares = np.zeros(LATENT_DIM, dtype=np.float64)
    for track in tracks:
        latents = np.load(track_paths(cache_dir, track["id"])[0], mmap_mode="r")
        squares += ((latents.astype(np.float64) - mean[:, None]) ** 2).sum(axis=1)
    std = np.maximum(np.sqrt(squares / max(count, 1)), STD_FLOOR)
    return mean.tolist(), std.tolist()


# ------------------------------------------------------------------------------------------ prepare

def _new_manifest(audio_dir: Path, fingerprint: str, encodec_weights: str) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "complete": False,
        "codec_fingerprint": fingerprint,
        "encodec_weights": encodec_weights,
        "sample_rate": SAMPLE_RATE,
        "frame_rate": FRAME_RATE,
        "hop_length": HOP_LENGTH,
        "latent_dim": LATENT_DIM,
        "audio_dir": str(audio_dir),
        "latent_mean": None,
        "latent_std": None,
        "tracks": [],
        "skipped": [],
        "settings": {},
    }


def _load_existing(out_dir: Path, audio_dir: Path, fingerprint: str) -> dict | None:
    """The manifest of an earlier run into out_dir, after checking it is the same codec and source folder."""
    if not manifest_path(out_dir).exists():
        return None
    manifest = read_manifest(out_dir)
    check_fingerprint(manifest["codec_fingerprint"], fingerprint, f"the cache {out_dir}")
    if manifest.get("audio_dir") != str(audio_dir):
        raise CacheError(f"{manifest_path(out_dir)}: this cache was made from {manifest.get('audio_dir')}, "
                         f"not {audio_dir}; use another --out_dir")
    return manifest


def _is_done(track: dict, path: Path, out_dir: Path) -> bool:
    """A track is finished if the source file is unchanged and both arrays exist."""
    try:
        unchanged = source_stamp(path) == {k: track[k] for k in ("source_size", "source_mtime_ns")}
    except (OSError, KeyError):
        return False
    return unchanged and all(p.is_file() for p in track_paths(out_dir, track["id"]))


def _read_track(path: Path, min_seconds: float) -> torch.Tensor:
    """Mono 24 kHz audio trimmed to whole frames, or AudioLoadError if unusable (runs in a loader thread)."""
    if path.suffix.lower() not in AUDIO_EXTENSIONS:
        raise AudioLoadError(f"{path}: not an audio file (extension {path.suffix or 'none'!r}; "
                             f"supported: {' '.join(AUDIO_EXTENSIONS)})")
    if path.stat().st_size == 0:
        raise AudioLoadError(f"{path}: empty file (0 bytes)")
    audio = load_audio(path)
    frames = audio.shape[-1] // HOP_LENGTH
    seconds = frames / FRAME_RATE
    if seconds < min_seconds or frames == 0:
        raise AudioLoadError(f"{path}: too short ({seconds:.2f} s < --min_seconds {min_seconds:g}, "
                             f"one training example)")
    return audio[:, : frames * HOP_LENGTH]


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def default_workers(device: torch.device) -> int:
    """One encoding thread per usable core on CPU; on a GPU two (one reads the next file meanwhile)."""
    return len(os.sched_getaffinity(0)) if device.type == "cpu" else 2


@contextlib.contextmanager
def _single_threaded_ops(device: torch.device):
    """On CPU, each worker thread encodes its own track with single-threaded torch ops.

    The encoder (small convolutions and an LSTM stepping over frames) scales poorly over intra-op
    threads, and intra-op threads spin badly when cores are shared; one track per core does not.
    The caller's setting is restored afterwards.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prepare(audio_dir, out_dir, encodec_weights: str = "pretrained", val_fraction: float = DEFAULT_VAL_FRACTION,
            seed: int = 0, device=None, min_seconds: float = DEFAULT_MIN_SECONDS, workers: int | None = None,
            progress: bool = True) -> dict:
    """Encode every usable audio file under audio_dir into the cache out_dir; return the manifest.

    Resumable: tracks already in out_dir (same source path, size and mtime) are not re-encoded.
    Raises CodecLoadError (bad weights or a cache made with another codec), CacheError (a cache made
    from another folder), NoUsableAudioError (nothing usable) and FileNotFoundError (no audio_dir).
    """
    audio_dir = Path(audio_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"--audio_dir {audio_dir}: no such directory")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if min_seconds < 0:
        raise ValueError(f"--min_seconds must be >= 0, got {min_seconds}")
    device = torch.device(device or default_device())
    workers = workers or default_workers(device)
    files = find_files(audio_dir, exclude=out_dir)

    codec = load_codec(encodec_weights, device)
    fingerprint = codec_fingerprint(codec)
    manifest = _load_existing(out_dir, audio_dir, fingerprint) or _new_manifest(audio_dir, fingerprint, encodec_weights)
    (out_dir / TRACKS_DIR).mkdir(parents=True, exist_ok=True)
    manifest["complete"] = False
    manifest["settings"] = {"val_fraction": val_fraction, "seed": seed, "min_seconds": min_seconds,
                            "encodec_weights": encodec_weights}

    previous = {track["source"]: track for track in manifest["tracks"]}
    relative = {path: path.relative_to(audio_dir).as_posix() for path in files}
    done, todo = [], []
    for path in files:
        track = previous.get(relative[path])
        if track is not None and _is_done(track, path, out_dir) and track["duration"] >= min_seconds:
            done.append(track)
        else:
            todo.append(path)
    _remove_stale_arrays(out_dir, previous, {t["id"] for t in done} | {track_id_for(relative[p]) for p in todo})
    manifest["tracks"] = done
    manifest["skipped"] = []
    write_manifest_atomic(out_dir, manifest)

    def job(path: Path) -> dict:
        return _encode_track(codec, path, relative[path], out_dir, device, min_seconds)

    started = time.perf_counter()
    encoded_seconds = 0.0
    bar = tqdm(total=len(todo), desc="encoding", unit="track", disable=not progress or not todo, file=sys.stderr)
    # closing(): on Ctrl-C the queued jobs are cancelled at once, not when the generator is collected
    with _single_threaded_ops(device), contextlib.closing(_run_in_threads(todo, job, workers)) as outcomes:
        for path, outcome in outcomes:
            source = relative[path]
            bar.update()
            try:
                track = outcome.result()
            except (AudioLoadError, OSError) as error:
                reason = str(error).removeprefix(f"{path}: ")
                _warn(f"{path}: {reason}")
                manifest["skipped"].append({"source": source, "reason": reason})
                for stale in track_paths(out_dir, track_id_for(source)):   # arrays of an earlier, now broken version
                    stale.unlink(missing_ok=True)
                write_manifest_atomic(out_dir, manifest)
                continue
            manifest["tracks"].append(track)
            encoded_seconds += track["duration"]
            write_manifest_atomic(out_dir, manifest)     # from here on, a crash keeps this track
            bar.set_postfix_str(source[-40:], refresh=False)
    bar.close()

    if not manifest["tracks"]:
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in manifest["skipped"][:3])
        more = f" (and {len(manifest['skipped']) - 3} more)" if len(manifest["skipped"]) > 3 else ""
        raise NoUsableAudioError(f"--audio_dir {audio_dir}: no usable audio "
                                 f"({len(files)} files found{': ' + reasons + more if reasons else ''})")

    _finish(manifest, out_dir, val_fraction, seed)
    elapsed = time.perf_counter() - started
    manifest["settings"]["last_run"] = {
        "encoded_tracks": len(todo) - len(manifest["skipped"]), "encoded_seconds": round(encoded_seconds, 3),
        "wall_seconds": round(elapsed, 3), "device": str(device), "workers": workers}
    write_manifest_atomic(out_dir, manifest)
    return manifest


def _run_in_threads(items: list, job, workers: int):
    """Yield (item, future) as the jobs finish, in any order.

    At most `workers` jobs run at once (torch and libsndfile release the GIL, so they use separate
    cores) and only a few more are queued, so memory stays at about `workers` tracks. On an exception
    in the caller (Ctrl-C) queued jobs are cancelled and running ones finish writing their arrays.
    """
    pending = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        running = {pool.submit(job, item): item for item in itertools.islice(pending, 2 * workers)}
        try:
            while running:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    yield running.pop(future), future
                    for item in itertools.islice(pending, 1):
                        running[pool.submit(job, item)] = item
        finally:
            for future in running:
                future.cancel()


def _encode_track(codec, path: Path, source: str, out_dir: Path, device: torch.device, min_seconds: float) -> dict:
    """Read, encode and store one track (runs in a worker thread); AudioLoadError if the file is unusable."""
    audio = _read_track(path, min_seconds)
    track_id = track_id_for(source)
    latents = encode(codec, audio.to(device).unsqueeze(0))[0].float().cpu().numpy()   # [128, F]
    frames = latents.shape[1]
    latent_path, audio_path = track_paths(out_dir, track_id)
    save_npy_atomic(latent_path, latents)
    save_npy_atomic(audio_path, audio[0, : frames * HOP_LENGTH].numpy())
    return {"id": track_id, "source": source, "duration": frames / FRAME_RATE, "frames": frames,
            "split": None, **source_stamp(path)}


def _remove_stale_arrays(out_dir: Path, previous: dict, keep_ids: set[str]) -> None:
    """Delete the arrays of tracks whose source file is gone (they would never be read again)."""
    for track in previous.values():
        if track["id"] not in keep_ids:
            for path in track_paths(out_dir, track["id"]):
                path.unlink(missing_ok=True)


def _finish(manifest: dict, out_dir: Path, val_fraction: float, seed: int) -> None:
    manifest["tracks"].sort(key=lambda track: track["source"])
    splits = split_tracks([track["id"] for track in manifest["tracks"]], val_fraction, seed)
    for track in manifest["tracks"]:
        track["split"] = splits[track["id"]]
    train = [track for track in manifest["tracks"] if track["split"] == "train"]
    manifest["latent_mean"], manifest["latent_std"] = latent_statistics(out_dir, train)
    manifest["split_summary"] = {
        split: {"tracks": sum(t["split"] == split for t in manifest["tracks"]),
                "frames": sum(t["frames"] for t in manifest["tracks"] if t["split"] == split)}
        for split in ("train", "val")}
    manifest["complete"] = True


# --------------------------------------------------------------------------------------------- demo

def prepare_demo(out_dir=DEMO_CACHE_DIR, num_tracks: int | None = None, seconds: float | None = None,
                 seed: int = 0, device=None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 min_seconds: float | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic demo corpus into out_dir/audio and prepare it with the 'random' codec."""
    import demo_corpus
    num_tracks = demo_corpus.DEFAULT_NUM_TRACKS if num_tracks is None else num_tracks
    seconds = demo_corpus.DEFAULT_SECONDS if seconds is None else seconds
    out_dir = Path(out_dir)
    demo_corpus.write_corpus(out_dir / DEMO_SOURCE_DIR_NAME, num_tracks=num_tracks, seconds=seconds, seed=seed)
    if min_seconds is None:
        min_seconds = min(DEFAULT_MIN_SECONDS, seconds)
    _discard_if_other_codec(out_dir, random_codec_fingerprint())
    return prepare(out_dir / DEMO_SOURCE_DIR_NAME, out_dir, encodec_weights="random", val_fraction=val_fraction,
                   seed=seed, device=device, min_seconds=min_seconds, workers=workers, progress=progress)


def random_codec_fingerprint() -> str:
    return codec_fingerprint(load_codec("random"))


def _discard_if_other_codec(out_dir: Path, fingerprint: str) -> None:
    """The demo cache is generated, so one encoded by an older version of the random codec is rebuilt
    (a user's cache made with other weights is refused instead, by prepare)."""
    try:
        stale = read_manifest(out_dir)["codec_fingerprint"] != fingerprint
    except CacheError:
        return
    if stale:
        _warn(f"{out_dir}: the demo cache was encoded by another random codec; re-encoding it")
        manifest_path(out_dir).unlink()
        for path in (out_dir / TRACKS_DIR).glob("*.npy"):
            path.unlink()


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_dir", help="folder searched recursively for audio (WAV, FLAC, OGG, MP3, ...)")
    parser.add_argument("--out_dir", help=f"cache folder (default with --demo: {DEMO_CACHE_DIR})")
    parser.add_argument("--encodec_weights", default="pretrained", help=WEIGHT_CHOICES_HELP)
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="fraction of tracks (whole tracks) held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (and of the demo corpus)")
    parser.add_argument("--min_seconds", type=float, default=DEFAULT_MIN_SECONDS,
                        help="skip tracks shorter than this (one training example: 2 x segment)")
    parser.add_argument("--device", default=default_device(), help="device the encoder runs on")
    parser.add_argument("--workers", type=int, default=None,
                        help="tracks read and encoded in parallel (default: one per core on CPU, 2 on CUDA)")
    parser.add_argument("--demo", action="store_true",
                        help="generate the built-in synthetic corpus and prepare it with --encodec_weights random")
    parser.add_argument("--demo_tracks", type=int, default=None, help="number of demo tracks")
    parser.add_argument("--demo_seconds", type=float, default=None, help="length of each demo track")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and not args.audio_dir:
        parser.error("--audio_dir is required (or pass --demo for the built-in synthetic corpus)")
    if not args.demo and not args.out_dir:
        parser.error("--out_dir is required")
    if args.demo and args.audio_dir:
        parser.error("--demo generates its own audio; do not pass --audio_dir with it")
    started = time.perf_counter()
    try:
        if args.demo:
            manifest = prepare_demo(args.out_dir or DEMO_CACHE_DIR, num_tracks=args.demo_tracks,
                                    seconds=args.demo_seconds, seed=args.seed, device=args.device,
                                    val_fraction=args.val_fraction, workers=args.workers)
            out_dir = args.out_dir or DEMO_CACHE_DIR
        else:
            manifest = prepare(args.audio_dir, args.out_dir, encodec_weights=args.encodec_weights,
                               val_fraction=args.val_fraction, seed=args.seed, device=args.device,
                               min_seconds=args.min_seconds, workers=args.workers)
            out_dir = args.out_dir
    except (CodecLoadError, CacheError, NoUsableAudioError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = manifest["split_summary"]
    hours = sum(t["duration"] for t in manifest["tracks"]) / 3600
    print(f"{out_dir}: {len(manifest['tracks'])} tracks ({hours:.2f} h; train {summary['train']['tracks']}, "
          f"val {summary['val']['tracks']}), {len(manifest['skipped'])} skipped, codec "
          f"{manifest['codec_fingerprint']}, {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
