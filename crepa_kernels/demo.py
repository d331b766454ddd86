"""The built-in demo: a short CREPA fine-tune of a tiny Wan transformer on a synthetic moving clip.

Everything is built here with random weights (no downloads): a tiny diffusers Wan VAE, a tiny Wan
transformer trained with flow matching to denoise the clip's latents, and a tiny DINOv2 teacher.
The loop is the one a trainer writes to add CREPA: capture a block's hidden states, decode and
encode the teacher features (VAE and encoder managed by the offload manager), add the CREPA loss.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ._plotting import headless_pyplot


def moving_clip(frames: int = 9, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(1, 3, frames, size, size) in [-1, 1]: a bright disk crossing a striped, tinted background."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    tint = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
    video = []
    for t in range(frames):
        cx = 0.15 + 0.7 * t / max(frames - 1, 1)
        cy = 0.5 + 0.2 * math.sin(2 * math.pi * t / frames)
        disk = torch.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / 0.01))
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * (6 * x + 0.1 * t))
        frame = tint * (0.6 * stripes) + torch.tensor([1.0, 0.9, 0.2]).view(3, 1, 1) * disk
        video.append(frame.clamp(0, 1) * 2 - 1)
    return torch.stack(video, dim=1).unsqueeze(0)


def _tiny_models(seed: int):
    import diffusers
    import timm

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval().requires_grad_(False)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=3, rope_max_seq_len=32)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=70, num_classes=0, depth=2,
                            embed_dim=48, num_heads=2)
    with torch.no_grad():  # layer scale starts near zero; give the random teacher some structure
        for p in vit.parameters():
            p.normal_(0.0, 0.1)
    return vae, transformer, vit.eval()


def run_demo(out_dir: str = "crepa-demo", steps: int = 100, seed: int = 0, device: Optional[str] = None,
             progress: bool = True, lr: float = 2e-3) -> dict:
    from tqdm.auto import tqdm

    from . import CrepaConfig, CrepaLoss, info
    from .integrations import capture_hidden_states
    from .teacher import DinoEncoder, adapter_for, latents_to_features
    from .teacher.offload import OffloadManager

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out_dir, exist_ok=True)
    vae, transformer, vit = _tiny_models(seed)
    transformer.to(device)
    encoder = DinoEncoder(model=vit, frames_batch_size=8,
                          dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    adapter = adapter_for(vae)
    offload = OffloadManager("offload", device=device if device.type == "cuda" else None)

    # Training latents of the clip (normalised the Wan way: mean 0, std 1 here).
    with torch.no_grad():
        latents = vae.encode(moving_clip(seed=seed)).latent_dist.mode().to(device)  # (1, 4, 3, 8, 8)
    text = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(seed)).to(device)

    config = CrepaConfig(enabled=True, block_index=1, lambda_=0.5, adjacent_distance=1, adjacent_tau=1.0,
                         scheduler="cosine", warmup_steps=max(steps // 10, 1), lambda_end=0.1, offload="offload")
    crepa = CrepaLoss(config, hidden_size=transformer.config.num_attention_heads * transformer.config.attention_head_dim,
                      encoder_dim=encoder.embed_dim, max_train_steps=steps).to(device)
    opt = torch.optim.AdamW(list(transformer.parameters()) + list(crepa.parameters()), lr=lr)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)

    history = []
    start = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="crepa demo", unit="step")
    for step in bar:
        # The teacher: decode the clean latents, encode the frames the loss keeps, on/off the device.
        with torch.no_grad():
            feats, feat_grid = latents_to_features(
                latents, adapter, encoder, num_frames=latents.shape[2],
                vae_context=lambda: offload.use(vae), encoder_context=lambda: offload.use(encoder))
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.rand(1, generator=g).to(device)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise
        with capture_hidden_states(transformer, config.block_index) as cap:
            pred = transformer(noisy, (t * 1000), text).sample
        denoise = F.mse_loss(pred.float(), (noise - latents).float())
        loss_crepa, logs = crepa(cap.hidden, feats, step=step, hidden_grid=cap.grid, feature_grid=feat_grid)
        total = denoise if loss_crepa is None else denoise + loss_crepa
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        row = {"step": step, "denoise_loss": float(denoise.detach()),
               "crepa_loss": float(logs["crepa_loss"]),
               "crepa_alignment_score": float(logs.get("crepa_alignment_score", float("nan"))),
               "crepa_weight": float(logs["crepa_weight"])}
        history.append(row)
        bar.set_postfix(crepa_loss=f"{row['crepa_loss']:.4f}", crepa_alignment_score=f"{row['crepa_alignment_score']:.4f}")
    seconds = time.perf_counter() - start

    scored = [r for r in history if not math.isnan(r["crepa_alignment_score"])]
    weighted = [r for r in scored if r["crepa_weight"] > 0]  # crepa_loss is 0.0 where the weight is
    summary = {
        "steps": steps, "seconds": round(seconds, 3), "device": str(device),
        "crepa_loss_first": weighted[0]["crepa_loss"], "crepa_loss_last": weighted[-1]["crepa_loss"],
        "alignment_score_first": scored[0]["crepa_alignment_score"],
        "alignment_score_last": scored[-1]["crepa_alignment_score"],
        "denoise_loss_first": history[0]["denoise_loss"], "denoise_loss_last": history[-1]["denoise_loss"],
        "backend": info()["last_call"], "offload": offload.stats.__dict__ if hasattr(offload.stats, "__dict__") else None,
        "history": history,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    summary["plot"] = _plot(history, os.path.join(out_dir, "curves.png"))
    return summary


def _plot(history: list, path: str) -> Optional[str]:
    plt = headless_pyplot()
    if plt is None:
        return None
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(steps, [r["crepa_loss"] for r in history], label="crepa_loss")
    axes[0].set_title("crepa_loss (scheduled weight applied)")
    axes[1].plot(steps, [r["crepa_alignment_score"] for r in history], color="tab:green")
    axes[1].set_title("crepa_alignment_score")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
