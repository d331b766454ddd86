"""End-to-end CREPA step: decode + encode + loss forward/backward, our path against the reference path.

Ours: the VAE decodes, only the frames temporal alignment keeps are encoded (DINOv2 in bf16 on a
GPU), the fused loss runs in grid mode, and the VAE and encoder wait in pinned RAM between uses.
Ours with cached features: the teacher's features come precomputed (as from a FeatureCache), so
the step is the loss alone.
Reference (the common trainer's order of work): the same decode, every decoded frame encoded in
fp32, then the frames subsampled, and the eager PyTorch loss. Both use the same random weights
(timm `vit_giant_patch14_dinov2` at 518 px, diffusers `AutoencoderKLWan` default config) and the
same latents, at the wan480 preset (DiT grid 30x52, D = 1536). Then the decode alone, the largest
part of both paths, under other cuDNN and memory-format settings (`decode_settings`), to see whether
our teacher path could decode faster, and our whole step once more with the VAE's Conv3d weights
channels-last (`crepa_vae_channels_last`), with how far its loss moves. Needs diffusers. `--quick`
runs tiny models on the CPU as a smoke test (not a performance figure).

    python bench/bench_step.py --out bench/results/step.json [--latent-frames 21] [--steps 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crepa_kernels import crepa_loss  # noqa: E402
from crepa_kernels.benchmark import environment, write_atomic  # noqa: E402
from crepa_kernels.teacher import DinoEncoder, adapter_for, channels_last_3d, latents_to_features  # noqa: E402
from crepa_kernels.teacher.offload import OffloadManager  # noqa: E402


def build(quick: bool, device):
    import diffusers
    import timm

    vae_kw = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1) if quick else {}
    vae = diffusers.AutoencoderKLWan(**vae_kw).eval().requires_grad_(False)
    vae.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    name, size = ("vit_small_patch14_dinov2", 56) if quick else ("vit_giant_patch14_dinov2", 518)
    extra = dict(depth=2, embed_dim=48, num_heads=2) if quick else {}
    with torch.device(device if device.type == "cuda" else "cpu"):
        vit = timm.create_model(name, pretrained=False, img_size=size, num_classes=0, **extra).eval()
    return vae, vit, size


def reference_step(vae_adapter, ref_encoder, latents, hidden):
    """All frames decoded and encoded in fp32, subsampled afterwards, eager loss (compatible mode)."""
    with torch.no_grad():
        frames = vae_adapter.decode(latents).float()  # (B, T_pix, 3, H, W)
        feats = ref_encoder.encode(frames)
    out = crepa_loss(hidden, feats, weight=0.5, backend="torch")  # picks the kept frames itself
    out.loss.backward()
    return out.loss.detach()


class Phases:
    """Start/end marks of named phases per call: CUDA events on a GPU (read after the step's sync),
    perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.calls = cuda, []

    def new_call(self) -> dict:
        self.calls.append({})
        return self.calls[-1]

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def medians(self, skip: int) -> dict:
        """Median ms per phase over the calls after the first ``skip`` (the warm-up)."""
        calls = self.calls[skip:]
        return {name: statistics.median(self._ms(*c[name]) for c in calls) for name in (calls[0] if calls else {})}


def our_step(vae_adapter, encoder, manager, latents, hidden, grid, phases=None):
    vae = vae_adapter.vae
    marks = phases.new_call() if phases is not None else None

    @contextlib.contextmanager
    def vae_ctx():
        with manager.use(vae):
            manager.prefetch(encoder)
            start = phases.mark() if marks is not None else None
            yield
            if marks is not None:
                marks["decode_ms"] = (start, phases.mark())
        # leaving use() applied the offload mode: the VAE's device copy is gone before the encoder runs

    @contextlib.contextmanager
    def encoder_ctx():
        with manager.use(encoder):
            start = phases.mark() if marks is not None else None
            yield
            if marks is not None:
                marks["encode_ms"] = (start, phases.mark())

    feats, fgrid = latents_to_features(latents, vae_adapter, encoder, num_frames=hidden.shape[1],
                                       vae_context=vae_ctx, encoder_context=encoder_ctx)
    start = phases.mark() if marks is not None else None
    out = crepa_loss(hidden, feats, projected_grid=grid, features_grid=fgrid, weight=0.5)
    out.loss.backward()
    if marks is not None:
        marks["loss_fwd_bwd_ms"] = (start, phases.mark())
    return out.loss.detach()


@contextlib.contextmanager
def decode_setting(vae, name: str):
    """One way of running the decode: ``default`` (as configured), ``cudnn_benchmark`` (cuDNN times
    its convolution algorithms per shape and keeps the fastest), ``channels_last_3d`` (the VAE's
    weights and the latents in NDHWC, cuDNN's native layout for half-precision 3-D convolutions), or
    both. Every setting is undone on exit."""
    cudnn = torch.backends.cudnn
    flags = dict(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                 allow_tf32=cudnn.allow_tf32)
    if "cudnn_benchmark" in name:
        flags["benchmark"] = True
    channels_last = "channels_last_3d" in name
    # Only the 5-D (Conv3d) weights: the VAE's 2-D convolutions cannot take a 3-D layout. Run inside
    # the offload manager's use(): the re-laid-out weights are new device tensors outside its buffer
    # until exit gives every weight its own data back (the manager's views, which it checks are
    # still there when the VAE leaves the device).
    weights = [p for p in vae.parameters() if p.dim() == 5] if channels_last else []
    originals = [w.data for w in weights]
    with cudnn.flags(**flags):
        for w in weights:
            w.data = w.data.contiguous(memory_format=torch.channels_last_3d)
        try:
            yield channels_last
        finally:
            for w, data in zip(weights, originals):
                w.data = data


DECODE_SETTINGS = ("default", "cudnn_benchmark", "channels_last_3d", "channels_last_3d+cudnn_benchmark")


def decode_settings(adapter, latents, device, reps: int = 2) -> dict:
    """Median ms of the decode alone under each of DECODE_SETTINGS (after one warm-up decode, which
    includes cuDNN's algorithm search where it applies), and the largest difference of its frames from
    the default setting's: a faster decode our teacher path could adopt must give the same frames up
    to the VAE dtype's rounding."""
    cuda = device.type == "cuda"
    rows, first = {}, None
    for name in DECODE_SETTINGS:
        with decode_setting(adapter.vae, name) as channels_last:
            z = latents.contiguous(memory_format=torch.channels_last_3d) if channels_last else latents
            frames = adapter.decode(z)  # warm-up
            times = []
            for _ in range(reps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                frames = adapter.decode(z)
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
        frames = frames.float()
        if first is None:
            first = frames
        rows[name] = {"median_ms": statistics.median(times), "reps": reps,
                      "max_abs_diff_vs_default": (frames - first).abs().max().item()}
        del frames
    return rows


def timed(fn, device, steps):
    cuda = device.type == "cuda"
    fn()  # warm-up: compiles kernels, packs the offloaded modules
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    q = sorted(times)
    return {"median_ms": statistics.median(q), "p20_ms": q[int(0.2 * (len(q) - 1))],
            "p80_ms": q[int(round(0.8 * (len(q) - 1)))], "steps": steps,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--latent-frames", type=int, default=21, help="21 latent frames = 81 video frames (wan480)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--frames-batch", type=int, default=8, help="encoder frames per pass, both paths")
    ap.add_argument("--no-decode-settings", action="store_true",
                    help="skip timing the decode alone under other cuDNN / memory-format settings")
    ap.add_argument("--no-channels-last", action="store_true",
                    help="skip our step with the VAE's Conv3d weights channels-last")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    vae, vit, image_size = build(args.quick, device)
    adapter = adapter_for(vae)
    lat_hw = (4, 4) if args.quick else (60, 104)  # 480x832 pixels
    grid = (2, 2) if args.quick else (30, 52)  # Wan's 1x2x2 patches
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, adapter.latent_channels, args.latent_frames, *lat_hw, generator=g).to(device)
    dim = vit.embed_dim
    hidden = torch.randn(1, args.latent_frames, grid[0] * grid[1], dim, generator=g).to(device).requires_grad_(True)

    # On the CPU (--quick) the manager emulates a device, so the offload bookkeeping runs there too.
    manager = OffloadManager("offload", device=device if device.type == "cuda" else None,
                             emulate_device=device.type != "cuda")
    if device.type == "cuda":
        vae.to(device)
        vit.to(device)

    rows = {}
    report = {"benchmark": "crepa step (decode + encode + loss fwd/bwd)", "environment": environment(device),
              "latent_shape": list(latents.shape), "pixel_frames": adapter.pixel_frames(args.latent_frames),
              "encoded_frames": {"reference": adapter.pixel_frames(args.latent_frames), "ours": args.latent_frames},
              "dit_grid": list(grid), "image_size": image_size, "quick": args.quick, "results": rows}

    def write():
        """The report so far, replaced atomically: a time limit keeps every row measured before it."""
        if "ours" in rows and "median_ms" in rows["ours"] and "median_ms" in rows.get("reference", {}):
            rows["speedup"] = rows["reference"]["median_ms"] / rows["ours"]["median_ms"]
        cached_row = rows.get("ours_cached_features", {})
        if "median_ms" in cached_row and "median_ms" in rows.get("reference", {}):
            rows["speedup_cached"] = rows["reference"]["median_ms"] / cached_row["median_ms"]
        if args.out:
            write_atomic(args.out, json.dumps(report, indent=2))

    def attempt(name, run):
        """rows[name] = run(), or the error it raised (recorded, not raised: the next row still runs)."""
        try:
            rows[name] = run()
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        write()

    # The reference first, with the weights in fp32; then the same weights cast once to our dtype.
    ref_encoder = DinoEncoder(model=vit, image_size=image_size, dtype=torch.float32,
                              frames_batch_size=args.frames_batch)
    attempt("reference", lambda: timed(lambda: reference_step(adapter, ref_encoder, latents, hidden), device,
                                       args.steps))
    encoder = DinoEncoder(model=vit, image_size=image_size, frames_batch_size=args.frames_batch,
                          dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    phases = Phases(device.type == "cuda")

    def ours():
        row = timed(lambda: our_step(adapter, encoder, manager, latents, hidden, grid, phases), device, args.steps)
        # Where our step's time goes: the decode (its weights already copied in), the encode of the kept
        # frames, the loss; the rest of the step is waiting for copies and host work between them.
        row["phases_ms"] = phases.medians(skip=1)
        return row

    attempt("ours", ours)

    def cached():
        # Features from a FeatureCache: the teacher is skipped and the step costs only the loss.
        # The modules sit in host RAM after our step: place them for this one pass too.
        with torch.no_grad():
            feats, feats_grid = latents_to_features(latents, adapter, encoder, num_frames=hidden.shape[1],
                                                    vae_context=lambda: manager.use(vae),
                                                    encoder_context=lambda: manager.use(encoder))
        manager.evict_all()

        def cached_step():
            out = crepa_loss(hidden, feats, projected_grid=grid, features_grid=feats_grid, weight=0.5)
            out.loss.backward()

        return timed(cached_step, device, args.steps)

    attempt("ours_cached_features", cached)
    manager.evict_all()
    # The decode is the largest part of both paths; how much faster it can run, measured on its own.
    if not args.no_decode_settings:
        try:
            with manager.use(vae):
                rows["decode_settings"] = decode_settings(adapter, latents, device)
        except Exception as exc:  # recorded, not raised: the step figures are the benchmark's point
            rows["decode_settings"] = {"error": f"{type(exc).__name__}: {exc}"}
        manager.evict_all()
        write()
    # Our step again with crepa_vae_channels_last: the VAE leaves the manager, its Conv3d weights are
    # laid out channels-last, and the next use packs it again in that layout. Its loss next to the
    # default layout's (same inputs) shows what the other convolution algorithms change.
    if not args.no_channels_last:
        def step_loss():
            return our_step(adapter, encoder, manager, latents, hidden, grid).item()

        try:
            loss_default = step_loss()
            manager.unregister(vae)
            relaid = channels_last_3d(vae)
            row = timed(step_loss, device, args.steps)
            loss_cl = step_loss()
            row.update(conv3d_weights_relaid=relaid, loss=loss_cl, loss_default_layout=loss_default,
                       loss_abs_diff_vs_default_layout=abs(loss_cl - loss_default))
            rows["ours_channels_last"] = row
            if "median_ms" in rows["reference"]:
                rows["speedup_channels_last"] = rows["reference"]["median_ms"] / row["median_ms"]
        except Exception as exc:  # recorded, not raised, as above
            rows["ours_channels_last"] = {"error": f"{type(exc).__name__}: {exc}"}
        manager.evict_all()
        write()
    print(json.dumps(rows, indent=2))
    return 1 if any("error" in rows[k] for k in ("reference", "ours", "ours_cached_features")) else 0


if __name__ == "__main__":
    sys.exit(main())
