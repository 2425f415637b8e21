"""Where ablate.py's cells run: here, one after the other (LocalExecutor), or as one Slurm job array through
submitit (SlurmExecutor). Both have the same small interface:

    submit(cells)   start them (local: runs them to the end, one at a time; slurm: one job array, returns at once)
    poll()          {cell label: state}, state one of STATES
    cancel()        stop what runs (local: the running launcher; slurm: scancel the study's recorded jobs)

A Slurm array element is one multi-GPU job: CellJob runs the cell's launcher under torchrun (one process per GPU,
one torchrun per node, rendezvous on the first node) with --resume auto. submitit does the sbatch script,
the array, sacct polling and the requeue on a time limit (CellJob.checkpoint). A preemption or `scontrol requeue`
sends SIGTERM: the ranks stop at a safe point and the requeued element continues from CHECKPOINT_DIR/latest.pt.
The job ids of a study are recorded in OUT_DIR/slurm/jobs.json, so a later invocation waits for the cells still
queued or running instead of submitting them again.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from music_continuation.utils import PACKAGE_PARENT, Interrupted, UserError, write_json

STATES = ("pending", "running", "requeued", "done", "failed")
STOP_GRACE_SECONDS = 60.0        # after forwarding SIGINT/SIGTERM: time for a launcher to stop its ranks
CHECKPOINT_STOP_SECONDS = 15.0   # CellJob.checkpoint waits this long at most for the ranks before the requeue: the
                                 # signal of the shortest limit comes >= 45 s before it, and submitit must requeue
SIGNAL_DELAY_SECONDS = 120       # submitit's USR2 this long before the time limit (a quarter of a shorter one)
SLURM_SIGNAL_SLACK_SECONDS = 60  # Slurm may send that signal up to this much earlier (its event resolution)
MIN_SLURM_MINUTES = 3            # a shorter limit would requeue a cell before it saves an epoch
PR_SET_PDEATHSIG = 1             # prctl(2) option
POLL_SECONDS = float(os.environ.get("ABLATE_SLURM_POLL_SECONDS", "5"))   # between two sacct queries
JOBS_FILE = "jobs.json"          # in OUT_DIR/slurm: {cell label: {"job_id", "hash"}}
# Slurm's job states (sacct) -> ours. Anything else final (TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY ...) = failed.
SLURM_ACTIVE = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued",
                "REQUEUE_FED": "requeued", "RESIZING": "pending", "SUSPENDED": "pending", "UNKNOWN": "pending",
                "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
                "PREEMPTED": "requeued"}
SHARED_FILE_SYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "fuse.glusterfs", "glusterfs",
                       "cifs", "smb3", "wekafs", "panfs", "fuse.juicefs", "9p", "virtiofs", "fuse.sshfs"}


class ExecutorError(UserError):
    """A user error in the executor's flags or state, one line (ablate.py turns it into exit 2)."""


# ------------------------------------------------------------------------------------------- local

class Runner:
    """Runs one launcher at a time in its own session; SIGINT / SIGTERM are forwarded to it."""

    def __init__(self):
        self.process = None
        self.signal = None
        self.signalled_at = None
        self.current = None          # what is running, for the line that ends an interrupted study
        self.study = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame) -> None:
        first = self.signal is None
        self.signal = self.signal or signum
        process = self.process
        if process is not None and process.poll() is None:
            self.signalled_at = self.signalled_at or time.monotonic()
            try:     # the launcher stops its ranks itself on SIGINT; a second signal hurries it with SIGTERM
                os.kill(process.pid, signal.SIGINT if first else signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif first:
            raise KeyboardInterrupt      # in-process work (waiting, evaluation, MLflow calls) stops where it is

    def run(self, command: list[str], log_path: Path, on_start=None) -> tuple[int, str, float]:
        """(exit code, last line of its stderr, seconds); the output goes to the terminal and to log_path."""
        if self.signal is not None:
            raise Interrupted(self.signal)
        started = time.perf_counter()
        # The cell dies with this process, whatever kills it (kill -9 included): no launcher holds its folder
        # after the study is gone; the MLflow run it leaves RUNNING is settled by the cell's next start.
        code, last = run_logged(command, log_path, on_start=on_start, watch=self,
                                preexec_fn=die_with_parent(signal.SIGKILL))
        if self.signal is not None:
            raise Interrupted(self.signal)
        return code, last, time.perf_counter() - started


def run_logged(command: list[str], log_path: Path, on_start=None, watch=None, env=None,
               preexec_fn=None) -> tuple[int, str]:
    """Run `command` in its own session, its output to our stdout/stderr and appended to log_path; (exit code,
    last non-empty line of its stderr). `watch` (a Runner or a CellJob) holds the process and the threads that
    copy its output while it runs; a Runner's signal escalates to SIGTERM / SIGKILL of the whole group once it
    has waited STOP_GRACE_SECONDS. When the command exits, its group gets 10 s to empty."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail = []
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, env=env, preexec_fn=preexec_fn)
        if watch is not None:
            watch.process = process
        if on_start is not None:
            on_start(process.pid)
        pumps = [threading.Thread(target=pump, args=(process.stdout, sys.stdout, log, None), daemon=True),
                 threading.Thread(target=pump, args=(process.stderr, sys.stderr, log, tail), daemon=True)]
        for thread in pumps:
            thread.start()
        if watch is not None:
            watch.pumps = pumps
        escalated = 0
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            signalled_at = getattr(watch, "signalled_at", None)
            if signalled_at is not None:
                waited = time.monotonic() - signalled_at
                if escalated == 0 and waited > STOP_GRACE_SECONDS:
                    kill_group(process.pid, signal.SIGTERM)
                    escalated = 1
                elif escalated == 1 and waited > STOP_GRACE_SECONDS + 15:
                    kill_group(process.pid, signal.SIGKILL)
                    escalated = 2
        if watch is not None:
            watch.process = None
        end_group(process.pid)          # no rank or loader worker outlives its launcher
        for thread in pumps:
            thread.join(timeout=5)
    last = next((line for line in reversed(b"".join(tail).decode(errors="replace").splitlines()) if line.strip()), "")
    return code, last.strip()


def die_with_parent(sig: int, also=None):
    """A Popen preexec_fn: the child gets `sig` when this process dies (Linux PR_SET_PDEATHSIG), then runs
    `also()`. If this process died before the signal was set, the child leaves at once."""
    import ctypes
    parent = os.getpid()

    def preexec():
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:
            os._exit(1)
        if also is not None:
            also()
    return preexec


def pump(source, terminal, log, tail) -> None:
    """Copy a child's pipe to our terminal stream and its log file, keeping the last few KB if `tail` is a list."""
    for chunk in iter(lambda: source.read1(65536), b""):
        terminal.buffer.write(chunk)
        terminal.flush()
        log.write(chunk)
        log.flush()
        if tail is not None:
            tail.append(chunk)
            while len(tail) > 1 and sum(map(len, tail)) > 8192:
                tail.pop(0)
    source.close()


def kill_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_group(pgid: int) -> None:
    """After the launcher exited: give its process group 10 s to empty, then SIGKILL what is left."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    kill_group(pgid, signal.SIGKILL)


class LocalExecutor:
    """Today's behaviour: every cell's launcher runs here, one after the other, to the end."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.states: dict = {}
        self.failures: list = []
        self.train_seconds = 0.0

    def submit(self, cells: list, on_first_start=None) -> None:
        """Run the cells (each with .command, .folder, .label, .head); failures go to self.failures."""
        for index, cell in enumerate(cells):
            if index == 0 and on_first_start is not None:
                on_first_start()
            verb = "resuming" if cell.status == "resume" else "starting"
            said = f"{cell.head}: {verb} in {cell.folder}"
            self.runner.current = cell.label
            self.states[cell.label] = "running"
            try:
                code, last, seconds = self.runner.run(
                    cell.command, cell.folder / "train.log",
                    lambda pid, said=said: print(f"{said} (launcher pid {pid})", file=sys.stderr, flush=True))
            finally:
                self.runner.current = None
            self.train_seconds += seconds
            self.states[cell.label] = "done" if code == 0 else "failed"
            if code != 0:
                self.failures.append(f"{cell.label} (exit {code}: {last})")
                print(f"[ablate] cell {cell.label} failed (exit {code}); going on with the others",
                      file=sys.stderr, flush=True)

    def poll(self) -> dict:
        return dict(self.states)

    def cancel(self) -> None:
        if self.runner.process is not None:
            self.runner.on_signal(signal.SIGTERM, None)


# ------------------------------------------------------------------------------------------- slurm

@dataclass
class SlurmSettings:
    """The resources of every array element, from the --slurm_* flags (checked by check_slurm)."""
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: str = "60"
    parallel: int = 0                         # at most this many elements at once (0: all)
    extra: dict = field(default_factory=dict)  # --slurm_extra KEY=VALUE: account, qos, constraint ...

    @property
    def time_minutes(self) -> int:
        return slurm_minutes(self.time)

    @property
    def signal_delay_seconds(self) -> int:
        """When submitit's checkpoint signal comes before the limit: SIGNAL_DELAY_SECONDS, or a quarter of a
        shorter limit, so that most of an allocation trains."""
        return min(SIGNAL_DELAY_SECONDS, self.time_minutes * 60 // 4)

    def check_time(self) -> None:
        """A limit too short for the checkpoint signal is refused before anything is submitted."""
        if self.time_minutes < MIN_SLURM_MINUTES:
            delay = min(SIGNAL_DELAY_SECONDS, self.time_minutes * 60 // 4)
            raise ExecutorError(
                f"--slurm_time {self.time} is too short: submitit's checkpoint-and-requeue signal comes {delay} s "
                f"before the limit and Slurm may send it up to {SLURM_SIGNAL_SLACK_SECONDS} s earlier, so a cell "
                f"would be requeued before it saves an epoch; give at least {MIN_SLURM_MINUTES} minutes")


TIME_PATTERN = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def slurm_minutes(text: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes (rounded up, at least 1)."""
    match = TIME_PATTERN.match(str(text).strip())
    if not match:
        raise ExecutorError(f"--slurm_time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = (int(v) if v is not None else None for v in match.group("days", "a", "b", "c"))
    if days is None:      # M, M:S, H:M:S
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:                 # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ExecutorError(f"--slurm_time {text!r} must be more than 0")
    return max(1, -(-seconds // 60))


def parse_extra(items: list) -> dict:
    """--slurm_extra KEY=VALUE ... -> {key: value} (sbatch long options without the dashes)."""
    extra = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not re.match(r"^[a-z][a-z0-9_]*$", key) or not value:
            raise ExecutorError(f"--slurm_extra {item!r}: expected KEY=VALUE with an sbatch option as KEY "
                                f"(e.g. account=myproject, qos=high, constraint=a100)")
        if key in ("array", "nodes", "partition", "time", "gpus_per_node", "cpus_per_task", "output", "error",
                   "signal", "ntasks_per_node", "job_name", "open_mode", "wrap"):
            raise ExecutorError(f"--slurm_extra {item!r}: {key} is set by ablate.py "
                                f"(use --slurm_{key} if there is one)")
        extra[key] = value
    return extra


def sbatch_flags(settings: SlurmSettings) -> list[str]:
    """The resource flags of one array element, as sbatch takes them (for the up-front --test-only check)."""
    flags = [f"--nodes={settings.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={settings.cpus_per_task}",
             f"--time={settings.time_minutes}"]
    if settings.partition:
        flags.append(f"--partition={settings.partition}")
    if settings.gpus_per_node:
        flags.append(f"--gpus-per-node={settings.gpus_per_node}")
    flags += [f"--{key.replace('_', '-')}={value}" for key, value in settings.extra.items()]
    return flags


def check_slurm(settings: SlurmSettings) -> None:
    """Every Slurm flag, checked before anything is submitted: the numbers here, then the whole request by
    Slurm itself (`sbatch --test-only`: partition, account, qos, constraint, GPUs and limits), which submits
    nothing."""
    for name, value, least in (("nodes", settings.nodes, 1), ("gpus_per_node", settings.gpus_per_node, 0),
                               ("cpus_per_task", settings.cpus_per_task, 1), ("parallel", settings.parallel, 0)):
        if value < least:
            raise ExecutorError(f"--slurm_{name} must be at least {least}, got {value}")
    settings.check_time()    # also raises ExecutorError for a bad --slurm_time
    try:
        result = subprocess.run(["sbatch", "--test-only", *sbatch_flags(settings), "--wrap", "true"],
                                capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ExecutorError("--executor slurm: sbatch is not on PATH (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise ExecutorError("--executor slurm: sbatch --test-only did not answer within 60 s "
                            "(is slurmctld up? scontrol ping)") from None
    if result.returncode != 0:
        said = " ".join(line.removeprefix("sbatch: error: ").strip() for line in result.stderr.splitlines()
                        if line.strip())
        raise ExecutorError(f"Slurm refuses the request ({' '.join(sbatch_flags(settings))}): {said}")


def file_system_of(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/self/mounts; '' if unknown)."""
    path = path.resolve()
    best, kind = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def check_tracking_uri(uri: str) -> None:
    """With Slurm the cells log from compute nodes: a sqlite (or file) store must be on a shared file system."""
    if uri.startswith("sqlite:"):
        path = Path(uri.split(":///", 1)[-1] if ":///" in uri else uri[len("sqlite:"):])
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
    else:
        return
    kind = file_system_of(path.parent if not path.exists() else path)
    if kind not in SHARED_FILE_SYSTEMS:
        raise ExecutorError(f"--mlflow_tracking_uri {uri}: with --executor slurm the cells log from the compute "
                            f"nodes, and {path} is on a local file system ({kind or 'unknown'}), not one they "
                            f"share; use an MLflow server (mlflow server --host 0.0.0.0 ...; "
                            f"--mlflow_tracking_uri http://HOST:5000)")


class CellJob:
    """One array element (picklable; submitit runs it on the node): the cell's launcher under torchrun.

    On SIGTERM (preemption, `scontrol requeue`, scancel) the ranks stop at a safe point and this task exits
    without a result, so submitit does not take the stopped run for a finished one; the requeued element
    starts again with --resume auto. On submitit's USR2 before the time limit, checkpoint() stops the ranks
    the same way, waits for them, and submitit requeues the element."""

    def __init__(self, launcher_argv: list[str], nproc_per_node: int, log_path: str):
        self.launcher_argv = launcher_argv          # [-m, launcher module, flags ..., --resume auto]
        self.nproc_per_node = nproc_per_node
        self.log_path = log_path
        self._process = None
        self._stopping = False
        self.process = self.pumps = None            # set by run_logged while the launcher runs

    def torchrun_command(self) -> list[str]:
        import submitit
        env = submitit.JobEnvironment()
        nodes = env.num_nodes
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                   "--nproc_per_node", str(self.nproc_per_node)]
        if nodes == 1:      # a free port on this node: two cells may share it
            command.append("--standalone")
        else:
            # Static rendezvous: --node_rank fixes the ranks, so global rank 0 (the run's output, in log_path) is
            # on node 0; c10d numbers the nodes in the order they join. The port comes from the element's own
            # job id (an array's elements share the array's id), so elements on one head node do not collide.
            port = 20000 + int(env.raw_job_id) % 20000
            command += ["--node_rank", str(env.node), "--master_addr", env.hostnames[0], "--master_port", str(port)]
        return command + self.launcher_argv

    def __call__(self) -> dict:
        import submitit
        node = submitit.JobEnvironment().node
        log = Path(self.log_path if node == 0 else f"{self.log_path}.node{node}")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        started = time.perf_counter()
        try:
            code, last = run_logged(self.torchrun_command(), log, on_start=self._started, watch=self,
                                    # torchrun stops its ranks if this task dies (SIGTERM: it forwards it)
                                    preexec_fn=die_with_parent(signal.SIGTERM, also=ignore_usr2))
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self._stopping:
            # Stopped by Slurm (requeue, preemption, scancel): no result, so the job is not "done".
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(143)
        if code != 0:
            raise RuntimeError(f"the launcher exited with code {code}: {last}")
        return {"exit": code, "seconds": time.perf_counter() - started}

    def _started(self, pid: int) -> None:
        self._process = pid

    def _on_sigterm(self, signum, frame) -> None:
        self._stopping = True
        if self._process is not None:
            kill_group(self._process, signal.SIGTERM)

    def checkpoint(self, *args, **kwargs):
        """submitit's time-limit hook: stop the ranks (their last epoch is in latest.pt) and wait for them, then
        submitit requeues the element and this task exits."""
        import submitit
        self._on_sigterm(signal.SIGTERM, None)
        self._wait_stopped(CHECKPOINT_STOP_SECONDS)
        fresh = CellJob(self.launcher_argv, self.nproc_per_node, self.log_path)
        return submitit.helpers.DelayedSubmission(fresh)

    def _wait_stopped(self, seconds: float) -> None:
        """Until the stopped launcher has exited and its output is in the cell's log, at most `seconds`: submitit
        calls checkpoint() from its signal handler and exits right after the requeue, so without this wait the
        ranks' last lines (where they stopped, the resume hint) would go to a closed pipe. The launcher is reaped
        here because run_logged, which would, is paused under that handler."""
        deadline = time.monotonic() + seconds
        while self._process is not None and time.monotonic() < deadline:
            try:
                if os.waitpid(self._process, os.WNOHANG)[0]:
                    break
            except ChildProcessError:        # already reaped
                break
            time.sleep(0.1)
        for thread in self.pumps or []:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def ignore_usr2() -> None:
    """submitit's USR2 (the time limit is near) is for CellJob only: the ranks must not die of it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def evaluation_job(function, cells: list, *args) -> list:
    """The study's evaluation as one Slurm job: `function(cell, *args)` for every cell (it caches its result
    in the cell's folder, where the submitting ablate.py then finds it)."""
    return [function(cell, *args)[0] for cell in cells]


class SlurmExecutor:
    """One job array per submission through submitit; the study's job ids in OUT_DIR/slurm/jobs.json."""

    def __init__(self, folder: Path, settings: SlurmSettings, name: str = "ablate"):
        import submitit
        self.folder = folder
        self.settings = settings
        self.name = name
        self.jobs: dict = {}                       # label -> submitit job
        self.records = self.load_records()         # label -> {"job_id", "hash"}
        self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
        parameters = dict(slurm_partition=settings.partition, nodes=settings.nodes, tasks_per_node=1,
                          cpus_per_task=settings.cpus_per_task, timeout_min=settings.time_minutes, name=name,
                          slurm_signal_delay_s=settings.signal_delay_seconds,
                          slurm_setup=[f"export PYTHONPATH={PACKAGE_PARENT}${{PYTHONPATH:+:$PYTHONPATH}}"],
                          slurm_additional_parameters=dict(settings.extra))
        if settings.gpus_per_node:
            parameters["gpus_per_node"] = settings.gpus_per_node
        if settings.parallel:
            parameters["slurm_array_parallelism"] = settings.parallel
        self.parameters = {k: v for k, v in parameters.items() if v is not None}
        self.executor.update_parameters(**self.parameters)

    # -------------------------------------------------------------------------------- records

    def load_records(self) -> dict:
        try:
            return json.loads((self.folder / JOBS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def save_records(self) -> None:
        write_json(self.folder / JOBS_FILE, self.records, sort_keys=True)

    def attach(self, cell) -> str | None:
        """Take over the recorded job of this cell if it is still queued or running; its state, or None."""
        record = self.records.get(cell.label)
        if not record or record.get("hash") != cell.hash:
            return None
        import submitit
        job = submitit.SlurmJob(self.folder / record["job_id"].split("_")[0], record["job_id"])
        state = self.state_of(job, force=True)
        if state in ("done", "failed"):
            return None
        self.jobs[cell.label] = job
        return state

    # ---------------------------------------------------------------------------- the interface

    def submit(self, cells: list) -> list:
        """One job array for these cells (each with .launcher_argv, .nproc_per_node, .folder, .label, .hash);
        their job ids."""
        if not cells:
            return []
        functions = [CellJob(cell.launcher_argv, cell.nproc_per_node, str(cell.folder / "train.log"))
                     for cell in cells]
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            jobs = self.executor.submit_array(functions)
        except Exception as error:  # noqa: BLE001 - sbatch's refusal, in one line
            raise ExecutorError(f"sbatch refused the job array: {str(error).strip().splitlines()[-1]}") from None
        for cell, job in zip(cells, jobs):
            self.jobs[cell.label] = job
            self.records[cell.label] = {"job_id": job.job_id, "hash": cell.hash}
        self.save_records()
        return [job.job_id for job in jobs]

    def poll(self) -> dict:
        """{label: state} of every job this executor follows, from one sacct call for all of them."""
        import submitit
        submitit.SlurmJob.watcher.update()
        return {label: self.state_of(job) for label, job in self.jobs.items()}

    def state_of(self, job, force: bool = False) -> str:
        word = job.watcher.get_state(job.job_id, mode="force" if force else "cache").split()[0]
        if word in SLURM_ACTIVE:
            return SLURM_ACTIVE[word]
        if word == "COMPLETED":
            return "done"
        return "failed"

    def slurm_state(self, label: str) -> str:
        job = self.jobs[label]
        return job.watcher.get_state(job.job_id, mode="cache")

    def error_of(self, label: str) -> str:
        """The last line of a failed element's stderr (its error, or the launcher's last word)."""
        job = self.jobs[label]
        try:
            lines = [line for line in job.paths.stderr.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        errors = [line for line in lines if "Error" in line or line.startswith("error")]
        return (errors or lines or [""])[-1].strip()

    def job_ids(self, labels=None) -> list[str]:
        return [self.records[label]["job_id"] for label in (labels or self.records) if label in self.records]

    def cancel(self, labels=None) -> list[str]:
        """scancel the recorded jobs (all of the study's, or those of `labels`); the ids cancelled."""
        ids = self.job_ids(labels)
        if ids:
            subprocess.run(["scancel", *ids], check=False, capture_output=True, timeout=60)
        return ids

    def evaluate(self, function, cells: list, *args, gpus: int = 0) -> None:
        """Run the study's evaluation as one (single-task) Slurm job and wait for it."""
        import submitit
        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm")
        parameters = {k: v for k, v in self.parameters.items() if k not in ("gpus_per_node", "slurm_array_parallelism")}
        executor.update_parameters(**{**parameters, "nodes": 1, "name": f"{self.name}-eval"})
        if gpus:
            executor.update_parameters(gpus_per_node=1)
        job = executor.submit(evaluation_job, function, cells, *args)
        print(f"[ablate] evaluation: job {job.job_id}", file=sys.stderr, flush=True)
        try:
            job.result()
        except Exception as error:  # noqa: BLE001 - the job's error, in one line
            raise RuntimeError(f"the evaluation job {job.job_id} failed: "
                               f"{str(error).strip().splitlines()[-1]}") from None
