"""Fixtures shared by several test files (helpers that build bundles live in tests/bundles.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """For files of small tensors: a second thread buys little, and where the cores are shared (CI next
    to other jobs) OpenMP's spin-waiting made such files 10x slower. One thread, restored after.
    torch is imported here, not at the top, so that torch-free test files never load it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
