"""The paths real users take, and every fault ending in one clear line (issue: reliability).

The default-flags run, non-finite validation data, Ctrl-C / SIGTERM to the launcher, resuming with changed
flags, a corrupt cache file inside a rank, a full disk while saving, a rank that dies after finishing, and
bf16 autocast through model and decoder. Runs are real launcher subprocesses on the tiny demo cache.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from music_continuation.data.cache import read_manifest, track_paths
from music_continuation.data.integrity import check_cache_files
from music_continuation.training import launcher as train_simple_ddp
from music_continuation.training import step as training_step
from music_continuation.training import watchdog
from music_continuation.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.fault_launcher import FAULT_LAUNCHER, fault_environment
from tests.training.test_training import RUN_TIMEOUT, TINY, epoch_blocks, make_trainable, run_launcher, sqlite_uri

pytestmark = pytest.mark.slow     # every test here starts a launch, a server, torchrun or Slurm

TINY_SIZES = TINY[:8] + ["--num_workers", 1, "--log_audio_every", 0]   # sizes only: loader workers on


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def copy_cache(cache: Path, folder: Path) -> Path:
    copy = folder / "cache"
    shutil.copytree(cache, copy)
    return copy


# ------------------------------------------------------------------------------------------- defaults

def test_every_flag_at_its_default_except_sizes_trains_on_finite_losses(tiny_cache, tmp_path):
    """The configuration users run first: 2 DataLoader workers per rank, default LR, warm-up, logging
    (MLflow's default store in the working folder), checkpoint folder; only sizes are set."""
    result = run_launcher(["--data_dir", tiny_cache, "--d_model", 32, "--num_layers", 1, "--num_heads", 2,
                           "--segment_frames", 8, "--epochs", 2, "--batch_size", 2, "--nproc", 2], cwd=tmp_path,
                          new_store=True)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = epoch_blocks(result.stdout)
    assert sorted(blocks) == [1, 2]
    for block in blocks.values():
        assert all(np.isfinite(block["train"] + block["val"])), block
    assert "overflow" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("done: best val loss ")
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["args"]["num_workers"] == 2


# ------------------------------------------------------------------------------ non-finite validation

def test_non_finite_validation_names_the_examples_and_fails_the_run(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path)
    manifest = read_manifest(cache)
    check_cache_files(cache, manifest, progress=False)   # verified on this machine, then damaged in place
    val_track = next(t for t in manifest["tracks"] if t["split"] == "val")
    path = track_paths(cache, val_track["id"])[0]
    stat = path.stat()
    latents = np.load(path, mmap_mode="r+")
    latents[3, 20] = np.nan                   # frame 20: inside the window that starts at frame 16
    latents.flush()
    del latents
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))    # size and mtime kept: the start-up check trusts it
    result = run_launcher(["--data_dir", cache, "--nproc", 2, "--batch_size", 2, "--epochs", 2,
                           "--checkpoint_dir", tmp_path / "ck", "--mlflow_tracking_uri", sqlite_uri(tmp_path)] + TINY,
                          cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    blocks = epoch_blocks(result.stdout)
    assert sorted(blocks) == [1, 2] and all(np.isnan(block["val"][0]) for block in blocks.values())
    assert f"track {val_track['id']} window at frame 16 (non-finite latents or reference audio" in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "validation was non-finite in every epoch" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "ck" / "best.pt").exists() and (tmp_path / "ck" / "latest.pt").exists()


# ---------------------------------------------------------------------------------------- interrupts

@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_a_signal_stops_every_rank_with_one_line(tiny_cache, tmp_path, sig, to_group, code):
    """Ctrl-C in a terminal signals the whole process group; `kill -TERM PID` (Slurm's stop) only the launcher,
    which forwards it (the launcher handles SIGINT and SIGTERM alike)."""
    command = [sys.executable, str(FAULT_LAUNCHER), "--data_dir", str(tiny_cache), "--nproc", "2",
               "--batch_size", "2", "--epochs", "50", "--checkpoint_dir", str(tmp_path / "ck"),
               "--mlflow_tracking_uri", sqlite_uri(tmp_path)] + [str(a) for a in TINY_SIZES]
    env = fault_environment("slow=0.2", dict(os.environ))
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (tmp_path / "ck" / "latest.pt").exists():      # epoch 1 done: there is something to resume
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        sent = time.monotonic()
        if to_group:
            os.killpg(launcher.pid, sig)
        else:
            launcher.send_signal(sig)
        stdout, stderr = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == code, stderr[-3000:]
    epoch = load_checkpoint(tmp_path / "ck" / "latest.pt")["epoch"]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == (f"interrupted: latest checkpoint is {tmp_path / 'ck' / 'latest.pt'}, epoch {epoch}; "
                         f"resume with --resume auto")
    assert "Traceback" not in stderr and not error_lines(stderr), stderr[-3000:]
    assert elapsed < train_simple_ddp.STOP_GRACE_SECONDS + 5, elapsed
    assert_group_gone(launcher.pid)


def assert_group_gone(group: int, timeout: float = 20.0) -> None:
    """No rank, DataLoader worker or resource tracker of the job is left (they may take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of group {group} still alive {timeout} s after the launcher exited")


# ------------------------------------------------------------------------------------------- resume

def saved_run(tiny_cache, folder: Path, extra=()) -> list:
    argv = ["--data_dir", tiny_cache, "--nproc", 1, "--batch_size", 4, "--epochs", 2, "--checkpoint_dir",
            folder / "ck", "--mlflow_tracking_uri", sqlite_uri(folder)] + TINY + list(extra)
    result = run_launcher(argv, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return argv


@pytest.fixture(scope="module")
def two_epoch_run(tiny_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_epochs")
    return {"argv": saved_run(tiny_cache, folder), "folder": folder}


@pytest.mark.parametrize("flag, value, shown", [
    ("--nproc", 2, "--nproc (world size) 1, this command asks for 2"),
    ("--batch_size", 2, "--batch_size 4, this command asks for 2"),
    ("--lr", 5e-4, "--lr 0.001, this command asks for 0.0005"),
    ("--seed", 1, "--seed 0, this command asks for 1"),
    ("--warmup_steps", 3, "--warmup_steps 2, this command asks for 3"),
    ("--loss_weight_mel", 0.5, "--loss_weight_mel 0.0, this command asks for 0.5"),
    ("--grad_accum_steps", 2, "--grad_accum_steps 1, this command asks for 2"),
])
def test_resume_refuses_flags_that_change_the_experiment(two_epoch_run, flag, value, shown, capsys):
    argv = [str(a) for a in two_epoch_run["argv"] + [flag, value, "--resume", "auto", "--epochs", 3]]
    with pytest.raises(SystemExit) as exit_info:
        train_simple_ddp.parse_and_validate(argv)
    assert exit_info.value.code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the checkpoint has " + shown in message


def test_resume_with_more_epochs_keeps_the_schedule_and_records_the_change(two_epoch_run):
    from mlflow.tracking import MlflowClient
    folder = two_epoch_run["folder"]
    before = load_checkpoint(folder / "ck" / "latest.pt")
    result = run_launcher(two_epoch_run["argv"] + ["--epochs", 3, "--resume", "auto"], cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing with --epochs 2 -> 3 (the LR schedule keeps its length" in result.stderr
    after = load_checkpoint(folder / "ck" / "latest.pt")
    assert after["epoch"] == 3 and after["schedule_steps"] == before["schedule_steps"]
    assert after["resume_history"] == [{"epoch": 3, "changed": {"epochs": [2, 3]}}]
    # the schedule ended with epoch 2: epoch 3 runs at lr/10 and the LR never jumps back up
    lr = 1e-3 * training_step.lr_factor(after["schedule_steps"], 2, before["schedule_steps"])
    assert lr == pytest.approx(1e-4)
    assert epoch_blocks(result.stdout)[3]["lr"] == pytest.approx(lr, rel=1e-2)
    run = MlflowClient(sqlite_uri(folder)).get_run(after["mlflow_run_id"])
    assert run.data.tags["resume_epoch_3_changes"] == "epochs 2 -> 3"
    assert run.data.params["epochs"] == "2"                      # params are write-once: the tag says it


def test_resume_of_a_finished_run_needs_more_epochs(two_epoch_run, capsys):
    argv = [str(a) for a in two_epoch_run["argv"] + ["--resume", "auto", "--epochs", 1]]
    with pytest.raises(SystemExit):
        train_simple_ddp.parse_and_validate(argv)
    assert "pass a larger --epochs" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_window_resumes_as_it_trained(two_epoch_run, tmp_path, capsys):
    """Its args lack --discriminator_window_seconds: without a discriminator the default is no change; an
    adversarial run then heard all the audio (window 0), so the default 0.2 s is a change it refuses."""
    state = load_checkpoint(two_epoch_run["folder"] / "ck" / "latest.pt")
    args = {key: value for key, value in state["args"].items() if key != "discriminator_window_seconds"}
    for adversarial in (0.0, 4.0):
        path = tmp_path / f"adversarial{adversarial}.pt"
        save_checkpoint(path, {**state, "args": {**args, "loss_weight_adversarial": adversarial}})
        argv = [str(a) for a in two_epoch_run["argv"] + ["--resume", path, "--epochs", state["epoch"] + 1,
                                                          "--loss_weight_adversarial", adversarial]]
        if not adversarial:
            assert train_simple_ddp.parse_and_validate(argv)[1] == str(path)
            continue
        with pytest.raises(SystemExit):
            train_simple_ddp.parse_and_validate(argv)
        assert ("the checkpoint has --discriminator_window_seconds 0.0, this command asks for 0.2"
                in capsys.readouterr().err)


# ------------------------------------------------------------------------------- errors inside ranks

# A truncated or missing cache file is found at start, before any rank runs: tests/training/test_faults.py
# (test_a_broken_cache_file_is_one_line_at_start); a failure inside a rank: test_faults' orphan trial.


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs (root only): a real 'No space left on device'."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_while_saving_says_so_and_keeps_the_previous_checkpoint(tiny_filesystem):
    path = tiny_filesystem / "latest.pt"
    small = {"model": {"w": torch.zeros(10)}, "epoch": 1}
    save_checkpoint(path, small)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(path, {"model": {"w": torch.zeros(200_000)}, "epoch": 2})     # 800 KB > 256 KiB
    assert str(error.value) == f"cannot write {path}: No space left on device"
    assert torch.load(path)["epoch"] == 1                                          # still the old, valid file
    assert [p.name for p in tiny_filesystem.iterdir()] == ["latest.pt"]           # no temporary left


# ------------------------------------------------------------------------------------- supervision

def _finish_then_abort(rank, args, resume_path, reports):
    reports.put(("done", rank, None))
    os.abort()                                 # what a library's exit handler did once in sixty runs


def _fail(rank, args, resume_path, reports):
    if rank == 1:
        reports.put(("error", rank, "rank 1: disk on fire (traceback in x.log)"))
        sys.exit(1)
    time.sleep(60)                             # blocked in a collective, waiting for rank 1


STUCK_LINE = "rank 1 made no progress for 10 s at step 3 (its process is stopped) on host (--stuck_timeout 10)"


def _stack_dump_crashes_the_stuck_rank(rank, board_path, resume_path, reports):
    from music_continuation.training.watchdog import EXIT_STUCK, Board
    board = Board(Path(board_path), 2)
    if rank == 0:                              # the acting watchdog: holds the lock, dumps stacks, then reports
        assert board.try_lock()
        time.sleep(1.0)
        reports.put(("stuck", 0, f"error: {STUCK_LINE}"))
        os._exit(EXIT_STUCK)
    while not board.held_by_another():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGSEGV)       # what faulthandler's dump of a resumed, stopped rank did once


def supervise_with(target, tmp_path, board_path=None) -> int:
    context = torch.multiprocessing.get_context("spawn")
    reports = context.SimpleQueue()
    ranks = [context.Process(target=target, args=(rank, board_path, None, reports)) for rank in range(2)]
    board = None if board_path is None else watchdog.Board(Path(board_path), 2)
    return train_simple_ddp.supervise(ranks, reports, str(tmp_path), board=board, stuck_timeout=10)


def test_a_rank_lost_while_a_watchdog_ends_the_job_gives_the_watchdogs_line(tmp_path, capsys):
    assert supervise_with(_stack_dump_crashes_the_stuck_rank, tmp_path, str(tmp_path / "board")) == 1
    assert capsys.readouterr().err.strip() == f"error: {STUCK_LINE}"


def test_a_rank_dying_after_it_finished_does_not_fail_the_run(tmp_path):
    assert supervise_with(_finish_then_abort, tmp_path) == 0


def test_the_first_failing_rank_stops_the_others_with_its_line(tmp_path, capsys):
    started = time.monotonic()
    assert supervise_with(_fail, tmp_path) == 1
    assert time.monotonic() - started < train_simple_ddp.STOP_GRACE_SECONDS + 10      # not the 60 s sleep
    assert capsys.readouterr().err.strip() == "error: training failed on rank 1: disk on fire (traceback in x.log)"


# ----------------------------------------------------------------------------------------- bf16 path

def test_bf16_autocast_steps_are_finite_and_the_losses_compute_in_fp32(monkeypatch):
    """The GPU path's dtype handling on the CPU: model and decoder under bf16 autocast, losses in fp32."""
    import functools

    from music_continuation.codec import FrozenDecoder, load_codec
    from music_continuation.data.cache import LatentNormalizer
    from music_continuation.losses import audio as losses
    from music_continuation.losses.audio import CombinedLoss
    seen = []
    original_stft = torch.stft
    monkeypatch.setattr(losses.torch, "stft", lambda x, *a, **k: seen.append(x.dtype) or original_stft(x, *a, **k))
    output_dtypes = []
    loss_fn = CombinedLoss(rms_input=0.25, rms_target=0.25, spectral=0.25, mel=0.25)
    original_predict = training_step.predict_audio
    monkeypatch.setattr(training_step, "predict_audio",
                        lambda *a: (lambda out: output_dtypes.append(out.dtype) or out)(original_predict(*a)))
    decoder, normalizer = FrozenDecoder(load_codec("random")), LatentNormalizer(torch.zeros(128), torch.ones(128))
    model, optimizer, scheduler = make_trainable()
    generator = torch.Generator().manual_seed(0)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    for _ in range(3):
        batch = {"input_latent": torch.randn(2, 128, 8, generator=generator),
                 "target_latent": torch.randn(2, 128, 8, generator=generator),
                 "input_audio": torch.randn(2, 1, 2560, generator=generator) * 0.1,
                 "target_audio": torch.randn(2, 1, 2560, generator=generator) * 0.1}
        applied, total, components = training_step.train_step(
            model, decoder, normalizer, loss_fn, optimizer, scheduler, batch, 1.0, autocast, "codec")
        assert applied and torch.isfinite(total) and all(torch.isfinite(v) for v in components.values())
        assert total.dtype == torch.float32
    assert set(output_dtypes) == {torch.bfloat16}         # the decoder really ran in bf16 ...
    assert seen and set(seen) == {torch.float32}          # ... and every STFT of the losses in fp32
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
