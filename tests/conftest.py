"""Shared fixtures: the tiny synthetic checkpoint is generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL checkpoint in real HF format (seed 0), made by the project's own generator."""
    from qvl.toolchain.checkpoint import make_checkpoint

    cached = os.environ.get("QVL_TINY_CHECKPOINT")
    if cached and (Path(cached) / "config.json").exists():
        return Path(cached)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint("tiny", out, seed=0)
    return out
