"""Example autoseg parts (a network and a loss), declared under the ``autoseg.plugins`` entry-point group."""

from tinyparts.parts import SOFT_DICE_L1, TINY_UNET

__all__ = ["SOFT_DICE_L1", "TINY_UNET"]
