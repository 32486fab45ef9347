"""What a model folder is: where folds live, which are trained, and how an exported bundle proves its files.

A work folder (or a bundle, which is a minimal work folder) holds::

    models/<configuration>/plans.json  dataset.json  plugins/  imported_from.json (imported models)
    models/<configuration>/fold_<k>/checkpoint_latest.pt  checkpoint_final.pt  log.jsonl  val/
    manifest.json                      (bundles only: versions, settings and the SHA-256 of every file)

Every stage that reads or writes these names imports them from here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from autoseg.errors import BundleError, FileFormatError
from autoseg.io.atomic import read_json

LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
MANIFEST = "manifest.json"
#: a model imported from another framework: its source files' hashes and licence (``autoseg import-nnunet``)
IMPORTED_FROM = "imported_from.json"
#: the ``format`` field of a bundle manifest
FORMAT = "autoseg-bundle"


def configuration_folder(workdir: str | os.PathLike[str], configuration: str) -> Path:
    """``<workdir>/models/<configuration>``."""
    return Path(workdir) / "models" / configuration


def fold_folder(workdir: str | os.PathLike[str], configuration: str, fold: int | str) -> Path:
    """``<workdir>/models/<configuration>/fold_<k>``."""
    return configuration_folder(workdir, configuration) / f"fold_{fold}"


def trained_folds(model_dir: Path) -> list[str]:
    """Folds of a configuration folder that have a final checkpoint, sorted."""
    return sorted(p.parent.name[len("fold_"):] for p in Path(model_dir).glob(f"fold_*/{FINAL}"))


def trained_configurations(workdir: str | os.PathLike[str]) -> list[str]:
    """Configurations with at least one finished fold in ``workdir/models``."""
    models = Path(workdir) / "models"
    return sorted(p.name for p in models.iterdir() if p.is_dir() and trained_folds(p)) if models.is_dir() else []


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_bundle(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is an exported bundle (its files are fixed by the manifest; nothing is cached there)."""
    return (Path(folder) / MANIFEST).is_file()


def inside_bundle(bundle: Path, rel: str) -> Path:
    """The file ``rel`` of a bundle, refusing paths and links that lead outside it."""
    base = bundle.resolve()
    if not isinstance(rel, str) or Path(rel).is_absolute() or \
            not Path(os.path.normpath(base / rel)).is_relative_to(base):
        raise BundleError(f"{bundle / MANIFEST}: the path {rel!r} points outside the bundle; the manifest was "
                          "tampered with. Do not use this bundle; get an unmodified copy or export it again.")
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise BundleError(f"{bundle / rel}: a symbolic link to {path}, outside the bundle (export never writes links). "
                          "Do not use this bundle; get an unmodified copy or export it again.")
    return path


def _links_leaving(root: Path) -> list[str]:
    """Symbolic links in the bundle whose target lies outside it (export never writes links; a linked folder is
    reported, not entered)."""
    base, found = root.resolve(), []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(base):
                found.append(f"{path.relative_to(root).as_posix()}: a symbolic link to {os.readlink(path)}, "
                             "outside the bundle")
    return sorted(found)


def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a bundle as plain JSON (checked to be one); see ``autoseg.ensemble.manifest`` for its record."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; this is not an autoseg bundle (`autoseg export` writes one).")
    manifest = read_json(path, FileFormatError, "export the bundle again")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: not an autoseg bundle manifest (format {FORMAT!r} with a 'files' table).")
    return manifest


def check_bundle_files(bundle: str | os.PathLike[str]) -> list[str]:
    """Problems with the bundle's files against the manifest's hashes (missing, modified, unlisted weights)."""
    root = Path(bundle)
    manifest = read_manifest(root)
    problems = []
    for rel, digest in manifest["files"].items():
        path = inside_bundle(root, rel)
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(path) != digest:
            problems.append(f"{rel}: modified after export (SHA-256 differs)")
    listed = set(manifest["files"])
    problems += [f"{p.relative_to(root).as_posix()}: not part of the exported bundle"
                 for p in sorted((root / "models").rglob("*")) if p.is_file()
                 and p.relative_to(root).as_posix() not in listed]
    return problems + _links_leaving(root)


def require_intact(bundle: str | os.PathLike[str]) -> None:
    """Raise before anything is loaded when a bundle file was modified, removed or added to ``models/``."""
    problems = check_bundle_files(bundle)
    if problems:
        raise BundleError(f"{bundle}: the bundle does not match its manifest:\n  " + "\n  ".join(problems) +
                          "\nNothing was loaded. Get an unmodified copy of the bundle (or export it again).")
