"""Turn a folder of audio into a cache of EnCodec latents that training opens memory-mapped.

    python prepare_data.py --audio_dir DIR --out_dir CACHE [--encodec_weights pretrained] \
        [--val_fraction 0.1] [--seed 0] [--min_seconds 4] [--device cuda] [--cache_dtype compact] [--shard I/N]
    python prepare_data.py --merge --out_dir CACHE                 # once every --shard I/N has finished
    python prepare_data.py --demo [--out_dir data_cache/demo]      # the built-in synthetic corpus
    python prepare_data.py --verify CACHE                          # check every file, repair damaged tracks

Each track is read (any rate / channel count), mixed to mono, resampled to 24 kHz, trimmed to whole
latent frames and encoded, block by block (BLOCK_FRAMES), so memory does not grow with the track's
length; a track of at most one block is read, resampled and encoded whole. What decodes is stored: a
header's length is only an estimate. Latents, audio and the latents' per-channel moments go to
CACHE/tracks/<id>.{latents,audio,stats}.npy (hidden temporaries, every write checked, then renamed), and each
file's size, modification time and CRC-32 are recorded with the track.

Progress is an append-only journal, CACHE/shards/shard-I-of-N.jsonl (journal.py: one line per file, a track or a
skipped file; a plain run is shard 0/1), so an interrupted run loses at most the tracks in progress and a file
costs one line whatever the folder's size; a re-run resumes (a finished track is recognised by its source's path,
size and modification time, and its files are verified; a skipped file with the same size and mtime is not read
again), deletes the temporaries a killed run left, and picks up new files. `--shard I/N` prepares only the files
whose path hashes to I, so N processes, on any hosts that share CACHE, prepare one cache together. When every
shard has finished, the last one (or `--merge`) writes manifest.json: the tracks split into train/val by track,
per-channel latent statistics over the training split from the unrounded moments, and the skipped files counted
by reason (each one in CACHE/skipped.tsv). Skipped files are one summary line (one line each with --verbose).
`--verify CACHE` reads every file back against its recorded size and CRC-32 and re-encodes damaged tracks.

This module is the command and runs the steps; each job has its module: scan.py (finding files, skip reasons),
encode.py (one track, block by block), writes.py (checked, atomic writes), resume.py (what a re-run keeps),
shards.py (shard selection, locks, the merge into manifest.json), stats.py (train/val split, latent statistics).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from music_continuation.codec import WEIGHT_CHOICES_HELP, CodecLoadError, codec_fingerprint, load_codec
from music_continuation.data.audio_io import AudioLoadError
from music_continuation.data.cache import (
    AUDIO_INT16_SCALE,
    CACHE_DTYPES,
    DEFAULT_CACHE_DTYPE,
    SHARDS_DIR,
    TRACKS_DIR,
    CacheError,
    cache_dtype,
    manifest_path,
    pending_shards,
    read_manifest,
    require_complete,
    shard_progress_path,
)
from music_continuation.data.encode import _encode_track, _track_files
from music_continuation.data.integrity import VerifiedFiles, recorded_files, verify_files
from music_continuation.data.journal import JournalWriter, write_journal
from music_continuation.data.resume import _done_and_todo, _remove_stale_arrays
from music_continuation.data.scan import (
    NoUsableAudioError,
    _stamp_or_none,
    find_files,
    skip_kind,
    skipped_summary,
    track_id_for,
)
from music_continuation.data.shards import (
    _is_track_of,
    _locked,
    _new_manifest,
    _previous_work,
    merge,
    parse_shard,
    remove_stale_temporaries,
)
from music_continuation.data.writes import CacheWriteError, writing
from music_continuation.utils import run_command, warn

DEFAULT_MIN_SECONDS = 4.0    # one training example at the default segment: 2 x 150 frames = 2 x 2 s
DEFAULT_VAL_FRACTION = 0.1
DEMO_CACHE_DIR = Path("data_cache") / "demo"      # relative to the working directory, like --checkpoint_dir
DEMO_SOURCE_DIR_NAME = "audio"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


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
            progress: bool = True, cache_dtype: str = DEFAULT_CACHE_DTYPE, shard: tuple[int, int] = (0, 1),
            verbose: bool = False, reencode: frozenset = frozenset()):
    """Encode the usable audio files under audio_dir of `shard` (I, N: those whose track id is I modulo N; a
    plain run is 0 of 1) into the cache out_dir, then merge if every shard has finished. Returns the manifest,
    or None while other shards have still to finish (the last one merges).

    Resumable: tracks already in out_dir (same source path, size and mtime; files verified) are not re-encoded,
    and files skipped before (same size and mtime) are not read again; `reencode` (track ids: what --verify
    found damaged) are encoded again whatever their records say. Skipped files are one summary line on stderr
    (each one with `verbose`), and listed in CACHE/skipped.tsv by the merge.
    Raises CodecLoadError (bad weights or a cache made with another codec), CacheError (a cache made from another
    folder or with another cache_dtype, shards that disagree, this shard running elsewhere), CacheWriteError (the
    cache cannot be written: a fault of the run, which stops), NoUsableAudioError (nothing usable) and
    FileNotFoundError / OSError (a missing or unreadable audio_dir).
    """
    audio_dir = Path(audio_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    _check_arguments(audio_dir, val_fraction, min_seconds, cache_dtype, shard)
    _check_out_dir(out_dir)
    journal_path = shard_progress_path(out_dir, *shard)
    lock = journal_path.with_suffix(".lock")
    with _locked(lock, busy=f"{out_dir}: another process is preparing {journal_path.stem} of this cache "
                            f"(it holds {lock}); wait for it to finish"):
        stale = remove_stale_temporaries(out_dir, shard)
        if stale:
            warn(f"{out_dir}: deleted {stale} temporary files left by an interrupted run")
        device = torch.device(device or default_device())
        workers = workers or default_workers(device)
        files, duplicates = find_files(audio_dir, exclude=out_dir)
        if duplicates:
            warn(f"{audio_dir}: skipped {duplicates} paths leading to a folder or file already found "
                  f"(symbolic links, hard links or link loops); each real file is encoded once")
        codec = load_codec(encodec_weights, device)
        header = _new_manifest(audio_dir, codec_fingerprint(codec), encodec_weights, cache_dtype)
        del header["tracks"], header["skipped_files"]
        relative = {path: path.relative_to(audio_dir).as_posix() for path in files}
        mine = [path for path in files if _is_track_of(track_id_for(relative[path]), shard)]
        header.update(shard=list(shard), duplicates_skipped=duplicates, files_found=len(mine), settings={
            "val_fraction": val_fraction, "seed": seed, "min_seconds": min_seconds, "encodec_weights": encodec_weights})
        previous, previous_skips = _previous_work(out_dir, header)
        done, carried, todo = _done_and_todo(mine, previous, previous_skips, relative, out_dir, cache_dtype,
                                             min_seconds, reencode)
        _remove_stale_arrays(out_dir, previous, {t["id"] for t in done} | {track_id_for(relative[p]) for p in todo})
        with writing(journal_path):
            write_journal(journal_path, header, done, carried)

        def job(path: Path) -> dict:
            return _encode_track(codec, path, relative[path], out_dir, device, min_seconds, cache_dtype)

        started = time.perf_counter()
        with _single_threaded_ops(device), writing(journal_path), JournalWriter(journal_path) as journal:
            encoded, skipped, encoded_seconds = _encode_all(todo, job, relative, journal, out_dir, workers, progress,
                                                            verbose, shard, min_seconds)
            journal.append({"complete": {
                "encoded_tracks": encoded, "encoded_seconds": round(encoded_seconds, 3),
                "wall_seconds": round(time.perf_counter() - started, 3), "device": str(device), "workers": workers}},
                sync=True)
    if carried or skipped:
        _say(skipped_summary(carried + skipped, len(mine), out_dir, min_seconds, merged=shard[1] == 1))
    return merge(out_dir, when_ready=shard[1] > 1)


def _check_arguments(audio_dir: Path, val_fraction: float, min_seconds: float, cache_dtype: str,
                     shard: tuple[int, int]) -> None:
    try:
        with os.scandir(audio_dir) as entries:
            next(entries, None)
    except FileNotFoundError:
        raise FileNotFoundError(f"--audio_dir {audio_dir}: no such directory") from None
    except OSError as error:
        raise OSError(f"cannot read {audio_dir}: {error.strerror}") from None
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if min_seconds < 0:
        raise ValueError(f"--min_seconds must be >= 0, got {min_seconds}")
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"--cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard {shard[0]}/{shard[1]}: needs 0 <= I < N")


def _check_out_dir(out_dir: Path) -> None:
    """Create out_dir (with its tracks/ and shards/ folders) and write a byte there, so that a folder that cannot be
    used is refused with one line before anything runs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CacheWriteError(f"cannot write {out_dir}: not a folder")
    with writing(out_dir):
        for folder in (out_dir / TRACKS_DIR, out_dir / SHARDS_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())


def _encode_all(todo: list, job, relative: dict, journal: JournalWriter, out_dir: Path, workers: int,
                progress: bool, verbose: bool, shard: tuple[int, int],
                min_seconds: float) -> tuple[int, list[dict], float]:
    """Encode the `todo` files in `workers` threads, appending each track (or its skip reason) to the shard's
    journal; returns (tracks encoded, skipped entries, seconds of audio encoded). A CacheWriteError (the cache, not
    the file) stops the run."""
    encoded, skipped, encoded_seconds = 0, [], 0.0
    index, count = shard
    # closing(): on Ctrl-C the queued jobs are cancelled at once, not when the generator is collected; the bar is
    # closed on any exit, so that an error line starts a line of its own
    with tqdm(total=len(todo), desc="encoding" if count == 1 else f"shard {index}/{count}", unit="file",
              disable=not progress or not todo, file=sys.stderr) as bar, \
            contextlib.closing(_run_in_threads(todo, job, workers)) as outcomes:
        for path, outcome in outcomes:
            source = relative[path]
            bar.update()
            try:
                track = outcome.result()
            except CacheWriteError:
                raise
            except (AudioLoadError, OSError) as error:
                reason = str(error).removeprefix(f"{path}: ")
                if verbose:
                    warn(f"{path}: {reason}")
                entry = {"source": source, "kind": skip_kind(error), "reason": reason, "min_seconds": min_seconds,
                         **_stamp_or_none(path)}
                skipped.append(entry)
                for stale_file in _track_files(out_dir, track_id_for(source)).values():
                    stale_file.unlink(missing_ok=True)                   # of an earlier version of the file
                journal.append({"skipped": entry})
                continue
            journal.append({"track": track}, sync=True)                  # from here on, a crash keeps this track
            encoded += 1
            encoded_seconds += track["duration"]
            bar.set_postfix_str(source[-40:], refresh=False)
    return encoded, skipped, encoded_seconds


def _run_in_threads(items: list, job, workers: int):
    """Yield (item, future) as the jobs finish; jobs that finished together in the order submitted.

    At most `workers` jobs run at once (torch and libsndfile release the GIL, so they use separate
    cores) and only a few more are queued, so memory stays at about `workers` tracks. On an exception
    in the caller (Ctrl-C) queued jobs are cancelled and running ones finish writing their arrays.
    Submission order among finished jobs means that when a job raises (Ctrl-C in a worker), every
    job submitted before it that has finished is handed over (and recorded) first.
    """
    pending = enumerate(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        running = {pool.submit(job, item): (number, item) for number, item in itertools.islice(pending, 2 * workers)}
        try:
            while running:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in sorted(finished, key=lambda done: running[done][0]):
                    yield running.pop(future)[1], future
                    for number, item in itertools.islice(pending, 1):
                        running[pool.submit(job, item)] = (number, item)
        finally:
            for future in running:
                future.cancel()


def prepare_demo(out_dir=DEMO_CACHE_DIR, num_tracks: int | None = None, seconds: float | None = None,
                 seed: int = 0, device=None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 min_seconds: float | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic demo corpus into out_dir/audio and prepare it with the 'random' codec
    (and the default --cache_dtype)."""
    from music_continuation.data import demo_corpus
    num_tracks = demo_corpus.DEFAULT_NUM_TRACKS if num_tracks is None else num_tracks
    seconds = demo_corpus.DEFAULT_SECONDS if seconds is None else seconds
    out_dir = Path(out_dir)
    demo_corpus.write_corpus(out_dir / DEMO_SOURCE_DIR_NAME, num_tracks=num_tracks, seconds=seconds, seed=seed)
    if min_seconds is None:
        min_seconds = min(DEFAULT_MIN_SECONDS, seconds)
    _discard_if_stale(out_dir, random_codec_fingerprint())
    return prepare(out_dir / DEMO_SOURCE_DIR_NAME, out_dir, encodec_weights="random", val_fraction=val_fraction,
                   seed=seed, device=device, min_seconds=min_seconds, workers=workers, progress=progress)


def random_codec_fingerprint() -> str:
    return codec_fingerprint(load_codec("random"))


def _discard_if_stale(out_dir: Path, fingerprint: str) -> None:
    """The demo cache is generated, so one encoded by an older version of the random codec, or stored in
    other array types (an older float32 demo cache), is rebuilt (a user's cache is refused instead, by prepare)."""
    try:
        manifest = read_manifest(out_dir)
    except CacheError:
        return
    if manifest["codec_fingerprint"] != fingerprint:
        reason = "encoded by another random codec"
    elif cache_dtype(manifest, out_dir) != DEFAULT_CACHE_DTYPE:
        reason = f"stored as {cache_dtype(manifest, out_dir)}, not {DEFAULT_CACHE_DTYPE}"
    else:
        return
    warn(f"{out_dir}: the demo cache was {reason}; re-encoding it")
    manifest_path(out_dir).unlink()
    for path in [*(out_dir / TRACKS_DIR).glob("*.npy"), *pending_shards(out_dir)]:
        path.unlink()


def decode_references(out_dir, segment_frames_list, device) -> None:
    """Decode every segment of a finished cache once per segment length (references.build_references), with the
    codec recorded in its manifest."""
    from music_continuation.codec import FrozenDecoder, check_fingerprint, codec_fingerprint
    from music_continuation.data.cache import read_manifest, require_complete
    from music_continuation.data.references import build_references
    manifest = read_manifest(out_dir)
    require_complete(manifest, out_dir)
    codec = load_codec(manifest["encodec_weights"], device)
    check_fingerprint(manifest["codec_fingerprint"], codec_fingerprint(codec), f"the cache {out_dir}")
    decoder = FrozenDecoder(codec)
    for frames in segment_frames_list:
        build_references(out_dir, manifest, decoder, manifest["codec_fingerprint"], frames, device=device)


def verify(cache_dir, device=None, workers: int | None = None, progress: bool | None = None) -> int:
    """prepare_data.py --verify: read every file of a finished cache back and compare its size and CRC-32 with the
    manifest's record; re-encode the tracks of damaged files from the audio folder the manifest records (what a
    resume does for a track whose files changed), and drop their decoded references. Returns the exit status:
    0 if the cache is intact or was repaired. CacheError if it cannot be read, prepare()'s errors if the repair
    fails (the audio folder is gone, ...)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    manifest = read_manifest(cache_dir)
    require_complete(manifest, cache_dir)
    files = recorded_files(cache_dir, manifest)
    started = time.perf_counter()
    damaged = verify_files(files, VerifiedFiles(cache_dir), progress, desc="verifying", reread=True)
    size = sum(record["bytes"] for *_, record in files)
    seconds = time.perf_counter() - started
    unrecorded = sum(not track.get("files") for track in manifest["tracks"])
    note = f"; {unrecorded} tracks of an older version have no records to check" if unrecorded else ""
    if not damaged:
        print(f"{cache_dir}: {len(files)} files of {len(manifest['tracks'])} tracks verified ({size / 1e9:.2f} GB in "
              f"{seconds:.1f} s): intact{note}")
        return 0
    for damage in damaged:
        warn(f"damaged: {damage.line()}")
    ids = frozenset(damage.track["id"] for damage in damaged)
    _drop_references(cache_dir, ids)
    settings = manifest["settings"]
    _say(f"re-encoding {len(ids)} track(s) from {manifest['audio_dir']}")
    repaired = prepare(manifest["audio_dir"], cache_dir, encodec_weights=manifest["encodec_weights"],
                       val_fraction=settings["val_fraction"], seed=settings["seed"], device=device,
                       min_seconds=settings["min_seconds"], workers=workers,
                       cache_dtype=cache_dtype(manifest, cache_dir), reencode=ids)
    kept = ids & {track["id"] for track in repaired["tracks"]}
    gone = f"; {len(ids - kept)} whose source is gone or unusable now were dropped" if ids - kept else ""
    print(f"{cache_dir}: {len(damaged)} damaged file(s) of {len(files)}; re-encoded {len(kept)} track(s){gone}")
    return 0


def _drop_references(cache_dir: Path, track_ids: frozenset) -> None:
    """Delete the decoded references of these tracks in the cache (decoded from the damaged latents, maybe): their
    sets are then partial and the next training run decodes the tracks again."""
    for path in (cache_dir / "references").glob("*/*.npy"):
        if path.stem in track_ids:
            with contextlib.suppress(OSError):      # a read-only cache: its references stay as they are
                path.unlink()


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
    parser.add_argument("--cache_dtype", choices=tuple(CACHE_DTYPES), default=DEFAULT_CACHE_DTYPE,
                        help=f"compact: latents float16, audio int16 PCM (x {AUDIO_INT16_SCALE}), half the bytes; "
                             f"float32: both float32")
    parser.add_argument("--workers", type=int, default=None,
                        help="tracks read and encoded in parallel (default: one per core on CPU, 2 on CUDA)")
    parser.add_argument("--shard", type=parse_shard, default="0/1", metavar="I/N",
                        help="prepare only shard I of N (the files whose path hashes to I); N processes on any hosts "
                             "sharing --out_dir prepare one cache, and the last to finish writes the manifest")
    parser.add_argument("--merge", action="store_true",
                        help="write the manifest from the finished shards of --out_dir (the last shard does it itself)")
    parser.add_argument("--decode_references", type=int, nargs="+", default=None, metavar="SEGMENT_FRAMES",
                        help="also decode every segment of the cache once for training with --target_audio codec at "
                             "these --segment_frames (references.py; the trainer does it itself before its first "
                             "epoch otherwise); alone with --out_dir: for an existing cache")
    parser.add_argument("--verify", metavar="CACHE", default=None,
                        help="read every file of the finished cache CACHE, compare its size and CRC-32 with what was "
                             "recorded when it was written, and re-encode the tracks of damaged files from the audio "
                             "folder recorded in its manifest (takes only --device and --workers)")
    parser.add_argument("--verbose", action="store_true",
                        help="name each skipped file as it is skipped (otherwise one summary line at the end; the "
                             "list is in CACHE/skipped.tsv)")
    parser.add_argument("--demo", action="store_true",
                        help="generate the built-in synthetic corpus and prepare it with --encodec_weights random")
    parser.add_argument("--demo_tracks", type=int, default=None, help="number of demo tracks")
    parser.add_argument("--demo_seconds", type=float, default=None, help="length of each demo track")
    return parser


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.verify:
        defaults = vars(parser.parse_args([]))
        given = [f"--{name}" for name, value in vars(args).items()
                 if name not in ("verify", "device", "workers", "verbose") and value != defaults[name]]
        if given:
            parser.error(f"--verify takes only --device and --workers (the cache recorded its flags), "
                         f"not {' '.join(given)}")
        return
    if args.merge:
        defaults = vars(parser.parse_args([]))
        given = [f"--{name}" for name, value in vars(args).items()
                 if name not in ("merge", "out_dir", "decode_references") and value != defaults[name]]
        if given:
            parser.error(f"--merge takes only --out_dir (the shards recorded their flags), not {' '.join(given)}")
    elif args.demo:
        if args.audio_dir:
            parser.error("--demo generates its own audio; do not pass --audio_dir with it")
        if args.shard != (0, 1):
            parser.error("--demo is prepared in one run; --shard is for --audio_dir")
    elif not args.audio_dir and not args.decode_references:
        parser.error("--audio_dir is required (or pass --demo for the built-in synthetic corpus)")
    for frames in args.decode_references or ():
        if frames < 1:
            parser.error(f"--decode_references {frames}: a segment length in frames must be at least 1")
    if not args.demo and not args.out_dir:
        parser.error("--out_dir is required")


def run(args) -> int:
    started = time.perf_counter()
    out_dir = args.out_dir or DEMO_CACHE_DIR
    try:
        if args.verify:
            return verify(args.verify, device=args.device, workers=args.workers)
        if args.merge:
            manifest = merge(out_dir)
        elif args.decode_references and not args.audio_dir and not args.demo:
            decode_references(out_dir, args.decode_references, args.device)
            return 0
        elif args.demo:
            manifest = prepare_demo(out_dir, num_tracks=args.demo_tracks, seconds=args.demo_seconds, seed=args.seed,
                                    device=args.device, val_fraction=args.val_fraction, workers=args.workers)
        else:
            manifest = prepare(args.audio_dir, out_dir, encodec_weights=args.encodec_weights,
                               val_fraction=args.val_fraction, seed=args.seed, device=args.device,
                               min_seconds=args.min_seconds, workers=args.workers, cache_dtype=args.cache_dtype,
                               shard=args.shard, verbose=args.verbose)
    except KeyboardInterrupt:
        print("interrupted: the tracks finished so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    if manifest is None:
        print(f"{out_dir}: shard {args.shard[0]}/{args.shard[1]} finished in {elapsed:.1f} s; the last shard to "
              f"finish writes the manifest (or run --merge once every shard has)")
        return 0
    if args.decode_references:
        decode_references(out_dir, args.decode_references, args.device)
    summary = manifest["split_summary"]
    hours = sum(t["duration"] for t in manifest["tracks"]) / 3600
    print(f"{out_dir}: {len(manifest['tracks'])} tracks ({hours:.2f} h; train {summary['train']['tracks']}, "
          f"val {summary['val']['tracks']}), {sum(manifest['skipped_files'].values())} skipped, codec "
          f"{manifest['codec_fingerprint']}, {elapsed:.1f} s")
    return 0


def main(argv=None) -> int:
    return run_command(build_parser(), check_flags, run, argv,
                       (CodecLoadError, CacheError, NoUsableAudioError, ValueError, OSError))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
