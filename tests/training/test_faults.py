"""Faults a user meets around a training run: every one ends in one line that says what
happened, with a non-zero exit, and leaves no process behind.

One run per checkpoint folder (a lock) and per new sqlite MLflow store at once; a lost peer under torchrun;
no orphaned DataLoader worker after an early rank failure; a broken cache file found at start; a checkpoint
folder that cannot be written; start-up errors of the trainer and inference_sample.py in one line; samples an
MLflow failure kept from being uploaded. Runs are real launcher / torchrun subprocesses on the tiny demo cache.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import fault_trials
from music_continuation.data.cache import read_manifest, track_paths
from music_continuation.training.checkpoint import LOCK_NAME, CheckpointError, load_checkpoint, lock_checkpoint_dir
from tests.fault_launcher import FAULT_LAUNCHER, fault_environment
from tests.training.test_reliability import TINY_SIZES, copy_cache, sqlite_uri
from tests.training.test_training import ROOT, RUN_TIMEOUT, TINY, run_launcher

pytestmark = pytest.mark.slow     # every test here starts a launch, a server, torchrun or Slurm


def launcher_command(tiny_cache, folder: Path, *extra, script: Path = ROOT / "train_simple_ddp.py") -> list[str]:
    return [sys.executable, str(script), "--data_dir", str(tiny_cache), "--nproc", "2",
            "--batch_size", "2", "--checkpoint_dir", str(folder / "ck"), "--mlflow_tracking_uri",
            sqlite_uri(folder)] + [str(a) for a in TINY_SIZES] + [str(a) for a in extra]


def clean_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **extra}


def kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


# ---------------------------------------------------------------------------------- one run per folder

def test_a_second_training_on_the_same_checkpoint_dir_is_refused_naming_the_holder(tiny_cache, tmp_path):
    first = subprocess.Popen(launcher_command(tiny_cache, tmp_path, "--epochs", 50, script=FAULT_LAUNCHER),
                             cwd=tmp_path, env=fault_environment("slow=0.2", clean_env()), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock_file = tmp_path / "ck" / LOCK_NAME
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (lock_file.exists() and lock_file.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = subprocess.run(launcher_command(tiny_cache, tmp_path, "--epochs", 1), cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: --checkpoint_dir {tmp_path / 'ck'} is in use by another training "
                                         f"run (pid {first.pid}); wait for it to end, or pass another --checkpoint_dir")
        assert first.poll() is None                       # the first run goes on
    finally:
        kill_group(first.pid)                             # kill -9: the kernel releases the lock
        first.wait()
    lock_checkpoint_dir(tmp_path / "ck").close()          # free again: a crashed run never blocks the next


def test_runs_creating_one_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Without the store lock, two of two such starts failed in alembic's migration ('table ... exists')."""
    script = ("import sys; from music_continuation.training.mlflow_logger import MlflowLogger; "
              "print(MlflowLogger(sys.argv[1], 'race').run_id)")
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    starts = [subprocess.Popen([sys.executable, "-c", script, uri], cwd=tmp_path, env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(process.wait(timeout=RUN_TIMEOUT), process.communicate()) for process in starts]
    assert all(code == 0 for code, _ in results), [err[-1500:] for _, (_, err) in results]
    from mlflow.tracking import MlflowClient
    experiment = MlflowClient(uri).get_experiment_by_name("race")
    assert len(MlflowClient(uri).search_runs([experiment.experiment_id])) == 3


# ------------------------------------------------------------------------------- unusable folders

@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (root only; chmod does not stop root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_an_unusable_checkpoint_dir_is_refused_before_training(tiny_cache, tmp_path, read_only_folder):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {a_file: f"error: --checkpoint_dir {a_file}: is a file, not a folder",
             read_only_folder / "ck": f"error: --checkpoint_dir {read_only_folder / 'ck'}: cannot write there "
                                      f"({os.strerror(30)})"}
    for folder, expected in cases.items():
        result = run_launcher(["--data_dir", tiny_cache, "--checkpoint_dir", folder, "--epochs", 1,
                               "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"] + TINY, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip() == expected, result.stderr[-3000:]
        assert not (tmp_path / "mlflow.db").exists()            # refused before anything ran


# ---------------------------------------------------------------------------------- broken cache file

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_broken_cache_file_is_one_line_at_start(tiny_cache, tmp_path, damage):
    cache = copy_cache(tiny_cache, tmp_path)
    track = [t for t in read_manifest(cache)["tracks"] if t["split"] == "train"][-1]
    broken = track_paths(cache, track["id"])[1]                # the audio array, read only by the loaders
    if damage == "truncate":
        broken.write_bytes(broken.read_bytes()[:-320])
    else:
        broken.unlink()
    result = run_launcher(["--data_dir", cache, "--checkpoint_dir", tmp_path / "ck", "--epochs", 1,
                           "--mlflow_tracking_uri", sqlite_uri(tmp_path)] + TINY, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --data_dir: {broken}: ") and "prepare_data.py" in lines[0]
    assert "Error:" not in lines[0]                              # no exception class inside the message
    assert not (tmp_path / "ck" / "latest.pt").exists()


# ------------------------------------------------------------------------- lost peer, no orphans

# bench/fault_trials.py repeats these as often as asked and counts the correct endings (docs/troubleshooting.md)


def test_a_rank_killed_under_torchrun_is_named_once_by_the_survivor(tiny_cache, tmp_path):
    """kill -9 of rank 1 after epoch 2: rank 0 says rank 1 was lost (not that it failed itself) and names
    latest.pt with its epoch, exit non-zero, no traceback or DataLoader / gloo / sqlalchemy noise."""
    ok, detail = fault_trials.torchrun_kill_trial(str(tiny_cache), tmp_path)
    assert ok, detail + "\n" + (tmp_path / "stderr.txt").read_text()[-4000:]


def test_a_sigchld_caught_with_the_sigterm_prints_nothing():
    """torchrun's SIGTERM and the SIGCHLD of a dying DataLoader worker can be pending together; Python then runs
    the SIGTERM handler first (lower number), which replaces the DataLoader's SIGCHLD handler. Replacing it by
    SIG_DFL printed 'OSError: Signal 17 ignored due to race condition' with a traceback (1 of 5 kill trials)."""
    script = """
import os, signal
from music_continuation.training.worker import expect_worker_deaths
signal.signal(signal.SIGCHLD, lambda signum, frame: None)          # the DataLoader's handler
signal.signal(signal.SIGTERM, lambda signum, frame: expect_worker_deaths())
both = {signal.SIGCHLD, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, both)
os.kill(os.getpid(), signal.SIGCHLD)
os.kill(os.getpid(), signal.SIGTERM)
signal.pthread_sigmask(signal.SIG_UNBLOCK, both)                    # both handled now, SIGTERM first
print("handled")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "handled", result.stderr[-2000:]
    assert result.stderr == "", result.stderr


def test_an_early_rank_failure_leaves_no_process_behind(tiny_cache, tmp_path):
    """Rank 1 fails at its first step, while its DataLoader workers (2 per loader) are still starting."""
    ok, detail = fault_trials.orphan_trial(str(tiny_cache), tmp_path)
    assert ok, detail + "\n" + (tmp_path / "stderr.txt").read_text()[-4000:]


def test_samples_kept_from_mlflow_by_a_logging_failure_are_named_at_the_end(tmp_path, capsys):
    import types

    from music_continuation.training import report as training_report

    class Logger:
        def __init__(self):
            self.uploaded, self.finished = [], None

        def log_artifacts(self, folder, artifact_path):
            self.uploaded.append(artifact_path)

        def finish(self, status):
            self.finished = status
    logger = Logger()
    reporter = training_report.Reporter(types.SimpleNamespace(args=types.SimpleNamespace(checkpoint_dir=tmp_path)),
                                        logger)
    for epoch, sent in ((10, False), (20, True), (30, False)):      # sent: that epoch's metrics reached MLflow
        reporter.samples(epoch, tmp_path / "samples" / f"epoch_{epoch:04d}", sent)
    reporter.close("FINISHED")
    assert logger.uploaded == ["samples/epoch_0020"] and logger.finished == "FINISHED"
    assert capsys.readouterr().err.strip() == (
        f"warning: the samples of epoch(s) 10, 30 were not uploaded to MLflow (their metric logging failed); "
        f"they stay in {tmp_path / 'samples'}")


# -------------------------------------------------------------------------------- one line means one

def test_start_up_errors_of_the_trainer_are_one_line(tmp_path):
    result = run_launcher(["--epochs", 0], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "error: --epochs must be at least 1, got 0"


def test_start_up_errors_of_inference_are_one_line(tmp_path):
    missing = tmp_path / "missing.wav"
    command = [sys.executable, str(ROOT / "inference_sample.py"), "--checkpoint", str(tmp_path / "x.pt"),
               "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(command + ["--input", str(missing)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert result.returncode == 2 and result.stderr.strip() == f"error: --input {missing}: no such file"
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: one of the arguments --input --from_cache is required"]


def test_checkpoint_files_that_are_not_checkpoints_say_what_they_are(tiny_cache, tmp_path):
    from music_continuation.training.checkpoint import save_checkpoint
    text = tmp_path / "notes.txt"
    text.write_text("epoch 3 looked good\n")
    good = tmp_path / "latest.pt"
    save_checkpoint(good, {"model": {}, "epoch": 1})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(text)
    assert str(error.value) == (f"{text}: not a checkpoint (not a file written by torch.save); "
                                f"pass the latest.pt or best.pt of a training run")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(truncated)
    assert str(error.value).startswith(f"{truncated}: truncated or damaged checkpoint "
                                       f"({truncated.stat().st_size} bytes")
    for bad in (text, truncated):         # the trainer says the same in one line
        result = run_launcher(["--data_dir", tiny_cache, "--resume", bad, "--epochs", 1,
                               "--checkpoint_dir", tmp_path / "ck"] + TINY, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: --resume: {bad}: ")


def test_error_lines_carry_no_exception_class():
    from music_continuation.training import worker as train_simple_worker
    from music_continuation.utils import one_line
    worker_error = RuntimeError("Caught CacheError in DataLoader worker process 0.\nOriginal Traceback (most "
                                "recent call last):\n  File \"x.py\", line 1\ndata.CacheError: /c/a.npy: cannot open")
    assert train_simple_worker.error_line(worker_error) == "/c/a.npy: cannot open"
    missing = FileNotFoundError(2, "No such file or directory", "/c/a.npy")
    assert one_line(missing) == "/c/a.npy: No such file or directory"
