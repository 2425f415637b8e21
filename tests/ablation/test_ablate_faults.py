"""A study that dies takes its cells with it; a Slurm time limit too short for the checkpoint signal is refused;
the time-limit hook of a Slurm element waits for its stopped launcher.

kill -9 of ablate.py while a cell trains: the cell's launcher and ranks are gone within seconds (no process
holds the cell's folder for a re-run), and the MLflow run the cell leaves RUNNING is settled by its next
start (tests/training/test_process_faults.py)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from music_continuation.ablation import ablate, executors
from music_continuation.training.checkpoint import lock_checkpoint_dir
from music_continuation.training.mlflow_logger import RUN_RECORD
from tests.ablation.test_ablate import ROOT, TIMEOUT, TINY, environment
from tests.fault_launcher import fault_environment
from tests.training.test_training import sqlite_uri


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_kill_9_of_the_study_ends_its_running_cell(tiny_cache, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "target", "flags": {"loss_weight_target": 1.0}}]))
    out = tmp_path / "study"
    flags = [str(a) for a in TINY]
    flags[flags.index("--epochs") + 1] = "50"
    command = [sys.executable, str(ROOT / "ablate.py"), "--data_dir", str(tiny_cache), "--out_dir", str(out),
               "--grid", str(grid), "--seeds", "1", "--mlflow_tracking_uri", sqlite_uri(tmp_path), *flags]
    study = subprocess.Popen(command, cwd=tmp_path, env=fault_environment("slow=0.2", environment(), everywhere=True),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cell = out / "target" / "seed0"
    launcher = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (cell / RUN_RECORD).is_file():          # the cell's MLflow run exists: it is training
            assert study.poll() is None and time.monotonic() < deadline, study.communicate()[1][-3000:]
            time.sleep(0.2)
        launcher = int((cell / ".training.lock").read_text())
        study.kill()
        study.wait()
        killed = time.monotonic()
        while group_alive(launcher) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        gone_after = time.monotonic() - killed
    finally:
        study.kill()
        if launcher is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher, signal.SIGKILL)
    print(f"kill -9 of ablate.py -> its cell's process group gone after {gone_after:.2f} s")
    assert gone_after < 5, gone_after
    lock_checkpoint_dir(cell).close()                     # free: a re-run can train the cell at once


def test_a_slurm_time_limit_too_short_for_the_checkpoint_signal_is_one_line():
    parser = ablate.build_parser()
    args = parser.parse_args(["--out_dir", "x", "--executor", "slurm", "--slurm_time", "2"])
    with pytest.raises(ablate.AblateError) as error:
        ablate.slurm_settings(args)
    assert str(error.value) == (
        "--slurm_time 2 is too short: submitit's checkpoint-and-requeue signal comes 30 s before the limit and "
        "Slurm may send it up to 60 s earlier, so a cell would be requeued before it saves an epoch; give at "
        "least 3 minutes")


@pytest.mark.parametrize("time_limit, delay", [("3", 45), ("00:06:00", 90), ("60", 120), ("1-00:00", 120)])
def test_the_checkpoint_signal_comes_a_quarter_of_a_short_limit_early(time_limit, delay):
    settings = executors.SlurmSettings(time=time_limit)
    settings.check_time()
    assert settings.signal_delay_seconds == delay


def test_the_stuck_timeout_is_not_part_of_a_cells_identity(tmp_path):
    """It changes when a stuck job is ended, not what a run computes: studies keep their hashes."""
    grid = [{"name": "a", "flags": {}}]
    cells = [ablate.build_cells(grid, shared, 1, tmp_path)[0] for shared in ({}, {"stuck_timeout": 60.0})]
    assert "stuck_timeout" not in cells[0].settings and cells[0].hash == cells[1].hash


# A launcher that stops like a rank on SIGTERM: it finishes its step (a moment), says where it stopped, exits 143.
STOPPING_LAUNCHER = """
import signal, sys, time
def stop(*_):
    time.sleep(1)
    print("interrupted: latest checkpoint is epoch 1", file=sys.stderr, flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(120)
"""


def test_the_time_limit_hook_waits_for_the_stopped_launcher_before_submitit_requeues(tmp_path, monkeypatch):
    """A Slurm element's task (CellJob.__call__ as submitit runs it) gets submitit's USR2: submitit's handler calls
    CellJob.checkpoint, then requeues and exits at once. By then the launcher must have stopped and its last line
    be in the cell's log (with nothing waiting, it would go to a closed pipe)."""
    for name, value in (("SUBMITIT_EXECUTOR", "slurm"), ("SLURM_JOB_ID", "7"), ("SLURM_NODEID", "0"),
                        ("SLURM_JOB_NUM_NODES", "1"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"),
                        ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(name, value)
    log = tmp_path / "train.log"
    job = executors.CellJob(["-m", "unused"], 1, str(log))
    monkeypatch.setattr(job, "torchrun_command", lambda: [sys.executable, "-c", STOPPING_LAUNCHER])
    requeued = []

    def submitit_handler(signum, frame):      # submitit's checkpoint_and_try_requeue, less the scontrol call
        requeued.append(job.checkpoint())
        raise SystemExit(-1)

    def send_usr2_once_training():
        deadline = time.monotonic() + TIMEOUT
        while not (log.is_file() and "training" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    sender = threading.Thread(target=send_usr2_once_training, daemon=True)
    try:
        sender.start()
        with pytest.raises(SystemExit):
            job()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert "interrupted: latest checkpoint is epoch 1" in log.read_text(), log.read_text()
    fresh = requeued[0].function
    assert isinstance(fresh, executors.CellJob) and fresh.process is None and fresh.log_path == str(log)
