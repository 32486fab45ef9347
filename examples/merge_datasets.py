"""Merge datasets annotated with different label sets into one partially annotated dataset.

Each source is a dataset folder in the nnU-Net layout. Classes are matched by name (the keys of each
dataset.json's ``labels``); the merged dataset numbers them in order of first appearance. Every label map is
renumbered, images are copied unchanged, case ids get the source's name as a prefix, and dataset.json's
``"annotated"`` lists, for each case whose source lacks some of the merged classes, the classes it does hold:
training then keeps the missing classes out of that case's loss and its scores (README, "Partial labels").

    python examples/merge_datasets.py Merged Dataset001_Liver Dataset002_LiverTumour
    python examples/merge_datasets.py --demo        # merges two small synthetic datasets and checks the result

Label datasets (softmax) only: in a source, a structure it did not annotate must be stored as background (0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from autoseg.io.check import check_dataset
from autoseg.io.dataset import load_dataset
from autoseg.io.image import read_label, write_label


def merged_labels(sources: list[Path]) -> dict[str, int]:
    """The union of the sources' classes by name, background first, numbered in order of first appearance."""
    out = {"background": 0}
    for root in sources:
        for name, value in json.loads((root / "dataset.json").read_text())["labels"].items():
            if isinstance(value, list):
                raise SystemExit(f"{root}: region labels ({name}) cannot be merged by this script; merge label "
                                 "datasets (one value per class).")
            if name not in ("background", "ignore") and name not in out:
                out[name] = len(out)
    return out


def merge(sources: list[Path], dest: Path) -> Path:
    """Write the merged dataset to ``dest`` (which must not exist) and return it."""
    labels = merged_labels(sources)
    first = load_dataset(sources[0]).spec
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    annotated: dict[str, list[str]] = {}
    n_cases = 0
    for root in sources:
        ds = load_dataset(root)
        if ds.spec.n_channels != first.n_channels or ds.spec.file_ending != first.file_ending:
            raise SystemExit(f"{root}: {ds.spec.n_channels} channel(s) with ending {ds.spec.file_ending}, but "
                             f"{sources[0]} has {first.n_channels} with {first.file_ending}; convert it first.")
        own = {n: v for n, v in ds.spec.labels.items() if n not in ("background", "ignore")}
        lut = np.zeros(max(own.values(), default=0) + 1, dtype=np.int16)
        for name, value in own.items():
            lut[int(value)] = labels[name]
        for case in ds.cases:
            cid = f"{root.name}_{case.case_id}"
            for c, image in enumerate(case.images):
                shutil.copyfile(image, dest / "imagesTr" / f"{cid}_{c:04d}{first.file_ending}")
            seg = read_label(case.label)
            write_label(dest / "labelsTr" / f"{cid}{first.file_ending}", lut[seg.array], seg.geometry)
            if set(own) != set(labels) - {"background"}:
                annotated[cid] = sorted(own, key=labels.get)
            n_cases += 1
    spec = {"channel_names": {str(i): n for i, n in enumerate(first.channel_names)}, "labels": labels,
            "numTraining": n_cases, "file_ending": first.file_ending, "annotated": annotated}
    (dest / "dataset.json").write_text(json.dumps(spec, indent=1))
    return dest


def _demo(folder: Path) -> list[Path]:
    """Two small sources: one annotates the whole tumour only, the other also its core."""
    from autoseg.data.synthetic import make_synthetic_dataset

    whole = make_synthetic_dataset(folder / "Dataset021_Whole", n_cases=3, shape=(24, 24, 24), n_channels=1, seed=1)
    core = make_synthetic_dataset(folder / "Dataset022_Core", n_cases=3, shape=(24, 24, 24), n_channels=1, seed=2)
    for root, labels, lut in ((whole, {"background": 0, "tumour": 1}, [0, 1, 1, 1]),
                              (core, {"background": 0, "tumour": 1, "core": 2}, [0, 1, 2, 2])):
        for path in (root / "labelsTr").iterdir():
            seg = read_label(path)
            write_label(path, np.asarray(lut, np.uint8)[seg.array], seg.geometry)
        spec = json.loads((root / "dataset.json").read_text())
        spec["labels"] = labels
        (root / "dataset.json").write_text(json.dumps(spec))
    return [whole, core]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path, nargs="?", help="the merged dataset folder to write")
    ap.add_argument("sources", type=Path, nargs="*", help="dataset folders to merge")
    ap.add_argument("--demo", action="store_true", help="merge two small synthetic datasets in a scratch folder")
    args = ap.parse_args()
    if args.demo:
        folder = Path(tempfile.mkdtemp(prefix="autoseg_merge_"))
        args.dest, args.sources = folder / "Dataset023_Merged", _demo(folder)
    if args.dest is None or len(args.sources) < 2:
        ap.error("give the merged folder and at least two source datasets (or --demo)")
    dest = merge(args.sources, args.dest)
    print(check_dataset(dest, progress=False).format_table())
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
