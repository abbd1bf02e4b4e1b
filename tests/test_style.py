"""The code base stays lint-clean (ruff settings in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra")
def test_ruff_clean():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["ruff", "check", "."], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
