"""Shared test fixtures: a tiny prepared demo cache, a real MLflow server, a dev Slurm, a headless browser.

    user_cache      the session's per-user cache folder ($MUSIC_CONTINUATION_CACHE, set for every test)
    tiny_cache      session-wide demo cache: 4 synthetic tracks of 2 s (3 train, 1 val) encoded with
                    the 'random' codec; 150 frames per track = 17 examples of 2 x 8 frames each.
    mlflow_server   a real `mlflow server` on 127.0.0.1 at a free port (sqlite backend, artifacts in a
                    temporary folder), started once per session, stopped at teardown. Its tracking URI.
    slurm           a real Slurm of two nodes on this machine (DEV_SLURM_NODES=2 cluster/dev_slurm.sh start in a
                    temporary folder; SLURM_CONF set for the session), stopped at teardown. Skipped where
                    Slurm cannot be installed (not root), but in CI ($CI set, as .ci/run does) a Slurm that
                    cannot start fails the tests.

Both run under tests/process_guard.py, which holds a pipe from this process: when pytest ends, however (kill -9
included), the guard sees the pipe close and stops the server's process group / runs `dev_slurm.sh stop`.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MLFLOW_START_TIMEOUT = 240.0     # seconds; a cold `mlflow server` takes ~10-50 s on a busy 2-core machine
GUARD = ROOT / "tests" / "process_guard.py"


def guarded(command: list[str], on_exit: str | None = None, **popen) -> subprocess.Popen:
    """Start `command` (or nothing) under the process guard, which ends it when this process ends by any signal:
    stdin is the guard's pipe from us, held open (never written) until teardown closes it."""
    argv = [sys.executable, str(GUARD)] + (["--on_exit", on_exit] if on_exit else []) + ["--", *command]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, start_new_session=True, **popen)


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Path:
    """The per-user cache folder (verified files, references of read-only caches) of this session: a temporary
    one, never the real ~/.cache; training launches inherit it."""
    folder = tmp_path_factory.mktemp("user_cache")
    os.environ["MUSIC_CONTINUATION_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    from music_continuation.data import prepare as prepare_data
    cache = tmp_path_factory.mktemp("tiny_cache") / "demo"
    prepare_data.prepare_demo(cache, num_tracks=4, seconds=2.0, val_fraction=0.25, device="cpu", progress=False)
    return cache


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("mlflow_server")
    from music_continuation.utils import free_port
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    if not Path(command[0]).exists():
        command[:1] = [sys.executable, "-m", "mlflow"]
    log = open(folder / "server.log", "wb")
    # Its own session under the guard, so teardown (or the guard, if pytest is killed) stops the server and the
    # uvicorn/job-runner children it starts.
    server = guarded(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({server.returncode}): "
                                   f"{(folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer within {MLFLOW_START_TIMEOUT:.0f} s")
            time.sleep(0.5)
        yield uri
    finally:
        stop_guarded(server, timeout=15.0)      # the guard stops the server's group
        log.close()


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is still there after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:   # the leader is gone; make sure its children are too
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return


def stop_guarded(guard: subprocess.Popen, timeout: float = 120.0) -> None:
    """Close the guard's pipe and wait for it to have stopped what it guards."""
    guard.stdin.close()
    try:
        guard.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_process_group(guard)


SLURM_CANNOT_INSTALL = 3       # cluster/dev_slurm.sh's exit code: Slurm missing and not root
SLURM_NODES = 2                # two nodes on this machine, so that multi-node jobs run for real


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Path:
    """A running Slurm of SLURM_NODES nodes for the session; the folder of its configuration and logs."""
    folder = tmp_path_factory.mktemp("dev_slurm")
    script = ROOT / "cluster" / "dev_slurm.sh"
    env = {**os.environ, "DEV_SLURM_DIR": str(folder), "DEV_SLURM_NODES": str(SLURM_NODES)}
    in_ci = bool(os.environ.get("CI"))
    # The daemons leave every process group: the guard runs `dev_slurm.sh stop` when pytest ends, however it ends.
    guard = guarded([], on_exit=f"bash {shlex.quote(str(script))} stop", env=env)
    try:
        started = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True,
                                 timeout=600)
    except subprocess.TimeoutExpired:
        started = subprocess.CompletedProcess([], 1, "", "cluster/dev_slurm.sh start took over 600 s")
    if started.returncode != 0:
        stop_guarded(guard)
        said = started.stderr.strip().splitlines()[-1] if started.stderr.strip() else f"exit {started.returncode}"
        if started.returncode == SLURM_CANNOT_INSTALL and not in_ci:
            pytest.skip(f"no Slurm here: {said}")
        pytest.fail(f"a real Slurm could not start (cluster/dev_slurm.sh start): {said}", pytrace=False)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        stop_guarded(guard)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


_RANDOM_CODECS: dict = {}


@pytest.fixture
def reuse_random_codec(monkeypatch):
    """prepare_data.load_codec gives one 'random' codec per device for the whole session (building it takes
    1-3 s): for tests that prepare many tiny caches in-process. The codec is never changed by encoding."""
    from music_continuation.data import prepare as prepare_data
    real = prepare_data.load_codec

    def load_codec(weights, device=None):
        if weights != "random":
            return real(weights, device)
        key = str(device or "cpu")
        if key not in _RANDOM_CODECS:
            _RANDOM_CODECS[key] = real(weights, device)
        return _RANDOM_CODECS[key]

    monkeypatch.setattr(prepare_data, "load_codec", load_codec)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU; `bash bench/gpu_check.sh --cpu` sets GPU_CHECK_ON_CPU=1 to run them on the
    CPU's stand-ins (gloo, CPU bf16 autocast) so that they never rot."""
    import torch
    if torch.cuda.is_available() or os.environ.get("GPU_CHECK_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


BROWSER_PACKAGES = ("chromium", "chromium-driver")     # Debian's headless browser and its WebDriver
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _install_browser() -> str | None:
    """apt-get install Debian's chromium + chromium-driver where missing (as root); None, or why not."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return None
    if os.geteuid() != 0:
        return f"{CHROMIUM} / {CHROMEDRIVER} missing and not root (apt-get install {' '.join(BROWSER_PACKAGES)})"
    for arguments in (["update", "-qq"], ["install", "-y", "-qq", *BROWSER_PACKAGES]):
        # cluster/apt_get.sh waits for another apt-get: .ci/run installs these beside pip
        done = subprocess.run(["bash", str(ROOT / "cluster" / "apt_get.sh"), *arguments], capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            return f"apt-get {' '.join(arguments)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by selenium for the session. Skipped where it cannot be installed or started,
    but in CI ($CI set) that fails the tests."""
    in_ci = bool(os.environ.get("CI"))
    problem = _install_browser()
    driver = None
    if problem is None:
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900",
                             "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
                options.add_argument(argument)
            driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        except Exception as error:  # noqa: BLE001 - ImportError, WebDriverException: the browser cannot start
            problem = f"headless Chromium did not start: {str(error).strip().splitlines()[0][:300]}"
    if driver is None:
        if in_ci:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    try:
        yield driver
    finally:
        driver.quit()


TINY_STUDY_FLAGS = ["--segment_frames", "8", "--d_model", "32", "--num_layers", "1", "--num_heads", "2",
                    "--num_workers", "0", "--warmup_steps", "2", "--lr", "1e-3", "--log_audio_every", "0",
                    "--epochs", "1", "--nproc", "1", "--batch_size", "4"]


@pytest.fixture(scope="session")
def tiny_study(tiny_cache, tmp_path_factory) -> dict:
    """A finished ablate.py study of two tiny cells (target, spectral; one seed, one epoch) on the tiny cache,
    tracked in a sqlite MLflow store: {"out": folder, "uri": tracking URI}."""
    import json
    folder = tmp_path_factory.mktemp("tiny_study")
    grid = folder / "grid.json"
    grid.write_text(json.dumps([{"name": "target", "flags": {"loss_weight_target": 1.0}},
                                {"name": "spectral", "flags": {"loss_weight_target": 0.5,
                                                               "loss_weight_spectral": 0.5}}]))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "ablate.py"), "--data_dir", str(tiny_cache), "--out_dir",
                           str(folder / "study"), "--grid", str(grid), "--seeds", "1", "--max_windows", "2",
                           "--mlflow_tracking_uri", uri, "--experiment_name", "tiny-study", "--no_listeners",
                           *TINY_STUDY_FLAGS],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": folder / "study", "uri": uri}
