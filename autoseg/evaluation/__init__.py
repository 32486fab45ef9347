"""Evaluation of predicted label maps against references.

Modules:

* :mod:`~autoseg.evaluation.dice` -- Dice per class or region (used during training validation);
* :mod:`~autoseg.evaluation.surface` -- spacing-aware surface metrics: ``surface_metrics`` (HD95, ASSD,
  NSD) with pinned surface and percentile conventions;
* :mod:`~autoseg.evaluation.lesions` -- lesion-wise metrics following BraTS 2023: ``lesion_metrics``
  (lesion Dice / HD95, detections, false positives, sensitivity by lesion size);
* :mod:`~autoseg.evaluation.metrics` -- every metric of every class of one case: ``case_metrics``,
  ``classes_from_labels`` (dataset.json labels -> classes, regions as tuples);
* :mod:`~autoseg.evaluation.evaluate` -- folders of predictions: ``evaluate_folder``, ``evaluate_pairs``
  and ``EvaluationSummary`` (``summary.json``, ``cases.csv``, text table).

Conventions: spacing is given in numpy axis order (``Geometry.array_spacing``), distances are in mm,
volumes in ml; a class empty in both prediction and reference gives NaN, which means leave out.
"""
