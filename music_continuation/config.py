"""Presets as files: `--config FILE` sets flags from a YAML or JSON mapping; flags on the command line win.

A config maps flag names, as `--help` shows them without the dashes, to values:

    # configs/balanced.yaml
    loss_weight_input: 0.0
    loss_weight_target: 0.4

A config may build on another one with the key `config` (a path relative to the file, or a preset name):
its keys are read first and the file's own keys replace them. The presets shipped with the package are in
music_continuation/configs/ (linked as configs/ in a checkout) and can be named without a path:
`--config balanced`.

Every key must be a flag of the command, and every value must be one that flag accepts: anything else is a
one-line ConfigError naming the file and the key.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from music_continuation.utils import UserError

PRESETS_DIR = Path(__file__).resolve().parent / "configs"
SUFFIXES = (".yaml", ".yml", ".json")
INCLUDE_KEY = "config"


class ConfigError(UserError, ValueError):
    """A config file cannot be read, or names a flag or a value the command does not take."""


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def find_config(name: str, relative_to: Path | None = None) -> Path:
    """The file `name` stands for: a path (relative to `relative_to`'s folder when given), else a preset name."""
    path = Path(name)
    if relative_to is not None and not path.is_absolute():
        path = relative_to.parent / path
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name}.yaml"
    if path.suffix == "" and preset.is_file():
        return preset
    where = f" (in {relative_to})" if relative_to is not None else ""
    raise ConfigError(f"--config {name}{where}: no such file, and no preset of that name "
                      f"(presets: {', '.join(preset_names())})")


def read_mapping(path: Path) -> dict:
    """The file's top-level mapping (YAML or JSON by its suffix)."""
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .json file")
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror or error}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except ValueError as error:      # json.JSONDecodeError is a ValueError
        raise ConfigError(f"--config {path}: not JSON ({error})") from None
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError, without importing yaml for JSON files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--config {path}: not YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return data


def read_config(name: str | Path, relative_to: Path | None = None, _seen: tuple = ()) -> dict:
    """{key: (value, file)} of a config and of the configs it builds on (theirs first, its own keys win)."""
    path = find_config(str(name), relative_to)
    if path.resolve() in _seen:
        raise ConfigError(f"--config {path}: it includes itself (through {INCLUDE_KEY}:)")
    data = read_mapping(path)
    merged = {}
    base = data.pop(INCLUDE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"--config {path}: {INCLUDE_KEY}: expected a file name or a preset name")
        merged.update(read_config(base, path, _seen + (path.resolve(),)))
    merged.update({key.removeprefix("--"): (value, path) for key, value in data.items()})
    return merged


def _token(value, key: str, path: Path) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"--config {path}: {key}: expected a number, a string or true/false, got {value!r}")


def typed_value(action: argparse.Action, key: str, value, path: Path):
    """`value` as the flag would have it after parsing its command-line text (its type and choices checked)."""
    if value is None:
        return None
    if action.nargs == 0:                       # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {key}: expected true or false, got {value!r}")
        return value if action.const is True else not value
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise ConfigError(f"--config {path}: {key}: expected one value, got a list")
    typed = []
    for item in items:
        text = _token(item, key, path)
        try:
            result = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            reason = str(error) if isinstance(error, argparse.ArgumentTypeError) else \
                f"invalid {getattr(action.type, '__name__', 'value')} value {item!r}"
            raise ConfigError(f"--config {path}: {key}: {reason}") from None
        if action.choices is not None and result not in action.choices:
            raise ConfigError(f"--config {path}: {key}: {item!r} is not one of "
                              f"{', '.join(map(str, action.choices))}")
        typed.append(result)
    return typed if many else typed[0]


def flag_actions(parser: argparse.ArgumentParser) -> dict:
    """{dest: action} of the parser's flags (without --help)."""
    return {action.dest: action for action in parser._actions
            if action.option_strings and action.dest != "help"}


def config_values(name: str, parser: argparse.ArgumentParser, others: dict | None = None,
                  relative_to: Path | None = None) -> tuple[dict, dict]:
    """({dest: typed value} for `parser`, {key: (value, file)} left for `others`) from a config and its bases.

    `others`: {dest: action} of a second command that takes the remaining keys (ablate.py passes the launcher's
    flags on); a key neither has is a ConfigError naming the file and the key."""
    actions, others = flag_actions(parser), others or {}
    own, rest = {}, {}
    for key, (value, path) in read_config(name, relative_to).items():
        if key in actions:
            own[key] = typed_value(actions[key], key, value, path)
        elif key in others:
            rest[key] = typed_value(others[key], key, value, path)
        else:
            raise ConfigError(f"--config {path}: unknown key {key!r}: no flag --{key} "
                              f"(the flags are listed by --help)")
    return own, rest


def given_config(argv) -> str | None:
    """The --config FILE of argv (None without one); the rest of argv is not looked at."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args(argv), where the --config file's values replace the flags' defaults (so the command
    line wins). Raises ConfigError for a bad file."""
    name = given_config(argv)
    if name is not None:
        values, _ = config_values(name, parser)
        apply_defaults(parser, values)
    return parser.parse_args(argv)


def apply_defaults(parser: argparse.ArgumentParser, values: dict) -> None:
    """Make `values` the parser's defaults; a flag the config sets is no longer required."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def settings_text(settings: dict) -> str:
    """A run's resolved settings as YAML: itself a valid --config for the same command."""
    import yaml
    return yaml.safe_dump(settings, sort_keys=False, default_flow_style=False)
