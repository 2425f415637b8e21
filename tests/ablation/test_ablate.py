"""ablate.py end to end: a 3-cell grid of tiny runs (two that train, one that fails at start) on the real
MLflow server, with the real launcher and the real evaluation.

One study folder is shared by the tests of this module (module-scoped fixture), in the order a user would
go: the first invocation is interrupted with SIGINT once the second cell has started, the second finishes
it (and reports the failing cell), a third starts nothing, --print_commands gives a command that is run by
hand, and --report_only rebuilds the report with it.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from music_continuation.ablation import ablate

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--segment_frames", 8, "--d_model", 32, "--num_layers", 1, "--num_heads", 2, "--num_workers", 0,
        "--warmup_steps", 2, "--lr", 1e-3, "--log_audio_every", 0, "--epochs", 1, "--nproc", 1, "--batch_size", 4]
GRID = [{"name": "target", "flags": {"loss_weight_target": 1.0}},
        {"name": "spectral", "flags": {"loss_weight_target": 0.5, "loss_weight_spectral": 0.5}},
        # valid flags, but the tiny cache's tracks are too short for 2 x 2000 frames: the launcher refuses at start
        {"name": "too_long", "flags": {"segment_frames": 2000}}]
MAX_WINDOWS = 4
TIMEOUT = 420
# The study runs with --no_listeners: what it tests is the study, and each evaluating invocation would pay the
# listeners' warm-up (numba compile, onnxruntime session). Their report columns: test_report_columns_of_the_listeners.


def environment() -> dict:
    return {key: value for key, value in os.environ.items()
            if key not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


def ablate_argv(study: dict, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "ablate.py"), "--data_dir", str(study["cache"]), "--out_dir",
            str(study["out"]), "--grid", str(study["grid"]), "--seeds", "1", "--max_windows", str(MAX_WINDOWS),
            "--mlflow_tracking_uri", study["uri"], "--experiment_name", "ablation-test", "--no_listeners",
            *map(str, TINY), *map(str, extra)]


def run_ablate(study: dict, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(ablate_argv(study, *extra), cwd=study["out"].parent, env=environment(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def all_runs(client, experiment_name="ablation-test") -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    return list(client.search_runs([experiment.experiment_id], max_results=1000)) if experiment else []


def interrupt_during_second_cell(study: dict) -> dict:
    """Start the whole grid; SIGINT ablate.py once the second cell's launcher has begun training."""
    process = subprocess.Popen(ablate_argv(study), cwd=study["out"].parent, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = study["out"] / "spectral" / "seed0" / "train.log"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and "starting:" in log.read_text(errors="replace"):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    pids = [int(line.rsplit("launcher pid ", 1)[1].rstrip(")")) for line in stderr.splitlines()
            if "launcher pid " in line]
    return {"code": process.returncode, "stdout": stdout, "stderr": stderr, "launcher_pids": pids}


@pytest.fixture(scope="module")
def study(tiny_cache, mlflow_server, tmp_path_factory):
    from mlflow.tracking import MlflowClient
    folder = tmp_path_factory.mktemp("ablate")
    grid = folder / "grid.json"
    grid.write_text(json.dumps(GRID))
    state = {"cache": tiny_cache, "uri": mlflow_server, "out": folder / "study", "grid": grid,
             "client": MlflowClient(mlflow_server)}
    state["interrupted"] = interrupt_during_second_cell(state)
    state["second"] = run_ablate(state)
    runs_before = {run.info.run_id for run in all_runs(state["client"])}
    state["third"] = run_ablate(state, "--only", "target", "spectral")
    state["new_runs"] = {run.info.run_id for run in all_runs(state["client"])} - runs_before
    return state


def parent_and_children(study):
    client = study["client"]
    runs = all_runs(client)
    parents = [run for run in runs if ablate.TAG_STUDY in run.data.tags and ablate.PARENT_TAG not in run.data.tags]
    assert len(parents) == 1, [run.data.tags for run in runs]
    parent = parents[0]
    children = [run for run in runs if run.data.tags.get(ablate.PARENT_TAG) == parent.info.run_id]
    return parent, children


# ------------------------------------------------------------------------------------ up-front errors

@pytest.mark.parametrize("grid, extra, expected", [
    ([{"name": "a", "flags": {"no_such_flag": 1}}], [], "unrecognized arguments: --no_such_flag"),
    ([{"name": "a", "flags": {"lr": -1}}], [], "cell 'a': --lr must be a positive number"),
    ([{"name": "a", "flags": {"seed": 3}}], [], "--seed cannot be set per cell"),
    ([{"name": "a", "flags": {}}, {"name": "a", "flags": {}}], [], "'a' appears twice"),
    ([{"name": "a", "flags": {}}], ["--only", "b"], "--only b: no such cell"),
    ([{"name": "a", "flags": {}}], ["--epochz", "2"], "unrecognized arguments: --epochz"),
    ([{"name": "a", "flags": {}}], ["--seed", "2"], "--seed cannot be given to ablate.py"),
])
def test_bad_grids_flags_and_names_are_one_line_errors_before_anything_runs(grid, extra, expected, tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    with pytest.raises(ablate.AblateError) as error:
        ablate.prepare(["--out_dir", str(tmp_path / "out"), "--grid", str(path), "--no_listeners", *extra])
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_study_names_the_figures_and_baselines_as_evaluation_does():
    from music_continuation.evaluation import scoring as evaluation
    assert ablate.BASELINES is evaluation.BASELINES and set(ablate.figure_names()) <= set(evaluation.SCORE_NAMES)


def test_listener_flags_reach_the_evaluation_and_its_cache_key(tmp_path):
    from music_continuation.evaluation.listeners import BEAT_TRACKERS
    assert ablate.BEAT_TRACKERS == BEAT_TRACKERS
    import types
    cell = types.SimpleNamespace(folder=tmp_path)
    (tmp_path / "best.pt").write_bytes(b"x")
    keys = {}
    for extra in ([], ["--no_listeners"], ["--beat_tracker", "madmom"], ["--no_listeners", "--beat_tracker", "madmom"]):
        args = ablate.build_parser().parse_args(["--out_dir", "x", *extra])
        keys[" ".join(extra)] = ablate.evaluation_key(cell, "cache", args)
    assert keys[""]["listeners"] is True and keys[""]["beat_tracker"] == "librosa"     # on by default
    assert keys["--no_listeners"]["listeners"] is False
    assert len({json.dumps(key, sort_keys=True) for key in keys.values()}) == 3       # without listeners: one key
    assert keys["--no_listeners"] == keys["--no_listeners --beat_tracker madmom"]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "a", "flags": {}}]))
    argv = ["--out_dir", str(tmp_path / "out"), "--grid", str(grid), "--no_listeners", "--musical_every", "2"]
    plain, madmom = ablate.prepare(argv), ablate.prepare(argv + ["--beat_tracker", "madmom"])
    assert "beat_tracker" not in plain["shared"] and madmom["shared"]["beat_tracker"] == "madmom"   # to the cells too
    assert plain["cells"][0].hash == madmom["cells"][0].hash       # validation-only flags: the same training


def test_a_missing_listener_package_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    from music_continuation.evaluation import listeners
    from music_continuation.evaluation.listeners import packages

    def missing(beat_tracker="librosa"):
        packages.require("no_such_module_basic_pitch", "basic-pitch", "melody listener")
    monkeypatch.setattr(listeners, "check_available", missing)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "a", "flags": {}}]))
    argv = ["--out_dir", str(tmp_path / "out"), "--grid", str(grid)]
    with pytest.raises(ablate.AblateError) as error:
        ablate.prepare(argv)
    message = str(error.value)
    assert "basic-pitch" in message and packages.INSTALL_COMMAND in message and "--no_listeners" in message
    assert "\n" not in message and not (tmp_path / "out").exists()
    assert ablate.prepare(argv + ["--no_listeners"])["args"].no_listeners          # skipping them needs none
    assert ablate.prepare(argv + ["--print_commands"])["args"].print_commands     # printing commands evaluates nothing


def test_default_grid_has_the_five_cells():
    grid = ablate.load_grid(None)
    assert [cell["name"] for cell in grid] == ["continuation", "continuation_spectral", "balanced",
                                               "reconstruction_continuation_spectral", "unity"]
    weights = {cell["name"]: tuple(cell["flags"][f"loss_weight_{c}"] for c in ("input", "target", "spectral", "mel"))
               for cell in grid}
    assert weights["balanced"] == (0, 0.4, 0.3, 0.3)
    assert weights["reconstruction_continuation_spectral"] == (0.3, 0.4, 0.3, 0)
    assert grid[-1]["flags"]["unity_test"] is True


# ------------------------------------------------------------------------------------- the study

@pytest.mark.slow
def test_sigint_stops_the_study_cleanly_with_exit_130(study):
    result = study["interrupted"]
    assert result["code"] == 130, result["stderr"][-3000:]
    assert result["stderr"].strip().splitlines()[-1].startswith("interrupted")
    for pid in result["launcher_pids"]:       # each launcher ran in its own process group: none of it is left
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.mark.slow
def test_rerun_finishes_the_study_and_reports_the_failed_cell(study):
    result = study["second"]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "target/seed0 (hash" in result.stderr and "skipped" in result.stderr     # done before the interrupt
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 failed: too_long/seed0 (exit 2:")
    assert (study["out"] / "spectral" / "seed0" / "best.pt").is_file()
    assert "overhead: " in result.stdout


@pytest.mark.slow
def test_parent_and_children_carry_their_tags(study):
    parent, children = parent_and_children(study)
    assert parent.info.status == "FINISHED"                    # the third invocation completed its cells
    assert parent.data.params["grid_hash"] and parent.data.params["git_commit"]
    assert json.loads(parent.data.params["grid"])[0]["name"] == "target"
    finished = {(run.data.tags[ablate.TAG_CELL], run.data.tags[ablate.TAG_SEED]): run
                for run in children if run.info.status == "FINISHED"}
    assert set(finished) == {("target", "0"), ("spectral", "0")}
    for (name, seed), run in finished.items():
        record = json.loads((study["out"] / name / f"seed{seed}" / "cell.json").read_text())
        assert run.data.tags[ablate.TAG_HASH] == record["hash"]
        assert run.data.tags[ablate.TAG_STUDY] == parent.data.tags[ablate.TAG_STUDY]
        assert run.info.experiment_id == parent.info.experiment_id
        assert run.data.metrics["eval_rms_target"] > 0                # the evaluation went to the cell's run


@pytest.mark.slow
def test_third_invocation_starts_no_run_and_succeeds(study):
    result = study["third"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert study["new_runs"] == set()
    assert result.stderr.count("skipped") == 2
    assert "| target |" in result.stdout and "| *oracle* |" in result.stdout


@pytest.mark.slow
def test_report_equals_evaluating_each_checkpoint(study):
    from music_continuation.evaluation import scoring as evaluation
    rows = list(csv.DictReader(open(study["out"] / "report" / "results.csv")))
    assert [(row["cell"], row["seed"]) for row in rows] == [("target", "0"), ("spectral", "0")]
    _, children = parent_and_children(study)
    for row in rows:
        best = study["out"] / row["cell"] / f"seed{row['seed']}" / "best.pt"
        expected = evaluation.evaluate_checkpoint(best, data_dir=study["cache"], max_windows=MAX_WINDOWS,
                                                  listeners=False)
        assert int(row["windows"]) == expected["windows"] == MAX_WINDOWS
        for name in evaluation.SCORE_NAMES:
            for column, value in ((name, expected["model"][name]), (f"skill_{name}", expected["skill"][name]),
                                  (f"repeat_{name}", expected["baselines"]["repeat"][name])):
                if value is None:
                    assert row[column] == ""
                else:
                    assert float(row[column]) == pytest.approx(value, rel=1e-5, abs=1e-7), column
        assert row["run_id"] in {run.info.run_id for run in children}
    markdown = (study["out"] / "report" / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| target |")][0]
    cells = [cell.strip() for cell in table.strip("|").split("|")]
    assert cells[1] == "0/1/0/0" and cells[2] == "1"
    assert float(cells[3 + evaluation.SCORE_NAMES.index("rms_target")].strip("*")) == \
        pytest.approx(float(rows[0]["rms_target"]), abs=1e-4)
    assert "**" in markdown and "not comparable" in markdown
    for name in evaluation.LISTENER_FIGURES:         # --no_listeners: empty in the CSV, n/a in the table
        assert all(row[name] == "" and row[f"skill_{name}"] == "" for row in rows), name
    assert "n/a" in table and "nan" not in markdown.lower()


@pytest.mark.slow
def test_png_is_a_real_image(study):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    path = study["out"] / "report" / "results.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    parent, _ = parent_and_children(study)
    artifacts = {info.path for info in study["client"].list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {"report/results.csv", "report/results.md", "report/results.png"}


@pytest.mark.slow
def test_printed_command_makes_the_same_child_run_and_report_only_rebuilds(study):
    result = run_ablate(study, "--seeds", 2, "--only", "target", "--print_commands")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(commands) == 1 and "--seed 1 " in commands[0]       # seed 0 is finished: only seed 1 is printed
    parent, _ = parent_and_children(study)
    argv = shlex.split(commands[0])
    assert argv[argv.index("--mlflow_parent_run_id") + 1] == parent.info.run_id
    by_hand = subprocess.run(argv, cwd=study["out"].parent, env=environment(), capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    record = json.loads((study["out"] / "target" / "seed1" / "cell.json").read_text())
    _, children = parent_and_children(study)
    made = [run for run in children if run.data.tags.get(ablate.TAG_CELL) == "target"
            and run.data.tags.get(ablate.TAG_SEED) == "1"]
    assert len(made) == 1 and made[0].info.status == "FINISHED" and made[0].data.tags[ablate.TAG_HASH] == record["hash"]

    report = run_ablate(study, "--seeds", 2, "--only", "target", "spectral", "--report_only")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "not finished yet (not in the report): spectral/seed1" in report.stderr
    rows = list(csv.DictReader(open(study["out"] / "report" / "results.csv")))
    assert [(row["cell"], row["seed"]) for row in rows] == [("target", "0"), ("target", "1"), ("spectral", "0")]
    assert rows[1]["run_id"] == made[0].info.run_id
    line = [line for line in report.stdout.splitlines() if line.startswith("| target |")][0]
    assert "| 2 |" in line and " ± " in line                        # two seeds: mean ± std


def test_report_columns_of_the_listeners(tmp_path):
    """The listeners' columns: best-cell marks by their own rule (higher melody_f1 / beat_f1, tempo_ratio closest to
    1, lower frechet_codec), n/a where a figure is undefined (a silent reference), never 'nan'."""
    from music_continuation.ablation.report import write_report
    from music_continuation.evaluation.scoring import LISTENER_FIGURES, SCORE_NAMES

    def result(**listened):
        figures = {name: 0.5 for name in SCORE_NAMES} | {"level": 1.0} | listened
        baseline = {name: 0.25 for name in SCORE_NAMES} | {name: None for name in LISTENER_FIGURES}
        return {"model": figures, "skill": {name: None for name in SCORE_NAMES},
                "baselines": {name: baseline for name in ablate.BASELINES}, "epoch": 1, "windows": 4,
                "target_audio": "codec", "weights": {"rms_input": 0, "rms_target": 1, "spectral": 0, "mel": 0}}
    rows = [{"cell": "a", "seed": 0, "hash": "h", "run_id": "r1",
             "result": result(melody_f1=0.2, pitch_class_agreement=0.3, beat_f1=0.9, tempo_ratio=1.3,
                              frechet_codec=50.0)},
            {"cell": "b", "seed": 0, "hash": "h", "run_id": "r2",
             "result": result(melody_f1=0.6, pitch_class_agreement=None, beat_f1=0.4, tempo_ratio=0.8,
                              frechet_codec=None)},
            {"cell": "c", "seed": 0, "hash": "h", "run_id": "r3",
             "result": result(melody_f1=0.1, pitch_class_agreement=0.1, beat_f1=0.1, tempo_ratio=1.5,
                              frechet_codec=80.0)}]
    markdown = write_report(rows, ["a", "b", "c"], tmp_path, ["# test"])
    header = next(line for line in markdown.splitlines() if line.startswith("| cell | weights"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]

    def column(cell, name):
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {cell} |"))
        return [part.strip() for part in line.strip("|").split("|")][columns.index(name)]
    assert column("b", "melody_f1") == "**0.6000**" and column("a", "beat_f1") == "**0.9000**"
    assert column("b", "tempo_ratio") == "**0.8000**"           # |0.8 - 1| < |1.3 - 1|, though 1.5 is the largest
    assert column("a", "frechet_codec") == "**50.0000**" and column("b", "frechet_codec") == "n/a"
    assert column("a", "pitch_class_agreement") == "**0.3000**" and column("b", "pitch_class_agreement") == "n/a"
    assert column("*silence*", "melody_f1") == "n/a"
    assert "nan" not in markdown.lower()
    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [row["frechet_codec"] for row in table] == ["50.0", "", "80.0"]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert column("a", "weights in/tgt/spec/mel") == "0/1/0/0"

    # a cell that trains the discriminator: its weights join the column, for every cell
    rows[2]["result"]["weights"] |= {"adversarial": 4.0, "feature_matching": 4.0}
    markdown = write_report(rows, ["a", "b", "c"], tmp_path / "adversarial", ["# test"])
    header = next(line for line in markdown.splitlines() if line.startswith("| cell | weights"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert column("c", "weights in/tgt/spec/mel/adv/feat") == "0/1/0/0/4/4"
    assert column("a", "weights in/tgt/spec/mel/adv/feat") == "0/1/0/0/0/0"
