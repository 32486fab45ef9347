"""The notebook API: each function runs one pipeline stage and saves its result in the work folder.

    >>> import autoseg
    >>> report = autoseg.check("Dataset001_Brain")                     # doctest: +SKIP
    >>> plans = autoseg.plan("Dataset001_Brain", preset="cpu", jobs=2)  # doctest: +SKIP
    >>> print(plans.summary_table())                                    # doctest: +SKIP

``stages`` runs check, fingerprint, plan, preprocess and train; ``predict`` segments files; ``trust`` measures,
explains and scores missing channels. This package is the top of the library: only the CLI imports it.
"""

from autoseg.api.predict import FAST_STEP, InferenceSettings, predict
from autoseg.api.stages import check, default_configurations, fingerprint, plan, preprocess, train, workdir_for
from autoseg.api.trust import evaluate_missing, explain, measure

__all__ = ["FAST_STEP", "InferenceSettings", "check", "default_configurations", "evaluate_missing", "explain",
           "fingerprint", "measure", "plan", "predict", "preprocess", "train", "workdir_for"]
