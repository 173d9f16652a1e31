"""Pyro programs built from the components: the VAE, the semi-supervised M2 and M1+M2, the
ADGM, and the conditional VAE with its baseline."""

from .adgm import ADGM  # registers --model adgm
from .base import PyroProgram
from .cvae import CVAE, CVAEBaseline  # registers --model cvae and cvae-baseline
from .kinds import build, model_kinds, prepare, register
from .ssvae import M1M2, SSVAE
from .vae import VAE

__all__ = [
    "ADGM", "CVAE", "CVAEBaseline", "M1M2", "PyroProgram", "SSVAE", "VAE", "build",
    "model_kinds", "prepare", "register",
]  # fmt: skip
