"""The stuck-rank watchdog: a rank that makes no progress ends the job with one line, not a 30-minute hang.

Every rank beats (phase, step) into a heartbeat board shared by the ranks of its host: a small file in
/dev/shm, one fixed-size slot per rank, written through mmap (no system call per beat). A thread in every
rank reads the board; when NO rank of the host has beaten within its phase's limit (a rank waiting in a
collective for a stuck peer beats no more either), the first thread to take the board's lock acts (the built-in
launcher watches the board too, LAUNCHER_GRACE_SECONDS later: the case where every rank is stopped):

    1. the stuck rank is the one stopped or in uninterruptible sleep (/proc state T or D), else the one whose
       last beat is oldest (it stopped first: the others went on to the next collective and wait there);
    2. every rank of the host writes its Python stack (every thread) to CHECKPOINT_DIR/logs/rank<R>.log: its
       own by faulthandler.dump_traceback, the others' by STACK_SIGNAL (faulthandler.register) + SIGCONT, so
       a stopped process runs the dump before it is killed;
    3. the other ranks of the host are SIGKILLed (they are stuck in a collective; latest.pt is written
       atomically, so it stays the last finished epoch's), and the one line is reported: to the launcher's
       queue under the built-in launcher, on stderr under torchrun / Slurm; then this rank exits EXIT_STUCK.

Limits: --stuck_timeout for every phase; from the start of a process to the end of its first training step
(imports, references, baselines, MLflow's first calls, torch.compile, cuDNN autotuning, the first reads from a
cold file system) FIRST_STEP_FACTOR x that, at least START_UP_SECONDS. Validation beats per batch, checkpoints
per file.
"""
from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import hashlib
import mmap
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_STUCK_TIMEOUT = 600.0     # seconds without progress on any rank of a host: the job is stuck
FIRST_STEP_FACTOR = 3             # the first training step of a process may take this many timeouts ...
START_UP_SECONDS = 300.0          # ... and at least this long (imports, MLflow, references on a loaded machine)
STACK_SIGNAL = signal.SIGUSR1     # makes a rank write its Python stack to its log (faulthandler.register)
STACK_WAIT_SECONDS = 5.0          # how long the acting rank waits for the others' stacks
EXIT_STUCK = 3                    # the exit code of the rank that ended a stuck job
LAUNCHER_GRACE_SECONDS = 10.0     # the launcher acts this long after the ranks' own watchdogs would have
PHASES = ("start-up", "step", "validation", "checkpoint", "references", "baselines", "finishing")
SLOT = struct.Struct("<dqqqq")    # last beat (CLOCK_MONOTONIC, seconds), pid, phase index, step, first-step flag


def process_group_timeout(stuck_timeout: float) -> float:
    """Seconds for torch.distributed's own timeout: longer than the watchdog's longest limit, so the watchdog
    (one line, the stacks) always comes first; the collective's timeout only backs it up."""
    return start_up_limit(stuck_timeout) + 60.0


def start_up_limit(timeout: float) -> float:
    return max(FIRST_STEP_FACTOR * timeout, START_UP_SECONDS)


def board_path(world_size: int) -> Path:
    """This job's board on this host, named by the rendezvous (address, port, torchrun run id and restart)."""
    key = "|".join(os.environ.get(name, "") for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                                                        "TORCHELASTIC_RESTART_COUNT"))
    digest = hashlib.sha256(f"{key}|{world_size}".encode()).hexdigest()[:16]
    folder = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return folder / f"music-continuation-heartbeat-{os.getuid()}-{digest}"


class Board:
    """The heartbeat slots of every rank of the job (only this host's are ever written)."""

    def __init__(self, path: Path, world_size: int):
        self.path, self.world_size = path, world_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOT.size * world_size
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)          # zeros: a slot with pid 0 is a rank not (yet) on this host
        self.map = mmap.mmap(self.fd, size)

    def write(self, rank: int, phase: int, step: int, first: bool) -> None:
        SLOT.pack_into(self.map, rank * SLOT.size, time.monotonic(), os.getpid(), phase, step, int(first))

    def clear(self, rank: int) -> None:
        SLOT.pack_into(self.map, rank * SLOT.size, 0.0, 0, 0, 0, 0)

    def slots(self) -> dict:
        """{rank: (last beat, pid, phase, step, first)} of the ranks of this host that have beaten."""
        found = {}
        for rank in range(self.world_size):
            slot = SLOT.unpack_from(self.map, rank * SLOT.size)
            if slot[1]:
                found[rank] = slot
        return found

    def try_lock(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def held_by_another(self) -> bool:
        """Whether another process holds the lock: a rank's watchdog is ending the job and will report why."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def process_state(pid: int) -> str:
    """The /proc state letter of a process (R, S, D, T, Z ...), or 'gone'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def describe_phase(phase: int, step: int) -> str:
    name = PHASES[phase]
    return f"step {step}" if name == "step" else name


_current = []     # this process's Watchdog, once started: beat() reaches it from anywhere in the rank


def beat(phase: str, step: int = 0) -> None:
    """Progress of this rank (a no-op before the watchdog starts, e.g. in tests that call the loop directly)."""
    if _current:
        _current[0].beat(phase, step)


def stop() -> None:
    if _current:
        _current.pop().stop()


class Watchdog:
    """One per rank: beat() from the training loop, a thread that ends the job when the host is stuck.

    on_stuck(what, stuck_rank) is called by the acting rank's thread with the line's text; it must not
    return (it reports and exits)."""

    def __init__(self, rank: int, world_size: int, timeout: float, log_dir: Path, on_stuck):
        self.rank, self.timeout, self.on_stuck = rank, float(timeout), on_stuck
        self.log_dir = Path(log_dir)
        self.board = Board(board_path(world_size), world_size)
        self.steps = 0
        self.stopped = threading.Event()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path(self.log_dir, rank), "a")     # kept open: faulthandler writes to its descriptor
        faulthandler.register(STACK_SIGNAL, file=self.log, all_threads=True, chain=False)
        self.beat("start-up")
        self.thread = threading.Thread(target=self._watch, name="stuck-rank-watchdog", daemon=True)
        self.thread.start()
        _current[:] = [self]

    def beat(self, phase: str, step: int = 0) -> None:
        """Progress: this rank is in `phase` (at training step `step`) now."""
        # Start-up (references, baselines, the first MLflow calls) and the first step are one long phase: the
        # longer limit holds until the second step begins.
        first = self.steps < 2
        self.steps += phase == "step"
        self.board.write(self.rank, PHASES.index(phase), step, first)

    def stop(self) -> None:
        """The run is over on this rank: stop watching and leave the board."""
        self.stopped.set()
        self.board.clear(self.rank)
        if not self.board.slots():
            self.board.remove()

    def _watch(self) -> None:
        while not self.stopped.wait(check_interval(self.timeout)):
            slots = stuck_slots(self.board, self.timeout)
            if slots and not self.stopped.is_set() and self.board.try_lock():   # else another rank acts
                self.on_stuck(*end_stuck(self.board, slots, self.log_dir, self.timeout, self.rank, self.log))


def check_interval(timeout: float) -> float:
    return min(1.0, timeout / 10)


def limit(timeout: float, phase: int, first: int) -> float:
    """A phase's limit: the start-up and the first step have start_up_limit."""
    return start_up_limit(timeout) if first or PHASES[phase] == "start-up" else timeout


def log_path(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"rank{rank}.log"


def stuck_slots(board: Board, timeout: float, grace: float = 0.0) -> dict | None:
    """The live ranks of this host if NONE of them has beaten within its phase's limit (+ grace), else None.
    A rank whose process is gone is the launcher's or torchrun's case (a lost rank), not a stuck one."""
    slots = {rank: slot for rank, slot in board.slots().items() if process_state(slot[1]) not in ("gone", "Z", "X")}
    now = time.monotonic()
    if not slots or any(now - beat < limit(timeout, phase, first) + grace
                        for beat, _, phase, _, first in slots.values()):
        return None
    return slots


def end_stuck(board: Board, slots: dict, log_dir: Path, timeout: float, own_rank: int | None = None,
              own_log=None) -> tuple[str, int]:
    """Have every rank of `slots` write its stack to its log, SIGKILL them (but `own_rank`, which dumps its own
    stack to `own_log`); (the line's text, the stuck rank)."""
    now = time.monotonic()
    states = {rank: process_state(pid) for rank, (_, pid, _, _, _) in slots.items()}
    stuck = min(slots, key=lambda rank: (states[rank] not in ("T", "D"), slots[rank][0], rank))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")

    def header(rank):
        beat, _, phase, step, _ = slots[rank]
        return (f"--- {stamp} rank {rank}: no progress on this host for {now - beat:.0f} s, at "
                f"{describe_phase(phase, step)}; the job was ended. Python stack of every thread:\n")
    others = [rank for rank in slots if rank != own_rank]
    sizes = {}
    for rank in others:
        path = log_path(log_dir, rank)
        with contextlib.suppress(OSError):
            with open(path, "a") as log:
                log.write(header(rank))
            sizes[rank] = path.stat().st_size
            os.kill(slots[rank][1], STACK_SIGNAL)
            os.kill(slots[rank][1], signal.SIGCONT)      # a stopped process runs the dump once continued
    if own_log is not None:
        own_log.write(header(own_rank))
        own_log.flush()
        faulthandler.dump_traceback(file=own_log, all_threads=True)
        own_log.flush()
    deadline = time.monotonic() + STACK_WAIT_SECONDS
    while time.monotonic() < deadline and any(
            file_size(log_path(log_dir, rank)) <= size and process_state(slots[rank][1]) not in ("gone", "Z")
            for rank, size in sizes.items()):
        time.sleep(0.05)
    time.sleep(0.2)                  # the dump may still be being written
    for rank in others:
        with contextlib.suppress(OSError):
            os.kill(slots[rank][1], signal.SIGKILL)
    board.remove()
    beat, _, phase, step, _ = slots[stuck]
    said = {"T": " (its process is stopped)", "D": " (its process waits for the disk or a driver)"}
    stacks = (f"its Python stack is in {log_path(log_dir, stuck)}" if len(slots) == 1 else
              f"every rank's Python stack is in {Path(log_dir) / 'rank<R>.log'} (rank {stuck}: "
              f"{log_path(log_dir, stuck)})")
    return (f"rank {stuck} made no progress for {now - beat:.0f} s at {describe_phase(phase, step)}"
            f"{said.get(states[stuck], '')} on {socket.gethostname()} (--stuck_timeout {timeout:g}); the job was "
            f"stopped and {stacks}", stuck)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
