"""Damaged cache files: found before training by their CRC-32 (once per machine, remembered by identity), and
repaired by `prepare_data.py --verify`, whose result must equal the cache before the damage, byte for byte.

The damage is the issue's: 4 KB overwritten in the middle of a track's latents, size and mtime kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from music_continuation.codec import SAMPLE_RATE
from music_continuation.data import cache as data
from music_continuation.data import integrity
from music_continuation.data import prepare as prepare_data

pytestmark = pytest.mark.usefixtures("reuse_random_codec")    # conftest: one random codec


def damage(path: Path, content: bytes) -> None:
    """Overwrite the middle of `path` with `content`, keeping its size and modification time."""
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(stat.st_size // 2)
        file.write(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture
def cache(tmp_path) -> Path:
    """A compact cache of three 1.5 s tracks, from files kept in tmp_path/audio."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    for number in range(3):
        soundfile.write(audio_dir / f"t{number}.wav", (0.4 * np.sin(2 * np.pi * (200 + 90 * number) * t)).astype(
            np.float32), SAMPLE_RATE)
    prepare_data.prepare(audio_dir, tmp_path / "cache", encodec_weights="random", device="cpu", min_seconds=0.5,
                         workers=1, progress=False, val_fraction=0.34)
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def reuse_random_codec_in_the_launcher(monkeypatch):
    from music_continuation.training import launcher
    monkeypatch.setattr(launcher, "load_codec", prepare_data.load_codec)      # conftest's reused random codec


def launcher_check(cache: Path, capsys) -> tuple[int, str]:
    """The trainer's start-up check of --data_dir, as `train_simple_ddp.py --data_dir CACHE` runs it."""
    from music_continuation.training import launcher
    parser = launcher.build_parser()
    args = parser.parse_args(["--data_dir", str(cache), "--segment_frames", "8", "--batch_size", "1", "--nproc", "1"])
    try:
        launcher.check_data_and_codec(args, parser)
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_damage_that_keeps_size_and_mtime_is_refused_before_training(cache, capsys):
    manifest = data.read_manifest(cache)
    track = next(t for t in manifest["tracks"] if t["split"] == "train")
    latents = data.track_paths(cache, track["id"])[0]
    damage(latents, bytes(4096))                                  # zeros: finite values, trained on silently before
    code, err = launcher_check(cache, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --data_dir: 1 cache file(s) do not match what was written: {latents} "
                               f"({track['source']}: its CRC-32 differs")
    assert lines[0].endswith(f"repair them with `python prepare_data.py --verify {cache}`")


def test_a_verified_file_is_read_once_per_machine(cache, monkeypatch, capsys):
    reads = []
    real = integrity.crc32_of
    monkeypatch.setattr(integrity, "crc32_of", lambda path: reads.append(Path(path).name) or real(path))
    assert launcher_check(cache, capsys)[0] == 0
    assert len(reads) == 9                                        # 3 tracks x (latents, audio, stats)
    reads.clear()
    assert launcher_check(cache, capsys)[0] == 0 and reads == []  # remembered: nothing read again
    audio = data.track_paths(cache, data.read_manifest(cache)["tracks"][0]["id"])[1]
    stat = audio.stat()
    os.utime(audio, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))   # touched: read again (and intact)
    assert launcher_check(cache, capsys)[0] == 0 and reads == [audio.name]


def test_verify_repairs_the_damaged_tracks_as_a_resume_would(cache, tmp_path, capsys):
    intact = {path.name: path.read_bytes() for path in (cache / "tracks").iterdir()}
    manifest_before = data.read_manifest(cache)
    assert prepare_data.main(["--verify", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cache}: 9 files of 3 tracks verified (") and out.rstrip().endswith("intact")

    tracks = manifest_before["tracks"]
    damage(data.track_paths(cache, tracks[0]["id"])[0], np.full(2048, np.nan, np.float16).tobytes())
    damage(data.track_paths(cache, tracks[2]["id"])[1], os.urandom(4096))
    assert prepare_data.main(["--verify", str(cache)]) == 0
    captured = capsys.readouterr()
    damaged = [line for line in captured.err.splitlines() if line.startswith("warning: damaged: ")]
    assert len(damaged) == 2 and tracks[0]["source"] in damaged[0] and tracks[2]["source"] in damaged[1]
    assert f"{cache}: 2 damaged file(s) of 9; re-encoded 2 track(s)" in captured.out
    assert {path.name: path.read_bytes() for path in (cache / "tracks").iterdir()} == intact
    assert [t["id"] for t in data.read_manifest(cache)["tracks"]] == [t["id"] for t in tracks]
    assert prepare_data.main(["--verify", str(cache)]) == 0 and "intact" in capsys.readouterr().out

    shutil.rmtree(tmp_path / "audio")                             # nothing to repair from: one line, non-zero
    damage(data.track_paths(cache, tracks[1]["id"])[0], bytes(4096))
    assert prepare_data.main(["--verify", str(cache)]) == 2
    assert f"error: --audio_dir {tmp_path / 'audio'}: no such directory" in capsys.readouterr().err


def test_verify_takes_no_preparation_flags(cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--verify", str(cache), "--seed", "3"])
    assert exit_info.value.code == 2
    assert "--verify takes only --device and --workers" in capsys.readouterr().err
