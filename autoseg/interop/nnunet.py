"""Import a trained nnU-Net v2 model folder as an autoseg work folder, without nnU-Net and without running pickles.

The source is ``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG`` (``plans.json``, ``dataset.json``,
``fold_<k>/checkpoint_final.pth``). Each checkpoint is loaded with ``torch.load(weights_only=True)``; the numpy
scalars nnU-Net stores in its training log are the only non-tensor objects allowed (nothing else is ever
unpickled; ``postprocessing.pkl`` is never read). The checkpoint's keys decide what is supported: nnU-Net's plain
and residual-encoder U-Nets with instance norm, LeakyReLU and no dropout map one to one onto
:class:`~autoseg.networks.unet.UNet`; BatchNorm (``running_mean``), other architectures, dropout or other norms
are refused in one line.

The result is a work folder like one ``autoseg train`` writes::

    <workdir>/models/<configuration>/plans.json     (rules "nnunet": nnU-Net's numerical rules at inference)
    <workdir>/models/<configuration>/dataset.json   (the model's labels / regions)
    <workdir>/models/<configuration>/imported_from.json  (source files and their SHA-256, trainer, licence)
    <workdir>/models/<configuration>/fold_<k>/checkpoint_final.pt
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import ModelImportError
from autoseg.io.atomic import write_json_atomic
from autoseg.io.model_folder import FINAL, IMPORTED_FROM, configuration_folder, fold_folder, sha256
from autoseg.networks.checkpoint import CheckpointMeta, save_checkpoint
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet
from autoseg.planner.normalization import ChannelNormalization
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.planner.recipe import PartChoice, Recipe, has_regions
from autoseg.planner.resampling import ResamplingPlan

CHECKPOINT = "checkpoint_final.pth"
ARCHITECTURES = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}
NORMALIZATION = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none",
                 "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}
RESAMPLING_FN = "resample_data_or_seg_to_shape"
#: keys nnU-Net's networks register twice (the decoder's reference to the encoder, the conv blocks' module list)
_ALIASES = ("decoder.encoder.", ".all_modules.")


def _safe_globals() -> list[Any]:
    """The numpy objects nnU-Net's training log pickles (scalars, their dtypes), and nothing else."""
    scalar = np._core.multiarray.scalar
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Float32DType,
            np.dtypes.Float64DType]


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, loaded with ``weights_only=True`` (a file that needs code to load is refused).

    Raises:
        ModelImportError: missing, corrupt, or holding objects other than tensors, containers and numpy scalars.
    """
    if not path.is_file():
        raise ModelImportError(f"{path}: not found; the model folder needs fold_<k>/{CHECKPOINT}.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for corrupt or unsafe files
        first = str(err).strip().splitlines()
        unsafe = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if
                      first else type(err).__name__)
        raise ModelImportError(f"{path}: refused, it cannot be loaded safely ({unsafe}); nothing in it was run. "
                               "Only checkpoints holding tensors, plain containers and numpy scalars are "
                               "imported.") from err
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise ModelImportError(f"{path}: not an nnU-Net v2 checkpoint (no 'network_weights').")
    return state


@dataclass(frozen=True)
class NNUNetModel:
    """The readable facts of one nnU-Net model folder."""

    folder: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str
    trainer: str
    folds: tuple[str, ...]


def read_model_folder(folder: str | os.PathLike[str], folds: Sequence[int | str] | None = None) -> NNUNetModel:
    """Read ``plans.json``, ``dataset.json`` and find the folds of ``TRAINER__PLANS__CONFIG``.

    Raises:
        ModelImportError: files missing or malformed, a requested fold not trained, a cascade stage.
    """
    folder = Path(folder)
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ModelImportError(f"{folder}: not an nnU-Net v2 model folder; give nnUNet_results/DatasetXXX_Name/"
                               "TRAINER__PLANS__CONFIGURATION.")
    plans, dataset = (_read_json(folder / name) for name in ("plans.json", "dataset.json"))
    found = sorted(p.parent.name[len("fold_"):] for p in folder.glob(f"fold_*/{CHECKPOINT}"))
    wanted = [str(f) for f in folds] if folds else found
    missing = [f for f in wanted if f not in found]
    if not wanted or missing:
        raise ModelImportError(f"{folder}: no fold_{'/'.join(missing) or '<k>'}/{CHECKPOINT}; trained folds: "
                               f"{', '.join(found) or 'none'}.")
    configuration = parts[2]
    if configuration not in plans.get("configurations", {}):
        raise ModelImportError(f"{folder / 'plans.json'}: has no configuration {configuration!r}.")
    return NNUNetModel(folder, plans, dataset, configuration, parts[0], tuple(wanted))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelImportError(f"{path}: cannot be read as JSON ({err}); the nnU-Net model folder is "
                               "incomplete.") from err
    if not isinstance(data, dict):
        raise ModelImportError(f"{path}: not a JSON object.")
    return data


def configuration_entry(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration of nnU-Net's plans with its ``inherits_from`` chain resolved."""
    configs, seen = plans["configurations"], []
    entry = dict(configs[name])
    while "inherits_from" in entry:
        parent = entry.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ModelImportError(f"plans.json: configuration {name!r} inherits from {parent!r}, which is missing "
                                   "or circular.")
        seen.append(parent)
        entry = {**configs[parent], **entry}
    return entry


def check_supported(model: NNUNetModel, entry: dict[str, Any]) -> str:
    """The block type of a supported model; otherwise a one-line refusal naming what was found.

    Raises:
        ModelImportError: a cascade stage, another architecture, reader, preprocessor or resampling function.
    """
    where = model.folder / "plans.json"
    if entry.get("previous_stage"):
        raise ModelImportError(f"{where}: {model.configuration!r} is the second stage of a cascade (previous stage "
                               f"{entry['previous_stage']!r}); cascades are not imported yet, import 3d_fullres.")
    arch = entry.get("architecture", {})
    cls = str(arch.get("network_class_name", "")).rsplit(".", 1)[-1]
    if cls not in ARCHITECTURES:
        raise ModelImportError(f"{where}: architecture {cls or '(none)'!r} is not supported; only "
                               f"{', '.join(ARCHITECTURES)} are imported.")
    reader = model.plans.get("image_reader_writer", "SimpleITKIO")
    if "Reorient" in str(reader):
        raise ModelImportError(f"{where}: image reader {reader!r} reorients images; only readers that keep the "
                               "file's orientation (SimpleITKIO, NibabelIO, ...) are supported.")
    if entry.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise ModelImportError(f"{where}: preprocessor {entry['preprocessor_name']!r} is not supported.")
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        if entry.get(key, RESAMPLING_FN) != RESAMPLING_FN:
            raise ModelImportError(f"{where}: {key} {entry[key]!r} is not supported (only {RESAMPLING_FN}).")
    return ARCHITECTURES[cls]


def check_layers(arch_kwargs: dict[str, Any], source: Path) -> None:
    """Refuse dropout, norms other than affine instance norm, nonlinearities other than LeakyReLU(0.01)."""
    norm, nonlin = str(arch_kwargs.get("norm_op", "")), str(arch_kwargs.get("nonlin", ""))
    problems = []
    if arch_kwargs.get("dropout_op"):
        problems.append(f"dropout {arch_kwargs['dropout_op']}")
    if "InstanceNorm" not in norm or not (arch_kwargs.get("norm_op_kwargs") or {}).get("affine", False):
        problems.append(f"norm {norm or '(none)'}")
    slope = (arch_kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 0.01)
    if not nonlin.endswith("LeakyReLU") or slope != 0.01:
        problems.append(f"nonlinearity {nonlin or '(none)'} (slope {slope})")
    if not arch_kwargs.get("conv_bias", False):
        problems.append("convolutions without bias")
    if problems:
        raise ModelImportError(f"{source}: {', '.join(problems)} not supported; only instance norm, LeakyReLU(0.01), "
                               "biased convolutions and no dropout are imported.")


def topology_of(arch_kwargs: dict[str, Any], block: str) -> UNetTopology:
    """autoseg's topology of nnU-Net's U-Net (decoder convs reversed: nnU-Net counts from the deepest stage)."""
    blocks = arch_kwargs["n_blocks_per_stage"] if block == "residual" else arch_kwargs["n_conv_per_stage"]
    n = int(arch_kwargs["n_stages"])
    as_list = (lambda v: [v] * n if isinstance(v, int) else list(v))  # noqa: E731 - nnU-Net allows a scalar
    decoder = arch_kwargs["n_conv_per_stage_decoder"]
    decoder = [decoder] * (n - 1) if isinstance(decoder, int) else list(decoder)
    return UNetTopology(strides=tuple(tuple(int(v) for v in _vec(s, arch_kwargs)) for s in as_list(arch_kwargs["strides"])),
                        kernel_sizes=tuple(tuple(int(v) for v in _vec(k, arch_kwargs)) for k in
                                           as_list(arch_kwargs["kernel_sizes"])),
                        features_per_stage=tuple(int(v) for v in as_list(arch_kwargs["features_per_stage"])),
                        n_blocks_per_stage=tuple(int(v) for v in as_list(blocks)),
                        n_conv_per_stage_decoder=tuple(int(v) for v in decoder[::-1]), block=block).check()


def _vec(v: Any, arch_kwargs: dict[str, Any]) -> list[int]:
    nd = 3 if str(arch_kwargs.get("conv_op", "")).endswith("3d") else 2
    return [int(v)] * nd if isinstance(v, int) else list(v)


def key_table(topo: UNetTopology) -> dict[str, str]:
    """nnU-Net's state-dict key -> autoseg's, for every parameter of the network."""
    table: dict[str, str] = {}

    def unit(src: str, dst: str, bias: bool = True) -> None:
        for p in ("weight", "bias") if bias else ("weight",):
            table[f"{src}.conv.{p}"] = f"{dst}.0.{p}"
        for p in ("weight", "bias"):
            table[f"{src}.norm.{p}"] = f"{dst}.1.{p}"

    feats, n = topo.features_per_stage, topo.n_stages
    if topo.block == "plain":
        for i, nb in enumerate(topo.n_blocks_per_stage):
            for j in range(nb):
                unit(f"encoder.stages.{i}.0.convs.{j}", f"encoder.{i}.{j}")
    else:
        unit("encoder.stem.convs.0", "stem")
        for i, nb in enumerate(topo.n_blocks_per_stage):
            for b in range(nb):
                _residual_block(table, unit, i, b, topo, feats[i - 1] if i else feats[0])
    for j in range(n - 1):
        s = n - 2 - j
        for p in ("weight", "bias"):
            table[f"decoder.transpconvs.{j}.{p}"] = f"upsample.{s}.{p}"
            table[f"decoder.seg_layers.{j}.{p}"] = f"heads.{s}.{p}"
        for c in range(topo.n_conv_per_stage_decoder[s]):
            unit(f"decoder.stages.{j}.convs.{c}", f"decoder.{s}.{c}")
    return table


def _residual_block(table: dict[str, str], unit: Any, i: int, b: int, topo: UNetTopology, cin: int) -> None:
    src, dst = f"encoder.stages.{i}.blocks.{b}", f"encoder.{i}.{b}"
    unit(f"{src}.conv1", f"{dst}.unit")
    for p in ("weight", "bias"):
        table[f"{src}.conv2.conv.{p}"] = f"{dst}.conv.{p}"
        table[f"{src}.conv2.norm.{p}"] = f"{dst}.norm.{p}"
    if b == 0:
        strided = any(s != 1 for s in topo.strides[i])
        if cin != topo.features_per_stage[i]:
            k = int(strided)
            table[f"{src}.skip.{k}.conv.weight"] = f"{dst}.skip.{k}.weight"
            for p in ("weight", "bias"):
                table[f"{src}.skip.{k}.norm.{p}"] = f"{dst}.skip.{k + 1}.{p}"


def map_weights(weights: dict[str, torch.Tensor], topo: UNetTopology, source: Path) -> dict[str, torch.Tensor]:
    """nnU-Net's weights under autoseg's names; refuses BatchNorm and any key without a counterpart.

    Raises:
        ModelImportError: BatchNorm statistics, or keys of another architecture (the first unknown one named).
    """
    keys = [k for k in weights if not any(a in k for a in _ALIASES)]
    bn = next((k for k in keys if k.endswith(("running_mean", "running_var", "num_batches_tracked"))), None)
    if bn is not None:
        raise ModelImportError(f"{source}: BatchNorm found (key {bn!r}, e.g. nnUNetTrainerBN); only instance-norm "
                               "networks are imported.")
    table = key_table(topo)
    unknown = [k for k in keys if k not in table]
    absent = [k for k in table if k not in weights]
    if unknown or absent:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {absent[0]!r}"
        raise ModelImportError(f"{source}: the weights are not those of the U-Net its plans describe ({what}, "
                               f"{len(unknown)} unknown, {len(absent)} missing); other architectures are not "
                               "imported.")
    return {table[k]: weights[k].detach().clone().float() for k in keys}


def _normalization(model: NNUNetModel, entry: dict[str, Any]) -> tuple[ChannelNormalization, ...]:
    channels = model.dataset.get("channel_names") or model.dataset.get("modality") or {}
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    props = model.plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for i, (name, scheme) in enumerate(zip(names, entry["normalization_schemes"], strict=True)):
        if scheme not in NORMALIZATION:
            raise ModelImportError(f"{model.folder / 'plans.json'}: normalization {scheme!r} of channel {name!r} is "
                                   f"not supported ({', '.join(NORMALIZATION)} are).")
        st = props.get(str(i), {})
        out.append(ChannelNormalization(
            channel=name, scheme=NORMALIZATION[scheme], use_mask=bool(entry["use_mask_for_norm"][i]),
            clip_low=float(st.get("percentile_00_5", 0.0)), clip_high=float(st.get("percentile_99_5", 0.0)),
            mean=float(st.get("mean", 0.0)), std=float(st.get("std", 1.0))))
    return tuple(out)


def _resampling(entry: dict[str, Any]) -> ResamplingPlan:
    data, seg = entry.get("resampling_fn_data_kwargs", {}), entry.get("resampling_fn_seg_kwargs", {})
    probs = entry.get("resampling_fn_probabilities_kwargs", {})
    forces = {kw.get("force_separate_z") for kw in (data, seg, probs)}
    if len(forces) > 1 or len({kw.get("order_z", 0) for kw in (data, seg, probs)}) > 1:
        raise ModelImportError("plans.json: the image, segmentation and probability resampling disagree on "
                               "force_separate_z or order_z; only one setting for all three is supported.")
    return ResamplingPlan(order_image=int(data.get("order", 3)), order_seg=int(seg.get("order", 1)),
                          order_probabilities=int(probs.get("order", 1)), order_z=int(data.get("order_z", 0)),
                          force_separate_z=forces.pop())


def convert_plans(model: NNUNetModel, mirror_axes: Sequence[int]) -> Plans:
    """autoseg's plans of the imported configuration (rules ``nnunet``)."""
    entry = configuration_entry(model.plans, model.configuration)
    block = check_supported(model, entry)
    ak = entry["architecture"]["arch_kwargs"]
    check_layers(ak, model.folder / "plans.json")
    topo = topology_of(ak, block)
    patch = tuple(int(v) for v in entry["patch_size"])
    shift = 3 - len(patch)  # a recipe numbers 3D axes; a 2D configuration's are the last two
    recipe = Recipe(network=PartChoice("unet" if block == "plain" else "resenc_unet"),
                    loss=PartChoice("dice_bce" if has_regions(model.dataset["labels"]) else "dice_ce"),
                    mirror_axes=tuple(int(a) + shift for a in mirror_axes))
    config = ConfigurationPlan(
        name=model.configuration, data_identifier=str(entry.get("data_identifier", model.configuration)),
        spacing=tuple(float(v) for v in entry["spacing"]),
        median_shape=tuple(float(v) for v in entry.get("median_image_size_in_voxels", patch)),
        patch_size=patch, batch_size=int(entry.get("batch_size", 2)), topology=topo,
        normalization=_normalization(model, entry), resampling=_resampling(entry),
        batch_dice=bool(entry.get("batch_dice", False)),
        decisions=(f"imported from nnU-Net v2 ({model.folder.name}); nnU-Net's numerical rules apply",),
        recipe=recipe, rules="nnunet")
    channels = model.dataset.get("channel_names") or model.dataset.get("modality") or {}
    return Plans(
        dataset_name=str(model.plans.get("dataset_name", model.folder.parent.name)),
        preset=f"nnunet:{model.plans.get('plans_name', 'nnUNetPlans')}", gpu_memory_gb=8.0, seed=0,
        channel_names=tuple(str(channels[k]) for k in sorted(channels, key=int)), labels=dict(model.dataset["labels"]),
        num_training=int(model.dataset.get("numTraining", 0)),
        transpose_forward=tuple(int(v) for v in model.plans["transpose_forward"]),
        transpose_backward=tuple(int(v) for v in model.plans["transpose_backward"]),
        original_median_spacing=tuple(float(v) for v in model.plans.get("original_median_spacing_after_transp", ())),
        original_median_shape=tuple(float(v) for v in model.plans.get("original_median_shape_after_transp", ())),
        configurations={model.configuration: config},
        decisions=(f"imported from nnU-Net v2 model folder {model.folder.parent.name}/{model.folder.name}",))


def _num_outputs(labels: dict[str, Any]) -> int:
    entries = {k: v for k, v in labels.items() if k != "ignore"}
    if has_regions(labels):
        return sum(1 for v in entries.values() if v != 0 and v != [0])
    return max(int(v) for v in entries.values()) + 1


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
    in_channels, num_outputs = len(plans.channel_names), _num_outputs(plans.labels)
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


def provenance(model: NNUNetModel) -> dict[str, Any]:
    """The source: trainer, plans, configuration, every file used with its SHA-256, the dataset's licence text."""
    files = ["plans.json", "dataset.json", *[f"fold_{f}/{CHECKPOINT}" for f in model.folds]]
    if (model.folder / "dataset_fingerprint.json").is_file():
        files.append("dataset_fingerprint.json")
    out = {"framework": "nnU-Net v2", "model_folder": f"{model.folder.parent.name}/{model.folder.name}",
           "trainer": model.trainer, "plans": model.plans.get("plans_name"), "configuration": model.configuration,
           "folds": list(model.folds), "files": {name: sha256(model.folder / name) for name in files}}
    for key in ("licence", "license", "reference", "citation", "release"):
        if key in model.dataset:
            out[key] = model.dataset[key]
    for name in ("LICENSE", "LICENSE.txt", "LICENCE", "license.txt"):
        for base in (model.folder, model.folder.parent):
            if (base / name).is_file():
                out["licence_text"] = (base / name).read_text(errors="replace")
    return out
