"""Processes that die without a word: rank 0 SIGKILLed (its MLflow run must not stay RUNNING, the line must say
how to resume), a run killed before its first checkpoint (the next start settles its MLflow run), and the
resume line for a shorter --epochs."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import pytest

from bench.fault_trials import group_members, spawned_ranks
from music_continuation.training.launcher import epochs_note
from music_continuation.training.mlflow_logger import RUN_RECORD, MlflowLogger, close_recorded_run, read_run_record
from tests.fault_launcher import fault_environment
from tests.training.test_faults import clean_env, launcher_command
from tests.training.test_training import RUN_TIMEOUT, sqlite_uri
from tests.training.test_watchdog import wait_for_epoch


@pytest.mark.slow
def test_rank_0_killed_is_one_line_with_the_resume_hint_and_its_mlflow_run_is_closed(tiny_cache, tmp_path):
    from mlflow.tracking import MlflowClient
    folder = tmp_path / "ck"
    launcher = subprocess.Popen(launcher_command(tiny_cache, tmp_path, "--epochs", 50), cwd=tmp_path,
                                env=fault_environment("slow=0.2", clean_env(), everywhere=True), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_epoch(launcher, folder)
        victim = spawned_ranks(launcher.pid)[0]
        os.kill(victim, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=RUN_TIMEOUT)
        left = group_members(launcher.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    prefix = (f"error: rank 0 (pid {victim}) was lost (SIGKILL): killed, or out of memory (see the system log); "
              f"rank 1 stopped too. latest checkpoint is {folder / 'latest.pt'}, epoch ")
    assert len(errors) == 1 and errors[0].startswith(prefix) and errors[0].endswith("; resume with --resume auto"), \
        stderr[-3000:]
    assert not left, left
    record = read_run_record(folder)
    assert MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).info.status == "FAILED"


@pytest.mark.slow
def test_a_killed_run_is_marked_killed_at_the_next_start_or_continued_by_resume_auto(tmp_path, capsys):
    """MLflow keeps a killed process's run RUNNING; the folder's record lets the next start settle it."""
    uri = sqlite_uri(tmp_path)
    folder = tmp_path / "ck"
    folder.mkdir()
    killed = MlflowLogger(uri, "records", checkpoint_dir=folder)          # then "killed": never finished
    assert read_run_record(folder)["run_id"] == killed.run_id
    fresh = MlflowLogger(uri, "records", checkpoint_dir=folder)           # a new run in the same folder
    assert fresh.client.get_run(killed.run_id).info.status == "KILLED" and fresh.run_id != killed.run_id
    assert capsys.readouterr().err.strip() == (
        f"warning: MLflow run {killed.run_id} of an earlier training in {folder} was left RUNNING (its process "
        f"was killed); marked KILLED")
    requeued = MlflowLogger(uri, "records", checkpoint_dir=folder, continue_recorded=True)   # --resume auto
    assert requeued.run_id == fresh.run_id and requeued.resumed
    assert requeued.client.get_run(fresh.run_id).info.status == "RUNNING"
    close_recorded_run(folder, "FAILED")                                  # the launcher, after rank 0 was lost
    assert requeued.client.get_run(fresh.run_id).info.status == "FAILED"
    requeued.finish("FINISHED")
    again = MlflowLogger(uri, "records", checkpoint_dir=folder, continue_recorded=True)  # finished: a new run
    assert again.run_id != fresh.run_id and (folder / RUN_RECORD).is_file()


def test_resume_says_what_a_changed_epoch_count_does_to_the_schedule():
    assert epochs_note([2, 3]) == " (the LR schedule keeps its length; added epochs run at lr/10)"
    assert epochs_note([10, 4]) == (" (the LR schedule keeps its length of 10 epochs: training stops at epoch 4, "
                                    "before the LR has decayed to lr/10)")
    assert "added epochs" not in epochs_note([10, 4]) and epochs_note(None) == ""



@pytest.mark.slow      # the random codec's decoder on 3 windows: seconds on an idle machine, a minute on a busy one
def test_the_step_0_baselines_say_how_far_they_are(tiny_cache, monkeypatch, capsys):
    """A long start-up (the baselines over every validation window) prints progress on rank 0."""
    import types

    import torch
    from torch.utils.data import DataLoader

    from music_continuation.codec import FrozenDecoder, load_codec
    from music_continuation.data.cache import ContinuationDataset, LatentNormalizer
    from music_continuation.losses.audio import CombinedLoss
    from music_continuation.training import step as training_step
    from music_continuation.training import worker
    dataset = ContinuationDataset(tiny_cache, "val", 8)
    val_set = torch.utils.data.Subset(dataset, range(3))        # 3 windows in 2 batches: 2 progress lines
    ctx = types.SimpleNamespace(
        rank=0, world_size=1, device=torch.device("cpu"), autocast=training_step.autocast_for(torch.device("cpu")),
        val_set=val_set, val_loader=DataLoader(val_set, batch_size=2), val_indices=list(range(len(val_set))),
        decoder=FrozenDecoder(load_codec("random")), normalizer=LatentNormalizer(dataset.latent_mean,
                                                                                  dataset.latent_std),
        loss_fn=CombinedLoss(rms_target=1.0), listeners=None, args=types.SimpleNamespace(target_audio="original"))
    monkeypatch.setattr(worker, "BASELINE_PROGRESS_SECONDS", -1.0)      # every batch, instead of every 10 s
    assert worker.baseline_figures(ctx) is not None
    lines = capsys.readouterr().err.strip().splitlines()
    windows = len(val_set)
    assert lines[-1].startswith(f"  step-0 baselines (silence, repeat, oracle; once per run): {windows}/{windows} "
                                f"validation windows, ") and len(lines) == 2
