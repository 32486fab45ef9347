"""Planner presets: the constants that differ between nnU-Net's planners, plus a CPU preset.

Each preset is a frozen record; :func:`get_preset` looks one up by name ("did you mean" on a typo).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType

from autoseg.errors import PlanningError


@dataclass(frozen=True)
class PlannerPreset:
    """Constants of one planner.

    Attributes:
        name: preset name.
        description: what it is for and what it trades away (shown by ``Plans.explain()``).
        block: ``"plain"`` or ``"residual"`` encoder blocks.
        base_features: features of the first stage; doubled per stage up to the maximum.
        max_features_3d: feature cap of 3D networks.
        max_features_2d: feature cap of 2D networks.
        reference_3d: feature-map elements (batch x estimate) that fit ``reference_gb`` in 3D.
        reference_2d: same for 2D.
        reference_gb: memory the references correspond to; the budget scales with ``gpu_memory_gb / reference_gb``.
        ref_batch_3d: batch size the 3D reference corresponds to.
        ref_batch_2d: batch size the 2D reference corresponds to.
        shrink_rule: ``"min_batch"`` shrinks the patch until ``estimate / ref_batch x 2 <= budget``
            (nnU-Net default); ``"reference"`` until ``estimate <= budget`` (ResEnc presets).
        max_dataset_covered: one batch covers at most this fraction of the dataset's voxels (1 = no cap).
        min_batch_size: lower bound of the batch size.
        n_blocks_encoder: convs (plain) or residual blocks per encoder stage (truncated to the stage count).
        n_conv_decoder: convs per decoder stage (truncated).
        num_epochs: default training length in epochs.
        iterations_per_epoch: default training iterations per epoch.
        val_iterations: default online-validation iterations per epoch.
    """

    name: str
    description: str
    block: str = "plain"
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    reference_3d: float = 560e6
    reference_2d: float = 85e6
    reference_gb: float = 8.0
    ref_batch_3d: int = 2
    ref_batch_2d: int = 12
    shrink_rule: str = "min_batch"
    max_dataset_covered: float = 0.05
    min_batch_size: int = 2
    n_blocks_encoder: tuple[int, ...] = (2,) * 14
    n_conv_decoder: tuple[int, ...] = (2,) * 13
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50


DEFAULT = PlannerPreset(
    name="default",
    description="nnU-Net v2 default planner (PlainConvUNet, 32 base features, 560e6/85e6 feature-map "
                "references at 8 GB, room for batch size 2, batch <= 5% of the dataset).",
)

RESENC_M = PlannerPreset(
    name="resenc_m",
    description="nnU-Net ResEnc M (residual encoder 1,3,4,6,6,6..., 680e6/135e6 references at 8 GB, "
                "patch shrunk until the estimate fits the reference, no 5% batch cap).",
    block="residual", reference_3d=680e6, reference_2d=135e6, shrink_rule="reference", max_dataset_covered=1.0,
    n_blocks_encoder=(1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), n_conv_decoder=(1,) * 13,
)

RESENC_L = PlannerPreset(
    name="resenc_l",
    description="nnU-Net ResEnc L (as ResEnc M with 2.1e9/380e6 references at 24 GB; pass gpu_memory_gb=24 "
                "to reproduce nnU-Net's plans, a smaller target scales the budget down).",
    block="residual", reference_3d=2.1e9, reference_2d=380e6, reference_gb=24.0, shrink_rule="reference",
    max_dataset_covered=1.0, n_blocks_encoder=(1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), n_conv_decoder=(1,) * 13,
)

CPU = PlannerPreset(
    name="cpu",
    description="sized to train on a few CPU cores: base 16 features (max 256) and budgets of 40e6 (3D) / 8e6 "
                "(2D) feature-map elements at 8 GB, about 13x below the default -- a 1 mm brain gets a "
                "64x80x64 patch at batch 2 instead of 128^3. It trades away context (a smaller patch sees less "
                "of the anatomy, so large structures and long-range cues suffer) and capacity (half the "
                "features) for training steps ~2.5x faster than a 32-feature 64^3 step; expect lower accuracy "
                "than the default plan.",
    base_features=16, max_features_3d=256, max_features_2d=256, reference_3d=40e6, reference_2d=8e6,
    num_epochs=250, iterations_per_epoch=100, val_iterations=20,
)
"""The CPU preset. Measured on 2 CPU threads (PlainConvUNet, 4 channels, batch 2, forward+backward+SGD):
16 features at 64x80x64 took 0.41x the time of 32 features at 64^3 and 1.45x the time of 32 features at 48^3.
All rules (patch shrinking, 5 % batch cap, cascade) are the default planner's; only the constants differ."""

PRESETS = MappingProxyType({p.name: p for p in (DEFAULT, RESENC_M, RESENC_L, CPU)})


def get_preset(name: str) -> PlannerPreset:
    """Look up a preset by name.

    Args:
        name: one of ``default``, ``resenc_m``, ``resenc_l``, ``cpu``.

    Returns:
        The preset.

    Raises:
        PlanningError: unknown name (the message suggests the closest one).
    """
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        folded = {k.casefold(): k for k in PRESETS}
        close = difflib.get_close_matches(str(name).casefold(), list(folded), n=1)
        hint = f" (did you mean {folded[close[0]]!r}?)" if close else ""
        raise PlanningError(f"preset {name!r} is unknown{hint}; choose one of {sorted(PRESETS)}.") from None
