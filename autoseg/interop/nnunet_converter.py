"""nnU-Net v2's plans and weights in autoseg's terms: the U-Net topology, the state-dict keys, normalization,
resampling and the plans of the imported configuration (rules ``nnunet``: nnU-Net's numerical rules at inference).

nnU-Net's plain and residual-encoder U-Nets with instance norm, LeakyReLU and no dropout map one to one onto
:class:`~autoseg.networks.unet.UNet`; weights holding BatchNorm statistics (``running_mean``) or keys of another
architecture are refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autoseg.errors import ModelImportError
from autoseg.interop.nnunet_reader import NNUNetModel, check_layers, check_supported, configuration_entry
from autoseg.networks.topology import UNetTopology
from autoseg.planner.normalization import ChannelNormalization
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.planner.recipe import PartChoice, Recipe, has_regions
from autoseg.planner.resampling import ResamplingPlan

NORMALIZATION = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none",
                 "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}
#: keys nnU-Net's networks register twice (the decoder's reference to the encoder, the conv blocks' module list)
_ALIASES = ("decoder.encoder.", ".all_modules.")


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


def network_outputs(labels: dict[str, Any]) -> int:
    """The network's output channels: one per region, or one per label value (background included)."""
    entries = {k: v for k, v in labels.items() if k != "ignore"}
    if has_regions(labels):
        return sum(1 for v in entries.values() if v != 0 and v != [0])
    return max(int(v) for v in entries.values()) + 1
