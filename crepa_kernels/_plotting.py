"""The one place the optional matplotlib dependency (the ``plot`` extra) is imported."""
from __future__ import annotations


def headless_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt
