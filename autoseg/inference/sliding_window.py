"""Sliding-window prediction with Gaussian weighting and mirroring test-time augmentation.

The image is covered by overlapping patch-sized windows (step 0.5 of the patch by default). Each window's
logits are weighted with a Gaussian that is largest at the patch centre, where the network sees the most
context, and the weighted sum is divided by the summed weights. With mirroring, the network also sees every
flipped version of each window (7 extra passes in 3D with 3 axes) and the logits are averaged. A 2D
network applied to a 3D volume predicts it slice by slice along the first spatial axis.

Accumulators are float32, on the GPU when predicting there and they take at most 3/4 of its free memory,
else on the CPU; on CUDA out-of-memory the prediction is retried with CPU accumulators.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from autoseg.errors import InferenceError
from autoseg.inference.windows import (
    Tile,
    divide_by_window_sums,
    gaussian_importance_map,
    nnunet_importance_map,
    window_profiles,
    window_starts,
    window_tiles,
)

__all__ = ["InferenceError", "gaussian_importance_map", "inference_network", "mirror_variants", "nnunet_importance_map",
           "predict_logits",
           "window_starts"]

#: largest 3D patch (voxels) whose float32 CPU network is traced and optimised (see :func:`inference_network`)
OPTIMIZE_MAX_VOXELS = 300_000


def _batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    for i in range(0, len(tiles), batch_size):
        yield tiles[i:i + batch_size]


def inference_network(network: torch.nn.Module, *, in_channels: int, patch_size: Sequence[int],
                      device: str | torch.device, amp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as the sliding window should call it (evaluation mode, full-resolution output only).

    For float32 on the CPU with a 3D patch of at most :data:`OPTIMIZE_MAX_VOXELS` voxels, the network is traced
    at one patch, frozen and passed through ``torch.jit.optimize_for_inference`` (oneDNN convolutions with
    pre-packed weights), with logits within ~1e-5 of eager mode. Measured per window on 2 Xeon cores: 1.5x
    faster at 56^3 and 1.4x at 64^3 (CPU-preset patches), no gain at 80^3, 5-15 % slower at 96^3 and
    64x128x128, and no gain for 2D patches; so larger patches, 2D, CUDA and autocast get the module itself. The
    rule depends only on the patch, so repeated runs compute the same numbers. If tracing fails the eager module
    is used.
    """
    network.eval()
    if hasattr(network, "deep_supervision"):
        network.deep_supervision = False
    if torch.device(device).type != "cpu" or amp or len(patch_size) != 3 or math.prod(patch_size) > OPTIMIZE_MAX_VOXELS:
        return network
    example = torch.zeros((1, int(in_channels), *(int(p) for p in patch_size)))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the network's own shape checks
            traced = torch.jit.trace(network, example, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception:  # noqa: BLE001 - an optimisation only: fall back to the module as it is
        return network


def _fits_on_gpu(device: torch.device, accumulator_bytes: int) -> bool:
    """Whether float32 accumulators of ``accumulator_bytes`` leave at least a quarter of the GPU's free
    memory for the network (otherwise they go to the CPU from the start)."""
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):
        return False
    return accumulator_bytes <= 0.75 * free


def _run_network(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, expected: tuple[int, ...],
                 ) -> torch.Tensor:
    out = network(x)
    if isinstance(out, (list, tuple)):
        raise InferenceError("the network returned a list of outputs; switch off deep supervision before "
                             "predicting (the sliding window needs the full-resolution logits only).")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InferenceError(f"the network returned {got} for an input of shape {tuple(x.shape)}; expected "
                             f"{expected} (batch, num_outputs, *patch). Check num_outputs and the patch size.")
    return out.float()


def mirror_variants(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every test-time-augmentation variant: ``()`` (the image itself), then each non-empty subset of the axes.

    Example:
        >>> mirror_variants((0, 1))
        [(), (0,), (1,), (0, 1)]
    """
    axes = tuple(int(a) for a in mirror_axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _predict_batch(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_outputs: int,
                   variants: Sequence[tuple[int, ...]], autocast: torch.autocast) -> torch.Tensor:
    """Mean logits of the mirror ``variants`` of a batch (each flipped, predicted and flipped back)."""
    expected = (x.shape[0], num_outputs, *x.shape[2:])
    pred = None
    with autocast:
        for axes in variants:
            dims = [a + 2 for a in axes]
            out = torch.flip(_run_network(network, torch.flip(x, dims), expected), dims) if dims else \
                _run_network(network, x, expected)
            pred = out if pred is None else pred.add_(out)
    assert pred is not None
    if len(variants) > 1:
        pred /= len(variants)
    return pred


def _accumulate(network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, patch: tuple[int, ...],
                num_outputs: int, step_size: float, variants: Sequence[tuple[int, ...]], use_gaussian: bool,
                batch_size: int, device: torch.device, rules: str,
                results_device: torch.device, amp: bool, progress: bool) -> torch.Tensor:
    """Weighted sum of the windows' logits divided by the summed weights: one float32 ``(K, *spatial)`` tensor
    (plus a full-size weight volume only where the weights do not factor, see :func:`~autoseg.inference.windows.window_profiles`, and
    with nnU-Net's rules, whose float16 map is not a product)."""
    spatial = tuple(image.shape[1:])
    n_sliced = len(spatial) - len(patch)
    nnunet = rules == "nnunet" and use_gaussian
    weight = (nnunet_importance_map(patch, device=results_device) if nnunet else
              gaussian_importance_map(patch, device=results_device) if use_gaussian
              else torch.ones(patch, dtype=torch.float32, device=results_device))
    profiles = None if nnunet else window_profiles(patch, use_gaussian)
    logits = torch.zeros((num_outputs, *spatial), dtype=torch.float32, device=results_device)
    weights = torch.zeros(spatial, dtype=torch.float32, device=results_device) if profiles is None else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp)
    tiles = window_tiles(spatial, patch, step_size, n_sliced, rules)
    batches = _batches(tiles, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(tiles) // batch_size), desc="sliding window", unit="batch")
    for batch in batches:
        x = torch.stack([image[(slice(None), *t)] for t in batch]).to(device, non_blocking=True)
        pred = _predict_batch(network, x, num_outputs, variants, autocast).to(results_device)
        for t, p in zip(batch, pred, strict=True):
            p *= weight
            logits[(slice(None), *t)] += p
            if weights is not None:
                weights[t] += weight
    if weights is not None:
        logits /= weights
    else:
        divide_by_window_sums(logits, profiles, window_starts(spatial[n_sliced:], patch, step_size), n_sliced)
    return logits


def _all_finite(t: torch.Tensor, slab: int = 8) -> bool:
    """``torch.isfinite(t).all()`` in slabs of the second axis (isfinite builds several full-size temporaries)."""
    return all(bool(torch.isfinite(t[:, a:a + slab]).all()) for a in range(0, t.shape[1], slab))


def predict_logits(network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray, *,
                   patch_size: Sequence[int], num_outputs: int, step_size: float = 0.5,
                   mirror_axes: Sequence[int] = (), use_gaussian: bool = True, batch_size: int = 1,
                   device: str | torch.device = "cpu", amp: bool = False, progress: bool = False,
                   variant: Sequence[int] | None = None, rules: str = "autoseg") -> torch.Tensor:
    """Logits of a whole (preprocessed) image by Gaussian-weighted sliding-window prediction.

    Args:
        network: maps a batch ``(B, C, *patch_size)`` to logits ``(B, num_outputs, *patch_size)``; put it in
            eval mode, on ``device``, with deep supervision off.
        image: ``(C, *spatial)`` float array. If it has one spatial axis more than the patch (a 2D network on
            a 3D volume), it is predicted slice by slice along the first spatial axis.
        patch_size: window size per patch axis.
        num_outputs: channels the network returns (classes or regions).
        step_size: largest distance between windows as a fraction of the patch, in (0, 1].
        mirror_axes: patch axes (0 .. len(patch_size)-1) to mirror for test-time augmentation; every
            non-empty combination is predicted and the logits averaged.
        use_gaussian: weight window voxels with :func:`gaussian_importance_map` (else uniformly).
        batch_size: windows per network call.
        device: where the network runs; accumulators live there too for CUDA.
        amp: run the network under autocast (fp16 on CUDA, bf16 on CPU); accumulation stays float32.
        progress: show a tqdm bar.
        variant: predict only this mirror variant (patch axes flipped; ``()`` = the image as is) instead of
            averaging over ``mirror_axes``. Averaging the logits of every variant of :func:`mirror_variants`
            gives the test-time-augmented logits (up to float rounding); used for uncertainty.
        rules: ``"nnunet"`` for imported nnU-Net models: nnU-Net's window starts and importance map
            (:func:`nnunet_importance_map`); the accumulation stays float32.

    Returns:
        float32 logits ``(num_outputs, *spatial)`` on the CPU, same spatial shape as ``image``.

    Raises:
        InferenceError: bad shapes or options, a network output of the wrong shape, or non-finite logits.

    Example:
        >>> image = torch.rand(1, 40, 40)
        >>> out = predict_logits(lambda x: x.repeat(1, 2, 1, 1), image, patch_size=(32, 32), num_outputs=2)
        >>> tuple(out.shape), bool(torch.allclose(out[1], image[0], atol=1e-6))
        ((2, 40, 40), True)
    """
    device = torch.device(device)
    patch = tuple(int(p) for p in patch_size)
    img = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(img, torch.Tensor) or img.ndim not in (len(patch) + 1, len(patch) + 2):
        shape = tuple(img.shape) if hasattr(img, "shape") else type(img).__name__
        raise InferenceError(f"image of shape {shape} does not fit patch_size {patch}: expected (C, *spatial) "
                             f"with {len(patch)} spatial axes, or {len(patch) + 1} for a 2D network on a 3D volume.")
    if isinstance(batch_size, bool) or batch_size < 1 or num_outputs < 1:
        raise InferenceError(f"batch_size={batch_size} and num_outputs={num_outputs} must be positive integers.")
    axes = [int(a) for a in mirror_axes]
    if len(set(axes)) != len(axes) or any(not 0 <= a < len(patch) for a in axes):
        raise InferenceError(f"mirror_axes={tuple(mirror_axes)}: must be distinct patch axes in "
                             f"0..{len(patch) - 1} (spatial axes of the patch, not counting batch or channel).")
    if variant is not None:
        axes = [int(a) for a in variant]
        if len(set(axes)) != len(axes) or any(not 0 <= a < len(patch) for a in axes):
            raise InferenceError(f"variant={tuple(variant)}: must be distinct patch axes in 0..{len(patch) - 1}.")
    variants = [tuple(axes)] if variant is not None else mirror_variants(axes)
    window_starts(patch, patch, step_size)  # validates step_size
    img = img.detach().to("cpu", torch.float32)
    n_sliced = img.ndim - 1 - len(patch)
    spatial = tuple(img.shape[1:])
    pad: list[tuple[int, int]] = [(0, 0)] * n_sliced
    for s, p in zip(spatial[n_sliced:], patch, strict=True):
        pad.append(((p - s) // 2, p - s - (p - s) // 2) if s < p else (0, 0))
    if any(sum(pp) for pp in pad):
        flat = [v for before_after in reversed(pad) for v in before_after]  # F.pad wants the last axis first
        img = torch.nn.functional.pad(img, flat, mode="constant", value=0.0)
    if device.type == "cuda":
        img = img.to(device)

    with torch.inference_mode():
        results_device = torch.device("cpu")
        if device.type == "cuda" and _fits_on_gpu(device, (num_outputs + 1) * math.prod(img.shape[1:]) * 4):
            results_device = device
        args = (network, img, patch, num_outputs, step_size, variants, use_gaussian, batch_size, device, rules)
        try:
            logits = _accumulate(*args, results_device, amp, progress)
        except torch.OutOfMemoryError:
            if results_device.type != "cuda":
                raise
            warnings.warn("sliding window: out of GPU memory with accumulators on the GPU; retrying with CPU "
                          "accumulators (slower).", stacklevel=2)
            torch.cuda.empty_cache()
            logits = _accumulate(*args, torch.device("cpu"), amp, progress)
        crop = tuple(slice(b, b + s) for (b, _), s in zip(pad, spatial, strict=True))
        logits = logits[(slice(None), *crop)].to("cpu")
        if not _all_finite(logits):
            raise InferenceError("the network produced non-finite logits (inf or NaN). Check that the image was "
                                 "preprocessed with the model's plans, and try amp=False.")
    return logits.contiguous()
