"""Peak GPU memory and time of a CREPA training step with the teacher `resident`, `offload` or `auto`.

The step mimics training: a DiT stand-in holds activations from its forward through the teacher
(VAE decode, then DINOv2 on the decoded frames) to its backward, which allocates more; the teacher
modules follow the order documented in `crepa_kernels.teacher.offload`. Weights are random
(timm `vit_giant_patch14_dinov2` at 518 px, pretrained=False; diffusers `AutoencoderKLWan` default
config when diffusers imports, else a Conv3d stand-in of similar parameter count, labelled as such).
No network. `--quick` is a tiny CPU smoke run (emulated device, so the offload path still runs).

    python bench/bench_offload.py --out bench/results/offload.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crepa_kernels.benchmark import write_atomic  # noqa: E402
from crepa_kernels.teacher.offload import OffloadManager, module_nbytes  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StandInVideoDecoder(nn.Module):
    """Conv3d latent-to-video decoder with about the Wan 2.1 VAE's parameter count (127 M by default).

    Most weights sit at the latent resolution, as in the real decoder; three x2 spatial upsamplings
    reach the pixel grid and the time axis is stretched to 4 * (T - 1) + 1 frames like Wan's.
    """

    def __init__(self, z_dim: int = 16, width: int = 384, blocks: int = 31):
        super().__init__()
        self.inp = nn.Conv3d(z_dim, width, 3, padding=1)
        self.mid = nn.ModuleList(nn.Conv3d(width, width, 3, padding=1) for _ in range(blocks))
        chans = [width, width // 2, width // 4, width // 8]
        self.up = nn.ModuleList(nn.Conv3d(chans[i], chans[i + 1], 3, padding=1) for i in range(3))
        self.out = nn.Conv3d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.inp(z)
        for conv in self.mid:
            x = x + F.silu(conv(x))
        for conv in self.up:
            x = F.silu(conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")))
        x = torch.tanh(self.out(x))
        t = 4 * (z.shape[2] - 1) + 1
        return F.interpolate(x, size=(t, x.shape[3], x.shape[4]), mode="nearest")


def build_vae(quick: bool, device, dtype):
    try:
        from diffusers import AutoencoderKLWan
    except Exception as e:  # the GPU image ships without diffusers
        reason = f"diffusers not importable ({type(e).__name__})"
        vae = StandInVideoDecoder(width=16, blocks=2) if quick else StandInVideoDecoder()
        label = f"standin_conv3d_decoder: {reason}"
    else:
        cfg = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1) if quick else {}
        vae = AutoencoderKLWan(**cfg)
        label = "diffusers.AutoencoderKLWan" + (" (tiny config)" if quick else " (default config)")
    return vae.to(device=device, dtype=dtype).requires_grad_(False).eval(), label


def build_encoder(quick: bool, device, dtype, image_size: int):
    import timm

    name = "vit_small_patch14_dinov2" if quick else "vit_giant_patch14_dinov2"
    kw = dict(depth=2) if quick else {}
    with torch.device(device):  # random init straight on the device is much faster than on the CPU
        enc = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0, **kw)
    label = f"timm.{name} pretrained=False img_size={image_size}" + (" depth=2" if quick else "")
    return enc.to(dtype=dtype).requires_grad_(False).eval(), label


def decode(vae, z):
    frames = vae.decode(z).sample if hasattr(vae, "decode") else vae(z)  # (B, C, T, H, W) in [-1, 1]
    return ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) in [0, 1]


def encode(enc, frames, image_size: int, batch: int):
    b, t = frames.shape[:2]
    x = frames.flatten(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    out = []
    for i in range(0, x.shape[0], batch):
        chunk = F.interpolate(x[i:i + batch], size=(image_size, image_size), mode="bilinear", align_corners=False)
        tokens = enc.forward_features((chunk - mean) / std)
        out.append(tokens[:, enc.num_prefix_tokens:])
    feats = torch.cat(out)
    return feats.view(b, t, *feats.shape[1:])


class DiTStandIn:
    """Holds `act_bytes` from forward to backward, allocates half as much more in backward, and computes."""

    def __init__(self, device, dtype, act_bytes: int, width: int, fwd_matmuls: int):
        self.device, self.dtype, self.act_bytes = device, dtype, act_bytes
        self.w = torch.randn(width, width, device=device, dtype=dtype) / math.sqrt(width)
        self.x = torch.randn(width, width, device=device, dtype=dtype)
        self.n = fwd_matmuls

    def _busy(self, n):
        y = self.x
        for _ in range(n):
            y = torch.tanh(y @ self.w)
        return y

    def forward(self):
        acts = torch.empty(self.act_bytes, dtype=torch.uint8, device=self.device)
        return acts, self._busy(self.n)

    def backward(self, saved):
        grads = torch.empty(self.act_bytes // 2, dtype=torch.uint8, device=self.device)
        y = self._busy(2 * self.n)
        del grads, saved
        return y


def teacher_step(mgr, vae, enc, latents, args):
    with mgr.use(vae):
        mgr.prefetch(enc)  # before the decode is launched, so the copy overlaps it
        frames = decode(vae, latents)
    # leaving use() applied the mode: unless it keeps the VAE, its memory is free for DINOv2
    with mgr.use(enc):
        feats = encode(enc, frames, args.image_size, args.frames_batch)
    return feats


def train_step(mgr, vae, enc, latents, dit, args, sync, peaks=None):
    mgr.prefetch(vae)  # early: the copy overlaps the DiT forward
    saved = dit.forward()
    t0 = time.perf_counter()
    ev0 = ev1 = None
    if sync is not None:
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
    feats = teacher_step(mgr, vae, enc, latents, args)
    if ev1 is not None:
        ev1.record()
    teacher_host_s = time.perf_counter() - t0
    if peaks is not None:  # the DiT backward is where the teacher's weights must be gone
        peaks["until_backward"] = max(peaks.get("until_backward", 0), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    dit.backward(saved)
    if peaks is not None:
        peaks["dit_backward"] = max(peaks.get("dit_backward", 0), torch.cuda.max_memory_allocated())
    del saved
    return feats, ev0, ev1, teacher_host_s


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summary(xs):
    return {"median": statistics.median(xs), "p20": pct(xs, 0.2), "p80": pct(xs, 0.8), "n": len(xs)}


def commit():
    if os.environ.get("CREPA_COMMIT"):  # set where the tree travels without its .git
        return os.environ["CREPA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except Exception:
        return None


def run_mode(mode, vae, enc, latents, dit, args, device, emulate, probe=None):
    mgr = OffloadManager(mode, device=None if emulate else device, margin_bytes=args.margin_gib * 2**30,
                         memory_probe=probe, emulate_device=emulate)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    t0 = time.perf_counter()
    ref_feats, *_ = train_step(mgr, vae, enc, latents, dit, args, sync)  # packs the modules, warms up
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    first_step_s = time.perf_counter() - t0
    s0 = mgr.stats
    step_ms, teacher_ms, teacher_host_ms = [], [], []
    base = torch.cuda.memory_allocated() if cuda else 0
    peaks = {} if cuda else None
    for _ in range(args.steps):
        t = time.perf_counter()
        feats, ev0, ev1, th = train_step(mgr, vae, enc, latents, dit, args, sync, peaks)
        if cuda:
            sync()
            teacher_ms.append(ev0.elapsed_time(ev1))
        step_ms.append((time.perf_counter() - t) * 1e3)
        teacher_host_ms.append(th * 1e3)
    mgr.synchronize()
    s1 = mgr.stats
    copies = s1.copies - s0.copies
    moved = s1.bytes_to_device - s0.bytes_to_device
    copy_s = s1.copy_seconds - s0.copy_seconds
    res = {
        "mode": mode,
        "step_ms": summary(step_ms),
        "teacher_ms_gpu": summary(teacher_ms) if teacher_ms else None,
        "teacher_ms_host": summary(teacher_host_ms),
        "first_step_s_including_packing": first_step_s,
        "peak_allocated_bytes": max(peaks["until_backward"], peaks["dit_backward"]) if cuda else None,
        "peak_allocated_dit_backward_bytes": peaks["dit_backward"] if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "allocated_before_steps_bytes": base if cuda else None,
        "bytes_to_device_per_step": moved / args.steps,
        "copies_per_step": copies / args.steps,
        "copy_ms_per_step": copy_s * 1e3 / args.steps,
        "h2d_GBps": (moved / copy_s / 1e9) if copy_s > 0 else None,
        "evictions": s1.evictions,
        "prefetches_skipped": s1.prefetches_skipped,
        "pinning": s1.pinning,
        "host_bytes": s1.host_bytes,
    }
    mgr.evict_all()
    mgr.unregister(vae)
    mgr.unregister(enc)
    if cuda:
        sync()
        torch.cuda.empty_cache()
    return res, feats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (emulated device)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 5, quick 2)")
    p.add_argument("--modes", default="resident,offload,auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--latent-shape", default=None, help="B,C,T,h,w of the VAE latents (default 1,16,3,60,104)")
    p.add_argument("--image-size", type=int, default=None, help="encoder resolution (default 518, quick 42)")
    p.add_argument("--frames-batch", type=int, default=9)
    p.add_argument("--dit-gib", type=float, default=8.0, help="DiT stand-in activations held over the teacher")
    p.add_argument("--margin-gib", type=int, default=2, help="OffloadManager margin for auto")
    p.add_argument("--auto-budget-gib", type=float, default=None,
                   help="also run auto as if the GPU had only this much memory (probe = budget - allocated)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.steps is None:
        args.steps = 2 if quick else 5
    if args.image_size is None:
        args.image_size = 42 if quick else 518
    if args.latent_shape is None:
        args.latent_shape = "1,16,2,4,4" if quick else "1,16,3,60,104"
    shape = tuple(int(s) for s in args.latent_shape.split(","))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    if quick:
        device, emulate, dtype = torch.device("cpu"), True, torch.float32
        act_bytes, width, nmm = 1 << 20, 64, 2
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (use --quick for a CPU smoke run)")
        device, emulate, dtype = torch.device("cuda", torch.cuda.current_device()), False, getattr(torch, args.dtype)
        act_bytes, width, nmm = int(args.dit_gib * 2**30), 8192, 40

    torch.manual_seed(0)
    t0 = time.perf_counter()
    vae, vae_label = build_vae(quick, device, dtype)
    enc, enc_label = build_encoder(quick, device, dtype, args.image_size)
    build_s = time.perf_counter() - t0
    latents = torch.randn(shape, device=device, dtype=dtype)
    dit = DiTStandIn(device, dtype, act_bytes, width, nmm)

    import timm
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except Exception:
        diffusers_version = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    runs, feats = [], {}
    result = {
        "benchmark": "teacher offload",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "emulated_device": emulate,
        "dtype": str(dtype),
        "versions": {"torch": torch.__version__, "triton": triton_version, "timm": timm.__version__,
                     "diffusers": diffusers_version, "python": platform.python_version()},
        "commit": commit(),
        "modules": {
            "vae": {"label": vae_label, "params": sum(t.numel() for t in vae.parameters()), "bytes": module_nbytes(vae)},
            "encoder": {"label": enc_label, "params": sum(t.numel() for t in enc.parameters()), "bytes": module_nbytes(enc)},
        },
        "latent_shape": list(shape),
        "image_size": args.image_size,
        "dit_standin_activation_bytes": act_bytes,
        "steps": args.steps,
        "margin_bytes": args.margin_gib * 2**30,
        "build_s": build_s,
        "method": ("median/p20/p80 over timed steps after one warm-up step (which packs the modules); step time is "
                   "host wall time with a device sync per step; teacher time from CUDA events on the compute "
                   "stream; peak memory is torch.cuda.max_memory_allocated over the timed steps; copy time from "
                   "the manager's CUDA events on its copy stream"),
        "runs": runs,
    }
    plan = [(m, None) for m in modes]
    if args.auto_budget_gib is not None and not quick:
        budget = int(args.auto_budget_gib * 2**30)
        plan.append(("auto", lambda: max(0, budget - torch.cuda.memory_allocated(device))))
    # written after each mode, so that a time limit or a failing mode keeps the modes measured before it
    for mode, probe in plan:
        try:
            res, f = run_mode(mode, vae, enc, latents, dit, args, device, emulate, probe)
        except Exception as exc:  # e.g. out of memory in one mode: recorded, and the next mode runs
            runs.append({"mode": mode, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            print(f"{mode:>16}: {runs[-1]['error']}", flush=True)
            _write(result, args.out)
            continue
        if probe is not None:
            res["mode"] = f"auto@{args.auto_budget_gib}GiB"
            res["simulated_budget_bytes"] = int(args.auto_budget_gib * 2**30)
        feats[res["mode"]] = f.float().cpu()
        del f  # the next mode's peaks must not include this mode's features (37.8 MB at the default shape)
        runs.append(res)
        ref = feats.get("resident", next(iter(feats.values())))
        for r in runs:
            if r["mode"] in feats:
                r["features_max_abs_diff_vs_first"] = float((feats[r["mode"]] - ref).abs().max())
        print(f"{res['mode']:>16}: step {res['step_ms']['median']:.1f} ms, "
              f"peak {(res['peak_allocated_bytes'] or 0) / 2**30:.2f} GiB "
              f"(DiT backward {(res['peak_allocated_dit_backward_bytes'] or 0) / 2**30:.2f} GiB), "
              f"moved {res['bytes_to_device_per_step'] / 2**30:.2f} GiB/step, "
              f"copy {res['copy_ms_per_step']:.1f} ms/step", flush=True)
        _write(result, args.out)
    _write(result, args.out)
    return result


def _write(result: dict, out) -> None:
    """The report so far, replaced atomically (a kill mid-write keeps the previous one)."""
    if out:
        write_atomic(out, json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["runs"]) else 0)  # a failed mode fails the command
