"""--config FILE: presets as files for the launcher and ablate.py (music_continuation/config.py).

Fast: the launcher's and ablate.py's parsers are driven in-process; nothing trains. The references are
the flag lists the demo and the documented mixes were given as before they became files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from music_continuation.ablation import ablate
from music_continuation.config import PRESETS_DIR, ConfigError, config_values, parse_with_config, preset_names
from music_continuation.training import launcher
from music_continuation.training.report import write_settings

ROOT = Path(__file__).resolve().parents[1]

# The demo's command line as run_train_simple.sh --demo wrote it out flag by flag (the independent reference).
DEMO_FLAGS = ["--loss_weight_input", "0.0", "--loss_weight_target", "0.4", "--loss_weight_spectral", "0.3",
              "--loss_weight_mel", "0.3", "--epochs", "3", "--d_model", "128", "--num_layers", "2",
              "--num_heads", "4", "--dropout", "0.0", "--segment_frames", "16", "--batch_size", "8", "--lr", "1e-3",
              "--warmup_steps", "10", "--nproc", "2", "--log_audio_every", "1", "--checkpoint_dir", "checkpoints/demo",
              "--experiment_name", "music-continuation-demo", "--mlflow_tracking_uri", "sqlite:///mlflow.db"]
# The four documented mixes: input / target / spectral / mel.
MIXES = {"continuation": (0.0, 1.0, 0.0, 0.0), "continuation_spectral": (0.0, 0.5, 0.5, 0.0),
         "balanced": (0.0, 0.4, 0.3, 0.3), "reconstruction_continuation_spectral": (0.3, 0.4, 0.3, 0.0)}
WEIGHTS = ("loss_weight_input", "loss_weight_target", "loss_weight_spectral", "loss_weight_mel")


def parse(argv) -> dict:
    args = vars(parse_with_config(launcher.build_parser(), [str(a) for a in argv]))
    args.pop("config")
    return args


def launcher_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        launcher.parse_and_validate([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err.strip()


def test_the_demo_preset_resolves_to_the_demo_flags():
    assert parse(["--config", "demo"]) == parse(DEMO_FLAGS)
    assert parse(["--config", ROOT / "configs" / "demo.yaml"]) == parse(DEMO_FLAGS)


@pytest.mark.parametrize("name", sorted(MIXES))
def test_each_documented_mix_is_a_preset(name):
    args = parse(["--config", name])
    assert tuple(args[flag] for flag in WEIGHTS) == MIXES[name]
    assert args == parse([token for flag, value in zip(WEIGHTS, MIXES[name]) for token in (f"--{flag}", value)])


def test_each_mix_is_written_once_in_the_presets():
    """The demo takes the balanced mix from balanced.yaml (config: balanced) instead of repeating it."""
    assert set(preset_names()) == set(MIXES) | {"demo"}
    for path in PRESETS_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if path.stem != "demo":
            assert set(data) == set(WEIGHTS), path
    assert yaml.safe_load((PRESETS_DIR / "demo.yaml").read_text())["config"] == "balanced"
    assert not set(yaml.safe_load((PRESETS_DIR / "demo.yaml").read_text())) & set(WEIGHTS)


def test_the_command_line_wins_and_json_works(tmp_path):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"config": "balanced", "lr": 0.003, "unity_test": True, "mlflow_tag": ["a=1"]}))
    args = parse(["--config", config, "--lr", "0.01", "--loss_weight_mel", "0.5", "--mlflow_tag", "b=2"])
    assert args["lr"] == 0.01 and args["loss_weight_mel"] == 0.5 and args["loss_weight_spectral"] == 0.3
    assert args["unity_test"] is True and args["mlflow_tag"] == ["a=1", "b=2"]
    # the file's own keys win over the config it builds on, and unset flags keep their defaults
    assert parse(["--config", config])["loss_weight_mel"] == 0.3 and args["epochs"] == 200


def test_relative_includes_and_yaml_scientific_notation(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("lr: 1e-3\nd_model: 256\n")     # YAML 1.1 reads 1e-3 as a string
    (tmp_path / "sub" / "top.yml").write_text("config: ../base.yaml\nd_model: 64\nnum_heads: 4\n")
    args = parse(["--config", tmp_path / "sub" / "top.yml"])
    assert args["lr"] == 0.001 and args["d_model"] == 64 and args["num_heads"] == 4


@pytest.mark.parametrize("text, expected", [
    ("lr: 0.001\nlearning_rate: 0.1\n", "unknown key 'learning_rate': no flag --learning_rate"),
    ("lr: fast\n", "lr: invalid float value 'fast'"),
    ("epochs: 2.5\n", "epochs: invalid int value 2.5"),
    ("unity_test: maybe\n", "unity_test: expected true or false, got 'maybe'"),
    ("target_audio: mp3\n", "target_audio: 'mp3' is not one of auto, original, codec"),
    ("d_model: [1, 2]\n", "d_model: expected one value, got a list"),
    ("- lr\n", "expected a mapping of flag names to values"),
    ("lr: [\n", "not YAML"),
    ("config: bad.yaml\n", "it includes itself"),
])
def test_a_bad_config_is_one_line_naming_the_file_and_key(text, expected, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = launcher_error(["--config", path], capsys)
    assert message.startswith(f"error: --config {path}: ") and expected in message, message


def test_a_missing_config_names_the_presets(tmp_path, capsys):
    message = launcher_error(["--config", tmp_path / "nothing.yaml"], capsys)
    assert "no such file, and no preset of that name" in message and "balanced" in message
    path = tmp_path / "settings.toml"
    path.write_text("lr = 1\n")
    assert "expected a .yaml, .yml or .json file" in launcher_error(["--config", path], capsys)


def test_the_resolved_settings_file_is_itself_a_config(tmp_path):
    args = parse_with_config(launcher.build_parser(), ["--config", "demo", "--lr", "0.02",
                                                       "--checkpoint_dir", str(tmp_path / "ck")])
    path = write_settings(args)
    assert path == tmp_path / "ck" / "settings.yaml"
    saved = yaml.safe_load(path.read_text())
    assert "config" not in saved and saved["lr"] == 0.02 and saved["d_model"] == 128
    assert parse(["--config", path]) == {k: v for k, v in vars(args).items() if k != "config"}


# ------------------------------------------------------------------------------------------ ablate.py

def test_ablate_takes_its_own_and_the_launchers_keys_from_a_config(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(f"out_dir: {tmp_path / 'out'}\nseeds: 2\nepochs: 4\nd_model: 64\nnum_heads: 4\n")
    plan = ablate.prepare(["--config", str(config), "--epochs", "5"])
    assert plan["out_dir"] == tmp_path / "out" and plan["args"].seeds == 2
    assert plan["shared"] == {"epochs": 5, "d_model": 64, "num_heads": 4}      # the command line wins
    assert len(plan["cells"]) == 2 * len(ablate.DEFAULT_GRID)


@pytest.mark.parametrize("text, expected", [
    ("seeds: 2\nno_such: 1\n", "unknown key 'no_such': no flag --no_such"),
    ("seed: 3\n", "seed: cannot be given to ablate.py: use --seeds N"),
    ("seeds: two\n", "seeds: invalid int value 'two'"),
])
def test_ablate_refuses_a_bad_config_in_one_line(text, expected, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(text)
    with pytest.raises(ablate.AblateError) as error:
        ablate.prepare(["--config", str(config), "--out_dir", str(tmp_path / "out")])
    assert expected in str(error.value) and str(config) in str(error.value) and "\n" not in str(error.value)


def test_grid_cells_name_presets_and_their_flags_win(tmp_path):
    local = tmp_path / "presets" / "small.yaml"
    local.parent.mkdir()
    local.write_text("config: balanced\nd_model: 64\nnum_heads: 4\n")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "a", "config": "balanced", "flags": {"loss_weight_mel": 0.5}},
                                {"name": "b", "config": "presets/small.yaml"}]))
    cells = {cell["name"]: cell["flags"] for cell in ablate.load_grid(str(grid))}
    assert cells["a"] == {**dict(zip(WEIGHTS, MIXES["balanced"])), "loss_weight_mel": 0.5}
    assert cells["b"] == {**dict(zip(WEIGHTS, MIXES["balanced"])), "d_model": 64, "num_heads": 4}


@pytest.mark.parametrize("cell, expected", [
    ({"name": "a", "config": "nothing"}, "no such file, and no preset of that name"),
    ({"name": "a", "config": "seeded.yaml"}, "--seed cannot be set per cell"),
    ({"name": "a", "config": 3}, "\"config\" must be a preset name or a file name"),
    ({"name": "a", "flags": {"config": "balanced"}}, "name a preset as the cell's \"config\", not among its"),
])
def test_a_bad_cell_config_is_one_line(cell, expected, tmp_path):
    (tmp_path / "seeded.yaml").write_text("seed: 1\n")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([cell]))
    with pytest.raises(ablate.AblateError) as error:
        ablate.load_grid(str(grid))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_shipped_grids_and_the_default_grid_use_the_presets():
    for path in (ROOT / "grids").glob("*.json"):
        for cell in json.loads(path.read_text()):
            flags = cell.get("flags", {})
            if "config" in cell:
                assert not set(flags) & set(WEIGHTS), (path, cell)      # a mix is never restated
        grid = ablate.load_grid(str(path))
        assert grid
    assert all("config" in cell and not set(cell.get("flags", {})) & set(WEIGHTS) for cell in ablate.DEFAULT_GRID)


def test_run_script_passes_the_demo_preset_and_the_environments_weights(tmp_path):
    """run_train_simple.sh with a stand-in for train_simple_ddp.py that prints the flags it was given."""
    for name in ("run_train_simple.sh", "configs"):
        os.symlink(ROOT / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    (tmp_path / "train_simple_ddp.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")

    def given(env, *args):
        result = subprocess.run(["bash", str(tmp_path / "run_train_simple.sh"), *args], capture_output=True,
                                text=True, env={**{k: v for k, v in os.environ.items()
                                                   if not k.startswith(("LOSS_WEIGHT_", "DEMO"))}, **env})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    assert given({}) == []
    assert given({}, "--demo") == ["--config", "configs/demo.yaml"]
    assert given({"DEMO": "1", "LOSS_WEIGHT_TARGET": "0.5"}, "--loss_weight_mel", "0.1") == [
        "--config", "configs/demo.yaml", "--loss_weight_target", "0.5", "--loss_weight_mel", "0.1"]
    environment_over_preset = parse(["--config", ROOT / "configs" / "demo.yaml", "--loss_weight_target", "0.5"])
    assert environment_over_preset["loss_weight_target"] == 0.5 and environment_over_preset["loss_weight_mel"] == 0.3


def test_config_error_is_a_user_error():
    from music_continuation.utils import UserError
    with pytest.raises(UserError):
        config_values("no-such-preset", launcher.build_parser())
    assert issubclass(ConfigError, ValueError)
