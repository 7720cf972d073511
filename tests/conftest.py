"""Shared test fixtures (kept torch-free at import: torch is imported only inside the fixture)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """One torch thread: the machine is shared, multi-threaded tiny ops only spin."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
