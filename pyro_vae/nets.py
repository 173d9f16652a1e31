"""Encoder and decoder networks, selected by name like every other component.

An architecture builder returns ``(encoder, decoder)``: the encoder maps a batch
of flattened images ``(B, D)`` to the guide's parameters, the decoder maps latent
codes ``(..., L)`` (any leading particle and batch dims) to the likelihood's
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import Registry

architectures = Registry("architecture")


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with softplus between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(nn.Softplus())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


@architectures.register("mlp")
def build_mlp(
    image_shape: Sequence[int],
    hidden: Sequence[int],
    latent_dim: int,
    encoder_out: int,
    decoder_out: int,
) -> tuple[nn.Module, nn.Module]:
    """Fully connected encoder D -> hidden -> guide params and mirrored decoder."""
    data_dim = 1
    for n in image_shape:
        data_dim *= n
    encoder = mlp([data_dim, *hidden, encoder_out])
    decoder = mlp([latent_dim, *reversed(hidden), decoder_out])
    return encoder, decoder
