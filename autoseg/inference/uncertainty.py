"""How sure is a prediction? Voxel-wise uncertainty maps and per-case quality scores.

Two sources of uncertainty, computed while predicting at no extra network cost:

* **Members disagree.** Every fold predicts every test-time mirror variant separately (the same passes
  test-time augmentation makes; their mean is the usual prediction). Per case:

  - ``tta_agreement``: mean pairwise Dice between the mirror variants' label maps, averaged over folds
    (and configurations). It is the quality score: it means the same thing in cross-validation (one
    fold per case) and at prediction time (several folds), so a threshold learnt on CV transfers.
  - ``fold_agreement``: mean pairwise Dice between the folds' label maps (prediction time, >= 2 folds),
    the failure detector Zenk et al. (MedIA 2025) recommend; reported, not thresholded, because CV has one
    fold per case.
  - the **disagreement map**: per voxel, 1 - the share of members voting for the most-voted label (folds
    when there are several, else mirror variants); 0 where all agree.

* **Probabilities are soft.** From the averaged probabilities in the input's geometry:

  - the **entropy map**: predictive entropy normalised to [0, 1] (labels: ``-sum p log p / log K``;
    regions: mean binary entropy of the regions);
  - ``confidence``: 1 - mean entropy in and around the predicted structures (predicted foreground plus
    voxels with entropy > 0.5), the "uncertainty mass inside the predicted structure";
  - ``expected_dice``: per class the Dice the model expects of its own mask under its probabilities,
    ``2 sum(p m) / (sum p + sum m)``, or ``exp(-sum p)`` (the chance the class is truly absent) when the
    mask is empty; mean over classes.

* **A learned error head** (recipe ``network=...:error_head=true``, :mod:`autoseg.networks.error_head`):
  the **error map**, its probability that the label is wrong per voxel (one pass: the unmirrored one), and
  ``error_head`` / ``error_head_tta`` (:func:`error_head_scores`), the Dice it expects, alone and times
  ``tta_agreement``.

* **Combined** (the default quality score): ``expected_dice * tta_agreement``, the Dice the model expects,
  discounted by how inconsistent it is under mirroring. Probability-based scores alone stay high when a
  corrupted input makes the network confidently wrong; the variants' disagreement catches that, while the
  expected Dice ranks ordinary errors best (``benchmarks/quality_vs_error.py``).

Pairwise Dice treats a class both maps leave empty as agreement (1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoseg.inference.export import LabelLayout, logits_to_labels, probabilities_to_labels
from autoseg.inference.sliding_window import mirror_variants, predict_logits

#: per-case scores, higher = more trustworthy; the first is the default quality score
QUALITY_SCORES = ("combined", "tta_agreement", "confidence", "expected_dice", "error_head", "error_head_tta")
#: voxels per chunk when comparing label maps (bounds memory to a few 100 MB whatever the image size)
CHUNK = 1 << 22


def _classes(layout: LabelLayout) -> list[tuple[int, ...]]:
    if layout.regions is not None:
        return [tuple(r) for r in layout.regions]
    return [(k,) for k in range(1, layout.num_outputs)]


def pairwise_dice(label_maps: Sequence[np.ndarray], classes: Sequence[Sequence[int]]) -> float:
    """Mean pairwise Dice between label maps, averaged over classes (both empty = 1).

    Args:
        label_maps: two or more label maps of one shape.
        classes: label values per class (a region has several).

    Returns:
        A value in [0, 1]; NaN with fewer than two maps or no classes.

    Example:
        >>> a, b = np.array([0, 1, 1, 1]), np.array([0, 1, 1, 0])
        >>> round(pairwise_dice([a, b], [(1,)]), 3)
        0.8
    """
    m = len(label_maps)
    if m < 2 or not classes:
        return float("nan")
    flat = [np.asarray(lm).reshape(-1) for lm in label_maps]
    scores = []
    for cls in classes:
        inter = np.zeros((m, m), np.float64)
        values = np.asarray(tuple(cls))
        for start in range(0, flat[0].size, CHUNK):
            masks = np.stack([np.isin(f[start:start + CHUNK], values) for f in flat]).astype(np.float32)
            t = torch.from_numpy(masks)
            inter += (t @ t.T).double().numpy()
        size = np.diag(inter)
        denom = size[:, None] + size[None, :]
        dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
        scores.append(float(dice[np.triu_indices(m, 1)].mean()))
    return float(np.mean(scores))


def vote_disagreement(label_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per voxel, 1 - the share of maps voting for the most-voted label (float32; 0 = unanimous)."""
    first = np.asarray(label_maps[0])
    values = np.unique(np.concatenate([np.unique(lm) for lm in label_maps]))
    best = np.zeros(first.shape, np.uint16)
    for v in values:
        count = np.zeros(first.shape, np.uint16)
        for lm in label_maps:
            count += lm == v
        np.maximum(best, count, out=best)
    return (1.0 - best.astype(np.float32) / len(label_maps)).astype(np.float32)


@dataclass
class MemberOutputs:
    """One configuration's prediction of one case on its preprocessed grid, with what its members say.

    Attributes:
        logits: mean logits over folds and mirror variants (the usual prediction).
        tta_agreement: mean over folds of the mirror variants' pairwise Dice; None without mirroring.
        fold_agreement: pairwise Dice between the folds' label maps; None with one fold.
        disagreement: vote disagreement map (folds, or mirror variants with one fold); None with one member.
        error: the learned error heads' probability that the label is wrong, mean over folds (float32); None
            without error heads.
    """

    logits: np.ndarray
    tta_agreement: float | None
    fold_agreement: float | None
    disagreement: np.ndarray | None
    error: np.ndarray | None = None


Network = Callable[[torch.Tensor], torch.Tensor]


def predict_members(networks: Sequence[Network], data: np.ndarray, *, patch_size: Sequence[int],
                    layout: LabelLayout, mirror_axes: Sequence[int], step_size: float, device: torch.device,
                    amp: bool, error_networks: Sequence[Network | None] | None = None,
                    rules: str = "autoseg") -> MemberOutputs:
    """Predict ``data`` with every fold and every mirror variant separately and summarise their agreement.

    The network passes are those of ordinary test-time augmentation, so this costs what a normal prediction
    costs plus comparing label maps; ``logits`` equal the usual fold-averaged, mirror-averaged logits up to
    float rounding. A fold's entry of ``error_networks`` (its network returning the error logit as one more
    channel, :class:`~autoseg.networks.error_head.ErrorOutput`) makes the unmirrored pass, giving the error map
    at no extra pass. ``rules`` is the configuration's (``nnunet`` for imported models, see
    :func:`predict_logits`).
    """
    variants = mirror_variants(mirror_axes)
    classes = _classes(layout)
    errors = list(error_networks) if error_networks is not None else [None] * len(networks)
    kw = {"patch_size": patch_size, "step_size": step_size, "device": device, "amp": amp, "rules": rules}
    total = None
    fold_maps: list[np.ndarray] = []
    variant_maps: list[np.ndarray] = []
    agreements: list[float] = []
    error_maps: list[np.ndarray] = []
    with torch.inference_mode():
        for net, error_net in zip(networks, errors, strict=True):
            fold, variant_maps, error = _predict_fold(net, error_net, data, variants, layout, kw)
            if error is not None:
                error_maps.append(error)
            if variant_maps:
                agreements.append(pairwise_dice(variant_maps, classes))
            if len(networks) > 1:
                fold_maps.append(_small(logits_to_labels(fold.numpy(), layout)))
            total = fold if total is None else total.add_(fold)
        assert total is not None
        if len(networks) > 1:
            total /= len(networks)
    members = fold_maps if len(fold_maps) > 1 else variant_maps
    return MemberOutputs(
        logits=total.numpy(),
        tta_agreement=float(np.mean(agreements)) if agreements else None,
        fold_agreement=pairwise_dice(fold_maps, classes) if len(fold_maps) > 1 else None,
        disagreement=vote_disagreement(members) if len(members) > 1 else None,
        error=(sum(error_maps) / len(error_maps)).astype(np.float32) if error_maps else None)


def _predict_fold(net: Network, error_net: Network | None, data: np.ndarray, variants: list[tuple[int, ...]],
                  layout: LabelLayout, kw: dict) -> tuple[torch.Tensor, list[np.ndarray], np.ndarray | None]:
    """One fold's mirror-averaged logits, its variants' label maps (with several variants) and its error map."""
    fold, maps, error = None, [], None
    for v in variants:
        if error_net is not None and not v:  # the image as is: the pass that also gives the error logit
            both = predict_logits(error_net, data, num_outputs=layout.num_outputs + 1, variant=v, **kw)
            error = torch.sigmoid(both[-1]).numpy()
            out = both[:-1]
        else:
            out = predict_logits(net, data, num_outputs=layout.num_outputs, variant=v, **kw)
        if len(variants) > 1:
            maps.append(_small(logits_to_labels(out.numpy(), layout)))
        fold = out if fold is None else fold.add_(out)
    assert fold is not None
    fold /= len(variants)
    return fold, maps, error


def _small(seg: np.ndarray) -> np.ndarray:
    return seg.astype(np.uint8) if seg.max(initial=0) < 256 else seg


def entropy_map(probs: np.ndarray, layout: LabelLayout, *, slab: int = 16) -> np.ndarray:
    """Normalised predictive entropy in [0, 1] of ``(K, *spatial)`` probabilities (float32, spatial shape).

    Example:
        >>> p = np.array([[0.5, 1.0], [0.5, 0.0]], np.float32)   # 2 classes, 2 voxels
        >>> entropy_map(p, LabelLayout(2)).round(3).tolist()
        [1.0, 0.0]
    """
    x = np.asarray(probs)
    out = np.empty(x.shape[1:], np.float32)
    k = x.shape[0]
    for z in range(0, x.shape[1], slab):
        p = np.clip(x[:, z:z + slab].astype(np.float32), 1e-7, 1.0)
        if layout.regions is not None:
            q = np.clip(1.0 - p, 1e-7, 1.0)
            h = -(p * np.log(p) + q * np.log(q)).mean(axis=0) / math.log(2)
        else:
            h = -(p * np.log(p)).sum(axis=0) / math.log(max(k, 2))
        out[z:z + slab] = np.clip(h, 0.0, 1.0)
    return out


def probability_scores(probs: np.ndarray, layout: LabelLayout, entropy: np.ndarray | None = None
                       ) -> dict[str, float]:
    """``confidence`` and ``expected_dice`` of one case's probabilities (see the module docstring)."""
    entropy = entropy_map(probs, layout) if entropy is None else entropy
    seg = probabilities_to_labels(probs, layout)
    region = (seg > 0) | (entropy > 0.5)
    confidence = 1.0 - float(entropy[region].mean()) if region.any() else 1.0
    expected = []
    for k, cls in zip(_output_index(layout), _classes(layout), strict=True):
        p = np.asarray(probs[k], np.float32)
        mask = np.isin(seg, cls)
        sp, sm = float(p.sum(dtype=np.float64)), float(mask.sum())
        expected.append(2.0 * float(p[mask].sum(dtype=np.float64)) / (sp + sm) if sm > 0 else math.exp(-sp))
    return {"confidence": confidence, "expected_dice": float(np.mean(expected)) if expected else 1.0}


def combined_score(scores: dict[str, float | None]) -> float | None:
    """``expected_dice * tta_agreement`` (the expected Dice alone without mirror variants); None without it."""
    ed, tta = scores.get("expected_dice"), scores.get("tta_agreement")
    if ed is None:
        return None
    return float(ed) * (float(tta) if tta is not None else 1.0)


def error_head_scores(seg: np.ndarray, error: np.ndarray, tta_agreement: float | None) -> dict[str, float]:
    """``error_head``: the foreground Dice the learned error head expects of the label map ``seg``, with ``e`` its
    probability of error per voxel and ``F`` the predicted foreground,
    ``2 sum_F (1 - e) / (2 sum_F (1 - e) + sum_F e + sum_notF e)`` (expected true positives, false positives, false
    negatives; 1 when nothing is predicted nor expected missed); ``error_head_tta``: that times ``tta_agreement``.

    Example:
        >>> seg = np.array([0, 1, 1, 1]); e = np.array([0.5, 0.0, 0.0, 0.5])
        >>> error_head_scores(seg, e, None)["error_head"]
        0.8
    """
    fg = np.asarray(seg) > 0
    e = np.asarray(error, np.float64)
    fg_err, total_err = float(e[fg].sum()), float(e.sum())
    tp = float(fg.sum()) - fg_err
    denom = 2.0 * tp + total_err
    score = 2.0 * tp / denom if denom > 0 else 1.0
    return {"error_head": score, "error_head_tta": score * (float(tta_agreement) if tta_agreement is not None else 1.0)}


def _output_index(layout: LabelLayout) -> list[int]:
    """The output channel of each class of :func:`_classes`."""
    return list(range(layout.num_outputs)) if layout.regions is not None else list(range(1, layout.num_outputs))
