"""A trained model in memory: load the folds of a configuration from a work folder and segment new images.

    >>> from autoseg.inference.predictor import Predictor
    >>> p = Predictor.from_workdir("autoseg_work/Dataset001", "3d_fullres", folds=(0, 1))  # doctest: +SKIP
    >>> seg = p.predict(images, geometry)   # images (C, z, y, x) as read; seg in the same layout  # doctest: +SKIP

Each input is preprocessed exactly like the training cases (the same function), every fold predicts it with
the sliding window (mirroring over the axes the model was trained with), the logits of the folds are
averaged, and the result is exported back to the input's grid. Cascade stages are not handled here yet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.errors import AutosegError
from autoseg.inference.export import LabelLayout, export_segmentation
from autoseg.inference.sliding_window import predict_logits
from autoseg.io.dataset import read_dataset_json
from autoseg.io.image import Geometry
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.preprocessing.preprocess import preprocess_arrays
from autoseg.training.checkpoint import FINAL, load_checkpoint


class ModelNotFoundError(AutosegError, FileNotFoundError):
    """No trained fold where the predictor looked."""


@dataclass
class Predictor:
    """The networks of one configuration's folds and everything needed to apply them.

    Attributes:
        plans: the plans the models were trained with.
        config: the configuration.
        layout: how outputs map to labels.
        networks: one network per fold (evaluation mode, deep supervision off).
        mirror_axes: axes mirrored at test time (empty = no test-time augmentation).
        device: where the networks run.
        step_size: sliding-window step as a fraction of the patch.
    """

    plans: Plans
    config: ConfigurationPlan
    layout: LabelLayout
    networks: list[torch.nn.Module]
    mirror_axes: tuple[int, ...]
    device: torch.device
    step_size: float = 0.5

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike[str], configuration: str = "3d_fullres", *,
                     folds: Sequence[int | str] | None = None, device: str = "auto", tta: bool = True,
                     step_size: float = 0.5) -> Predictor:
        """Load the final checkpoints of ``folds`` (default: every trained fold) of a configuration.

        Raises:
            ModelNotFoundError: no final checkpoint for a requested fold (the message lists what exists).
            PlanningError: the configuration is not in the plans.
        """
        from autoseg.networks.unet import build_network
        from autoseg.training.run import resolve_device

        model_dir = Path(workdir) / "models" / configuration
        plans = Plans.load(model_dir / "plans.json") if (model_dir / "plans.json").is_file() else \
            Plans.load(Path(workdir) / "plans.json")
        config = plans.configuration(configuration)
        trained = sorted(p.parent.name[len("fold_"):] for p in model_dir.glob(f"fold_*/{FINAL}"))
        wanted = [str(f) for f in folds] if folds is not None else trained
        missing = [f for f in wanted if f not in trained]
        if not wanted or missing:
            raise ModelNotFoundError(
                f"{model_dir}: no finished fold {', '.join(missing) or '(none trained)'}; trained folds: "
                f"{', '.join(trained) or 'none'}. Train it with `autoseg train DATASET {configuration} FOLD`.")
        spec_path = model_dir / "dataset.json"
        order = read_dataset_json(spec_path).regions_class_order if spec_path.is_file() else None
        layout = LabelLayout.from_labels(plans.labels, order)
        dev = resolve_device(device)
        networks, mirror = [], None
        for f in wanted:
            ckpt = load_checkpoint(model_dir / f"fold_{f}" / FINAL, map_location="cpu")
            net = build_network(config, in_channels=int(ckpt["in_channels"]), num_classes=int(ckpt["num_outputs"]),
                                deep_supervision=False)
            net.load_state_dict(ckpt["network"])
            networks.append(net.to(dev).eval())
            mirror = tuple(ckpt.get("mirror_axes", ())) if mirror is None else mirror
        return cls(plans, config, layout, networks, mirror if tta else (), dev, step_size)

    def predict_logits(self, images: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, object]:
        """Fold-averaged logits on the preprocessed grid and the preprocessing record."""
        pre = preprocess_arrays(images.astype(np.float32, copy=False), None, geometry, self.plans, self.config)
        total = None
        for net in self.networks:
            logits = predict_logits(net, pre.data, patch_size=self.config.patch_size,
                                    num_outputs=self.layout.num_outputs, step_size=self.step_size,
                                    mirror_axes=self.mirror_axes, device=self.device,
                                    amp=self.device.type == "cuda")
            total = logits if total is None else total + logits
        return (total / len(self.networks)).numpy(), pre.properties

    def predict(self, images: np.ndarray, geometry: Geometry | Sequence[float]) -> np.ndarray:
        """Segment one case.

        Args:
            images: ``(C, *spatial)`` channels in file layout (numpy ``z, y, x``), as ``read_image`` returns.
            geometry: the images' :class:`Geometry`, or just their spacing in numpy axis order.

        Returns:
            The label map, spatial shape of ``images``.
        """
        if not isinstance(geometry, Geometry):
            geometry = Geometry.from_array_spacing(tuple(float(s) for s in geometry))
        logits, props = self.predict_logits(images, geometry)
        seg, _ = export_segmentation(logits, props, self.plans, self.config, self.layout)
        return seg
