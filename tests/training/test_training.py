"""DDP training: launcher validation, the worker's step / epoch / MLflow / checkpoint behaviour, resume.

Everything runs on CPU with gloo, a 1-layer d_model 32 model and 8-frame segments on the tiny demo
cache (conftest.tiny_cache: 51 train / 17 val examples). The launcher is run for real (subprocess,
torch.multiprocessing.spawn); the comparisons are against independent references: a single-process
run for DDP, an uninterrupted run for resume, a hand-driven optimiser for the skipped NaN step,
MlflowClient reads for the logging.
"""
from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from music_continuation.losses.audio import LOSSES
from music_continuation.model import ContinuationTransformer
from music_continuation.training import launcher as train_simple_ddp
from music_continuation.training import step as training_step
from music_continuation.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_for_inference,
    save_checkpoint,
    unwrapped_state_dict,
)
from music_continuation.training.mlflow_logger import MlflowLogger
from music_continuation.utils import free_port
from tests.fault_launcher import FAULT_LAUNCHER, fault_environment

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--segment_frames", 8, "--d_model", 32, "--num_layers", 1, "--num_heads", 2, "--num_workers", 0,
        "--warmup_steps", 2, "--lr", 1e-3, "--log_audio_every", 0]
METRICS = (("train_loss", "val_loss", "learning_rate", "val_latent_mse", "val_level", "val_skill",
            "train_grad_norm_rms_target", "train_grad_share_rms_target")     # the default weights train rms_target
           + tuple(f"{split}_{c.name}" for split in ("train", "val") for c in LOSSES if not c.adversarial))
BASELINE_METRICS = tuple(f"val_baseline_{name}_loss" for name in ("silence", "repeat", "oracle"))
NUMBER = r"(-?[0-9.]+(?:e[-+][0-9]+)?|n/a)"       # n/a: a figure that does not exist (no validation)
PARTS = rf"{NUMBER} \(" + ", ".join(rf"{c.short}: {NUMBER}" for c in LOSSES if not c.adversarial) + r"\)"
EPOCH_BLOCK = re.compile(rf"^Epoch (\d+)/(\d+):\n  Train Loss: {PARTS}\n  Val Loss:   {PARTS}\n  LR: {NUMBER}$",
                         re.MULTILINE)
RUN_TIMEOUT = 420        # seconds: a hung job fails the test instead of blocking the suite
_EMPTY_STORE = []        # the path of an empty sqlite MLflow store, made once per test session


def sqlite_uri(folder: Path) -> str:
    """An MLflow sqlite store in `folder`: a copy of an empty one made once, since creating the schema takes
    5-7 s on 2 cores and a run that creates its own store is not what most tests test (the race test and the
    default-flags tests still create theirs)."""
    path = folder / "mlflow.db"
    if not path.exists():
        if not _EMPTY_STORE:
            from mlflow.tracking import MlflowClient
            empty = Path(tempfile.mkdtemp(prefix="mlflow-empty-")) / "mlflow.db"
            MlflowClient(f"sqlite:///{empty}").search_experiments()      # creates the schema
            _EMPTY_STORE.append(empty)
            atexit.register(shutil.rmtree, empty.parent, ignore_errors=True)
        shutil.copyfile(_EMPTY_STORE[0], path)
    return f"sqlite:///{path}"


def run_launcher(argv, cwd: Path, env: dict | None = None, new_store: bool = False,
                 faults: str | None = None) -> subprocess.CompletedProcess:
    """train_simple_ddp.py ARGV in `cwd`; MLflow's default store there starts as a copy of an empty one unless
    `new_store` (the run creates it, as a user's first run does). `faults`: run tests/fault_launcher.py with
    these TEST_FAULTS instead."""
    if not new_store and "--mlflow_tracking_uri" not in map(str, argv):
        sqlite_uri(Path(cwd))
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(env or {})
    script = ROOT / "train_simple_ddp.py"
    if faults is not None:
        environment, script = fault_environment(faults, environment), FAULT_LAUNCHER
    command = [sys.executable, str(script), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def epoch_blocks(stdout: str) -> dict[int, dict]:
    """{epoch: {"train": [total, rms_in, rms_tgt, spec, mel], "val": [...], "lr": float}} from the printed blocks."""
    blocks = {}
    for match in EPOCH_BLOCK.finditer(stdout):
        values = [math.nan if v == "n/a" else float(v) for v in match.groups()[2:]]
        blocks[int(match.group(1))] = {"train": values[0:5], "val": values[5:10], "lr": values[10]}
    return blocks


def model_weights(checkpoint_dir: Path, name: str = "latest.pt") -> dict:
    return load_checkpoint(checkpoint_dir / name)["model"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"largest parameter difference {worst:.3g} > {atol}"


def flat(state: dict) -> torch.Tensor:
    return torch.cat([tensor.double().flatten() for _, tensor in sorted(state.items())])


def assert_same_training(a: dict, b: dict, initial: dict, rel: float = 1e-2) -> None:
    """Two runs that should have taken the same updates: ||a - b|| <= rel x ||a - initial||.

    The bound is relative to how far training moved the weights. Summing the same gradients in another
    order (shards averaged by DDP vs one batch) differs in float32 rounding, ~1e-7 relative, which Adam
    can amplify on near-zero gradients to ~1e-3 of the update on this scale; a real fault (a shard missing,
    gradients not averaged, a wrong LR or a step applied twice) changes the update by tens of percent.
    """
    moved = (flat(a) - flat(initial)).norm().item()
    difference = (flat(a) - flat(b)).norm().item()
    assert moved > 0, "training did not move the weights"
    assert difference <= rel * moved, f"runs differ by {difference:.3g}, {difference / moved:.2%} of the update"


def initial_weights(seed: int = 0, **config) -> dict:
    """The weights the worker starts from: torch.manual_seed(--seed), then the model."""
    torch.manual_seed(seed)
    config = {**dict(d_model=32, num_layers=1, num_heads=2, dropout=0.0), **config}
    return ContinuationTransformer(**config).state_dict()


def steps_per_epoch(cache: Path, nproc: int, batch_size: int, segment_frames: int = 8) -> int:
    from music_continuation.data.cache import ContinuationDataset
    return len(ContinuationDataset(cache, "train", segment_frames)) // nproc // batch_size


# ------------------------------------------------------------------------------------- unit level

def test_model_predicts_a_window_of_the_same_shape():
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    for frames in (8, 37):
        latents = torch.randn(3, 128, frames)
        out = model(latents)
        assert out.shape == latents.shape and torch.isfinite(out).all()
    # every output frame sees the whole context (no causal mask): changing the LAST input frame moves the FIRST output
    latents = torch.randn(1, 128, 8)
    changed = latents.clone()
    changed[..., -1] += 1.0
    assert not torch.allclose(model(latents)[..., 0], model(changed)[..., 0])
    with pytest.raises(ValueError, match="divisible"):
        ContinuationTransformer(d_model=30, num_heads=4)


def test_lr_schedule_is_linear_warmup_then_cosine_to_a_tenth():
    f = training_step.lr_factor
    assert [f(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 4, 100) == pytest.approx(1.0)
    assert f(52, 4, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100, 4, 100) == pytest.approx(0.1) and f(150, 4, 100) == pytest.approx(0.1)
    assert f(0, 0, 10) == pytest.approx(1.0)


def test_checkpoint_save_load_unwrap_and_inference(tmp_path):
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)

    class Wrapper(torch.nn.Module):       # what DistributedDataParallel looks like from outside
        def __init__(self, inner):
            super().__init__()
            self.module = inner
    wrapped = Wrapper(torch.compile(model))     # torch.compile adds "_orig_mod." (nothing compiles until called)
    assert all(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    clean = unwrapped_state_dict(wrapped)
    assert clean.keys() == model.state_dict().keys()

    state = dict(model=clean, model_config=model.config, epoch=3, latent_mean=torch.zeros(128) + 0.5,
                 latent_std=torch.ones(128) * 2, codec_fingerprint="0123456789abcdef", args={"lr": 1e-3})
    path = tmp_path / "sub" / "latest.pt"
    save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]      # no temporary file left behind
    loaded, normalizer, info = load_model_for_inference(path)
    latents = torch.randn(2, 128, 8)
    assert torch.equal(loaded(latents), model.eval()(latents))
    assert torch.allclose(normalizer.denormalize(torch.zeros(1, 128, 1)), torch.full((1, 128, 1), 0.5))
    assert info["epoch"] == 3 and info["args"] == {"lr": 1e-3}

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(corrupt)
    assert "truncated or damaged checkpoint" in str(error.value) and "\n" not in str(error.value)
    save_checkpoint(tmp_path / "other.pt", {"weights": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="missing model"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.fixture(scope="module")
def step_parts():
    """A tiny model, the frozen random decoder, normaliser, loss and four fixed batches of 4 examples."""
    from music_continuation.codec import FrozenDecoder, load_codec
    from music_continuation.data.cache import LatentNormalizer
    from music_continuation.losses.audio import CombinedLoss
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_latent": torch.randn(4, 128, 8, generator=generator),
                "input_audio": torch.randn(4, 1, 2560, generator=generator) * 0.1,
                "target_audio": torch.randn(4, 1, 2560, generator=generator) * 0.1} for _ in range(4)]
    return {"decoder": FrozenDecoder(load_codec("random")), "batches": batches,
            "normalizer": LatentNormalizer(torch.zeros(128), torch.ones(128)),
            "loss_fn": CombinedLoss(rms_input=0.2, rms_target=0.5, spectral=0.3, mel=0.0),
            # Spectral convergence is a ratio of norms over the whole batch, so it does not split into
            # a mean over shards: comparisons of DDP with one process train on the per-example RMS terms.
            "shardable_loss_fn": CombinedLoss(rms_input=0.2, rms_target=0.8, spectral=0.0, mel=0.0)}


def make_trainable(seed: int = 0):
    torch.manual_seed(seed)
    model = ContinuationTransformer(d_model=32, num_layers=1, num_heads=2, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def test_train_step_updates_and_skips_non_finite_steps(step_parts):
    parts = step_parts
    model, optimizer, scheduler = make_trainable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied, total, components = training_step.train_step(
        model, parts["decoder"], parts["normalizer"], parts["loss_fn"], optimizer, scheduler,
        parts["batches"][0], grad_clip=1.0)
    assert applied and torch.isfinite(total) and set(components) == {"rms_input", "rms_target", "spectral", "mel"}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the total is the weighted sum of the components (mel has weight 0 but is still measured)
    assert total.item() == pytest.approx(0.2 * components["rms_input"].item() + 0.5 * components["rms_target"].item()
                                         + 0.3 * components["spectral"].item(), rel=1e-5)
    assert components["mel"].item() > 0

    after_good = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = {k: v["exp_avg"].clone() for k, v in enumerate(optimizer.state.values())}
    poisoned = {k: v.clone() for k, v in parts["batches"][1].items()}
    poisoned["input_latent"][0, 0, 0] = float("nan")
    applied, total, _ = training_step.train_step(
        model, parts["decoder"], parts["normalizer"], parts["loss_fn"], optimizer, scheduler, poisoned, grad_clip=1.0)
    assert not applied and not torch.isfinite(total)
    for name, value in model.state_dict().items():       # weights and Adam moments untouched
        assert torch.equal(value, after_good[name]), name
    assert all(torch.equal(v["exp_avg"], optimizer_state[k]) for k, v in enumerate(optimizer.state.values()))
    assert scheduler.last_epoch == 2                        # the schedule still advanced


def _nan_collective_worker(rank: int, world_size: int, port: int, out_dir: str, step_parts: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, optimizer, scheduler = make_trainable()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    applied_steps = []
    for step, batch in enumerate(step_parts["batches"]):
        shard = {k: v[rank * 2: rank * 2 + 2].clone() for k, v in batch.items()}
        if step == 1 and rank == 1:
            shard["input_latent"][0, 0, 0] = float("nan")    # only rank 1 sees a NaN loss
        applied, _, _ = training_step.train_step(ddp, step_parts["decoder"], step_parts["normalizer"],
                                                 step_parts["shardable_loss_fn"], optimizer, scheduler,
                                                 shard, 1.0)
        applied_steps.append(applied)
    torch.save({"applied": applied_steps, "model": model.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(step_parts, tmp_path):
    """2 ranks, NaN on rank 1 at step 1: both skip it, stay identical, and match one process that skips it."""
    torch.multiprocessing.spawn(_nan_collective_worker, args=(2, free_port(), str(tmp_path),
                                                              step_parts), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["applied"] == ranks[1]["applied"] == [True, False, True, True]
    assert_same_weights(ranks[0]["model"], ranks[1]["model"], atol=0.0)

    model, optimizer, scheduler = make_trainable()         # reference: one process, same global batches
    for step, batch in enumerate(step_parts["batches"]):
        if step == 1:
            scheduler.step()                               # skipped update, schedule still advances
            continue
        applied, _, _ = training_step.train_step(model, step_parts["decoder"], step_parts["normalizer"],
                                                 step_parts["shardable_loss_fn"], optimizer, scheduler,
                                                 batch, 1.0)
        assert applied
    # Summation order differs (two shards averaged vs one batch): float32 rounding, bounded relative to
    # the update; a step applied or skipped wrongly moves the weights by a whole update.
    assert_same_training(model.state_dict(), ranks[0]["model"], make_trainable()[0].state_dict())


@pytest.mark.slow
def test_mlflow_failure_mid_run_warns_queues_and_retries(mlflow_server, capsys):
    from mlflow.tracking import MlflowClient
    logger = MlflowLogger(mlflow_server, "mid-run-failure", "flaky")
    live_client = logger.client
    logger.client = MlflowClient(f"http://127.0.0.1:{free_port()}")    # the server "goes down"
    assert logger.log_metrics({"train_loss": 1.0}, step=1) is False
    assert "MLflow logging failed" in capsys.readouterr().err and len(logger.pending) == 1
    logger.client = live_client                                                       # ... and comes back
    assert logger.log_metrics({"train_loss": 0.5}, step=2) is True and not logger.pending
    history = live_client.get_metric_history(logger.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]
    logger.finish()
    assert live_client.get_run(logger.run_id).info.status == "FINISHED"


# -------------------------------------------------------------------------------- flag validation

def validation_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_simple_ddp.parse_and_validate([str(a) for a in argv])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train_simple_ddp.py: error: ") or "error:" in message
    return message


@pytest.fixture(scope="module")
def other_codec_file(tmp_path_factory) -> Path:
    """A valid EnCodec state dict whose weights differ from 'random' (so its fingerprint differs)."""
    from music_continuation.codec import load_codec
    state = load_codec("random").state_dict()
    first = next(iter(state))
    state[first] = state[first] + 1.0
    path = tmp_path_factory.mktemp("other_codec") / "other.th"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("extra, expected", [
    (["--loss_weight_mel", -0.5], "--loss_weight_mel must be a number >= 0"),
    (["--loss_weight_target", 0], "all four --loss_weight_* are 0"),
    (["--segment_frames", 6], "--segment_frames 6 is too short"),
    (["--batch_size", 0], "--batch_size must be at least 1"),
    (["--epochs", 0], "--epochs must be at least 1"),
    (["--lr", -1], "--lr must be a positive number"),
    (["--d_model", 30, "--num_heads", 4], "divisible by --num_heads"),
    (["--dropout", 1.0], "--dropout must be in [0, 1)"),
    (["--nproc", 0], "--nproc must be at least 1"),
    (["--unity_test", "maybe"], "expected true or false"),
    (["--encodec_weights", "/nonexistent/encodec.th"], "no such file"),
    (["--batch_size", 30, "--nproc", 2], "fewer than one step needs"),
    (["--segment_frames", 80], "has no window of 2 x 80 frames"),
    (["--resume", "/nonexistent/latest.pt"], "no such checkpoint file"),
])
def test_each_bad_flag_is_a_one_line_error(extra, expected, tiny_cache, capsys):
    message = validation_error(["--data_dir", tiny_cache] + TINY + extra, capsys)
    assert expected in message


def test_missing_data_dir_and_other_codec_are_refused(tiny_cache, other_codec_file, tmp_path, capsys):
    assert "no such directory" in validation_error(["--data_dir", tmp_path / "nothing"] + TINY, capsys)
    with pytest.raises(SystemExit):      # refused before anything is written: no empty checkpoint folder is left
        train_simple_ddp.parse_and_validate(["--data_dir", str(tmp_path / "nothing"),
                                             "--checkpoint_dir", str(tmp_path / "ck")], lock=True)
    assert not (tmp_path / "ck").exists()
    message = validation_error(["--data_dir", tiny_cache, "--encodec_weights", other_codec_file] + TINY, capsys)
    assert "differs from the one that made the cache" in message


def test_bool_flags_parse_false_as_false(tiny_cache):
    for text, value in (("False", False), ("false", False), ("0", False), ("no", False),
                        ("True", True), ("1", True), ("yes", True)):
        args, _ = train_simple_ddp.parse_and_validate(
            [str(a) for a in ["--data_dir", tiny_cache] + TINY + ["--unity_test", text]])
        assert args.unity_test is value
    argv = [str(a) for a in ["--data_dir", tiny_cache] + TINY + ["--unity_test"]]
    args, _ = train_simple_ddp.parse_and_validate(argv)
    assert args.unity_test is True and args.encodec_weights == "random"    # default: the cache's own weights


def test_resume_with_other_model_flags_is_refused(tiny_cache, tmp_path, capsys):
    from music_continuation.data.cache import read_manifest
    manifest = read_manifest(tiny_cache)
    model = ContinuationTransformer(d_model=64, num_layers=1, num_heads=2)
    save_checkpoint(tmp_path / "latest.pt", dict(model=model.state_dict(), model_config=model.config, epoch=1,
                                                 latent_mean=torch.zeros(128), latent_std=torch.ones(128),
                                                 codec_fingerprint=manifest["codec_fingerprint"], segment_frames=8))
    message = validation_error(["--data_dir", tiny_cache, "--checkpoint_dir", tmp_path, "--resume", "auto"] + TINY,
                               capsys)
    assert "the checkpoint has --d_model 64" in message


@pytest.mark.slow
def test_cli_exits_non_zero_with_one_line_error(tiny_cache, tmp_path):
    result = run_launcher(["--data_dir", tiny_cache, "--loss_weight_input", -1] + TINY, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["error: --loss_weight_input must be a number >= 0, got -1.0"]


@pytest.mark.slow
def test_unreachable_mlflow_server_stops_before_training(tiny_cache, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_launcher(["--data_dir", tiny_cache, "--mlflow_tracking_uri", dead, "--checkpoint_dir",
                           tmp_path / "ck", "--nproc", 2] + TINY, cwd=tmp_path)
    assert result.returncode != 0
    assert f"--mlflow_tracking_uri {dead}: the MLflow tracking server does not answer" in result.stderr
    assert "Epoch" not in result.stdout and not list((tmp_path / "ck").glob("*.pt"))


@pytest.mark.slow
def test_run_script_defaults_overrides_and_demo_preset(tmp_path):
    def traced(env, *args):
        result = subprocess.run(["bash", "-x", str(ROOT / "run_train_simple.sh"), *args, "--data_dir",
                                 str(tmp_path / "none")], env={**os.environ, **env}, capture_output=True,
                                text=True, timeout=RUN_TIMEOUT)
        assert result.returncode != 0 and "--data_dir" in result.stderr and "no such directory" in result.stderr
        return next(line for line in result.stderr.splitlines() if "exec " in line and "train_simple_ddp.py" in line)
    line = traced({})
    assert "--loss_weight" not in line and "--config" not in line      # the launcher's defaults: pure continuation
    line = traced({"LOSS_WEIGHT_TARGET": "0.5", "LOSS_WEIGHT_SPECTRAL": "0.5"}, "--loss_weight_mel", "0.1")
    assert "--loss_weight_target 0.5 --loss_weight_spectral 0.5" in line and line.endswith(
        "--loss_weight_mel 0.1 --data_dir " + str(tmp_path / "none"))
    line = traced({}, "--demo")
    assert "--config configs/demo.yaml --data_dir" in line     # tests/test_config.py checks what the preset holds


# ------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def reference_run(tiny_cache, mlflow_server, tmp_path_factory):
    """2 processes, 2 epochs, dropout on, logging to the real MLflow server (audio every 2 epochs)."""
    folder = tmp_path_factory.mktemp("reference")
    argv = ["--data_dir", tiny_cache, "--nproc", 2, "--batch_size", 2, "--epochs", 2, "--dropout", 0.1,
            "--mlflow_tracking_uri", mlflow_server, "--experiment_name", "reference", "--run_name", "uninterrupted"
            ] + TINY + ["--log_audio_every", 2]
    result = run_launcher(argv + ["--checkpoint_dir", folder / "ck"], cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"argv": argv, "result": result, "checkpoints": folder / "ck"}


@pytest.mark.slow
def test_two_process_run_prints_epoch_blocks_and_logs_to_mlflow(reference_run, mlflow_server):
    from mlflow.tracking import MlflowClient
    result = reference_run["result"]
    blocks = epoch_blocks(result.stdout)
    assert sorted(blocks) == [1, 2], result.stdout
    for block in blocks.values():
        assert all(math.isfinite(v) and v > 0 for v in block["train"] + block["val"])
        train_total, rms_in, rms_tgt, _, _ = block["train"]
        assert train_total == pytest.approx(rms_tgt, abs=1e-4)         # weights 0 / 1 / 0 / 0: total = rms_target
    assert "Epoch 1/2:\n  Train Loss: " in result.stdout and "\n  Val Loss:   " in result.stdout

    client = MlflowClient(mlflow_server)
    run_id = load_checkpoint(reference_run["checkpoints"] / "latest.pt")["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "uninterrupted"
    for name in METRICS:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
        assert all(math.isfinite(m.value) for m in history), name
    for name in BASELINE_METRICS:                                           # once per run, at step 0
        assert [m.step for m in client.get_metric_history(run_id, name)] == [0], name
    # the summary line puts the best epoch against the baselines MLflow holds
    summary = result.stdout.strip().splitlines()[-1]
    silence = client.get_metric_history(run_id, "val_baseline_silence_loss")[0].value
    assert summary.startswith("done: best val loss ") and f"silence {silence:.4f}" in summary
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert by_step[2] == pytest.approx(blocks[2]["val"][0], abs=1e-4)       # MLflow holds what was printed
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "learning_rate")}
    assert f"{lr[1]:.2e}" == f"{blocks[1]['lr']:.2e}"
    params = run.data.params
    assert params["world_size"] == "2" and params["device"] == "cpu" and params["loss_weight_target"] == "1.0"
    assert len(params["codec_fingerprint"]) == 16 and params["git_commit"]
    assert {"epochs", "batch_size", "lr", "segment_frames", "d_model", "unity_test", "nproc", "resume"} <= set(params)
    artifacts = {a.path for a in client.list_artifacts(run_id, "samples/epoch_0002")}
    assert {f"samples/epoch_0002/example0_{kind}.wav" for kind in ("input", "output", "target")} <= artifacts
    assert "samples/epoch_0002/example0_spectrogram.png" in artifacts
    assert not client.list_artifacts(run_id, "samples/epoch_0001")          # --log_audio_every 2
    # the resolved settings: an artifact, the same file in the checkpoint folder, and the checkpoint's args
    import yaml
    local = reference_run["checkpoints"] / "settings.yaml"
    saved = yaml.safe_load(local.read_text())
    assert saved["nproc"] == 2 and saved["d_model"] == 32 and saved["loss_weight_target"] == 1.0
    assert yaml.safe_load(open(client.download_artifacts(run_id, "settings.yaml", str(local.parent.parent)))) == saved
    args = load_checkpoint(reference_run["checkpoints"] / "latest.pt")["args"]
    assert {flag: args[flag] for flag in saved} == saved
    best = load_checkpoint(reference_run["checkpoints"] / "best.pt")
    assert best["val_loss"] == best["best_val_loss"] == min(b["val"][0] for b in blocks.values()) or \
        abs(best["val_loss"] - min(b["val"][0] for b in blocks.values())) < 1e-4


@pytest.fixture(scope="module")
def crashed_run(reference_run, tiny_cache, tmp_path_factory):
    """The reference command, but rank 1 raises at the 2nd step of epoch 2 (after latest.pt of epoch 1)."""
    folder = tmp_path_factory.mktemp("crashed")
    crash_step = steps_per_epoch(tiny_cache, nproc=2, batch_size=2) + 1
    argv = reference_run["argv"] + ["--checkpoint_dir", folder / "ck"]
    result = run_launcher(argv, cwd=folder, faults=f"fail=1:{crash_step}")
    return {"argv": argv, "result": result, "checkpoints": folder / "ck", "folder": folder}


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_error(crashed_run):
    result = crashed_run["result"]
    assert result.returncode != 0
    log = crashed_run["checkpoints"] / "logs" / "rank1.log"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training failed on rank 1: test-only failure injected")
    assert errors[0].endswith(f"(traceback in {log})") and "Traceback" not in result.stderr
    assert "RuntimeError: test-only failure injected on rank 1" in log.read_text()
    assert sorted(epoch_blocks(result.stdout)) == [1]
    assert load_checkpoint(crashed_run["checkpoints"] / "latest.pt")["epoch"] == 1


@pytest.mark.slow
def test_resume_auto_continues_to_the_same_weights_and_mlflow_run(crashed_run, reference_run, mlflow_server):
    from mlflow.tracking import MlflowClient
    first_run_id = load_checkpoint(crashed_run["checkpoints"] / "latest.pt")["mlflow_run_id"]
    result = run_launcher(crashed_run["argv"] + ["--resume", "auto"], cwd=crashed_run["folder"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at epoch 2" in result.stdout and sorted(epoch_blocks(result.stdout)) == [2]
    resumed = load_checkpoint(crashed_run["checkpoints"] / "latest.pt")
    reference = load_checkpoint(reference_run["checkpoints"] / "latest.pt")
    assert resumed["epoch"] == reference["epoch"] == 2
    assert_same_weights(resumed["model"], reference["model"], atol=0.0)      # bit-identical on CPU
    assert epoch_blocks(result.stdout)[2] == epoch_blocks(reference_run["result"].stdout)[2]

    client = MlflowClient(mlflow_server)
    assert resumed["mlflow_run_id"] == first_run_id                          # same run, continuous curves
    assert sorted(m.step for m in client.get_metric_history(first_run_id, "val_loss")) == [1, 2]
    assert client.get_run(first_run_id).info.status == "FINISHED"


def two_ranks_flags(cache: Path, folder: Path) -> list:
    """1 epoch, 2 ranks x batch 2, with activation checkpointing through the decoder (it must not change the
    gradients either); shared by the single-process and the torchrun comparisons."""
    return ["--data_dir", cache, "--epochs", 1, "--dropout", 0.0, "--mlflow_tracking_uri", sqlite_uri(folder),
            "--batch_size", 2, "--decoder_checkpointing", "true"] + TINY


@pytest.fixture(scope="module")
def two_ranks(tiny_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The launcher's own spawning of 2 ranks: its checkpoint folder and its output."""
    folder = tmp_path_factory.mktemp("two_ranks")
    result = run_launcher(two_ranks_flags(tiny_cache, folder) + ["--nproc", 2, "--checkpoint_dir", folder / "ck"],
                          folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "ck", result


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_cache, tmp_path, two_ranks):
    one = run_launcher(["--data_dir", tiny_cache, "--epochs", 1, "--dropout", 0.0, "--mlflow_tracking_uri",
                        sqlite_uri(tmp_path), "--nproc", 1, "--batch_size", 4, "--checkpoint_dir", tmp_path / "one"]
                       + TINY, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two_dir, two = two_ranks
    assert_same_training(model_weights(tmp_path / "one"), model_weights(two_dir), initial_weights())
    block_one, block_two = epoch_blocks(one.stdout)[1], epoch_blocks(two.stdout)[1]
    for split in ("train", "val"):
        # total, rms_in, rms_tgt and mel are per-example means: the same whatever the sharding
        for index in (0, 1, 2, 4):
            assert block_one[split][index] == pytest.approx(block_two[split][index], abs=2e-4), (split, index)
        # spectral convergence is ||Y - X|| / ||Y|| over each rank's batch (the Parallel WaveGAN formula),
        # so batches of 2 and of 4 measure slightly different figures of the same outputs
        assert block_one[split][3] == pytest.approx(block_two[split][3], rel=0.03), split
    assert block_one["lr"] == block_two["lr"]


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_every_rank(tiny_cache, tmp_path):
    result = run_launcher(["--data_dir", tiny_cache, "--nproc", 2, "--batch_size", 2, "--epochs", 2,
                           "--checkpoint_dir", tmp_path / "ck", "--mlflow_tracking_uri",
                           sqlite_uri(tmp_path)] + TINY, cwd=tmp_path,
                          faults="nan=1:all")
    assert result.returncode != 0
    assert "update skipped on all ranks (1 in a row)" in result.stderr
    assert "10 consecutive steps had a non-finite loss or gradient" in result.stderr
    assert "Epoch 1/2" not in result.stdout


@pytest.mark.slow
def test_unity_test_drives_the_loss_down(tiny_cache, tmp_path):
    result = run_launcher(["--data_dir", tiny_cache, "--nproc", 1, "--batch_size", 4, "--epochs", 6,
                           "--unity_test", "true", "--checkpoint_dir", tmp_path / "ck", "--mlflow_tracking_uri",
                           sqlite_uri(tmp_path), "--target_audio", "original"]
                          + TINY + ["--lr", 3e-3, "--dropout", 0.0], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = epoch_blocks(result.stdout)
    first, last = blocks[1]["val"][0], blocks[6]["val"][0]
    # With the random codec (decoder not the encoder's inverse) the identity is not a perfect answer:
    # what this shows is that the model learns through the frozen decoder (0.22 -> 0.13 measured).
    assert last < 0.7 * first, f"unity val loss went from {first} to {last}"


@pytest.mark.slow
def test_gradient_accumulation_matches_the_larger_batch(tiny_cache, tmp_path):
    """--batch_size 2 --grad_accum_steps 2 takes the steps --batch_size 4 takes (the default weights are per-example
    RMS terms, so the objective is a mean over examples either way): same weights up to float32 rounding, the
    same number of optimiser steps and LR, and epoch figures that mean the same. (2 ranks accumulating
    micro-batches of 1, where DDP all-reduces on the last micro-batch only, run the same train_step in
    test_balancer.test_one_rank_batch_4_equals_two_ranks_and_accumulation.)"""
    common = ["--data_dir", tiny_cache, "--epochs", 2, "--dropout", 0.0,
              "--mlflow_tracking_uri", sqlite_uri(tmp_path), "--nproc", 1] + TINY
    big = run_launcher(common + ["--batch_size", 4, "--checkpoint_dir", tmp_path / "big"], tmp_path)
    accumulated = run_launcher(common + ["--batch_size", 2, "--grad_accum_steps", 2,
                                         "--checkpoint_dir", tmp_path / "accum"], tmp_path)
    for result in (big, accumulated):
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_training(model_weights(tmp_path / "big"), model_weights(tmp_path / "accum"), initial_weights())
    steps = steps_per_epoch(tiny_cache, nproc=1, batch_size=4)
    for folder in ("big", "accum"):
        state = load_checkpoint(tmp_path / folder / "latest.pt")
        assert state["scheduler"]["last_epoch"] == 2 * steps and state["schedule_steps"] == 2 * steps
    for epoch in (1, 2):
        a, b = epoch_blocks(big.stdout)[epoch], epoch_blocks(accumulated.stdout)[epoch]
        assert a["lr"] == b["lr"]
        assert a["train"][0] == pytest.approx(b["train"][0], rel=1e-3)


@pytest.mark.slow
def test_torchrun_and_the_launcher_train_the_same_weights(tiny_cache, tmp_path, two_ranks):
    """The multi-node path (torchrun starts the ranks, the script runs the worker directly) against the
    launcher's own spawning: the same ranks doing the same work, so the weights are identical."""
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(ROOT / "train_simple_ddp.py"), *map(str, two_ranks_flags(tiny_cache, tmp_path)),
                               "--checkpoint_dir", str(tmp_path / "torchrun")],
                              cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    spawned_dir, spawned = two_ranks
    assert epoch_blocks(torchrun.stdout)[1] == epoch_blocks(spawned.stdout)[1]
    assert_same_weights(model_weights(spawned_dir), model_weights(tmp_path / "torchrun"), atol=0.0)
    assert load_checkpoint(tmp_path / "torchrun" / "latest.pt")["world_size"] == 2


@pytest.mark.slow
def test_the_slurm_template_runs_torchrun_on_every_node(tiny_cache, tmp_path):
    """cluster/train.sbatch on a one-node 'allocation': srun and scontrol are stand-ins, torchrun and the
    training are real. It must start torchrun with the c10d rendezvous and pass every flag through."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\n[ "$1" = "--kill-on-bad-exit=1" ] && shift\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    environment.update(PATH=f"{bin_dir}:{environment['PATH']}", PYTHON=sys.executable, SLURM_NNODES="1",
                       SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="2",
                       SLURM_SUBMIT_DIR=str(ROOT), RDZV_PORT=str(free_port()))
    argv = ["--data_dir", tiny_cache, "--epochs", 1, "--batch_size", 2, "--checkpoint_dir", tmp_path / "ck",
            "--mlflow_tracking_uri", sqlite_uri(tmp_path)] + TINY
    result = subprocess.run(["bash", str(ROOT / "cluster" / "train.sbatch"), *map(str, argv)], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(epoch_blocks(result.stdout)) == [1]
    state = load_checkpoint(tmp_path / "ck" / "latest.pt")
    assert state["world_size"] == 2 and state["args"]["resume"] == "auto"


@pytest.mark.slow
def test_musical_every_logs_the_listeners_figures_reduced_over_ranks(tiny_cache, tmp_path):
    """--musical_every 2 on 2 ranks: epoch 1 validates without the musical figures, epoch 2 (and the baselines, once)
    with them; the printed epoch block keeps its form. The figures in MLflow are those of evaluate_checkpoint on the
    whole val split in one process (the independent reference): each rank holds ~8 of the 17 val examples, 72 codec
    frames, too few for the Fréchet distance alone (129), so frechet_codec exists only if the ranks' sums were
    reduced before it was computed."""
    pytest.importorskip("onnxruntime", reason="the listeners' packages: pip install -r requirements-listeners.txt")
    from mlflow.tracking import MlflowClient

    from music_continuation.evaluation.scoring import BASELINES, evaluate_checkpoint
    from music_continuation.training.report import MUSICAL_FIGURES
    uri = sqlite_uri(tmp_path)
    result = run_launcher(["--data_dir", tiny_cache, "--nproc", 2, "--batch_size", 4, "--epochs", 2,
                           "--musical_every", 2, "--checkpoint_dir", tmp_path / "ck", "--mlflow_tracking_uri", uri]
                          + TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(epoch_blocks(result.stdout)) == [1, 2]          # the epoch block is unchanged
    assert "melody_f1" not in result.stdout and "frechet" not in result.stdout     # figures go to MLflow only
    client = MlflowClient(uri)
    run_id = load_checkpoint(tmp_path / "ck" / "latest.pt")["mlflow_run_id"]
    expected = evaluate_checkpoint(tmp_path / "ck" / "latest.pt", data_dir=tiny_cache, progress=False)
    assert expected["windows"] == 17 and expected["epoch"] == 2 and expected["model"]["frechet_codec"] is not None

    def logged(name):
        return {m.step: m.value for m in client.get_metric_history(run_id, name)}
    # 8-frame windows (0.1 s) hold no two beats after the seam: tempo_ratio is undefined, and then not logged
    assert [name for name in MUSICAL_FIGURES if expected["model"][name] is None] == ["tempo_ratio"]
    for figure in MUSICAL_FIGURES:
        model, skill = logged(f"val_{figure}"), logged(f"val_skill_{figure}")
        if expected["model"][figure] is None:
            assert not model and not skill, figure
            continue
        assert list(model) == [2], figure                          # not at epoch 1
        assert model[2] == pytest.approx(expected["model"][figure], rel=1e-3, abs=1e-3), figure
        if expected["skill"][figure] is None:
            assert not skill, figure
        else:
            assert skill[2] == pytest.approx(expected["skill"][figure], rel=1e-2, abs=1e-2), figure
        for name in BASELINES:
            value = expected["baselines"][name][figure]
            baseline = logged(f"val_baseline_{name}_{figure}")
            if value is None:
                assert not baseline, (name, figure)
            else:
                assert list(baseline) == [0] and baseline[0] == pytest.approx(value, rel=1e-3, abs=1e-3), (name, figure)
    assert logged("val_loss").keys() == {1, 2}
