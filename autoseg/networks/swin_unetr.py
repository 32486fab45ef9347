"""Swin UNETR (MONAI's ``SwinUNETR``) as an autoseg network part, behind the optional ``monai`` extra.

Hatamizadeh et al. 2022, "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images". The network is MONAI's, unchanged (``monai.networks.nets.SwinUNETR``, checked with MONAI 1.6.1);
this module maps a plan's topology onto it, states its input constraint and estimates its memory. MONAI
(and ``einops``, which its Swin layers import) are only needed to *build* it: the counts and estimates
below are pure arithmetic.

Mapping from the :class:`~autoseg.networks.topology.UNetTopology`:

* ``spatial_dims`` = the topology's dimensionality (2 or 3);
* ``feature_size`` = ``features_per_stage[0]`` rounded to the nearest multiple of 12 (halves up, at
  least 12), as SwinUNETR requires: 32 -> 36, 24 -> 24, 4 -> 12; or the ``feature_size`` parameter;
* everything else of the topology (strides, kernels, blocks per stage) does not apply: SwinUNETR always
  has a 2x patch embedding, four Swin stages (``depths``, ``num_heads``, ``window_size`` parameters,
  MONAI's defaults) each halving the resolution, and a fixed five-level conv decoder.

Input constraint: every spatial size a multiple of 32 (2 ** 5), and the deepest level (input / 32) must
hold more than one voxel, because its instance norm cannot normalise a single value: a (32, 32) or
(32, 32, 32) patch fails, (64, 32, 32) works. :func:`patch_constraint` gives the fitting patch.

No deep supervision: with ``deep_supervision`` True the forward pass returns a one-element list (the
full-resolution logits), so the trainer's deep-supervision plumbing sees one output.

>>> patch_constraint((100, 70, 20))
(96, 64, 32)
>>> patch_constraint((40, 40))
(64, 32)
"""

from __future__ import annotations

from collections.abc import Sequence
from math import ceil, prod

import torch
from torch import nn

from autoseg.errors import MissingDependencyError, PlanningError
from autoseg.networks import memory
from autoseg.networks.memory import BYTES_PER_ELEMENT_MIXED, BYTES_PER_PARAMETER_MIXED
from autoseg.networks.topology import UNetTopology

#: Every spatial size must be a multiple of this (patch embedding 2x, then four 2x patch mergings).
SPATIAL_MULTIPLE = 32
#: MONAI's ``SwinUNETR`` defaults, used unless the plan's network parameters say otherwise.
DEFAULT_DEPTHS = (2, 2, 2, 2)
DEFAULT_NUM_HEADS = (3, 6, 12, 24)
DEFAULT_WINDOW_SIZE = 7
_MLP_RATIO = 4  # MONAI's default, not a parameter here

MISSING_MONAI = "network 'swin_unetr' needs MONAI: pip install \"autoseg[monai]\""
MISSING_EINOPS = ("network 'swin_unetr' needs einops, which MONAI's Swin layers import: "
                  "pip install \"autoseg[monai]\" (or pip install einops)")


def _swin_unetr_class() -> type[nn.Module]:
    """MONAI's ``SwinUNETR``, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        from monai.networks.nets import SwinUNETR
    except ImportError as err:
        raise MissingDependencyError(MISSING_MONAI) from err
    try:
        import einops  # noqa: F401  (imported lazily by MONAI; missing, the first forward pass would fail)
    except ImportError as err:
        raise MissingDependencyError(MISSING_EINOPS) from err
    return SwinUNETR


# ---- parameters of the network part ---------------------------------------------------------------------
def feature_size_for(topology: UNetTopology) -> int:
    """SwinUNETR's ``feature_size`` for a topology: ``features_per_stage[0]`` to the nearest multiple of 12."""
    return 12 * max(1, (int(topology.features_per_stage[0]) + 6) // 12)


def _settings(topology: UNetTopology, feature_size: int | None, depths: Sequence[int], num_heads: Sequence[int],
              window_size: int | Sequence[int]) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Checked ``(feature_size, depths, num_heads, window)``; ``window`` has one size per axis.

    Raises:
        PlanningError: the topology is inconsistent or a parameter does not fit SwinUNETR.
    """
    topology.check()
    nd = topology.ndim
    fs = feature_size_for(topology) if feature_size is None else feature_size
    if not isinstance(fs, int) or fs < 12 or fs % 12:
        raise PlanningError(f"swin_unetr: feature_size={fs!r} must be a positive multiple of 12 (SwinUNETR splits "
                            "it over attention heads); use e.g. 24 or 48, or leave it out to derive it from "
                            "features_per_stage[0].")
    depths, heads = tuple(depths), tuple(num_heads)
    for name, value in (("depths", depths), ("num_heads", heads)):
        if len(value) != 4 or any(not isinstance(v, int) or v < 1 for v in value):
            raise PlanningError(f"swin_unetr: {name}={value!r} must be four positive integers (one per Swin "
                                f"stage), e.g. {DEFAULT_DEPTHS if name == 'depths' else DEFAULT_NUM_HEADS}.")
    for i, h in enumerate(heads):
        if (fs << i) % h:
            raise PlanningError(f"swin_unetr: stage {i} has {fs << i} channels, not divisible by num_heads[{i}]={h}; "
                                "choose heads that divide feature_size * 2 ** stage.")
    window = (window_size,) * nd if isinstance(window_size, int) else tuple(window_size)
    if len(window) != nd or any(not isinstance(w, int) or w < 1 for w in window):
        raise PlanningError(f"swin_unetr: window_size={window_size!r} must be a positive integer or one per axis "
                            f"({nd} axes).")
    return fs, depths, heads, window


def patch_constraint(patch_size: Sequence[int]) -> tuple[int, ...]:
    """The patch SwinUNETR can take that is nearest to ``patch_size`` from below.

    Every axis rounded down to a multiple of 32 and at least 32; if that leaves every axis at 32 (a
    single voxel at the deepest level, which its instance norm rejects), the axis asked largest (the
    first of equals) becomes 64. So the result is larger than asked only on axes below the minimum.

    Args:
        patch_size: the wanted patch, one size per axis.

    Returns:
        The fitting patch.

    Raises:
        PlanningError: a size is not a positive integer.
    """
    if any(not isinstance(v, int) or v < 1 for v in patch_size):
        raise PlanningError(f"swin_unetr: patch_size={tuple(patch_size)!r} must hold positive integers.")
    m = SPATIAL_MULTIPLE
    fitted = [max(m, v // m * m) for v in patch_size]
    if fitted and all(v == m for v in fitted):
        fitted[max(range(len(fitted)), key=lambda a: (patch_size[a], -a))] = 2 * m
    return tuple(fitted)


# ---- the network --------------------------------------------------------------------------------------
class SwinUNETRNet(nn.Module):
    """MONAI's ``SwinUNETR`` with the contract of :class:`~autoseg.networks.unet.UNet`.

    Attributes: ``topology``, ``in_channels``, ``num_classes``, ``deep_supervision`` (a plain attribute;
    True gives a one-element list), ``feature_size``, ``depths``, ``num_heads``, ``window_size`` and
    ``net`` (the MONAI module).

    Raises:
        MissingDependencyError: MONAI or einops is not installed.
        PlanningError: the topology, channels or parameters do not fit.
    """

    def __init__(self, topology: UNetTopology, *, in_channels: int, num_classes: int, deep_supervision: bool = True,
                 feature_size: int | None = None, depths: Sequence[int] = DEFAULT_DEPTHS,
                 num_heads: Sequence[int] = DEFAULT_NUM_HEADS, window_size: int | Sequence[int] = DEFAULT_WINDOW_SIZE
                 ) -> None:
        swin_unetr = _swin_unetr_class()
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise PlanningError(f"swin_unetr: {name}={value!r} must be a positive integer.")
        fs, depths, heads, window = _settings(topology, feature_size, depths, num_heads, window_size)
        self.topology = topology
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.feature_size, self.depths, self.num_heads, self.window_size = fs, depths, heads, window
        self.net = swin_unetr(in_channels=in_channels, out_channels=num_classes, feature_size=fs, depths=depths,
                              num_heads=heads, window_size=window, spatial_dims=topology.ndim)

    def check_input(self, x: torch.Tensor) -> None:
        """Check rank, channels and that every spatial size is a multiple of 32 (see :func:`patch_constraint`).

        Raises:
            PlanningError: the input does not fit; the message names the needed multiple and a fitting size.
        """
        nd = self.topology.ndim
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            raise PlanningError(f"swin_unetr: input of shape {tuple(x.shape)} does not match (batch, "
                                f"{self.in_channels}, {nd} spatial axes); give (batch, channels, *patch) with "
                                f"{self.in_channels} channel(s).")
        spatial = tuple(int(v) for v in x.shape[2:])
        m = SPATIAL_MULTIPLE
        if any(v % m for v in spatial) or all(v == m for v in spatial):
            up = tuple(max(m, -(-v // m) * m) for v in spatial)
            if all(v == m for v in up):
                up = (2 * m, *up[1:])
            raise PlanningError(f"swin_unetr: input spatial shape {spatial} does not fit SwinUNETR, which needs "
                                f"every size to be a multiple of {m} and at least one size of {2 * m} or more; "
                                f"pad the input to e.g. {up}, or use the patch {patch_constraint(spatial)} "
                                "(swin_unetr.patch_constraint).")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Full-resolution logits ``(batch, num_classes, *spatial)``, in a one-element list with deep supervision.

        Raises:
            PlanningError: the input shape does not fit (see :meth:`check_input`).
        """
        self.check_input(x)
        logits = self.net(x)
        return [logits] if self.deep_supervision else logits


# ---- the network-part interface -------------------------------------------------------------------------
def build(topology: UNetTopology, *, in_channels: int, num_classes: int, deep_supervision: bool = True,
          feature_size: int | None = None, depths: Sequence[int] = DEFAULT_DEPTHS,
          num_heads: Sequence[int] = DEFAULT_NUM_HEADS, window_size: int | Sequence[int] = DEFAULT_WINDOW_SIZE
          ) -> SwinUNETRNet:
    """Build SwinUNETR for ``topology`` (see the module doc for the mapping), freshly initialised by MONAI.

    Raises:
        MissingDependencyError: MONAI or einops is not installed (``pip install "autoseg[monai]"``).
        PlanningError: the topology, channels or parameters do not fit.
    """
    return SwinUNETRNet(topology, in_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                        feature_size=feature_size, depths=depths, num_heads=num_heads, window_size=window_size)


def count_parameters(topology: UNetTopology, *, in_channels: int, num_classes: int, feature_size: int | None = None,
                     depths: Sequence[int] = DEFAULT_DEPTHS, num_heads: Sequence[int] = DEFAULT_NUM_HEADS,
                     window_size: int | Sequence[int] = DEFAULT_WINDOW_SIZE) -> int:
    """Exact trainable parameters, counted analytically (no MONAI needed) from MONAI 1.6.1's SwinUNETR.

    Patch embedding (2x conv with bias), per Swin block two LayerNorms, window attention (qkv and proj
    linears with bias, a relative-position-bias table of ``prod(2 * window - 1) x heads``) and an MLP of
    ratio 4; per stage a patch merging (LayerNorm over ``2 ** ndim`` x channels, linear to twice the
    channels without bias); conv blocks without bias and instance norms without affine parameters, and a
    1x1 output conv with bias. The tests check it against the built module. Counted rather than built on
    the meta device, because MONAI's constructor calls ``Tensor.item()`` (its drop-path schedule), which
    meta tensors refuse, and so the planner can count without MONAI.

    Raises:
        PlanningError: the topology or parameters do not fit.
    """
    fs, depths, heads, window = _settings(topology, feature_size, depths, num_heads, window_size)
    nd = topology.ndim
    k3, k2 = 3 ** nd, 2 ** nd
    total = in_channels * fs * k2 + fs  # patch embedding
    table = prod(2 * w - 1 for w in window)
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        dim = fs << i
        hidden = dim * _MLP_RATIO
        block = (2 * dim  # norm1
                 + table * h + 3 * dim * dim + 3 * dim + dim * dim + dim  # attention
                 + 2 * dim  # norm2
                 + dim * hidden + hidden + hidden * dim + dim)  # MLP
        total += depth * block + 2 * k2 * dim + k2 * dim * 2 * dim  # + patch merging

    def res_block(cin: int, cout: int) -> int:  # UnetResBlock: two 3^n convs, 1x1 projection when cin != cout
        return cin * cout * k3 + cout * cout * k3 + (cin * cout if cin != cout else 0)

    total += res_block(in_channels, fs) + res_block(fs, fs) + res_block(2 * fs, 2 * fs) + res_block(4 * fs, 4 * fs)
    total += res_block(16 * fs, 16 * fs)  # encoder10 on the deepest hidden state
    for cin, cout in ((16 * fs, 8 * fs), (8 * fs, 4 * fs), (4 * fs, 2 * fs), (2 * fs, fs), (fs, fs)):
        total += cin * cout * k2 + res_block(2 * cout, cout)  # UnetrUpBlock: transposed conv, then a res block
    total += fs * num_classes + num_classes  # output conv
    return int(total)


#: Calibration of the memory estimate (see :func:`estimate_training_bytes`): U-Net-equivalent elements per
#: counted layer-output element, and bytes per attention-probability element and sample in fp32 and in
#: mixed precision.
LAYER_ELEMENT_WEIGHT = 0.75
ATTENTION_BYTES_FP32 = 4.0
ATTENTION_BYTES_MIXED = 8.0


def _counts(topology: UNetTopology, patch_size: Sequence[int], num_classes: int, fs: int, depths: tuple[int, ...],
            heads: tuple[int, ...], window: tuple[int, ...]) -> tuple[int, int]:
    """``(layer_outputs, attention_probabilities)``: element counts for one sample."""
    nd = topology.ndim
    if len(patch_size) != nd:
        raise PlanningError(f"patch_size={tuple(patch_size)} has {len(patch_size)} axes but the topology is "
                            f"{nd}D; give one size per axis.")
    levels = [prod(max(1, int(v) >> k) for v in patch_size) for k in range(6)]  # voxels at input / 2 ** k
    # conv encoders and decoder: every conv and transposed-conv output (as the U-Net counts), output conv
    layers = 3 * fs * levels[0] + 2 * fs * levels[1] + 4 * fs * levels[2] + 8 * fs * levels[3] + 32 * fs * levels[5]
    layers += 4 * 8 * fs * levels[4] + 4 * 4 * fs * levels[3] + 4 * 2 * fs * levels[2] + 4 * fs * levels[1]
    layers += 4 * fs * levels[0] + num_classes * levels[0]
    layers += fs * levels[1]  # patch embedding
    attention = 0
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        dim = fs << i
        grid = [max(1, int(v) >> (i + 1)) for v in patch_size]
        used = [min(g, w) for g, w in zip(grid, window, strict=True)]  # MONAI shrinks windows larger than the grid
        padded = prod(ceil(g / u) * u for g, u in zip(grid, used, strict=True))  # and pads to whole windows
        tokens = prod(grid)
        # per block: qkv, attention output projection, MLP hidden and output
        layers += depth * (3 * dim * padded + dim * padded + _MLP_RATIO * dim * tokens + dim * tokens)
        attention += depth * h * padded * prod(used)
        layers += 2 * dim * levels[i + 2]  # patch merging output
    return int(layers), int(attention)


def feature_map_elements(topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int,
                         feature_size: int | None = None, depths: Sequence[int] = DEFAULT_DEPTHS,
                         num_heads: Sequence[int] = DEFAULT_NUM_HEADS,
                         window_size: int | Sequence[int] = DEFAULT_WINDOW_SIZE) -> int:
    """Approximate U-Net-equivalent activation elements for one sample (the planner's yardstick).

    Two counts: *layer outputs*, like the U-Net's conv outputs (every conv and transposed-conv output of
    SwinUNETR's conv encoders and decoder, the output conv, the patch embedding, per Swin block the qkv,
    projection, MLP hidden and MLP output linears, each patch merging's output), and *attention
    probabilities* (``heads x padded tokens x window volume`` per Swin block). The yardstick is
    ``LAYER_ELEMENT_WEIGHT x layers + ATTENTION_BYTES_MIXED / BYTES_PER_ELEMENT_MIXED x attention``: in
    the mixed-precision units of the U-Net's budgets, since the planner compares it with those.
    An attention element weighs 1.33 U-Net elements there but only 0.4 in fp32: the relative-position
    bias (fp32) promotes the attention scores to fp32, and autocast keeps a half-precision copy for the
    product with the values, so mixed precision does not shrink attention memory as it shrinks conv
    outputs (see :func:`estimate_training_bytes` for the measurements).

    Raises:
        PlanningError: the patch has the wrong number of axes, or the topology or parameters do not fit.
    """
    fs, depths, heads, window = _settings(topology, feature_size, depths, num_heads, window_size)
    layers, attention = _counts(topology, patch_size, num_classes, fs, depths, heads, window)
    return int(LAYER_ELEMENT_WEIGHT * layers + ATTENTION_BYTES_MIXED / BYTES_PER_ELEMENT_MIXED * attention)


def estimate_training_bytes(topology: UNetTopology, patch_size: Sequence[int], *, batch_size: int, in_channels: int,
                            num_classes: int, bytes_per_element: float = BYTES_PER_ELEMENT_MIXED,
                            bytes_per_parameter: float = BYTES_PER_PARAMETER_MIXED,
                            bytes_per_attention_element: float | None = None, feature_size: int | None = None,
                            depths: Sequence[int] = DEFAULT_DEPTHS, num_heads: Sequence[int] = DEFAULT_NUM_HEADS,
                            window_size: int | Sequence[int] = DEFAULT_WINDOW_SIZE) -> int:
    """Approximate peak memory of one training step (forward, loss, backward, SGD step).

    ``batch_size x (LAYER_ELEMENT_WEIGHT x layers x bytes_per_element + attention x
    bytes_per_attention_element) + count_parameters x bytes_per_parameter``, with the two counts of
    :func:`feature_map_elements` and the U-Net's factors (:mod:`autoseg.networks.memory`) otherwise.
    ``bytes_per_attention_element`` left at None follows the precision the other factors describe:
    ``ATTENTION_BYTES_FP32`` when ``bytes_per_element >= BYTES_PER_ELEMENT_FP32``, else
    ``ATTENTION_BYTES_MIXED``; with the defaults the result is ``feature_map_elements x batch_size x
    bytes_per_element + parameters x bytes_per_parameter`` (up to rounding), as for the U-Net.

    Calibration (MONAI 1.6.1, torch 2.13 CPU, 2 threads, :func:`~autoseg.networks.unet.measure_training_step`,
    feature size 12 unless said, deep-supervision list of one output):

    * saved for backward, fp32: 7.2 B per layer element and 4.0 B per attention element (one fp32 copy of
      the softmax output), within 1% on nine networks; under CPU bf16 autocast 4.3 B and 6.0 B (fp32
      softmax output plus the bf16 copy), within 8%.
    * peak / estimate in fp32 (``BYTES_PER_ELEMENT_FP32``, ``BYTES_PER_PARAMETER_FP32``): 0.94 for 2D
      128x128 at batch 2 and 1.00 for 3D 64x32x32 at batch 1 (the sizes the tests check); 1.01 for 2D
      256x256, 0.99 and 1.03 for 3D 64x64x32 and 64^3; 0.81-0.83 for small or wide ones (2D 64x64 and
      96x160, feature size 24), whose parameters' 12 B include SGD momentum that is not yet allocated
      at the activation peak.
    * peak / estimate under CPU bf16 autocast with the mixed defaults: 0.77-0.81 in 3D (64x32x32 to 64^3;
      0.68 at feature size 24), 0.62-0.85 in 2D: a margin like the U-Net's (0.72-0.83) for CUDA, where
      it was not measured.

    Raises:
        PlanningError: batch size below 1, a patch with the wrong number of axes, or parameters that do not fit.
    """
    fs, depths_t, heads, window = _settings(topology, feature_size, depths, num_heads, window_size)
    layers, attention = _counts(topology, patch_size, num_classes, fs, depths_t, heads, window)
    if bytes_per_attention_element is None:
        fp32 = bytes_per_element >= memory.BYTES_PER_ELEMENT_FP32
        bytes_per_attention_element = ATTENTION_BYTES_FP32 if fp32 else ATTENTION_BYTES_MIXED
    per_sample = LAYER_ELEMENT_WEIGHT * layers * bytes_per_element + attention * bytes_per_attention_element
    params = count_parameters(topology, in_channels=in_channels, num_classes=num_classes, feature_size=feature_size,
                              depths=depths, num_heads=num_heads, window_size=window_size)
    # per_sample is already in bytes: one "element" of one byte
    return memory.training_bytes(per_sample, params, batch_size=batch_size, bytes_per_element=1.0,
                                 bytes_per_parameter=bytes_per_parameter)
