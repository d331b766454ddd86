"""Benchmark building blocks: presets, inputs, providers, a timer (median, p20, p80) and the runner.

Shared by the pytest-benchmark suite (bench/), `crepa-kernels bench`, bench/gpu_check.sh and the
A/B script, so every kernel-suite figure in bench/results/ comes from the same code (the offload,
step and precision benchmarks are scripts of their own under bench/).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ._plotting import headless_pyplot
from .functional import crepa_loss
from .ops.launch import fast_launch_status
from .ops.utils import interpreter_enabled, switches_set


@dataclass(frozen=True)
class Preset:
    name: str
    batch: int
    frames: int
    projected_grid: tuple[int, int]  # DiT latent patch grid (h, w)
    features_grid: tuple[int, int]  # DINOv2 patch grid
    dim: int  # encoder embedding size (projector output)

    @property
    def shapes(self) -> dict:
        ph, pw = self.projected_grid
        fh, fw = self.features_grid
        return {"projected": (self.batch, self.frames, ph * pw, self.dim),
                "features": (self.batch, self.frames, fh * fw, self.dim)}


PRESETS = {
    "tiny": Preset("tiny", 1, 4, (4, 6), (5, 5), 48),  # interpreter-sized; not a performance figure
    "small": Preset("small", 1, 16, (16, 16), (16, 16), 384),  # DINOv2-S at 224 px
    "wan480": Preset("wan480", 1, 21, (30, 52), (37, 37), 1536),  # DINOv2-g at 518 px
    "wan720": Preset("wan720", 1, 21, (45, 80), (37, 37), 1536),
    "ltx768": Preset("ltx768", 1, 16, (16, 24), (37, 37), 1536),
}
PROVIDERS = ("torch", "torch_compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Memory bandwidth of known devices in bytes/s (vendor figures), for the achieved-bandwidth ratio,
# by the name torch reports (``torch.cuda.get_device_name``), most specific first. A device not
# listed gets no roofline fraction (None), never another device's figure.
BANDWIDTH = (
    (r"H100 80GB HBM3|H100 SXM", 3.35e12),
    (r"H100 NVL", 3.9e12),
    (r"H100 PCIe", 2.0e12),
    (r"(?<![A-Z])H200", 4.8e12),  # not GH200, whose memory differs by model
    (r"A100-SXM4-80GB|A100 80GB SXM", 2.039e12),
    (r"A100 80GB PCIe", 1.935e12),
    (r"A100-SXM4-40GB|A100-PCIE-40GB", 1.555e12),
)


def device_bandwidth(name: str) -> Optional[float]:
    for pattern, bw in BANDWIDTH:
        if re.search(pattern, name):
            return bw
    return None


def make_inputs(preset: Preset, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = preset.shapes
    p = torch.randn(shapes["projected"], generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    f = torch.randn(shapes["features"], generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return p, f


def loss_fn(preset: Preset, backend: str) -> Callable:
    def fn(p, f):
        return crepa_loss(p, f, projected_grid=preset.projected_grid, features_grid=preset.features_grid,
                          weight=0.5, backend=backend).loss
    return fn


def build_callable(provider: str, mode: str, preset: Preset, p: torch.Tensor, f: torch.Tensor) -> Callable[[], None]:
    """A zero-argument callable running one measured iteration of ``mode`` for ``provider``."""
    backend = "triton" if provider == "triton" else "torch"
    fn = loss_fn(preset, backend)
    if provider == "torch_compile":
        fn = torch.compile(fn)
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(p, f)
        return run
    leaf = p.detach().requires_grad_(True)
    if mode == "full":
        def run():
            leaf.grad = None
            fn(leaf, f).backward()
    else:
        # backward only: the forward is built outside the timed region, the graph is kept for reuse
        # (a compiled graph that donates its saved buffers to the backward cannot be run twice)
        no_donation = (torch._functorch.config.patch(donated_buffer=False)
                       if provider == "torch_compile" and hasattr(torch._functorch.config, "donated_buffer")
                       else contextlib.nullcontext())
        with no_donation:
            loss = fn(leaf, f)

        def run():
            leaf.grad = None
            loss.backward(retain_graph=True)
    # `measure` calls this before it reads its memory baseline: the previous call's gradient goes, so
    # the peak above the baseline counts the gradient each call writes (as it counts every other
    # buffer the call allocates)
    run.release = lambda: setattr(leaf, "grad", None)
    return run


def io_bytes(mode: str, p: torch.Tensor, f: torch.Tensor, recompute: bool = False) -> int:
    """Bytes a perfect kernel must move: each input read once, each gradient written once.

    ``recompute``: what a forward and a separate backward must move at the least for ``full``: the
    backward cannot start before the loss's gradient exists, so it reads the inputs again (any saved
    copy would be written and read instead). The roofline of ``full`` counted this way is the one a
    forward + backward pair can approach; counted the first way it would need a single fused pass."""
    inputs = p.numel() * p.element_size() + f.numel() * f.element_size()
    grad = p.numel() * p.element_size()
    if recompute and mode == "full":
        return 2 * inputs + grad
    return {"forward": inputs, "backward": inputs + grad, "full": inputs + grad}[mode]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_one_call(run: Callable[[], None], cuda: bool) -> float:
    """ms of one call, synced: CUDA events around it on a GPU (the host's time before the first
    kernel counts), perf_counter on the CPU."""
    if cuda:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def time_queued(run: Callable[[], None], calls: int, cuda: bool) -> float:
    """ms per call of ``calls`` calls queued back to back with one sync at the end: the host prepares
    the next call while the GPU runs this one, as in a training step whose GPU work is queued ahead of
    the host. Near the synced time when the GPU bounds a call; lower when the host does."""
    return time_one_call(lambda: [run() for _ in range(calls)], cuda) / calls


@contextlib.contextmanager
def environment_override(env: dict):
    """Set environment variables for the duration (the backend's switches are read at call time)."""
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(run: Callable[[], None], device, *, warmup: int = 3, reps: int = 20, max_seconds: float = 20.0,
            queued: Optional[int] = None) -> dict:
    """Time ``run``: CUDA events on a GPU, perf_counter on the CPU. Returns ms quantiles of single
    synced calls and, on a GPU, the peak memory above what was allocated before them (the inputs; a
    ``run.release()`` frees the previous call's output first, so a gradient counts); ``queued_ms``
    (``queued`` calls queued back to back, by default up to 10 and only on a GPU). Events, syncs and
    memory statistics act on ``device``, made the current CUDA device for the duration."""
    is_cuda = torch.device(device).type == "cuda"
    with torch.cuda.device(device) if is_cuda else contextlib.nullcontext():
        return _measure(run, device, is_cuda, warmup, reps, max_seconds, queued)


def _measure(run, device, is_cuda, warmup, reps, max_seconds, queued) -> dict:
    for _ in range(warmup):
        run()
    release = getattr(run, "release", None)
    if release is not None:
        release()  # the last warmup call's output (a gradient) is not part of the baseline
    _sync(device)
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    t_end = time.perf_counter() + max_seconds
    for _ in range(reps):
        times.append(time_one_call(run, is_cuda))
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    out = {"p20_ms": q[0], "median_ms": q[1], "p80_ms": q[2], "reps": len(times)}
    if is_cuda:
        out["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    if is_cuda or queued:
        out["queued_ms"] = time_queued(run, queued or max(3, min(len(times), 10)), cuda=is_cuda)
    return out


def environment(device) -> dict:
    import crepa_kernels

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit = os.environ.get("CREPA_COMMIT")  # set where the tree travels without its .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    return {
        "device": name,
        "device_type": dev.type,
        "bandwidth_bytes_per_s": device_bandwidth(name) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "crepa_kernels": crepa_kernels.__version__,
        "commit": commit,
        "triton_interpreter": interpreter_enabled(),
        "switches": switches_set(),  # CREPA_KERNELS_* set for the whole run (rows record their own overrides)
        "fast_launch": fast_launch_status(),  # the default launch path (on since commit 649547d)
        # what peak_extra_bytes counts (runs before this field kept the previous call's gradient in the
        # baseline, so their figures leave the gradient out)
        "peak_memory": "above the inputs; the gradient a call writes included; backward rows: above the "
                       "inputs and the forward's graph",
        "bandwidth_known": dev.type != "cuda" or device_bandwidth(name) is not None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(preset: Preset, dtype_name: str, provider: str, mode: str, device, **measure_kw) -> dict:
    dtype = DTYPES[dtype_name]
    p, f = make_inputs(preset, dtype, device)
    run = build_callable(provider, mode, preset, p, f)
    stats = measure(run, p.device, **measure_kw)  # the inputs' device (e.g. cuda:1 for --device cuda:1)
    nbytes = io_bytes(mode, p, f)
    row = {"preset": preset.name, "dtype": dtype_name, "provider": provider, "mode": mode,
           "shapes": {k: list(v) for k, v in preset.shapes.items()}, "grids": {
               "projected": list(preset.projected_grid), "features": list(preset.features_grid)},
           "io_bytes": nbytes, "io_bytes_recompute": io_bytes(mode, p, f, recompute=True), **stats}
    row["achieved_gbps"] = nbytes / (stats["median_ms"] * 1e-3) / 1e9
    del run, p, f
    return row


def add_speedups(rows: list[dict], bandwidth: Optional[float]) -> list[dict]:
    """speedup = torch time / this time, per (preset, dtype, mode), from the synced medians (a call's
    host time included) and, as ``speedup_queued``, from the queued times (calls back to back, as in
    a training step whose GPU work runs ahead of the host); the roofline fractions likewise, where
    the device's bandwidth is known."""
    base = {(r["preset"], r["dtype"], r["mode"]): r for r in rows if r["provider"] == "torch" and "median_ms" in r}
    for r in rows:
        ref = base.get((r["preset"], r["dtype"], r["mode"]))
        if ref is not None and "median_ms" in r:
            r["speedup"] = ref["median_ms"] / r["median_ms"]
            if ref.get("queued_ms") and r.get("queued_ms"):
                r["speedup_queued"] = ref["queued_ms"] / r["queued_ms"]
        if bandwidth and "achieved_gbps" in r:
            r["roofline_fraction"] = r["achieved_gbps"] * 1e9 / bandwidth
            if r.get("io_bytes") and r.get("io_bytes_recompute"):
                r["roofline_fraction_recompute"] = r["roofline_fraction"] * r["io_bytes_recompute"] / r["io_bytes"]
            if r.get("io_bytes") and r.get("queued_ms"):
                r["roofline_fraction_queued"] = r["io_bytes"] / (r["queued_ms"] * 1e-3) / bandwidth
    mem = {(r["preset"], r["dtype"], r["mode"]): r.get("peak_extra_bytes") for r in rows if r["provider"] == "torch"}
    for r in rows:
        b = mem.get((r["preset"], r["dtype"], r["mode"]))
        if b and r.get("peak_extra_bytes") is not None:
            r["peak_memory_vs_torch"] = r["peak_extra_bytes"] / b
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per row; a row with a ``note`` (e.g. an interpreter run, not a performance figure)
    gets a numbered mark after its provider and the note under the table."""
    head = ("| preset | dtype | mode | provider | median ms | p20 | p80 | queued ms | peak extra MiB | GB/s "
            "| speedup | speedup queued | roofline | memory vs torch |")
    lines = [head, "|" + "---|" * 14]
    notes: list[str] = []
    for r in rows:
        provider = r["provider"]
        if r.get("note"):
            if r["note"] not in notes:
                notes.append(r["note"])
            provider = f"{provider} [{notes.index(r['note']) + 1}]"
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['dtype']} | {r['mode']} | {provider} | error: {r['error'][:60]} |"
                         " | | | | | | | | |")
            continue
        mem = r.get("peak_extra_bytes")
        queued = r.get("queued_ms")

        def opt(key, fmt):
            return "" if r.get(key) is None else format(r[key], fmt)
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['mode']} | {provider} | {r['median_ms']:.3f} | "
            f"{r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {'' if queued is None else f'{queued:.3f}'} | "
            f"{'' if mem is None else f'{mem / 2**20:.1f}'} | "
            f"{r['achieved_gbps']:.1f} | {r.get('speedup', float('nan')):.2f} | {opt('speedup_queued', '.2f')} | "
            f"{opt('roofline_fraction', '.1%')} | {opt('peak_memory_vs_torch', '.1%')} |"
        )
    if notes:
        lines.append("")
        lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def as_dict(preset: Preset) -> dict:
    return asdict(preset)


def run_suite(presets, dtypes, providers, modes, device, *, reps: int = 20, warmup: int = 3,
              max_seconds: float = 20.0, progress: bool = True) -> dict:
    """Run every (preset, dtype, provider, mode) case; a failing case is recorded, not fatal."""
    from tqdm.auto import tqdm

    cases = [(pr, dt, pv, md) for pr in presets for dt in dtypes for md in modes for pv in providers]
    rows = []
    bar = tqdm(cases, disable=not progress, desc="bench", unit="case")
    for preset_name, dtype_name, provider, mode in bar:
        bar.set_postfix_str(f"{preset_name}/{dtype_name}/{mode}/{provider}")
        preset = PRESETS[preset_name]
        try:
            rows.append(run_case(preset, dtype_name, provider, mode, device, reps=reps, warmup=warmup,
                                 max_seconds=max_seconds))
        except Exception as exc:  # an OOM or a compiler failure is a result worth recording
            rows.append({"preset": preset_name, "dtype": dtype_name, "provider": provider, "mode": mode,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        finally:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            if provider == "torch_compile":
                torch._dynamo.reset()
    env = environment(device)
    add_speedups(rows, env.get("bandwidth_bytes_per_s"))
    return {"environment": env, "presets": {n: as_dict(PRESETS[n]) for n in presets}, "results": rows}


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: a run killed mid-write (a time
    limit) leaves the previous version whole. For results rewritten after every case."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def print_report(lines: list[str], out: Optional[str]) -> None:
    """Print a text report (one string per line) and, given a path, write it there too."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")


def write_outputs(report: dict, out_dir: str, name: str, plot: bool = True) -> list[str]:
    """results JSON, a markdown table and (if matplotlib imports) a PNG of time and memory."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    written.append(path)
    md = os.path.join(out_dir, f"{name}.md")
    env = report["environment"]
    with open(md, "w") as fh:
        fh.write(f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; commit {env['commit']}; "
                 f"interpreter: {env['triton_interpreter']}\n\n")
        fh.write(markdown_table(report["results"]) + "\n")
    written.append(md)
    if plot:
        png = _plot(report, os.path.join(out_dir, f"{name}.png"))
        if png:
            written.append(png)
    return written


def _plot(report: dict, path: str) -> Optional[str]:
    plt = headless_pyplot()
    if plt is None:
        return None
    # Rows with a note (interpreter runs) are no performance figures: they stay in the table only.
    rows = [r for r in report["results"] if "median_ms" in r and not r.get("note")]
    if not rows:
        return None
    labels = [f"{r['preset']}/{r['dtype']}/{r['mode']}" for r in rows]
    groups = sorted(set(labels), key=labels.index)
    # A/B rows carry their overrides in the label ("triton[NAME=value]"): order them after their base.
    providers = sorted({r["provider"] for r in rows},
                       key=lambda prov: (list(PROVIDERS).index(prov.split("[")[0]), prov))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(groups) + 4), 4.5))
    width = 0.8 / max(len(providers), 1)
    for i, prov in enumerate(providers):
        xs, ts, ms = [], [], []
        for j, g in enumerate(groups):
            r = next((r for r, lab in zip(rows, labels) if lab == g and r["provider"] == prov), None)
            if r is None:
                continue
            xs.append(j + i * width)
            ts.append(r["median_ms"])
            ms.append((r.get("peak_extra_bytes") or 0) / 2**20)
        axes[0].bar(xs, ts, width, label=prov)
        axes[1].bar(xs, ms, width, label=prov)
    for ax, title in zip(axes, ("median time (ms)", "peak extra memory (MiB)")):
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"crepa_loss on {env['device']} (torch {env['torch']}, triton {env['triton']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
