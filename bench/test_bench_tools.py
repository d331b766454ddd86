"""The benchmark scripts' helpers and argument checks, and the register report: none needs diffusers."""
import json
import os
import subprocess
import sys

import pytest
import torch

from crepa_kernels import benchmark as bm

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_kernel_registers_reports_every_hot_kernel_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "kernel_registers.py"), "--preset", "wan480"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if "registers=" in line]
    # 9 compiled variants per dtype: the fused-resample forward and backward and the resample backward
    # (default); the resample forward, the unfused forward and the backward with d features (features
    # requiring grad); the unfused backward without d features (resample in a separate pass); the
    # one-pass fused-resample backward (CREPA_KERNELS_MERGED_BWD=1); its row form (CREPA_KERNELS_ROW_BWD=1)
    assert len(rows) == 18, proc.stdout
    for kernel in ("_neighbour_cosine_fwd_kernel", "_neighbour_cosine_bwd_kernel", "_resample_fwd_kernel",
                   "_resample_bwd_kernel", "_neighbour_cosine_resample_bwd_kernel", "_neighbour_cosine_rows_bwd_kernel"):
        assert sum(kernel in line for line in rows) >= 2, kernel
    # the launch settings keep every kernel free of register spills at the flagship size
    assert all(" spill=0 " in line for line in rows), proc.stdout


def test_gpu_check_ab_summary_pairs_overrides_with_defaults():
    sys.path.insert(0, HERE)
    try:
        import gpu_check
    finally:
        sys.path.remove(HERE)
    rows = [dict(preset="wan480", dtype="fp32", mode="full", provider="triton", median_ms=2.0,
                 peak_extra_bytes=2**20),
            dict(preset="wan480", dtype="fp32", mode="full", provider="torch", median_ms=4.0),
            dict(preset="wan480", dtype="fp32", mode="full", provider="triton[CREPA_KERNELS_FUSED_RESAMPLE=0]",
                 median_ms=2.5, environment_override={"CREPA_KERNELS_FUSED_RESAMPLE": "0"},
                 peak_extra_bytes=3 * 2**20),
            dict(preset="small", dtype="fp32", mode="full", provider="triton[X=1]", error="failed",
                 environment_override={"X": "1"})]
    lines = gpu_check.ab_summary(rows)
    assert len(lines) == 1  # the failed override row has nothing to compare
    assert "wan480/fp32/full" in lines[0] and "2.500 ms vs default 2.000 ms" in lines[0] and "= 1.25" in lines[0]
    assert lines[0].endswith("peak extra 3.0 vs 1.0 MiB")


def test_write_outputs_plots_rows_with_environment_overrides(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(preset="wan480", dtype="fp32", mode="full", provider=prov, median_ms=ms, p20_ms=ms, p80_ms=ms,
                peak_extra_bytes=2**20, achieved_gbps=1.0, speedup=1.0)
            for prov, ms in (("triton[CREPA_KERNELS_FRONT_END=custom_op]", 1.6), ("torch", 4.8),
                             ("triton", 1.4), ("triton[CREPA_KERNELS_FUSED_RESAMPLE=0]", 1.3))]
    report = {"environment": dict(device="test device", torch="t", triton="t", commit="c",
                                  triton_interpreter=True), "results": rows}
    written = bm.write_outputs(report, str(tmp_path), "ab")
    assert [os.path.basename(p) for p in written] == ["ab.json", "ab.md", "ab.png"]
    assert os.path.getsize(tmp_path / "ab.png") > 0
    assert "triton[CREPA_KERNELS_FUSED_RESAMPLE=0]" in (tmp_path / "ab.md").read_text()


def test_io_bytes_and_roofline_fractions():
    # projected (1, 2, 3, 4) fp32: 96 bytes; features (1, 2, 5, 4) bf16: 80 bytes; d projected: 96.
    p, f = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4, dtype=torch.bfloat16)
    assert [bm.io_bytes(m, p, f) for m in bm.MODES] == [176, 272, 272]
    assert [bm.io_bytes(m, p, f, recompute=True) for m in bm.MODES] == [176, 272, 448]
    rows = [dict(preset="x", dtype="fp32", mode="full", provider=prov, median_ms=ms, achieved_gbps=gbps,
                 io_bytes=272, io_bytes_recompute=448) for prov, ms, gbps in (("torch", 4.0, 50.0),
                                                                              ("triton", 1.0, 200.0))]
    bm.add_speedups(rows, bandwidth=400e9)
    assert rows[1]["speedup"] == 4.0 and rows[1]["roofline_fraction"] == 0.5
    assert rows[1]["roofline_fraction_recompute"] == 0.5 * 448 / 272


def _ab_quick(tmp_path, rounds, *variants):
    """ab_settings.py on the tiny preset, one call per timing; (process, result rows)."""
    out = tmp_path / "ab.json"
    proc = _run("ab_settings.py", "--preset", "tiny", "--dtypes", "fp32", "--rounds", str(rounds), "--warmup", "1",
                "--synced", "1", "--queued", "1", *[a for v in variants for a in ("--variant", v)],
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())["results"]


def test_ab_settings_quick(tmp_path):
    proc, rows = _ab_quick(tmp_path, 2, "default=", "unfused=CREPA_KERNELS_FUSED_RESAMPLE=0")
    assert [r["variant"] for r in rows] == ["default", "unfused"]
    assert rows[1]["environment_override"] == {"CREPA_KERNELS_FUSED_RESAMPLE": "0"}
    assert all(len(r["rounds"]) == 2 and r["queued_ms"] > 0 for r in rows)
    assert "| tiny | fp32 | unfused |" in proc.stdout


def test_ab_settings_keeps_comparing_when_a_variant_fails(tmp_path):
    proc, rows = _ab_quick(tmp_path, 1, "broken=CREPA_KERNELS_ELEMS_PER_THREAD=3", "default=")
    assert [r["variant"] for r in rows] == ["broken", "default"]
    assert "CREPA_KERNELS_ELEMS_PER_THREAD must be a positive power-of-two int" in rows[0]["error"]
    assert rows[1]["queued_ms"] > 0 and "error" not in rows[1]
    assert "| tiny | fp32 | broken | failed: ValueError" in proc.stdout


def test_ab_settings_times_a_sweeps_best_settings_as_a_variant(tmp_path):
    """--tuned: a variant 'tuned' with each kernel's best settings for its dtype from a tune report;
    kernels whose default won (an empty best) and other dtypes' settings are left out."""
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"preset": {"name": "tiny"}, "results": [
        {"kernel": "sim_bwd", "dtype": "fp32", "best": {"valid": True, "tune": {"block_n": 4, "num_warps": 4}}},
        {"kernel": "sim_fwd", "dtype": "fp32", "best": {"valid": True, "tune": {}}},
        {"kernel": "sim_fwd", "dtype": "bf16", "best": {"valid": True, "tune": {"block_n": 8}}}]}))
    out = tmp_path / "ab.json"
    proc = _run("ab_settings.py", "--preset", "tiny", "--dtypes", "fp32", "--rounds", "1", "--warmup", "1",
                "--synced", "1", "--queued", "1", "--variant", "default=", "--tuned", str(tune), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["launch_overrides"]) for r in rows] == \
        [("default", {}), ("tuned", {"sim_bwd": {"block_n": 4, "num_warps": 4}})]
    assert all(r["queued_ms"] > 0 and "error" not in r for r in rows)


def test_ab_settings_runs_the_tuned_one_pass_backward_where_the_sweep_covered_it(tmp_path):
    """A report that swept merged_bwd adds a variant 'tuned_merged': the one-pass backward switched on,
    with the same per-dtype settings as 'tuned' (its own among them), and one that swept row_bwd a
    variant 'tuned_row', the row form switched on. The plumbing only: at preset tiny the features
    grid is the larger, so no call takes the fused-resample backward (the sweep's own test launches
    the one-pass kernels with their settings)."""
    tune = tmp_path / "tune.json"
    best = {"sim_fwd": {"block_n": 2}, "merged_bwd": {"rows": 1, "block_d": 16}, "row_bwd": {"d_blocks": 4}}
    tune.write_text(json.dumps({"preset": {"name": "tiny"}, "results": [
        {"kernel": k, "dtype": "fp32", "best": {"valid": True, "tune": t}} for k, t in best.items()]}))
    out = tmp_path / "ab.json"
    proc = _run("ab_settings.py", "--preset", "tiny", "--dtypes", "fp32", "--rounds", "1", "--warmup", "1",
                "--synced", "1", "--queued", "1", "--variant", "default=", "--tuned", str(tune), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["environment_override"], r["launch_overrides"]) for r in rows] == \
        [("default", {}, {}), ("tuned", {}, best), ("tuned_merged", {"CREPA_KERNELS_MERGED_BWD": "1"}, best),
         ("tuned_row", {"CREPA_KERNELS_ROW_BWD": "1"}, best)]
    assert all(r["queued_ms"] > 0 and "error" not in r for r in rows)


@pytest.mark.parametrize("content, why", [
    ("not json", "Expecting value"),
    (json.dumps({"preset": {"name": "tiny"}, "results": [
        {"kernel": "sim_bwdd", "dtype": "fp32", "best": {"valid": True, "tune": {"block_n": 4}}}]}), "sim_bwdd"),
    (json.dumps({"preset": {"name": "wan480"}, "results": []}), "measured at preset 'wan480', not 'tiny'")])
def test_ab_settings_refuses_a_bad_tune_report(tmp_path, content, why):
    tune = tmp_path / "tune.json"
    tune.write_text(content)
    proc = _run("ab_settings.py", "--preset", "tiny", "--tuned", str(tune))
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 2 and "--tuned" in last and why in last, proc.stderr


@pytest.mark.parametrize("specs", [["nameonly"], ["=X=1"], ["bad=PATH=/tmp"], ["bad=CREPA_KERNELS_X"],
                                   ["a=", "a=CREPA_KERNELS_FUSED_RESAMPLE=0"]])
def test_ab_settings_rejects_bad_variants(specs):
    proc = _run("ab_settings.py", *[arg for spec in specs for arg in ("--variant", spec)])
    assert proc.returncode == 2 and "--variant" in proc.stderr


@pytest.mark.parametrize("parts", ["bench,bogus", "testz"])
def test_gpu_check_refuses_unknown_parts_before_doing_anything(parts, tmp_path):
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CHECK_PARTS": parts, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and "CHECK_PARTS: unknown part" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing installed, nothing written


@pytest.mark.parametrize("knob", ["CHECK_DEADLINE_S", "CHECK_TUNE_S", "CHECK_BUDGET_S"])
@pytest.mark.parametrize("value", ["5m", "380s", "-1"])
def test_gpu_check_refuses_a_bad_number_of_seconds(tmp_path, knob, value):
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, knob: value, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and f"{knob}: expected a whole number of seconds, got '{value}'" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_gpu_check_reads_a_leading_zero_budget_as_decimal(tmp_path):
    # 0300 is 300 s, not octal 192: the bench part's limit is its 15% share plus 60 s, less the 10 s
    # the kill after a SIGTERM may take
    proc, calls = _gpu_check_calls(tmp_path, CHECK_PARTS="bench", CHECK_BUDGET_S="0300", CHECK_DEADLINE_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any("gpu_check.py" in c and "--budget-s 45" in c for c in calls), calls


def test_gpu_check_skips_parts_the_deadline_leaves_no_room_for(tmp_path):
    # 15 s from the start, less the 10 s kept for the end: under the 20 s a part needs, so both are
    # skipped (named in the summary) instead of being cut short by the caller's own limit.
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CHECK_PARTS": "host,profile", "CHECK_DEADLINE_S": "15",
                                            "OUT": str(tmp_path / "out")})
    assert "== host skipped:" in proc.stdout and "== profile skipped:" in proc.stdout, proc.stdout + proc.stderr
    assert "skipped by the deadline: host profile" in proc.stdout
    assert not any((tmp_path / "out").iterdir())  # nothing ran, nothing written


def test_environment_override_restores_even_after_an_error(monkeypatch):
    monkeypatch.setenv("CREPA_KERNELS_FUSED_RESAMPLE", "1")
    monkeypatch.delenv("CREPA_KERNELS_BWD_WINDOW_MIB", raising=False)
    with pytest.raises(RuntimeError):
        with bm.environment_override({"CREPA_KERNELS_FUSED_RESAMPLE": "0", "CREPA_KERNELS_BWD_WINDOW_MIB": "8"}):
            assert os.environ["CREPA_KERNELS_FUSED_RESAMPLE"] == "0"
            assert os.environ["CREPA_KERNELS_BWD_WINDOW_MIB"] == "8"
            raise RuntimeError("boom")
    assert os.environ["CREPA_KERNELS_FUSED_RESAMPLE"] == "1"
    assert "CREPA_KERNELS_BWD_WINDOW_MIB" not in os.environ


def test_queued_timer_runs_every_call_and_reports_per_call():
    calls = []
    ms = bm.time_queued(lambda: calls.append(1), 7, cuda=False)
    assert len(calls) == 7 and ms >= 0
    assert bm.time_one_call(lambda: calls.append(1), cuda=False) >= 0 and len(calls) == 8


def test_cli_bench_runs_the_triton_rows_on_a_fresh_cpu_process(tmp_path):
    # Without TRITON_INTERPRET in the environment (a fresh shell), `crepa-kernels bench` must set it
    # before anything imports triton: importing crepa_kernels may not import the kernel modules.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    probe = subprocess.run([sys.executable, "-c", "import sys, crepa_kernels, crepa_kernels.cli; "
                            "print('triton' in sys.modules)"], capture_output=True, text=True, timeout=120, env=env)
    assert probe.stdout.strip() == "False", probe.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "crepa_kernels.cli", "bench", "--quick", "--preset", "tiny",
                           "--modes", "forward", "--out", str(tmp_path), "--name", "t", "--no-plot"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert any(r["provider"] == "triton" and "median_ms" in r for r in rows)


@pytest.mark.parametrize("failure", ["sigterm", "raises", "killed"])
def test_gpu_check_py_keeps_measured_rows_whatever_ends_a_case(monkeypatch, tmp_path, failure, bench_script):
    # The third case ends: "sigterm", an outer time limit's SIGTERM (the two rows before it are written,
    # the report says it was interrupted, exit status 1); "raises", an error escapes the suite (a sticky
    # CUDA error in its cleanup: it becomes the case's row and the run goes on); "killed", the process
    # dies (stood in for by an exception nothing catches: the JSON on disk holds the two rows before it).
    import signal
    import time

    gpu_check = bench_script("gpu_check")
    calls = []

    def fake_suite(presets, dtypes, providers, modes, device, **kw):
        calls.append(1)
        if len(calls) == 3:
            if failure == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the signal interrupts this
            if failure == "raises":
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
            raise KeyboardInterrupt
        row = dict(preset=presets[0], dtype=dtypes[0], mode=modes[0], provider=providers[0], median_ms=1.0,
                   p20_ms=1.0, p80_ms=1.0, queued_ms=1.0, achieved_gbps=1.0, io_bytes=1)
        return {"results": [row]}

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(bm, "run_suite", fake_suite)
    monkeypatch.setattr(bm, "environment", lambda device: {"device": "Fake GPU", "torch": "t", "triton": "t",
                                                           "commit": "c", "triton_interpreter": False})
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "PLAN", [(["wan480"], ["fp32", "bf16"], ["torch", "triton"], ["full"], {})])
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path), "--budget-s", "100"])
    try:
        if failure == "killed":
            with pytest.raises(KeyboardInterrupt):
                gpu_check.main()
        else:
            assert gpu_check.main() == (1 if failure == "sigterm" else 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = json.loads((tmp_path / "Fake_GPU.json").read_text())
    rows = report["results"]
    if failure == "raises":
        assert len(rows) == 4 and rows[2]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
        assert all("median_ms" in r for i, r in enumerate(rows) if i != 2)
    else:
        assert len(rows) == 2 and all("median_ms" in r for r in rows) and len(calls) == 3
        assert ("SIGTERM" in report.get("interrupted", "")) == (failure == "sigterm")


@pytest.mark.parametrize("parts, packed", [("host", False), ("host,profile", True)])
def test_gpu_check_packs_many_result_files_into_one_archive(tmp_path, parts, packed):
    # A stand-in python3 writes three files per call of a bench/ script: host makes 2 such calls
    # (6 files, left loose), host and profile make 4 (12 files, packed into one archive, the loose
    # copies removed). A file OUT held before the run is neither packed nor removed, and a file
    # written in the same clock tick as the run's start still counts as written.
    import tarfile

    out, fake = tmp_path / "out", tmp_path / "bin"
    fake.mkdir()
    out.mkdir()
    (out / "earlier.json").write_text("{}")
    (fake / "python3").write_text('#!/bin/bash\ncase "$*" in *bench/*) for i in 1 2 3; do '
                                  # (an mtime before the run's start stands for one in its clock tick)
                                  'f="$OUT/f_${RANDOM}${RANDOM}_$i"; : > "$f"; touch -d @1 "$f"; done;; esac\n')
    (fake / "python3").chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CHECK_PARTS": parts, "OUT": str(out),
                               "PATH": f"{fake}:{os.environ['PATH']}"})
    names = sorted(p.name for p in out.iterdir())
    assert (out / "earlier.json").read_text() == "{}", proc.stdout + proc.stderr
    names.remove("earlier.json")
    if packed:
        assert names == ["gpu_check_results.tgz"], proc.stdout + proc.stderr
        with tarfile.open(out / "gpu_check_results.tgz") as tar:
            packed_names = tar.getnames()
        assert len(packed_names) == 12 and all(n.startswith("f_") for n in packed_names), packed_names
    else:
        assert len(names) == 6 and all(n.startswith("f_") for n in names), proc.stdout + proc.stderr


def _gpu_check_calls(tmp_path, **env):
    """The python3 command lines gpu_check.sh runs under ``env``, through a stand-in python3 that
    only records them (one line each), and the script's exit status."""
    fake, log = tmp_path / "bin", tmp_path / "calls.txt"
    fake.mkdir(parents=True)
    # it records its command line and writes "{}" where a sweep is told to write its report
    (fake / "python3").write_text(f'#!/bin/bash\necho "$*" >> {log}\n'
                                  'if [[ "$*" == *tune_kernels.py* ]]; then while [ $# -gt 0 ]; do '
                                  '[ "$1" = --out ] && echo {} > "$2"; shift; done; fi\n')
    (fake / "python3").chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PATH": f"{fake}:{os.environ['PATH']}",
                               **env})
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_gpu_check_times_the_host_against_a_base_only_when_given_its_archive(tmp_path):
    proc, calls = _gpu_check_calls(tmp_path / "plain", CHECK_PARTS="host", CHECK_DEADLINE_S="0")
    assert proc.returncode == 0 and calls and not any("host_ab.py" in c for c in calls), proc.stdout
    proc, calls = _gpu_check_calls(tmp_path / "ab", CHECK_PARTS="host", CHECK_DEADLINE_S="0",
                                   CHECK_HOST_BASE="abc123", CHECK_HOST_BASE_ARCHIVE="/tmp/base.tar")
    ab = [c for c in calls if "host_ab.py" in c]
    assert proc.returncode == 0 and len(ab) == 1, proc.stdout + proc.stderr
    assert "--device cuda --base abc123 --base-archive /tmp/base.tar" in ab[0] and "host_ab.json" in ab[0]


def test_gpu_check_runs_the_tuning_sweep_only_when_asked(tmp_path):
    proc, calls = _gpu_check_calls(tmp_path / "default", CHECK_DEADLINE_S="0")
    assert proc.returncode == 0 and calls and not any("tune_kernels" in c for c in calls), proc.stdout
    proc, calls = _gpu_check_calls(tmp_path / "tune", CHECK_PARTS="tune", CHECK_TUNE_S="200", CHECK_DEADLINE_S="0")
    scripts = [c for c in calls if "bench/" in c]
    assert proc.returncode == 0 and len(scripts) == 2, proc.stdout + proc.stderr  # the sweep, then the A/B
    sweep, ab = scripts
    # of the part's 200 s the A/B keeps 70; of the sweep's 130, 45 cover the variant in flight and
    # the defaults still to run
    assert "tune_kernels.py --preset wan480 --dtypes fp32,bf16 --budget-s 85 " in sweep
    assert "tune_wan480.json" in sweep
    assert "ab_settings.py --preset wan480" in ab and "--variant default= --tuned" in ab
    assert ab.split("--tuned ")[1].split()[0] == sweep.split("--out ")[1].split()[0]


@pytest.mark.parametrize("tune_s, budget, ab", [("0", None, False), ("10", None, False), ("08", None, False),
                                                ("150", 105, False), ("0200", 85, True)])
def test_gpu_check_sizes_the_tuning_part_from_its_limit(tmp_path, tune_s, budget, ab):
    """Under 90 s the part is skipped; under 160 s the sweep has it all (no A/B); a leading zero is
    not octal."""
    proc, calls = _gpu_check_calls(tmp_path, CHECK_PARTS="tune", CHECK_TUNE_S=tune_s, CHECK_DEADLINE_S="0")
    scripts = [c for c in calls if "bench/" in c]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr
    if budget is None:
        assert scripts == [] and "== tune skipped: it needs at least 90 s" in proc.stdout, proc.stdout
        return
    assert f"--budget-s {budget} " in scripts[0]
    assert ("ab_settings.py" in " ".join(scripts)) is ab and len(scripts) == 1 + ab
    assert ab or "A/B of the sweep's winners skipped: the part had 150s, under 160" in proc.stdout


def test_gpu_check_never_times_an_earlier_sweeps_winners(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tune_wan480.json").write_text('{"results": []}')  # left by an earlier run
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # a sweep that dies before writing its report
    (bin_ / "python3").write_text('#!/bin/bash\n[[ "$*" == *tune_kernels.py* ]] && exit 1\n'
                                  f'echo "$*" >> {tmp_path / "calls.txt"}\n')
    (bin_ / "python3").chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(out), "PATH": f"{bin_}:{os.environ['PATH']}",
                               "CHECK_PARTS": "tune", "CHECK_DEADLINE_S": "0"})
    assert proc.returncode == 1 and "the sweep wrote no report" in proc.stdout, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.txt").read_text() if (tmp_path / "calls.txt").exists() else ""
    assert "ab_settings.py" not in calls


def test_gpu_check_refuses_a_bad_tuning_limit(tmp_path):
    proc, calls = _gpu_check_calls(tmp_path, CHECK_PARTS="tune", CHECK_TUNE_S="3m")
    assert proc.returncode == 2 and "CHECK_TUNE_S: expected a whole number of seconds, got '3m'" in proc.stderr
    assert calls == []


# ------------------------------------------------------------------ the figures a results row reports
def test_presets_are_the_shapes_the_readme_names():
    # (frames, DiT grid, DINOv2 grid, D), from the README's preset list, B = 1
    want = {"small": (16, (16, 16), (16, 16), 384), "wan480": (21, (30, 52), (37, 37), 1536),
            "wan720": (21, (45, 80), (37, 37), 1536), "ltx768": (16, (16, 24), (37, 37), 1536)}
    for name, (frames, dit, dino, dim) in want.items():
        pr = bm.PRESETS[name]
        assert (pr.batch, pr.frames, pr.projected_grid, pr.features_grid, pr.dim) == (1, frames, dit, dino, dim)
        assert pr.shapes["projected"] == (1, frames, dit[0] * dit[1], dim)


def test_measure_reports_linear_quantiles_of_the_synced_calls(monkeypatch):
    times = iter(range(1, 11))
    monkeypatch.setattr(bm, "time_one_call", lambda run, cuda: float(next(times)))
    out = bm.measure(lambda: None, "cpu", warmup=0, reps=10, max_seconds=100.0)
    # of 1..10 ms: the 20th percentile sits 0.2 * 9 = 1.8 steps in, 2 + 0.8 = 2.8; likewise 5.5 and 8.2
    assert (out["p20_ms"], out["median_ms"], out["p80_ms"], out["reps"]) == pytest.approx((2.8, 5.5, 8.2, 10))
    times = iter(range(1, 11))
    assert bm.measure(lambda: None, "cpu", warmup=0, reps=10, max_seconds=0.0)["reps"] == 3  # budget spent


def test_queued_time_is_per_call(monkeypatch):
    calls = []

    def one_call(run, cuda):
        run()
        return 50.0

    monkeypatch.setattr(bm, "time_one_call", one_call)
    assert bm.time_queued(lambda: calls.append(1), 5, cuda=False) == 10.0 and len(calls) == 5


def test_peak_memory_is_measured_above_what_was_allocated_before(monkeypatch):
    # the allocator's peak over the timed calls minus what was allocated when they started
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1300)
    monkeypatch.setattr(bm, "time_one_call", lambda run, cuda: 1.0)
    out = bm._measure(lambda: None, "cpu", True, 0, 3, 100.0, None)
    assert out["peak_extra_bytes"] == 300 and "queued_ms" in out


def test_a_row_reports_decimal_gb_per_second_at_the_median(monkeypatch):
    monkeypatch.setattr(bm, "measure", lambda run, device, **kw: {"p20_ms": 1.0, "median_ms": 2.0, "p80_ms": 3.0,
                                                                  "reps": 3})
    row = bm.run_case(bm.PRESETS["tiny"], "fp32", "torch", "full", "cpu")
    assert row["achieved_gbps"] == pytest.approx(row["io_bytes"] / 2e-3 / 1e9)


def test_peak_memory_and_speed_are_compared_with_torch_per_dtype():
    rows = [dict(preset="p", dtype=d, mode="full", provider=prov, median_ms=ms, peak_extra_bytes=peak,
                 achieved_gbps=1.0)
            for d, scale in (("fp32", 1), ("bf16", 2))
            for prov, ms, peak in (("torch", 8.0 * scale, 800 * scale), ("triton", 2.0, 200))]
    bm.add_speedups(rows, None)
    fp32, bf16 = rows[1], rows[3]
    assert (fp32["speedup"], fp32["peak_memory_vs_torch"]) == (4.0, 0.25)
    assert (bf16["speedup"], bf16["peak_memory_vs_torch"]) == (8.0, 0.125)


@pytest.mark.parametrize("name, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12), ("NVIDIA GH200 480GB", None), ("NVIDIA A100-SXM4-80GB", 2.039e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12), ("NVIDIA A100 80GB PCIe", 1.935e12), ("NVIDIA H800", None),
    ("Tesla T4", None)])
def test_device_bandwidth_from_the_names_torch_reports(name, bandwidth):
    # each device's own vendor figure, or none: never another variant's (an H100 PCIe is not an SXM)
    assert bm.device_bandwidth(name) == bandwidth


def test_the_peak_counts_the_gradient_each_call_writes(monkeypatch):
    # The last warmup call's gradient is freed before the baseline is read, so a call's own gradient
    # shows in the peak above it, as for any other buffer the call allocates.
    state = {"allocated": 1000}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1000 + 200)
    monkeypatch.setattr(bm, "time_one_call", lambda run, cuda: 1.0)

    def run():
        pass
    run.release = lambda: state.update(allocated=1000 - 150)  # the previous call's 150-byte gradient goes
    out = bm._measure(run, "cpu", True, 1, 3, 100.0, None)
    assert out["peak_extra_bytes"] == 350
    p, f = bm.make_inputs(bm.PRESETS["tiny"], torch.float32, "cpu")
    run = bm.build_callable("torch", "full", bm.PRESETS["tiny"], p, f)
    run()
    leaf_grads = [c.cell_contents for c in run.__closure__ if torch.is_tensor(c.cell_contents)]
    assert any(t.grad is not None for t in leaf_grads)
    run.release()
    assert all(t.grad is None for t in leaf_grads)


def test_speedups_and_rooflines_from_queued_times_too():
    rows = [dict(preset="p", dtype="fp32", mode="full", provider=prov, median_ms=ms, p20_ms=ms, p80_ms=ms,
                 queued_ms=q, io_bytes=10**9, achieved_gbps=10**9 / (ms * 1e-3) / 1e9)
            for prov, ms, q in (("torch", 8.0, 6.0), ("triton", 2.0, 1.0))]
    bm.add_speedups(rows, bandwidth=2e12)
    triton = rows[1]
    assert triton["speedup"] == 4.0 and triton["speedup_queued"] == 6.0
    assert triton["roofline_fraction"] == pytest.approx(0.25) and triton["roofline_fraction_queued"] == pytest.approx(0.5)
    table = bm.markdown_table(rows).splitlines()
    assert table[0].endswith("| speedup | speedup queued | roofline | memory vs torch |")
    assert [c.strip() for c in table[3].split("|")[-5:-1]] == ["4.00", "6.00", "25.0%", ""]


def test_ab_table_compares_each_variant_with_the_first_and_takes_median_rounds(monkeypatch):
    sys.path.insert(0, HERE)
    import ab_settings

    rounds = iter([1.0, 2.0, 9.0])
    monkeypatch.setattr(ab_settings, "_one_round", lambda run, device, synced, queued: {
        "synced_ms": 1.0, "queued_ms": next(rounds), "peak_extra_bytes": None})
    rows = ab_settings.run_ab("tiny", ["fp32"], [("default", {})], rounds=3, warmup=0, synced=1, queued=1,
                              device="cpu")
    assert (rows[0]["queued_ms"], rows[0]["queued_min_ms"], rows[0]["queued_max_ms"]) == (2.0, 1.0, 9.0)
    second = dict(rows[0], variant="other", queued_ms=4.0, synced_ms=3.0)
    line = ab_settings.table(rows + [second]).splitlines()[-1]
    assert "| other |" in line and "| 2.00 |" in line and "| 3.00 |" in line


def test_tune_kernels_quick(tmp_path):
    """Each hot kernel's default and a chosen variant, launched as crepa_loss launches them, on the
    interpreter; the one-pass backward's variant is another band height."""
    out = tmp_path / "tune.json"
    tries = [a for k in ("sim_bwd", "resample_bwd", "sim_fwd") for a in ("--try", f"{k}:block_n=4")]
    kernels = "sim_bwd,resample_bwd,sim_fwd,row_bwd,merged_bwd"
    proc = _run("tune_kernels.py", "--preset", "tiny_fused", "--dtypes", "fp32", "--max-variants", "1",
                "--kernels", kernels, *tries, "--try", "merged_bwd:rows=1", "--try", "row_bwd:d_blocks=2",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "not a performance figure" in report["timer"] and report["preset"]["name"] == "tiny_fused"
    assert [(r["kernel"], r["dtype"]) for r in report["results"]] == [(k, "fp32") for k in kernels.split(",")]
    for r in report["results"]:
        key, value = {"merged_bwd": ("rows", 1), "row_bwd": ("d_blocks", 2)}.get(r["kernel"], ("block_n", 4))
        default, variant = r["rows"]
        assert default["tune"] == {} and default["valid"] and default["ms"] > 0
        assert default["settings"][key] != value
        # another token block, band or chunking of D: other programs, the same bits
        assert variant["tune"] == {key: value} and variant["settings"][key] == value
        assert variant["bits_equal"] and variant["max_rel_diff"] == 0
        assert r["cut_short"] and r["best"]["valid"]


def test_probe_bandwidth_quick(tmp_path):
    """Every row of the probe (input reads, the forward at three neighbour settings and without the
    fused resample, the backward at two) on the interpreter, with the bytes each one counts."""
    out = tmp_path / "probe.json"
    proc = _run("probe_bandwidth.py", "--preset", "tiny_fused", "--dtypes", "fp32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "not a performance figure" in report["timer"]
    rows = [(r["what"], r["distance"], r["cumulative"], r["slots"]) for r in report["results"]]
    assert rows == [("read projected", None, False, None), ("read features", None, False, None),
                    ("sim_fwd", 0, False, 1), ("sim_fwd", 1, False, 3), ("sim_fwd", 2, False, 3),
                    ("sim_fwd", 2, True, 5), ("sim_fwd_unfused", 1, False, 3), ("sim_bwd", 0, False, 1),
                    ("sim_bwd", 1, False, 3)]
    assert all("error" not in r and r["ms"] > 0 for r in report["results"])
    # tiny_fused: projected (1, 3, 15, 40) and features (1, 3, 6, 40) in fp32
    by = {(r["what"], r["distance"], r["cumulative"]): r["bytes"] for r in report["results"]}
    assert by[("read projected", None, False)] == 3 * 15 * 40 * 4
    assert by[("read features", None, False)] == 3 * 6 * 40 * 4
    # the forward reads both inputs once and writes 4 per-token fp32 buffers and one cosine per slot
    for d, cumulative, slots in ((0, False, 1), (1, False, 3), (2, False, 3), (2, True, 5)):
        assert by[("sim_fwd", d, cumulative)] == (3 * 15 * 40 + 3 * 6 * 40) * 4 + (4 + slots) * 3 * 6 * 4
    assert by[("sim_fwd_unfused", 1, False)] == (2 * 3 * 6 * 40) * 4 + (4 + 3) * 3 * 6 * 4


def test_probe_bandwidth_records_a_failed_row_and_goes_on(monkeypatch, bench_script, tmp_path):
    # A setting the device refuses fails while its inputs are set up (a Case launches its kernels once):
    # that row says so and the later rows are still measured.
    probe = bench_script("probe_bandwidth")
    real = probe.Case

    def case(kernel, *args, cumulative=False, **kwargs):
        if cumulative:
            raise RuntimeError("out of resources: shared memory")
        return real(kernel, *args, cumulative=cumulative, **kwargs)

    monkeypatch.setattr(probe, "Case", case)
    out = tmp_path / "probe.json"
    assert probe.main(["--preset", "tiny_fused", "--dtypes", "fp32", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    failed = [r for r in rows if "error" in r]
    assert [(r["what"], r["distance"], r["cumulative"]) for r in failed] == [("sim_fwd", 2, True)]
    assert "out of resources" in failed[0]["error"]
    assert [r["what"] for r in rows[-3:]] == ["sim_fwd_unfused", "sim_bwd", "sim_bwd"]
    assert all(r["ms"] > 0 for r in rows if "error" not in r)


def test_gpu_check_runs_the_probe_by_default_at_wan480(tmp_path):
    proc, calls = _gpu_check_calls(tmp_path, CHECK_DEADLINE_S="0")
    probe = [c for c in calls if "probe_bandwidth.py" in c]
    assert proc.returncode == 0 and len(probe) == 1, proc.stdout + proc.stderr
    assert "--preset wan480 --dtypes fp32" in probe[0] and "probe_wan480.json" in probe[0]


def test_tune_reports_the_one_pass_settings_it_launches(monkeypatch):
    """A band height sets the one-pass backward's block and warps unless they are given: each
    variant's reported settings are the BLOCK_D and warps its launch used; a preset whose grids the
    kernel declines gives an error row, not a traceback."""
    sys.path.insert(0, HERE)
    try:
        import tune_kernels as tk
    finally:
        sys.path.remove(HERE)
    from crepa_kernels.ops import similarity

    case = tk.Case("merged_bwd", tk.PRESETS["tiny_fused"], torch.float32, "cpu")
    seen, real = [], similarity._kernel

    def spy(kernel, traceable):
        launcher = real(kernel, traceable)

        class Spy:
            def __getitem__(self, grid):
                return lambda *a, **k: seen.append((k["BLOCK_D"], k["num_warps"])) or launcher[grid](*a, **k)
        return Spy()
    monkeypatch.setattr(similarity, "_kernel", spy)
    for tune in ({}, {"rows": 1}, {"rows": 2, "num_warps": 2}, {"block_d": 8}):
        seen.clear()
        case.run(tune or None)
        settings = tk._settings(case, tune)
        assert {(settings["block_d"], settings["num_warps"])} == set(seen), (tune, settings, seen)
        assert all(settings[k] == v for k, v in tune.items())
    monkeypatch.setattr(similarity, "_band_launch_config", lambda *a, **k: None)
    res = tk.sweep("merged_bwd", tk.PRESETS["tiny_fused"], "fp32", "cpu", tk._timer(False, 1), None, float("inf"))
    assert res["rows"] == [] and "tile limit" in res["error"]


def test_tune_tries_the_resample_backwards_row_form_and_feature_blocks_per_program_first():
    """The row form (alone, with 4 feature blocks per program, with 32-token tiles), then, at wan480's
    D = 1536 in blocks of 128 (twelve), 4, all twelve and 2 blocks per program, before the settings
    every kernel takes; one block leaves nothing to chunk. Reported settings are what launches."""
    sys.path.insert(0, HERE)
    try:
        import tune_kernels as tk
    finally:
        sys.path.remove(HERE)
    wan = tk.candidates((8, 128, 4), 1536, "resample_bwd")
    assert wan[:6] == [{"row_kernel": 1}, {"row_kernel": 1, "d_blocks": 4}, {"row_kernel": 1, "block_n": 32},
                       {"d_blocks": 4}, {"d_blocks": 12}, {"d_blocks": 2}]
    assert wan[6:] == tk.candidates((8, 128, 4), 1536, "sim_bwd")
    assert not any("d_blocks" in c and len(c) == 1 for c in tk.candidates((8, 128, 4), 128, "resample_bwd"))
    assert not any("d_blocks" in c or "row_kernel" in c for c in tk.candidates((8, 128, 4), 1536, "sim_fwd"))
    case = tk.Case("resample_bwd", tk.PRESETS["tiny_fused"], torch.float32, "cpu")  # grids (3, 5) -> (2, 3), D 40
    assert tk._settings(case, {}) == {"block_n": 16, "block_d": 64, "num_warps": 4, "num_stages": "triton default",
                                      "d_blocks": 1, "row_kernel": 0}
    assert tk._settings(case, {"d_blocks": 3})["d_blocks"] == 3
    rows = tk._settings(case, {"row_kernel": 1})
    assert (rows["row_kernel"], rows["block_n"]) == (1, 8)  # a 5-token row in 8 lanes
    assert "d_blocks" not in tk._settings(tk.Case("sim_bwd", tk.PRESETS["tiny_fused"], torch.float32, "cpu"), {})


def test_tune_marks_a_declined_one_pass_variant_invalid():
    """A row tile so wide that the row-form backward declines the grids (the call would take the
    two-pass backward) is an invalid row with its reason, not a crash of the sweep; the default runs."""
    sys.path.insert(0, HERE)
    try:
        import tune_kernels as tk
    finally:
        sys.path.remove(HERE)
    case = tk.Case("row_bwd", tk.PRESETS["tiny_fused"], torch.float32, "cpu")
    timed = tk._timer(False, 1)
    base = tk.measure_variant(case, {}, None, timed, None)
    assert base["valid"] and base["settings"]["block_n"] == 8  # a 5-token row in 8 lanes
    row = tk.measure_variant(case, {"block_n": 1024}, [t.clone() for t in case.outputs], timed, None)
    assert not row["valid"] and "declines" in row["error"] and "ms" not in row


@pytest.mark.parametrize("spec", ["sim_bwd", "fwd:block_n=4", "sim_bwd:block_n=3", "sim_bwd:blocks=4",
                                  "sim_bwd:block_n=four", "sim_bwd:rows=2", "merged_bwd:block_n=4"])
def test_tune_kernels_rejects_bad_tries(spec, capsys):
    sys.path.insert(0, HERE)
    try:
        import tune_kernels as tk
    finally:
        sys.path.remove(HERE)
    with pytest.raises(SystemExit) as exit_:
        tk.main(["--preset", "tiny_fused", "--try", spec])
    assert exit_.value.code == 2 and f"--try {spec!r}:" in capsys.readouterr().err


def test_tune_sweep_never_reports_an_invalid_variant_as_best(monkeypatch):
    """A variant whose results differ beyond rounding is marked invalid however fast it is, and the
    per-setting winners are tried together."""
    sys.path.insert(0, HERE)
    try:
        import tune_kernels as tk
    finally:
        sys.path.remove(HERE)
    ref = torch.arange(1.0, 5.0)
    last = {}

    class StubCase:  # a kernel whose results and speed depend on its settings
        def __init__(self, kernel, preset, dtype, device):
            self.default, self.dim, self.bytes, self.window = (4, 64, 4), 64, 1000, (0, 2)
            self.keys = tk.TUNE_KEYS
            self.tolerance = tk.TOLERANCE[dtype]
            self.out = torch.zeros(4)

        def reset(self):
            self.out.fill_(float("nan"))

        def run(self, tune):
            last["tune"] = tune or {}
            if tune == {"block_n": 8}:
                self.out.copy_(ref * 1.01)  # wrong
            elif tune == {"block_n": 16}:
                self.out[1:] = ref[1:]  # leaves an element unwritten
            elif (tune or {}).get("block_d") == 32:
                self.out.copy_(ref * (1 + 2e-7))  # a different summation order: rounding
            else:
                self.out.copy_(ref)
            return [self.out]

    speed = {(): 1.0, (("block_n", 8),): 0.2, (("block_n", 16),): 0.3, (("block_n", 2),): 0.8, (("block_d", 32),): 0.9,
             (("block_d", 32), ("block_n", 2)): 0.5}

    def timed(fn):
        fn()
        ms = speed.get(tuple(sorted(last["tune"].items())), 1.2)
        return ms, ms, ms

    monkeypatch.setattr(tk, "Case", StubCase)
    res = tk.sweep("sim_fwd", tk.PRESETS["tiny_fused"], "fp32", "cpu", timed, None, float("inf"))
    rows = {tuple(sorted(r["tune"].items())): r for r in res["rows"]}
    assert len(rows) == len(res["rows"]) == 1 + len(tk.candidates((4, 64, 4), 64)) + 1
    assert not rows[(("block_n", 8),)]["valid"]  # the fastest single variant, but wrong
    # the unwritten element shows as NaN (an infinite difference), not as what the run before left there
    assert not rows[(("block_n", 16),)]["valid"] and rows[(("block_n", 16),)]["max_rel_diff"] == float("inf")
    assert rows[(("block_d", 32),)]["valid"] and not rows[(("block_d", 32),)]["bits_equal"]
    # block_n 2 (0.8 ms) and block_d 32 (0.9 ms) beat the default: tried together, at 0.5 ms the best
    assert res["best"]["tune"] == {"block_n": 2, "block_d": 32} and res["best"]["ms"] == 0.5
    assert res["best"]["speedup_vs_default"] == 2.0 and not res["cut_short"]


def test_host_ab_loads_another_revision_beside_this_checkout(tmp_path):
    """bench/host_ab.py: a git revision's package, renamed, runs interleaved with this checkout's."""
    if subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("needs a git checkout (it exports HEAD's package)")
    out = tmp_path / "ab.json"
    proc = _run("host_ab.py", "--base", "HEAD", "--rounds", "2", "--calls", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["base"] == "HEAD" and "not a GPU time" in report["note"]
    assert [len(report["rounds_us"][k]) for k in ("base", "new")] == [2, 2]
    assert all(t > 0 for k in ("base", "new") for t in report["rounds_us"][k])
    assert report["new_over_base"]["min"] <= report["new_over_base"]["median"] <= report["new_over_base"]["max"]


def test_host_ab_takes_the_base_from_an_archive(tmp_path):
    """bench/host_ab.py --base-archive: the base package comes from a tar (a checkout without git),
    and a base whose package is not in it is a clear failure, not a run of this checkout twice."""
    import tarfile

    archive = tmp_path / "base.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(os.path.join(os.path.dirname(HERE), "crepa_kernels"), arcname="crepa_kernels",
                filter=lambda info: None if "__pycache__" in info.name else info)
    out = tmp_path / "ab.json"
    proc = _run("host_ab.py", "--base", "archived", "--base-archive", str(archive), "--rounds", "2", "--calls", "5",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["base"] == "archived" and report["device"] == "cpu" and "tensors on cpu" in report["note"]
    assert all(t > 0 for k in ("base", "new") for t in report["rounds_us"][k])
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    proc = _run("host_ab.py", "--base", "x", "--base-archive", str(empty), "--rounds", "1", "--calls", "1")
    assert proc.returncode != 0 and "holds no crepa_kernels/" in proc.stderr
    proc = _run("host_ab.py", "--base", "x", "--base-archive", str(tmp_path / "missing.tar"))
    assert proc.returncode == 2 and "--base-archive" in proc.stderr and "no such file" in proc.stderr


def test_host_profile_breaks_a_stubbed_call_down(tmp_path):
    """bench/host_profile.py: the profile holds crepa_loss once per step and the primitives table
    every primitive, each with a positive time."""
    import inspect

    from crepa_kernels import functional

    out = tmp_path / "host_profile.txt"
    proc = _run("host_profile.py", "--steps", "20", "--top", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.strip() == proc.stdout.strip()
    assert float(text.splitlines()[1].split()[1]) > 0  # "step: X us per call without the profiler"
    profile, prims = text.split("\nprimitives, host us per call (each alone)\n")
    rows = [line.split(None, 3) for line in profile.splitlines() if line[:9].strip().replace(".", "").isdigit()]
    assert len(rows) == 60
    entry = f"crepa_kernels/functional.py:{inspect.getsourcelines(functional.crepa_loss)[1]}(crepa_loss)"
    assert {where: float(per_step) for _, _, per_step, where in rows}[entry] == 1.0
    times = [float(line.split()[0]) for line in prims.splitlines() if line.strip()]
    assert len(times) == 6 and all(t > 0 for t in times)


def test_tune_goes_on_when_one_kernels_setup_fails(monkeypatch, tmp_path, bench_script):
    # an out-of-memory or a compile error while setting up the first kernel: that kernel's entry
    # says so and the next kernel is still swept (the report exists for the A/B after it)
    tk = bench_script("tune_kernels")
    real = tk.Case.__init__

    def init(self, kernel, *args, **kwargs):
        if kernel == "sim_bwd":
            raise RuntimeError("CUDA out of memory (stand-in)")
        real(self, kernel, *args, **kwargs)

    monkeypatch.setattr(tk.Case, "__init__", init)
    out = tmp_path / "tune.json"
    tk.main(["--preset", "tiny_fused", "--dtypes", "fp32", "--kernels", "sim_bwd,sim_fwd", "--max-variants", "0",
             "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in results] == ["sim_bwd", "sim_fwd"]
    assert results[0]["error"] == "RuntimeError: CUDA out of memory (stand-in)" and results[0]["rows"] == []
    assert results[1]["rows"][0]["valid"] and results[1]["rows"][0]["ms"] > 0


@pytest.mark.parametrize("failure", ["raises", "killed"])
def test_profile_loss_keeps_the_tables_made_before_a_backend_fails(monkeypatch, tmp_path, failure, bench_script):
    # CUDA stood in for on the CPU: the second backend raises (recorded, exit 1) or the process dies
    # in it (stood in for by an exception nothing catches); the first backend's table is on disk
    pl = bench_script("profile_loss")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    make_inputs, build = bm.make_inputs, bm.build_callable
    monkeypatch.setattr(bm, "make_inputs", lambda preset, dtype, device, **kw: make_inputs(preset, dtype, "cpu", **kw))

    def build_callable(provider, *args):
        if provider == "torch":
            raise RuntimeError("no room") if failure == "raises" else KeyboardInterrupt
        return build(provider, *args)

    monkeypatch.setattr(bm, "build_callable", build_callable)
    out = tmp_path / "profile.txt"
    argv = ["--preset", "tiny", "--iters", "1", "--backends", "triton,torch", "--out", str(out)]
    if failure == "raises":
        assert pl.main(argv) == 1
    else:
        with pytest.raises(KeyboardInterrupt):
            pl.main(argv)
    text = out.read_text()
    assert "== backend triton: host enqueue" in text
    assert ("== backend torch: RuntimeError: no room" in text) == (failure == "raises")
