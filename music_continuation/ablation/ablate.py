"""Loss ablations as one command: a grid of ordinary training runs on MLflow, then one comparison report.

    python ablate.py --data_dir data_cache/mine --out_dir runs/ablation --seeds 3 --epochs 50 --nproc 2
    python ablate.py ... --print_commands     # the cells' command lines, for a cluster scheduler
    python ablate.py ... --report_only        # evaluate what exists and (re)write the report

Every flag ablate.py does not know is a launcher flag and goes to every cell (--epochs, --nproc, model sizes,
--mlflow_tracking_uri ...); --config FILE sets ablate.py's flags and these from a YAML or JSON file, and a grid
cell may name a preset ("config": "balanced"). What a flag may do in a study is its role in settings.FLAG_ROLES.

Each cell x seed is one run of train_simple_ddp.py (a subprocess, one after the other) with --seed k and
--checkpoint_dir OUT_DIR/<cell>/seed<k>. As in AudioCraft's Dora grids, a run's identity is a hash of its
effective settings: a cell whose MLflow child run FINISHED with the same hash is skipped, an interrupted one
continues with --resume auto, and the MLflow parent run of the study is found again by a tag (the resolved
OUT_DIR + the hash of the grid and the shared settings), so re-running the same command finishes the study
without repeating anything.

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
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from music_continuation.ablation import executors  # noqa: E402  (light: submitit is imported only for --executor slurm)
from music_continuation.ablation.executors import ExecutorError, Runner  # noqa: E402
from music_continuation.ablation.report import BASELINES, figure_names, write_report  # noqa: E402, F401  (light: no torch at import)
from music_continuation.config import ConfigError, apply_defaults, config_values, flag_actions, given_config  # noqa: E402
from music_continuation.settings import flags_where, older_run_values  # noqa: E402  (pure data)
from music_continuation.training.mlflow_logger import PARENT_TAG, git_commit  # noqa: E402  (light: no torch, no mlflow at import)
from music_continuation.training.mlflow_logger import short as one_line  # noqa: E402
from music_continuation.utils import Interrupted, UserError, exit_now, export_package_path, warn, write_json  # noqa: E402, I001  (light: standard library only)

LAUNCHER = ("-m", "music_continuation.training.launcher")     # run as a module: torchrun takes the same argv
# listeners.BEAT_TRACKERS (not imported: the listeners load torch, which the start-up avoids; a test pins the two)
BEAT_TRACKERS = ("librosa", "madmom")

# The default grid: the four documented loss mixes (the presets in configs/) and the unity sanity check.
DEFAULT_GRID = [
    {"name": "continuation", "config": "continuation"},
    {"name": "continuation_spectral", "config": "continuation_spectral"},
    {"name": "balanced", "config": "balanced"},
    {"name": "reconstruction_continuation_spectral", "config": "reconstruction_continuation_spectral"},
    {"name": "unity", "config": "continuation", "flags": {"unity_test": True}},
]

# Launcher flags ablate.py sets itself, per cell (settings.FLAG_ROLES: role "ablate"), and why.
WHY_SET_BY_ABLATE = {"seed": "use --seeds N (cell k runs with --seed k)",
                     "checkpoint_dir": "cells go to OUT_DIR/<cell>/seed<k>",
                     "resume": "ablate.py resumes interrupted cells itself",
                     "run_name": "cells are named <cell>/seed<k>",
                     "mlflow_parent_run_id": "ablate.py makes the study's parent run",
                     "mlflow_tag": "ablate.py tags the cells",
                     "logger": "cells log to MLflow, where ablate.py finds them"}
RESERVED = {flag: WHY_SET_BY_ABLATE[flag] for flag in flags_where(ablate="ablate")}
# Launcher flags that must be the same for the whole study (one cache, one MLflow experiment).
STUDY_ONLY = flags_where(ablate="study")
# Flags that change what a run computes: its identity hash is made of these.
IDENTITY = frozenset(flags_where(identity=True))

TAG_STUDY, TAG_CELL, TAG_SEED, TAG_HASH = "ablation_study", "ablation_cell", "ablation_seed", "ablation_hash"
CELL_FILE = "cell.json"                  # in each cell's folder: its name, seed, hash, settings and command
REPORT_ROWS = "report_rows.json"         # what the report is made of: the study's listening report remakes it
EVAL_CACHE = "evaluation.json"           # in each cell's folder: the last evaluation of its best.pt
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class AblateError(UserError):
    """A user error, reported as one line before anything runs (exit 2)."""


# ------------------------------------------------------------------------------------------ flags

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Every other flag is a train_simple_ddp.py flag and is passed to every cell "
               "(python train_simple_ddp.py --help lists them).")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of flag: value, for ablate.py's flags and the launcher flags every "
                             "cell gets (docs/training.md); flags given on the command line win")
    parser.add_argument("--out_dir", required=True, help="the study's folder: OUT_DIR/<cell>/seed<k>/, OUT_DIR/report/")
    parser.add_argument("--grid", default=None,
                        help='JSON file: a list of {"name": ..., "config": preset or file, "flags": {launcher flag: '
                             'value}} (the cell\'s flags win over its config; default: continuation, '
                             "continuation_spectral, balanced, reconstruction_continuation_spectral, unity)")
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
    parser.add_argument("--no_listeners", action="store_true",
                        help="evaluate without the pretrained listeners (melody_f1, beat_f1, frechet_codec, ...: "
                             "docs/musical-figures.md); their columns are then n/a")
    parser.add_argument("--beat_tracker", default="librosa", choices=BEAT_TRACKERS,
                        help="beat tracker of the evaluation's beat_f1 and tempo_ratio (madmom: CC BY-NC-SA 4.0 "
                             "models)")
    slurm = parser.add_argument_group("cluster (--executor slurm: every cell x seed is one element of a job array)")
    slurm.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: the cells run here, one after the other; slurm: one job array through submitit")
    slurm.add_argument("--slurm_partition", default=None, help="partition (default: the cluster's default)")
    slurm.add_argument("--slurm_nodes", type=int, default=1, help="nodes per cell (one torchrun each; default 1)")
    slurm.add_argument("--slurm_gpus_per_node", type=int, default=0,
                       help="GPUs per node = training processes per node (0: a CPU cell with --nproc processes)")
    slurm.add_argument("--slurm_cpus_per_task", type=int, default=1, help="CPU cores per node (default 1)")
    slurm.add_argument("--slurm_time", default="60", help="time limit of each cell: minutes, HH:MM:SS or "
                       "D-HH:MM (default 60); it is requeued from latest.pt if it gets there")
    slurm.add_argument("--slurm_parallel", type=int, default=0, help="at most N cells at once (default: all)")
    slurm.add_argument("--slurm_extra", nargs="+", default=[], metavar="KEY=VALUE",
                       help="other sbatch options: account=..., qos=..., constraint=...")
    slurm.add_argument("--eval_local", action="store_true",
                       help="with slurm: evaluate here on --eval_device instead of as one Slurm job")
    slurm.add_argument("--no_wait", action="store_true",
                       help="with slurm: submit and exit; the same command later waits, gathers and reports")
    slurm.add_argument("--cancel", action="store_true", help="with slurm: scancel the study's jobs and exit")
    return parser


def launcher_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """train_simple_ddp's parser, raising AblateError instead of exiting; with only_given, flags that are not
    on the command line are left out of the namespace (so it holds exactly what was given)."""
    from music_continuation.training import launcher as train_simple_ddp
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


def cell_config(name, cell_name: str, where: str, grid_path: str | None) -> dict:
    """{dest: value} of a cell's "config" (a preset name, or a file relative to the grid file)."""
    if not isinstance(name, str):
        raise AblateError(f"{where}: cell {cell_name!r}: \"config\" must be a preset name or a file name")
    try:
        values, _ = config_values(name, launcher_parser(), relative_to=Path(grid_path) if grid_path else None)
    except ConfigError as error:
        raise AblateError(f"{where}: cell {cell_name!r}: {error}") from None
    values.pop("config", None)
    return values


def load_grid(path: str | None) -> list[dict]:
    """[{"name", "flags": {dest: typed value}}] from a JSON file (or the default grid), checked. A cell's
    "config" is read into its flags here, so a cell's identity is its flags whatever file gave them."""
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
        extra = sorted(set(cell) - {"name", "config", "flags"})
        if extra:
            raise AblateError(f"{where}: cell {name!r} has unknown keys {extra} "
                              f"(only \"name\", \"config\" and \"flags\")")
        if not NAME_PATTERN.match(name):
            raise AblateError(f"{where}: cell name {name!r} must be letters, digits, '_', '.', '+' or '-'")
        if name in seen:
            raise AblateError(f"{where}: cell name {name!r} appears twice")
        seen.add(name)
        flags = cell.get("flags", {})
        if not isinstance(flags, dict):
            raise AblateError(f"{where}: cell {name!r}: \"flags\" must be an object {{flag: value}}")
        if "config" in cell:
            flags = {**cell_config(cell["config"], name, where, path), **flags}
        tokens = []
        for flag, value in flags.items():
            dest = flag[2:] if flag.startswith("--") else flag
            if dest == "config":      # read here, so that the cell's identity holds what the file sets
                raise AblateError(f"{where}: cell {name!r}: name a preset as the cell's \"config\", not among "
                                  f"its \"flags\"")
            if dest in RESERVED or dest in STUDY_ONLY:
                raise AblateError(f"{where}: cell {name!r}: --{dest} cannot be set per cell "
                                  f"({RESERVED.get(dest) or 'it is one setting for the whole study'})")
            tokens += flag_tokens(dest, value)
        grid.append({"name": name, "flags": parse_given(tokens, f"{where}: cell {name!r}")})
    return grid


def build_cells(grid: list[dict], shared: dict, seeds: int, out_dir: Path) -> list["Cell"]:
    """Every cell x seed with its flags, effective settings and hash; flag values checked by the launcher's
    own flag checks (the data and the codec are checked by the launcher when the cell starts)."""
    from music_continuation.training import launcher as train_simple_ddp
    parser = launcher_parser()
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
            older = older_run_values(vars(args))
            settings = {key: value for key, value in sorted(vars(args).items())
                        if key in IDENTITY and not (key in older and value == older[key])}
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
            warn(f"could not mark the study's MLflow run {status} ({one_line(error)})")


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


def cell_command(cell: Cell, parent_run_id: str, study_key: str, uri: str, resume: bool,
                 torchrun: bool = False) -> list[str]:
    """The cell's launcher command; with torchrun, without --nproc (torchrun's --nproc_per_node says it, and its
    own parser would take --nproc for an abbreviation of that)."""
    flags = dict(cell.flags, mlflow_tracking_uri=uri)
    if torchrun:
        flags.pop("nproc", None)
    command = [sys.executable, *LAUNCHER, *tokens_of(flags), "--seed", str(cell.seed),
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


# ---------------------------------------------------------------------------------------- evaluation

_preloaded = {}


def preload() -> None:
    """Import the evaluation and plotting modules (in a thread, while a cell trains: it costs no wall time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

        from music_continuation.evaluation import scoring as evaluation  # noqa: F401
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


def evaluation_key(cell, data_dir, args) -> dict:
    """What an evaluation of the cell's best.pt depends on: the checkpoint file, the settings and the code."""
    from music_continuation.evaluation import scoring as evaluation
    stat = (cell.folder / "best.pt").stat()
    code = hashlib.sha256(Path(evaluation.__file__).read_bytes())
    listeners = not args.no_listeners
    if listeners:     # the listeners' code makes their figures: a change to it re-scores the cells
        for path in sorted((Path(evaluation.__file__).parent / "listeners").glob("*.py")):
            code.update(path.read_bytes())
    return {"checkpoint": [stat.st_size, stat.st_mtime_ns], "data_dir": data_dir, "split": "val",
            "max_windows": args.max_windows, "batch_size": args.eval_batch_size, "musical": True,
            "listeners": listeners, "beat_tracker": args.beat_tracker if listeners else None,
            "code": code.hexdigest()[:16]}


def cached_evaluation(cell, key: dict) -> dict | None:
    try:
        saved = json.loads((cell.folder / EVAL_CACHE).read_text())
        if saved.get("key") == key:
            return saved["result"]
    except (OSError, json.JSONDecodeError, AttributeError, KeyError):
        pass
    return None


def evaluate_cell(cell, data_dir, args) -> tuple[dict, bool]:
    """(evaluation of the cell's best.pt, computed now?). Cached in the cell's folder, keyed by the checkpoint
    file, the evaluation settings and the evaluation code, so an unchanged cell is not scored twice."""
    from music_continuation.evaluation import scoring as evaluation
    key = evaluation_key(cell, data_dir, args)
    saved = cached_evaluation(cell, key)
    if saved is not None:
        return saved, False
    result = evaluation.evaluate_checkpoint(str(cell.folder / "best.pt"), data_dir=data_dir, split="val",
                                            max_windows=args.max_windows, device=args.eval_device,
                                            batch_size=args.eval_batch_size, musical=True, progress=False,
                                            listeners=not args.no_listeners, beat_tracker=args.beat_tracker)
    result = jsonable(result)
    write_json(cell.folder / EVAL_CACHE, {"key": key, "result": result}, sort_keys=True)
    return result, True


# ---------------------------------------------------------------------------------------------- main

def prepare(argv) -> dict:
    """Everything that can be checked before anything runs: flags, grid, names, values, folders."""
    parser = build_parser()
    from_config = {}
    name = given_config(argv)
    if name is not None:      # ablate.py's own keys become its defaults; the launcher's go to every cell
        try:
            own, from_config = config_values(name, parser, others=flag_actions(launcher_parser()))
        except ConfigError as error:
            raise AblateError(str(error)) from None
        apply_defaults(parser, own)
        from_config = {flag: value for flag, value in from_config.items() if value is not None}  # None: the default
        for flag in from_config:
            if flag in RESERVED:
                raise AblateError(f"--config {name}: {flag}: cannot be given to ablate.py: {RESERVED[flag]}")
    args, rest = parser.parse_known_args(argv)
    if args.seeds < 1:
        raise AblateError(f"--seeds must be at least 1, got {args.seeds}")
    if args.max_windows is not None and args.max_windows < 1:
        raise AblateError(f"--max_windows must be at least 1, got {args.max_windows}")
    if args.report_only and args.print_commands:
        raise AblateError("--report_only and --print_commands exclude each other")
    slurm = slurm_settings(args)
    shared = {**from_config, **parse_given(rest, "launcher flags")}
    tokens = sys.argv[1:] if argv is None else argv
    if any(token == "--beat_tracker" or token.startswith("--beat_tracker=") for token in tokens):
        shared["beat_tracker"] = args.beat_tracker      # one tracker for the study: the cells' --musical_every too
    for name in shared:
        if name in RESERVED:
            raise AblateError(f"--{name} cannot be given to ablate.py: {RESERVED[name]}")
    for folder in ("data_dir", "references_dir"):      # the cells run in their own folders
        if shared.get(folder):
            shared[folder] = str(Path(shared[folder]).resolve())
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
    if not args.no_listeners and not args.print_commands:     # after the cheap checks: this imports the packages
        check_listeners(args.beat_tracker)
    # The study: its folder, its grid and its shared settings (so the report compares like with like).
    shared_settings = {k: v for k, v in shared.items() if k in IDENTITY}
    key = settings_hash({"out_dir": str(out_dir), "grid": grid, "shared": shared_settings})
    return dict(args=args, shared=shared, grid=grid, names=names, out_dir=out_dir, cells=cells,
                selected=selected, key=key, shared_settings=shared_settings, slurm=slurm)


def check_listeners(beat_tracker: str) -> None:
    """The evaluation's listener packages import now: a missing one is one line before any cell trains."""
    from music_continuation.evaluation.listeners import ListenerUnavailable, check_available
    try:
        check_available(beat_tracker)
    except ListenerUnavailable as error:
        raise AblateError(f"{error} (or evaluate without them: --no_listeners)") from None


SLURM_ONLY = ("slurm_partition", "slurm_nodes", "slurm_gpus_per_node", "slurm_cpus_per_task", "slurm_time",
              "slurm_parallel", "slurm_extra", "eval_local", "no_wait", "cancel")


def slurm_settings(args) -> executors.SlurmSettings | None:
    """The --slurm_* flags as SlurmSettings (their numbers and syntax checked), None with --executor local."""
    defaults = build_parser().parse_args(["--out_dir", "x"])
    given = [name for name in SLURM_ONLY if getattr(args, name) != getattr(defaults, name)]
    if args.executor != "slurm":
        if given:
            raise AblateError(f"--{given[0]} needs --executor slurm")
        return None
    if args.print_commands:
        raise AblateError("--print_commands and --executor slurm exclude each other (slurm submits the commands)")
    try:
        settings = executors.SlurmSettings(partition=args.slurm_partition, nodes=args.slurm_nodes,
                                           gpus_per_node=args.slurm_gpus_per_node,
                                           cpus_per_task=args.slurm_cpus_per_task, time=args.slurm_time,
                                           parallel=args.slurm_parallel,
                                           extra=executors.parse_extra(args.slurm_extra))
        for name, value, least in (("nodes", settings.nodes, 1), ("gpus_per_node", settings.gpus_per_node, 0),
                                   ("cpus_per_task", settings.cpus_per_task, 1), ("parallel", settings.parallel, 0)):
            if value < least:
                raise AblateError(f"--slurm_{name} must be at least {least}, got {value}")
        settings.check_time()      # --slurm_time: its syntax, and long enough for the checkpoint signal
    except ExecutorError as error:
        raise AblateError(str(error)) from None
    return settings


def main(argv=None) -> int:
    export_package_path()
    runner = Runner()
    runner.install()
    try:
        return study(runner, argv)
    except AblateError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except Detached as detached:        # Ctrl-C while waiting for Slurm: the jobs are the cluster's now
        print(f"interrupted while waiting: {detached}", file=sys.stderr, flush=True)
        return 130
    except (Interrupted, KeyboardInterrupt):
        where = f" during {runner.current}" if runner.current else ""
        print(f"interrupted{where}: finished cells are kept and the interrupted one resumes from its latest "
              f"checkpoint; run the same command again to go on", file=sys.stderr, flush=True)
        if runner.study is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            runner.study.set_status("KILLED")
        return 130


class Detached(Exception):
    """Ctrl-C while waiting for the study's Slurm jobs: they go on; the message says how to cancel them."""


def study(runner: Runner, argv) -> int:
    """The whole study: open (or find) it, train what is not finished, evaluate, report; the exit code."""
    plan = prepare(argv)
    args, out_dir = plan["args"], plan["out_dir"]
    if args.executor == "slurm":
        if args.cancel:
            return cancel_study(plan)
        check_cluster(plan)
    study_run, uri = open_study(runner, plan)
    selected = plan["selected"]
    if args.print_commands:
        return print_commands(selected, study_run, plan["key"], uri)
    startup_seconds = time.perf_counter() - STARTED     # imports, checks, MLflow parent and children
    if args.report_only:
        train_seconds, failures = 0.0, []
    elif args.executor == "slurm":
        outcome = train_on_slurm(runner, plan, study_run)
        if outcome is None:       # --no_wait
            return 0
        train_seconds, failures = outcome
    else:
        train_seconds, failures = train_cells(runner, selected, study_run)
    data_dir = plan["shared"].get("data_dir")
    eval_started = time.perf_counter()
    scored = evaluate_on_slurm(plan, selected, data_dir) if args.executor == "slurm" and not args.eval_local else ()
    job_seconds = time.perf_counter() - eval_started
    rows, missing, eval_seconds = evaluate_cells(runner, selected, study_run, data_dir, args, failures, scored)
    eval_seconds += job_seconds
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
    from music_continuation.utils import check_mlflow_server
    try:
        check_mlflow_server(uri)
    except OSError as error:
        raise AblateError(f"--mlflow_tracking_uri {uri}: {error}") from None
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
                                                 "command": shlex.join(cell.command)}, sort_keys=True)
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


def unfinished(selected: list, study_run: Study) -> list:
    """The cells still to train; finished ones are said and skipped (by their hash, whatever the executor)."""
    todo = []
    for index, cell in enumerate(selected, 1):
        cell.head = f"[ablate] cell {index}/{len(selected)} {cell.label} (hash {cell.hash})"
        if cell.status == "done":
            print(f"{cell.head}: finished in run {cell.run.info.run_id}, skipped", file=sys.stderr, flush=True)
        elif cell.status == "complete":      # its last epoch was saved, then the launcher was stopped
            print(f"{cell.head}: trained to the last epoch already, skipped (run {cell.run} marked FINISHED)",
                  file=sys.stderr, flush=True)
            mark_finished(study_run, cell.run)
        else:
            todo.append(cell)
    return todo


def refresh(selected: list, study_run: Study) -> None:
    children = study_run.children()
    for cell in selected:
        cell.status, cell.run = cell_status(cell, children)


def train_cells(runner: Runner, selected: list, study_run: Study) -> tuple[float, list]:
    """Run every unfinished cell here, one after another; (seconds spent training, failures)."""
    study_run.set_status("RUNNING")
    todo = unfinished(selected, study_run)
    if not todo:
        return 0.0, []
    preloader = threading.Thread(target=preload, daemon=True)    # evaluation's imports load while a cell trains
    local = executors.LocalExecutor(runner)
    local.submit(todo, on_first_start=preloader.start)
    preloader.join()
    refresh(selected, study_run)
    return local.train_seconds, local.failures


# ------------------------------------------------------------------------------------------- slurm

def check_cluster(plan: dict) -> None:
    """Before anything is created or submitted: Slurm accepts the resources, and MLflow is reachable from nodes."""
    try:
        executors.check_tracking_uri(tracking_uri_of(plan["shared"]))
        executors.check_slurm(plan["slurm"])
    except ExecutorError as error:
        raise AblateError(str(error)) from None


def slurm_executor(plan: dict) -> executors.SlurmExecutor:
    return executors.SlurmExecutor(plan["out_dir"] / "slurm", plan["slurm"], name=f"ablate-{plan['key'][:8]}")


def cancel_study(plan: dict) -> int:
    """--cancel: scancel every job the study recorded (finished ones are unaffected)."""
    ids = slurm_executor(plan).cancel()
    print(f"[ablate] cancelled: scancel {' '.join(ids)}" if ids else
          f"[ablate] no Slurm jobs recorded in {plan['out_dir'] / 'slurm'}", file=sys.stderr, flush=True)
    return 0


def train_on_slurm(runner: Runner, plan: dict, study_run: Study) -> tuple[float, list] | None:
    """Submit the unfinished cells as one job array (those still queued or running from an earlier invocation
    are waited for, not submitted again); wait, printing every change of state; (seconds waited, failures),
    or None with --no_wait."""
    args, slurm = plan["args"], plan["slurm"]
    study_run.set_status("RUNNING")
    todo = unfinished(plan["selected"], study_run)
    executor = slurm_executor(plan)
    new = []
    for cell in todo:
        cell.launcher_argv = cell_command(cell, study_run.run_id, plan["key"], tracking_uri_of(plan["shared"]),
                                          resume=True, torchrun=True)[1:]
        cell.nproc_per_node = slurm.gpus_per_node or cell.flags.get("nproc") or 1
        state = executor.attach(cell)
        if state is None:
            new.append(cell)
        else:
            print(f"{cell.head}: job {executor.records[cell.label]['job_id']} is {state}; waiting for it",
                  file=sys.stderr, flush=True)
    if new:
        ids = executor.submit(new)
        print(f"[ablate] submitted {len(new)} cells as job array {ids[0].split('_')[0]} "
              f"({time.perf_counter() - STARTED:.1f} s after the command): " +
              ", ".join(f"{cell.label}={job_id}" for cell, job_id in zip(new, ids)), file=sys.stderr, flush=True)
    if args.no_wait:
        print(f"[ablate] --no_wait: {len(executor.jobs)} jobs queued or running; run the same command again "
              f"to wait for them and report", file=sys.stderr, flush=True)
        return None
    started = time.perf_counter()
    states = wait_for(executor)
    waited = time.perf_counter() - started
    refresh(plan["selected"], study_run)
    failures = [f"{label} (Slurm {executor.slurm_state(label)}: {executor.error_of(label)})"
                for label, state in states.items() if state == "failed"]
    return waited, failures


def wait_for(executor: executors.SlurmExecutor) -> dict:
    """Poll the jobs until every one is final, printing one line per change of state; {label: state}.
    Ctrl-C leaves them running (Detached, with the scancel line)."""
    said = {}
    try:
        while True:
            states = executor.poll()
            for label, state in states.items():
                before = said.get(label)
                if state == "pending" and before in ("running", "requeued"):
                    state = "requeued"      # sacct shows a requeued job as pending again
                if state != before:
                    print(f"[ablate] cell {label} (job {executor.jobs[label].job_id}): {state}",
                          file=sys.stderr, flush=True)
                    said[label] = state
            if all(state in ("done", "failed") for state in states.values()):
                return states
            time.sleep(executors.POLL_SECONDS)
    except KeyboardInterrupt:
        active = [label for label in executor.jobs if said.get(label) not in ("done", "failed")]
        ids = executor.job_ids(active)
        raise Detached(f"{len(ids)} Slurm jobs keep running (the same command waits for them again); to cancel "
                       f"them: scancel {' '.join(ids)}") from None


def evaluate_on_slurm(plan: dict, selected: list, data_dir) -> set:
    """The evaluation as one Slurm job (on a GPU when the cells had some); its results are cached in the cells'
    folders, where evaluate_cells finds them; the labels it scored. If the job fails, the evaluation runs here."""
    import types

    from music_continuation.ablation import (
        ablate as module,  # by name (not __main__), so the job unpickles evaluate_cell from this file
    )
    cells = [types.SimpleNamespace(folder=cell.folder, label=cell.label) for cell in selected
             if cell.status in ("done", "complete")]
    cells = [cell for cell in cells if cached_evaluation(cell, evaluation_key(cell, data_dir, plan["args"])) is None]
    if not cells:      # every one is scored already: no job
        return set()
    args = argparse.Namespace(**vars(plan["args"]))
    args.eval_device = "cuda" if plan["slurm"].gpus_per_node else "cpu"
    try:
        slurm_executor(plan).evaluate(module.evaluate_cell, cells, data_dir, args,
                                      gpus=plan["slurm"].gpus_per_node)
    except (RuntimeError, ExecutorError) as error:
        warn(f"{one_line(error)}; evaluating here on {plan['args'].eval_device}")
        return set()
    return {cell.label for cell in cells}


def mark_finished(study_run: Study, run_id) -> None:
    if not run_id:
        return
    try:
        study_run.client.set_terminated(run_id, status="FINISHED")
    except Exception as error:  # noqa: BLE001 - MLflow bookkeeping must not stop the study
        warn(f"could not mark run {run_id} FINISHED ({one_line(error)})")


def evaluate_cells(runner: Runner, selected: list, study_run: Study, data_dir, args,
                   failures: list, scored=()) -> tuple[list, list, float]:
    """Evaluate the best.pt of every cell that finished training, on the same validation windows;
    (report rows, cells not finished, seconds). Evaluation errors are added to `failures`. `scored`: the labels
    an evaluation job scored just now (their results are cached; they are logged to MLflow here)."""
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
        if (fresh or cell.label in scored) and run_id:
            log_evaluation(study_run, run_id, result)
        rows.append({"cell": cell.name, "seed": cell.seed, "hash": cell.hash, "run_id": run_id, "result": result,
                     "unity": bool(cell.settings.get("unity_test")), "metrics": run_metrics(study_run, cell, run_id)})
    return rows, missing, eval_seconds


def run_metrics(study_run: Study, cell: Cell, run_id) -> dict:
    """The last value of every metric of the cell's MLflow run ({} if it cannot be read)."""
    if cell.status == "done" and cell.run is not None:
        return dict(cell.run.data.metrics)
    try:
        return dict(study_run.client.get_run(run_id).data.metrics) if run_id else {}
    except Exception:  # noqa: BLE001 - the shares are extra columns; the report goes on without them
        return {}


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
        listening = study_listening(out_dir, study_run)
        write_json(out_dir / REPORT_ROWS, {"rows": rows, "names": plan["names"], "header": header})
        markdown = write_report(rows, plan["names"], report_dir, header, listening=listening)
        try:
            study_run.client.log_artifacts(study_run.run_id, str(report_dir), "report")
        except Exception as error:  # noqa: BLE001
            warn(f"report not uploaded to MLflow ({one_line(error)}); it is in {report_dir}")
        print(markdown, flush=True)
        print(f"[ablate] report: {report_dir}/results.md, results.csv, results.png", file=sys.stderr, flush=True)
    if missing:
        print(f"[ablate] not finished yet (not in the report): {', '.join(missing)}", file=sys.stderr, flush=True)


def study_listening(out_dir: Path, study_run: Study) -> dict | None:
    """The ratings of the study's listening test (OUT_DIR/listening), logged to MLflow, or None: without a test or
    ratings, or (one warning line) when the ratings belong to a test whose conditions changed."""
    from music_continuation.study.ratings import StudyError, Test
    from music_continuation.study.report import log_metrics
    from music_continuation.study.report import study_listening as listening_of
    try:
        listening = listening_of(out_dir)
    except StudyError as error:
        print(f"warning: listening test left out of the report: {error}", file=sys.stderr, flush=True)
        return None
    if listening is not None:
        for warning in log_metrics(study_run.client, Test.load(listening["test_dir"]), listening):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    return listening


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
        warn(f"evaluation not logged to run {run_id} ({one_line(error)})")


def cli() -> None:
    exit_now(main())     # every file and run is written by now


if __name__ == "__main__":
    cli()
