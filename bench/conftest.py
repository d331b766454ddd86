"""Benchmark setup: on a CPU-only machine Triton runs through its interpreter (set before import)."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def bench_script():
    """Import one of the bench/ scripts as a module (they are run as files, not a package)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def load(name):
        sys.path.insert(0, here)
        try:
            return __import__(name)
        finally:
            sys.path.remove(here)

    return load
