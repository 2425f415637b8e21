"""Check and measure the CUDA path in one command (bench/gpu_check.sh runs this; see the README's GPU check).

    python bench/gpu_check.py [--data_dir CACHE]          # on a GPU machine: 5-8 min on one H100/H200
    python bench/gpu_check.py --cpu                       # the same path at tiny sizes on the CPU (~1 min)
    python bench/gpu_check.py --pack DIR                  # here: what the GPU machine needs, into DIR (< 64 MiB)

Steps, each recorded in the summary (and any failure makes the exit status 1):
    environment   torch, CUDA, GPU name and memory, Python; the modules the check imports
    cuda_tests    pytest -m cuda tests/training/test_cuda.py (nccl with one rank, bf16 autocast with fp32 losses,
                  --compile and its state-dict keys, --decoder_checkpointing, references decoded on the device)
    training      train_simple_ddp.py at the trainer's default model size (d_model 512 x 8 layers, batch 8, 2 s
                  segments, codec targets, --logger jsonl) for a few hundred steps, then a resume for one more
                  epoch: finite losses, latest.pt, the resumed epoch
    bench         bench/bench_train_step.py --target_audio codec at batch 8, 16, 32, --compile off and on: step
                  seconds, audio seconds per second, step over decoder, peak max_memory_allocated
It ends with one JSON line, {"gpu_check": "passed"|"failed", ...}. --cpu changes only the sizes (and skips
--compile, whose inductor build takes minutes on two cores); its JSON says "device": "cpu".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the check imports beyond PyTorch and numpy: pure Python (torchaudio: only its Python part, for the mel
# filter bank), copied by --pack from this environment. Module name -> top-level folders to copy.
PURE_PYTHON = {"encodec": ["encodec"], "einops": ["einops"], "tqdm": ["tqdm"],
               "pytest": ["pytest", "_pytest", "pluggy", "iniconfig", "packaging"], "torchaudio": ["torchaudio"]}
GPU = {"d_model": 512, "num_layers": 8, "num_heads": 8, "batch_size": 8, "segment_frames": 150,
       "train_steps": 300, "bench_batches": [8, 16, 32], "compile": [False, True], "bench_steps": 10}
CPU = {"d_model": 32, "num_layers": 1, "num_heads": 2, "batch_size": 8, "segment_frames": 8,
       "train_steps": 6, "bench_batches": [2], "compile": [False], "bench_steps": 2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the same path at tiny sizes on the CPU")
    parser.add_argument("--data_dir", help="a prepared cache (default: the pack's, else a demo cache made here)")
    parser.add_argument("--out_dir", help="where runs go (default: a temporary folder)")
    parser.add_argument("--pack", metavar="DIR", help="copy the pure-Python modules and a demo cache into DIR, exit")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(f"gpu_check: {message}", flush=True)


# ------------------------------------------------------------------------------------------------ pack

def pack(folder: Path) -> int:
    """DIR/site: the PURE_PYTHON modules (torchaudio without its compiled libraries); DIR/cache: the demo cache."""
    import importlib.util
    site = folder / "site"
    shutil.rmtree(folder, ignore_errors=True)
    site.mkdir(parents=True)
    for folders in PURE_PYTHON.values():
        for name in folders:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                sys.exit(f"gpu_check: --pack: {name} is not installed here")
            source = Path(list(spec.submodule_search_locations)[0])
            shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "tests"))
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--demo", "--out_dir", str(folder / "demo")],
                   check=True)
    shutil.copytree(folder / "demo", folder / "cache", ignore=shutil.ignore_patterns("audio", "shards"))
    shutil.rmtree(folder / "demo")
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    say(f"packed {folder}: {size / 2**20:.1f} MiB (site: {', '.join(PURE_PYTHON)}; cache: the demo corpus)")
    return 0


# ----------------------------------------------------------------------------------------------- steps

def environment() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(),
                    bf16=torch.cuda.is_bf16_supported())
    missing = []
    for module in ["numpy", *PURE_PYTHON]:
        try:
            __import__(module)
        except ImportError as error:
            missing.append(f"{module} ({error})")
    info["missing"] = missing
    return info


def run_logged(command: list, log: Path, env: dict, timeout: float) -> tuple[int, str, float]:
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    text = log.read_text(errors="replace")
    return code, text, round(time.perf_counter() - started, 1)


def cuda_tests(env: dict, out_dir: Path, cpu: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
               "tests/training/test_cuda.py"]
    if cpu:
        command += ["-k", "not compile"]
    code, text, seconds = run_logged(command, out_dir / "cuda_tests.log", env, 600)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return {"ok": code == 0 and " passed" in last and "skipped" not in last, "result": last, "seconds": seconds,
            "log": str(out_dir / "cuda_tests.log")}


def training(env: dict, out_dir: Path, data_dir: str, sizes: dict) -> dict:
    """A few hundred steps at the given size, then a resume for one more epoch."""
    from music_continuation.data.cache import ContinuationDataset
    examples = len(ContinuationDataset(data_dir, "train", sizes["segment_frames"]))
    steps_per_epoch = examples // sizes["batch_size"]
    epochs = max(1, -(-sizes["train_steps"] // steps_per_epoch))
    checkpoints = out_dir / "training"
    common = [sys.executable, "train_simple_ddp.py", "--data_dir", data_dir, "--checkpoint_dir", str(checkpoints),
              "--logger", "jsonl", "--nproc", "1", "--num_workers", "2", "--log_audio_every", "0",
              "--target_audio", "codec", "--warmup_steps", "50", "--lr", "3e-4",
              "--segment_frames", str(sizes["segment_frames"]), "--batch_size", str(sizes["batch_size"]),
              "--d_model", str(sizes["d_model"]), "--num_layers", str(sizes["num_layers"]),
              "--num_heads", str(sizes["num_heads"]), "--loss_weight_target", "0.4", "--loss_weight_spectral", "0.3",
              "--loss_weight_mel", "0.3"]
    first = run_logged(common + ["--epochs", str(epochs)], out_dir / "train.log", env, 900)
    resumed = run_logged(common + ["--epochs", str(epochs + 1), "--resume", "auto"], out_dir / "resume.log", env,
                         600)
    metrics = [json.loads(line) for line in (checkpoints / "metrics.jsonl").read_text().splitlines()] \
        if (checkpoints / "metrics.jsonl").is_file() else []
    epochs_logged = [row for row in metrics if row["kind"] == "metrics" and row["step"] > 0]
    losses = [row["metrics"].get("train_loss") for row in epochs_logged]
    import math
    finite = bool(losses) and all(value is not None and math.isfinite(value) for value in losses)
    ok = (first[0] == 0 and resumed[0] == 0 and finite and (checkpoints / "latest.pt").is_file()
          and f"resuming at epoch {epochs + 1}" in resumed[1] and len(epochs_logged) == epochs + 1)
    return {"ok": ok, "exit_codes": [first[0], resumed[0]], "steps": steps_per_epoch * (epochs + 1),
            "epochs": epochs + 1, "seconds": [first[2], resumed[2]],
            "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "val_loss_last": epochs_logged[-1]["metrics"].get("val_loss") if epochs_logged else None,
            "references_built": "decoding" in first[1] and "complete" in first[1],
            "log": [str(out_dir / "train.log"), str(out_dir / "resume.log")]}


def bench(env: dict, out_dir: Path, sizes: dict) -> dict:
    rows, ok = [], True
    for compiled in sizes["compile"]:
        for batch in sizes["bench_batches"]:
            command = [sys.executable, "bench/bench_train_step.py", "--target_audio", "codec",
                       "--batch_size", str(batch), "--d_model", str(sizes["d_model"]),
                       "--num_layers", str(sizes["num_layers"]), "--num_heads", str(sizes["num_heads"]),
                       "--segment_seconds", str(sizes["segment_frames"] / 75), "--steps", str(sizes["bench_steps"]),
                       "--warmup", "3" if compiled else "1"] + (["--compile"] if compiled else [])
            code, text, seconds = run_logged(command, out_dir / f"bench_b{batch}_c{int(compiled)}.log", env, 600)
            result = next((json.loads(line) for line in reversed(text.splitlines()) if line.startswith("{")), None)
            if code != 0 or result is None:
                ok = False
                rows.append({"batch_size": batch, "compile": compiled, "error": text.strip().splitlines()[-1:]})
                continue
            rows.append({"batch_size": batch, "compile": compiled, "step_seconds": result["step_seconds"],
                         "audio_seconds_per_second": result["audio_seconds_per_second"],
                         "step_over_decoder": result["step_over_decoder"],
                         "peak_memory_mb": result["peak_memory_mb"], "wall_seconds": seconds})
    return {"ok": ok, "rows": rows}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack:
        return pack(Path(args.pack))
    started = time.perf_counter()
    info = environment()
    say(json.dumps(info))
    summary = {"gpu_check": "failed", "device": "cuda" if info["cuda_available"] and not args.cpu else "cpu",
               "environment": info}
    if info["missing"]:
        summary["error"] = (f"missing modules: {'; '.join(info['missing'])}; run `bash bench/gpu_check.sh --pack` "
                            f"where they are installed and carry .gpu_check/ (README: GPU check)")
        print(json.dumps(summary), flush=True)
        return 2
    if summary["device"] == "cpu" and not args.cpu:
        summary["error"] = "no CUDA device visible; pass --cpu for the tiny CPU run"
        print(json.dumps(summary), flush=True)
        return 2
    sizes = CPU if args.cpu else GPU
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env.update(GPU_CHECK_ON_CPU="1", CUDA_VISIBLE_DEVICES="")
    data_dir = args.data_dir or tiny_demo(out_dir, env, args.cpu)
    env["GPU_CHECK_DATA_DIR"] = data_dir
    summary["data_dir"] = data_dir
    for name, step in (("cuda_tests", lambda: cuda_tests(env, out_dir, args.cpu)),
                       ("training", lambda: training(env, out_dir, data_dir, sizes)),
                       ("bench", lambda: bench(env, out_dir, sizes))):
        say(f"{name} ...")
        summary[name] = step()
        say(f"{name}: {'ok' if summary[name]['ok'] else 'FAILED'} {json.dumps(summary[name])}")
    if args.cpu:
        summary["not_measured_on_cpu"] = ["nccl (gloo instead)", "CUDA bf16 autocast (CPU bf16 instead)",
                                          "--compile", "max_memory_allocated (peak RSS instead)"]
    passed = all(summary[name]["ok"] for name in ("cuda_tests", "training", "bench"))
    summary.update(gpu_check="passed" if passed else "failed", seconds=round(time.perf_counter() - started, 1),
                   out_dir=str(out_dir))
    print(json.dumps(summary), flush=True)
    return 0 if passed else 1


def tiny_demo(out_dir: Path, env: dict, cpu: bool) -> str:
    """A demo cache made here (needs the audio decoders): tiny on the CPU, the default corpus otherwise."""
    cache = out_dir / "demo_cache"
    command = [sys.executable, "prepare_data.py", "--demo", "--out_dir", str(cache)]
    if cpu:
        command += ["--demo_tracks", "4", "--demo_seconds", "2", "--val_fraction", "0.25"]
    code, text, _ = run_logged(command, out_dir / "prepare.log", env, 900)
    if code != 0:
        sys.exit(f"gpu_check: preparing the demo cache failed: {text.strip().splitlines()[-1:]} (or pass --data_dir)")
    return str(cache)


if __name__ == "__main__":
    sys.exit(main())
