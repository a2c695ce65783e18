"""The latent diffusion trainer: ``python -m train.ldm`` on latents made by ``vae-codec compress``."""
