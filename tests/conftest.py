"""Shared test settings: what a test does when something it needs is missing.

Locally a test that needs root, mosquitto or ``../shared`` is skipped with the reason; under ``CI=true`` it
fails instead, so CI can never pass by skipping what it was meant to run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODEL = REPO.parent / "shared" / "models" / "qwen2moe-tiny-code"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a test that cannot run fails instead of skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_model() -> Path:
    """The trained tiny Qwen2-MoE beside the clone (CI has it)."""
    if not (SHARED_MODEL / "config.json").is_file():
        skip_or_fail(f"needs the trained model in {SHARED_MODEL}")
    return SHARED_MODEL
