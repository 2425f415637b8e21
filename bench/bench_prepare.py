"""Sharded preparation against one process, and what verifying a cache costs; prints figures (not a test).

    python bench/bench_prepare.py                                  # the demo corpus (24 tracks of 12 s), 2 shards
    python bench/bench_prepare.py --audio_dir DIR --shards 4 --workers 1

1. `prepare_data.py` (subprocesses, random codec, CPU) on --audio_dir once as one process, then as --shards
   processes started together into one cache (`--shard I/N`; the last to finish merges): wall time of each;
2. the two caches compared by the SHA-256 of every file in tracks/, and their manifests apart from timings;
3. verification: the CRC-32 of every cache file read back (what a resume does for a file whose mtime changed, and
   what re-verifying the whole cache would cost), in MB/s and seconds per hour of audio, and the resume's own check
   of an unchanged track (a stat of each file).
Everything goes to --work_dir (a temporary folder unless given) and is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from music_continuation.data import cache as data
from music_continuation.data import demo_corpus
from music_continuation.data.encode import _track_files
from music_continuation.data.integrity import crc32_of
from music_continuation.data.resume import _verify

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio_dir", help="folder to prepare (default: the demo corpus, written if missing)")
    parser.add_argument("--shards", type=int, default=2, help="shard processes started together")
    parser.add_argument("--workers", type=int, default=None, help="--workers of every process (default: its own)")
    parser.add_argument("--work_dir", help="folder for the caches (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --work_dir afterwards")
    return parser.parse_args(argv)


def command(audio_dir: Path, cache: Path, workers: int | None, shard: str = "0/1") -> list[str]:
    line = [sys.executable, str(REPO / "prepare_data.py"), "--audio_dir", str(audio_dir), "--out_dir", str(cache),
            "--encodec_weights", "random", "--device", "cpu", "--shard", shard]
    return line + (["--workers", str(workers)] if workers else [])


def timed(commands: list[list[str]]) -> float:
    """Wall seconds from starting every command at once until the last has finished (each must exit 0)."""
    started = time.perf_counter()
    processes = [subprocess.Popen(line, stdout=subprocess.DEVNULL) for line in commands]
    for process, line in zip(processes, commands):
        if process.wait() != 0:
            sys.exit(f"bench_prepare.py: {' '.join(line)} exited {process.returncode}")
    return time.perf_counter() - started


def digests(cache: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (cache / "tracks").iterdir()}


def without_timings(manifest: dict) -> dict:
    """The manifest apart from what differs between two runs: the last run's timings and the files' mtimes."""
    manifest = json.loads(json.dumps(manifest))
    del manifest["settings"]["last_run"]
    for track in manifest["tracks"]:
        for record in track["files"].values():
            del record["mtime_ns"]
    return manifest


def bench_verify(cache: Path) -> None:
    manifest = data.read_manifest(cache)
    paths = [path for track in manifest["tracks"] for path in _track_files(cache, track["id"]).values()]
    hours = sum(track["duration"] for track in manifest["tracks"]) / 3600
    started = time.perf_counter()
    megabytes = sum(path.stat().st_size for path in paths) / 1e6
    for path in paths:
        crc32_of(path)
    crc = time.perf_counter() - started
    started = time.perf_counter()
    for track in manifest["tracks"]:
        assert _verify(track, cache, manifest["cache_dtype"]) is None
    unchanged = time.perf_counter() - started
    print(f"verify: CRC-32 of {len(paths)} files ({megabytes:.1f} MB, page cache) in {crc:.3f} s = "
          f"{megabytes / crc:.0f} MB/s = {crc / hours:.2f} s per hour of audio; the resume's check of "
          f"{len(manifest['tracks'])} unchanged tracks {1e3 * unchanged / len(manifest['tracks']):.3f} ms per track",
          flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        audio_dir = Path(args.audio_dir) if args.audio_dir else REPO / "data_cache" / "demo" / "audio"
        if not args.audio_dir:
            demo_corpus.write_corpus(audio_dir)             # deterministic; existing files are kept
        one = timed([command(audio_dir, work / "one", args.workers)])
        shards = timed([command(audio_dir, work / "sharded", args.workers, f"{index}/{args.shards}")
                        for index in range(args.shards)])
        manifest = data.read_manifest(work / "one")
        minutes = sum(track["duration"] for track in manifest["tracks"]) / 60
        print(f"prepare {audio_dir} ({len(manifest['tracks'])} tracks, {minutes:.1f} min of audio): one process "
              f"{one:.1f} s; {args.shards} shard processes at once {shards:.1f} s", flush=True)
        same_arrays = digests(work / "one") == digests(work / "sharded")
        same_manifest = without_timings(manifest) == without_timings(data.read_manifest(work / "sharded"))
        print(f"compared: {len(digests(work / 'one'))} files by SHA-256 {'identical' if same_arrays else 'DIFFER'}; "
              f"manifests apart from timings {'equal' if same_manifest else 'DIFFER'}", flush=True)
        bench_verify(work / "one")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
