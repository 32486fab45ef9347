"""Hand-made topologies shared by the network tests."""

from __future__ import annotations

from autoseg.networks.topology import UNetTopology


def make(ndim: int, features: tuple[int, ...], *, block: str = "plain", strides=None, kernels=None,
         blocks=None, decoder=None) -> UNetTopology:
    """A checked topology: stride 2 after the first stage, 3-kernels and two convs per stage unless given."""
    n = len(features)
    return UNetTopology(strides=strides or ((1,) * ndim,) + ((2,) * ndim,) * (n - 1),
                        kernel_sizes=kernels or ((3,) * ndim,) * n, features_per_stage=features,
                        n_blocks_per_stage=blocks or (2,) * n, n_conv_per_stage_decoder=decoder or (2,) * (n - 1),
                        block=block).check()
