"""The autoencoder trainer: ``python -m train`` (kl-f8, the MLP VAE) and ``python -m train.distill``."""
