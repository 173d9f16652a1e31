"""Encoder and decoder networks, selected by name like every other component.

An architecture builder returns ``(encoder, decoder)``: the encoder maps a batch
of flattened images ``(B, D)`` to the guide's parameters, the decoder maps latent
codes ``(..., L)`` (any leading particle and batch dims) to the likelihood's
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PyroVAEError
from ..registry import Registry

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


def _halved(n: int) -> int:
    return (n + 1) // 2


class ConvEncoder(nn.Module):
    """Two stride-2 3x3 convolutions (32, 64 channels), then an MLP to the guide's parameters."""

    def __init__(self, image_shape: Sequence[int], hidden: Sequence[int], out: int):
        super().__init__()
        self.image_shape = tuple(image_shape)
        h, w = (_halved(_halved(n)) for n in self.image_shape)
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1),
            nn.Softplus(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.Softplus(),
            nn.Flatten(),
        )
        self.head = mlp([64 * h * w, *hidden, out])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        features = self.convs(x.reshape(-1, 1, *self.image_shape))
        return self.head(features).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """An MLP to a 64-channel quarter-size map, then two (upsample, 3x3 conv) stages.

    Nearest upsampling to exact sizes handles any image size, odd ones included;
    the last convolution emits one channel per likelihood parameter per pixel,
    flattened channel by channel to match the likelihoods' ``chunk`` layout.
    """

    def __init__(
        self, image_shape: Sequence[int], hidden: Sequence[int], latent_dim: int, out: int
    ):
        super().__init__()
        H, W = image_shape
        if out % (H * W):
            raise ValueError(f"decoder output {out} is not a whole number of {H}x{W} maps")
        self.latent_dim = latent_dim
        self.h, self.w = _halved(_halved(H)), _halved(_halved(W))
        self.head = nn.Sequential(
            mlp([latent_dim, *reversed(hidden), 64 * self.h * self.w]), nn.Softplus()
        )
        self.up = nn.Sequential(
            nn.Upsample(size=(_halved(H), _halved(W))),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.Softplus(),
            nn.Upsample(size=(H, W)),
            nn.Conv2d(32, out // (H * W), 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        maps = self.head(z.reshape(-1, self.latent_dim)).reshape(-1, 64, self.h, self.w)
        return self.up(maps).reshape(*lead, -1)


@architectures.register("conv")
def build_conv(
    image_shape: Sequence[int],
    hidden: Sequence[int],
    latent_dim: int,
    encoder_out: int,
    decoder_out: int,
) -> tuple[nn.Module, nn.Module]:
    """Small convolutional encoder/decoder for 1-channel images of any size (8x8, 28x28, ...)."""
    if len(image_shape) != 2:
        raise PyroVAEError(f"arch 'conv' needs 2-D images, got shape {tuple(image_shape)}")
    return (
        ConvEncoder(image_shape, hidden, encoder_out),
        ConvDecoder(image_shape, hidden, latent_dim, decoder_out),
    )
