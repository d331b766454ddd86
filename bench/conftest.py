"""Benchmark setup: on a CPU-only machine Triton runs through its interpreter (set before import)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
