"""A trained model in memory: load the folds of a configuration from a work folder and segment new images.

    >>> from autoseg.inference.predictor import Predictor
    >>> p = Predictor.from_workdir("autoseg_work/Dataset001", "3d_fullres", folds=(0, 1))  # doctest: +SKIP
    >>> seg = p.predict(images, geometry)   # images (C, z, y, x) as read; seg in the same layout  # doctest: +SKIP

Each input is preprocessed exactly like the training cases (the same function), every fold predicts it with
the sliding window (mirroring over the axes the model was trained with), the logits of the folds are
averaged, and the result is exported back to the input's grid. A cascade stage first runs its first stage and
feeds that segmentation as extra one-hot channels, exactly as in training.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.device import Runtime
from autoseg.errors import ModelNotFoundError
from autoseg.inference.export import LabelLayout, export_segmentation
from autoseg.inference.model import network_from_checkpoint
from autoseg.inference.settings import InferenceSettings
from autoseg.inference.sliding_window import InferenceError, inference_network, predict_logits
from autoseg.inference.uncertainty import MemberOutputs, predict_members
from autoseg.io.dataset import read_dataset_json
from autoseg.io.image import Geometry
from autoseg.io.model_folder import FINAL, configuration_folder, is_bundle, trained_folds
from autoseg.networks.checkpoint import CheckpointMeta, load_checkpoint
from autoseg.networks.error_head import ErrorOutput, error_head_of
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.plugins.channels import ChannelAppender
from autoseg.preprocessing.cascade import one_hot, previous_stage_to_grid
from autoseg.preprocessing.preprocess import PreprocessedArrays, preprocess_arrays
from autoseg.preprocessing.properties import CaseProperties


@dataclass
class Predictor:
    """The networks of one configuration's folds and everything needed to apply them.

    Attributes:
        plans: the plans the models were trained with.
        config: the configuration.
        layout: how outputs map to labels.
        networks: one network per fold, as :func:`inference_network` prepares it (a traced, optimised graph
            for float32 on the CPU).
        mirror_axes: axes mirrored at test time (empty = no test-time augmentation).
        device: where the networks run.
        step_size: sliding-window step as a fraction of the patch.
        amp: mixed precision (fp16 on CUDA, bf16 on CPU); accumulation stays float32.
        folds: the fold names of ``networks``.
        previous: the first stage of a cascade (its segmentation becomes extra input channels), or None.
        cascade_labels: labels one-hot encoded from the first stage's segmentation.
        channels: the channel plugins' fitted states (``models/<config>/plugins/``), or None without any.
        error_networks: per fold, the network returning its learned error head's logit as one more channel (None
            for a fold without one; empty when no fold has one), used by :meth:`members`.
    """

    plans: Plans
    config: ConfigurationPlan
    layout: LabelLayout
    networks: list[Callable[[torch.Tensor], torch.Tensor]]
    mirror_axes: tuple[int, ...]
    device: torch.device
    step_size: float = 0.5
    amp: bool = False
    folds: tuple[str, ...] = ()
    previous: Predictor | None = None
    cascade_labels: tuple[int, ...] = ()
    channels: ChannelAppender | None = None
    error_networks: tuple[Callable[[torch.Tensor], torch.Tensor] | None, ...] = ()

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike[str], configuration: str = "3d_fullres", *,
                     folds: Sequence[int | str] | None = None, settings: InferenceSettings | None = None,
                     **knobs: Any) -> Predictor:
        """Load the final checkpoints of ``folds`` (default: every trained fold) of a configuration.

        A cascade stage (``3d_cascade_fullres``) also loads every trained fold of its first stage, whose
        segmentation is fed to it as extra channels, as in training.

        Args:
            workdir: the work folder (``models/<configuration>/fold_*/checkpoint_final.pt``).
            configuration: which configuration.
            folds: fold names (``0``, ``"all"``); the logits of several folds are averaged.
            settings: device, ``tta``, ``step_size``, ``amp``, ``backend`` (:class:`InferenceSettings`);
                ``knobs`` replace single fields, e.g. ``device="cpu", tta=False``. ``backend="onnx"`` runs ONNX
                Runtime sessions: a bundle's ``network.onnx`` files, or in a work folder exported next to the
                checkpoints on first use.

        Raises:
            ModelNotFoundError: no final checkpoint for a requested fold (the message lists what exists).
            PlanningError: the configuration is not in the plans.
            PluginError: the plans add plugin channels whose fitted state is missing from the model folder.
        """
        from autoseg.inference.onnx_backend import check_backend

        settings = InferenceSettings.create(settings, **knobs)
        check_backend(settings.backend)
        model_dir = configuration_folder(Path(workdir), configuration)
        plans = _load_plans(Path(workdir), model_dir, configuration)
        config = plans.configuration(configuration)
        wanted = _wanted_folds(model_dir, configuration, folds)
        spec_path = model_dir / "dataset.json"
        order = read_dataset_json(spec_path).regions_class_order if spec_path.is_file() else None
        layout = LabelLayout.from_labels(plans.labels, order)
        runtime = settings.runtime()
        networks, errors, metas = [], [], []
        for f in wanted:
            network, error, meta = _load_fold(Path(workdir), model_dir / f"fold_{f}", config, runtime,
                                              settings.backend)
            networks.append(network)
            errors.append(error)
            metas.append(meta)
        previous = None
        if config.previous_stage:
            previous = cls.from_workdir(workdir, str(config.previous_stage), settings=replace(settings, folds=None))
        return cls(plans, config, layout, networks, metas[0].mirror_axes if settings.mirroring else (), runtime.device,
                   settings.window_step, runtime.amp,
                   tuple(wanted), previous, metas[0].cascade_labels, ChannelAppender.load(plans, config, model_dir),
                   tuple(errors) if any(e is not None for e in errors) else ())

    def preprocess(self, images: np.ndarray, geometry: Geometry, missing: Sequence[int] = ()) -> PreprocessedArrays:
        """Preprocess one case exactly as the training cases were (the cascade's first stage runs here).

        ``missing`` channels (indices) are blanked after normalisation, as modality dropout does in training;
        channel plugins then compute their channels from the blanked data.
        """
        pre = preprocess_arrays(images, None, geometry, self.plans, self.config, missing=missing)  # any real type
        if self.channels is not None:
            pre = dataclasses.replace(pre, data=self.channels.append(pre.data))
        if self.previous is None:
            return pre
        first = self.previous.predict(images, geometry, missing=missing)
        rs = self.config.resampling
        grid = previous_stage_to_grid(first, pre.properties, self.plans, rs.order_seg, rs.order_z)
        return dataclasses.replace(pre, data=np.concatenate([pre.data, one_hot(grid, self.cascade_labels)]))

    def logits(self, data: np.ndarray) -> np.ndarray:
        """Fold-averaged logits of preprocessed data (``(C, *grid)`` -> ``(K, *grid)`` float32)."""
        total = None
        with torch.inference_mode():  # outputs are inference tensors: summing them in place needs this mode
            for net in self.networks:
                out = predict_logits(net, data, patch_size=self.config.patch_size,
                                     num_outputs=self.layout.num_outputs, step_size=self.step_size,
                                     mirror_axes=self.mirror_axes, device=self.device, amp=self.amp,
                                     rules=self.config.rules)
                total = out if total is None else total.add_(out)
            if len(self.networks) > 1:
                total /= len(self.networks)
        return total.numpy()

    def members(self, data: np.ndarray) -> MemberOutputs:
        """Like :meth:`logits`, plus how the folds and mirror variants agree (see :func:`predict_members`)."""
        return predict_members(self.networks, data, patch_size=self.config.patch_size, layout=self.layout,
                               mirror_axes=self.mirror_axes, step_size=self.step_size, device=self.device,
                               amp=self.amp, error_networks=self.error_networks or None, rules=self.config.rules)

    def predict_logits(self, images: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, CaseProperties]:
        """Fold-averaged logits on the preprocessed grid and the preprocessing record."""
        pre = self.preprocess(images, geometry)
        return self.logits(pre.data), pre.properties

    def export(self, logits: np.ndarray, props: CaseProperties, *, probabilities: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Segmentation (and optionally probabilities) in the input's array layout."""
        return export_segmentation(logits, props, self.plans, self.config, self.layout,
                                   return_probabilities=probabilities)

    def predict(self, images: np.ndarray, geometry: Geometry | Sequence[float], *, missing: Sequence[int] = ()
                ) -> np.ndarray:
        """Segment one case.

        Args:
            images: ``(C, *spatial)`` channels in file layout (numpy ``z, y, x``), as ``read_image`` returns.
            geometry: the images' :class:`Geometry`, or just their spacing in numpy axis order.
            missing: indices of channels that were not acquired (their content is ignored).

        Returns:
            The label map, spatial shape of ``images``.
        """
        images, geometry = self.check_images(images, geometry)
        pre = self.preprocess(images, geometry, missing)
        return self.export(self.logits(pre.data), pre.properties)[0]

    def check_images(self, images: np.ndarray, geometry: Geometry | Sequence[float]) -> tuple[np.ndarray, Geometry]:
        """``images`` as an array and ``geometry`` as a :class:`Geometry`, checked against the model's inputs.

        Raises:
            InferenceError: wrong number of channels or dimensions (the message says what to pass).
        """
        if not isinstance(geometry, Geometry):
            geometry = Geometry.from_array_spacing(tuple(float(s) for s in geometry))
        images = np.asarray(images)
        n_in = len(self.plans.channel_names)
        if images.ndim != geometry.ndim + 1 or images.shape[0] != n_in:
            raise InferenceError(
                f"images of shape {images.shape}: the model takes {n_in} channel(s) "
                f"({', '.join(self.plans.channel_names)}) of {geometry.ndim}D images; pass (C, *spatial) with "
                f"C = {n_in} (add a leading axis for a single channel).")
        return images, geometry


def _load_plans(workdir: Path, model_dir: Path, configuration: str) -> Plans:
    """The plans a configuration was trained with (its model folder's copy, else the work folder's)."""
    for path in (model_dir / "plans.json", workdir / "plans.json"):
        if path.is_file():
            return Plans.load(path)
    raise ModelNotFoundError(f"{workdir}: no plans.json and no models/{configuration}; this is not an "
                             "autoseg work folder. Pass the --workdir given to `autoseg train`.")


def _wanted_folds(model_dir: Path, configuration: str, folds: Sequence[int | str] | None) -> list[str]:
    trained = trained_folds(model_dir)
    wanted = [str(f) for f in folds] if folds is not None else trained
    missing = [f for f in wanted if f not in trained]
    if not wanted or missing:
        raise ModelNotFoundError(
            f"{model_dir}: no finished fold {', '.join(missing) or '(none trained)'}; trained folds: "
            f"{', '.join(trained) or 'none'}. Train it with `autoseg train DATASET {configuration} FOLD`.")
    return wanted


def _load_fold(workdir: Path, fold_dir: Path, config: ConfigurationPlan, runtime: Runtime, backend: str
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None,
                          CheckpointMeta]:
    """One fold's network, ready for the sliding window, the same network returning its error head's logit as
    one more channel (None without an error head, and with ONNX, which exports the segmentation alone), and its
    checkpoint's description."""
    ckpt = load_checkpoint(fold_dir / FINAL, map_location="cpu")
    if backend == "onnx":  # a bundle's files are fixed: no export there, only a clear error
        from autoseg.inference.onnx_backend import load_fold_onnx

        meta = CheckpointMeta.from_json(ckpt, fold_dir / FINAL)
        return load_fold_onnx(fold_dir, config, device=runtime.device, cache=not is_bundle(workdir)), None, meta
    net, meta = network_from_checkpoint(ckpt, config, fold_dir / FINAL)
    kw = {"in_channels": meta.in_channels, "patch_size": config.patch_size, "device": runtime.device,
          "amp": runtime.amp}
    network = inference_network(net.to(runtime.device), **kw)
    error = inference_network(ErrorOutput(net), **kw) if error_head_of(net) is not None else None
    return network, error, meta