"""Preparation of messy folders: progress costs a line per file, the output is one summary line, a resume reads no
skipped file again, and a WAV/FLAC/AIFF too short is skipped from its header without being decoded.

The reference for "linear" is the file count: bytes written per file must not grow with the number of files (the
progress file rewritten after every file made them grow in proportion).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from music_continuation.codec import SAMPLE_RATE
from music_continuation.data import cache as data
from music_continuation.data import encode as encoding
from music_continuation.data import prepare as prepare_data
from music_continuation.data.journal import read_journal, read_skipped

pytestmark = pytest.mark.usefixtures("reuse_random_codec")    # conftest: one random codec
MIN_SECONDS = 0.5
SETTINGS = dict(encodec_weights="random", device="cpu", min_seconds=MIN_SECONDS, workers=2, progress=False)


def sine(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def messy_folder(folder: Path, junk: int, short: int) -> Path:
    """One usable track, `junk` files of random bytes named .wav and `short` WAV clips of 0.1 s."""
    folder.mkdir()
    soundfile.write(folder / "good.wav", sine(0.6), SAMPLE_RATE)
    rng = np.random.default_rng(0)
    for number in range(junk):
        (folder / f"junk{number:05d}.wav").write_bytes(rng.bytes(256))
    for number in range(short):
        soundfile.write(folder / f"short{number:05d}.wav", sine(0.1, 8000), 8000, subtype="PCM_16")
    return folder


def bytes_written() -> int:
    """Bytes this process has passed to write(2) so far (/proc/self/io wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/io")


def test_progress_costs_a_line_per_file_and_the_output_is_one_summary_line(tmp_path, capsys):
    per_file = {}
    for files in (100, 400):
        audio_dir = messy_folder(tmp_path / f"audio{files}", files // 2, files // 2)
        before = bytes_written()
        manifest = prepare_data.prepare(audio_dir, tmp_path / f"cache{files}", **SETTINGS)
        per_file[files] = (bytes_written() - before) / files
        assert [track["source"] for track in manifest["tracks"]] == ["good.wav"]
        assert manifest["skipped_files"] == {"too short": files // 2, "unreadable or not audio": files // 2}
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [f"skipped {files} of {files + 1} files: {files // 2} too short (< --min_seconds "
                         f"{MIN_SECONDS:g}), {files // 2} unreadable or not audio; each file and why: "
                         f"{tmp_path / f'cache{files}' / 'skipped.tsv'}; --verbose names each as it is skipped"]
        rows = read_skipped(tmp_path / f"cache{files}")
        assert len(rows) == files and all(row["source_size"] and row["source_mtime_ns"] for row in rows)
    # one good track's arrays are a fixed cost; a progress file rewritten per file made the 400-file run write
    # 2.7x more per file than the 100-file run (measured with it: 10.3 KB and 27.4 KB per file; now 1.0 and 0.5)
    assert per_file[400] < 1.3 * per_file[100], per_file


def test_the_journal_survives_a_torn_last_line(tmp_path):
    audio_dir = messy_folder(tmp_path / "audio", 3, 2)
    cache = tmp_path / "cache"
    prepare_data.prepare(audio_dir, cache, shard=(0, 2), **SETTINGS)      # leaves shard 0's journal unmerged
    journal = data.shard_progress_path(cache, 0, 2)
    recorded = read_journal(journal)
    assert recorded["complete"]
    with open(journal, "ab") as file:
        file.write(b'{"skipped": {"source": "half-writ')                   # a run killed in the middle of a line
    again = read_journal(journal)
    assert again["tracks"] == recorded["tracks"] and again["skipped"] == recorded["skipped"]
    assert prepare_data.prepare(audio_dir, cache, shard=(1, 2), **SETTINGS)["complete"]       # merges


def test_a_resume_reads_no_skipped_file_again(tmp_path, monkeypatch):
    audio_dir = messy_folder(tmp_path / "audio", 6, 6)
    cache = tmp_path / "cache"
    prepare_data.prepare(audio_dir, cache, **SETTINGS)
    opened = []
    real_open = encoding.open_audio

    def counting_open(path):
        opened.append(Path(path).name)
        return real_open(path)

    monkeypatch.setattr(encoding, "open_audio", counting_open)
    manifest = prepare_data.prepare(audio_dir, cache, **SETTINGS)
    assert opened == [] and sum(manifest["skipped_files"].values()) == 12 and len(manifest["tracks"]) == 1

    stat = os.stat(audio_dir / "junk00002.wav")                          # changed since: read again
    os.utime(audio_dir / "junk00002.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    prepare_data.prepare(audio_dir, cache, **SETTINGS)
    assert opened == ["junk00002.wav"]

    opened.clear()                        # a lower --min_seconds reads the clips that were too short, only them
    manifest = prepare_data.prepare(audio_dir, cache, **{**SETTINGS, "min_seconds": 0.05})
    assert sorted(opened) == [f"short{number:05d}.wav" for number in range(6)]
    assert len(manifest["tracks"]) == 7


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "AIFF"])
def test_a_short_file_of_exact_length_is_skipped_from_its_header(tmp_path, monkeypatch, fmt):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / f"clip.{fmt.lower()}", sine(0.3, 44_100), 44_100, format=fmt)
    soundfile.write(audio_dir / "good.wav", sine(0.6), SAMPLE_RATE)
    decoded = []
    real_blocks = encoding._source_blocks

    def counting_blocks(handle, path):
        decoded.append(Path(path).name)
        return real_blocks(handle, path)

    monkeypatch.setattr(encoding, "_source_blocks", counting_blocks)
    prepare_data.prepare(audio_dir, tmp_path / "cache", **SETTINGS)
    assert decoded == ["good.wav"]
    [row] = read_skipped(tmp_path / "cache")
    assert row["kind"] == "too short" and row["reason"].startswith("too short (0.29 s < --min_seconds 0.5")
