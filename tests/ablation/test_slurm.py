"""The cluster paths against a real one-node Slurm (conftest's `slurm` fixture: cluster/dev_slurm.sh start).

    cluster/train.sbatch      a tiny 2-process CPU job end to end, with a `scontrol requeue` in the middle of
                              the run: it must finish every epoch from latest.pt
    ablate.py --executor slurm  a 2-cell grid: --no_wait submits one job array; the next invocation waits for
                              those jobs (submits nothing) while one is requeued mid-run (a preemption) and
                              the other runs into its (shortened) time limit: Slurm sends submitit's signal,
                              and submitit requeues it; it evaluates and reports; a third
                              starts nothing; Ctrl-C while waiting leaves the jobs and prints the scancel
                              line; --cancel; bad Slurm flags and a local sqlite store refused
    --slurm_nodes 2           one cell on the fixture's two nodes: one torchrun each, rank 0 on the first
    cluster/prepare.sbatch    a 2-shard array job equals a one-machine run, by checksums

Everything is tiny (1-3 epochs of a 1-layer model on the 4-track demo cache); the jobs run on this machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from music_continuation.ablation import ablate
from music_continuation.training.checkpoint import load_checkpoint
from tests.ablation.test_ablate import GRID, MAX_WINDOWS, TINY, all_runs
from tests.fault_launcher import fault_environment
from tests.training.test_training import epoch_blocks, sqlite_uri

# every test here starts Slurm jobs (a launch, torchrun) on the session's dev cluster
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm")]

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 420           # seconds for one tiny job, queueing included (a loaded 2-core machine)
RELEASE_DELAY_SECONDS = 2   # between a requeued job's pending state and its release (see release_if_pending)
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def environment(**extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHON=sys.executable, ABLATE_SLURM_POLL_SECONDS="1", **extra)
    return env


def sbatch(script: str, *argv, options=(), env=None) -> str:
    """Submit cluster/<script> from the repository's root (its SLURM_SUBMIT_DIR); the job id."""
    command = ["sbatch", "--parsable", *options, str(ROOT / "cluster" / script), *map(str, argv)]
    result = subprocess.run(command, cwd=ROOT, env=env or environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def sacct_states(job_id: str) -> list[str]:
    """The states of the job (every array element), from accounting; [] while it has no record yet."""
    result = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                            text=True, timeout=60)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def wait_final(job_id: str, count: int = 1) -> list[str]:
    """Poll accounting until all `count` elements are in a final state (it lags completion by a few seconds)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        states = sacct_states(job_id)
        if len(states) >= count and all(state in FINAL for state in states):
            return states
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=60)
    pytest.fail(f"job {job_id} not finished after {JOB_TIMEOUT} s: {sacct_states(job_id)}")


def release_requeued(job_id: str) -> None:
    """Slurm holds a requeued batch job for 120 s (its BeginTime); once it is pending again, start it now."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        if release_if_pending(job_id):
            return
        time.sleep(0.5)
    pytest.fail(f"job {job_id} was not pending again within {JOB_TIMEOUT} s of its requeue")


def release_if_pending(job_id: str, time_limit: str | None = None) -> bool:
    """If the requeued job is pending, start it now (with `time_limit` back, for a job whose limit
    run_into_the_time_limit shortened); whether it was. A job that requeued itself (submitit) is pending at once,
    while its old run is being killed: started again within the same second, its launch would be refused by
    slurmd ('already killed, do not launch batch job': the new credential is not newer than the revoked one,
    in whole seconds) and the job would fail; so it is started RELEASE_DELAY_SECONDS later."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    if "JobState=PENDING" not in shown:
        return False
    time.sleep(RELEASE_DELAY_SECONDS)
    limit = [f"TimeLimit={time_limit}"] if time_limit else []
    subprocess.run(["scontrol", "update", f"JobId={job_id}", *limit, "StartTime=now"], check=True, timeout=60)
    return True


def run_into_the_time_limit(job_id: str) -> None:
    """A real time limit, reached now: the running job's limit becomes 91-150 s from now. submitit's signal is
    due SIGNAL_DELAY_SECONDS = 120 s before the limit (for the 60-minute limit it was submitted with) and
    Slurm's time-limit check, every 30 s, sends it up to 30 s early: so the next check sends it (not a hand-sent
    USR2), and submitit has at least 60 s left to requeue the job before the limit would end it."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    run_time = shown.split("RunTime=", 1)[1].split()[0]            # [D-]HH:MM:SS
    days, _, clock = run_time.rpartition("-")
    hours, minutes, seconds = map(int, clock.split(":"))
    elapsed = int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    limit = (elapsed + 150) // 60                                   # whole minutes, 91-150 s after now
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}"], check=True, timeout=60)


def train_flags(cache: Path, checkpoint_dir: Path, epochs: int) -> list:
    return ["--data_dir", cache, "--epochs", epochs, "--batch_size", 2, "--checkpoint_dir", checkpoint_dir,
            "--mlflow_tracking_uri", sqlite_uri(checkpoint_dir.parent), *TINY_TRAIN]


TINY_TRAIN = ["--segment_frames", 8, "--d_model", 32, "--num_layers", 1, "--num_heads", 2, "--num_workers", 0,
              "--warmup_steps", 2, "--lr", 1e-3, "--log_audio_every", 0]
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


# ------------------------------------------------------------------------------------------ train.sbatch

def test_train_sbatch_end_to_end_with_a_requeue_in_the_middle(tiny_cache, tmp_path):
    """A 2-process CPU job of 3 epochs; `scontrol requeue` once epoch 1 is saved: SIGTERM stops the ranks, the job
    runs again from latest.pt (--resume auto), and its output (appended) has every epoch block, each exactly once
    after the resume; the checkpoint is the 3rd epoch's, of 2 processes."""
    epochs = 3
    checkpoint_dir = tmp_path / "ck"
    job = sbatch("train.sbatch", *train_flags(tiny_cache, checkpoint_dir, epochs=epochs),
                 options=[*CPU_JOB, f"--output={tmp_path}/%j.out"], env=environment(NPROC_PER_NODE="2"))
    output = tmp_path / f"{job}.out"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (checkpoint_dir / "latest.pt").is_file() or 1 not in epoch_blocks(output.read_text()):
        assert time.monotonic() < deadline and sacct_states(job) != ["COMPLETED"], "no epoch before the end"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    release_requeued(job)
    assert wait_final(job) == ["COMPLETED"], output.read_text()[-3000:]
    text = output.read_text()
    assert "resuming at epoch" in text, text[-3000:]
    resumed = text[text.rindex("resuming at epoch"):]
    restart_epoch = int(resumed.split()[3].rstrip(":"))
    assert 2 <= restart_epoch <= epochs      # it continued after a saved epoch, not from the start
    assert sorted(epoch_blocks(resumed)) == list(range(restart_epoch, epochs + 1))
    assert sorted(epoch_blocks(text)) == list(range(1, epochs + 1))
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
    state = load_checkpoint(checkpoint_dir / "latest.pt")
    assert state["epoch"] == epochs and state["world_size"] == 2 and state["args"]["resume"] == "auto"


# ------------------------------------------------------------------------------------ ablate --executor slurm

def ablate_command(study: dict, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "ablate.py"), "--executor", "slurm", "--data_dir", str(study["cache"]),
            "--out_dir", str(study["out"]), "--grid", str(study["grid"]), "--seeds", "1",
            "--max_windows", str(MAX_WINDOWS), "--mlflow_tracking_uri", study["uri"],
            "--experiment_name", study["experiment"], "--no_listeners", *map(str, TINY), *map(str, extra)]


def run_ablate(study: dict, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(ablate_command(study, *extra), cwd=study["out"].parent,
                          env=environment(**study.get("env", {})), capture_output=True, text=True,
                          timeout=2 * JOB_TIMEOUT)


# Both cells train 3 epochs and are stopped once their epoch 1 is saved, to continue from latest.pt: the target
# cell as a preemption stops it (`scontrol requeue`: SIGTERM), the spectral cell by a real time limit (shortened
# mid-run: Slurm sends submitit's USR2, CellJob.checkpoint stops the ranks and submitit requeues the element).
# Slurm's time-limit check comes up to 30 s after the limit is shortened, and a tiny epoch takes 1-20 s: so every
# cell is held at the start of its epoch 2 (tests/fault_launcher.py's hold, in the jobs through TEST_FAULTS) until
# both cells have been stopped and started again; then it trains epochs 2 and 3 after its resume.
EPOCHS = 3
HELD_EPOCH = 2
SLURM_GRID = [{"name": "target", "flags": {"loss_weight_target": 1.0, "epochs": EPOCHS}},
              {"name": GRID[1]["name"], "flags": {**GRID[1]["flags"], "epochs": EPOCHS}}]
INTERRUPTIONS = {"target/seed0": "requeue", "spectral/seed0": "time limit"}
SUBMITTED_LIMIT = "60"          # minutes: ablate.py's default --slurm_time, given back to a time-limited job


def gather_with_interruptions(study: dict) -> subprocess.CompletedProcess:
    """The invocation that waits for the submitted jobs; each cell interrupted by INTERRUPTIONS once its epoch 1
    is saved (the ablate.py waiting must say 'requeued' and the cells continue from latest.pt)."""
    process = subprocess.Popen(ablate_command(study), cwd=study["out"].parent, env=environment(**study.get("env", {})),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Each requeued job is released as soon as it is pending again: waiting for the other cell first could let
    # Slurm's 120 s hold expire on a loaded machine (the job would start again on its own, past the release).
    waiting, to_release = dict(INTERRUPTIONS), {}
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while (waiting or to_release) and time.monotonic() < deadline and process.poll() is None:
            for label, command in list(waiting.items()):
                if (study["out"] / label / "latest.pt").is_file():
                    job = study["records"][label]["job_id"]
                    if command == "requeue":
                        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
                    else:
                        run_into_the_time_limit(job)
                    to_release[job] = SUBMITTED_LIMIT if command == "time limit" else None
                    del waiting[label]
            for job, time_limit in list(to_release.items()):
                if release_if_pending(job, time_limit):
                    del to_release[job]
            time.sleep(0.2)
    finally:
        study["hold"].unlink(missing_ok=True)          # the held cells go on (or, after a failure, end)
    if waiting or to_release:
        process.kill()
        _, stderr = process.communicate(timeout=60)
        logs = {label: (study["out"] / label / "train.log").read_text()[-1500:]
                for label in INTERRUPTIONS if (study["out"] / label / "train.log").is_file()}
        pytest.fail(f"not interrupted {waiting}, not released {to_release} (ablate.py exit {process.returncode}):\n"
                    f"{stderr[-3000:]}\n{logs}")
    stdout, stderr = process.communicate(timeout=2 * JOB_TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def slurm_study(tiny_cache, mlflow_server, tmp_path_factory):
    from mlflow.tracking import MlflowClient
    folder = tmp_path_factory.mktemp("slurm_ablate")
    grid = folder / "grid.json"
    grid.write_text(json.dumps(SLURM_GRID))
    hold = folder / "hold"
    hold.touch()
    # The jobs inherit the submitting ablate.py's environment: TEST_FAULTS reaches every rank of both cells.
    faults = fault_environment(f"hold={HELD_EPOCH}:{hold}", {"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                               everywhere=True)
    state = {"cache": tiny_cache, "uri": mlflow_server, "out": folder / "study", "grid": grid, "hold": hold,
             "experiment": "ablation-slurm-test", "client": MlflowClient(mlflow_server), "env": faults}
    try:
        state["submitted"] = run_ablate(state, "--no_wait")
        state["records"] = json.loads((state["out"] / "slurm" / "jobs.json").read_text())
        state["gathered"] = gather_with_interruptions(state)
    finally:
        hold.unlink(missing_ok=True)
    runs_before = {run.info.run_id for run in all_runs(state["client"], state["experiment"])}
    state["third"] = run_ablate(state)
    state["new_runs"] = {run.info.run_id for run in all_runs(state["client"], state["experiment"])} - runs_before
    return state


def test_no_wait_submits_one_job_array_and_exits(slurm_study):
    submitted = slurm_study["submitted"]
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "submitted 2 cells as job array" in submitted.stderr and "--no_wait" in submitted.stderr
    ids = sorted(record["job_id"] for record in slurm_study["records"].values())
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]


def test_the_next_invocation_waits_for_the_same_jobs_and_reports(slurm_study):
    gathered = slurm_study["gathered"]
    assert gathered.returncode == 0, gathered.stderr[-3000:]
    assert "submitted" not in gathered.stderr            # queued / running jobs are waited for, not resubmitted
    assert gathered.stderr.count("; waiting for it") == 2
    for label, record in slurm_study["records"].items():
        assert f"cell {label} (job {record['job_id']}): done" in gathered.stderr
    for label in INTERRUPTIONS:
        job = slurm_study["records"][label]["job_id"]
        assert f"cell {label} (job {job}): requeued" in gathered.stderr
        log = (slurm_study["out"] / label / "train.log").read_text()
        # stopped where it was held, saying so in its log (the time-limited cell too: CellJob.checkpoint waits for
        # its ranks before submitit requeues it), and resumed there
        stopped = f"interrupted: latest checkpoint is {slurm_study['out'] / label / 'latest.pt'}, epoch 1;"
        assert stopped in log and f"resuming at epoch {HELD_EPOCH}:" in log, log[-3000:]
        resumed = log[log.index(f"resuming at epoch {HELD_EPOCH}:"):]
        assert [1] + sorted(epoch_blocks(resumed)) == sorted(epoch_blocks(log)) == [1, 2, 3], log[-3000:]
        assert load_checkpoint(slurm_study["out"] / label / "latest.pt")["epoch"] == EPOCHS
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
        assert "Restarts=1" in shown, shown
    # the time-limit path: Slurm sent the USR2 (nothing else here does), submitit caught it, called
    # CellJob.checkpoint and requeued the element itself
    usr2 = slurm_study["records"]["spectral/seed0"]["job_id"]
    submitit_log = "".join(path.read_text() for path in sorted((slurm_study["out"] / "slurm" / usr2).glob("*_log.*")))
    for said in ("Caught signal SIGUSR2", "Calling checkpoint method", f"Requeued job {usr2}"):
        assert said in submitit_log, submitit_log[-3000:]
    assert json.loads((slurm_study["out"] / "slurm" / "jobs.json").read_text()) == slurm_study["records"]
    report = slurm_study["out"] / "report"
    assert {"results.csv", "results.md", "results.png"} <= {path.name for path in report.iterdir()}
    assert "| target |" in gathered.stdout and "| spectral |" in gathered.stdout
    assert "share rms_target" in gathered.stdout       # the gradient-share table, '-' where not logged


def test_one_parent_run_and_two_finished_children(slurm_study):
    runs = all_runs(slurm_study["client"], slurm_study["experiment"])
    parents = [run for run in runs if ablate.PARENT_TAG not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [run for run in runs if run.data.tags.get(ablate.PARENT_TAG) == parents[0].info.run_id]
    assert sorted(run.data.tags[ablate.TAG_CELL] for run in children) == ["spectral", "target"]   # requeue: same run
    assert all(run.info.status == "FINISHED" for run in children)
    assert all("eval_latent_mse" in run.data.metrics for run in children)


def test_a_third_invocation_starts_nothing(slurm_study):
    third = slurm_study["third"]
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stderr.count("skipped") == 2
    assert "submitted" not in third.stderr and "evaluation: job" not in third.stderr
    assert slurm_study["new_runs"] == set()
    assert json.loads((slurm_study["out"] / "slurm" / "jobs.json").read_text()) == slurm_study["records"]


def test_a_two_node_cell_runs_one_rank_per_node_with_rank_0_on_the_first(tiny_cache, mlflow_server, tmp_path):
    """--slurm_nodes 2: one torchrun per node (static rendezvous on the first node), world size 2; rank 0's output
    (the epoch blocks) is the cell's train.log, the second node's output train.log.node1."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(GRID[:1]))              # the target cell, 1 epoch (TINY)
    study = {"cache": tiny_cache, "uri": mlflow_server, "out": tmp_path / "study", "grid": grid,
             "experiment": "ablation-slurm-two-nodes"}
    result = run_ablate(study, "--slurm_nodes", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    cell = study["out"] / "target" / "seed0"
    job = json.loads((study["out"] / "slurm" / "jobs.json").read_text())["target/seed0"]["job_id"]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NNodes,State"], capture_output=True,
                           text=True, timeout=60).stdout.split()
    assert nodes == ["2|COMPLETED"], nodes
    assert load_checkpoint(cell / "latest.pt")["world_size"] == 2          # --nproc 1 on each of 2 nodes
    log, second = (cell / "train.log").read_text(), (cell / "train.log.node1").read_text()
    assert "2 x cpu" in log and sorted(epoch_blocks(log)) == [1], log[-3000:]
    assert epoch_blocks(second) == {} and "Traceback" not in second, second[-3000:]
    assert "| target |" in result.stdout


def test_ctrl_c_while_waiting_leaves_the_jobs_and_cancel_stops_them(slurm_study, tmp_path):
    study = dict(slurm_study, out=tmp_path / "study", experiment="ablation-slurm-cancel")
    process = subprocess.Popen(ablate_command(study, "--epochs", 50), cwd=tmp_path, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = study["out"] / "slurm" / "jobs.json"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not records.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    ids = sorted(record["job_id"] for record in json.loads(records.read_text()).values())
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted while waiting:") and f"scancel {' '.join(ids)}" in last, stderr[-2000:]
    assert "Traceback" not in stderr
    assert all(state not in FINAL for state in sacct_states(ids[0].split("_")[0]))     # still the cluster's
    cancelled = run_ablate(study, "--epochs", 50, "--cancel")
    assert cancelled.returncode == 0 and "cancelled: scancel" in cancelled.stderr, cancelled.stderr[-2000:]
    assert all(job_id in cancelled.stderr for job_id in ids)
    assert set(wait_final(ids[0].split("_")[0], count=2)) == {"CANCELLED"}


def test_slurm_flags_and_a_local_sqlite_store_are_refused_before_submitting(tmp_path, tiny_cache):
    base = [sys.executable, str(ROOT / "ablate.py"), "--executor", "slurm", "--data_dir", str(tiny_cache),
            "--out_dir", str(tmp_path / "study"), "--seeds", "1", "--no_listeners"]
    cases = [(["--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"], "not one they share; use an MLflow server"),
             (["--mlflow_tracking_uri", "http://127.0.0.1:9", "--slurm_partition", "nope"],
              "Slurm refuses the request"),
             (["--mlflow_tracking_uri", "http://127.0.0.1:9", "--slurm_cpus_per_task", "999"],
              "Slurm refuses the request"),
             (["--mlflow_tracking_uri", "http://127.0.0.1:9", "--slurm_time", "soon"], "--slurm_time 'soon'"),
             (["--mlflow_tracking_uri", "http://127.0.0.1:9", "--slurm_extra", "account"], "expected KEY=VALUE")]
    for extra, expected in cases:
        result = subprocess.run(base + extra, cwd=tmp_path, env=environment(), capture_output=True, text=True,
                                timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (extra, result.stderr)
        assert not (tmp_path / "study").exists()


# ------------------------------------------------------------------------------------------ prepare.sbatch

def checksums(cache: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (cache / "tracks").iterdir()}


def test_two_shard_array_job_equals_one_machine(tmp_path):
    from music_continuation.data import cache as data
    from music_continuation.data import prepare as prepare_data
    from tests.data.test_shards import MIN_SECONDS, SETTINGS, names_in_both_shards, without_timings, write_tracks
    audio_dir = write_tracks(tmp_path / "audio", names_in_both_shards())
    one = prepare_data.prepare(audio_dir, tmp_path / "one", val_fraction=0.4, **SETTINGS)
    shared = tmp_path / "shared"
    job = sbatch("prepare.sbatch", "--audio_dir", audio_dir, "--out_dir", shared, "--encodec_weights", "random",
                 "--device", "cpu", "--min_seconds", MIN_SECONDS, "--val_fraction", 0.4, "--workers", 1,
                 options=["--array=0-1", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%A_%a.out"])
    assert wait_final(job, count=2) == ["COMPLETED", "COMPLETED"], \
        [path.read_text()[-2000:] for path in tmp_path.glob("*.out")]
    assert checksums(shared) == checksums(tmp_path / "one") and checksums(shared)
    merged = data.read_manifest(shared)
    assert without_timings(merged) == without_timings(one) and merged["settings"]["last_run"]["shards"] == 2
