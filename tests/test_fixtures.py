"""What the tests start dies with the test process, even when pytest is killed (kill -9): the process guard
(tests/process_guard.py) under the MLflow server and Slurm fixtures."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import GUARD, ROOT


def session_members(session: int) -> list[int]:
    """Live processes of a session (field 6 of /proc/PID/stat), zombies excepted."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session and fields[0] not in ("Z", "X"):
                    found.append(int(entry.name))
    return found


def wait_until_empty(session: int, timeout: float) -> float:
    started = time.monotonic()
    while session_members(session) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def test_the_guard_ends_its_group_and_runs_its_stop_command_when_its_starter_is_killed(tmp_path):
    marker = tmp_path / "stopped"
    starter = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
guard = subprocess.Popen([sys.executable, {str(GUARD)!r}, "--on_exit", "touch {marker}", "--", "sleep", "600"],
                         stdin=subprocess.PIPE, start_new_session=True)
print(guard.pid, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    guard = int(starter.stdout.readline())
    deadline = time.monotonic() + 30
    while len(session_members(guard)) < 2 and time.monotonic() < deadline:     # the guard and its sleep
        time.sleep(0.05)
    assert len(session_members(guard)) == 2
    starter.kill()                                     # kill -9: no teardown of any kind runs in the starter
    starter.wait()
    assert wait_until_empty(guard, 15) < 15, session_members(guard)
    assert marker.exists()


@pytest.mark.slow
def test_the_mlflow_server_fixture_dies_with_a_killed_pytest(tmp_path):
    out = tmp_path / "uri"
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "fixture_probe.py")], cwd=ROOT,
                             env={**os.environ, "FIXTURE_PROBE_OUT": str(out)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    sessions = []
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            assert inner.poll() is None and time.monotonic() < deadline, "the inner pytest ended early"
            time.sleep(0.2)
        uri = out.read_text()
        # what the fixture started: the sessions led by children of the inner pytest (the guard, or a bare server)
        sessions = [pid for pid in children_of(inner.pid) if pid in session_members(pid)]
        assert any(len(session_members(pid)) >= 2 for pid in sessions), sessions     # a server and its children
        os.kill(inner.pid, signal.SIGKILL)
        inner.wait()
        for session in sessions:
            assert wait_until_empty(session, 20) < 20, session_members(session)
        with pytest.raises(OSError):
            urllib.request.urlopen(uri + "/health", timeout=2)
    finally:
        for group in [inner.pid] + sessions:           # whatever is left if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found
