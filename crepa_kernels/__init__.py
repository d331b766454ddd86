"""crepa_kernels: the CREPA video-diffusion regulariser with fused Triton kernels and a memory-aware teacher."""
from __future__ import annotations

from .config import CrepaConfig
from .functional import CrepaOutput, crepa_loss
from .module import CrepaLoss
from .schedule import CrepaScheduler

__version__ = "0.1.0"

__all__ = ["CrepaConfig", "CrepaLoss", "CrepaOutput", "CrepaScheduler", "crepa_loss", "info", "__version__"]


def info() -> dict:
    """What this installation can run, and which backend the last ``crepa_loss`` call used and why."""
    import platform

    import torch

    from .functional import last_backend_choice
    from .ops.launch import fast_launch_status
    from .ops.utils import interpreter_enabled, switches_set, triton_available

    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    cuda = torch.cuda.is_available()
    return {
        "crepa_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "triton_interpreter": interpreter_enabled(),
        "auto_backend_on_cuda": "triton" if triton_available() else "torch",
        "auto_backend_on_cpu": "torch",
        "switches": switches_set(),  # CREPA_KERNELS_* overrides in effect (benchmark comparisons)
        "fast_launch": fast_launch_status(),
        "last_call": last_backend_choice(),
    }
