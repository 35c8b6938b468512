"""Shared test settings: one torch thread.

Tests use tiny tensors, for which OpenMP threading costs more than it saves (10-100x slower small ops when the
cores are shared); one thread keeps the suite fast and its timings stable.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
