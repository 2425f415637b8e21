"""`.ci/run` runs exactly the README's test command, and the README's set-up block holds the two commands it
promises: the demo's and the test suite's."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> dict:
    """{'# 1. ...': command, '# 2. ...': command} from the README's set-up block."""
    lines = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    return {comment: command for comment, command in zip(lines, lines[1:]) if comment.startswith("# ")}


def test_ci_runs_the_readmes_test_command():
    commands = list(readme_commands().values())
    assert len(commands) == 2 and commands[0].endswith("bash run_train_simple.sh --demo")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == commands[1]
    assert commands[1].endswith(".venv/bin/python -m pytest -q")
