"""Measure how data preparation and loading scale; prints figures (not a test).

    python bench/bench_scale.py                                   # 1 h of audio, 10,000-track manifest (minutes)
    python bench/bench_scale.py --hours 0.05 --tracks 200 --min_windows 500    # a quick run

1. preparation: `prepare_data.py` (a subprocess, random codec, CPU) on --hours of the synthetic demo
   corpus (tracks of --track_minutes, mixed 24/44.1/48 kHz files) or on --audio_dir: seconds of
   preparation per minute of audio and the subprocess' peak RSS;
2. cache size: bytes per second of audio of one 60 s demo track prepared compact and float32;
3. loader: examples/s of a DataLoader with --num_workers workers over the compact cache's training windows
   (segment --segment_frames, chosen small so that 1 h gives >= --min_windows windows);
4. manifest scale: resident memory of a rank (a fresh process) holding a ContinuationDataset over a
   manifest of --tracks track entries (hard links to one real track's files), before and after reading
   items from --touch tracks; and the dataset's pickled size (what each DataLoader worker receives).
5. a messy folder (--scan_files N > 0, instead of 1-4): N files, half junk (random bytes named .wav), half
   WAV clips of 0.1 s (shorter than --min_seconds), plus one real track, prepared by `prepare_data.py` in a
   fresh process with default flags (random codec, CPU, one worker per core): wall time, peak RSS, bytes
   written (write(2) calls and what reached the block layer) and lines printed, and each per file.

    python bench/bench_scale.py --scan_files 100000 [--scan_files 10000 to compare]
Everything goes to --work_dir (a temporary folder unless given) and is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from music_continuation.data import cache as data
from music_continuation.data import demo_corpus
from music_continuation.utils import write_json

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0, help="synthetic audio to prepare")
    parser.add_argument("--track_minutes", type=float, default=5.0, help="length of each synthetic track")
    parser.add_argument("--audio_dir", help="prepare this folder instead of generating --hours of synthetic audio")
    parser.add_argument("--segment_frames", type=int, default=16, help="loader window (frames)")
    parser.add_argument("--min_windows", type=int, default=10_000, help="refuse a loader figure on fewer windows")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300, help="loader batches timed (after 20 warm-up)")
    parser.add_argument("--tracks", type=int, default=10_000, help="track entries of the simulated manifest")
    parser.add_argument("--touch", type=int, default=1_000, help="tracks read from in the manifest test")
    parser.add_argument("--work_dir", help="folder for audio and caches (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --work_dir afterwards")
    parser.add_argument("--scan_files", type=int, default=0,
                        help="measure the preparation of a messy folder of this many files instead (item 5)")
    parser.add_argument("--rss_child", help=argparse.SUPPRESS)     # internal: the manifest-scale process
    parser.add_argument("--scan_child", nargs=2, help=argparse.SUPPRESS)    # internal: AUDIO CACHE of item 5
    return parser.parse_args(argv)


def rss_mb(field: str = "VmRSS") -> float:
    """This process' resident (VmRSS) or peak resident (VmHWM) memory in MB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cache_bytes_per_second(cache: Path) -> float:
    manifest = data.read_manifest(cache)
    size = sum(path.stat().st_size for track in manifest["tracks"] for path in data.track_paths(cache, track["id"]))
    return size / sum(track["duration"] for track in manifest["tracks"])


def prepare_subprocess(audio_dir: Path, cache: Path, cache_dtype: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `prepare_data.py` run as its own process. The peak is the largest of
    all children so far (getrusage), so only the first call's is this run's."""
    command = [sys.executable, str(REPO / "prepare_data.py"), "--audio_dir", str(audio_dir), "--out_dir", str(cache),
               "--encodec_weights", "random", "--device", "cpu", "--cache_dtype", cache_dtype, "--min_seconds", "0"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024     # ru_maxrss is in KB


def bench_prepare(args, work: Path) -> Path:
    audio_dir = Path(args.audio_dir) if args.audio_dir else synthetic_corpus(args, work / "audio")
    wall, peak = prepare_subprocess(audio_dir, work / "compact", "compact")      # the first child: its own peak
    manifest = data.read_manifest(work / "compact")
    minutes = sum(t["duration"] for t in manifest["tracks"]) / 60
    print(f"prepare {audio_dir} (compact, {len(manifest['tracks'])} tracks, {len(os.sched_getaffinity(0))} cores): "
          f"{wall:.0f} s for {minutes:.1f} min of audio = {wall / minutes:.2f} s per minute of audio; "
          f"peak RSS {peak:.0f} MB", flush=True)

    # bytes per second of both layouts, on the same 60 s demo track (the figure does not depend on length)
    demo_corpus.write_corpus(work / "one", num_tracks=1, seconds=60.0, seed=0)
    prepare_subprocess(work / "one", work / "one_float32", "float32")
    prepare_subprocess(work / "one", work / "one_compact", "compact")
    compact, full = cache_bytes_per_second(work / "one_compact"), cache_bytes_per_second(work / "one_float32")
    print(f"cache bytes per second of audio: compact {compact:.0f}, float32 {full:.0f} (compact = "
          f"{100 * compact / full:.1f} %); the prepared cache: {cache_bytes_per_second(work / 'compact'):.0f}",
          flush=True)
    return work / "compact"


def synthetic_corpus(args, audio_dir: Path) -> Path:
    tracks = max(1, round(args.hours * 60 / args.track_minutes))
    seconds = args.hours * 3600 / tracks
    started = time.perf_counter()
    demo_corpus.write_corpus(audio_dir, num_tracks=tracks, seconds=seconds, seed=0)
    print(f"synthetic corpus: {tracks} tracks x {seconds:.0f} s ({args.hours:g} h), written in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return audio_dir


def bench_loader(args, cache: Path) -> None:
    dataset = data.ContinuationDataset(cache, "train", args.segment_frames)
    if len(dataset) < args.min_windows:
        print(f"loader: only {len(dataset)} windows (< --min_windows {args.min_windows}); lower --segment_frames "
              f"or raise --hours", flush=True)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    batches = iter(loader)
    for _ in range(20):
        next(batches)
    started = time.perf_counter()
    count = 0
    for _ in range(args.batches):
        try:
            count += len(next(batches)["input_latent"])
        except StopIteration:
            batches = iter(loader)
    rate = count / (time.perf_counter() - started)
    print(f"loader ({data.cache_dtype(dataset.manifest, cache)}, {len(dataset)} windows of 2 x "
          f"{args.segment_frames} frames, {args.num_workers} workers, batch {args.batch_size}): "
          f"{rate:.0f} examples/s", flush=True)


def simulated_manifest(cache: Path, out: Path, tracks: int) -> None:
    """A complete cache of `tracks` track entries whose files are hard links to the cache's first track."""
    manifest = data.read_manifest(cache)
    real = manifest["tracks"][0]
    (out / data.TRACKS_DIR).mkdir(parents=True)
    entries = []
    for number in range(tracks):
        track_id = f"sim{number:012d}"
        for source, target in zip(data.track_paths(cache, real["id"]), data.track_paths(out, track_id)):
            os.link(source, target)
        entries.append({**real, "id": track_id, "source": f"sim/{number}.wav", "split": "train"})
    manifest.update(tracks=entries, audio_dir=str(out / "none"))
    write_json(out / data.MANIFEST_NAME, manifest)


def bench_manifest(args, cache: Path, work: Path) -> None:
    simulated_manifest(cache, work / "many", args.tracks)
    size = data.manifest_path(work / "many").stat().st_size
    result = subprocess.run([sys.executable, __file__, "--rss_child", str(work / "many"),
                             "--touch", str(args.touch), "--segment_frames", str(args.segment_frames)],
                            check=True, capture_output=True, text=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"rank with a {args.tracks}-track manifest ({size / 1e6:.1f} MB): RSS {figures['imports']:.0f} MB after "
          f"imports, {figures['dataset']:.0f} MB with the dataset (+{figures['dataset'] - figures['imports']:.0f}), "
          f"{figures['touched']:.0f} MB after reading from {figures['touched_tracks']} tracks; "
          f"pickled dataset {figures['pickled'] / 1e6:.2f} MB per worker", flush=True)


def rss_child(args) -> None:
    """Runs in a fresh process: RSS after imports, with the dataset, after reading items from many tracks."""
    import pickle
    figures = {"imports": rss_mb()}
    dataset = data.ContinuationDataset(args.rss_child, "train", args.segment_frames)
    figures["dataset"] = rss_mb()
    per_track = len(dataset) // len(dataset.tracks)
    touched = min(args.touch, len(dataset.tracks))
    for track in np.linspace(0, len(dataset.tracks) - 1, touched).astype(int):
        dataset[int(track) * per_track]
    figures.update(touched=rss_mb(), touched_tracks=touched, pickled=len(pickle.dumps(dataset)))
    print(json.dumps(figures))


def messy_folder(folder: Path, files: int) -> None:
    """`files` files, half random bytes named .wav, half 0.1 s WAV clips (one clip's bytes, many names), and one
    real track of 6 s."""
    import io

    import soundfile
    folder.mkdir(parents=True)
    clip = io.BytesIO()
    soundfile.write(clip, np.zeros(800, np.int16), 8000, format="WAV", subtype="PCM_16")
    for number in range(files // 2):
        (folder / f"junk{number:06d}.wav").write_bytes(os.urandom(256))
        (folder / f"clip{number:06d}.wav").write_bytes(clip.getvalue())
    demo_corpus.write_corpus(folder / "real", num_tracks=1, seconds=6.0, seed=0)


def bench_scan(args, work: Path) -> None:
    """Item 5: prepare a messy folder in a fresh process (scan_child) and report what it cost."""
    audio_dir = work / "messy"
    started = time.perf_counter()
    messy_folder(audio_dir, args.scan_files)
    print(f"messy folder: {args.scan_files} files written in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--scan_child", str(audio_dir), str(work / "messy_cache")],
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    lines = figures["output"].count("\n")
    print(f"scan of {args.scan_files} files ({len(os.sched_getaffinity(0))} cores, exit {figures['code']}): "
          f"{wall:.1f} s wall ({1e3 * wall / args.scan_files:.2f} ms per file), peak RSS {figures['peak_mb']:.0f} MB, "
          f"written {figures['wchar'] / 1e6:.1f} MB by write(2) ({figures['wchar'] / args.scan_files:.0f} B per "
          f"file), {figures['write_bytes'] / 1e6:.1f} MB to the block layer, {lines} lines printed:", flush=True)
    shown = [line.split("\r")[-1] for line in figures["output"].strip().split("\n")]     # a bar's last state
    print("    " + "\n    ".join(shown), flush=True)


def scan_child(audio_dir: str, cache: str) -> None:
    """Runs in a fresh process: prepare_data.py's main on the folder with its output captured; prints a JSON of
    its exit status, output, peak RSS and bytes written (/proc/self/status and /proc/self/io)."""
    import contextlib
    import io

    from music_continuation.data import prepare
    output = io.StringIO()
    with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
        code = prepare.main(["--audio_dir", audio_dir, "--out_dir", cache, "--encodec_weights", "random",
                             "--device", "cpu"])
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    print(json.dumps({"code": code, "output": output.getvalue(), "peak_mb": rss_mb("VmHWM"),
                      "wchar": int(counters["wchar"]), "write_bytes": int(counters["write_bytes"])}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return
    if args.scan_child:
        scan_child(*args.scan_child)
        return
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_scale: {work}", flush=True)
    try:
        if args.scan_files:
            bench_scan(args, work)
            return
        cache = bench_prepare(args, work)
        bench_loader(args, cache)
        bench_manifest(args, cache, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
