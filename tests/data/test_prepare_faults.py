"""prepare_data.py against real faults of the file system: a full disk (tmpfs of a few hundred KB), a completely
full one, a read-only mount, an --out_dir that is a file and an --audio_dir that cannot be read.

Mounting a tmpfs needs root (CI runs as root); elsewhere those tests are skipped with that reason. The faults are
the kernel's own (ENOSPC, EROFS, EACCES), never simulated.
"""
from __future__ import annotations

import json
import os
import shutil
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
from music_continuation.data import shards
from music_continuation.data.journal import read_journal
from tests.data.test_data import files_of

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("reuse_random_codec")    # conftest: one random codec
MIN_SECONDS = 0.5
NO_SPACE = os.strerror(28)             # "No space left on device" (ENOSPC)


def sine(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tracks(folder: Path, count: int, seconds: float) -> Path:
    folder.mkdir()
    for number in range(count):
        soundfile.write(folder / f"t{number}.wav", sine(200 + 100 * number, seconds), SAMPLE_RATE)
    return folder


def run_main(argv: list, capsys) -> tuple[int, list[str]]:
    """prepare_data.main as a user runs it; (exit status, the lines of stderr that are not the progress bar)."""
    code = prepare_data.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith(("error", "warning", "Traceback"))]


def base_argv(audio_dir: Path, cache: Path) -> list:
    return ["--audio_dir", audio_dir, "--out_dir", cache, "--encodec_weights", "random", "--device", "cpu",
            "--min_seconds", MIN_SECONDS, "--workers", 1]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size) -> a fresh tmpfs of that size at tmp_path/name; all are unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros into folder/filler until the file system is full."""
    filler = folder / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(descriptor, bytes(4096)):
            pass
    except OSError as error:
        assert error.errno == 28
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_stops_the_run_and_the_resume_equals_a_clean_run(tmp_path, tmpfs, capsys):
    """The issue's case: the disk fills while the tracks are written. The run exits non-zero with one line, lists no
    track as skipped and none as done that is not whole; with more space the same command completes, and its arrays
    and manifest equal a clean run's."""
    audio_dir = write_tracks(tmp_path / "audio", 3, 2.0)        # a compact track of 2 s takes 135 KB
    clean = tmp_path / "clean"
    assert run_main(base_argv(audio_dir, clean), capsys)[0] == 0
    disk = tmpfs("disk", "300k")                                # room for two tracks, not three
    cache = disk / "cache"
    code, lines = run_main(base_argv(audio_dir, cache), capsys)
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write {cache}/") and lines[0].endswith(f": {NO_SPACE}")
    progress = read_journal(data.shard_progress_path(cache, 0, 1))
    assert not progress["complete"] and not progress["skipped"] and 1 <= len(progress["tracks"]) < 3
    done = tuple(track["id"] for track in progress["tracks"])
    assert {name: body for name, body in files_of(cache).items() if name.startswith(done)} == \
           {name: body for name, body in files_of(clean).items() if name.startswith(done)}
    assert not [path for path in (cache / "tracks").iterdir() if path.name.startswith(".")]   # no temporaries left
    with pytest.raises(data.CacheError, match="preparation has not finished"):
        data.ContinuationDataset(cache, "train", 10)

    remount(disk, "size=4m")
    assert run_main(base_argv(audio_dir, cache), capsys) == (0, [])
    assert files_of(cache) == files_of(clean)
    assert without_timings(data.read_manifest(cache)) == without_timings(data.read_manifest(clean))


def test_a_disk_full_while_the_manifest_is_written(tmp_path, tmpfs, monkeypatch, capsys):
    """A completely full disk: before anything runs, one line naming the cache; when it fills just before the
    manifest is written, one line naming the manifest, the shard's finished progress kept, and --merge completes
    once there is space again."""
    audio_dir = write_tracks(tmp_path / "audio", 1, 0.6)
    disk = tmpfs("disk", "200k")
    cache = disk / "cache"
    filler = fill(disk)
    assert run_main(base_argv(audio_dir, cache), capsys) == (2, [f"error: cannot write {cache}: {NO_SPACE}"])
    filler.unlink()

    finish = shards._finish

    def finish_and_fill(manifest, out_dir):
        finish(manifest, out_dir)
        fill(disk)

    monkeypatch.setattr(shards, "_finish", finish_and_fill)
    manifest = data.manifest_path(cache)
    assert run_main(base_argv(audio_dir, cache), capsys) == (2, [f"error: cannot write {manifest}: {NO_SPACE}"])
    assert read_journal(data.shard_progress_path(cache, 0, 1))["complete"]
    assert [path.name for path in cache.iterdir() if path.name.startswith(".")] == []
    (disk / "filler").unlink()
    monkeypatch.setattr(shards, "_finish", finish)
    code, lines = run_main(["--merge", "--out_dir", cache], capsys)
    assert (code, lines) == (0, []) and data.read_manifest(cache)["complete"]


def test_out_dir_that_cannot_be_used_is_one_line(tmp_path, tmpfs, capsys):
    audio_dir = write_tracks(tmp_path / "audio", 1, 0.6)
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    assert run_main(base_argv(audio_dir, a_file), capsys) == (2, [f"error: cannot write {a_file}: not a folder"])
    inside = a_file / "cache"
    assert run_main(base_argv(audio_dir, inside), capsys) == (2, [f"error: cannot write {inside}: Not a directory"])

    disk = tmpfs("disk", "1m")
    assert run_main(base_argv(audio_dir, disk / "cache"), capsys)[0] == 0
    remount(disk, "ro")
    read_only = os.strerror(30)                                 # "Read-only file system" (EROFS)
    for cache in (disk / "cache", disk / "new"):                # a finished cache to resume, a new one
        assert run_main(base_argv(audio_dir, cache), capsys) == (2, [f"error: cannot write {cache}: {read_only}"])
    assert data.read_manifest(disk / "cache")["complete"]


def test_unreadable_audio_dir_is_one_line(tmp_path):
    """Root reads any folder, so the check runs in a process without the capabilities that bypass permissions.
    An unreadable --audio_dir is refused; an unreadable folder inside it is one warning and the rest is prepared."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root's permission override")
    audio_dir = write_tracks(tmp_path / "audio", 1, 0.6)
    locked = tmp_path / "locked"
    locked.mkdir()
    (audio_dir / "private").mkdir()
    for folder in (locked, audio_dir / "private"):
        soundfile.write(folder / "x.wav", sine(500, 0.6), SAMPLE_RATE)
        folder.chmod(0)
    script = ("import json, sys; from music_continuation.data import prepare as prepare_data; "
              "print(json.dumps([prepare_data.main(json.loads(a)) for a in sys.argv[1:]]))")
    flags = ["--encodec_weights", "random", "--device", "cpu", "--min_seconds", str(MIN_SECONDS)]
    runs = [["--audio_dir", str(locked), "--out_dir", str(tmp_path / "c1"), *flags],
            ["--audio_dir", str(audio_dir), "--out_dir", str(tmp_path / "c2"), *flags]]
    command = [sys.executable, "-c", script, *map(json.dumps, runs)]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        for folder in (locked, audio_dir / "private"):
            folder.chmod(0o755)
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "warning", "Traceback"))]
    assert json.loads(result.stdout.splitlines()[-1]) == [2, 0], result.stderr
    assert lines == [f"error: cannot read {locked}: Permission denied",
                     f"warning: cannot read {audio_dir / 'private'}: Permission denied; the files in it are skipped"]
    assert [t["source"] for t in data.read_manifest(tmp_path / "c2")["tracks"]] == ["t0.wav"]
