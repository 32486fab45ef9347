"""Submission bundles: everything needed to reproduce the chosen pipeline's predictions elsewhere, and a proof.

``export_bundle`` writes a folder that is itself a minimal work folder (so ``predict --bundle B`` is
``predict --workdir B``)::

    manifest.json            versions, seeds, CV metrics, dataset and bundle file hashes, inference settings
    plans.json  dataset.json  fingerprint.json  splits.json
    models/<config>/plans.json, dataset.json, fold_<k>/checkpoint_final.pt   (network weights only)
    models/<config>/fold_<k>/network.onnx    (with ``onnx=True``: ONNX Runtime networks, for predict --backend onnx)
    selection/best.json  postprocessing.json  cv_summary.json
    sample/<case>_XXXX<ending>, sample/expected/<case><ending>              (one case and its prediction)

Weights are tensors in a ``torch.save`` file loaded with ``weights_only=True``: loading never runs code, and a
file that would (a pickle payload) is refused. Every file's SHA-256 is in the manifest; loading a bundle checks
them, so a modified file is named before anything is loaded. ``verify_bundle`` also predicts the sample case
in deterministic mode (float32, CPU) and compares the labels' hash with the one stored at export.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.ensemble.choice import POSTPROCESSING, QUALITY_RULE, SELECTION, BestChoice, load_best
from autoseg.ensemble.manifest import BundleManifest, SampleCase
from autoseg.ensemble.models import parse_label_map
from autoseg.ensemble.pipeline import predict_files
from autoseg.errors import BundleError, ModelNotFoundError
from autoseg.inference.settings import InferenceSettings
from autoseg.io.atomic import current_umask, write_json_atomic
from autoseg.io.dataset import Dataset, dataset_source, load_dataset
from autoseg.io.image import file_ending, read_label
from autoseg.io.model_folder import (
    IMPORTED_FROM,
    MANIFEST,
    check_bundle_files,
    configuration_folder,
    fold_folder,
    inside_bundle,
    sha256,
    trained_configurations,
    trained_folds,
)
from autoseg.networks.checkpoint import FINAL, CheckpointMeta, load_checkpoint, save_checkpoint
from autoseg.planner.plans import Plans
from autoseg.plugins.channels import PLUGINS_DIR

#: how the sample case is predicted at export and again by ``verify-bundle``: on the CPU, float32, deterministic
VERIFY = InferenceSettings(device="cpu", deterministic=True)
#: checkpoint entries a bundle keeps (the optimizer, scaler and RNG states are left out)
KEPT = ("network", "epoch", "configuration", "fold", "mirror_axes", "in_channels", "num_outputs", "cascade_labels",
        "epochs", "settings", "meta_version", "recipe")


def labels_hash(seg: np.ndarray) -> str:
    """SHA-256 of a label map's values and shape (independent of file compression and dtype)."""
    arr = np.ascontiguousarray(seg, dtype="<i4")
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def _members(wd: Path, configurations: Sequence[str] | None, folds: Sequence[str] | None
             ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    best = load_best(wd) if configurations is None else None
    if best is not None:
        members = [m.to_json() for m in best.members]
    else:
        names = list(configurations) if configurations else trained_configurations(wd)
        if len(names) != 1 and not configurations:
            raise BundleError(f"{wd}: " + ("nothing is trained" if not names else
                                           f"several configurations are trained ({', '.join(names)})") +
                              f"; run `autoseg find-best --workdir {wd}` or choose with -c.")
        members = [{"configuration": n, "folds": trained_folds(configuration_folder(wd, n))} for n in names]
    for m in members:
        if folds is not None:
            m["folds"] = [str(f) for f in folds]
        have = trained_folds(configuration_folder(wd, m["configuration"]))
        missing = [f for f in m["folds"] if f not in have]
        if not m["folds"] or missing:
            raise ModelNotFoundError(f"{wd / 'models' / m['configuration']}: fold(s) {', '.join(missing) or '(none)'} "
                                     f"not trained (trained: {', '.join(have) or 'none'}).")
    return members, best


def _copy_model(wd: Path, dst: Path, configuration: str, folds: Sequence[str]) -> None:
    src = configuration_folder(wd, configuration)
    out = configuration_folder(dst, configuration)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json", IMPORTED_FROM):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if (src / PLUGINS_DIR).is_dir():  # fitted states of channel plugins (.npz, no pickle), hashed like every file
        shutil.copytree(src / PLUGINS_DIR, out / PLUGINS_DIR, dirs_exist_ok=True)
    for f in folds:
        state = load_checkpoint(src / f"fold_{f}" / FINAL)
        (out / f"fold_{f}").mkdir(exist_ok=True)
        save_checkpoint(out / f"fold_{f}" / FINAL, {k: state[k] for k in KEPT if k in state})


def _dataset_hashes(ds: Dataset, progress: bool) -> dict[str, str]:
    from tqdm import tqdm

    files = [ds.root / "dataset.json"]
    for case in ds.cases:
        files += list(case.images) + ([case.label] if case.label is not None else [])
    return {p.relative_to(ds.root).as_posix(): sha256(p)
            for p in tqdm(files, desc="hash dataset", leave=False, disable=not progress)}


def export_bundle(workdir: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  dataset: Dataset | str | os.PathLike[str] | None = None, configurations: Sequence[str] | None = None,
                  folds: Sequence[int | str] | None = None, label_map: Mapping[int, int] | str | None = None,
                  sample: str | None = None, hash_dataset: bool = True, overwrite: bool = False,
                  progress: bool = True, onnx: bool = False) -> Path:
    """Write a self-contained, verifiable bundle of the chosen pipeline (see the module docstring).

    Args:
        workdir: the work folder.
        output: the bundle folder to create.
        dataset: the training dataset (hashed into the manifest; one case becomes the sample); default: the one
            the work folder was planned from. Without it the bundle has no dataset hashes and no sample.
        configurations: default: the ``find-best`` choice, else the only trained configuration.
        folds: default: the chosen, else every trained fold.
        label_map: write predictions in another label convention by default, e.g. ``"3:4"``.
        sample: the case to store as sample (default: the first training case).
        hash_dataset: hash every dataset file into the manifest.
        overwrite: replace an existing bundle.
        progress: show progress bars.
        onnx: also export every fold network to ONNX (:func:`autoseg.inference.onnx_backend.bundle_onnx`); the
            manifest's ``onnx`` entry records the opset and the onnx / onnxruntime versions.

    Returns:
        The bundle folder.

    Raises:
        BundleError: the output exists, nothing is trained or several configurations and no choice.
    """
    wd, out = Path(workdir), Path(output)
    _check_free(out, overwrite)
    members, best = _members(wd, configurations, [str(f) for f in folds] if folds is not None else None)
    mapping = parse_label_map(label_map)
    plans = Plans.load(wd / "plans.json")
    ds = _training_dataset(wd, dataset)
    with _staged(out) as tmp:
        for name in ("plans.json", "dataset.json", "fingerprint.json", "splits.json"):
            if (wd / name).is_file():
                shutil.copy2(wd / name, tmp / name)
        copied = _copy_models(wd, tmp, members, plans)
        onnx_record = None
        if onnx:  # exported from the bundle's own checkpoints, whose hashes the ONNX files record
            from autoseg.inference.onnx_backend import bundle_onnx

            onnx_record = bundle_onnx(tmp, copied)
        chosen = _write_selection(wd, tmp, best, members, mapping)
        sample_info = _write_sample(tmp, ds, sample, progress) if ds is not None else None
        manifest = _manifest(tmp, plans, members, best, chosen, ds, sample_info, onnx_record, hash_dataset=hash_dataset,
                             progress=progress)
        write_json_atomic(tmp / MANIFEST, manifest)
    return out


def _check_free(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds files, unless it is a bundle and ``overwrite`` is on.

    Raises:
        BundleError: the folder is in the way.
    """
    if out.exists() and (not overwrite or not (out / MANIFEST).is_file()) and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty; choose another -o" +
                          (" or pass --overwrite." if (out / MANIFEST).is_file() else "."))


def _training_dataset(wd: Path, dataset: Dataset | str | os.PathLike[str] | None) -> Dataset | None:
    """The given dataset, else the one the work folder was planned from; None when it is not there."""
    ds = dataset if isinstance(dataset, Dataset) else None
    root = Path(dataset) if dataset is not None and ds is None else dataset_source(wd)
    if ds is None and root is not None and (root / "dataset.json").is_file():
        ds = load_dataset(root)
    return ds


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new folder next to ``out`` to build the bundle in; it replaces ``out`` when the block completes and is
    removed when the block fails, so ``out`` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # a bundle is meant to be shared: not owner-only like mkdtemp's
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_models(wd: Path, bundle: Path, members: list[dict[str, Any]], plans: Plans) -> list[tuple[str, list[str]]]:
    """Copy the members' networks, and a cascade's first stage with every trained fold; the (configuration,
    folds) copied."""
    copied = []
    for m in members:
        _copy_model(wd, bundle, m["configuration"], m["folds"])
        copied.append((m["configuration"], m["folds"]))
        prev = plans.configuration(m["configuration"]).previous_stage
        if prev:  # a cascade's first stage runs with every trained fold
            prev_folds = trained_folds(configuration_folder(wd, str(prev)))
            _copy_model(wd, bundle, str(prev), prev_folds)
            copied.append((str(prev), prev_folds))
    return copied


def _write_selection(wd: Path, bundle: Path, best: BestChoice | None, members: list[dict[str, Any]],
                     mapping: Mapping[int, int] | None) -> BestChoice:
    """``selection/``: the choice (the bundle's members and label map), and with a ``find-best`` choice its
    postprocessing rules, CV scores and quality threshold."""
    sel = bundle / SELECTION
    sel.mkdir()
    rules = best.postprocessing if best is not None else None
    if rules:
        shutil.copy2(wd / SELECTION / str(rules), sel / POSTPROCESSING)
    for name in ("cv_summary.json", QUALITY_RULE):  # the CV scores and the quality flag's threshold
        if (wd / SELECTION / name).is_file() and best is not None:
            shutil.copy2(wd / SELECTION / name, sel / name)
    chosen = BestChoice.from_json({**(best.to_json() if best is not None else {}), "members": members,
                                   "postprocessing": POSTPROCESSING if rules else None,
                                   "label_map": {str(k): v for k, v in mapping.items()} if mapping else None})
    chosen.save(bundle)
    return chosen


def _manifest(bundle: Path, plans: Plans, members: list[dict[str, Any]], best: BestChoice | None, chosen: BestChoice,
              ds: Dataset | None, sample_info: SampleCase | None, onnx_record: dict[str, Any] | None, *,
              hash_dataset: bool, progress: bool) -> dict[str, Any]:
    """``manifest.json``: versions, seed, the pipeline and its CV scores, the dataset's and every bundle file's
    hashes (so write it last), the sample and the ONNX export."""
    from autoseg import __version__

    return BundleManifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), software=_versions(__version__),
        seed=plans.seed, seeds_note="training seeds derive from this seed, the configuration and the fold "
                                    "(training.components.derived_seed); the split uses it directly",
        members=tuple(members), recipes={m["configuration"]: _recipe(bundle, m) for m in members},
        postprocessing=chosen.postprocessing, label_map=chosen.label_map,
        inference={"tta": True, "step_size": 0.5, "verification": "CPU, float32, deterministic algorithms"},
        cross_validation={k: best.to_json()[k] for k in ("metric", "score", "score_after_postprocessing", "n_cases",
                                                         "name")} if best is not None else None,
        dataset={"name": ds.name, "files": _dataset_hashes(ds, progress) if hash_dataset else None}
        if ds is not None else None,
        sample=sample_info, onnx=onnx_record,
        files={p.relative_to(bundle).as_posix(): sha256(p) for p in sorted(bundle.rglob("*")) if p.is_file()},
    ).to_json()


def _recipe(wd: Path, member: dict[str, Any]) -> dict[str, Any] | None:
    """The training recipe a member's first fold recorded (None for checkpoints from before recipes)."""
    ckpt = load_checkpoint(fold_folder(wd, member["configuration"], member["folds"][0]) / FINAL)
    return CheckpointMeta.from_json(ckpt).recipe


def _versions(autoseg_version: str) -> dict[str, str]:
    import torch

    return {"autoseg": autoseg_version, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine()}


def _write_sample(bundle: Path, ds: Dataset, case_id: str | None, progress: bool) -> SampleCase | None:
    """Copy one training case's images into ``sample/`` and store its deterministic prediction and hash."""
    cases = {c.case_id: c for c in ds.cases}
    if case_id is not None and case_id not in cases:
        raise BundleError(f"--sample {case_id!r} is not a training case of {ds.root}.")
    case = cases[case_id] if case_id is not None else (ds.cases[0] if ds.cases else None)
    if case is None:
        return None
    folder = bundle / "sample"
    folder.mkdir()
    inputs = []
    for k, img in enumerate(case.images):
        dst = folder / f"{case.case_id}_{k:04d}{file_ending(img)}"
        shutil.copy2(img, dst)
        inputs.append(dst.name)
    predict_files(folder, folder / "expected", bundle, InferenceSettings.create(VERIFY, progress=progress))
    expected = folder / "expected" / f"{case.case_id}{file_ending(case.images[0])}"
    (folder / "expected" / "prediction.json").unlink(missing_ok=True)  # holds this machine's paths and timings
    return SampleCase(case.case_id, tuple(inputs), expected.relative_to(bundle).as_posix(),
                      labels_hash(read_label(expected).array))


@dataclass
class BundleReport:
    """What :func:`verify_bundle` found."""

    bundle: Path
    problems: list[str] = field(default_factory=list)
    sample: str | None = None
    identical: bool | None = None
    agreement: float | None = None  # fraction of sample voxels equal to the stored prediction

    @property
    def ok(self) -> bool:
        return not self.problems and self.identical is not False

    def format(self) -> str:
        lines = [f"bundle {self.bundle}: " + ("OK" if self.ok else "FAILED")]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.sample is not None:
            lines.append(f"  sample {self.sample}: " + ("identical to the stored prediction" if self.identical else
                                                        f"differs from the stored prediction ({self.agreement:.6f} "
                                                        "of voxels agree)"))
        return "\n".join(lines)


def verify_bundle(bundle: str | os.PathLike[str], *, progress: bool = True,
                  on_note: Callable[[str], None] | None = None) -> BundleReport:
    """Check every file against the manifest, then rerun the stored sample prediction and compare its hash."""
    root = Path(bundle)
    report = BundleReport(root, problems=check_bundle_files(root))
    sample = BundleManifest.load(root).sample
    if report.problems or not sample:
        if not sample:
            (on_note or (lambda m: None))("the bundle holds no sample case; only its files were checked.")
        return report
    report.sample = sample.case
    inputs = [inside_bundle(root, f"sample/{name}") for name in sample.inputs]
    expected = inside_bundle(root, sample.expected)
    with tempfile.TemporaryDirectory(prefix="autoseg-verify-") as tmp:
        out = Path(tmp) / expected.name
        predict_files(inputs, out, root, InferenceSettings.create(VERIFY, progress=progress))
        got = read_label(out).array
    report.identical = labels_hash(got) == sample.labels_sha256
    ref = read_label(expected).array
    report.agreement = float((got == ref).mean()) if got.shape == ref.shape else 0.0
    return report
