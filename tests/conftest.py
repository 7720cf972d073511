"""Shared test fixtures (kept torch-free at import: torch is imported only inside the fixture)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import rigs


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """One torch thread: the machine is shared, multi-threaded tiny ops only spin."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cart() -> tuple:
    """The shipped cart-pole config and its physics model."""
    cfg = rigs.load_config("cartpole")
    return cfg, rigs.make_model(cfg)
