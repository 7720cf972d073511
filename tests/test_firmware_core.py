"""Deterministic tests of the C firmware core (hardware/firmware/test_core.c) on a virtual clock: watchdog
timing to the tick, e-stop latch, limits, CONFIG validation, NACKs; plus the strict-warnings build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FW_DIR = Path(__file__).resolve().parents[1] / "hardware" / "firmware"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("gcc/make not available: cannot build the firmware core tests")
    return tmp_path_factory.mktemp("fw_core")


def test_core_unit_tests_pass(build_dir: Path) -> None:
    res = subprocess.run(
        ["make", "-C", str(FW_DIR), "test_core", f"BUILD={build_dir}", "CC=gcc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"build failed:\n{res.stdout}\n{res.stderr}"
    run = subprocess.run([str(build_dir / "test_core")], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, f"C core checks failed:\n{run.stderr}"
    assert "all" in run.stdout and "checks passed" in run.stdout
    assert int(run.stdout.split()[2]) > 250  # number of checks that ran


def test_strict_warnings_and_no_arduino_symbols_in_core() -> None:
    """The core is plain C99: compiles alone with -Wall -Wextra -Werror -pedantic, no Arduino headers."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not available")
    src = FW_DIR / "rigfm_proto.c"
    res = subprocess.run(
        ["gcc", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", str(src)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    text = src.read_text() + (FW_DIR / "rigfm_proto.h").read_text()
    for forbidden in ("Arduino.h", "digitalWrite", "Serial.", "millis(", "<unistd.h>"):
        assert forbidden not in text
