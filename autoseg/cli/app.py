"""The ``autoseg`` command line: parse, call the API, print. No pipeline logic lives here."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg import __version__
from autoseg.cli import federated as federated_cli
from autoseg.cli import plugins as plugins_cli
from autoseg.cli import predict as predict_cli
from autoseg.cli import report, selection, trust
from autoseg.cli.selection import add_jobs
from autoseg.errors import AutosegError, describe_os_error

if TYPE_CHECKING:
    from autoseg.training.validation import ValidationSummary


def _build_parser() -> argparse.ArgumentParser:
    """The ``autoseg`` parser: global options, then one subparser per command (in ``--help`` order)."""
    p = argparse.ArgumentParser(prog="autoseg", description="Self-configuring medical image segmentation.")
    p.add_argument("--version", action="version", version=f"autoseg {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_check_parser(sub)
    _add_plan_parser(sub)
    _add_preprocess_parser(sub)
    _add_train_parser(sub)
    predict_cli.add_parsers(sub)
    selection.add_parsers(sub)
    trust.add_parsers(sub)
    report.add_parsers(sub)
    plugins_cli.add_parsers(sub)
    federated_cli.add_parsers(sub)
    _add_convert_msd_parser(sub)
    _add_import_nnunet_parser(sub)
    return p


def _add_check_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg check``: validate a dataset folder."""
    c = sub.add_parser("check", help="check a dataset folder and list every problem at once")
    c.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    c.add_argument("--strict-geometry", action="store_true",
                   help="treat origin/direction mismatches inside a case as errors")
    c.add_argument("--allow-geometry-mismatch", action="store_true",
                   help="proceed although image and label headers place voxels more than half a voxel apart "
                        "(errors by default; planning records the choice in plans.json)")
    c.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    add_jobs(c)


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg plan``: check, fingerprint, plan and optionally preprocess a dataset."""
    pl = sub.add_parser("plan", help="check, fingerprint and plan a dataset (writes plans.json)")
    pl.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    pl.add_argument("--workdir", type=Path, help="work folder (default ./autoseg_work/<dataset>)")
    pl.add_argument("--gpu-memory", type=float, default=8.0, metavar="GB",
                    help="GPU memory to plan for, in GB (default 8)")
    pl.add_argument("--preset", default="default",
                    help="planner preset: default (nnU-Net v2 rules), cpu (sized for CPU training), ...")
    pl.add_argument("--explain", action="store_true", help="print each planning decision and why")
    pl.add_argument("--strict-geometry", action="store_true",
                    help="treat origin/direction mismatches inside a case as errors")
    pl.add_argument("--allow-geometry-mismatch", action="store_true",
                   help="proceed although image and label headers place voxels more than half a voxel apart "
                        "(errors by default; planning records the choice in plans.json)")
    pl.add_argument("--force", action="store_true", help="recompute the fingerprint even if files are unchanged")
    pl.add_argument("--seed", type=int, default=12345, help="seed recorded in the plans (default 12345)")
    pl.add_argument("--recipe", nargs="+", default=[], metavar="KIND=NAME[:K=V...]",
                    help="training recipe, e.g. network=attention_unet loss=dice_focal:gamma=2 mirror_axes=1,2 (kinds: "
                         "network, loss, optimizer, schedule, augmentation, mirror_axes; `autoseg plugins` lists "
                         "the parts and their parameters)")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="CONFIG.KEY=VALUE",
                    help="set a planned value by hand (repeatable), e.g. --set 3d_fullres.patch_size=96,160,160 "
                         "--set 3d_fullres.batch_size=4 --set 3d_fullres.spacing=1,1,1 (keys: spacing, "
                         "patch_size, batch_size, num_epochs, iterations_per_epoch, val_iterations); what depends on "
                         "it is derived again and the plans record it")
    pl.add_argument("--plugin", action="append", default=[], metavar="PLUGIN",
                    help="add a plugin (repeatable): NAME or NAME:KEY=VALUE[:KEY=VALUE...], e.g. kle_residual or "
                         "peritumoral_zones:widths_mm=5,10:labels=1; `autoseg plugins` lists them")
    pl.add_argument("--storage", choices=("npy", "blosc2"), default=None,
                    help="how preprocessed cases are stored: npy (memory-mapped, fastest patch reads; default) or "
                         "blosc2 (compressed, 2-4x smaller on disk, ~1.4x slower patch reads; needs "
                         "pip install \"autoseg[blosc2]\"); changing it re-preprocesses")
    pl.add_argument("--preprocess", nargs="+", metavar="CONFIG", default=None,
                    help="configurations to preprocess after planning (default: 3d_fullres, or 2d for 2D data; "
                         "'all' for every configuration, 'none' to skip)")
    add_jobs(pl)


def _add_preprocess_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg preprocess``: preprocess the training cases of configurations."""
    pp = sub.add_parser("preprocess", help="preprocess the training cases for configurations (idempotent)")
    pp.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    pp.add_argument("configurations", nargs="*", metavar="CONFIG",
                    help="configurations (default 3d_fullres, or 2d for 2D data)")
    pp.add_argument("--workdir", type=Path, help="work folder holding plans.json")
    pp.add_argument("--overwrite", action="store_true", help="redo every case")
    add_jobs(pp)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg train``: train folds of a configuration, fine-tune or re-validate."""
    t = sub.add_parser("train", help="train a configuration with cross-validation (resumable)",
                       epilog="Preemption (e.g. SLURM): on SIGTERM or SIGUSR1 training finishes the iteration under "
                              "way, saves checkpoint_latest.pt and exits with status 75 (EX_TEMPFAIL: requeue the "
                              "job); rerun the same command with --resume to continue exactly where it stopped.")
    t.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    t.add_argument("configuration", help="2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres")
    t.add_argument("fold", help="fold number, a list like 0,2, 'cv' (every fold in turn) or 'all' (one model on "
                                "every case)")
    t.add_argument("--workdir", type=Path, help="work folder holding plans.json")
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--epochs", type=int, help="training epochs (default: the plan's)")
    t.add_argument("--iters-per-epoch", type=int, help="training iterations per epoch (default: the plan's)")
    t.add_argument("--val-iters", type=int, help="online validation iterations per epoch (default: the plan's)")
    t.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (default 0.01, poly decay)")
    t.add_argument("--save-every", type=int, default=5, metavar="N", help="latest checkpoint every N epochs")
    t.add_argument("--workers", type=int, help="data-loading worker processes (default: from the CPU count)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint; with a larger --epochs, extend a finished run")
    t.add_argument("--deterministic", action="store_true", help="deterministic algorithms (reproducible runs)")
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    t.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16",
                   help="mixed-precision type on CUDA: float16 (default, with a gradient scaler) or bfloat16 (no scaler)")
    t.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the network and loss: auto (default: on for CUDA), on or off")
    t.add_argument("--save-probabilities", action="store_true",
                   help="final validation also writes probabilities (.npz) for ensembling")
    t.add_argument("--no-validation", action="store_true", help="skip the final full-volume validation")
    t.add_argument("--validate-only", action="store_true",
                   help="do not train: rerun the final validation of trained folds (add --save-probabilities to get "
                        "what ensembling needs)")
    t.add_argument("--modality-dropout", type=float, default=0.0, metavar="P",
                   help="blank each input channel with probability P per sample (never all), so the model copes "
                        "with missing sequences (predict --missing); e.g. 0.25")
    t.add_argument("--recipe", nargs="+", default=[], metavar="KIND=NAME[:K=V...]",
                    help="override the planned recipe for this run, e.g. optimizer=adamw:lr=3e-4 "
                         "schedule=cosine:warmup=50 (recorded in the checkpoints)")
    t.add_argument("--init-from", metavar="SOURCE",
                   help="fine-tune: start from the matching weights of a bundle, work folder, fold folder or "
                        "checkpoint (layers that do not match, e.g. other classes, are listed and trained afresh)")
    t.add_argument("--groups", type=Path, metavar="CSV",
                   help="CSV/TSV with case,group columns (e.g. patient ids): splits keep each group in one fold")
    t.add_argument("--log-to", default="", metavar="TRACKERS",
                   help="also log each epoch to experiment trackers, comma-separated: csv (log.csv next to log.jsonl), "
                        "tensorboard (<fold>/tensorboard/; pip install \"autoseg[tensorboard]\"), mlflow "
                        "(MLFLOW_TRACKING_URI, else <workdir>/mlruns; pip install \"autoseg[mlflow]\")")
    add_jobs(t)


def _add_convert_msd_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg convert-msd``: convert a Decathlon task to the nnU-Net layout."""
    m = sub.add_parser("convert-msd", help="convert a Medical Segmentation Decathlon task to the nnU-Net layout")
    m.add_argument("src", type=Path, help="MSD task folder (dataset.json, imagesTr/, labelsTr/)")
    m.add_argument("dst", type=Path, help="new dataset folder to write")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty destination")


def _print_warnings(report) -> None:  # type: ignore[no-untyped-def]
    if report.warnings:
        print(report.format_table(), file=sys.stderr)


def _cmd_check(args: argparse.Namespace) -> int:
    from autoseg.api import check
    from autoseg.io.atomic import write_json_atomic

    report = check(args.dataset, jobs=args.jobs, progress=not args.quiet, strict_geometry=args.strict_geometry,
                   allow_geometry_mismatch=args.allow_geometry_mismatch)
    print(report.format_table())
    if args.json:
        write_json_atomic(args.json, report.to_json())
    return 0 if report.ok else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.api import plan, workdir_for
    from autoseg.io.dataset import load_dataset
    from autoseg.planner.overrides import override_warnings

    dataset = load_dataset(args.dataset)  # a wrong path fails before any work folder is made
    workdir = workdir_for(dataset, args.workdir)
    plans = plan(dataset, workdir=workdir, gpu_memory_gb=args.gpu_memory, preset=args.preset,
                 jobs=args.jobs, progress=not args.quiet, strict_geometry=args.strict_geometry,
                 allow_geometry_mismatch=args.allow_geometry_mismatch,
                 reuse_fingerprint=not args.force, seed=args.seed, plugins=args.plugin, recipe=args.recipe,
                 overrides=args.overrides, storage=args.storage, on_report=_print_warnings)
    for warning in override_warnings(plans):
        print(f"autoseg plan: warning: {warning}", file=sys.stderr)
    if args.explain:
        print("\n".join(plans.explain()))
        print()
    print(plans.summary_table())
    print(f"\nwrote {workdir / 'fingerprint.json'} and {workdir / 'plans.json'}")
    choice = args.preprocess or []
    if choice != ["none"]:
        from autoseg.api import preprocess

        configs = list(plans.configurations) if choice == ["all"] else (choice or None)
        for name, summary in preprocess(args.dataset, configs, workdir=workdir, jobs=args.jobs,
                                        progress=not args.quiet).items():
            print(f"preprocessed {name}: {len(summary.processed)} case(s) written, {len(summary.reused)} reused "
                  f"-> {summary.folder}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.api import preprocess

    for name, summary in preprocess(args.dataset, args.configurations or None, workdir=args.workdir,
                                    jobs=args.jobs, progress=not args.quiet, overwrite=args.overwrite).items():
        print(f"{name}: {len(summary.processed)} case(s) written, {len(summary.reused)} reused -> {summary.folder}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Train; exit status 75 (:attr:`TrainingInterrupted.exit_code`) when a preemption signal stopped training."""
    from autoseg.api import train
    from autoseg.errors import TrainingInterrupted
    from autoseg.training.settings import TrainSettings
    from autoseg.training.tracking import check_trackers

    settings = TrainSettings(epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
                             initial_lr=args.lr, save_every=args.save_every, workers=args.workers,
                             device=args.device, deterministic=args.deterministic,
                             amp=False if args.no_amp else None, amp_dtype=args.amp_dtype, compile=args.compile,
                             save_probabilities=args.save_probabilities,
                             validate=not args.no_validation, progress=not args.quiet,
                             modality_dropout=args.modality_dropout, init_from=args.init_from,
                             recipe=tuple(args.recipe), log_to=args.log_to)
    check_trackers(settings.log_to)  # a missing package is named before any preprocessing or training
    try:
        results = train(args.dataset, args.configuration, args.fold, workdir=args.workdir, settings=settings,
                        resume=args.resume, jobs=args.jobs, groups=args.groups, validate_only=args.validate_only)
    except TrainingInterrupted as err:
        print(f"autoseg train: {err}", file=sys.stderr)
        return err.exit_code
    for result in results:
        if not result.main_process:  # under torchrun only rank 0 reports
            continue
        if result.transfer is not None:
            print("\n".join(result.transfer.lines()))
        print(f"{result.folder}: {result.epochs} epochs")
        if result.validation:
            print(format_validation(result.validation, held_out=result.folder.name != "fold_all"))
    return 0


def format_validation(summary: ValidationSummary, held_out: bool = True) -> str:
    """A small table: Dice per class on the validation cases, and the mean."""
    rows = [(name, "-" if v is None else f"{v:.4f}") for name, v in summary.mean.items()]
    mean = summary.mean_foreground_dice
    rows.append(("mean", "-" if mean is None else f"{mean:.4f}"))
    width = max(len(r[0]) for r in rows)
    what = "held-out case(s)" if held_out else "training case(s); fold 'all' holds none out, so this is no test"
    lines = [f"validation Dice ({len(summary.cases)} {what}):"]
    lines += [f"  {n.ljust(width)}  {v}" for n, v in rows]
    return "\n".join(lines)


def _add_import_nnunet_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``autoseg import-nnunet``: an nnU-Net v2 model folder as an autoseg work folder."""
    m = sub.add_parser("import-nnunet", help="import a trained nnU-Net v2 model (safely; no nnU-Net needed)")
    m.add_argument("model_folder", type=Path, help="nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION")
    m.add_argument("--workdir", type=Path, required=True, help="work folder to write (models/<configuration>/)")
    m.add_argument("--folds", nargs="+", default=None, help="folds to import (default: every trained fold)")


def _cmd_import_nnunet(args: argparse.Namespace) -> int:
    from autoseg.ensemble.imported_cv import import_cv_results
    from autoseg.interop.nnunet import import_nnunet

    report = import_nnunet(args.model_folder, args.workdir, folds=args.folds)
    print(report.summary())
    print(import_cv_results(args.model_folder, args.workdir, report.configuration, report.folds).summary())
    return 0


def _cmd_convert_msd(args: argparse.Namespace) -> int:
    from autoseg.io.msd import convert_msd

    out = convert_msd(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote {out}; next: autoseg check {out}")
    return 0


COMMANDS = {"check": _cmd_check, "plan": _cmd_plan, "preprocess": _cmd_preprocess, "train": _cmd_train,
            "convert-msd": _cmd_convert_msd, "import-nnunet": _cmd_import_nnunet, **selection.COMMANDS,
            **trust.COMMANDS, **report.COMMANDS, **plugins_cli.COMMANDS, **predict_cli.COMMANDS,
            **federated_cli.COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 problems found, 2 error, 130 interrupted)."""
    args = _build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"autoseg {args.command}: interrupted; finished files are kept, rerun to continue.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one readable line; --debug shows the traceback
        if args.debug:
            traceback.print_exc()
        print(f"autoseg {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


def _message(err: Exception) -> str:
    if isinstance(err, AutosegError):
        return str(err)
    if isinstance(err, OSError) and (text := describe_os_error(err)):
        return text
    return (f"unexpected {type(err).__name__}: {err}. This is a bug in autoseg or an input it does not recognise; "
            "rerun with --debug for the traceback and report it with the command line. Finished files are kept.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
