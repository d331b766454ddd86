"""The README's training-loop recipe, run as written with tiny random models, for several steps.

The offload manager also runs in its emulated mode (real packing and re-pointing on the CPU), which
is where a teacher that changed its own weights after being handed over used to fail at step 2.
"""
import pytest
import torch

from crepa_kernels import CrepaConfig, CrepaLoss
from crepa_kernels.integrations import capture_hidden_states, transformer_info
from crepa_kernels.teacher import DinoEncoder, adapter_for, latents_to_features
from crepa_kernels.teacher.offload import OffloadManager

diffusers = pytest.importorskip("diffusers")
timm = pytest.importorskip("timm")


@pytest.mark.parametrize("offload_kw", [{}, {"mode": "auto", "emulate_device": True},
                                        {"mode": "offload", "emulate_device": True}], ids=["plain", "auto", "offload"])
def test_readme_training_loop_runs_for_several_steps(offload_kw):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                                  ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, depth=1,
                            embed_dim=32, num_heads=2)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    device, max_steps = "cpu", 3

    # --- as in the README (the encoder wraps a tiny model instead of loading weights) ---
    config = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 1, "crepa_lambda": 0.5})
    encoder = DinoEncoder(model=vit)
    vae.requires_grad_(False)
    vae_adapter = adapter_for(vae)
    offload = OffloadManager(**offload_kw) if offload_kw else OffloadManager(config.offload)
    crepa = CrepaLoss(config, hidden_size=transformer_info(transformer).hidden_size,
                      encoder_dim=encoder.embed_dim, max_train_steps=max_steps).to(device)
    optimizer.add_param_group({"params": crepa.parameters()})

    seen = []
    for step in range(max_steps):
        latents = torch.randn(1, 4, 3, 4, 6)
        noisy_latents, timesteps, text_embeds = latents + 0.1 * torch.randn_like(latents), torch.tensor([500]), \
            torch.randn(1, 3, 16)
        with capture_hidden_states(transformer, config.block_index) as cap:
            pred = transformer(noisy_latents, timesteps, text_embeds).sample
        diffusion_loss = (pred - latents).pow(2).mean()
        feats, feat_grid = latents_to_features(latents, vae_adapter, encoder,
                                               num_frames=cap.grid[0],
                                               vae_context=lambda: offload.use(vae),
                                               encoder_context=lambda: offload.use(encoder))
        crepa_term, logs = crepa(cap.hidden, feats, step=step, hidden_grid=cap.grid, feature_grid=feat_grid)
        loss = diffusion_loss + (crepa_term if crepa_term is not None else 0)
        # --- end of the README's loop body ---
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert crepa_term is not None and torch.isfinite(crepa_term)
        assert crepa.projector[1].weight.grad is not None
        seen.append(feats)
    assert feats.shape == (1, 3, 16, 32) and feat_grid == (4, 4)
    assert all(f.shape == seen[0].shape for f in seen)
    if offload_kw:  # the emulated manager really packed both teacher modules and moved them
        stats = offload.stats
        assert stats.host_bytes > 0 and stats.bytes_to_device > 0
