"""Loss ablations as one command: a grid of ordinary training runs on MLflow, then one comparison report.

    python ablate.py --data_dir data_cache/mine --out_dir runs/ablation --seeds 3 --epochs 50 --nproc 2
    python ablate.py ... --print_commands     # the cells' command lines, for a cluster scheduler
    python ablate.py ... --report_only        # evaluate what exists and (re)write the report

Every flag ablate.py does not know is a launcher flag and goes to every cell (--epochs, --nproc, model sizes,
--mlflow_tracking_uri ...). Each cell x seed is one run of train_simple_ddp.py (a subprocess, one after the
other) with --seed k and --checkpoint_dir OUT_DIR/<cell>/seed<k>. As in AudioCraft's Dora grids, a run's
identity is a hash of its effective settings: a cell whose MLflow child run FINISHED with the same hash is
skipped, an interrupted one continues with --resume auto, and the MLflow parent run of the study is found
again by a tag (the resolved OUT_DIR + the hash of the grid and the shared settings), so re-running the
same command finishes the study without repeating anything.

MLflow: one parent run per study (params: the grid, the shared flags, the git commit; artifacts: the
report), one child run per cell x seed (mlflow.parentRunId, tags ablation_cell / ablation_seed /
ablation_hash / ablation_study), created by the launcher itself through --mlflow_parent_run_id and
--mlflow_tag. After training every cell's best.pt is scored by evaluation.evaluate_checkpoint on the
same validation windows, and OUT_DIR/report/ gets results.csv, results.md and results.png.

Exit codes: 0 all cells done; 1 some cell failed (the list is printed last); 2 a bad flag, grid or
name (one line, before anything runs); 130 interrupted (Ctrl-C / SIGTERM: the running cell is stopped
cleanly and resumes on the next invocation).
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()     # the study's wall time counts from here (before the heavy imports)

import argparse  # noqa: E402
import csv  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from mlflow_logger import PARENT_TAG, git_commit  # noqa: E402  (light: no torch, no mlflow at import)
from mlflow_logger import short as one_line  # noqa: E402

ROOT = Path(__file__).resolve().parent
LAUNCHER = ROOT / "train_simple_ddp.py"

# The launcher's loss-weight flags in losses.LOSSES order (input, target, spectral, mel); not imported from
# there because losses loads torch, which the start-up avoids (a test pins the two together).
LOSS_WEIGHT_FLAGS = ("loss_weight_input", "loss_weight_target", "loss_weight_spectral", "loss_weight_mel")


def loss_weights(*weights: float) -> dict:
    return dict(zip(LOSS_WEIGHT_FLAGS, weights))


# The default grid: the README's four loss ablations and the unity sanity check.
DEFAULT_GRID = [
    {"name": "continuation", "flags": loss_weights(0.0, 1.0, 0.0, 0.0)},
    {"name": "continuation_spectral", "flags": loss_weights(0.0, 0.5, 0.5, 0.0)},
    {"name": "balanced", "flags": loss_weights(0.0, 0.4, 0.3, 0.3)},
    {"name": "reconstruction_continuation_spectral", "flags": loss_weights(0.3, 0.4, 0.3, 0.0)},
    {"name": "unity", "flags": {**loss_weights(0.0, 1.0, 0.0, 0.0), "unity_test": True}},
]

# Launcher flags ablate.py sets itself, per cell.
RESERVED = {"seed": "use --seeds N (cell k runs with --seed k)",
            "checkpoint_dir": "cells go to OUT_DIR/<cell>/seed<k>",
            "resume": "ablate.py resumes interrupted cells itself",
            "run_name": "cells are named <cell>/seed<k>",
            "mlflow_parent_run_id": "ablate.py makes the study's parent run",
            "mlflow_tag": "ablate.py tags the cells"}
# Launcher flags that must be the same for the whole study (one cache, one MLflow experiment).
STUDY_ONLY = ("data_dir", "mlflow_tracking_uri", "experiment_name")
# Flags that do not change what a run computes: left out of its identity hash.
NOT_SETTINGS = {"checkpoint_dir", "resume", "mlflow_tracking_uri", "experiment_name", "run_name", "log_audio_every",
                "num_workers", "compile", "decoder_checkpointing", "mlflow_parent_run_id", "mlflow_tag"}

TAG_STUDY, TAG_CELL, TAG_SEED, TAG_HASH = "ablation_study", "ablation_cell", "ablation_seed", "ablation_hash"
CELL_FILE = "cell.json"                  # in each cell's folder: its name, seed, hash, settings and command
EVAL_CACHE = "evaluation.json"           # in each cell's folder: the last evaluation of its best.pt
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
STOP_GRACE_SECONDS = 60.0                # after forwarding SIGINT: time for the launcher to stop its ranks
BASELINES = ("silence", "repeat", "oracle")   # = evaluation.BASELINES (not imported: it loads torch; a test pins it)
HIGHER_IS_BETTER = {"rhythm", "chroma"}  # 'level' is best at 1; everything else is an error (lower is better)


class AblateError(Exception):
    """A user error, reported as one line before anything runs (exit 2)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; the running cell was stopped."""


# ------------------------------------------------------------------------------------------ flags

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Every other flag is a train_simple_ddp.py flag and is passed to every cell "
               "(python train_simple_ddp.py --help lists them).")
    parser.add_argument("--out_dir", required=True, help="the study's folder: OUT_DIR/<cell>/seed<k>/, OUT_DIR/report/")
    parser.add_argument("--grid", default=None,
                        help='JSON file: a list of {"name": ..., "flags": {launcher flag: value}} '
                             "(default: continuation, continuation_spectral, balanced, "
                             "reconstruction_continuation_spectral, unity)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell: 0 .. N-1 (default 3)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run / report only these cells")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: evaluate the cells' best.pt and write the report")
    parser.add_argument("--print_commands", action="store_true",
                        help="print every cell's command line (shell-quoted) instead of running it")
    parser.add_argument("--max_windows", type=int, default=None,
                        help="validation windows to evaluate (evenly spaced; default: all)")
    parser.add_argument("--eval_device", default="cpu", help="device of the evaluation (default cpu; e.g. cuda)")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="windows per evaluation batch (default 8)")
    return parser


def launcher_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """train_simple_ddp's parser, raising AblateError instead of exiting; with only_given, flags that are not
    on the command line are left out of the namespace (so it holds exactly what was given)."""
    import train_simple_ddp
    parser = train_simple_ddp.build_parser()
    parser.allow_abbrev = False

    def error(message):
        raise AblateError(message)
    parser.error = error
    if only_given:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def flag_tokens(name: str, value) -> list[str]:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str)) and not (isinstance(value, float) and not math.isfinite(value)):
        text = str(value)
    else:
        raise AblateError(f"--{name}: value {value!r} is not a number, string or boolean")
    return [f"--{name}", text]


def tokens_of(flags: dict) -> list[str]:
    return [token for name, value in flags.items() for token in flag_tokens(name, value)]


def parse_given(tokens: list[str], where: str) -> dict:
    """{dest: typed value} of exactly the launcher flags in `tokens`; AblateError for unknown / bad ones."""
    try:
        given = vars(launcher_parser(only_given=True).parse_args(tokens))
    except AblateError as error:
        raise AblateError(f"{where}: {error}") from None
    return given


@dataclass
class Cell:
    name: str
    seed: int
    flags: dict                 # every launcher flag given to this cell (shared + its own), typed
    settings: dict              # its effective settings (every flag that changes the result)
    hash: str
    folder: Path
    command: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}/seed{self.seed}"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_grid(path: str | None) -> list[dict]:
    """[{"name", "flags": {dest: typed value}}] from a JSON file (or the default grid), checked."""
    if path is None:
        raw = DEFAULT_GRID
    else:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as error:
            raise AblateError(f"--grid {path}: {error.strerror or error}") from None
        except json.JSONDecodeError as error:
            raise AblateError(f"--grid {path}: not JSON ({error})") from None
    where = f"--grid {path}" if path else "the default grid"
    if not isinstance(raw, list) or not raw:
        raise AblateError(f"{where}: expected a non-empty JSON list of {{\"name\": ..., \"flags\": {{...}}}}")
    grid, seen = [], set()
    for index, cell in enumerate(raw):
        if not isinstance(cell, dict) or not isinstance(cell.get("name"), str):
            raise AblateError(f"{where}: entry {index} is not an object with a \"name\"")
        name = cell["name"]
        extra = sorted(set(cell) - {"name", "flags"})
        if extra:
            raise AblateError(f"{where}: cell {name!r} has unknown keys {extra} (only \"name\" and \"flags\")")
        if not NAME_PATTERN.match(name):
            raise AblateError(f"{where}: cell name {name!r} must be letters, digits, '_', '.', '+' or '-'")
        if name in seen:
            raise AblateError(f"{where}: cell name {name!r} appears twice")
        seen.add(name)
        flags = cell.get("flags", {})
        if not isinstance(flags, dict):
            raise AblateError(f"{where}: cell {name!r}: \"flags\" must be an object {{flag: value}}")
        tokens = []
        for flag, value in flags.items():
            dest = flag[2:] if flag.startswith("--") else flag
            if dest in RESERVED or dest in STUDY_ONLY:
                raise AblateError(f"{where}: cell {name!r}: --{dest} cannot be set per cell "
                                  f"({RESERVED.get(dest) or 'it is one setting for the whole study'})")
            tokens += flag_tokens(dest, value)
        grid.append({"name": name, "flags": parse_given(tokens, f"{where}: cell {name!r}")})
    return grid


def build_cells(grid: list[dict], shared: dict, seeds: int, out_dir: Path) -> list["Cell"]:
    """Every cell x seed with its flags, effective settings and hash; flag values checked by the launcher's
    own flag checks (the data and the codec are checked by the launcher when the cell starts)."""
    import train_simple_ddp
    parser = launcher_parser()
    defaults = {action.dest for action in parser._actions}
    cells = []
    for entry in grid:
        for seed in range(seeds):
            flags = {**shared, **entry["flags"]}
            argv = tokens_of(flags) + ["--seed", str(seed)]
            try:
                args = parser.parse_args(argv)
                train_simple_ddp.check_flags(args, parser)
            except AblateError as error:
                raise AblateError(f"cell {entry['name']!r}: {error}") from None
            settings = {key: value for key, value in sorted(vars(args).items())
                        if key in defaults and key not in NOT_SETTINGS}
            cells.append(Cell(entry["name"], seed, flags, settings, settings_hash(settings),
                              out_dir / entry["name"] / f"seed{seed}"))
    return cells


# ----------------------------------------------------------------------------------------- mlflow

def tracking_uri_of(shared: dict) -> str:
    """The study's tracking URI, explicit and cwd-independent (a relative sqlite path made absolute), so the
    printed commands work from anywhere."""
    uri = shared.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        import mlflow
        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


class Study:
    """The study's MLflow parent run and its children."""

    def __init__(self, uri: str, experiment_name: str, key: str, out_dir: Path, params: dict, create: bool = True):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.entities import Param, ViewType
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (experiment.experiment_id if experiment
                              else self.client.create_experiment(experiment_name))
        found = self.client.search_runs([self.experiment_id], f"tags.{TAG_STUDY} = '{key}'",
                                        run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                                        order_by=["attributes.start_time ASC"])
        self.created = False
        if found:
            self.run_id = found[0].info.run_id
        elif create:
            run = self.client.create_run(self.experiment_id, run_name=f"ablation {out_dir.name}",
                                         tags={TAG_STUDY: key, "ablation_out_dir": str(out_dir)})
            self.run_id, self.created = run.info.run_id, True
            items = [Param(name, str(value)[:6000]) for name, value in sorted(params.items())]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start:start + 100])
        else:
            self.run_id = None

    def children(self) -> list:
        if self.run_id is None:
            return []
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.run_id}'",
                                           max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def set_status(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            if status == "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.client.set_terminated(self.run_id, status=status)
        except Exception as error:  # noqa: BLE001 - the study's result matters more than its status flag
            print(f"warning: could not mark the study's MLflow run {status} ({one_line(error)})", file=sys.stderr)


def cell_status(cell: Cell, children: list) -> tuple[str, object]:
    """('done', run) if a child run of this cell and hash FINISHED and best.pt is there; ('complete', run id)
    if latest.pt holds the last epoch but the run was not closed (stopped right after saving it); ('resume',
    None) for any other latest.pt (an interrupted run: --resume auto continues it); ('new', None) otherwise."""
    for run in children:
        tags = run.data.tags
        if (tags.get(TAG_CELL) == cell.name and tags.get(TAG_SEED) == str(cell.seed)
                and tags.get(TAG_HASH) == cell.hash and run.info.status == "FINISHED"
                and (cell.folder / "best.pt").is_file()):
            return "done", run
    latest = cell.folder / "latest.pt"
    if not latest.is_file():
        return "new", None
    state = peek_checkpoint(latest)
    if state.get("epoch") is not None and state["epoch"] >= cell.settings.get("epochs", math.inf) \
            and (cell.folder / "best.pt").is_file():
        return "complete", state.get("mlflow_run_id")     # trained to the end, but its run was never closed
    return "resume", None


def peek_checkpoint(path: Path) -> dict:
    """A checkpoint's small entries (epoch, mlflow_run_id ...), memory-mapped: the weights are not read."""
    try:
        import torch
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {key: state.get(key) for key in ("epoch", "mlflow_run_id")}
    except Exception:  # noqa: BLE001 - unreadable: the launcher says why when it resumes from it
        return {}


def cell_command(cell: Cell, parent_run_id: str, study_key: str, uri: str, resume: bool) -> list[str]:
    flags = dict(cell.flags, mlflow_tracking_uri=uri)
    command = [sys.executable, str(LAUNCHER), *tokens_of(flags), "--seed", str(cell.seed),
               "--checkpoint_dir", str(cell.folder), "--run_name", cell.label,
               "--mlflow_parent_run_id", parent_run_id]
    for key, value in ((TAG_CELL, cell.name), (TAG_SEED, cell.seed), (TAG_HASH, cell.hash), (TAG_STUDY, study_key)):
        command += ["--mlflow_tag", f"{key}={value}"]
    return command + (["--resume", "auto"] if resume else [])


def check_folders(cells: list[Cell]) -> None:
    """Refuse (before anything runs) a cell folder holding checkpoints of other settings: resuming or
    reporting them would mix two experiments."""
    for cell in cells:
        record = cell.folder / CELL_FILE
        if not record.is_file() or not any((cell.folder / n).is_file() for n in ("latest.pt", "best.pt")):
            continue
        try:
            saved = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if saved.get("hash") != cell.hash:
            old = saved.get("settings", {})
            changed = [f"--{k} {old.get(k)} -> {cell.settings.get(k)}"
                       for k in sorted(set(old) | set(cell.settings)) if old.get(k) != cell.settings.get(k)]
            said = ", ".join(changed[:4]) or "other hash"
            raise AblateError(f"{cell.folder} holds a run of other settings ({said}); "
                              f"use another --out_dir, or remove that folder to retrain it")


def write_json(path: Path, data) -> None:
    from utils import atomic_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


# ------------------------------------------------------------------------------------------ running

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
            raise KeyboardInterrupt      # in-process work (evaluation, MLflow calls) stops where it is

    def run(self, command: list[str], log_path: Path, on_start=None) -> tuple[int, str, float]:
        """(exit code, last line of its stderr, seconds); the output goes to the terminal and to log_path."""
        if self.signal is not None:
            raise Interrupted()
        started = time.perf_counter()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tail = []
        with open(log_path, "ab") as log:
            self.process = process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, start_new_session=True)
            if on_start is not None:
                on_start(process.pid)
            pumps = [threading.Thread(target=pump, args=(process.stdout, sys.stdout, log, None), daemon=True),
                     threading.Thread(target=pump, args=(process.stderr, sys.stderr, log, tail), daemon=True)]
            for thread in pumps:
                thread.start()
            escalated = 0
            while True:
                try:
                    code = process.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.signalled_at is not None:
                    waited = time.monotonic() - self.signalled_at
                    if escalated == 0 and waited > STOP_GRACE_SECONDS:
                        kill_group(process.pid, signal.SIGTERM)
                        escalated = 1
                    elif escalated == 1 and waited > STOP_GRACE_SECONDS + 15:
                        kill_group(process.pid, signal.SIGKILL)
                        escalated = 2
            self.process = None
            end_group(process.pid)          # no rank or loader worker outlives its launcher
            for thread in pumps:
                thread.join(timeout=5)
        seconds = time.perf_counter() - started
        if self.signal is not None:
            raise Interrupted()
        last = next((line for line in reversed(b"".join(tail).decode(errors="replace").splitlines())
                     if line.strip()), "")
        return code, last.strip(), seconds


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


# ---------------------------------------------------------------------------------------- evaluation

_preloaded = {}


def preload() -> None:
    """Import the evaluation and plotting modules (in a thread, while a cell trains: it costs no wall time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

        import evaluation  # noqa: F401
    except Exception as error:  # noqa: BLE001 - reported when they are really needed
        _preloaded["error"] = error


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def evaluate_cell(cell: Cell, data_dir, args) -> tuple[dict, bool]:
    """(evaluation of the cell's best.pt, computed now?). Cached in the cell's folder, keyed by the checkpoint
    file, the evaluation settings and the evaluation code, so an unchanged cell is not scored twice."""
    import evaluation
    best = cell.folder / "best.pt"
    stat = best.stat()
    key = {"checkpoint": [stat.st_size, stat.st_mtime_ns], "data_dir": data_dir, "split": "val",
           "max_windows": args.max_windows, "batch_size": args.eval_batch_size, "musical": True,
           "code": hashlib.sha256(Path(evaluation.__file__).read_bytes()).hexdigest()[:16]}
    cache = cell.folder / EVAL_CACHE
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["result"], False
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    result = evaluation.evaluate_checkpoint(str(best), data_dir=data_dir, split="val", max_windows=args.max_windows,
                                            device=args.eval_device, batch_size=args.eval_batch_size, musical=True,
                                            progress=False)
    result = jsonable(result)
    write_json(cache, {"key": key, "result": result})
    return result, True


# -------------------------------------------------------------------------------------------- report

def figure_names() -> tuple:
    import evaluation
    return tuple(evaluation.SCORE_NAMES)


def spread(values: list) -> tuple:
    """(mean, sample std) of the defined values; (None, None) if none, std None with one value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def better(name: str, a: float, b: float, skill: bool = False) -> bool:
    """Is a better than b for this figure (or for its skill)?"""
    if skill or name in HIGHER_IS_BETTER:
        return a > b
    if name == "level":
        return abs(a - 1.0) < abs(b - 1.0)
    return a < b


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


MARKDOWN_LEGEND = (
    "Mean ± standard deviation over seeds (sample std, n-1; none with one seed; per-seed values in results.csv). "
    "Best cell in each column in **bold**: lowest for the loss components and latent_mse, closest to 1 for "
    "level, highest for rhythm, chroma and skill. `loss` is each cell's own weighted total, so it is not "
    "comparable across cells (not marked): compare the components. Unity cells (`--unity_test`: target = "
    "input) are the pipeline's sanity check, not a contender: never marked. A baseline figure is one value when it "
    "is the same for every cell, else its range over the cells (`loss` follows each cell's weights; a unity "
    "cell's target is its input; the plot then marks each cell's own baseline over its bar).")


def write_report(rows: list[dict], cells_in_order: list[str], report_dir: Path, header: list[str]) -> str:
    """results.csv, results.md and results.png from the evaluated rows; returns the Markdown."""
    from utils import atomic_path
    names = figure_names()
    report_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, names, report_dir / "results.csv")
    by_cell = {name: [r for r in rows if r["cell"] == name] for name in cells_in_order}
    by_cell = {name: group for name, group in by_cell.items() if group}
    markdown = markdown_report(rows, by_cell, names, header)
    with atomic_path(report_dir / "results.md") as tmp:
        tmp.write_text(markdown)
    summary = {name: {n: spread([r["result"]["model"].get(n) for r in group]) for n in names}
               for name, group in by_cell.items()}
    plot(summary, baselines_per_cell(rows, list(by_cell), names), names, report_dir / "results.png")
    return markdown


def write_csv(rows: list[dict], names, path: Path) -> None:
    """results.csv: one row per cell x seed with every figure, its skill and the baselines' figures."""
    from utils import atomic_path
    columns = ["cell", "seed", "hash", "run_id", "epoch", "windows", "target_audio", "weights"]
    columns += [f"{n}" for n in names] + [f"skill_{n}" for n in names]
    columns += [f"{b}_{n}" for b in BASELINES for n in names]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                result = row["result"]
                line = {"cell": row["cell"], "seed": row["seed"], "hash": row["hash"], "run_id": row["run_id"] or "",
                        "epoch": result.get("epoch"), "windows": result.get("windows"),
                        "target_audio": result.get("target_audio"),
                        "weights": " ".join(f"{k}={v:g}" for k, v in (result.get("weights") or {}).items())}
                for n in names:
                    line[n] = csvnum(result["model"].get(n))
                    line[f"skill_{n}"] = csvnum((result.get("skill") or {}).get(n))
                    for b in BASELINES:
                        line[f"{b}_{n}"] = csvnum(result["baselines"][b].get(n))
                writer.writerow(line)


def markdown_report(rows: list[dict], by_cell: dict, names, header: list[str]) -> str:
    """results.md: per cell the mean ± std over seeds of every figure, the baselines, then the skill table."""
    summary = {name: {n: spread([r["result"]["model"].get(n) for r in group]) for n in names}
               for name, group in by_cell.items()}
    skills = {name: {n: spread([(r["result"].get("skill") or {}).get(n) for r in group]) for n in names}
              for name, group in by_cell.items()}
    skill_names = [n for n in names if any(skills[c][n][0] is not None for c in skills)]
    baselines = {b: {n: spread_same([r["result"]["baselines"][b].get(n) for r in rows]) for n in names}
                 for b in BASELINES}
    unity = {r["cell"] for r in rows if r.get("unity")}     # a sanity check (target = input): not a contender
    marks = best_of(summary, names, unity, skip=("loss",))
    lines = header + ["", MARKDOWN_LEGEND, "",
                      "| cell | weights in/tgt/spec/mel | seeds | " + " | ".join(names) + " |",
                      "|---|---|---|" + "---|" * len(names)]
    for c, group in by_cell.items():
        lines.append(f"| {c} | {weights_of(group)} | {len(group)} | "
                     + " | ".join(cell_text(summary, marks, c, n) for n in names) + " |")
    for b in BASELINES:
        lines.append(f"| *{b}* | | | " + " | ".join(baselines[b][n] for n in names) + " |")
    if skill_names:
        skill_marks = best_of(skills, skill_names, unity, skip=("loss",), skill=True)
        lines += ["", "Skill per figure, (repeat - model) / (repeat - oracle): 1 = as good as the oracle, "
                  "0 = no better than repeating the context (mean ± std over seeds; best in **bold**).", "",
                  "| cell | " + " | ".join(f"skill {n}" for n in skill_names) + " |",
                  "|---|" + "---|" * len(skill_names)]
        for c in by_cell:
            lines.append(f"| {c} | " + " | ".join(cell_text(skills, skill_marks, c, n) for n in skill_names) + " |")
    return "\n".join(lines) + "\n"


def best_of(table: dict, columns, unity: set, skip=(), skill: bool = False) -> dict:
    """{column: the cell with the best mean} (unity cells never; a column needs two contenders)."""
    marks = {}
    for n in columns:
        if n in skip:
            continue
        candidates = [(c, table[c][n][0]) for c in table if table[c][n][0] is not None and c not in unity]
        if len(candidates) > 1:
            top = candidates[0]
            for candidate in candidates[1:]:
                if better(n, candidate[1], top[1], skill):
                    top = candidate
            marks[n] = top[0]
    return marks


def cell_text(table: dict, marks: dict, c: str, n: str) -> str:
    mean, std = table[c][n]
    text = fmt(mean) + ("" if std is None else f" ± {std:.2g}")
    return f"**{text}**" if marks.get(n) == c else text


def weights_of(group: list) -> str:
    weights = group[0]["result"].get("weights") or {}
    return "/".join(f"{weights.get(k, 0):g}" for k in ("rms_input", "rms_target", "spectral", "mel"))


def csvnum(value):
    return "" if value is None else repr(float(value))


def agree(values: list) -> bool:
    return bool(values) and None not in values and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)))


def spread_same(values: list) -> str:
    """A baseline's figure as text: the value if every cell's evaluation agrees, else the range over cells."""
    defined = [v for v in values if v is not None]
    if not defined:
        return "n/a"
    if agree(values):
        return fmt(defined[0])
    return f"{fmt(min(defined))} – {fmt(max(defined))}"


def baselines_per_cell(rows: list[dict], cells: list[str], names) -> dict:
    """{baseline: {figure: {cell: mean over the cell's seeds, or None}}} for the plot."""
    result = {}
    for b in BASELINES:
        result[b] = {n: {c: spread([r["result"]["baselines"][b].get(n) for r in rows if r["cell"] == c])[0]
                         for c in cells} for n in names}
    return result


def plot(summary: dict, baselines: dict, names, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils import atomic_path
    cells = list(summary)
    columns = 3
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    styles = {"silence": ("tab:gray", ":"), "repeat": ("tab:orange", "--"), "oracle": ("tab:green", "-.")}
    for axis, name in zip(axes.flat, names):
        means = [summary[c][name][0] for c in cells]
        errors = [summary[c][name][1] or 0.0 for c in cells]
        x = range(len(cells))
        axis.bar(x, [m if m is not None else 0.0 for m in means], yerr=errors, capsize=3, color="tab:blue",
                 alpha=0.8)
        for b, (colour, style) in styles.items():
            values = [baselines[b][name][c] for c in cells]
            if agree(values):          # the same for every cell: one line across the panel
                axis.axhline(values[0], color=colour, linestyle=style, linewidth=1.2, label=b)
            else:                      # each cell's own (its weights, or unity's windows): a line over its bar
                for position, value in enumerate(values):
                    if value is not None:
                        axis.hlines(value, position - 0.45, position + 0.45, color=colour, linestyle=style,
                                    linewidth=1.2, label=b)
        title = f"{name} (own weights: not comparable)" if name == "loss" else name
        axis.set_title(title, fontsize=9)
        axis.set_xticks(list(x))
        axis.set_xticklabels(cells, rotation=30, ha="right", fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), [f"baseline: {label}" for label in handles], loc="upper right",
                      fontsize=8, ncol=len(handles))
    figure.suptitle("bars: mean over seeds, whiskers: std over seeds", fontsize=9, x=0.02, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- main

def prepare(argv) -> dict:
    """Everything that can be checked before anything runs: flags, grid, names, values, folders."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.seeds < 1:
        raise AblateError(f"--seeds must be at least 1, got {args.seeds}")
    if args.max_windows is not None and args.max_windows < 1:
        raise AblateError(f"--max_windows must be at least 1, got {args.max_windows}")
    if args.report_only and args.print_commands:
        raise AblateError("--report_only and --print_commands exclude each other")
    shared = parse_given(rest, "launcher flags")
    for name in shared:
        if name in RESERVED:
            raise AblateError(f"--{name} cannot be given to ablate.py: {RESERVED[name]}")
    if shared.get("data_dir"):
        shared["data_dir"] = str(Path(shared["data_dir"]).resolve())
    grid = load_grid(args.grid)
    names = [cell["name"] for cell in grid]
    if args.only:
        unknown = [name for name in args.only if name not in names]
        if unknown:
            raise AblateError(f"--only {' '.join(unknown)}: no such cell (the grid has {', '.join(names)})")
    out_dir = Path(args.out_dir).resolve()
    cells = build_cells(grid, shared, args.seeds, out_dir)
    selected = [cell for cell in cells if not args.only or cell.name in args.only]
    check_folders(selected)
    # The study: its folder, its grid and its shared settings (so the report compares like with like).
    shared_settings = {k: v for k, v in shared.items() if k not in NOT_SETTINGS}
    key = settings_hash({"out_dir": str(out_dir), "grid": grid, "shared": shared_settings})
    return dict(args=args, shared=shared, grid=grid, names=names, out_dir=out_dir, cells=cells,
                selected=selected, key=key, shared_settings=shared_settings)


def main(argv=None) -> int:
    runner = Runner()
    runner.install()
    try:
        return study(runner, argv)
    except AblateError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except (Interrupted, KeyboardInterrupt):
        where = f" during {runner.current}" if runner.current else ""
        print(f"interrupted{where}: finished cells are kept and the interrupted one resumes from its latest "
              f"checkpoint; run the same command again to go on", file=sys.stderr, flush=True)
        if runner.study is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            runner.study.set_status("KILLED")
        return 130


def study(runner: Runner, argv) -> int:
    """The whole study: open (or find) it, train what is not finished, evaluate, report; the exit code."""
    plan = prepare(argv)
    args, out_dir = plan["args"], plan["out_dir"]
    study_run, uri = open_study(runner, plan)
    selected = plan["selected"]
    if args.print_commands:
        return print_commands(selected, study_run, plan["key"], uri)
    startup_seconds = time.perf_counter() - STARTED     # imports, checks, MLflow parent and children
    train_seconds, failures = (0.0, []) if args.report_only else train_cells(runner, selected, study_run)
    rows, missing, eval_seconds = evaluate_cells(runner, selected, study_run, plan["shared"].get("data_dir"),
                                                 args, failures)
    report_started = time.perf_counter()
    report(rows, missing, failures, plan, study_run, uri)
    if not args.report_only:
        study_run.set_status("FAILED" if failures else "FINISHED")
    elif not failures and not missing:
        study_run.set_status("FINISHED")
    now = time.perf_counter()
    wall, report_seconds = now - STARTED, now - report_started
    overhead = wall - train_seconds - eval_seconds
    print(f"[ablate] training {train_seconds:.1f} s, evaluation {eval_seconds:.1f} s; "
          f"overhead: {overhead:.1f} s of {wall:.1f} s ({100 * overhead / wall:.1f}%; "
          f"start-up {startup_seconds:.1f} s, report {report_seconds:.1f} s)", flush=True)
    if failures:
        print(f"error: {len(failures)} failed: " + "; ".join(failures), file=sys.stderr, flush=True)
        return 1
    if not rows:
        print(f"error: no cell has finished training in {out_dir}: nothing to report", file=sys.stderr, flush=True)
        return 1
    return 0


def open_study(runner: Runner, plan: dict) -> tuple[Study, str]:
    """Lock OUT_DIR, probe MLflow, create or find the parent run, and give every cell its status and command."""
    args, shared, out_dir, key = plan["args"], plan["shared"], plan["out_dir"], plan["key"]
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / ".ablate.lock", "w")       # held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AblateError(f"another ablate.py is working on {out_dir}; wait for it (or stop it)") from None
    runner.lock = lock
    uri = tracking_uri_of(shared)
    from utils import check_mlflow_server
    try:
        check_mlflow_server(uri)
    except OSError as error:
        raise AblateError(f"--mlflow_tracking_uri {uri}: the MLflow tracking server does not answer "
                          f"({error})") from None
    params = {"grid": json.dumps(plan["grid"], sort_keys=True), "grid_hash": settings_hash(plan["grid"]),
              "shared_flags": shlex.join(tokens_of(shared)) or "(none)", "git_commit": git_commit(),
              "out_dir": str(out_dir), "study_hash": key,
              **{f"shared.{k}": v for k, v in sorted(plan["shared_settings"].items())}}
    experiment = shared.get("experiment_name", "music-continuation")
    study_run = Study(uri, experiment, key, out_dir, params, create=not args.report_only)
    runner.study = study_run
    if study_run.run_id is None:
        raise AblateError(f"--report_only: no study of this grid and these flags in {out_dir} on {uri} "
                          f"(run it first, with the same flags)")
    print(f"[ablate] study {key} in {out_dir}: MLflow run {study_run.run_id} "
          f"({'new' if study_run.created else 'continued'}) at {uri}", file=sys.stderr, flush=True)
    children = study_run.children()
    for cell in plan["selected"]:
        cell.status, cell.run = cell_status(cell, children)
        cell.command = cell_command(cell, study_run.run_id, key, uri, resume=cell.status == "resume")
        if not args.report_only:
            write_json(cell.folder / CELL_FILE, {"name": cell.name, "seed": cell.seed, "hash": cell.hash,
                                                 "study": key, "settings": cell.settings,
                                                 "command": shlex.join(cell.command)})
    return study_run, uri


def print_commands(selected: list, study_run: Study, key: str, uri: str) -> int:
    """--print_commands: one shell-quoted launcher command per unfinished cell (with --resume auto, so a
    requeued or preempted job continues where it stopped)."""
    done = [cell.label for cell in selected if cell.status in ("done", "complete")]
    todo = [cell for cell in selected if cell.status not in ("done", "complete")]
    for cell in todo:
        print(shlex.join(cell_command(cell, study_run.run_id, key, uri, resume=True)), flush=True)
    print(f"[ablate] {len(todo)} commands to run ({len(done)} cells already finished: "
          f"{', '.join(done) or 'none'}); when they have run: the same ablate.py command with --report_only",
          file=sys.stderr, flush=True)
    return 0


def train_cells(runner: Runner, selected: list, study_run: Study) -> tuple[float, list]:
    """Run every unfinished cell, one after another; (seconds spent training, failures)."""
    train_seconds, failures = 0.0, []
    study_run.set_status("RUNNING")
    preloader = None
    for index, cell in enumerate(selected, 1):
        head = f"[ablate] cell {index}/{len(selected)} {cell.label} (hash {cell.hash})"
        if cell.status == "done":
            print(f"{head}: finished in run {cell.run.info.run_id}, skipped", file=sys.stderr, flush=True)
            continue
        if cell.status == "complete":      # its last epoch was saved, then the launcher was stopped
            print(f"{head}: trained to the last epoch already, skipped (run {cell.run} marked FINISHED)",
                  file=sys.stderr, flush=True)
            mark_finished(study_run, cell.run)
            continue
        if preloader is None:     # evaluation's imports load while the first cell trains
            preloader = threading.Thread(target=preload, daemon=True)
            preloader.start()
        code, last, seconds = run_cell(runner, cell, head)
        train_seconds += seconds
        if code != 0:
            failures.append(f"{cell.label} (exit {code}: {last})")
            print(f"[ablate] cell {cell.label} failed (exit {code}); going on with the others",
                  file=sys.stderr, flush=True)
    if preloader is not None:
        preloader.join()
        children = study_run.children()
        for cell in selected:
            cell.status, cell.run = cell_status(cell, children)
    return train_seconds, failures


def mark_finished(study_run: Study, run_id) -> None:
    if not run_id:
        return
    try:
        study_run.client.set_terminated(run_id, status="FINISHED")
    except Exception as error:  # noqa: BLE001 - MLflow bookkeeping must not stop the study
        print(f"warning: could not mark run {run_id} FINISHED ({one_line(error)})", file=sys.stderr)


def run_cell(runner: Runner, cell: Cell, head: str) -> tuple[int, str, float]:
    verb = "resuming" if cell.status == "resume" else "starting"
    said = f"{head}: {verb} in {cell.folder}"
    runner.current = cell.label
    try:
        return runner.run(cell.command, cell.folder / "train.log", lambda pid: print(
            f"{said} (launcher pid {pid})", file=sys.stderr, flush=True))
    finally:
        runner.current = None


def evaluate_cells(runner: Runner, selected: list, study_run: Study, data_dir, args,
                   failures: list) -> tuple[list, list, float]:
    """Evaluate the best.pt of every cell that finished training, on the same validation windows;
    (report rows, cells not finished, seconds). Evaluation errors are added to `failures`."""
    eval_seconds, rows, missing = 0.0, [], []
    for cell in selected:
        best = cell.folder / "best.pt"
        if cell.status not in ("done", "complete"):     # a failed or unfinished run is no result
            if not any(f.startswith(cell.label + " ") for f in failures):
                missing.append(cell.label)
            continue
        started = time.perf_counter()
        runner.current = f"the evaluation of {cell.label}"
        try:
            result, fresh = evaluate_cell(cell, data_dir, args)
        except (ValueError, RuntimeError, OSError) as error:    # one-line errors of evaluation / checkpoint
            failures.append(f"{cell.label} (evaluation: {one_line(error)})")
            continue
        finally:
            eval_seconds += time.perf_counter() - started
            runner.current = None
        run_id = peek_checkpoint(best).get("mlflow_run_id")
        if fresh and run_id:
            log_evaluation(study_run, run_id, result)
        rows.append({"cell": cell.name, "seed": cell.seed, "hash": cell.hash, "run_id": run_id, "result": result,
                     "unity": bool(cell.settings.get("unity_test"))})
    return rows, missing, eval_seconds


def report(rows: list, missing: list, failures: list, plan: dict, study_run: Study, uri: str) -> None:
    """Write results.csv / .md / .png, upload them to the parent run and print the Markdown table."""
    out_dir, key, shared = plan["out_dir"], plan["key"], plan["shared"]
    if rows:
        report_dir = out_dir / "report"
        header = [f"# Loss ablation: {out_dir}", "",
                  f"Study {key}, MLflow parent run `{study_run.run_id}` ({uri}); {len(rows)} evaluated runs of "
                  f"{len(plan['selected'])}; {rows[0]['result'].get('windows')} validation windows each "
                  f"(split val, target audio {rows[0]['result'].get('target_audio')}).",
                  f"Shared flags: `{shlex.join(tokens_of(shared)) or '(none)'}`."]
        if missing or failures:
            header.append(f"Not in the table: {', '.join(missing + [f.split(' ')[0] for f in failures])}.")
        markdown = write_report(rows, plan["names"], report_dir, header)
        try:
            study_run.client.log_artifacts(study_run.run_id, str(report_dir), "report")
        except Exception as error:  # noqa: BLE001
            print(f"warning: report not uploaded to MLflow ({one_line(error)}); it is in {report_dir}",
                  file=sys.stderr)
        print(markdown, flush=True)
        print(f"[ablate] report: {report_dir}/results.md, results.csv, results.png", file=sys.stderr, flush=True)
    if missing:
        print(f"[ablate] not finished yet (not in the report): {', '.join(missing)}", file=sys.stderr, flush=True)


def log_evaluation(study_run: Study, run_id: str, result: dict) -> None:
    """The evaluation's figures as eval_* metrics of the cell's own run."""
    from mlflow.entities import Metric
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"eval_{n}", float(v), stamp, 0) for n, v in result["model"].items() if v is not None]
    metrics += [Metric(f"eval_skill_{n}", float(v), stamp, 0) for n, v in (result.get("skill") or {}).items()
                if v is not None]
    try:
        study_run.client.log_batch(run_id, metrics=metrics)
    except Exception as error:  # noqa: BLE001
        print(f"warning: evaluation not logged to run {run_id} ({one_line(error)})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
