"""A bundle's ``manifest.json`` as a typed record: what produced the predictions, and the hash of every file.

``io.model_folder`` checks the files against the hashes before anything is loaded; this record is what the
export writes and what ``verify-bundle`` and users read. Manifests written before recipes were recorded load
with ``recipes`` empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from autoseg.errors import BundleError
from autoseg.io.model_folder import FORMAT, read_manifest

#: version of :class:`BundleManifest` written now
VERSION = 1


@dataclass(frozen=True)
class SampleCase:
    """The training case stored in ``sample/`` and the hash of its deterministic prediction."""

    case: str
    inputs: tuple[str, ...]
    expected: str
    labels_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "inputs": list(self.inputs), "expected": self.expected,
                "labels_sha256": self.labels_sha256}


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle holds and what produced it.

    Attributes:
        created: UTC time of the export (ISO 8601).
        software: versions of autoseg, torch, numpy, Python and the platform.
        seed: the plans' seed; ``seeds_note`` says how the training seeds derive from it.
        members: the configurations and folds averaged (``{"configuration", "folds"}``).
        recipes: per configuration, the training recipe its checkpoints record (None for older checkpoints).
        postprocessing: the rules file in ``selection/`` (None: none).
        label_map: output relabelling (None: none).
        inference: the prediction settings of the sample case's verification.
        cross_validation: the chosen pipeline's CV scores (None without ``find-best``).
        dataset: the training dataset's name and file hashes (None when it was not found).
        sample: the sample case (None when the bundle has none).
        onnx: the ONNX export's record (None without ``--onnx``).
        files: SHA-256 of every file of the bundle.
    """

    created: str
    software: dict[str, str]
    seed: int
    members: tuple[dict[str, Any], ...]
    files: dict[str, str]
    seeds_note: str = ""
    recipes: dict[str, Any] = field(default_factory=dict)
    postprocessing: str | None = None
    label_map: dict[str, int] | None = None
    inference: dict[str, Any] = field(default_factory=dict)
    cross_validation: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    sample: SampleCase | None = None
    onnx: dict[str, Any] | None = None
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "created": self.created, "software": self.software,
                "seed": self.seed, "seeds_note": self.seeds_note, "members": list(self.members),
                "recipes": self.recipes, "postprocessing": self.postprocessing, "label_map": self.label_map,
                "inference": self.inference, "cross_validation": self.cross_validation, "dataset": self.dataset,
                "sample": self.sample.to_json() if self.sample is not None else None, "onnx": self.onnx,
                "files": self.files}

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str | os.PathLike[str] = "manifest.json") -> BundleManifest:
        """Read a manifest (already checked to be one by :func:`autoseg.io.model_folder.read_manifest`).

        Raises:
            BundleError: a newer version, or a malformed entry.
        """
        if int(d.get("version", 1)) > VERSION:
            raise BundleError(f"{source}: manifest version {d['version']} is newer than this autoseg reads; upgrade it.")
        try:
            sample = d.get("sample")
            return cls(created=str(d.get("created", "")), software=dict(d.get("software") or {}),
                       seed=int(d.get("seed", 0)), members=tuple(d.get("members") or ()), files=dict(d["files"]),
                       seeds_note=str(d.get("seeds_note", "")), recipes=dict(d.get("recipes") or {}),
                       postprocessing=d.get("postprocessing"), label_map=d.get("label_map"),
                       inference=dict(d.get("inference") or {}), cross_validation=d.get("cross_validation"),
                       dataset=d.get("dataset"), onnx=d.get("onnx"), version=int(d.get("version", 1)),
                       sample=SampleCase(str(sample["case"]), tuple(sample["inputs"]), str(sample["expected"]),
                                         str(sample["labels_sha256"])) if sample else None)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{source}: malformed manifest entry ({err}); export the bundle again.") from err

    @classmethod
    def load(cls, bundle: str | os.PathLike[str]) -> BundleManifest:
        """The manifest of a bundle folder.

        Raises:
            BundleError: not a bundle, or a malformed manifest.
        """
        return cls.from_json(read_manifest(bundle), os.path.join(bundle, "manifest.json"))
