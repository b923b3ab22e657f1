"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine: intra-op threads cost far more than they save, and
    # stores compared bit for bit with single-threaded subprocesses need the same kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
