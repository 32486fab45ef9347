"""Modality dropout: blank whole input channels during training so that a model copes with a missing sequence.

A blanked channel is set to 0, which after intensity normalisation (z-score or CT) is the channel's mean:
exactly what :func:`autoseg.preprocessing.preprocess.preprocess_arrays` puts in a channel passed as
``missing`` at prediction time, so training and prediction see an absent sequence the same way.

Per sample, each image channel is drawn with probability ``p``; when every channel was drawn, one of them
(uniformly) is kept, so a sample never loses all its image channels. The chance that a given channel of a
``C``-channel sample is blanked is therefore ``p - p**C / C`` (0.375 for ``p = 0.5, C = 2``; 0.484 for
``C = 4``). Channels after the first ``n_image_channels`` (the cascade's one-hot channels of the previous
stage) are never touched.

Randomness comes from ``numpy.random``, like the other training transforms (the batch stream seeds it per
batch), so a seed reproduces the same dropped channels.

Example:
    >>> import numpy as np
    >>> np.random.seed(0)
    >>> batch = ModalityDropout(0.5, n_image_channels=2)(data=np.ones((4, 2, 3, 3), np.float32))
    >>> bool((batch["data"].reshape(4, 2, -1).max(-1) > 0).any(1).all())  # every sample keeps a channel
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform

from autoseg.errors import TrainingConfigError


def check_modality_dropout(p: float, n_image_channels: int | None = None) -> float:
    """Check a modality-dropout probability (and, when known, that there is a channel that can be dropped).

    Args:
        p: probability per image channel per sample, in ``[0, 1)``.
        n_image_channels: the model's image channels (without cascade channels), or None to check ``p`` only.

    Returns:
        ``p`` as a float.

    Raises:
        TrainingConfigError: ``p`` is not a number in ``[0, 1)``, or ``p > 0`` with a single image channel.

    Example:
        >>> check_modality_dropout(0.25, 4)
        0.25
    """
    try:
        value = float(p)
    except (TypeError, ValueError) as err:
        raise TrainingConfigError(f"modality_dropout={p!r} is not a number; give a probability in [0, 1), "
                                  "e.g. --modality-dropout 0.25 (0 switches it off).") from err
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise TrainingConfigError(f"modality_dropout={p!r} must lie in [0, 1) (the probability that a channel is "
                                  "blanked per sample); use e.g. 0.25, or 0 to switch it off.")
    if value > 0 and n_image_channels is not None and n_image_channels < 2:
        raise TrainingConfigError(f"modality_dropout={value} needs at least 2 input channels, but this dataset has "
                                  f"{n_image_channels}: a sample always keeps one channel, so nothing could be "
                                  "dropped. Train with modality_dropout=0 (--modality-dropout 0).")
    return value


class ModalityDropout(AbstractTransform):
    """Blanks (sets to 0) random image channels of each sample, never all of them.

    The batch gets ``dropped_channels``: bool ``(B, n_image_channels)``, True where a channel was blanked.

    Args:
        p: probability per image channel per sample that it is blanked (before the keep-one rule).
        n_image_channels: number of leading channels of ``data`` that are image channels; later channels
            (cascade inputs) are never blanked.

    Raises:
        TrainingConfigError: invalid ``p`` or ``n_image_channels`` (see :func:`check_modality_dropout`); when
            called, a batch with fewer than ``n_image_channels`` channels.
    """

    def __init__(self, p: float, *, n_image_channels: int) -> None:
        if int(n_image_channels) < 1:
            raise TrainingConfigError(f"ModalityDropout: n_image_channels={n_image_channels} must be >= 1.")
        self.p = check_modality_dropout(p, int(n_image_channels))
        self.n_image_channels = int(n_image_channels)

    def sample_mask(self, batch_size: int) -> np.ndarray:
        """Draw which channels to blank: bool ``(batch_size, n_image_channels)``, never a full row.

        Args:
            batch_size: samples in the batch.

        Returns:
            True where a channel of a sample is blanked.
        """
        drop = np.random.uniform(size=(batch_size, self.n_image_channels)) < self.p
        for b in np.flatnonzero(drop.all(1)):
            drop[b, np.random.randint(self.n_image_channels)] = False
        return drop

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        if data.shape[1] < self.n_image_channels:
            raise TrainingConfigError(
                f"ModalityDropout: the batch has {data.shape[1]} channel(s) but n_image_channels="
                f"{self.n_image_channels}; pass the dataset's number of input channels.")
        if self.p == 0:
            return batch
        drop = self.sample_mask(data.shape[0])
        for b, c in zip(*np.nonzero(drop), strict=True):
            data[b, c] = 0
        batch["dropped_channels"] = drop  # what was applied, for inspection
        return batch
