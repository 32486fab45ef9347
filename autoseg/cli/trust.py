"""``autoseg evaluate-missing``, ``explain`` and ``measure``: parse, call the API, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from autoseg.cli.selection import add_jobs


def _model_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", type=Path, help="work folder the models were trained in")
    where.add_argument("--bundle", type=Path, help="a bundle written by `autoseg export`")
    p.add_argument("-c", "--configuration", metavar="CONFIG", help="default: the find-best choice")
    p.add_argument("-f", "--folds", nargs="+", metavar="FOLD", help="folds to use")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--tta", action="store_true", help="test-time mirroring (slower; off by default)")
    p.add_argument("--max-cases", type=int, metavar="N", help="use at most N cases")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    em = sub.add_parser("evaluate-missing", help="Dice with every subset of input channels (missing sequences)")
    _model_options(em)
    em.add_argument("-i", "--images", type=Path, help="images to score (default: the cross-validation cases)")
    em.add_argument("-r", "--labels", type=Path, help="their reference segmentations (needed with -i)")
    em.add_argument("--dataset", type=Path, help="training dataset for the CV cases (default: the planned one)")
    em.add_argument("-o", "--output", type=Path, help="folder for missing_channels.json/.csv (default WORKDIR/trust)")

    ex = sub.add_parser("explain", help="Shapley value of each input channel per class, or spatial maps per class "
                                        "(Grad-CAM, Grad-CAM++, occlusion, attention gates), optionally evaluated")
    _model_options(ex)
    ex.add_argument("-i", "--images", type=Path, required=True, help="cases to explain (nnU-Net layout)")
    ex.add_argument("-r", "--labels", type=Path,
                    help="references (shapley default: how much each channel is needed to reproduce the model's own "
                         "output; spatial maps: explain the class's logits over the reference instead of the "
                         "predicted mask, and score against it)")
    ex.add_argument("-o", "--output", type=Path, required=True,
                    help="folder for attribution.csv/.json/.png (shapley) or maps/, overlays/, explanations.csv")
    ex.add_argument("--method", default="shapley", metavar="M",
                    help="shapley (default), gradcam, gradcam++, occlusion or attention; several spatial ones "
                         "comma-separated")
    ex.add_argument("--layer", help="layer for gradcam/gradcam++ (default decoder.0, the last decoder stage; "
                                    "e.g. decoder.1, encoder.3)")
    ex.add_argument("--evaluate", action="store_true",
                    help="score the maps: deletion/insertion AUC and mass inside the reference, against a random "
                         "and a distance-to-mask baseline")

    me = sub.add_parser("measure", help="clinical tables: volume per class per case and a per-lesion list (CSV)")
    me.add_argument("folder", type=Path, help="folder of segmentations")
    names = me.add_mutually_exclusive_group()
    names.add_argument("--workdir", type=Path, help="work folder or bundle whose labels name the classes")
    names.add_argument("--dataset-json", type=Path, metavar="J", help="dataset.json naming labels and regions")
    me.add_argument("-o", "--output", type=Path, help="folder for volumes.csv and lesions.csv (default: FOLDER)")
    add_jobs(me)


def _folds(args: argparse.Namespace) -> list[str] | None:
    return [f for item in args.folds for f in item.split(",") if f] if args.folds else None


def _cmd_evaluate_missing(args: argparse.Namespace) -> int:
    from autoseg.api.trust import evaluate_missing

    summary = evaluate_missing(args.bundle or args.workdir, images=args.images, labels=args.labels,
                               dataset=args.dataset, configuration=args.configuration, folds=_folds(args),
                               device=args.device, tta=args.tta, max_cases=args.max_cases, output=args.output,
                               progress=not args.quiet)
    print(summary.format_table())
    out = args.output or (args.bundle or args.workdir) / "trust"
    print(f"wrote {out / 'missing_channels.json'} and {out / 'missing_channels.csv'}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from autoseg.api.trust import explain

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    result = explain(args.bundle or args.workdir, args.images, output=args.output, labels=args.labels,
                     configuration=args.configuration, folds=_folds(args), device=args.device, tta=args.tta,
                     max_cases=args.max_cases, progress=not args.quiet, method=methods, layer=args.layer,
                     evaluate=args.evaluate)
    print(result.format_table())
    if methods == ["shapley"]:
        print(f"wrote {args.output / 'attribution.csv'}, attribution.json and attribution.png")
    else:
        extra = " and explanation_scores.csv" if args.evaluate else ""
        print(f"wrote {args.output / 'explanations.csv'}{extra}, maps/ and overlays/")
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from autoseg.api.trust import measure

    paths = measure(args.folder, workdir=args.workdir, dataset_json=args.dataset_json, output=args.output,
                    jobs=args.jobs, progress=not args.quiet)
    print(f"wrote {paths.volumes} and {paths.lesions}")
    return 0


COMMANDS = {"evaluate-missing": _cmd_evaluate_missing, "explain": _cmd_explain, "measure": _cmd_measure}
