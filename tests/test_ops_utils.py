"""Launch-setting helpers: warps follow the elements each thread holds, overridable for benchmarks."""
import pytest

from crepa_kernels.ops.utils import ELEMS_PER_THREAD_ENV, num_warps_for


@pytest.mark.parametrize("elems,want", [(1, 2), (512, 2), (1024, 2), (2048, 4), (4096, 8), (65536, 8)])
def test_default_rule_is_sixteen_elements_per_thread_within_two_to_eight_warps(monkeypatch, elems, want):
    monkeypatch.delenv(ELEMS_PER_THREAD_ENV, raising=False)
    assert num_warps_for(elems) == want


def test_override_for_benchmarks(monkeypatch):
    monkeypatch.setenv(ELEMS_PER_THREAD_ENV, "32")
    assert num_warps_for(4096) == 4 and num_warps_for(8192) == 8


@pytest.mark.parametrize("bad", ["0", "12", "many", "-4"])
def test_bad_override_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(ELEMS_PER_THREAD_ENV, bad)
    with pytest.raises(ValueError, match=ELEMS_PER_THREAD_ENV):
        num_warps_for(4096)
