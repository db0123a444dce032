import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(params=["forward", "reverse", "random"])
def schedule(request, monkeypatch):
    """Run the test under each thread/block order of the CPU runtime (read at every launch)."""
    monkeypatch.setenv("CUDA_CPU_SCHEDULE", request.param)
    monkeypatch.setenv("CUDA_CPU_SEED", "12345")
    return request.param
