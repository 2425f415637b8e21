"""Rank 0's MLflow run: created (or reopened on resume), parameters once, metrics per epoch, artifacts.

Failing at start raises (before training starts); failing later only warns: metrics that could not be
sent stay queued and are re-sent with the next epoch's, and artifacts stay on disk.

CHECKPOINT_DIR/mlflow_run.json records the run a checkpoint folder's training logs to, from its start (before
any checkpoint holds the run id). A run whose process was killed (SIGKILL, a stuck job, a killed ablation) is
left RUNNING by MLflow; the next start in that folder finds it there: with --resume auto and no checkpoint yet
(a requeued Slurm cell) it continues that run, otherwise it marks it KILLED.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from pathlib import Path

from music_continuation.utils import one_line, warn

PARENT_TAG = "mlflow.parentRunId"     # MLflow's own tag: the UI nests a run under its parent
RUN_RECORD = "mlflow_run.json"        # in the checkpoint folder: {"run_id", "tracking_uri"} of its training


class MlflowLogger:
    def __init__(self, tracking_uri, experiment_name: str, run_name=None, run_id=None, parent_run_id=None,
                 tags: dict | None = None, checkpoint_dir=None, continue_recorded: bool = False):
        # A dead server must cost seconds, not minutes of retries, while the other ranks wait.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.pending = []
        self.resumed = False
        with sqlite_store_lock(self.tracking_uri):
            if checkpoint_dir is not None and run_id is None:
                run_id = self._settle_recorded_run(checkpoint_dir, continue_recorded)
            self._open_run(experiment_name, run_name, run_id, parent_run_id, tags)
        if checkpoint_dir is not None:
            write_run_record(checkpoint_dir, self.run_id, self.tracking_uri)

    def _settle_recorded_run(self, checkpoint_dir, continue_it: bool):
        """The recorded run of an earlier start in this folder that never finished: its id to continue it, or
        None after marking it KILLED if it was left RUNNING."""
        from mlflow.tracking import MlflowClient
        record = read_run_record(checkpoint_dir)
        if record is None:
            return None
        client = MlflowClient(self.tracking_uri)
        if record.get("tracking_uri") != client.tracking_uri:
            return None
        try:
            status = client.get_run(record["run_id"]).info.status
        except Exception:  # noqa: BLE001 - a deleted run or another store: nothing to settle
            return None
        if continue_it and status != "FINISHED":
            return record["run_id"]
        if status == "RUNNING":
            client.set_terminated(record["run_id"], status="KILLED")
            warn(f"MLflow run {record['run_id']} of an earlier training in {checkpoint_dir} was left RUNNING (its "
                 f"process was killed); marked KILLED")
        return None

    def _open_run(self, experiment_name: str, run_name, run_id, parent_run_id, tags: dict | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(self.tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id, self.resumed = run_id, True
                return
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warn(f"MLflow run {run_id} of the checkpoint is not on {self.tracking_uri}; starting a new run")
        tags = dict(tags or {})
        if parent_run_id:     # a child lives in its parent's experiment
            experiment_id = self.client.get_run(parent_run_id).info.experiment_id
            tags[PARENT_TAG] = parent_run_id
        else:
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(key, str(value)) for key, value in sorted(params.items())]
        for start in range(0, len(items), 100):          # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start: start + 100])

    def set_tag(self, key: str, value) -> None:
        try:
            self.client.set_tag(self.run_id, key, str(value))
        except Exception as error:  # noqa: BLE001 - never let logging kill a long training run
            warn(f"MLflow tag {key} not set ({short(error)})")

    def log_metrics(self, metrics: dict, step: int) -> bool:
        from mlflow.entities import Metric
        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        return self.flush()

    def flush(self) -> bool:
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                self.pending = self.pending[1000:]
            return True
        except Exception as error:  # noqa: BLE001 - never let logging kill a long training run
            warn(f"MLflow logging failed ({short(error)}); {len(self.pending)} metric values queued "
                 f"for the next epoch, training continues")
            return False

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        try:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        except Exception as error:  # noqa: BLE001
            warn(f"MLflow artifact upload failed ({short(error)}); the files stay in {local_dir}")

    def log_artifact(self, local_path: Path) -> None:
        try:
            self.client.log_artifact(self.run_id, str(local_path))
        except Exception as error:  # noqa: BLE001
            warn(f"MLflow artifact upload failed ({short(error)}); the file stays at {local_path}")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as error:  # noqa: BLE001
            warn(f"could not mark MLflow run {self.run_id} {status} ({short(error)})")


class JsonlLogger:
    """MlflowLogger's interface writing one JSON object per call to a local file (`--logger jsonl`): for machines
    without MLflow (bench/gpu_check.sh). Lines: {"run_id", "kind": params|tag|metrics|artifacts|finish, ...}.
    A resumed run (the checkpoint's run id) appends to the same file under the same id."""

    def __init__(self, path, run_id=None, tags: dict | None = None):
        import uuid
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resumed = run_id is not None
        self.run_id = run_id or uuid.uuid4().hex
        self.tracking_uri = str(self.path)
        for key, value in (tags or {}).items():
            self.set_tag(key, value)

    def _write(self, kind: str, **fields) -> None:
        import json
        with open(self.path, "a") as file:       # appended and flushed per line: a crash loses no earlier line
            file.write(json.dumps({"run_id": self.run_id, "kind": kind, "time": time.time(), **fields},
                                  default=str) + "\n")

    def log_params(self, params: dict) -> None:
        self._write("params", params={key: str(value) for key, value in sorted(params.items())})

    def set_tag(self, key: str, value) -> None:
        self._write("tag", key=key, value=str(value))

    def log_metrics(self, metrics: dict, step: int) -> bool:
        self._write("metrics", step=step, metrics={key: float(value) for key, value in metrics.items()})
        return True

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self._write("artifacts", local_dir=str(local_dir), artifact_path=artifact_path)

    def log_artifact(self, local_path: Path) -> None:
        self._write("artifacts", local_dir=str(local_path), artifact_path="")

    def finish(self, status: str = "FINISHED") -> None:
        self._write("finish", status=status)


@contextlib.contextmanager
def sqlite_store_lock(tracking_uri: str):
    """For a sqlite store: hold an exclusive flock on DB.lock beside the database file.

    The first client of a new sqlite store creates its tables and runs the schema migrations (alembic);
    two runs starting at once would both migrate and one fails ('table ... already exists'). Opening the
    store, and creating the experiment, one process at a time makes that impossible. Other stores, and a
    folder where no lock file can be made (sqlite then reports its own error), go unlocked.
    """
    database = tracking_uri[len("sqlite:///"):].split("?", 1)[0] if tracking_uri.startswith("sqlite:///") else ""
    handle = None
    if database and database != ":memory:":
        path = Path(database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_name(f".{path.name}.lock"), "a")
        except OSError:
            handle = None
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            handle.close()      # closing releases the lock


def read_run_record(checkpoint_dir) -> dict | None:
    try:
        record = json.loads((Path(checkpoint_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def write_run_record(checkpoint_dir, run_id: str, tracking_uri: str) -> None:
    from music_continuation.utils import atomic_path
    try:
        with atomic_path(Path(checkpoint_dir) / RUN_RECORD) as tmp:
            tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}) + "\n")
    except OSError as error:
        warn(f"cannot record the MLflow run in {checkpoint_dir} ({one_line(error)})")


def close_recorded_run(checkpoint_dir, status: str = "FAILED") -> None:
    """Mark the folder's recorded run `status` if it is still RUNNING: the launcher's cleanup when rank 0 was
    killed and could not close it itself."""
    record = read_run_record(checkpoint_dir)
    if record is None:
        return
    try:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(record["tracking_uri"])
        if client.get_run(record["run_id"]).info.status == "RUNNING":
            client.set_terminated(record["run_id"], status=status)
    except Exception as error:  # noqa: BLE001 - the job's own line matters more; the next start retries
        warn(f"could not mark MLflow run {record['run_id']} {status} ({short(error)})")


# MLflow's client wraps urllib3's retry error: "API request to URL failed with exception HTTPConnectionPool(host=...,
# port=...): Max retries exceeded with url: ... (Caused by ResponseError('too many 500 error responses'))".
API_FAILURE = re.compile(r"API request to (?P<url>\S+) failed with exception .*?\(Caused by \w+\((?P<cause>.*)\)\)",
                         re.S)


def short(error: BaseException) -> str:
    """The error in one short line: for a failed API request, the URL and urllib3's cause only."""
    text = str(error)
    match = API_FAILURE.search(text)
    if match:
        cause = match.group("cause").strip().strip("'\"")
        cause = cause.rsplit(">: ", 1)[-1]          # '<urllib3.connection.HTTPConnection object at 0x..>: reason'
        return f"API request to {match.group('url')} failed: {cause}"[:300]
    return one_line(error)[:300]     # an HTTP error can carry a whole HTML page on its first line


def git_commit() -> str:
    """The code's commit (for the run's parameters), or 'unknown' outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
