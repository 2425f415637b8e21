"""ablate.py on Slurm against ablate.py here, and a 2-shard cluster/prepare.sbatch against one machine; prints figures.

    python bench/bench_slurm_ablation.py                 # starts cluster/dev_slurm.sh unless $SLURM_CONF is set
    python bench/bench_slurm_ablation.py --epochs 2 --cells 2

1. The same tiny grid (--cells cells x 1 seed, --epochs epochs, 1 CPU process each) on the 4-track test cache:
   --repeats times with --executor local and with --executor slurm, interleaved (a fresh study each, one MLflow
   server on 127.0.0.1): the time from the command to every cell submitted, each cell's queue wait and run time
   from sacct, and the wall time of every study; overhead per cell = (median slurm wall - median local wall) /
   cells when the cells run one at a time (--slurm_parallel 1), so the two do the same work in the same order.
2. The demo corpus prepared by `sbatch --array=0-1 cluster/prepare.sbatch` and by one prepare_data.py process:
   wall times (the array's: from submission to the merged manifest) and the SHA-256 of every file in tracks/, and
   the manifests apart from timings.
Everything goes to a temporary folder, deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = ["--segment_frames", "8", "--d_model", "32", "--num_layers", "1", "--num_heads", "2", "--num_workers", "0",
        "--warmup_steps", "2", "--lr", "1e-3", "--log_audio_every", "0", "--nproc", "1", "--batch_size", "4"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2, help="cells in the grid (default 2)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per cell (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="studies per executor, interleaved local, slurm, local, ... (default 3): the first "
                             "study, on a fresh server and cold caches, is the slowest")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument("--skip_prepare", action="store_true", help="only the ablation figures")
    return parser.parse_args(argv)


def start_slurm(work: Path) -> bool:
    """$SLURM_CONF's cluster, or a fresh cluster/dev_slurm.sh one in `work` (True: stop it afterwards)."""
    if os.environ.get("SLURM_CONF"):
        return False
    os.environ["DEV_SLURM_DIR"] = str(work / "slurm")
    started = time.perf_counter()
    result = subprocess.run(["bash", str(REPO / "cluster" / "dev_slurm.sh"), "start"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_slurm_ablation.py: Slurm did not start: {result.stderr.strip()}")
    os.environ["SLURM_CONF"] = str(work / "slurm" / "slurm.conf")
    print(f"slurm: cluster/dev_slurm.sh start {time.perf_counter() - started:.1f} s", flush=True)
    return True


def start_mlflow(work: Path) -> tuple[subprocess.Popen, str]:
    from music_continuation.utils import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                               "--artifacts-destination", str(work / "artifacts")], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return server, uri
        except OSError:
            time.sleep(0.5)
    sys.exit("bench_slurm_ablation.py: mlflow server did not answer")


def run_study(executor: str, work: Path, cache: Path, grid: Path, uri: str, epochs: int, repeat: int) -> dict:
    out = work / f"study_{executor}_{repeat}"
    command = [sys.executable, str(REPO / "ablate.py"), "--executor", executor, "--data_dir", str(cache),
               "--out_dir", str(out), "--grid", str(grid), "--seeds", "1", "--max_windows", "4",
               "--mlflow_tracking_uri", uri, "--experiment_name", f"bench-{executor}-{repeat}", "--epochs",
               str(epochs), *TINY]
    if executor == "slurm":
        command += ["--slurm_parallel", "1"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True,
                            env={**os.environ, "ABLATE_SLURM_POLL_SECONDS": "1"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench_slurm_ablation.py: the {executor} study failed: {result.stderr[-2000:]}")
    submitted = re.search(r"\(([0-9.]+) s after the command\)", result.stderr)
    return {"wall": wall, "out": out, "submitted": float(submitted.group(1)) if submitted else None}


def sacct_times(out: Path) -> list[tuple[str, float, float]]:
    """(job id, seconds queued, seconds running) of every cell's array element, from accounting."""
    records = json.loads((out / "slurm" / "jobs.json").read_text())
    rows = []
    for record in records.values():
        line = subprocess.run(["sacct", "-n", "-X", "-P", "-j", record["job_id"], "-o", "Submit,Start,ElapsedRaw"],
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        submit, start, elapsed = line.split("|")
        queued = time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")) - \
            time.mktime(time.strptime(submit, "%Y-%m-%dT%H:%M:%S"))
        rows.append((record["job_id"], queued, float(elapsed)))
    return rows


def bench_ablation(work: Path, args) -> None:
    from music_continuation.data import prepare as prepare_data
    cache = work / "cache"
    prepare_data.prepare_demo(cache, num_tracks=4, seconds=2.0, val_fraction=0.25, device="cpu", progress=False)
    grid = work / "grid.json"
    grid.write_text(json.dumps([{"name": f"cell{index}", "flags": {"loss_weight_target": 1.0 / (index + 1)}}
                                for index in range(args.cells)]))
    server, uri = start_mlflow(work)
    studies = {"local": [], "slurm": []}
    try:
        for repeat in range(args.repeats):
            for executor, done in studies.items():
                done.append(run_study(executor, work, cache, grid, uri, args.epochs, repeat))
    finally:
        server.terminate()
        server.wait(timeout=30)
    walls = {executor: [study["wall"] for study in done] for executor, done in studies.items()}
    last = studies["slurm"][-1]
    times = sacct_times(last["out"])
    print(f"ablation ({args.cells} cells x 1 seed, {args.epochs} epoch(s), tiny model, CPU): command to every cell "
          f"submitted {last['submitted']:.1f} s; per cell queued " +
          ", ".join(f"{queued:.0f} s" for _, queued, _ in times) + ", running " +
          ", ".join(f"{elapsed:.0f} s" for _, _, elapsed in times), flush=True)
    local, slurm = (statistics.median(walls[executor]) for executor in ("local", "slurm"))
    print("ablation wall (in order of the runs): local " + ", ".join(f"{wall:.1f}" for wall in walls["local"]) +
          " s; slurm (--slurm_parallel 1) " + ", ".join(f"{wall:.1f}" for wall in walls["slurm"]) +
          f" s; overhead per cell (medians) {(slurm - local) / args.cells:.1f} s", flush=True)


def digests(cache: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (cache / "tracks").iterdir()}


def bench_prepare(work: Path) -> None:
    from bench_prepare import without_timings

    from music_continuation.data import cache as data
    from music_continuation.data import demo_corpus
    audio_dir = REPO / "data_cache" / "demo" / "audio"
    demo_corpus.write_corpus(audio_dir)
    flags = ["--audio_dir", str(audio_dir), "--encodec_weights", "random", "--device", "cpu"]
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *flags, "--out_dir", str(work / "one")],
                   check=True, stdout=subprocess.DEVNULL)
    one = time.perf_counter() - started
    submitted = time.time()
    subprocess.run(["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", "--time=30",
                    f"--output={work}/prepare-%A_%a.out", str(REPO / "cluster" / "prepare.sbatch"), *flags,
                    "--out_dir", str(work / "sharded")], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHON": sys.executable})
    # Until the merge wrote the manifest (its last write), not until `sbatch --wait` returned: that polls the
    # job's state at growing intervals and came back 16 s after the manifest here.
    sharded = (work / "sharded" / "manifest.json").stat().st_mtime - submitted
    manifest = data.read_manifest(work / "one")
    minutes = sum(track["duration"] for track in manifest["tracks"]) / 60
    same = digests(work / "one") == digests(work / "sharded")
    same_manifest = without_timings(manifest) == without_timings(data.read_manifest(work / "sharded"))
    print(f"prepare the demo corpus ({len(manifest['tracks'])} tracks, {minutes:.1f} min): one process {one:.1f} s; "
          f"sbatch --array=0-1 cluster/prepare.sbatch {sharded:.1f} s (submission to merged cache); "
          f"{len(digests(work / 'one'))} files by SHA-256 {'identical' if same else 'DIFFER'}, manifests apart "
          f"from timings {'equal' if same_manifest else 'DIFFER'}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_slurm_"))
    stop = start_slurm(work)
    try:
        bench_ablation(work, args)
        if not args.skip_prepare:
            bench_prepare(work)
    finally:
        if stop:
            subprocess.run(["bash", str(REPO / "cluster" / "dev_slurm.sh"), "stop"], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
