"""``autoseg predict``: segment image files (one machine, or many sharing the cases); parse, call, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.cli.selection import add_label_map

if TYPE_CHECKING:
    from autoseg.ensemble.cases import PredictionSummary


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg predict``: segment images with trained folds or a bundle."""
    pr = sub.add_parser("predict", help="segment images with trained folds (output in the inputs' geometry)")
    pr.add_argument("-i", "--input", nargs="+", required=True, metavar="IN",
                    help="folder of CASE_XXXX.<ending> channel files or CASE_XXXX/ DICOM series folders (nnU-Net "
                         "layout), one DICOM series folder, or image files")
    pr.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                    help="output folder (CASE.<ending> per case), or a file name for a single case")
    where = pr.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", type=Path, help="work folder the models were trained in")
    where.add_argument("--bundle", type=Path, help="a bundle written by `autoseg export` (needs nothing else)")
    pr.add_argument("-c", "--configuration", nargs="+", metavar="CONFIG",
                    help="configuration(s); several are ensembled (default: the find-best choice, else the only "
                         "trained one)")
    pr.add_argument("-f", "--folds", nargs="+", metavar="FOLD",
                    help="folds to ensemble, e.g. 0 1 2 or all (default: the chosen, else every trained fold)")
    pr.add_argument("--postprocessing", metavar="FILE",
                    help="postprocessing rules file, or 'none' (default: the learnt rules when following the "
                         "find-best choice)")
    add_label_map(pr)
    pr.add_argument("--deterministic", action="store_true",
                    help="float32 and deterministic algorithms: the same inputs always give the same files")
    pr.add_argument("--no-tta", action="store_true", help="no test-time mirroring (about 8x faster in 3D)")
    pr.add_argument("--step", type=float, metavar="S",
                    help="window step as a fraction of the patch (default 0.5; larger is faster)")
    pr.add_argument("--fast", action="store_true",
                    help="no mirroring and step 0.75: much faster at a small Dice cost (see README)")
    pr.add_argument("--save-probabilities", nargs="*", choices=("npz", "nifti"), metavar="FORMAT",
                    help="also write the probabilities: alone or 'npz', CASE.npz (for ensembling); 'nifti', one float "
                         "image per class or region in OUT/probabilities/ (input geometry, for viewers); both: npz nifti")
    pr.add_argument("--output-format", choices=("nifti", "dicom-seg"), default="nifti",
                    help="nifti (default: the segmentation in the input's format, NIfTI for DICOM series); dicom-seg: "
                         "also CASE.dcm, a DICOM Segmentation referencing the input series (DICOM inputs only)")
    pr.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    pr.add_argument("--no-amp", action="store_true",
                    help="float32 only (default: fp16 on CUDA, bf16 on CPUs with native bf16)")
    pr.add_argument("--overwrite", action="store_true", help="redo cases whose output exists (default: skip)")
    pr.add_argument("--uncertainty", action="store_true",
                    help="also write entropy and disagreement maps (OUT/uncertainty/; and the error map of a model "
                         "trained with network=...:error_head=true) and per-case quality scores; "
                         "cases below the threshold find-best learnt on CV are flagged in OUT/quality.csv")
    pr.add_argument("--missing", nargs="+", metavar="NAME", default=(),
                    help="channels that were not acquired (names from dataset.json, or indices): no files needed")
    pr.add_argument("--no-drift-check", action="store_true",
                    help="do not compare inputs with the training data (spacing, size, intensities)")
    pr.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                    help="torch (default) or onnx: ONNX Runtime (CPU; CUDA with onnxruntime-gpu) with a bundle's "
                         "network.onnx files (export --onnx), or exported next to a work folder's checkpoints")
    pr.add_argument("--tables", action="store_true",
                    help="also write OUT/volumes.csv and OUT/lesions.csv (volume per class, per-lesion list)")
    _add_sharing_arguments(pr)


def _add_sharing_arguments(pr: argparse.ArgumentParser) -> None:
    """``predict``'s options for many processes writing to one output folder (a cluster)."""
    share = pr.add_argument_group("several processes, one output folder (e.g. a SLURM array job)")
    share.add_argument("--num-parts", type=int, default=1, metavar="N",
                       help="split the cases into N parts (sorted by id, case i in part i %% N) and predict only "
                            "part --part-id")
    share.add_argument("--part-id", type=int, default=0, metavar="K",
                       help="the part this process predicts, 0 to N-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    share.add_argument("--claim", action="store_true",
                       help="share the cases (of the part) with every other --claim process writing to OUT, on any "
                            "machine: each case is claimed in OUT/.claims/ first; cases of dead processes are "
                            "taken over")
    share.add_argument("--claim-timeout", type=float, default=600.0, metavar="S",
                       help="seconds without a heartbeat after which a claim is taken over (default 600); a claim "
                            "of a process gone from this host is taken over at once")


def _cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.api import predict

    folds = [f for item in args.folds for f in item.split(",") if f] if args.folds else None
    summary = predict(args.input, args.output, workdir=args.bundle or args.workdir, configuration=args.configuration,
                      folds=folds, device=args.device, tta=not args.no_tta, step_size=args.step, fast=args.fast,
                      amp=False if args.no_amp else None,
                      save_probabilities=args.save_probabilities is not None and (
                          not args.save_probabilities or "npz" in args.save_probabilities),
                      probability_images="nifti" in (args.save_probabilities or ()), output_format=args.output_format,
                      overwrite=args.overwrite, progress=not args.quiet, postprocessing=args.postprocessing,
                      label_map=args.map_labels, deterministic=args.deterministic, uncertainty=args.uncertainty,
                      missing=[m for item in args.missing for m in item.split(",") if m],
                      drift=not args.no_drift_check,
                      backend=args.backend, num_parts=args.num_parts, part_id=args.part_id, claim=args.claim,
                      claim_timeout=args.claim_timeout,
                      on_warning=lambda m: print(f"autoseg predict: warning: {m}", file=sys.stderr))
    if summary.skipped:
        why = "before, or by other --claim processes meanwhile" if args.claim else "--overwrite redoes them"
        print(f"{len(summary.skipped)} case(s) already predicted, skipped ({why})")
    for cid in summary.written:
        t = summary.seconds[cid]
        print(f"{summary.outputs[cid]}  ({t['read']:.1f} s read, {t['predict']:.1f} s predict, "
              f"{t['export']:.1f} s export)")
    print(f"{len(summary.written)} case(s) predicted -> {args.output}")
    _print_sharing(summary, args)
    if summary.quality_table is not None:
        flagged = f"; flagged: {', '.join(summary.flagged)}" if summary.flagged else "; none flagged"
        print(f"quality table: {summary.quality_table}{flagged}")
    if args.tables and (summary.merged is not None or not (args.num_parts > 1 or args.claim)):
        from autoseg.api.trust import measure

        paths = measure(args.output, workdir=args.bundle or args.workdir, progress=not args.quiet)
        print(f"wrote {paths.volumes} and {paths.lesions}")
    return 0


def _print_sharing(summary: PredictionSummary, args: argparse.Namespace) -> None:
    """With --num-parts or --claim: cases left to others, and who writes the merged prediction.json."""
    if summary.busy:
        listed = ", ".join(summary.busy[:10]) + (", ..." if len(summary.busy) > 10 else "")
        print(f"{len(summary.busy)} case(s) being predicted by other --claim processes: {listed}")
    if summary.merged is not None:
        print(f"every case is finished; merged the processes' records into {summary.merged}")
    elif args.num_parts > 1 or args.claim:
        tables = " (and, with --tables, the tables)" if args.tables else ""
        print(f"other parts or processes are not finished; the last to finish writes prediction.json{tables}")


COMMANDS = {"predict": _cmd_predict}
