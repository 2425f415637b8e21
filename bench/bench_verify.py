"""Measure what checking a cache's files costs per hour of audio; prints figures (not a test).

    python bench/bench_verify.py                  # 1 h of audio in 5-minute tracks (0.24 GB compact)
    python bench/bench_verify.py --hours 0.1      # a quick run

The cost is reading every byte and its CRC-32, so it depends only on the bytes: the cache is made of tracks of
the compact layout's exact sizes (latents float16 [128, 75/s], audio int16 at 24 kHz, moments) filled with random
values, recorded as prepare_data.py records them (size, mtime, CRC-32), in a complete manifest. Measured:

1. what `prepare_data.py --verify CACHE` runs (prepare_data.verify, in-process; the command's start-up is timed
   apart) with the files evicted from the page cache (posix_fadvise DONTNEED: as read from this machine's disk)
   and again with them cached;
2. the trainer's start-up check (integrity.check_cache_files): the first time on this machine (reads every file)
   and the next time (remembered: one stat per file), in-process.
Projected to --project_hours linearly in bytes (the verified-files record grows by one entry per file).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from music_continuation.codec import FRAME_RATE, HOP_LENGTH, LATENT_DIM
from music_continuation.data import cache as data
from music_continuation.data import integrity
from music_continuation.data import prepare as prepare_data
from music_continuation.data.shards import _new_manifest
from music_continuation.data.writes import write_manifest_atomic

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0, help="audio the cache holds")
    parser.add_argument("--track_minutes", type=float, default=5.0)
    parser.add_argument("--project_hours", type=float, default=1000.0)
    parser.add_argument("--work_dir", help="folder of the cache (default: a temporary one, deleted afterwards)")
    return parser.parse_args(argv)


def synthetic_cache(cache: Path, hours: float, track_minutes: float) -> int:
    """A complete compact cache of random values with true sizes and records; its size in bytes."""
    (cache / data.TRACKS_DIR).mkdir(parents=True)
    manifest = _new_manifest(Path("/nonexistent"), "synthetic", "random", "compact")
    rng = np.random.default_rng(0)
    tracks = max(1, round(hours * 60 / track_minutes))
    frames = int(hours * 3600 * FRAME_RATE / tracks)
    for number in range(tracks):
        track_id = f"{number:016x}"
        latents, audio = data.track_paths(cache, track_id)
        np.save(latents, rng.standard_normal((LATENT_DIM, frames), dtype=np.float32).astype(np.float16))
        np.save(audio, rng.integers(-3000, 3000, frames * HOP_LENGTH, dtype=np.int16))
        np.save(data.track_stats_path(cache, track_id), np.zeros((2, LATENT_DIM)))
        files = {"latents": latents, "audio": audio, "stats": data.track_stats_path(cache, track_id)}
        manifest["tracks"].append({"id": track_id, "source": f"synthetic/{number}.wav", "frames": frames,
                                   "duration": frames / FRAME_RATE, "split": "train" if number else "val",
                                   "files": {kind: integrity.file_record(path) for kind, path in files.items()}})
    manifest.update(complete=True, latent_mean=[0.0] * LATENT_DIM, latent_std=[1.0] * LATENT_DIM,
                    settings={"val_fraction": 0.1, "seed": 0, "min_seconds": 4.0, "encodec_weights": "random"})
    write_manifest_atomic(cache, manifest)
    return sum(record["bytes"] for track in manifest["tracks"] for record in track["files"].values())


def evict(cache: Path) -> None:
    """Drop the cache's files from the page cache, so that they are read from the disk again."""
    for path in (cache / data.TRACKS_DIR).iterdir():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def timed_run(flags: list[str]) -> float:
    """Wall seconds of `prepare_data.py FLAGS` in a fresh process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *flags], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_verify_"))
    os.environ[integrity.USER_CACHE_ENV] = str(work / "user_cache")       # a first run on this "machine"
    cache = work / "cache"
    try:
        size = synthetic_cache(cache, args.hours, args.track_minutes)
        scale = args.project_hours / args.hours
        print(f"cache: {args.hours:g} h of audio, {size / 1e9:.3f} GB compact ({size / args.hours / 1e9:.3f} GB per "
              f"hour), {len(list((cache / data.TRACKS_DIR).iterdir()))} files", flush=True)
        for label in ("read from disk", "page-cached"):
            if label == "read from disk":
                evict(cache)
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                prepare_data.verify(cache, progress=False)           # what `prepare_data.py --verify` runs
            seconds = time.perf_counter() - started
            print(f"prepare_data.py --verify, {label}: {seconds:.2f} s ({size / seconds / 1e6:.0f} MB/s); projected "
                  f"to {args.project_hours:g} h: {seconds * scale / 60:.1f} min", flush=True)
        print(f"(the command's process start, `prepare_data.py --help`: {timed_run(['--help']):.1f} s)", flush=True)
        manifest = data.read_manifest(cache)
        shutil.rmtree(work / "user_cache", ignore_errors=True)
        evict(cache)
        for label in ("first start on this machine (reads every file)", "next start (remembered, stat only)"):
            started = time.perf_counter()
            integrity.check_cache_files(cache, manifest, progress=False)
            seconds = time.perf_counter() - started
            print(f"trainer start-up check, {label}: {seconds:.3f} s; projected to {args.project_hours:g} h: "
                  f"{seconds * scale:.1f} s", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
