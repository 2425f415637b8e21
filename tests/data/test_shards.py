"""prepare_data.py --shard I/N and --merge, and cluster/prepare.sbatch run locally (two shard processes at once).

The reference is always a plain one-machine run of the same folder: a sharded cache must have identical arrays
and the same manifest apart from timings.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bench.bench_prepare import without_timings
from music_continuation.codec import SAMPLE_RATE
from music_continuation.data import cache as data
from music_continuation.data import prepare as prepare_data
from music_continuation.data.scan import track_id_for
from music_continuation.data.shards import shard_of
from tests.data.test_data import files_of

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("reuse_random_codec")    # conftest: one random codec
MIN_SECONDS = 0.5
SETTINGS = dict(encodec_weights="random", device="cpu", min_seconds=MIN_SECONDS, workers=1, progress=False)


def write_tracks(folder: Path, names: list[str], seconds: float = 0.6) -> Path:
    folder.mkdir(exist_ok=True)
    for number, name in enumerate(names):
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        soundfile.write(folder / name, (0.4 * np.sin(2 * np.pi * (200 + 70 * number) * t)).astype(np.float32),
                        SAMPLE_RATE)
    return folder


def shard_of_source(source: str, count: int) -> int:
    return shard_of(track_id_for(source), count)


def names_in_both_shards(count: int = 5) -> list[str]:
    """`count` file names, at least two in each of 2 shards (so that every shard has work)."""
    names = [f"t{number}.wav" for number in range(count)]
    while min(sum(shard_of_source(name, 2) == shard for name in names) for shard in (0, 1)) < 2:
        names = [f"x{name}" for name in names]
    return names


def test_shard_flag_errors_are_one_line(tmp_path, capsys):
    for value, message in (("3/2", "3/2: needs 0 <= I < N"), ("x", "expected I/N (shard I of N), got 'x'"),
                           ("1/2/3", "expected I/N")):
        with pytest.raises(SystemExit) as exit_info:
            prepare_data.main(["--audio_dir", str(tmp_path), "--out_dir", str(tmp_path / "c"), "--shard", value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument --shard: {message}" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        prepare_data.main(["--merge", "--out_dir", str(tmp_path), "--seed", "3"])
    assert "--merge takes only --out_dir" in capsys.readouterr().err


def test_shards_are_chosen_by_a_hash_of_the_relative_path():
    paths = [f"album{number // 10}/track{number}.flac" for number in range(2000)]
    shards = [shard_of_source(path, 4) for path in paths]
    for shard in range(4):                  # a hash: 500 +- 19 each (binomial), 450-550 is 2.6 sd
        assert 450 <= shards.count(shard) <= 550
    more = paths + [f"new/track{number}.flac" for number in range(100)]
    assert [shard_of_source(path, 4) for path in more[:2000]] == shards     # adding files moves no existing one


@pytest.mark.slow
def test_two_shards_at_once_equal_one_machine(tmp_path):
    """cluster/prepare.sbatch, as two array tasks started together on one machine: the last to finish merges; the
    cache equals a one-machine run's (identical arrays, the same manifest apart from timings)."""
    audio_dir = write_tracks(tmp_path / "audio", names_in_both_shards())
    one = prepare_data.prepare(audio_dir, tmp_path / "one", val_fraction=0.4, **SETTINGS)
    shared = tmp_path / "shared"
    flags = ["--audio_dir", str(audio_dir), "--out_dir", str(shared), "--encodec_weights", "random",
             "--device", "cpu", "--min_seconds", str(MIN_SECONDS), "--val_fraction", "0.4", "--workers", "1"]
    tasks = [subprocess.Popen(["bash", str(REPO / "cluster" / "prepare.sbatch"), *flags], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2",
                                   "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": sys.executable})
             for task in (0, 1)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    summaries = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert sum(": 5 tracks (" in line for line in summaries) == 1           # one merged, the other waited
    assert files_of(shared) == files_of(tmp_path / "one")
    merged = data.read_manifest(shared)
    assert without_timings(merged) == without_timings(one) and merged["settings"]["last_run"]["shards"] == 2
    assert not data.pending_shards(shared)
    data.ContinuationDataset(shared, "train", 10)


def test_unmerged_shards_are_refused_until_every_shard_has_run(tmp_path, capsys):
    audio_dir = write_tracks(tmp_path / "audio", names_in_both_shards(4))
    cache = tmp_path / "cache"
    assert prepare_data.prepare(audio_dir, cache, shard=(0, 2), **SETTINGS) is None
    with pytest.raises(data.CacheError, match=r"preparation has not finished.*prepare_data.py --merge --out_dir"):
        data.ContinuationDataset(cache, "train", 10)
    assert prepare_data.main(["--merge", "--out_dir", str(cache)]) == 2
    assert f"error: {cache}: --shard 1/2 has not finished" in capsys.readouterr().err
    with pytest.raises(data.CacheError, match="progress of --shard 0/2, this run is one of 3 shards"):
        prepare_data.prepare(audio_dir, cache, shard=(1, 3), **SETTINGS)
    with pytest.raises(data.CacheError, match="was run with --seed 0, this run has 5"):
        prepare_data.prepare(audio_dir, cache, shard=(1, 2), seed=5, **SETTINGS)
    manifest = prepare_data.prepare(audio_dir, cache, shard=(1, 2), **SETTINGS)      # the last shard merges
    assert manifest["complete"] and len(manifest["tracks"]) == 4 and not data.pending_shards(cache)

    # a shard deletes the arrays of its own tracks whose source is gone, never another shard's
    gone = {shard: next(t for t in manifest["tracks"] if shard_of_source(t["source"], 2) == shard)
            for shard in (0, 1)}
    for track in gone.values():
        (audio_dir / track["source"]).unlink()
    prepare_data.prepare(audio_dir, cache, shard=(0, 2), **SETTINGS)
    assert not any(path.exists() for path in data.track_paths(cache, gone[0]["id"]))
    assert all(path.exists() for path in data.track_paths(cache, gone[1]["id"]))
    assert len(prepare_data.prepare(audio_dir, cache, shard=(1, 2), **SETTINGS)["tracks"]) == 2
    assert not any(path.exists() for path in data.track_paths(cache, gone[1]["id"]))


@pytest.mark.slow
def test_a_shard_already_running_is_refused(tmp_path):
    """POSIX locks exclude another process (on any host of a shared file system); a killed holder's lock is gone."""
    audio_dir = write_tracks(tmp_path / "audio", ["a.wav"])
    cache = tmp_path / "cache"
    lock = data.shard_progress_path(cache, 0, 1).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(data.CacheError, match=f"another process is preparing shard-0-of-1 .*{lock}"):
            prepare_data.prepare(audio_dir, cache, **SETTINGS)
    finally:
        holder.kill()
        holder.wait()
    assert prepare_data.prepare(audio_dir, cache, **SETTINGS)["complete"]
