"""Run a command that must not outlive the process that started this guard (a test server, a dev cluster).

    python process_guard.py [--on_exit SHELL_COMMAND] [-- COMMAND ...]

The starter gives the guard a pipe as stdin and keeps its write end. The guard leads its own process group,
starts COMMAND in it and waits for end-of-file on stdin, which comes when the starter closes the pipe or dies
by any signal, SIGKILL included (the kernel closes its descriptors). Then: SIGTERM to the group, SIGKILL
after GRACE_SECONDS, and SHELL_COMMAND (for daemons that leave the group, e.g. `dev_slurm.sh stop`).
The guard also ends when COMMAND exits by itself (its exit code is the guard's).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 5.0


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # this guard is in the group too: alive means some OTHER member is left
    return any(member != os.getpid() for member in members(group))


def members(group: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                    found.append(int(entry))
    return found


def end_group(on_exit: str | None) -> None:
    group = os.getpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # the guard outlives its own SIGTERM to the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and group_alive(group):
        time.sleep(0.1)
    for pid in members(group):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if on_exit:
        subprocess.run(on_exit, shell=True, stdin=subprocess.DEVNULL, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--on_exit", default=None, help="shell command run once the group is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)                      # lead a group of our own: everything started here is in it
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL) if command else None
    ended = threading.Event()

    def wait_for_eof():
        with contextlib.suppress(OSError):
            while os.read(sys.stdin.fileno(), 4096):
                pass
        ended.set()
    threading.Thread(target=wait_for_eof, daemon=True).start()
    code = 0
    while not ended.wait(0.2):
        if child is not None and child.poll() is not None:
            code = child.returncode
            break
    end_group(args.on_exit)
    return code


if __name__ == "__main__":
    sys.exit(main())
