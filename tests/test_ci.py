"""`.ci/run` runs exactly the README's test command, and the README's set-up block holds the two commands it
promises: the demo's and the test suite's."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's set-up block: each is the line after a '# N. ...' comment."""
    lines = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    return [command for comment, command in zip(lines, lines[1:]) if comment.startswith("# ")]


def test_ci_runs_the_readmes_test_command():
    commands = readme_commands()
    assert len(commands) == 2 and commands[0].endswith("bash run_train_simple.sh --demo")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == commands[1]
    assert commands[1].endswith(".venv/bin/python -m pytest -q")
