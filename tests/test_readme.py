"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.MULTILINE)
    assert len(commands) >= 2, "the README must open with a set-up+run command and a test command"
    assert commands[1].endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_kernel_folders_are_not_packages():
    assert not (ROOT / "cuda" / "__init__.py").exists()
    assert not (ROOT / "metal" / "__init__.py").exists()
