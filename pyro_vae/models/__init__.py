"""Pyro programs built from the components: the VAE, the semi-supervised M2 and M1+M2, and
the ADGM."""

from .adgm import ADGM  # registers --model adgm
from .base import PyroProgram
from .kinds import build, model_kinds, prepare, register
from .ssvae import M1M2, SSVAE
from .vae import VAE

__all__ = [
    "ADGM", "M1M2", "PyroProgram", "SSVAE", "VAE", "build", "model_kinds", "prepare", "register"
]  # fmt: skip
