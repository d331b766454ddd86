"""The fast launch path (crepa_kernels/ops/launch.py; on by default).

Its promise: the same compiled kernel and the same launcher arguments as Triton's own launch, with
less host work. Checked without a GPU by tests/fake_driver_launch.py, which compiles real kernels for
sm_90 under a stand-in driver and records what each launch hands the compiled kernel's launcher.
The GPU tier (tests/test_gpu_loss.py) checks results with it on against results with it off.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from crepa_kernels.ops import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cases whose arguments Triton specialises differently from the "aligned" case: each must have got
# a compiled kernel of its own, or the comparison would not show that the fast path's key tells
# them apart.
SPECIALISED = ["unaligned pointer", "int equal to 1 vs 2", "int divisible by 16", "int wider than 32 bits",
               "other constexpr", "other num_warps", "fp64 pointers"]


# The switch's parsing is tested with the other 0/1 switches in test_ops_utils.py.


def test_interpreted_kernels_and_stand_ins_launch_as_they_are(monkeypatch):
    from crepa_kernels.ops import similarity

    monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "1")
    stand_in = object()
    assert launch.launcher(stand_in) is stand_in
    kernel = similarity._neighbour_cosine_fwd_kernel
    if not torch.cuda.is_available():  # under the interpreter the kernels are not compiled JITFunctions
        assert launch.launcher(kernel) is kernel
    monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "0")
    assert launch.launcher(kernel) is kernel


def test_a_recycled_kernel_id_never_hands_back_another_kernels_launcher(monkeypatch):
    # launchers are keyed by id(kernel); a freed kernel's id can come back for a new one, whose
    # launcher must not be the dead kernel's (its cache holds the other kernel's binaries)
    monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "1")
    monkeypatch.setattr(launch, "_supported", lambda: True)
    kernel, dead, stale = object(), object(), object()
    monkeypatch.setitem(launch._LAUNCHERS, id(kernel), (dead, stale))
    assert launch.launcher(kernel) is kernel  # not a JITFunction: launched as it is, never `stale`


@pytest.fixture(scope="module")
def fake_driver_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fake_driver_launch.py")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fast_launch_hands_the_launcher_what_triton_does(fake_driver_results):
    cases = fake_driver_results["cases"]
    assert "similarity + resample backward" in cases and "aligned" in cases
    for name, case in cases.items():
        assert case["problems"] == [], (name, case["problems"])
        # the second of the two fast rounds skipped Triton's binder on every launch
        assert case["fast_hits"] >= case["launches"] > 0, (name, case)


def test_the_key_tells_specialisations_apart(fake_driver_results):
    cases = fake_driver_results["cases"]
    base = set(cases["aligned"]["compiled_kernels"])
    for name in SPECIALISED:
        assert not base & set(cases[name]["compiled_kernels"]), name
    # The windowed backward: the similarity kernel, and the resample backward twice (frame slices of
    # the gradient that are and are not 16-byte aligned)
    assert len(cases["similarity + resample backward"]["compiled_kernels"]) == 3
    # The one-pass backward: one kernel, one launch
    assert len(cases["one-pass similarity + resample backward"]["compiled_kernels"]) == 1
    assert cases["one-pass similarity + resample backward"]["launches"] == 1


def test_positional_constexpr_floats_are_keyed_by_value(fake_driver_results):
    cases = fake_driver_results["cases"]
    assert not set(cases["positional constexpr 0.5"]["compiled_kernels"]) & set(
        cases["positional constexpr 2.0"]["compiled_kernels"])


def test_runtime_floats_share_one_cache_entry_and_pass_their_own_value(fake_driver_results):
    floats = fake_driver_results["runtime float values"]
    assert floats["compiled_kernels"] == 1 and floats["launches"] == 4
    assert floats["new_cache_entries"] == 1 and floats["fast_hits"] == 3  # all but the first
    assert floats["scales_passed"] == floats["scales_given"]


def test_a_callable_grid_is_resolved_by_triton_on_every_call(fake_driver_results):
    assert fake_driver_results["callable grid"] == {"launches": 3, "grids": [[4, 1, 1]] * 3}


def test_keyword_tensors_take_tritons_launch(fake_driver_results):
    assert fake_driver_results["keyword tensor"] == {"launches": 2, "fast_hits": 0, "new_cache_entries": 0}


def test_launch_hooks_get_triton_launches(fake_driver_results):
    hooked = fake_driver_results["launch hook"]
    assert hooked == {"launches": 2, "hook_calls": 2, "fast_hits": 0}


def test_cache_keys_hold_no_tensors(fake_driver_results):
    assert fake_driver_results["cache_keys_hold_tensors"] is False
    assert 0 < fake_driver_results["cache_entries"] <= 64


def test_info_says_whether_the_fast_launch_applies_and_why_not(monkeypatch):
    import crepa_kernels
    import triton

    monkeypatch.delenv(launch.FAST_LAUNCH_ENV, raising=False)
    checked = triton.__version__.startswith(launch.CHECKED_TRITON) and torch.version.hip is None
    assert crepa_kernels.info()["fast_launch"].startswith("on" if checked else "off")
    monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "0")
    assert crepa_kernels.info()["fast_launch"] == f"off ({launch.FAST_LAUNCH_ENV}=0)"
    monkeypatch.setenv(launch.FAST_LAUNCH_ENV, "yes")
    assert crepa_kernels.info()["fast_launch"].startswith(f"error: {launch.FAST_LAUNCH_ENV} must be 0 or 1")
    monkeypatch.delenv(launch.FAST_LAUNCH_ENV)
    monkeypatch.setattr(launch, "CHECKED_TRITON", ("0.0.",))
    launch._supported.cache_clear()
    try:
        assert crepa_kernels.info()["fast_launch"] == (
            f"off (triton {triton.__version__} is not one of the checked 0.0.x)" if torch.version.hip is None
            else "off (ROCm: Triton's own launch)")
    finally:
        monkeypatch.undo()
        launch._supported.cache_clear()
