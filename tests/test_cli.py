"""The command line: the demo (the README's main job), bench --quick, info, and clear usage errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from crepa_kernels.cli import main

pytest.importorskip("diffusers")


def test_demo_trains_and_the_alignment_score_rises(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "10", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("steps", "seconds", "crepa_loss_first", "crepa_loss_last", "alignment_score_first",
                "alignment_score_last"):
        assert key in summary
    assert summary["steps"] == 10 and len(summary["history"]) == 10
    assert summary["alignment_score_last"] > summary["alignment_score_first"] + 0.1
    # the summary's ends are the history's: the first and last scored steps, the first and last steps
    # whose loss carried a weight (the warmup's step 0 has none), the first and last denoising losses
    history = summary["history"]
    weighted = [h for h in history if h["crepa_weight"] > 0]
    assert weighted[0] is not history[0] and history[0]["crepa_weight"] == 0
    assert (summary["alignment_score_first"], summary["alignment_score_last"]) == (
        history[0]["crepa_alignment_score"], history[-1]["crepa_alignment_score"])
    assert (summary["crepa_loss_first"], summary["crepa_loss_last"]) == (weighted[0]["crepa_loss"],
                                                                         weighted[-1]["crepa_loss"])
    assert (summary["denoise_loss_first"], summary["denoise_loss_last"]) == (history[0]["denoise_loss"],
                                                                             history[-1]["denoise_loss"])
    assert "crepa_alignment_score" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:  # the plot extra
        assert (tmp_path / "curves.png").stat().st_size > 0


def test_bench_quick_writes_results(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--name", "t", "--no-plot", "--modes", "forward"]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    rows = report["results"]
    assert {r["provider"] for r in rows} == {"torch", "triton"}
    interp = [r for r in rows if r["provider"] == "triton"]
    assert interp and all("not a performance figure" in r["note"] for r in interp)
    assert all(r["median_ms"] > 0 for r in rows)
    assert report["environment"]["torch"]
    out = capsys.readouterr().out
    assert "| small | fp32 | forward | torch |" in out
    # the interpreter row is marked as such in the printed table too, not only in the JSON
    assert "| tiny | fp32 | full | triton [1] |" in out
    assert "[1] Triton interpreter on CPU: not a performance figure" in out


def test_bench_quick_keeps_to_few_calls_and_a_failed_case_fails_the_command(tmp_path, monkeypatch, capsys):
    from crepa_kernels import benchmark as bm

    assert main(["bench", "--quick", "--out", str(tmp_path), "--name", "q", "--no-plot", "--modes", "forward",
                 "--no-interpreter-check"]) == 0
    rows = json.loads((tmp_path / "q.json").read_text())["results"]
    assert rows and all(r["reps"] <= 5 for r in rows) and {r["provider"] for r in rows} == {"torch"}
    real = bm.run_case

    def failing(preset, dtype, provider, mode, device, **kw):
        if mode == "full":
            raise torch.OutOfMemoryError("no room")
        return real(preset, dtype, provider, mode, device, **kw)

    monkeypatch.setattr(bm, "run_case", failing)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--name", "f", "--no-plot", "--no-interpreter-check"]) == 1
    rows = json.loads((tmp_path / "f.json").read_text())["results"]
    assert any("error" in r for r in rows) and any("median_ms" in r for r in rows)


def test_bench_reps_are_kept_with_quick(tmp_path):
    assert main(["bench", "--quick", "--reps", "2", "--preset", "tiny", "--modes", "forward", "--out",
                 str(tmp_path), "--name", "r", "--no-plot", "--no-interpreter-check"]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert rows and all(r["reps"] == 2 for r in rows)


def test_bench_on_the_cpu_of_a_gpu_machine_runs_the_interpreter_check(tmp_path):
    # A fresh process with CUDA reported present and TRITON_INTERPRET unset, as on a GPU machine: the
    # CPU bench must still run its Triton row through the interpreter.
    script = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from crepa_kernels.cli import main\n"
        f"sys.exit(main(['bench', '--quick', '--device', 'cpu', '--preset', 'tiny', '--modes', 'forward', "
        f"'--reps', '1', '--no-plot', '--out', {str(tmp_path)!r}, '--name', 'c']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "c.json").read_text())["results"]
    interp = [r for r in rows if r["provider"] == "triton"]
    assert interp and all("error" not in r and r["median_ms"] > 0 for r in interp)


def test_info_prints_json(capsys):
    assert main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["crepa_kernels"]


@pytest.mark.parametrize("argv,msg", [
    (["bench", "--preset", "huge"], "--preset got huge"),
    (["bench", "--providers", "jax"], "--providers got jax"),
])
def test_bench_bad_choices_exit_nonzero_with_one_line(argv, msg, capsys, monkeypatch):
    # A refused call leaves the process as it was: TRITON_INTERPRET, which makes every Triton kernel
    # defined afterwards run in the interpreter, is set only for a CPU bench that goes ahead.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(argv + ["--device", "cpu"]) == 2
    assert msg in capsys.readouterr().err
    assert "TRITON_INTERPRET" not in os.environ


def test_demo_bad_steps(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "many"])
    capsys.readouterr()
    assert main(["demo", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["crepa-kernels demo: error: steps must be an int >= 2, got 1"]


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["bench", "--device", "gpu0"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu0'"),
    (["bench", "--reps", "0"], "argument --reps: expected a positive int, got '0'"),
    (["demo", "--out", "FILE"], "exists and is not a directory"),
    (["bench", "--out", "FILE"], "exists and is not a directory"),
    (["demo", "--seed", "99999999999999999999999"], "argument --seed: expected an int in [0, 2**63)"),
    (["demo", "--seed", "-1"], "argument --seed: expected an int in [0, 2**63), got '-1'"),
])
def test_bad_arguments_are_refused_before_any_work(argv, msg, tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    argv = [str(afile) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_an_output_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert main(["demo", "--out", str(afile / "sub"), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crepa-kernels demo: error: ") and "Not a directory" in err[0]


def test_a_cuda_device_index_beyond_the_machine_is_refused(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda:5"])
    assert "'cuda:5': this machine has 1 CUDA device(s)" in capsys.readouterr().err
