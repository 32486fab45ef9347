"""autoseg: self-configuring medical image segmentation.

The public API (``autoseg.__all__``) is loaded on first use, so ``import autoseg`` stays fast and worker
processes import only what they need::

    import autoseg
    report = autoseg.check("Dataset001_Brain")
    plans = autoseg.plan("Dataset001_Brain", preset="cpu", jobs=2)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "check": "autoseg.api",
    "plan": "autoseg.api",
    "preprocess": "autoseg.api",
    "train": "autoseg.api",
    "predict": "autoseg.api",
    "TrainSettings": "autoseg.training.settings",
    "InferenceSettings": "autoseg.inference.settings",
    "Predictor": "autoseg.inference.predictor",
    "workdir_for": "autoseg.api",
    "load_dataset": "autoseg.io.dataset",
    "Dataset": "autoseg.io.dataset",
    "DatasetSpec": "autoseg.io.dataset",
    "read_image": "autoseg.io.image",
    "read_label": "autoseg.io.image",
    "write_image": "autoseg.io.image",
    "write_label": "autoseg.io.image",
    "Geometry": "autoseg.io.image",
    "CheckReport": "autoseg.io.check",
    "DatasetFingerprint": "autoseg.fingerprint.model",
    "load_fingerprint": "autoseg.fingerprint.model",
    "Plans": "autoseg.planner.plans",
    "load_plans": "autoseg.planner.plans",
    "AutosegError": "autoseg.errors",
    "evaluate_folder": "autoseg.evaluation.evaluate",
    "EvaluationSummary": "autoseg.evaluation.summary",
    "find_best": "autoseg.ensemble.selection",
    "ensemble_folders": "autoseg.ensemble.ensembling",
    "postprocess_folder": "autoseg.ensemble.postprocessing",
    "PostprocessingRules": "autoseg.ensemble.postprocessing",
    "export_bundle": "autoseg.ensemble.bundle",
    "verify_bundle": "autoseg.ensemble.bundle",
    "measure": "autoseg.api",
    "evaluate_missing": "autoseg.api",
    "explain": "autoseg.api",
    "QualityRule": "autoseg.evaluation.quality_rule",
    "write_report": "autoseg.report.build",
    "export_onnx": "autoseg.inference.onnx_backend",
    "available_plugins": "autoseg.plugins",
    "derive_labels": "autoseg.plugins",
}

__all__ = sorted([*_EXPORTS, "fingerprint", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "fingerprint":  # the package is callable: autoseg.fingerprint(dataset, ...)
        return importlib.import_module("autoseg.fingerprint")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
