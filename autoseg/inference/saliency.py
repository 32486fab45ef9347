"""Spatial explanations of a segmentation network: Grad-CAM, Grad-CAM++, occlusion and attention-gate maps.

Every map lives on the preprocessed grid (the caller exports it to the input's geometry) and is built window
by window over the same Gaussian-weighted sliding window that prediction uses, so no method ever holds more
than one window batch of network activations, whatever the volume's size.

**Target.** For output (class or region) ``k`` and a mask ``M`` (the predicted mask, or the reference), the
explained score is the class's logits summed over the mask::

    T = sum over v in M of logit_k(v),   logit_k(v) = sum_w G_w(v) f_k(x_w)(v) / W(v)

(``G_w`` the Gaussian window weight, ``W`` the summed weights), so ``T`` is a sum of one term per window,
``T_w = sum_v M(v) G_w(v) / W(v) f_k(x_w)(v)``. Each method explains every ``T_w`` on its own window and the
window maps are added at their places; windows without a mask voxel contribute nothing and are skipped.

* ``gradcam`` (captum ``LayerGradCam``): ``relu(sum_c alpha_c A_c)`` with ``alpha_c`` the spatial mean of
  ``dT_w / dA_c`` for the activations ``A`` of the chosen layer, upsampled to the window (trilinear).
* ``gradcam++`` (own code on a forward hook; captum has no Grad-CAM++): the weights of Chattopadhay et al. 2018,
  ``alpha = g^2 / (2 g^2 + sum_s A g^3)``, ``w_c = sum_s alpha relu(g)``, map ``relu(sum_c w_c A_c)``.
* ``occlusion`` (captum ``Occlusion``): the drop of ``T_w`` when a block of the window (all channels) is set to
  0, the value of an absent channel after normalisation; captum averages the overlapping blocks per voxel.
  Memory: one window times ``batch`` occluded copies (and their activations) at a time, plus the grid-sized
  maps (``4 K V`` bytes); never the volume times the number of occluders (see :func:`saliency_maps`).
* ``attention``: the full-resolution gate of an attention U-Net (``network=attention_unet``), Gaussian-weighted
  over the windows like the logits; one map for every class. The gate has no class index: one sigmoid channel,
  computed from the skip and the coarser decoder features, multiplies every skip channel alike, and all classes
  are read from the gated features. Its class-specific counterpart is Grad-CAM at ``decoder.0`` (the default
  layer), the stage that reads the gated skip: its channel weights come from the class's gradient. A gate map
  multiplied by a class's Grad-CAM would mostly repeat the Grad-CAM, and Grad-CAM at the gate's own one-channel
  logit is the same picture for every class up to scale and sign, so neither is offered.

The default layer is ``decoder.0``, the last (full-resolution) decoder stage, whose features the 1x1 head turns
into logits: there Grad-CAM is close to the rectified logit map of the class. Deeper layers (``decoder.1``,
``encoder.3``) give coarser maps of what the network used further from the output. Without mirroring.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.errors import InferenceError, ModelNotFoundError
from autoseg.inference.windows import (
    axis_window_sums,
    divide_by_window_sums,
    gaussian_importance_map,
    window_profiles,
    window_starts,
    window_sums_at,
    window_tiles,
)

METHODS = ("gradcam", "gradcam++", "occlusion", "attention")
DEFAULT_LAYER = "decoder.0"
_STAGES = ("stem", "encoder", "upsample", "decoder")  # attention gates are called through .gate(): no hook output


def layer_names(network: nn.Module) -> list[str]:
    """The stage-level layers a map can be taken at (``encoder.i``, ``decoder.i``, ...; ``decoder.0`` is the
    last, full-resolution decoder stage)."""
    names = []
    for name, module in network.named_modules():
        parts = name.split(".")
        if parts[0] in _STAGES and len(parts) <= 2 and not isinstance(module, (nn.ModuleList, nn.Identity)):
            names.append(name)
    return names


def resolve_layer(network: nn.Module, name: str | None) -> nn.Module:
    """The module called ``name`` (default :data:`DEFAULT_LAYER`, else the last listed layer).

    Raises:
        InferenceError: no such layer (the message lists the valid names).
    """
    modules = dict(network.named_modules())
    valid = layer_names(network)
    wanted = name or (DEFAULT_LAYER if DEFAULT_LAYER in modules else (valid[-1] if valid else ""))
    if wanted not in modules or not wanted:
        raise InferenceError(f"layer {name!r} is not a layer of this {type(network).__name__}; valid layers: "
                             f"{', '.join(valid) or '(none)'}. Pass one of them with --layer.")
    return modules[wanted]


def check_method(method: str, network: nn.Module) -> None:
    """Refuse an unknown method, or ``attention`` on a network without attention gates (one line)."""
    if method not in METHODS:
        raise InferenceError(f"explanation method {method!r} is unknown; choose one of shapley, "
                             f"{', '.join(METHODS)}.")
    if method == "attention" and not hasattr(network, "attention_maps"):
        raise InferenceError(f"attention maps need attention gates, and this network ({type(network).__name__}) "
                             "has none; train with --recipe network=attention_unet, or use --method gradcam.")


def _captum() -> object:
    try:
        import captum.attr
    except ImportError as exc:
        raise InferenceError("gradcam and occlusion maps need captum: pip install 'autoseg[explain]'") from exc
    return captum.attr


def _score_fn(network: nn.Module, output: int, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> T_w`` per batch element: the output's logits weighted by ``weight`` and summed."""
    def score(x: torch.Tensor) -> torch.Tensor:
        return (network(x)[:, output] * weight).flatten(1).sum(1)
    return score


def _upsample(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return torch.nn.functional.interpolate(cam, size=tuple(size), mode=mode, align_corners=False)


def _unused_layer(layer: nn.Module) -> InferenceError:
    return InferenceError(f"the chosen layer ({type(layer).__name__}) is not called by the network's forward pass, so "
                          "it has no activations to explain; pass one of the listed stage layers with --layer "
                          "(e.g. decoder.0).")


def gradcam(network: nn.Module, x: torch.Tensor, weight: torch.Tensor, output: int, layer: nn.Module
            ) -> torch.Tensor:
    """Grad-CAM (captum ``LayerGradCam``) of one window ``x`` ``(1, C, *patch)``; map ``(*patch)``."""
    attr = _captum()
    try:
        with torch.enable_grad():
            cam = attr.LayerGradCam(_score_fn(network, output, weight), layer).attribute(x, relu_attributions=True)
    except AssertionError as exc:  # captum's forward hook saw no output of the layer
        raise _unused_layer(layer) from exc
    return _upsample(cam.detach().float(), x.shape[2:])[0, 0]


def gradcam_plus_plus(network: nn.Module, x: torch.Tensor, weight: torch.Tensor, output: int, layer: nn.Module
                      ) -> torch.Tensor:
    """Grad-CAM++ of one window (own code on a forward hook); map ``(*patch)``."""
    kept: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        with torch.enable_grad():
            score = _score_fn(network, output, weight)(x.requires_grad_(True)).sum()
            if not kept:
                raise _unused_layer(layer)
            (g,) = torch.autograd.grad(score, kept[-1])
    finally:
        handle.remove()
    a = kept[-1].detach()
    dims = tuple(range(2, a.ndim))
    g2, g3 = g * g, g * g * g
    denom = 2 * g2 + (a.sum(dim=dims, keepdim=True) * g3)
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
    w = (alpha * torch.relu(g)).sum(dim=dims, keepdim=True)
    cam = torch.relu((w * a).sum(dim=1, keepdim=True))
    return _upsample(cam.float(), x.shape[2:])[0, 0]


def occlusion(network: nn.Module, x: torch.Tensor, weight: torch.Tensor, output: int, *,
              block: Sequence[int], batch: int = 8) -> torch.Tensor:
    """Occlusion (captum ``Occlusion``) of one window: per voxel, the mean drop of ``T_w`` when a ``block``
    around it (every channel, stride = block) is set to 0; at most ``batch`` occluded windows per network call."""
    attr = _captum()
    shape = (int(x.shape[1]), *(int(b) for b in block))
    with torch.no_grad():
        out = attr.Occlusion(_score_fn(network, output, weight)).attribute(
            x, sliding_window_shapes=shape, strides=shape, baselines=0.0, perturbations_per_eval=int(batch))
    return out[0, 0].float()


def default_block(patch_size: Sequence[int]) -> tuple[int, ...]:
    """The occluder: a quarter of the patch per axis (at least one voxel), 4^3 = 64 positions per 3D window."""
    return tuple(max(1, int(p) // 4) for p in patch_size)


def _pad(arr: torch.Tensor, patch: tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``arr`` (lead axes, then the patch axes last) padded to at least the patch, and the crop that undoes it."""
    spatial = arr.shape[arr.ndim - len(patch):]
    pads = [((p - s) // 2, p - s - (p - s) // 2) if s < p else (0, 0) for s, p in zip(spatial, patch, strict=True)]
    flat = [v for ba in reversed(pads) for v in ba]
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial, strict=True))
    return (torch.nn.functional.pad(arr, flat) if any(flat) else arr), crop


def _attention(network: nn.Module, img: torch.Tensor, tiles: list, gauss: torch.Tensor, device: torch.device,
               out: torch.Tensor) -> None:
    """Add to ``out`` the Gaussian-weighted sum over the windows of the full-resolution attention gate."""
    network.keep_attention = True
    try:
        with torch.no_grad():
            for t in tiles:
                network(img[(slice(None), *t)][None].to(device))
                out[t] += network.attention_maps[0][0, 0].float().cpu() * gauss
    finally:
        network.keep_attention = False


def _window_map(method: str, network: nn.Module, x: torch.Tensor, weight: torch.Tensor, output: int,
                layer: nn.Module | None, block: Sequence[int], batch: int) -> torch.Tensor:
    if method == "gradcam":
        return gradcam(network, x, weight, output, layer)
    if method == "gradcam++":
        return gradcam_plus_plus(network, x, weight, output, layer)
    return occlusion(network, x, weight, output, block=block, batch=batch)


def _explain_windows(network: nn.Module, method: str, img: torch.Tensor, mask: torch.Tensor,
                     outputs: Sequence[int], windows: tuple[list, torch.Tensor, list[np.ndarray], int],
                     maps: torch.Tensor, *, layer: str | None, block: Sequence[int], batch: int,
                     device: torch.device) -> None:
    """Add ``network``'s window maps of every output to ``maps``; windows without a mask voxel are skipped.

    The target's weight over a window, ``M G_w / W``, is made for that window only (``W`` from the per-axis
    sums), so no grid-sized weight exists."""
    tiles, gauss, sums, n_sliced = windows
    mod = resolve_layer(network, layer) if method.startswith("gradcam") else None
    for j, k in enumerate(outputs):
        for t in tiles:
            m = mask[(j, *t)]
            if not bool(m.any()):
                continue
            w = m * gauss / window_sums_at(sums, t[n_sliced:])
            x = img[(slice(None), *t)][None].to(device)
            maps[(j, *t)] += _window_map(method, network, x, w.to(device), int(k), mod, block, batch).cpu()


def saliency_maps(networks: Sequence[nn.Module], data: np.ndarray, masks: np.ndarray, outputs: Sequence[int], *,
                  method: str, patch_size: Sequence[int], layer: str | None = None, step_size: float = 0.5,
                  device: str | torch.device = "cpu", block: Sequence[int] | None = None, batch: int = 8
                  ) -> np.ndarray:
    """One map per explained output on the preprocessed grid (mean over ``networks``, e.g. folds).

    Memory: besides the caller's ``data`` and ``masks`` (used in place when float32 and bool), only the maps,
    ``4 K V`` bytes for ``K`` outputs and ``V`` voxels, are grid-sized; the rest is one window batch (``batch``
    occluded copies, or one window and its gradients) and its activations, whatever the volume.

    Args:
        networks: eager modules (not traced: gradients and hooks are needed), deep supervision off.
        data: preprocessed ``(C, *grid)``.
        masks: per explained output, the boolean mask its logits are summed over, ``(len(outputs), *grid)``.
        outputs: network output index of each map (class or region).
        method: one of :data:`METHODS`.
        patch_size: the sliding window (a 2D patch on 3D data goes slice by slice, as in prediction).
        layer: layer for the Grad-CAMs (:func:`layer_names`; default :data:`DEFAULT_LAYER`).
        step_size: window step as a fraction of the patch.
        device: where the networks run (they are moved there).
        block: occluder size per patch axis (default :func:`default_block`).
        batch: occluded windows per network call.

    Returns:
        float32 ``(len(outputs), *grid)``.

    Raises:
        InferenceError: unknown method or layer, attention without gates, captum missing.
    """
    device = torch.device(device)
    patch = tuple(int(p) for p in patch_size)
    for net in networks:
        check_method(method, net)
    img, crop = _pad(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), patch)
    mask, _ = _pad(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)), patch)
    spatial = tuple(img.shape[1:])
    n_sliced = len(spatial) - len(patch)
    tiles = window_tiles(spatial, patch, step_size, n_sliced, rules="autoseg")
    gauss = gaussian_importance_map(patch)
    profiles = window_profiles(patch, True)
    assert profiles is not None  # the default sigma never underflows
    starts = window_starts(spatial[n_sliced:], patch, step_size)
    maps = torch.zeros((len(outputs), *spatial), dtype=torch.float32)
    for net in networks:
        net.to(device).eval()
        if method == "attention":
            _attention(net, img, tiles, gauss, device, maps[0])
        else:
            windows = (tiles, gauss, axis_window_sums(profiles, starts, spatial[n_sliced:]), n_sliced)
            _explain_windows(net, method, img, mask, outputs, windows, maps, layer=layer,
                             block=block or default_block(patch), batch=batch, device=device)
    if method == "attention" and len(outputs):  # the gate is one map for every class
        divide_by_window_sums(maps[:1], profiles, starts, n_sliced)
        maps[1:] = maps[0]
    maps /= max(len(networks), 1)
    return maps[(slice(None), *crop)].numpy()


def load_networks(workdir: str | os.PathLike[str], configuration: str, folds: Sequence[str]) -> list[nn.Module]:
    """The eager networks of ``folds`` (final checkpoints), deep supervision off, on the CPU.

    Raises:
        ModelNotFoundError: a fold has no final checkpoint.
    """
    from autoseg.inference.model import network_from_checkpoint
    from autoseg.io.model_folder import FINAL, configuration_folder
    from autoseg.networks.checkpoint import load_checkpoint
    from autoseg.planner.plans import Plans

    model_dir = configuration_folder(Path(workdir), configuration)
    plans_path = model_dir / "plans.json" if (model_dir / "plans.json").is_file() else Path(workdir) / "plans.json"
    config = Plans.load(plans_path).configuration(configuration)
    if not folds:
        raise ModelNotFoundError(f"{model_dir}: no trained fold; train one with `autoseg train`.")
    nets = []
    for f in folds:
        path = model_dir / f"fold_{f}" / FINAL
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no final checkpoint of fold {f}; train it or choose other folds.")
        net, _ = network_from_checkpoint(load_checkpoint(path, map_location="cpu"), config, path)
        nets.append(net.eval())
    return nets
