"""Training recipes on the demo data: what does each built-in network and each built-in loss cost and give?

The demo dataset (12 synthetic BraTS-like cases, 4 channels, 64^3, 3 nested regions, seed 0; generated under
benchmarks/out/ when missing) is planned with the ``cpu`` preset once per built-in network
(``autoseg plan --recipe network=NAME``, so the planner sizes the patch and batch for that network), and fold 0 of
3d_fullres is trained with the default loss (``dice_bce``, the region default) for the demo's 10 epochs x 25
iterations (4 online-validation batches per epoch) on the CPU with default settings (not deterministic, default
augmentation workers). Every built-in loss is then trained with the default network from a copy of the ``unet``
work folder (``autoseg train --recipe loss=NAME``); ``dice_ce`` is for label datasets, so on this region dataset its
row reads "n/a (regions)" when training refuses it. The ``unet`` + ``dice_bce`` run is the baseline of both sweeps
(it is trained once). Each training run is its own ``autoseg train`` subprocess, measured with
``benchmarks/measure.py`` (wall time, peak RSS of the process tree: the augmentation workers included, pages shared
between them counted in each).

Columns: parameters (``NetworkPart.count_parameters`` for the network the checkpoint records, checked against the
checkpoint's tensors), the plan's patch and batch, seconds per training iteration (log.jsonl ``epoch_time`` /
iterations, mean over the epochs after the first; the epoch time also holds the 4 validation batches), peak RSS,
the run's wall time (training and the final full-volume validation) and the validation mean Dice (fold 0's
``val/summary.json``, mean over the regions). One seed and 10 short epochs: differences of a few Dice points are
within noise, and timings on a shared 2-core machine are noisy (compare ratios to the unet row, not seconds).

Prints one line per finished run, then the table (markdown), also written to benchmarks/out/recipes.md.

    python benchmarks/recipes.py [--epochs 10] [--iters 25] [--skip swin_unetr] [--quick]   # --quick: 2 x 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
CONFIG = "3d_fullres"
DEFAULT_NETWORK = "unet"
VAL_ITERS = 4  # the demo's


@dataclass
class Row:
    network: str
    loss: str
    status: str = "ok"  # ok, n/a (regions), skipped, failed (...)
    parameters: int | None = None
    patch: tuple[int, ...] = ()
    batch: int | None = None
    s_per_iter: float | None = None
    peak_rss_mb: float | None = None
    wall_s: float | None = None
    dice: float | None = None
    dice_regions: dict[str, float | None] = field(default_factory=dict)
    error: str = ""  # a failed run's last output line


def autoseg_cmd(*args: str) -> list[str]:
    """``autoseg -q ARGS`` run with this interpreter and the autoseg this script imports (``-P``: the current
    folder does not shadow it; :func:`autoseg_env` puts its folder first)."""
    return [sys.executable, "-P", "-m", "autoseg", "-q", *args]


def autoseg_env() -> dict[str, str]:
    import autoseg

    root = str(Path(autoseg.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def demo_dataset(root: Path) -> Path:
    """The demo's dataset (``examples/demo.py``: same generator, size and seed), generated when missing."""
    dataset = root / "Dataset001_SyntheticBraTS"
    if not (dataset / "dataset.json").is_file():
        from autoseg.data.synthetic import make_synthetic_dataset

        print(f"generating the demo dataset in {dataset} ...", flush=True)
        make_synthetic_dataset(dataset, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats", regions=True,
                               n_test=2, seed=0)
    return dataset


def plan(dataset: Path, workdir: Path, network: str, jobs: int) -> None:
    """``autoseg plan --preset cpu --recipe network=NAME`` into a fresh work folder (3d_fullres preprocessed)."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = autoseg_cmd("plan", str(dataset), "--workdir", str(workdir), "--preset", "cpu", "-j", str(jobs),
                      "--recipe", f"network={network}", "--preprocess", CONFIG)
    done = subprocess.run(cmd, capture_output=True, text=True, env=autoseg_env())
    if done.returncode:
        raise RuntimeError(f"planning for {network} failed:\n{done.stdout}\n{done.stderr}")


def copy_workdir(source: Path, dest: Path) -> None:
    """``source``'s plan, split and preprocessed data without its models (hard links where possible)."""
    shutil.rmtree(dest, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("models", "*.log"), copy_function=link)


def train(dataset: Path, workdir: Path, row: Row, *, epochs: int, iters: int, jobs: int, loss_override: bool) -> None:
    """Train fold 0 in its own measured subprocess and fill ``row`` from what it wrote."""
    cmd = autoseg_cmd("train", str(dataset), CONFIG, "0", "--workdir", str(workdir), "--device", "cpu",
                      "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--val-iters", str(VAL_ITERS),
                      "-j", str(jobs))
    if loss_override:
        cmd += ["--recipe", f"loss={row.loss}"]
    run = run_measured(cmd, env=autoseg_env())
    (workdir / "train_output.log").write_text(run.output)
    if run.returncode:
        if "is for label training" in run.output:
            row.status = "n/a (regions)"
        else:
            last = [line for line in run.output.strip().splitlines() if line.strip()][-1:] or ["?"]
            row.status, row.error = f"failed (exit {run.returncode})", last[0]
        return
    row.peak_rss_mb, row.wall_s = run.peak_rss_mb, run.seconds
    fill(row, workdir, iters)


def fill(row: Row, workdir: Path, iters: int) -> None:
    """Parameters, patch, batch, s/iteration and validation Dice from the plan, checkpoint, log and summary."""
    import torch

    from autoseg.networks.parts import get_network_part
    from autoseg.planner.plans import Plans
    from autoseg.planner.recipe import Recipe

    plans = Plans.load(workdir / "plans.json")
    cfg = plans.configuration(CONFIG)
    row.patch, row.batch = tuple(cfg.patch_size), cfg.batch_size
    fold = workdir / "models" / CONFIG / "fold_0"
    state = torch.load(fold / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    recipe = Recipe.from_json(state["recipe"])
    if (recipe.network.name, recipe.loss.name) != (row.network, row.loss):
        raise RuntimeError(f"{fold}: the checkpoint records {recipe.network.name}/{recipe.loss.name}, "
                           f"not {row.network}/{row.loss}")
    part = get_network_part(recipe.network.name, recipe.network.params, origin=recipe.network.origin)
    row.parameters = part.count_parameters(cfg.topology, in_channels=state["in_channels"],
                                           num_classes=state["num_outputs"])
    net = part.build(cfg.topology, in_channels=state["in_channels"], num_classes=state["num_outputs"])
    net.load_state_dict(state["network"])  # the checkpoint is this network
    stored = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if stored != row.parameters:
        print(f"warning: {row.network}: count_parameters {row.parameters} != built network {stored}", flush=True)
    times = [json.loads(line)["epoch_time"] for line in (fold / "log.jsonl").read_text().splitlines() if line.strip()]
    times = times[1:] or times  # the first epoch starts the workers and warms up
    row.s_per_iter = sum(times) / len(times) / iters
    summary = json.loads((fold / "val" / "summary.json").read_text())
    row.dice_regions = dict(summary["mean"])
    values = [v for v in row.dice_regions.values() if v is not None]
    row.dice = sum(values) / len(values) if values else None


def table(rows: list[Row]) -> str:
    head = ["network", "loss", "parameters", "patch", "batch", "s / train iter", "peak RSS (MB)", "run wall (s)",
            "val mean Dice"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.status != "ok":
            cells = [r.network, r.loss, *(["-"] * 6), r.status]
        else:
            cells = [r.network, r.loss, f"{r.parameters / 1e6:.2f}M", "x".join(map(str, r.patch)), str(r.batch),
                     f"{r.s_per_iter:.2f}", f"{r.peak_rss_mb:.0f}", f"{r.wall_s:.0f}",
                     "-" if r.dice is None else f"{r.dice:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="training epochs (default 10, the demo's)")
    ap.add_argument("--iters", type=int, default=25, help="training iterations per epoch (default 25, the demo's)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 epochs x 5 iterations")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="worker processes for planning and validation")
    ap.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="networks or losses to leave out")
    ap.add_argument("--data", type=Path, default=OUT / "recipes_data", help="folder of the demo dataset")
    ap.add_argument("--work", type=Path, help="work folders (default benchmarks/out/recipes_work_EPOCHSxITERS)")
    ap.add_argument("--output", type=Path, help="markdown table (default benchmarks/out/recipes.md, "
                                                "recipes_quick.md with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.iters = 2, 5
    output = args.output or OUT / ("recipes_quick.md" if args.quick else "recipes.md")

    import autoseg
    from autoseg.networks.parts import builtin_networks
    from autoseg.planner.plans import Plans
    from autoseg.training.losses import LOSSES

    t0 = time.perf_counter()
    dataset = demo_dataset(args.data)
    work = args.work or OUT / f"recipes_work_{args.epochs}x{args.iters}"
    networks = [p.name for p in builtin_networks()]
    losses = list(LOSSES)
    unknown = sorted(set(args.skip) - set(networks) - set(losses))
    if unknown:
        ap.error(f"--skip: no built-in network or loss {', '.join(unknown)} (networks: {', '.join(networks)}; "
                 f"losses: {', '.join(losses)})")

    base_dir = work / f"network_{DEFAULT_NETWORK}"
    plan(dataset, base_dir, DEFAULT_NETWORK, args.jobs)
    default_loss = Plans.load(base_dir / "plans.json").recipe(CONFIG).loss.name
    rows = {("net", n): Row(n, default_loss) for n in networks}
    rows.update({("loss", loss): Row(DEFAULT_NETWORK, loss) for loss in losses if loss != default_loss})
    # the default network first (the baseline and the losses), the other networks after, swin_unetr (slow) last
    order = [("net", DEFAULT_NETWORK), *[k for k in rows if k[0] == "loss"],
             *sorted((k for k in rows if k[0] == "net" and k[1] != DEFAULT_NETWORK), key=lambda k: k[1] == "swin_unetr")]
    print(f"{len(order)} runs of {CONFIG} fold 0, {args.epochs} epochs x {args.iters} iterations, cpu preset; "
          f"default loss {default_loss}; work folders in {work}", flush=True)
    for i, key in enumerate(order, 1):
        row = rows[key]
        name = key[1]
        if name in args.skip:
            row.status = "skipped (--skip)"
            print(f"[{i}/{len(order)}] {row.network} + {row.loss}: skipped", flush=True)
            continue
        start = time.perf_counter()
        try:
            if key[0] == "net":
                workdir = base_dir if name == DEFAULT_NETWORK else work / f"network_{name}"
                if name != DEFAULT_NETWORK:
                    plan(dataset, workdir, name, args.jobs)
            else:
                workdir = work / f"loss_{name}"
                copy_workdir(base_dir, workdir)
            train(dataset, workdir, row, epochs=args.epochs, iters=args.iters, jobs=args.jobs,
                  loss_override=key[0] == "loss")
        except Exception as err:  # noqa: BLE001 - one broken run (planning or training) is reported in its row
            lines = str(err).strip().splitlines() or [""]
            row.status = "failed"
            row.error = f"{type(err).__name__}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else "")
        what = (f"{row.s_per_iter:.2f} s/iter, val mean Dice {row.dice:.4f}" if row.status == "ok"
                else f"{row.status} {row.error}".strip())
        print(f"[{i}/{len(order)}] {row.network} + {row.loss}: {what} ({time.perf_counter() - start:.0f} s)",
              flush=True)

    shown = [rows[("net", n)] for n in networks] + [rows[("loss", loss)] for loss in losses if loss != default_loss]
    total = time.perf_counter() - t0
    text = table(shown)
    failures = [f"- {r.network} + {r.loss}: {r.error}" for r in shown if r.error]
    if failures:
        text += "\n\nFailed runs (last line of their output):\n\n" + "\n".join(failures)
    note = (f"3d_fullres fold 0 of the demo data (12 synthetic BraTS-like cases, regions), cpu preset, "
            f"{args.epochs} epochs x {args.iters} iterations, {VAL_ITERS} validation batches per epoch, device cpu, "
            f"one seed (plans seed 12345). The {DEFAULT_NETWORK} + {default_loss} row is one run, the baseline of "
            f"both sweeps. s / train iter = mean epoch_time (after epoch 0, validation batches included) / "
            f"iterations; peak RSS sums the process tree (workers included); run wall = training + final "
            f"validation. Shared {os.cpu_count()}-core machine: timings are noisy, compare ratios. "
            f"autoseg {getattr(autoseg, '__version__', '?')} from {Path(autoseg.__file__).parent}. "
            f"Total wall time {total:.0f} s.")
    print()
    print(text)
    print()
    for r in shown:
        if r.status == "ok":
            regions = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in r.dice_regions.items())
            print(f"val_dice_{r.network}_{r.loss}: {r.dice:.4f} ({regions})")
    print(f"total_wall_seconds: {total:.0f}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(f"# Training recipes on the demo data\n\n{note}\n\n{text}\n")
    print(f"wrote {output}")
    return 1 if any(r.status.startswith("failed") for r in shown) else 0


if __name__ == "__main__":
    sys.exit(main())
