"""Small helpers the scripts share: the user-error classes, atomic file writes, one-line messages, the MLflow
server probe, a free port."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import warnings
from pathlib import Path
from typing import NoReturn

# atomic_path's temporary files: hidden ".STEM.tmp-PID.SUFFIX" beside the target (group 1: the writer's pid),
# so a killed writer's leftovers can be recognised and removed.
TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(\d+)(\.[^.]+)?$")
# The folder that holds the package. A child Python process (a study's cell, a Slurm job) imports the package
# from here when it runs from a checkout that is not installed.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
MLFLOW_PROBE_TIMEOUT = 5.0   # seconds: a tracking server that does not answer /health by then is taken as down


class UserError(Exception):
    """Something the user can fix (a flag, a file, a folder): the commands print `error: MESSAGE` (one line
    naming the flag or the file) and exit non-zero, never with a traceback. Every such error derives from it."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (finally blocks run), then exit 128 + the signal without a traceback.
    A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def export_package_path() -> None:
    """Put PACKAGE_PARENT on $PYTHONPATH, which every child process inherits: `python -m music_continuation...`
    then works in children from an uninstalled checkout as it does in this process."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PACKAGE_PARENT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), *paths])


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a hidden temporary path beside `path` to write; then fsync it and rename it over `path`.

    Readers, and a crash at any moment, see the old file or the new one, never a torn one. If the
    writer raises, the temporary file is removed and `path` is left as it was. The temporary name
    keeps the suffix, because soundfile and matplotlib choose the file format from it.
    """
    path = Path(path)
    tmp_path = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp_path
        descriptor = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data, sort_keys: bool = False) -> None:
    """`data` as indented JSON with a final newline, written atomically (atomic_path); the folder is made if
    needed. Values JSON does not know (paths, numpy scalars) are written as their str()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_path:
        tmp_path.write_text(json.dumps(data, indent=1, sort_keys=sort_keys, default=str) + "\n", encoding="utf-8")


# "data.CacheError: " / "RuntimeError: ": the class prefix of a traceback's last line (a DataLoader worker's error)
EXCEPTION_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*\.)*[A-Z][A-Za-z0-9_]*(?:Error|Exception): ")


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type name if it has none), for one-line user errors.
    An OSError names its file: 'PATH: reason'."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error).strip()
    return strip_exception_prefix(text.splitlines()[0]) if text else type(error).__name__


def strip_exception_prefix(line: str) -> str:
    """'data.CacheError: X' -> 'X': a user reads the reason, not the class that carried it."""
    return EXCEPTION_PREFIX.sub("", line.strip(), count=1)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: MESSAGE`, exit status 2: no usage block (--help has it)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_command(parser, check_flags, body, argv, user_errors: tuple) -> int:
    """A command-line tool: parse argv, check_flags(parser, args) (parser.error for bad flags), then body(args)
    -> exit code, with a user error (one of `user_errors`) as one line and exit status 2. The encodec
    package's FutureWarning (deprecated weight_norm) is not the user's to act on."""
    args = parser.parse_args(argv)
    check_flags(parser, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return body(args)
        except user_errors as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2


def missing_keys(mapping, required: tuple) -> list:
    """The keys of `required` that `mapping` lacks (all of them if it is not a dict): for one-line file errors."""
    return [key for key in required if not isinstance(mapping, dict) or key not in mapping]


def warn(message: str) -> None:
    """One 'warning: ...' line on stderr, flushed at once (other ranks write there too). While a tqdm progress
    bar is open, through tqdm.write, which clears the bar and redraws it below the line."""
    line = f"warning: {message}"
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        tqdm.tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
    sys.stderr.flush()


def exit_now(code: int) -> NoReturn:
    """Flush the streams and end the process without the interpreter's teardown (os._exit): freeing torch and
    MLflow takes 1-3 s per process on 2 cores. Only for a process whose files and runs are all written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it: bind to port 0), for a rendezvous or a test server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServerError(OSError):
    """An http(s) tracking URI that cannot be used; the message says what answered and what to do."""


MLFLOW_API_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"   # cheap, read-only


def check_mlflow_server(uri: str | None, timeout: float = MLFLOW_PROBE_TIMEOUT) -> None:
    """Raise TrackingServerError (what answered, what to do) unless the MLflow server at an http(s) `uri` answers
    /health and its REST API works (a server up with a broken database answers /health and fails every call).

    MLflow's own client retries a dead server with back-off for minutes; this asks once, quickly.
    A local store (sqlite, file, or no URI) has nothing to reach and always passes.
    """
    if not uri or not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    status, body = http_get(base + "/health", timeout)
    if status != 200:
        raise TrackingServerError(f"the server answered /health with HTTP {status}{said(body)}: it is up but "
                                  f"unhealthy; see the server's log")
    status, body = http_get(base + MLFLOW_API_PROBE, timeout)
    if status == 200 or (status == 404 and "RESOURCE_DOES_NOT_EXIST" in body):
        return
    path = MLFLOW_API_PROBE.split("?")[0]
    if status >= 500:
        raise TrackingServerError(f"the server answers /health but its API fails (HTTP {status} on {path}"
                                  f"{said(body)}); see the server's log (its backend store or artifact root)")
    raise TrackingServerError(f"the server answers /health but not as an MLflow tracking server (HTTP {status} on "
                              f"{path}); check the URI's host, port and path")


def http_get(url: str, timeout: float) -> tuple[int, str]:
    """(HTTP status, the first KB of the body) of a GET; TrackingServerError if nothing answers."""
    import urllib.error
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(1024).decode(errors="replace")
    except urllib.error.HTTPError as error:       # an answer, with a status of 400 or more
        return error.code, (error.read(1024) or b"").decode(errors="replace")
    except (OSError, ValueError) as error:     # URLError is an OSError; a malformed URI a ValueError
        reason = getattr(error, "reason", error)
        raise TrackingServerError(f"the MLflow tracking server does not answer ({reason}); start it "
                                  f"(mlflow server ...) or point the flag at a running one") from None


def said(body: str) -> str:
    """': MESSAGE' from an HTTP error body (MLflow's JSON "message", else its first line), at most 120 chars."""
    import json
    text = body.strip()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        text = str(json.loads(text).get("message") or text)
    text = text.splitlines()[0].strip() if text else ""
    return f": {text[:120]}" if text else ""
