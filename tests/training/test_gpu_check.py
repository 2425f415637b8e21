"""bench/gpu_check.sh --cpu: the GPU check's whole path (cuda-marked tests on the CPU's stand-ins, a training run and
its resume with --logger jsonl, the step benchmark) at tiny sizes, so the script never rots without a GPU."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # every test here starts a launch, a server, torchrun or Slurm

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_mode_passes_and_ends_with_one_json_line(tiny_cache, tmp_path):
    # A cache is given, as on the GPU machine (the carried .gpu_check/cache; its own fallback is prepare_data.py
    # --demo, tested in tests/data/test_data.py), without decoded references: the training must build them.
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("references"))
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--out_dir", str(tmp_path / "out"),
                             "--data_dir", str(cache)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={"PYTHON": sys.executable,
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["gpu_check"] == "passed" and summary["device"] == "cpu"
    assert summary["environment"]["missing"] == []
    assert summary["cuda_tests"]["result"].startswith("5 passed")        # --compile is not run on the CPU
    training = summary["training"]
    assert training["exit_codes"] == [0, 0] and training["epochs"] == 2 and training["references_built"]
    assert (tmp_path / "out" / "training" / "latest.pt").is_file()
    logged = [json.loads(line) for line in (tmp_path / "out" / "training" / "metrics.jsonl").read_text().splitlines()]
    assert {row["kind"] for row in logged} >= {"params", "metrics", "finish"}
    assert len({row["run_id"] for row in logged}) == 1                    # the resume continued the same run
    rows = summary["bench"]["rows"]
    assert [row["batch_size"] for row in rows] == [2]       # the GPU run: 8, 16, 32, --compile off and on
    for row in rows:
        assert row["step_seconds"] > 0 and row["audio_seconds_per_second"] > 0 and row["step_over_decoder"] > 0
        assert row["peak_memory_mb"] > 0
    assert "--compile" in summary["not_measured_on_cpu"]
