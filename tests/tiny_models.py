"""Tiny random-weight models that several test modules build."""
import torch


def tiny_ltx_vae(timestep_conditioning=False, scaling_factor=2.0, inject_noise=False):
    """A tiny random LTX-Video VAE (8 latent channels) with random per-channel latent statistics."""
    import diffusers

    torch.manual_seed(11)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8,
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, True, True, False, False) if inject_noise else (False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=timestep_conditioning, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False, scaling_factor=scaling_factor,
    ).eval()
    g = torch.Generator().manual_seed(12)
    vae.latents_mean.copy_(torch.randn(8, generator=g))
    vae.latents_std.copy_(torch.rand(8, generator=g) + 0.5)
    return vae
