"""The U-Net topology a plan prescribes: what the network builder consumes and the memory estimate reads.

A topology is pure numbers (no torch). Stage ``i`` of the encoder applies ``strides[i]`` in its first
convolution (``strides[0]`` is all ones), uses ``kernel_sizes[i]`` and ``features_per_stage[i]`` output
channels. The decoder has one stage fewer than the encoder; decoder stage ``j`` (counted from the deepest)
upsamples with a transposed convolution whose kernel equals the stride it undoes.

Two block types:

* ``plain``: an encoder stage is ``n_blocks_per_stage[i]`` conv-norm-nonlinearity units;
* ``residual``: a single-conv stem, then ``n_blocks_per_stage[i]`` residual blocks of two convs each; the
  first block of a stage carries the stride, and a block whose input and output differ in size or channels
  has a 1x1 projection on its skip path (nnU-Net's ``ResidualEncoderUNet``).

The decoder always uses plain convolutions, ``n_conv_per_stage_decoder[j]`` per stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoseg.errors import PlanningError

BLOCK_TYPES = ("plain", "residual")


def _check_stage(i: int, stride: tuple[int, ...], kernel: tuple[int, ...], feat: int, nb: int, ndim: int) -> None:
    """Check encoder stage ``i``: stride and kernel with ``ndim`` positive integers, odd kernel sizes, and a
    positive whole number of features and blocks."""
    for name, vec in (("strides", stride), ("kernel_sizes", kernel)):
        if len(vec) != ndim:
            raise PlanningError(f"UNetTopology: {name}[{i}]={tuple(vec)} has {len(vec)} axes, "
                                f"expected {ndim} like strides[0].")
        if any(not isinstance(v, int) or v < 1 for v in vec):
            raise PlanningError(f"UNetTopology: {name}[{i}]={tuple(vec)} must hold positive integers.")
    if any(k % 2 == 0 for k in kernel):
        raise PlanningError(f"UNetTopology: kernel_sizes[{i}]={tuple(kernel)} has an even size; "
                            "use odd kernel sizes so 'same' padding keeps the shape.")
    for name, v in (("features_per_stage", feat), ("n_blocks_per_stage", nb)):
        if not isinstance(v, int) or v < 1:
            raise PlanningError(f"UNetTopology: {name}[{i}]={v!r} must be a positive integer.")


@dataclass(frozen=True)
class UNetTopology:
    """Stage-wise description of a U-Net.

    Attributes:
        strides: per stage, the stride per axis (the first stage's stride is all ones).
        kernel_sizes: per stage, the conv kernel size per axis.
        features_per_stage: output channels of each encoder stage.
        n_blocks_per_stage: per encoder stage, convs (plain) or residual blocks (residual).
        n_conv_per_stage_decoder: convs per decoder stage (one entry fewer than the encoder).
        block: ``"plain"`` or ``"residual"``.
    """

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    features_per_stage: tuple[int, ...]
    n_blocks_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    block: str = "plain"

    @property
    def n_stages(self) -> int:
        """Number of encoder stages (resolution levels)."""
        return len(self.features_per_stage)

    @property
    def ndim(self) -> int:
        """Spatial dimensions (2 or 3)."""
        return len(self.strides[0]) if self.strides else 0

    @property
    def divisible_by(self) -> tuple[int, ...]:
        """Per axis, the product of the strides: a patch must be a multiple of it."""
        out = [1] * self.ndim
        for stride in self.strides:
            out = [o * s for o, s in zip(out, stride, strict=True)]
        return tuple(out)

    def check(self) -> UNetTopology:
        """Validate lengths and values; return ``self`` so calls can be chained.

        Raises:
            PlanningError: a list has the wrong length, a value is not a positive integer, a kernel size is
                even, the first stride is not 1, or the block type is unknown.
        """
        self._check_layout()
        self._check_encoder_stages()
        self._check_decoder_convs()
        return self

    def _check_layout(self) -> None:
        """Check the stage count, the block type and that every per-stage list has one entry per stage."""
        n = self.n_stages
        if n < 1:
            raise PlanningError("UNetTopology: features_per_stage is empty; a U-Net needs at least one stage.")
        if self.block not in BLOCK_TYPES:
            raise PlanningError(f"UNetTopology: block={self.block!r} is unknown; use one of {BLOCK_TYPES}.")
        named = {"strides": self.strides, "kernel_sizes": self.kernel_sizes,
                 "n_blocks_per_stage": self.n_blocks_per_stage}
        for name, value in named.items():
            if len(value) != n:
                raise PlanningError(f"UNetTopology: {name} has {len(value)} entries but features_per_stage has "
                                    f"{n}; give one entry per stage.")
        if len(self.n_conv_per_stage_decoder) != n - 1:
            raise PlanningError(f"UNetTopology: n_conv_per_stage_decoder has {len(self.n_conv_per_stage_decoder)} "
                                f"entries; the decoder has n_stages - 1 = {n - 1} stages.")

    def _check_encoder_stages(self) -> None:
        """Check the axes count, each encoder stage's values, and that the first stage keeps full resolution."""
        ndim = self.ndim
        if ndim not in (2, 3):
            raise PlanningError(f"UNetTopology: strides[0]={self.strides[0]!r} has {ndim} axes; use 2 or 3.")
        try:
            for i, (stride, kernel, feat, nb) in enumerate(zip(self.strides, self.kernel_sizes,
                                                               self.features_per_stage, self.n_blocks_per_stage,
                                                               strict=True)):
                _check_stage(i, stride, kernel, feat, nb, ndim)
        except ValueError as err:  # zip(strict=True) length mismatch
            raise PlanningError(f"UNetTopology: per-stage lists differ in length ({err}).") from err
        if any(s != 1 for s in self.strides[0]):
            raise PlanningError(f"UNetTopology: strides[0]={self.strides[0]} must be all ones (the first stage "
                                "works at full resolution).")

    def _check_decoder_convs(self) -> None:
        """Check that every decoder stage has a positive whole number of convolutions."""
        for j, nc in enumerate(self.n_conv_per_stage_decoder):
            if not isinstance(nc, int) or nc < 1:
                raise PlanningError(f"UNetTopology: n_conv_per_stage_decoder[{j}]={nc!r} must be a positive integer.")

    # ---- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (lists of ints)."""
        return {"strides": [list(s) for s in self.strides], "kernel_sizes": [list(k) for k in self.kernel_sizes],
                "features_per_stage": list(self.features_per_stage), "n_blocks_per_stage": list(self.n_blocks_per_stage),
                "n_conv_per_stage_decoder": list(self.n_conv_per_stage_decoder), "block": self.block}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UNetTopology:
        """Inverse of :meth:`to_json`; the result is checked.

        Raises:
            PlanningError: a field is missing or the topology is inconsistent.
        """
        try:
            topo = cls(strides=tuple(tuple(int(v) for v in s) for s in d["strides"]),
                       kernel_sizes=tuple(tuple(int(v) for v in k) for k in d["kernel_sizes"]),
                       features_per_stage=tuple(int(v) for v in d["features_per_stage"]),
                       n_blocks_per_stage=tuple(int(v) for v in d["n_blocks_per_stage"]),
                       n_conv_per_stage_decoder=tuple(int(v) for v in d["n_conv_per_stage_decoder"]),
                       block=str(d.get("block", "plain")))
        except (KeyError, TypeError, ValueError) as err:
            raise PlanningError(f"UNetTopology JSON is missing or has a malformed field ({err!r}); "
                                "re-run `autoseg plan` to regenerate plans.json.") from err
        return topo.check()
