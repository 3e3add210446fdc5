"""Sampling, the synthesis pipeline, generation, latent cache and mask sources."""
