"""Intensity normalisation per channel, chosen from the channel name (nnU-Net v2's rules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from autoseg.fingerprint.model import IntensityStats

#: channel name (casefolded) -> scheme; any other name gets ``zscore``
SCHEME_BY_CHANNEL_NAME = MappingProxyType({
    "ct": "ct", "nonorm": "none", "zscore": "zscore", "rescale_to_0_1": "rescale_to_0_1", "rgb_to_0_1": "rgb_to_0_1",
})
SCHEMES = ("ct", "none", "zscore", "rescale_to_0_1", "rgb_to_0_1")
#: a case keeps on average less than this fraction of its voxels after cropping -> z-score inside the mask
MASK_FOR_NORM_THRESHOLD = 0.75


@dataclass(frozen=True)
class ChannelNormalization:
    """How one channel is normalised.

    Attributes:
        channel: the channel name from dataset.json.
        scheme: ``ct`` (clip to the foreground 0.5-99.5 percentiles, subtract the foreground mean, divide by
            its std; same constants for every case), ``zscore`` (per case mean/std), ``none``,
            ``rescale_to_0_1`` (per case min-max) or ``rgb_to_0_1`` (divide by 255).
        use_mask: compute the z-score inside the nonzero mask only and leave outside voxels at 0.
        clip_low, clip_high, mean, std: dataset foreground statistics (used by ``ct``; recorded for all).
    """

    channel: str
    scheme: str
    use_mask: bool
    clip_low: float
    clip_high: float
    mean: float
    std: float

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChannelNormalization:
        """Inverse of :meth:`to_json`."""
        return cls(channel=str(d["channel"]), scheme=str(d["scheme"]), use_mask=bool(d["use_mask"]),
                   clip_low=float(d["clip_low"]), clip_high=float(d["clip_high"]), mean=float(d["mean"]),
                   std=float(d["std"]))


def scheme_for_channel(name: str) -> str:
    """Normalisation scheme for a channel name: ``CT`` -> ``ct``, ``noNorm`` -> ``none``, ..., else ``zscore``.

    Args:
        name: channel name (case-insensitive).

    Returns:
        One of :data:`SCHEMES`.
    """
    return SCHEME_BY_CHANNEL_NAME.get(name.casefold(), "zscore")


def plan_normalization(channel_names: Sequence[str], intensity: Sequence[IntensityStats],
                       median_relative_size_after_cropping: float) -> tuple[ChannelNormalization, ...]:
    """Normalisation of every channel.

    ``use_mask`` is True for z-score channels when cropping to the nonzero region keeps less than 75 % of
    a median case (skull-stripped MRI: the background is not tissue and must not enter the statistics).

    Args:
        channel_names: names from dataset.json, in channel order.
        intensity: foreground statistics per channel (from the fingerprint).
        median_relative_size_after_cropping: median over cases of cropped / original voxels.

    Returns:
        One record per channel.
    """
    masked = median_relative_size_after_cropping < MASK_FOR_NORM_THRESHOLD
    out = []
    for i, name in enumerate(channel_names):
        scheme = scheme_for_channel(name)
        st = intensity[i] if i < len(intensity) else None
        out.append(ChannelNormalization(
            channel=name, scheme=scheme, use_mask=masked and scheme == "zscore",
            clip_low=float(st.percentile_00_5) if st else 0.0, clip_high=float(st.percentile_99_5) if st else 0.0,
            mean=float(st.mean) if st else 0.0, std=float(st.std) if st else 1.0))
    return tuple(out)
