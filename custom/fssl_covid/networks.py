"""Network factory: MONAI segmentation networks chosen by configuration.

``build_network`` is also what the FLARE server's ``PTFileModelPersistor`` instantiates (job config
``"model": {"path": "fssl_covid.networks.build_network", "args": {...}}``), so server and sites build
exactly the same architecture from the same arguments.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from monai.utils import set_determinism


class _DynUNet(DynUNet):
    """MONAI's DynUNet, minus one habit: it keeps its deep supervision heads' last feature maps on the module
    (``self.heads``), which holds their memory between steps and makes a trained model impossible to
    ``copy.deepcopy`` (non-leaf tensors; MONAI issue #6442). Here they are let go after each forward."""

    def forward(self, x):
        try:
            return super().forward(x)
        finally:
            for i in range(len(self.heads)):  # the list object is shared with the skip layers: replace in place
                self.heads[i] = None


def build_network(
    name: str = "unet",
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    deep_supervision: int = 0,
) -> torch.nn.Module:
    """Build a MONAI U-Net, DynUNet or SegResNet that outputs ``out_channels`` logits per voxel.

    U-Net and DynUNet use ``channels``/``strides``/``num_res_units``; SegResNet uses ``init_filters``/``blocks_down``.
    DynUNet (nnU-Net's architecture) keeps a first level at full resolution (MONAI's U-Net downsamples in its first
    convolution), with 3-wide kernels, residual blocks when ``num_res_units`` > 0, and ``deep_supervision`` extra
    output heads at coarser levels while training (0: none; see :func:`output_heads`).
    Widths are configurable so CPU tests use a tiny model and a GPU site a full one.
    """
    if name in ("unet", "dynunet") and len(strides) != len(channels) - 1:
        raise ValueError(f"{name} needs len(strides) == len(channels) - 1, got {list(channels)} / {list(strides)}")
    if deep_supervision and name != "dynunet":
        raise ValueError(f"deep_supervision needs network 'dynunet', not '{name}'")
    if name == "dynunet":  # MONAI checks the number of heads against the levels
        return _DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * len(channels),
            strides=[1, *strides],
            upsample_kernel_size=list(strides),
            filters=list(channels),
            norm_name=norm,
            dropout=dropout or None,
            deep_supervision=deep_supervision != 0,
            deep_supr_num=deep_supervision or 1,
            res_block=num_res_units > 0,
        )
    if name == "unet":
        return UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
            dropout=dropout,
        )
    if name == "segresnet":
        return SegResNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=init_filters,
            blocks_down=tuple(blocks_down),
            norm=norm,
            dropout_prob=dropout or None,
        )
    raise ValueError(f"unknown network '{name}' (use 'unet', 'dynunet' or 'segresnet')")


def output_heads(out: torch.Tensor, inputs: torch.Tensor) -> list[torch.Tensor]:
    """A network's output as a list of heads, the full-size main head first.  A deeply supervised DynUNet in
    training mode stacks its heads on dim 1, each already resized to the input's size: ``(B, heads, C, *spatial)``;
    every other output is one head."""
    return list(out.unbind(dim=1)) if out.dim() == inputs.dim() + 1 else [out]


def main_output(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The full-size main head of ``out`` (see :func:`output_heads`)."""
    return output_heads(out, inputs)[0]


def size_divisor(network: Mapping) -> int:
    """What a whole-image input's every side must be a multiple of for the network's skip connections to line up:
    the product of a U-Net's strides, 2 ** (levels - 1) for a SegResNet."""
    if network["name"] == "segresnet":
        return 2 ** (len(network["blocks_down"]) - 1)
    return int(math.prod(int(s) for s in network["strides"]))


def initial_network(network: Mapping, seed: int) -> torch.nn.Module:
    """The network as training starts from it at ``seed``: the global RNGs seeded (MONAI's ``set_determinism``),
    then built.  A trainer builds its model with this, and the experiment runner gives FLARE's server the same
    weights as a federated run's initial global model, so every method of one seed starts from one network."""
    set_determinism(seed=int(seed))
    return build_network(**network)


def weights_mismatch(weights: Mapping, expected: Mapping) -> str | None:
    """Why ``weights`` (tensors or arrays by name) cannot be loaded into a network whose state dict is
    ``expected``: missing or unexpected keys, or the first weight of another shape; None when they fit."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for k, v in weights.items():
        shape = tuple(v.shape)
        if shape != tuple(expected[k].shape):
            return f"weight '{k}' has shape {shape}, the network expects {tuple(expected[k].shape)}"
    return None
