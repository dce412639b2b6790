"""Shared test settings: small, deterministic, two CPU cores, and a cache of their own."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ["ADVSEG_THREADS"] = "1"  # CLI calls keep the session's one thread, whatever the load


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Every test's preprocessing cache (and phantom) under a temporary directory, never in
    ``~/.cache/advseg``: ``$ADVSEG_CACHE`` for the whole session, subprocesses included."""
    before = os.environ.get("ADVSEG_CACHE")
    os.environ["ADVSEG_CACHE"] = str(tmp_path_factory.mktemp("advseg-cache"))
    yield
    if before is None:
        os.environ.pop("ADVSEG_CACHE", None)
    else:
        os.environ["ADVSEG_CACHE"] = before
