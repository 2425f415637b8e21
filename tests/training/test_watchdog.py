"""A stuck rank ends the job in one line within --stuck_timeout (plus a few seconds), not the process group's
timeout: SIGSTOP of one rank, under the built-in launcher and under torchrun (what Slurm's train.sbatch runs).
The heartbeat board and the choice of the stuck rank are tested on their own, without training."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fault_trials import group_members, rank_pid, spawned_ranks
from music_continuation.training import watchdog
from music_continuation.training.checkpoint import load_checkpoint
from music_continuation.training.mlflow_logger import read_run_record
from tests.fault_launcher import fault_environment
from tests.training.test_faults import clean_env, launcher_command
from tests.training.test_training import RUN_TIMEOUT, run_launcher

STUCK_TIMEOUT = 10         # seconds: above a loaded machine's longest step or MLflow write of the tiny runs
SLACK = 10                 # seconds the one line may come after the timeout: stacks, kills, the launcher's poll


def wait_for_epoch(process: subprocess.Popen, folder: Path, epoch: int = 1) -> int:
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        with contextlib.suppress(Exception):
            if load_checkpoint(folder / "latest.pt")["epoch"] >= epoch:
                return epoch
        time.sleep(0.2)


def expected_line(folder: Path, rank: int) -> re.Pattern:
    logs = folder / "logs"
    return re.compile(
        rf"error: rank {rank} made no progress for \d+ s at step \d+ \(its process is stopped\) on \S+ "
        rf"\(--stuck_timeout {STUCK_TIMEOUT}\); the job was stopped and every rank's Python stack is in "
        rf"{re.escape(str(logs / 'rank<R>.log'))} \(rank {rank}: {re.escape(str(logs / f'rank{rank}.log'))}\)\. "
        rf"latest checkpoint is {re.escape(str(folder / 'latest.pt'))}, epoch \d+; resume with --resume auto")


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_with_one_line_and_its_stack_then_resume_continues(tiny_cache, tmp_path):
    folder = tmp_path / "ck"
    command = launcher_command(tiny_cache, tmp_path, "--epochs", 50, "--stuck_timeout", STUCK_TIMEOUT)
    launcher = subprocess.Popen(command, cwd=tmp_path, env=fault_environment("slow=0.3", clean_env(), everywhere=True),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_epoch(launcher, folder)
        time.sleep(1.0)                                        # inside epoch 2's steps
        os.kill(spawned_ranks(launcher.pid)[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = launcher.communicate(timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - stopped
        left = group_members(launcher.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    print(f"SIGSTOP of rank 1 -> the launcher's last line and exit: {elapsed:.1f} s (--stuck_timeout {STUCK_TIMEOUT})")
    assert launcher.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected_line(folder, 1).fullmatch(errors[0]), stderr[-3000:]
    assert "Traceback" not in stderr
    assert elapsed < STUCK_TIMEOUT + SLACK, elapsed
    assert not left, left
    stack = (folder / "logs" / "rank1.log").read_text()
    assert "no progress on this host" in stack and 'File "' in stack and "train_one_epoch" in stack, stack[-3000:]
    assert "train_one_epoch" in (folder / "logs" / "rank0.log").read_text()   # rank 0 waits inside its step
    from mlflow.tracking import MlflowClient
    record = read_run_record(folder)
    assert MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).info.status == "FAILED"
    epoch = load_checkpoint(folder / "latest.pt")["epoch"]
    resumed = run_launcher(launcher_command(tiny_cache, tmp_path)[2:] + ["--epochs", epoch + 1, "--resume", "auto"],
                           cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch {epoch + 1}" in resumed.stdout


@pytest.mark.slow
def test_a_stopped_rank_under_torchrun_ends_the_job_with_one_line(tiny_cache, tmp_path):
    folder = tmp_path / "ck"
    flags = launcher_command(tiny_cache, tmp_path, "--epochs", 50, "--stuck_timeout", STUCK_TIMEOUT)[1:]
    at = flags.index("--nproc")
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
               *flags[:at], *flags[at + 2:]]
    agent = subprocess.Popen(command, cwd=tmp_path, env=fault_environment("slow=0.3", clean_env(), everywhere=True),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_epoch(agent, folder)
        time.sleep(1.0)
        os.kill(rank_pid(agent.pid, 1), signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = agent.communicate(timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - stopped
        left = group_members(agent.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
    print(f"torchrun: SIGSTOP of rank 1 -> torchrun's exit: {elapsed:.1f} s (--stuck_timeout {STUCK_TIMEOUT})")
    assert agent.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected_line(folder, 1).fullmatch(errors[0]), stderr[-3000:]
    assert elapsed < STUCK_TIMEOUT + SLACK, elapsed
    assert not left, left


# ----------------------------------------------------------------------------------- the board alone

@pytest.fixture
def board(monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_PORT", str(os.getpid()))
    monkeypatch.setenv("MASTER_ADDR", f"test-{tmp_path.name}")
    board = watchdog.Board(watchdog.board_path(3), 3)
    yield board
    board.remove()


def test_the_job_is_stuck_only_when_no_rank_of_the_host_progresses(board):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        board.write(0, watchdog.PHASES.index("step"), 7, first=False)
        board.map[watchdog.SLOT.size: 2 * watchdog.SLOT.size] = watchdog.SLOT.pack(
            time.monotonic() - 100, sleeper.pid, watchdog.PHASES.index("validation"), 7, 0)
        assert watchdog.stuck_slots(board, timeout=50) is None        # rank 0 beat just now
        time.sleep(0.01)
        assert set(watchdog.stuck_slots(board, timeout=0.001)) == {0, 1}
        # the start-up and the first step may take FIRST_STEP_FACTOR timeouts, at least START_UP_SECONDS
        board.write(0, watchdog.PHASES.index("step"), 1, first=True)
        time.sleep(0.01)
        assert watchdog.stuck_slots(board, timeout=0.001) is None
        assert watchdog.limit(600, watchdog.PHASES.index("step"), 1) == 1800
        assert watchdog.limit(10, watchdog.PHASES.index("references"), 1) == watchdog.START_UP_SECONDS
        assert watchdog.limit(10, watchdog.PHASES.index("validation"), 0) == 10
        board.write(0, watchdog.PHASES.index("step"), 7, first=False)
        time.sleep(0.01)
        os.kill(sleeper.pid, signal.SIGSTOP)                          # rank 1 beat last long ago and is stopped
        deadline = time.monotonic() + 5
        while watchdog.process_state(sleeper.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        slots = watchdog.stuck_slots(board, timeout=0.001)
        states = {rank: watchdog.process_state(slot[1]) for rank, slot in slots.items()}
        assert states[1] == "T" and set(slots) == {0, 1}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert set(watchdog.stuck_slots(board, timeout=0.001)) == {0}    # a dead rank is a lost one, not a stuck one


def test_the_process_group_timeout_is_longer_than_every_watchdog_limit():
    for timeout in (1.0, 600.0):
        longest = max(watchdog.limit(timeout, phase, first) for phase in range(len(watchdog.PHASES))
                      for first in (0, 1))
        assert watchdog.process_group_timeout(timeout) > longest


def test_stuck_timeout_is_checked_and_may_change_on_resume(capsys):
    from music_continuation.training import launcher
    parser = launcher.build_parser()
    assert parser.parse_args([]).stuck_timeout == watchdog.DEFAULT_STUCK_TIMEOUT
    with pytest.raises(SystemExit):
        launcher.check_flags(parser.parse_args(["--stuck_timeout", "0"]), parser)
    assert capsys.readouterr().err.strip() == "error: --stuck_timeout must be at least 1 (seconds), got 0.0"
    assert "stuck_timeout" in launcher.RESUME_MAY_CHANGE
