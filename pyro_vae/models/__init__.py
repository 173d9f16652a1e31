"""Pyro programs built from the components: the VAE (and, later, semi-supervised models)."""

from .vae import VAE

__all__ = ["VAE"]
