"""Bad bytes in the cache that got past the start-up check (the file was verified on this machine before it was
damaged in place): the step is skipped on every rank with one warning naming the data, and an epoch that trained
on nothing fails with one line instead of printing `nan` and exiting 0 (the issue's measured case).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from music_continuation.data import cache as data
from music_continuation.data.integrity import check_cache_files
from music_continuation.training import report as training_report
from music_continuation.training import step as training_step
from music_continuation.training import worker
from tests.training.test_training import TINY, run_launcher, sqlite_uri


def nan_inside(path: Path, count: int = 4096) -> None:
    """float16 NaN over `count` bytes in the middle of the file, size and modification time kept."""
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(stat.st_size // 2)
        file.write(np.full(count // 2, np.nan, np.float16).tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_an_epoch_of_skipped_steps_fails_and_names_the_data(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("references"))
    manifest = data.read_manifest(cache)
    check_cache_files(cache, manifest, progress=False)          # verified once on this machine, then damaged
    train = [track for track in manifest["tracks"] if track["split"] == "train"]
    for track in train:
        nan_inside(data.track_paths(cache, track["id"])[0])
    result = run_launcher(["--data_dir", cache, "--nproc", 2, "--batch_size", 2, "--epochs", 1, "--target_audio",
                           "original", "--checkpoint_dir", tmp_path / "ck", "--mlflow_tracking_uri",
                           sqlite_uri(tmp_path)] + TINY, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "nan" not in result.stdout.lower() and "Epoch 1/1" not in result.stdout
    warnings = [line for line in result.stderr.splitlines() if " skipped on every rank: " in line]
    steps = [line.split(" skipped on every rank")[0] for line in warnings]
    assert len(steps) == len(set(steps)), warnings                 # one warning per skipped step, whichever rank
    assert warnings and all(any(track["id"] in line and track["source"] in line for track in train)
                            and ".latents.npy" in line and "window at frame" in line for line in warnings)
    assert "epoch 1: all " in result.stderr and " steps were skipped (the warnings above name the data)" \
        in result.stderr


def test_the_epoch_block_never_prints_nan():
    figures = dict.fromkeys(training_step.METRIC_NAMES, 0.5)
    block = training_report.format_epoch_block(1, 2, figures, dict.fromkeys(training_step.METRIC_NAMES, float("nan")),
                                               1e-4)
    assert "nan" not in block and "Val Loss:   n/a (rms_in: n/a" in block
    assert "Train Loss: 0.5000 (rms_in: 0.5000" in block


def test_an_epoch_without_a_trained_step_or_with_a_non_finite_figure_is_an_error():
    figures = {**dict.fromkeys(training_step.METRIC_NAMES, 0.5), "skipped_steps": 2}
    worker.check_trained(figures, 1, 3)
    with pytest.raises(worker.TrainingError, match="epoch 1: all 3 steps were skipped"):
        worker.check_trained({**figures, "skipped_steps": 3}, 1, 3)
    with pytest.raises(worker.TrainingError, match="epoch 2: the training figures loss are not finite"):
        worker.check_trained({**figures, "loss": float("inf")}, 2, 3)
