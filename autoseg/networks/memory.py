"""Analytic memory estimate of a U-Net, computed from its topology without building the network.

:func:`feature_map_elements` is the planner's yardstick: the number of elements (channels x voxels, batch
size 1) of every convolution output in the encoder and decoder, every transposed-convolution output and the
final segmentation head (deep supervision off). It reproduces nnU-Net v2's
``compute_conv_feature_map_size`` exactly, so the reference budgets (560e6 3D / 85e6 2D at 8 GB) apply:

>>> from autoseg.networks.topology import UNetTopology
>>> topo = UNetTopology(strides=((1, 1, 1),) + ((2, 2, 2),) * 5, kernel_sizes=((3, 3, 3),) * 6,
...                     features_per_stage=(32, 64, 128, 256, 320, 320), n_blocks_per_stage=(2,) * 6,
...                     n_conv_per_stage_decoder=(2,) * 5)
>>> feature_map_elements(topo, (128, 128, 128), num_classes=3)
452796416

:func:`estimate_training_bytes` turns that count into a rough number of bytes for one training step, to be
compared with measured peak memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from autoseg.errors import PlanningError
from autoseg.networks.topology import UNetTopology


def _stage_sizes(topology: UNetTopology, patch_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Spatial size of each encoder stage's output (floor division by the strides, as the convs do)."""
    if len(patch_size) != topology.ndim:
        raise PlanningError(f"patch_size={tuple(patch_size)} has {len(patch_size)} axes but the topology is "
                            f"{topology.ndim}D; give one size per axis.")
    sizes = []
    current = tuple(int(v) for v in patch_size)
    for stride in topology.strides:
        current = tuple(c // s for c, s in zip(current, stride, strict=True))
        sizes.append(current)
    return sizes


def feature_map_elements(topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int) -> int:
    """Sum of the element counts of the network's conv outputs for one sample (nnU-Net's VRAM proxy).

    Counted: every conv output of the encoder (for residual blocks: both convs and, where input and output
    differ in size or channels, the skip-path output; plus the stem conv), every decoder conv output,
    every transposed-conv output and one segmentation head at full resolution. Not counted: norms,
    nonlinearities, concatenations. Input channels do not enter (the first conv's *output* is counted).

    Args:
        topology: the network's stages.
        patch_size: input patch, one size per axis.
        num_classes: output channels of the segmentation head.

    Returns:
        The element count (an exact integer).

    Raises:
        PlanningError: the patch has the wrong number of axes.
    """
    sizes = _stage_sizes(topology, patch_size)
    feats = topology.features_per_stage
    total = 0
    if topology.block == "residual":
        total += feats[0] * prod(sizes[0])  # stem: one conv at full resolution
    in_ch = feats[0]
    for i, (size, f, nb) in enumerate(zip(sizes, feats, topology.n_blocks_per_stage, strict=True)):
        voxels = prod(size)
        if topology.block == "plain":
            total += nb * f * voxels
        else:
            strided = any(s != 1 for s in topology.strides[i])
            projection = 1 if (strided or in_ch != f) else 0
            total += (2 * nb + projection) * f * voxels
        in_ch = f
    for s in range(topology.n_stages - 2, -1, -1):  # decoder, deepest first, at the size of encoder stage s
        voxels = prod(sizes[s])
        total += (topology.n_conv_per_stage_decoder[s] + 1) * feats[s] * voxels  # convs + transposed conv
    total += num_classes * prod(sizes[0])
    return int(total)


def count_parameters(topology: UNetTopology, *, in_channels: int, num_classes: int) -> int:
    """Number of trainable parameters (conv weights and biases, instance-norm affine parameters).

    The decoder has one 1x1 segmentation head per stage (as built, whether or not deep supervision is on).
    A residual block whose channels change has a 1x1 skip projection (no bias) with a norm; a stride alone
    is handled by average pooling on the skip path (no parameters, but its output is counted by
    :func:`feature_map_elements`).

    Args:
        topology: the network's stages.
        in_channels: input image channels.
        num_classes: output channels.

    Returns:
        The parameter count.
    """
    feats = topology.features_per_stage

    def conv(cin: int, cout: int, kernel: Sequence[int], bias: bool = True, norm: bool = True) -> int:
        return cin * cout * prod(kernel) + (cout if bias else 0) + (2 * cout if norm else 0)

    total = 0
    prev = in_channels
    if topology.block == "residual":
        total += conv(in_channels, feats[0], topology.kernel_sizes[0])
        prev = feats[0]
    for kernel, f, nb in zip(topology.kernel_sizes, feats, topology.n_blocks_per_stage, strict=True):
        for _ in range(nb):
            if topology.block == "plain":
                total += conv(prev, f, kernel)
            else:
                total += conv(prev, f, kernel) + conv(f, f, kernel)
                if prev != f:  # a stride alone is undone by average pooling, which has no parameters
                    total += conv(prev, f, (1,) * topology.ndim, bias=False)
            prev = f
    for s in range(topology.n_stages - 2, -1, -1):
        total += conv(feats[s + 1], feats[s], topology.strides[s + 1], norm=False)  # transposed conv
        total += conv(2 * feats[s], feats[s], topology.kernel_sizes[s])
        total += (topology.n_conv_per_stage_decoder[s] - 1) * conv(feats[s], feats[s], topology.kernel_sizes[s])
        total += conv(feats[s], num_classes, (1,) * topology.ndim, norm=False)
    if topology.n_stages == 1:  # no decoder: the single head sits on the only encoder stage
        total += conv(feats[0], num_classes, (1,) * topology.ndim, norm=False)
    return int(total)


#: Calibrated factors of :func:`estimate_training_bytes` (``benchmarks/network_memory.py`` measures them).
BYTES_PER_ELEMENT_MIXED = 6.0
BYTES_PER_PARAMETER_MIXED = 16.0
BYTES_PER_ELEMENT_FP32 = 10.0
BYTES_PER_PARAMETER_FP32 = 12.0


def estimate_training_bytes(topology: UNetTopology, patch_size: Sequence[int], *, batch_size: int,
                            in_channels: int, num_classes: int, bytes_per_element: float = BYTES_PER_ELEMENT_MIXED,
                            bytes_per_parameter: float = BYTES_PER_PARAMETER_MIXED) -> int:
    """Peak memory of one training step (forward, deep-supervision loss, backward, SGD step).

    ``bytes = feature_map_elements x batch_size x bytes_per_element + parameters x bytes_per_parameter``.

    The defaults describe mixed-precision training on a GPU (fp16 activations); pass
    ``BYTES_PER_ELEMENT_FP32`` / ``BYTES_PER_PARAMETER_FP32`` for full-precision training (CPU):

    * Per counted element autograd keeps exactly two activations: the conv output (for the norm's
      backward) and the norm output, which the in-place LeakyReLU turns into the next conv's saved input.
      Measured: 7.9-8.1 B in fp32 and 4.1-5.2 B under bf16 autocast (CPU), for plain and residual, 2D,
      3D and anisotropic networks; concatenations, skip paths and deep-supervision heads roughly balance
      the outputs of the last units, which are not saved.
    * On top, the backward pass holds gradient buffers and kernel temporaries. Measured peak / estimate
      (weights and batch included, one SGD step, deep supervision on): 0.83-1.01 in fp32 with
      ``BYTES_PER_ELEMENT_FP32 = 10`` on nine planned and hand-made networks of 0.4-2.3 GiB, and
      0.72-0.83 under CPU bf16 autocast with the mixed default of 6 B, which keeps a margin for CUDA.
    * ``bytes_per_parameter``: fp32 weight, gradient and SGD momentum (12 B); mixed precision adds the
      autocast fp16 weight copy and the grad scaler's slack (16 B).

    Not included: the CUDA context (~0.3-0.5 GB), cuDNN workspaces beyond the per-element slack, and
    allocator fragmentation (reserved minus allocated), which is why mixed precision keeps a margin.
    CPU numbers measured with :func:`autoseg.networks.unet.measure_training_step`; re-run
    ``python benchmarks/network_memory.py`` (on a GPU too) after changing the network.

    Args:
        topology: the network's stages.
        patch_size: training patch size.
        batch_size: samples per step.
        in_channels: input image channels.
        num_classes: output channels.
        bytes_per_element: bytes per feature-map element and sample (activations + gradients);
            ``BYTES_PER_ELEMENT_MIXED`` (default) or ``BYTES_PER_ELEMENT_FP32``.
        bytes_per_parameter: bytes per trainable parameter (weights, gradients, optimiser state);
            ``BYTES_PER_PARAMETER_MIXED`` (default) or ``BYTES_PER_PARAMETER_FP32``.

    Returns:
        Estimated bytes.

    Raises:
        PlanningError: batch size below 1 or a patch with the wrong number of axes.
    """
    if batch_size < 1:
        raise PlanningError(f"batch_size={batch_size} must be at least 1.")
    elements = feature_map_elements(topology, patch_size, num_classes=num_classes)
    params = count_parameters(topology, in_channels=in_channels, num_classes=num_classes)
    return training_bytes(elements, params, batch_size=batch_size, bytes_per_element=bytes_per_element,
                          bytes_per_parameter=bytes_per_parameter)


def training_bytes(elements: float, parameters: int, *, batch_size: int, bytes_per_element: float,
                   bytes_per_parameter: float) -> int:
    """The formula of :func:`estimate_training_bytes`, for any network's element and parameter counts.

    ``elements x batch_size x bytes_per_element + parameters x bytes_per_parameter``, truncated to an int.

    Raises:
        PlanningError: batch size below 1.
    """
    if batch_size < 1:
        raise PlanningError(f"batch_size={batch_size} must be at least 1.")
    return int(elements * batch_size * bytes_per_element + parameters * bytes_per_parameter)
