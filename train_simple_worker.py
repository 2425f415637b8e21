"""One training process of the DDP job (started by train_simple_ddp.py, or by torchrun through it).

Read top to bottom: process-group setup, the training step, one epoch, validation, logging, then
`run`, which wires it all together. Every setting comes from the launcher's parsed flags (`args`).

Learning-rate schedule (per optimiser step): linear warm-up from lr/warmup_steps to lr over
--warmup_steps steps, then cosine decay to lr/10 at the last step of the last epoch:
    lr(s) = lr * (s + 1) / W                                          for s < W
    lr(s) = lr * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - W) / (S - W))))  for W <= s < S
Metrics: every component is summed as (batch mean x batch size) in device tensors and reduced across
ranks once per epoch (SUM), then divided by the number of examples, so the epoch figures are means
over all examples whatever the number of processes.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from checkpoint import BEST_NAME, LATEST_NAME, load_checkpoint, save_checkpoint, unwrapped_state_dict
from codec import SAMPLE_RATE, FrozenDecoder, check_fingerprint, codec_fingerprint, load_codec
from data import ContinuationDataset, LatentNormalizer
from losses import LOSS_COMPONENTS, LOSSES, CombinedLoss, weights_from_flags
from model import ContinuationTransformer
from utils import one_line, warn

MAX_CONSECUTIVE_SKIPS = 10     # this many non-finite steps in a row end the run: training has diverged
AUDIO_EXAMPLES = 3             # validation examples written as WAV + spectrogram every --log_audio_every epochs
METRIC_NAMES = ("loss",) + LOSS_COMPONENTS     # order of the accumulated sums


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss keeps diverging); the message says why."""


# ------------------------------------------------------------------------------------- distributed

def setup_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from the env set by torchrun or by the launcher."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)   # before any CUDA work, so this process never touches GPU 0 by accident
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))   # no oversubscribed cores
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    return rank, local_rank, world_size, device


def spawned_worker(index: int, args, resume_path: str | None) -> None:
    """Entry point for torch.multiprocessing.spawn (single node): its index is both rank and local rank."""
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(index)
    run(args, resume_path)


def seed_everything(seed: int, rank: int, epoch: int) -> None:
    """Reseed from (seed, rank, epoch) at every epoch start: dropout differs across ranks, and a resumed run
    draws exactly the numbers an uninterrupted one would, with no RNG state in the checkpoint."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# --------------------------------------------------------------------------------------- schedule

def lr_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float = 0.1) -> float:
    """Multiplier of the peak LR at optimiser step `step` (0-based): linear warm-up, then cosine to final_factor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW and its per-step LR schedule (lr_factor)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))
    return optimizer, scheduler


def autocast_for(device: torch.device):
    """A zero-argument callable returning the step's autocast context: bf16 on CUDA (no loss scaling
    needed; the losses cast to fp32 themselves), nothing on CPU (plain fp32, also what makes tests exact)."""
    if device.type == "cuda":
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# ------------------------------------------------------------------------------------------ step

def train_step(model, decoder, normalizer, loss_fn, optimizer, scheduler, batch: dict, grad_clip: float,
               autocast_ctx=contextlib.nullcontext):
    """One optimiser step on a batch already on the device; returns (applied, total, components).

    model -> de-normalise -> frozen decoder -> CombinedLoss(output_audio, input_audio, target_audio)
    -> backward -> clip -> AdamW step. A non-finite loss or gradient on ANY rank skips the update on
    every rank (one all_reduce of a flag), so the replicas never diverge. The scheduler advances either
    way, so the LR schedule stays a function of the step count. `autocast_ctx` is a zero-argument
    callable returning a context manager (bf16 autocast on CUDA, nothing on CPU).
    """
    with autocast_ctx():
        prediction = model(batch["input_latent"])
        output_audio = decoder(normalizer.denormalize(prediction))
    total, components = loss_fn(output_audio, batch["input_audio"], batch["target_audio"])  # fp32 inside

    optimizer.zero_grad(set_to_none=True)
    total.backward()   # every rank always runs backward, so DDP's gradient all-reduce stays in lock-step
    max_norm = grad_clip if grad_clip > 0 else float("inf")   # inf: measure the norm without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    finite = (torch.isfinite(total) & torch.isfinite(grad_norm)).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())   # the one host sync per step: skipping the update needs the decision here
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return applied, total.detach(), components


def to_device(batch: dict, device: torch.device) -> dict:
    # non_blocking: with pinned host memory the copy overlaps with the previous step's GPU work.
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def stack_metrics(total: torch.Tensor, components: dict) -> torch.Tensor:
    return torch.stack([total.float()] + [components[name].float() for name in LOSS_COMPONENTS])


# ----------------------------------------------------------------------------------------- epoch

def train_one_epoch(ctx, epoch: int) -> dict:
    """One pass over this rank's shard; returns the epoch means over all ranks' examples, the LR, skips."""
    ctx.model.train()
    ctx.train_sampler.set_epoch(epoch)     # a different shuffle every epoch, identical on every rank
    sums = torch.zeros(len(METRIC_NAMES) + 1, device=ctx.device)   # weighted sums ..., example count
    steps = len(ctx.train_loader)
    bar = tqdm(ctx.train_loader, desc=f"Epoch {epoch}/{ctx.args.epochs}", total=steps, leave=False,
               file=sys.stderr, dynamic_ncols=True, disable=ctx.rank != 0 or not sys.stderr.isatty())
    plain_progress = ctx.rank == 0 and bar.disable
    skipped, lr, started = 0, ctx.optimizer.param_groups[0]["lr"], time.perf_counter()
    for index, batch in enumerate(bar):
        batch = to_device(batch, ctx.device)
        _test_only_fault_injection(ctx.rank, ctx.global_step, batch)
        lr = ctx.optimizer.param_groups[0]["lr"]      # the LR this step uses (printed for the epoch's last step)
        applied, total, components = train_step(ctx.model, ctx.decoder, ctx.normalizer, ctx.loss_fn,
                                                ctx.optimizer, ctx.scheduler, batch, ctx.args.grad_clip,
                                                ctx.autocast)
        ctx.global_step += 1
        if applied:
            size = batch["input_latent"].shape[0]
            sums[:-1] += stack_metrics(total, components) * size
            sums[-1] += size
            ctx.consecutive_skips = 0
        else:
            skipped += 1
            ctx.consecutive_skips += 1
            if ctx.rank == 0:
                print(f"warning: step {ctx.global_step}: non-finite loss or gradient on some rank, update "
                      f"skipped on all ranks ({ctx.consecutive_skips} in a row)", file=sys.stderr, flush=True)
            if ctx.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:   # the same on every rank: all stop together
                raise TrainingError(f"{ctx.consecutive_skips} consecutive steps had a non-finite loss or "
                                    f"gradient (step {ctx.global_step}): training diverged; lower --lr or "
                                    f"--grad_clip, or check the data")
        if not bar.disable and (index % 10 == 0 or index == steps - 1):
            bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2e}")   # synced already by train_step
        if plain_progress and steps >= 20 and (index + 1) % max(1, steps // 10) == 0 and index + 1 < steps:
            print(f"  epoch {epoch}: {index + 1}/{steps} steps, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    bar.close()
    means = reduce_means(sums)
    return {**means, "learning_rate": lr, "skipped_steps": skipped}


@torch.no_grad()
def evaluate(ctx) -> dict:
    """Validation means over every real example; each rank runs its shard (DistributedSampler, no shuffle).

    The sampler pads the shards to equal length by repeating the first examples. Rank r's i-th example
    is index r + world_size * i of the padded list, so it is real iff that is < len(val_set): only a
    prefix of each rank's shard is real, and the rest is cut off before the model runs.
    """
    model = ctx.raw_model      # not the DDP wrapper: validation needs no collectives
    model.eval()
    sums = torch.zeros(len(METRIC_NAMES) + 1, device=ctx.device)
    real_on_this_rank = len(range(ctx.rank, len(ctx.val_set), ctx.world_size))
    seen = 0
    for batch in ctx.val_loader:
        size = batch["input_latent"].shape[0]
        real = max(0, min(size, real_on_this_rank - seen))
        seen += size
        if real == 0:
            continue
        batch = to_device({name: tensor[:real] for name, tensor in batch.items()}, ctx.device)
        with ctx.autocast():
            output_audio = ctx.decoder(ctx.normalizer.denormalize(model(batch["input_latent"])))
        total, components = ctx.loss_fn(output_audio, batch["input_audio"], batch["target_audio"])
        sums[:-1] += stack_metrics(total, components) * real
        sums[-1] += real
    model.train()
    return reduce_means(sums)


def reduce_means(sums: torch.Tensor) -> dict:
    """SUM the (weighted sums, count) vector over ranks once, then divide: means over all examples."""
    sums = all_reduce_sum(sums.clone()).cpu()
    count = sums[-1].item()
    means = sums[:-1] / max(count, 1.0) if count > 0 else torch.full_like(sums[:-1], float("nan"))
    return dict(zip(METRIC_NAMES, means.tolist()))


def format_epoch_block(epoch: int, epochs: int, train: dict, val: dict, lr: float) -> str:
    def line(label, means):
        parts = ", ".join(f"{component.short}: {means[component.name]:.4f}" for component in LOSSES)
        return f"  {label:<11} {means['loss']:.4f} ({parts})"
    return "\n".join([f"Epoch {epoch}/{epochs}:", line("Train Loss:", train), line("Val Loss:", val),
                      f"  LR: {lr:.2e}"])


# ---------------------------------------------------------------------------------------- mlflow

class MlflowLogger:
    """Rank 0's MLflow run. Failing at start raises (before training); failing later only warns:
    metrics that could not be sent stay queued and are re-sent with the next epoch's."""

    def __init__(self, tracking_uri, experiment_name: str, run_name, run_id=None):
        # A dead server must cost seconds, not minutes of retries, while the other ranks wait.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.pending = []
        self.resumed = False
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
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(key, str(value)) for key, value in sorted(params.items())]
        for start in range(0, len(items), 100):          # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start: start + 100])

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
            warn(f"MLflow logging failed ({_one_line(error)}); {len(self.pending)} metric values queued "
                  f"for the next epoch, training continues")
            return False

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        try:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        except Exception as error:  # noqa: BLE001
            warn(f"MLflow artifact upload failed ({_one_line(error)}); the files stay in {local_dir}")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as error:  # noqa: BLE001
            warn(f"could not mark MLflow run {self.run_id} {status} ({_one_line(error)})")


def _one_line(error: BaseException) -> str:
    return one_line(error)[:300]     # an HTTP error can carry a whole HTML page on its first line


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@torch.no_grad()
def write_audio_examples(ctx, epoch: int) -> Path:
    """A few validation examples as WAV (input, output, target) and one spectrogram comparison PNG."""
    import matplotlib
    matplotlib.use("Agg")      # no display on training nodes
    import matplotlib.pyplot as plt
    import soundfile

    folder = Path(ctx.args.checkpoint_dir) / "samples" / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    count = min(AUDIO_EXAMPLES, len(ctx.val_set))
    indices = np.linspace(0, len(ctx.val_set) - 1, count).round().astype(int)
    model = ctx.raw_model
    model.eval()
    figure, axes = plt.subplots(count, 3, figsize=(12, 2.6 * count), squeeze=False)
    window = torch.hann_window(1024)
    for row, index in enumerate(indices):
        example = ctx.val_set[int(index)]
        latents = example["input_latent"].unsqueeze(0).to(ctx.device)
        with ctx.autocast():
            output = ctx.decoder(ctx.normalizer.denormalize(model(latents)))
        clips = {"input": example["input_audio"][0], "output": output[0, 0].float().cpu(),
                 "target": example["target_audio"][0]}
        for column, (name, audio) in enumerate(clips.items()):
            soundfile.write(folder / f"example{row}_{name}.wav", audio.clamp(-1, 1).numpy(), SAMPLE_RATE)
            spectrum = torch.stft(audio, 1024, 256, window=window, return_complex=True).abs()
            axes[row, column].imshow(20 * torch.log10(spectrum.clamp(min=1e-5)).numpy(), origin="lower",
                                     aspect="auto", cmap="magma", vmin=-100, vmax=20)
            axes[row, column].set_title(f"val example {index}: {name}", fontsize=9)
            axes[row, column].set_xticks([])
    figure.suptitle(f"epoch {epoch}: log-magnitude spectrograms (dB), STFT 1024 / hop 256")
    figure.tight_layout()
    figure.savefig(folder / "spectrograms.png", dpi=80)
    plt.close(figure)
    model.train()
    return folder


# --------------------------------------------------------------------------------------- test-only

def _test_only_fault_injection(rank: int, step: int, batch: dict) -> None:
    """TEST-ONLY hooks for tests/test_training.py; inert unless these variables are set.

    TRAIN_SIMPLE_TEST_FAIL="R:S"        rank R raises at global step S (a crashing rank must end the job)
    TRAIN_SIMPLE_TEST_NAN="R:S1,S2|all"  rank R's batch becomes NaN at those steps (collective skipping)
    """
    fail = os.environ.get("TRAIN_SIMPLE_TEST_FAIL")
    if fail and fail.split(":")[0] == str(rank) and int(fail.split(":")[1]) == step:
        raise RuntimeError(f"test-only failure injected on rank {rank} at step {step}")
    nan = os.environ.get("TRAIN_SIMPLE_TEST_NAN")
    if nan and nan.split(":")[0] == str(rank):
        steps = nan.split(":")[1]
        if steps == "all" or str(step) in steps.split(","):
            batch["input_latent"][0, 0, 0] = float("nan")


# ------------------------------------------------------------------------------------------- run

class Context:
    """Everything the epoch functions share (a plain attribute bag)."""


def build_loaders(args, rank: int, world_size: int, device: torch.device):
    train_set = ContinuationDataset(args.data_dir, "train", args.segment_frames, args.unity_test)
    val_set = ContinuationDataset(args.data_dir, "val", args.segment_frames, args.unity_test)
    # Same seed on every rank -> one global permutation split into disjoint shards; drop_last keeps
    # every rank at the same number of full batches (a rank with one batch more would hang in DDP).
    train_sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    val_sampler = DistributedSampler(val_set, world_size, rank, shuffle=False, drop_last=False)
    loader_options = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                          pin_memory=device.type == "cuda",            # page-locked buffers: faster async copies
                          persistent_workers=args.num_workers > 0)     # no worker re-spawn every epoch
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=True, **loader_options)
    val_loader = DataLoader(val_set, sampler=val_sampler, **loader_options)
    return train_set, val_set, train_sampler, train_loader, val_loader


def run(args, resume_path: str | None = None) -> None:
    rank, local_rank, world_size, device = setup_distributed()
    ctx = Context()
    ctx.args, ctx.rank, ctx.world_size, ctx.device = args, rank, world_size, device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls for whatever runs outside autocast
    ctx.autocast = autocast_for(device)

    # Data, normalisation and the frozen decoder (never wrapped in DDP: it has nothing to train).
    ctx.train_set, ctx.val_set, ctx.train_sampler, ctx.train_loader, ctx.val_loader = build_loaders(
        args, rank, world_size, device)
    codec = load_codec(args.encodec_weights, device)
    fingerprint = codec_fingerprint(codec)
    check_fingerprint(ctx.train_set.codec_fingerprint, fingerprint, f"the cache {args.data_dir}")
    ctx.decoder = FrozenDecoder(codec, checkpointing=args.decoder_checkpointing)
    del codec
    ctx.normalizer = LatentNormalizer(ctx.train_set.latent_mean, ctx.train_set.latent_std).to(device)
    ctx.loss_fn = CombinedLoss(**weights_from_flags(args)).to(device)

    # Model (same init on every rank; DDP also broadcasts rank 0's), optimiser, schedule.
    torch.manual_seed(args.seed)
    ctx.raw_model = ContinuationTransformer(d_model=args.d_model, num_layers=args.num_layers,
                                            num_heads=args.num_heads, dropout=args.dropout).to(device)
    ctx.optimizer, ctx.scheduler = build_optimizer(ctx.raw_model, args.lr, args.weight_decay, args.warmup_steps,
                                                   total_steps=args.epochs * len(ctx.train_loader))
    start_epoch, best_val_loss, run_id, skipped_total = 1, float("inf"), None, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        check_fingerprint(state["codec_fingerprint"], fingerprint, f"checkpoint {resume_path}")
        ctx.raw_model.load_state_dict(state["model"])
        ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_val_loss = state["epoch"] + 1, state["best_val_loss"]
        run_id, skipped_total = state.get("mlflow_run_id"), state.get("skipped_steps", 0)
    ctx.global_step = ctx.scheduler.last_epoch
    ctx.consecutive_skips = 0
    compiled = torch.compile(ctx.raw_model) if args.compile else ctx.raw_model   # fused kernels on GPU
    ctx.model = DDP(compiled, device_ids=[local_rank] if device.type == "cuda" else None)

    logger = None
    if rank == 0:
        logger = MlflowLogger(args.mlflow_tracking_uri, args.experiment_name, args.run_name, run_id)
        if not logger.resumed:
            logger.log_params({**vars(args), "world_size": world_size, "device": device.type,
                               "codec_fingerprint": fingerprint, "git_commit": git_commit()})
        verb = f"resuming at epoch {start_epoch}" if resume_path else "starting"
        print(f"{verb}: {ctx.raw_model.num_parameters():,} parameters, {len(ctx.train_set)} train / "
              f"{len(ctx.val_set)} val examples of 2 x {args.segment_frames} frames, {world_size} x {device.type}, "
              f"{len(ctx.train_loader)} steps per epoch; MLflow run {logger.run_id} at {logger.tracking_uri}",
              flush=True)

    status = "FAILED"
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            seed_everything(args.seed, rank, epoch)
            started = time.perf_counter()
            train = train_one_epoch(ctx, epoch)
            val = evaluate(ctx)
            skipped_total += train["skipped_steps"]
            if rank != 0:
                continue
            # Rank 0 only, after this epoch's collectives: the others wait at most this long in the next one.
            print(format_epoch_block(epoch, args.epochs, train, val, train["learning_rate"]), flush=True)
            is_best = val["loss"] < best_val_loss
            best_val_loss = min(best_val_loss, val["loss"])
            state = {"model": unwrapped_state_dict(ctx.raw_model), "model_config": ctx.raw_model.config,
                     "optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
                     "epoch": epoch, "args": vars(args), "latent_mean": ctx.train_set.latent_mean,
                     "latent_std": ctx.train_set.latent_std, "codec_fingerprint": fingerprint,
                     "encodec_weights": args.encodec_weights, "mlflow_run_id": logger.run_id,
                     "best_val_loss": best_val_loss, "val_loss": val["loss"],
                     "segment_frames": args.segment_frames, "skipped_steps": skipped_total,
                     "world_size": world_size}
            save_checkpoint(Path(args.checkpoint_dir) / LATEST_NAME, state)
            if is_best:
                save_checkpoint(Path(args.checkpoint_dir) / BEST_NAME, state)
            metrics = {f"train_{name}": value for name, value in train.items() if name in METRIC_NAMES}
            metrics.update({f"val_{name}": value for name, value in val.items()})
            metrics.update(learning_rate=train["learning_rate"], skipped_steps=train["skipped_steps"],
                           epoch_seconds=time.perf_counter() - started)
            sent = logger.log_metrics(metrics, step=epoch)
            if args.log_audio_every and epoch % args.log_audio_every == 0:
                folder = write_audio_examples(ctx, epoch)
                if sent:     # a server that just failed would only make the other ranks wait longer
                    logger.log_artifacts(folder, f"samples/epoch_{epoch:04d}")
        status = "FINISHED"
    finally:
        if logger is not None:
            logger.finish(status)
    if rank == 0:
        print(f"done: best val loss {best_val_loss:.4f}; checkpoints in {args.checkpoint_dir}", flush=True)
    dist.destroy_process_group()
