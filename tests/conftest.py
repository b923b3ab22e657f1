"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Files with slow end-to-end tests first, each file kept whole (its module fixtures are
    # built once): under `-n 2 --dist loadfile` the longest files start at once, not last.
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine: intra-op threads cost far more than they save, and
    # stores compared bit for bit with single-threaded subprocesses need the same kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
