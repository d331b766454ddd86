"""Smoke runs of the stand-alone GPU benchmark scripts in their --quick CPU mode, so they cannot rot."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytest.importorskip("diffusers")


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_bench_offload_quick(tmp_path):
    out = tmp_path / "offload.json"
    proc = _run("bench_offload.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["mode"] for r in report["runs"]} >= {"resident", "offload", "auto"}
    assert all(r["features_max_abs_diff_vs_first"] == 0.0 for r in report["runs"])


def test_bench_step_quick(tmp_path):
    out = tmp_path / "step.json"
    proc = _run("bench_step.py", "--quick", "--latent-frames", "3", "--steps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["encoded_frames"] == {"reference": 9, "ours": 3}
    assert report["results"]["ours"]["median_ms"] > 0 and report["results"]["reference"]["median_ms"] > 0
    phases = report["results"]["ours"]["phases_ms"]
    assert set(phases) == {"decode_ms", "encode_ms", "loss_fwd_bwd_ms"} and all(v > 0 for v in phases.values())
    settings = report["results"]["decode_settings"]
    assert list(settings) == ["default", "cudnn_benchmark", "channels_last_3d", "channels_last_3d+cudnn_benchmark"]
    assert settings["default"]["max_abs_diff_vs_default"] == 0.0
    # fp32 on the CPU: another memory layout changes the summation order, not the frames
    assert all(row["median_ms"] > 0 and row["max_abs_diff_vs_default"] < 1e-4 for row in settings.values())
    cl = report["results"]["ours_channels_last"]
    assert "error" not in cl, cl
    assert cl["median_ms"] > 0 and cl["conv3d_weights_relaid"] > 0
    assert cl["loss_abs_diff_vs_default_layout"] == abs(cl["loss"] - cl["loss_default_layout"]) < 1e-5
    assert report["results"]["speedup_channels_last"] == pytest.approx(
        report["results"]["reference"]["median_ms"] / cl["median_ms"])


def test_teacher_precision_quick(tmp_path):
    out = tmp_path / "precision.json"
    proc = _run("teacher_precision.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["dtype"] for r in rows} == {"bfloat16", "float16"}
    # the two paths differ by the teacher's rounding only: small, not zero
    assert all(0 < r["max_grad_rel_diff"] < 0.05 and r["max_loss_diff"] < 1e-2 for r in rows)


def test_bench_offload_records_a_failing_mode_and_writes_the_others(monkeypatch, tmp_path, bench_script):
    bo = bench_script("bench_offload")
    real = bo.run_mode

    def run_mode(mode, *args, **kwargs):
        if mode == "offload":
            raise RuntimeError("CUDA out of memory (stand-in)\nmore")
        return real(mode, *args, **kwargs)

    monkeypatch.setattr(bo, "run_mode", run_mode)
    out = tmp_path / "offload.json"
    bo.main(["--quick", "--out", str(out)])
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["offload"] == {"mode": "offload", "error": "RuntimeError: CUDA out of memory (stand-in)"}
    assert runs["resident"]["step_ms"]["median"] > 0 and runs["auto"]["features_max_abs_diff_vs_first"] == 0.0


def test_bench_offload_records_the_commit_it_is_given(monkeypatch, bench_script):
    monkeypatch.setenv("CREPA_COMMIT", "abc1234")  # a checkout without .git, as on a GPU machine
    assert bench_script("bench_offload").commit() == "abc1234"


def test_bench_step_keeps_the_reference_row_when_our_step_fails(monkeypatch, tmp_path, bench_script):
    bs = bench_script("bench_step")

    def our_step(*args, **kwargs):
        raise RuntimeError("no room for the decode")

    monkeypatch.setattr(bs, "our_step", our_step)
    out = tmp_path / "step.json"
    assert bs.main(["--quick", "--latent-frames", "3", "--steps", "1", "--no-decode-settings",
                    "--no-channels-last", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    assert rows["reference"]["median_ms"] > 0 and rows["ours"] == {"error": "RuntimeError: no room for the decode"}
    assert rows["ours_cached_features"]["median_ms"] > 0 and "speedup_cached" in rows and "speedup" not in rows
