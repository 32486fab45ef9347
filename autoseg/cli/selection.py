"""``autoseg evaluate``, ``find-best``, ``ensemble``, ``postprocess``, ``export``, ``verify-bundle``: parse, call, print."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--jobs", type=int, default=2, metavar="N",
                        help="worker processes (default 2)")


def add_label_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map-labels", nargs="+", metavar="OLD:NEW",
                        help="write labels in another convention, e.g. 3:4 (BraTS 2023 enhancing tumour 3 -> 4)")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    e = sub.add_parser("evaluate", help="score a folder of segmentations against references (Dice, HD95, NSD, "
                                        "lesion-wise)")
    e.add_argument("pred", type=Path, help="folder of predicted segmentations (CASE.<ending>)")
    e.add_argument("ref", type=Path, help="folder of reference segmentations with the same names")
    e.add_argument("--dataset-json", type=Path, metavar="J", help="dataset.json naming the labels and regions")
    e.add_argument("-o", "--output", type=Path, help="folder for summary.json and cases.csv (default: PRED)")
    e.add_argument("--tolerance", type=float, default=1.0, metavar="MM",
                   help="normalised surface Dice tolerance in mm (default 1)")
    e.add_argument("--no-lesions", action="store_true", help="skip the lesion-wise metrics")
    e.add_argument("--allow-missing", action="store_true", help="score only the references that have a prediction")
    add_jobs(e)

    f = sub.add_parser("find-best", help="choose the best configuration or ensemble on CV and learn postprocessing")
    f.add_argument("--workdir", type=Path, required=True, help="work folder with trained folds")
    f.add_argument("--dataset", type=Path, help="dataset folder with labelsTr (default: the one planned from)")
    f.add_argument("--metric", default="dice", help="ranking metric: dice (default), nsd, iou, lesion_dice, hd95, ...")
    f.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="candidates (default: every trained)")
    f.add_argument("--no-ensembles", action="store_true", help="do not try ensembles of configurations")
    f.add_argument("--no-postprocessing", action="store_true", help="do not learn postprocessing")
    f.add_argument("--device", default="auto", help="for validation outputs that must be computed first")
    add_jobs(f)

    en = sub.add_parser("ensemble", help="average the probabilities of prediction folders (predict "
                                         "--save-probabilities)")
    en.add_argument("-i", "--input", nargs="+", required=True, type=Path, metavar="FOLDER")
    en.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    en.add_argument("--save-probabilities", action="store_true", help="also write the averaged CASE.npz")
    en.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    add_label_map(en)
    add_jobs(en)

    po = sub.add_parser("postprocess", help="apply learnt postprocessing rules to any segmentation folder")
    po.add_argument("-i", "--input", required=True, type=Path, metavar="FOLDER")
    po.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    rules = po.add_mutually_exclusive_group(required=True)
    rules.add_argument("--rules", type=Path, metavar="FILE", help="postprocessing.json")
    rules.add_argument("--workdir", type=Path, help="use the rules find-best learnt in this work folder")
    po.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    add_jobs(po)

    ex = sub.add_parser("export", help="write a reproducible bundle of the chosen pipeline (weights, plans, manifest)")
    ex.add_argument("--workdir", type=Path, required=True)
    ex.add_argument("-o", "--output", type=Path, required=True, metavar="BUNDLE")
    ex.add_argument("--dataset", type=Path, help="training dataset to hash and take the sample case from")
    ex.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="default: the find-best choice")
    ex.add_argument("-f", "--folds", nargs="+", metavar="FOLD", help="default: the chosen folds")
    ex.add_argument("--sample", metavar="CASE", help="training case stored as the verification sample")
    ex.add_argument("--no-hash-data", action="store_true", help="do not hash the dataset files into the manifest")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    ex.add_argument("--onnx", action="store_true",
                    help="also write one ONNX file per fold network (for predict --backend onnx, ONNX Runtime)")
    add_label_map(ex)

    v = sub.add_parser("verify-bundle", help="check a bundle's files and rerun its sample prediction")
    v.add_argument("bundle", type=Path)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation.evaluate import evaluate_folder

    summary = evaluate_folder(args.pred, args.ref, dataset_json=args.dataset_json, output=args.output,
                              tolerance_mm=args.tolerance, lesion_wise=not args.no_lesions,
                              allow_missing=args.allow_missing, jobs=args.jobs, progress=not args.quiet)
    print(summary.format_table())
    out = args.output or args.pred
    print(f"wrote {out / 'summary.json'} and {out / 'cases.csv'}")
    return 0


def _cmd_find_best(args: argparse.Namespace) -> int:
    from autoseg.ensemble.selection import find_best

    sel = find_best(args.workdir, dataset=args.dataset, metric=args.metric, configurations=args.configurations,
                    ensembles=not args.no_ensembles, postprocessing=not args.no_postprocessing, jobs=args.jobs,
                    progress=not args.quiet, device=args.device, on_note=lambda m: print(m, flush=True))
    print(sel.format_table())
    print(f"\nwrote {sel.folder / 'best.json'}" + (f" and {sel.folder / 'postprocessing.json'}" if sel.rules else ""))
    print("`autoseg predict -i IN -o OUT --workdir W` now uses this choice; explicitly:")
    print(f"  {sel.predict_command(args.workdir)}")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from autoseg.ensemble.ensembling import ensemble_folders

    written = ensemble_folders(args.input, args.output, jobs=args.jobs, progress=not args.quiet,
                               overwrite=args.overwrite, save_probabilities=args.save_probabilities,
                               label_map=_parse_map(args.map_labels))
    print(f"{len(written)} case(s) ensembled -> {args.output}")
    return 0


def _parse_map(items):  # type: ignore[no-untyped-def]
    from autoseg.ensemble.models import parse_label_map

    return parse_label_map(items)


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from autoseg.ensemble.choice import POSTPROCESSING, SELECTION
    from autoseg.ensemble.postprocessing import PostprocessingRules, postprocess_folder

    path = args.rules or args.workdir / SELECTION / POSTPROCESSING
    rules = PostprocessingRules.load(path)
    print("\n".join(rules.describe()) or "the rules are empty: files are copied unchanged")
    written = postprocess_folder(args.input, args.output, rules, jobs=args.jobs, progress=not args.quiet,
                                 overwrite=args.overwrite)
    print(f"{len(written)} file(s) -> {args.output}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from autoseg.ensemble.bundle import export_bundle

    folds = [f for item in args.folds for f in item.split(",") if f] if args.folds else None
    out = export_bundle(args.workdir, args.output, dataset=args.dataset, configurations=args.configurations,
                        folds=folds, label_map=_parse_map(args.map_labels), sample=args.sample,
                        hash_dataset=not args.no_hash_data, overwrite=args.overwrite, progress=not args.quiet,
                        onnx=args.onnx)
    print(f"wrote bundle {out}; predict with `autoseg predict -i IN -o OUT --bundle {out}"
          f"{' --backend onnx' if args.onnx else ''}`, check it with `autoseg verify-bundle {out}`")
    return 0


def _cmd_verify_bundle(args: argparse.Namespace) -> int:
    from autoseg.ensemble.bundle import verify_bundle

    report = verify_bundle(args.bundle, progress=not args.quiet, on_note=print)
    print(report.format())
    return 0 if report.ok else 1


COMMANDS = {"evaluate": _cmd_evaluate, "find-best": _cmd_find_best, "ensemble": _cmd_ensemble,
            "postprocess": _cmd_postprocess, "export": _cmd_export, "verify-bundle": _cmd_verify_bundle}
