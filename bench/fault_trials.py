"""Repeat two faults of a training run and count the trials that end correctly.

    python bench/fault_trials.py --data_dir CACHE [--trials 5] [--which torchrun,orphans] [--work DIR]

Both run the launcher through tests/fault_launcher.py, which slows the steps or fails a rank (TEST_FAULTS).
torchrun: `torchrun --standalone --nproc_per_node 2 tests/fault_launcher.py ...`, kill -9 of rank 1 once latest.pt
    holds epoch 2. Correct: exit non-zero; exactly one `error:` line, which names rank 1 as lost and names
    latest.pt with the epoch it holds; no traceback through this project's code, no DataLoader / gloo /
    sqlalchemy noise (torchrun's own report may follow).
orphans: the built-in launcher, 2 ranks x 2 DataLoader workers, rank 1 fails at its first step (workers still
    starting). Correct: exit 1, one `error:` line, and no process of the job alive once the launcher has exited.
stuck: the built-in launcher, 2 ranks, `--stuck_timeout 10`; SIGSTOP of rank 1 in epoch 2. Correct: exit 1, one
    `error:` line naming rank 1 as stuck and latest.pt, no process left; the trial's figure is the time from the
    SIGSTOP to the launcher's exit.
Prints one line per trial, then `torchrun kill: K of N correct` / `orphans: K of N clean` / `stuck: K of N
correct`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULT_LAUNCHER = ROOT / "tests" / "fault_launcher.py"     # the launcher with faults injected (TEST_FAULTS)

TINY = ["--segment_frames", "8", "--d_model", "32", "--num_layers", "1", "--num_heads", "2", "--warmup_steps", "2",
        "--lr", "1e-3", "--log_audio_every", "0", "--batch_size", "2", "--num_workers", "2"]
NOISE = ("Traceback", "DataLoader worker", "Connection reset", "sqlalchemy", "Exception ignored")
TIMEOUT = 600.0


def environment(faults: str | None = None) -> dict:
    """This process's environment without a rendezvous or tracking URI of its own; with `faults`, what
    tests/fault_launcher.py reads (TEST_FAULTS), and the checkout on PYTHONPATH for it."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if faults is not None:
        paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env.update(TEST_FAULTS=faults, PYTHONPATH=os.pathsep.join(paths))
    return env


def proc_stat(pid) -> list[str]:
    """Fields after the command name of /proc/PID/stat: state, ppid, pgrp, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def group_members(group: int) -> list[str]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = proc_stat(entry.name)
                command = entry.joinpath("cmdline").read_bytes()
                # a process that is exiting has released its memory (an empty cmdline) before it becomes a zombie
                if int(fields[2]) == group and fields[0] != "Z" and command:
                    members.append(entry.name + " " + command.replace(b"\0", b" ").decode(errors="replace")[:160])
    return members


def rank_pid(agent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the agent's children."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(proc_stat(entry.name)[1]) == agent and \
                        f"RANK={rank}".encode() in entry.joinpath("environ").read_bytes().split(b"\0"):
                    return int(entry.name)
    return None


def reached_epoch(process: subprocess.Popen, folder: Path, epoch: int) -> bool:
    """Wait until FOLDER/latest.pt holds `epoch` (True), or the process ends or TIMEOUT passes (False)."""
    deadline = time.monotonic() + TIMEOUT
    while (latest_epoch(folder) or 0) < epoch:
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def latest_epoch(folder: Path) -> int | None:
    from music_continuation.training.checkpoint import CheckpointError, load_checkpoint
    try:
        return load_checkpoint(folder / "latest.pt")["epoch"]
    except CheckpointError:
        return None


def own_lines(stderr: str) -> str:
    """stderr up to torchrun's own failure report."""
    cut = [index for index in (stderr.find("torch.distributed.elastic"), stderr.find("Traceback (most recent call "
                                                                                   "last):\n  File \"" +
                                                                                   str(Path(sys.executable).parent)))
           if index >= 0]
    return stderr[: min(cut)] if cut else stderr


def torchrun_kill_trial(data_dir: str, work: Path, kill_after_epoch: int = 2) -> tuple[bool, str]:
    folder = work / "ck"
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
               str(FAULT_LAUNCHER), "--data_dir", data_dir, "--epochs", "50",
               "--checkpoint_dir", str(folder), "--mlflow_tracking_uri", f"sqlite:///{work / 'mlflow.db'}"] + TINY
    agent = subprocess.Popen(command, cwd=work, env=environment("slow=0.1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not reached_epoch(agent, folder, kill_after_epoch):
            return False, f"did not reach epoch {kill_after_epoch}: " + agent.communicate()[1][-2000:]
        victim = rank_pid(agent.pid, 1)
        os.kill(victim, signal.SIGKILL)
        _, stderr = agent.communicate(timeout=TIMEOUT)
        left = group_members(agent.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
    (work / "stderr.txt").write_text(stderr)
    epoch = latest_epoch(folder)
    ours = own_lines(stderr)
    errors = [line for line in ours.splitlines() if line.startswith(("error:", "interrupted:"))]
    expected = (f"error: rank 1 (pid {victim}) was lost: killed, or out of memory (see the system log); rank 0 "
                f"stopped too. latest checkpoint is {folder / 'latest.pt'}, epoch {epoch}; resume with --resume auto")
    problems = []
    if agent.returncode == 0:
        problems.append("exit 0")
    if errors != [expected]:
        problems.append(f"lines {errors}")
    problems += [f"noise {word!r}" for word in NOISE if word in ours]
    if any(line.strip().startswith(f'File "{ROOT}/') and "/.venv/" not in line for line in stderr.splitlines()):
        problems.append("a traceback through our code")
    if left:
        problems.append(f"left {left}")
    return not problems, "; ".join(problems) or f"exit {agent.returncode}, {errors[0]}"


def orphan_trial(data_dir: str, work: Path, fail_step: int = 0) -> tuple[bool, str]:
    command = [sys.executable, str(FAULT_LAUNCHER), "--data_dir", data_dir, "--nproc", "2",
               "--epochs", "2", "--checkpoint_dir", str(work / "ck"),
               "--mlflow_tracking_uri", f"sqlite:///{work / 'mlflow.db'}"] + TINY
    launcher = subprocess.Popen(command, cwd=work, env=environment(f"fail=1:{fail_step}"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=TIMEOUT)
        left = group_members(launcher.pid)
        deadline = time.monotonic() + 2.0        # the resource tracker exits a moment after the launcher
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = group_members(launcher.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    (work / "stderr.txt").write_text(stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    problems = [] if launcher.returncode == 1 else [f"exit {launcher.returncode}"]
    if len(errors) != 1 or "test-only failure injected on rank 1" not in errors[0]:
        problems.append(f"lines {errors}")
    problems += [f"noise {word!r}" for word in NOISE if word in stderr]
    if left:
        problems.append(f"left {left}")
    return not problems, "; ".join(problems) or "clean"


STUCK_TIMEOUT = 10


def spawned_ranks(launcher: int) -> list[int]:
    """The launcher's rank processes, rank 0 first (started in rank order, so in pid order)."""
    ranks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                command = entry.joinpath("cmdline").read_bytes()
                if int(proc_stat(entry.name)[1]) == launcher and b"spawn_main" in command:
                    ranks.append(int(entry.name))
    return sorted(ranks)


def stuck_trial(data_dir: str, work: Path, stop_after_epoch: int = 1) -> tuple[bool, str]:
    folder = work / "ck"
    command = [sys.executable, str(FAULT_LAUNCHER), "--data_dir", data_dir, "--nproc", "2",
               "--epochs", "50", "--checkpoint_dir", str(folder), "--stuck_timeout", str(STUCK_TIMEOUT),
               "--mlflow_tracking_uri", f"sqlite:///{work / 'mlflow.db'}"] + TINY
    launcher = subprocess.Popen(command, cwd=work, env=environment("slow=0.3"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not reached_epoch(launcher, folder, stop_after_epoch):
            return False, f"did not reach epoch {stop_after_epoch}: " + launcher.communicate()[1][-2000:]
        time.sleep(1.0)
        os.kill(spawned_ranks(launcher.pid)[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = launcher.communicate(timeout=TIMEOUT)
        elapsed = time.monotonic() - stopped
        left = group_members(launcher.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    (work / "stderr.txt").write_text(stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    problems = [] if launcher.returncode == 1 else [f"exit {launcher.returncode}"]
    if len(errors) != 1 or not errors[0].startswith("error: rank 1 made no progress") or "latest.pt" not in errors[0]:
        problems.append(f"lines {errors}")
    problems += [f"noise {word!r}" for word in NOISE if word in stderr]
    if left:
        problems.append(f"left {left}")
    return not problems, "; ".join(problems) or f"line after {elapsed:.1f} s: {errors[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--which", default="torchrun,orphans", help="comma-separated: torchrun, orphans, stuck")
    parser.add_argument("--work", default=None, help="folder for the trials' checkpoints (default: a temporary one)")
    args = parser.parse_args()
    base = Path(args.work or tempfile.mkdtemp(prefix="fault_trials_"))
    summary = []
    for which, trial, label in (("torchrun", torchrun_kill_trial, "torchrun kill: {} of {} correct"),
                                ("orphans", orphan_trial, "orphans: {} of {} clean"),
                                ("stuck", stuck_trial, "stuck: {} of {} correct")):
        if which not in args.which.split(","):
            continue
        good = 0
        for index in range(args.trials):
            work = base / f"{which}{index}"
            work.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            ok, detail = trial(str(Path(args.data_dir).resolve()), work)
            good += ok
            print(f"{which} trial {index + 1}: {'ok' if ok else 'WRONG'} ({time.monotonic() - started:.0f} s) {detail}",
                  flush=True)
        summary.append(label.format(good, args.trials))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
