"""Import a trained nnU-Net v2 model folder as an autoseg work folder, without nnU-Net and without running pickles.

The source is ``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG`` (``plans.json``, ``dataset.json``,
``fold_<k>/checkpoint_final.pth``), read and checked by :mod:`autoseg.interop.nnunet_reader` (safe loading,
refusals) and turned into autoseg's plans and U-Net weights by :mod:`autoseg.interop.nnunet_converter`.

The result is a work folder like one ``autoseg train`` writes::

    <workdir>/models/<configuration>/plans.json     (rules "nnunet": nnU-Net's numerical rules at inference)
    <workdir>/models/<configuration>/dataset.json   (the model's labels / regions)
    <workdir>/models/<configuration>/imported_from.json  (source files and their SHA-256, trainer, licence)
    <workdir>/models/<configuration>/fold_<k>/checkpoint_final.pt
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autoseg.errors import ModelImportError
from autoseg.interop.nnunet_converter import convert_plans, map_weights, network_outputs
from autoseg.interop.nnunet_reader import (
    CHECKPOINT,
    NNUNetModel,
    check_layers,
    load_nnunet_checkpoint,
    provenance,
    read_model_folder,
)
from autoseg.io.atomic import write_json_atomic
from autoseg.io.model_folder import FINAL, IMPORTED_FROM, configuration_folder, fold_folder
from autoseg.networks.checkpoint import CheckpointMeta, save_checkpoint
from autoseg.networks.unet import UNet
from autoseg.planner.plans import Plans


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_nnunet` wrote."""

    workdir: Path
    configuration: str
    folds: tuple[str, ...]
    block: str
    mirror_axes: tuple[int, ...]

    def summary(self) -> str:
        return (f"imported nnU-Net {self.configuration} ({'ResEnc' if self.block == 'residual' else 'plain'} U-Net), "
                f"folds {', '.join(self.folds)}, mirror axes {self.mirror_axes or 'none'} -> {self.workdir}; "
                f"next: autoseg predict -i IMAGES -o OUT --workdir {self.workdir} -c {self.configuration}")


def import_nnunet(folder: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                  folds: Sequence[int | str] | None = None) -> ImportReport:
    """Import an nnU-Net v2 model folder into ``workdir`` (see the module docstring for what is written).

    Raises:
        ModelImportError: unsupported or unsafe model (one line naming what was found); nothing is written then.
    """
    model = read_model_folder(folder, folds)
    states = {f: load_nnunet_checkpoint(model.folder / f"fold_{f}" / CHECKPOINT) for f in model.folds}
    first = states[model.folds[0]]
    mirror = tuple(int(a) for a in first.get("inference_allowed_mirroring_axes") or ())
    own = (first.get("init_args") or {}).get("plans", {})  # the checkpoint's own copy decides the layers
    own_entry = own.get("configurations", {}).get(model.configuration, {}).get("architecture", {})
    if own_entry:
        check_layers(own_entry.get("arch_kwargs", {}), model.folder / f"fold_{model.folds[0]}" / CHECKPOINT)
    plans = convert_plans(model, mirror)
    config = plans.configuration(model.configuration)
    in_channels, num_outputs = len(plans.channel_names), network_outputs(plans.labels)
    networks = {}
    for f, state in states.items():
        ck = model.folder / f"fold_{f}" / CHECKPOINT
        weights = map_weights(state["network_weights"], config.topology, ck)
        net = UNet(config.topology, in_channels=in_channels, num_classes=num_outputs, deep_supervision=False)
        try:
            net.load_state_dict(weights)
        except RuntimeError as err:
            raise ModelImportError(f"{ck}: the weights do not fit the U-Net of plans.json "
                                   f"({str(err).splitlines()[-1].strip()}).") from err
        networks[f] = net.state_dict()
    return _write(model, plans, networks, mirror, in_channels, num_outputs, Path(workdir))


def _write(model: NNUNetModel, plans: Plans, networks: dict[str, dict[str, torch.Tensor]], mirror: tuple[int, ...],
           in_channels: int, num_outputs: int, workdir: Path) -> ImportReport:
    config = plans.configuration(model.configuration)
    target = configuration_folder(workdir, model.configuration)
    target.mkdir(parents=True, exist_ok=True)
    plans.save(target / "plans.json")
    _merge_workdir_plans(workdir / "plans.json", plans)
    write_json_atomic(target / "dataset.json", model.dataset)
    write_json_atomic(target / IMPORTED_FROM, provenance(model))
    for f, weights in networks.items():
        meta = CheckpointMeta(configuration=model.configuration, fold=f, in_channels=in_channels,
                              num_outputs=num_outputs, mirror_axes=mirror, recipe=config.recipe.to_json())
        folder = fold_folder(workdir, model.configuration, f)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(folder / FINAL, {"network": weights, **meta.to_json()})
    return ImportReport(workdir, model.configuration, model.folds, config.topology.block, mirror)


def _merge_workdir_plans(path: Path, plans: Plans) -> None:
    """The work folder's ``plans.json``: these plans, or an earlier import's with this configuration added."""
    if path.is_file():
        earlier = Plans.load(path)
        if earlier.transpose_forward != plans.transpose_forward or earlier.labels != plans.labels:
            raise ModelImportError(f"{path}: this work folder holds another dataset's model (other labels or axes); "
                                   "import into a new --workdir.")
        plans = dataclasses.replace(earlier, configurations={**earlier.configurations, **plans.configurations})
    plans.save(path)
