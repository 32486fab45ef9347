"""CPU inference, autoseg vs nnU-Net v2, like for like: same patch, U-Net topology, target spacing, sliding-window
step, test-time mirroring and input volumes.

    python benchmarks/predict_vs_nnunet.py [--quick] [--skip-nnunet] [--out benchmarks/out/predict_vs_nnunet]

Two scenarios, each with its own dataset and a pair of models of identical architecture (the tools cannot share
weights, so each trains its own for 1 epoch x 2 iterations on fold 'all'; timing does not depend on weights):

* ``brain``: the demo's synthetic BraTS-like data (4 channels, 64^3, 3 regions), autoseg's ``--preset cpu``
  topology, step 0.5, mirroring on; predicts the generated imagesTs.
* ``ct``: one CT-sized volume (512x512x300 voxels, 0.7x0.7x1.0 mm, 1 channel ``CT``, 3 labels) and a model at
  2x coarser spacing (1.4x1.4x2.0 mm), step 0.5, mirroring OFF for both tools (to keep the run in minutes on
  2 cores). The point is exporting 3-class logits back to 512x512x300.

autoseg's plans.json and nnU-Net's nnUNetPlans.json are edited so the two configurations match; the script prints
both tools' preprocessed grid shapes of every test case (same shape = same number of windows). Prints a table per
scenario: tool/setting, wall time of the predict command (total and per case), peak RSS and peak PSS (proportional
set size: shared pages split between processes) of its whole process tree, and the ratios to nnU-Net's default run (``-npp 3 -nps 3``). autoseg runs with its default (bf16 autocast where the
CPU supports it), with ``--no-amp`` (fp32, the strict like-for-like) and with ``--fast`` (not like for like: no
mirroring, larger step). Finally, if ``make demo`` has trained demo_data's fold 0, the Dice cost of ``--fast``.
``--imported`` also imports nnU-Net's trained model (``autoseg import-nnunet``) and predicts with it in autoseg (fp32):
the same weights in both tools, so it prints how many voxels of the two tools' files agree.
``--quick`` uses tiny volumes (checks the script in a couple of minutes); ``--repeat N`` runs each predict command N
times and keeps the fastest wall time and the largest peak memory. Datasets and models are reused from --out if there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import nnunet_layout, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINER_NAME = "nnUNetTrainer_AutosegPredictBench"
TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_AutosegPredictBench(nnUNetTrainer):
    """1 epoch x 2 iterations and no final validation: a model to time inference with."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass
'''
NNUNET_GRID = '''
import json, sys
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
plans = json.load(open(sys.argv[1]))
tf = plans["transpose_forward"]
target = plans["configurations"]["3d_fullres"]["spacing"]
out = {}
for case, files in json.loads(sys.argv[2]).items():
    data, props = SimpleITKIO().read_images(files)
    data = data.transpose([0] + [a + 1 for a in tf])
    data, _, _ = crop_to_nonzero(data)
    out[case] = [int(v) for v in compute_new_shape(data.shape[1:], [props["spacing"][a] for a in tf], target)]
print("GRID " + json.dumps(out))
'''


@dataclass
class Row:
    setting: str
    n_cases: int
    seconds: float = float("nan")
    rss_mb: float = float("nan")
    pss_mb: float = float("nan")
    error: str = ""


@dataclass
class Scenario:
    name: str
    dataset: Path
    tests: Path  # imagesTs folder
    nnunet_id: int
    tta: bool
    step: float = 0.5
    repeat: int = 1  # runs per setting; the table keeps the fastest wall time and the largest peak memory
    rows: list[Row] = field(default_factory=list)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # each tool picks its own threads, as its users get them
    return env


def _must(run, what: str) -> None:
    if run.returncode:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.output[-4000:]}")


def _test_cases(folder: Path) -> dict[str, list[str]]:
    cases: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*_0*.nii.gz")):
        cases.setdefault(f.name[: -len("_0000.nii.gz")], []).append(str(f))
    return cases


# ---- CT data --------------------------------------------------------------------------------------------------
def _ct_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like phantom (int16 HU: air, body cylinder, organ, lesion in it) and its labels, z chunk by z chunk."""
    rng = np.random.default_rng(seed)
    oz, oy, ox = rng.uniform(-0.1, 0.1, 3)
    lz, ly, lx = rng.uniform(-0.08, 0.08, 3)
    z_all, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    y, x = y[:, None], x[None, :]
    img, seg = np.empty(shape, np.int16), np.empty(shape, np.uint8)
    for z0 in range(0, shape[0], 16):
        z = z_all[z0:z0 + 16, None, None]
        body = (y / 0.8) ** 2 + (x / 0.9) ** 2 <= 1
        organ = ((z - oz) / 0.45) ** 2 + ((y - oy) / 0.35) ** 2 + ((x + 0.3 - ox) / 0.35) ** 2 <= 1
        lesion = ((z - oz - lz) / 0.15) ** 2 + ((y - oy - ly) / 0.12) ** 2 + ((x + 0.3 - ox - lx) / 0.12) ** 2 <= 1
        lab = np.where(organ, np.where(lesion, 2, 1), 0).astype(np.uint8)
        hu = np.where(body, 40.0, -1000.0) + 50.0 * (lab > 0) + 60.0 * (lab == 2)
        hu = hu + 15.0 * rng.standard_normal(hu.shape, dtype=np.float32)
        img[z0:z0 + 16], seg[z0:z0 + 16] = np.clip(hu, -1024, 3000), lab
    return img, seg


def make_ct_dataset(root: Path, train_shape: tuple[int, int, int], test_shape: tuple[int, int, int],
                    n_train: int = 5) -> Path:
    """nnU-Net v2 raw layout: ``n_train`` small cases and one large test volume, all 0.7x0.7x1.0 mm (x, y, z).

    The training cases only have to make a model of the right architecture (fold 'all', 1 epoch)."""
    import SimpleITK as sitk

    if (root / "dataset.json").is_file():
        return root
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def write(arr: np.ndarray, path: Path) -> None:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.7, 0.7, 1.0))
        sitk.WriteImage(im, str(path), True)

    for i in range(n_train):
        img, seg = _ct_case(train_shape, seed=i)
        write(img, root / "imagesTr" / f"ct_{i:03d}_0000.nii.gz")
        write(seg, root / "labelsTr" / f"ct_{i:03d}.nii.gz")
    write(_ct_case(test_shape, seed=100)[0], root / "imagesTs" / "ct_test_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": n_train, "file_ending": ".nii.gz", "name": "SyntheticCT"}, indent=2))
    return root


# ---- models ---------------------------------------------------------------------------------------------------
def autoseg_model(sc: Scenario, work: Path, override: dict | None):
    """Plan (cpu preset), optionally override spacing/patch/topology/batch, preprocess, train 1x2 on fold 'all'."""
    from autoseg.networks.topology import UNetTopology
    from autoseg.planner.plans import Plans

    py = [sys.executable, "-m", "autoseg", "-q"]
    ckpt = work / "models" / "3d_fullres" / "fold_all" / "checkpoint_final.pt"
    if not ckpt.is_file():
        _must(run_measured(py + ["plan", str(sc.dataset), "--workdir", str(work), "--preset", "cpu", "-j", "2"]
                           + (["--preprocess", "none"] if override else [])), "autoseg plan")
        if override:
            plans = Plans.load(work / "plans.json")
            cfg = plans.configurations["3d_fullres"]
            topo = UNetTopology(**override.pop("topology")).check()
            plans.configurations["3d_fullres"] = replace(cfg, topology=topo, **override)
            plans.save(work / "plans.json")
            _must(run_measured(py + ["preprocess", str(sc.dataset), "3d_fullres", "--workdir", str(work),
                                     "--overwrite", "-j", "2"]), "autoseg preprocess")
        _must(run_measured(py + ["train", str(sc.dataset), "3d_fullres", "all", "--workdir", str(work),
                                 "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                                 "--no-validation"]), "autoseg train")
    plans = Plans.load(work / "models" / "3d_fullres" / "plans.json")
    return plans, plans.configurations["3d_fullres"]


def nnunet_model(sc: Scenario, work: Path, venv: Path, plans, cfg) -> Path:
    """nnU-Net's plan with autoseg's configuration written into it, preprocessed and trained 1x2 on fold 'all'."""
    env, did = nnunet_layout(sc.dataset, work, dataset_id=sc.nnunet_id)
    bin_dir = venv.resolve() / "bin"
    pkg = Path(run_measured([str(bin_dir / "python"), "-c", "import nnunetv2, os; "
                             "print(os.path.dirname(nnunetv2.__file__))"], env=env).output.strip().splitlines()[-1])
    (pkg / "training" / "nnUNetTrainer" / f"{TRAINER_NAME}.py").write_text(TRAINER)
    if not list((work / "nnUNet_results").glob(f"Dataset{did:03d}_*/{TRAINER_NAME}__*/fold_all/checkpoint_final.pth")):
        # --no_pp: plan only; nnU-Net's preprocessing runs once, after the plan is edited below
        _must(run_measured([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(did), "-c", "3d_fullres",
                            "-np", "2", "-npfp", "2", "--no_pp"], env=env), "nnUNetv2_plan_and_preprocess")
        plans_file = next((work / "nnUNet_preprocessed").glob(f"Dataset{did:03d}_*")) / "nnUNetPlans.json"
        nn = json.loads(plans_file.read_text())
        if list(nn["transpose_forward"]) != list(plans.transpose_forward):
            raise SystemExit(f"transpose differs: nnU-Net {nn['transpose_forward']}, "
                             f"autoseg {list(plans.transpose_forward)}")
        if cfg.topology.block != "plain":
            raise SystemExit("only plain U-Nets have a like-for-like nnU-Net counterpart (PlainConvUNet)")
        c, t = nn["configurations"]["3d_fullres"], cfg.topology
        c.update(patch_size=list(cfg.patch_size), spacing=list(cfg.spacing), batch_size=cfg.batch_size)
        c["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
        c["architecture"]["arch_kwargs"].update(
            n_stages=t.n_stages, features_per_stage=list(t.features_per_stage),
            kernel_sizes=[list(k) for k in t.kernel_sizes], strides=[list(s) for s in t.strides],
            n_conv_per_stage=list(t.n_blocks_per_stage), n_conv_per_stage_decoder=list(t.n_conv_per_stage_decoder))
        plans_file.write_text(json.dumps(nn, indent=2))
        _must(run_measured([str(bin_dir / "nnUNetv2_preprocess"), "-d", str(did), "-c", "3d_fullres", "-np", "2"],
                           env=env), "nnUNetv2_preprocess")
        _must(run_measured([str(bin_dir / "nnUNetv2_train"), str(did), "3d_fullres", "all", "-tr", TRAINER_NAME,
                            "-device", "cpu"], env=env), "nnUNetv2_train")
    return next((work / "nnUNet_preprocessed").glob(f"Dataset{did:03d}_*")) / "nnUNetPlans.json"


def grid_shapes(sc: Scenario, plans, cfg, nn_plans: Path | None, venv: Path) -> None:
    """Print each test case's preprocessed grid as autoseg and nnU-Net compute it (same grid = same windows)."""
    from autoseg.io.image import read_image
    from autoseg.preprocessing.cropping import crop_to_nonzero
    from autoseg.preprocessing.preprocess import to_planning_axes
    from autoseg.preprocessing.resample import new_shape_for

    cases = _test_cases(sc.tests)
    ours = {}
    for case, files in cases.items():
        chans = [read_image(f) for f in files]
        images, _, sp = to_planning_axes(np.concatenate([c.array for c in chans]), None, chans[0].geometry, plans)
        ours[case] = list(new_shape_for(crop_to_nonzero(images)[0].shape[1:], sp, cfg.spacing))
        del images, chans
    theirs = {}
    if nn_plans is not None:
        run = run_measured([str(venv.resolve() / "bin" / "python"), "-c", NNUNET_GRID, str(nn_plans),
                            json.dumps(cases)])
        _must(run, "nnU-Net grid shapes")
        theirs = json.loads(run.output.split("GRID ", 1)[1].splitlines()[0])
    for case in cases:
        flag = "" if not theirs else ("  same" if theirs[case] == ours[case] else "  DIFFERENT")
        print(f"  grid {case}: autoseg {ours[case]}" + (f", nnU-Net {theirs[case]}{flag}" if theirs else ""))


# ---- predictions ----------------------------------------------------------------------------------------------
def _record(sc: Scenario, setting: str, cmd: list[str], out_dir: Path, env: dict[str, str]) -> Row:
    n = len(_test_cases(sc.tests))
    row = Row(setting, n, float("inf"), 0.0, 0.0)
    for _ in range(sc.repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        run = run_measured(cmd, env=env, pss=True)
        written = len(list(out_dir.glob("*.nii.gz"))) if out_dir.is_dir() else 0
        if run.returncode or written != n:
            row.error = f"exit {run.returncode}, {written}/{n} outputs; last output:\n{run.output[-2500:]}"
            print(f"  {setting}: FAILED ({row.error})")
            break
        row.seconds, row.rss_mb = min(row.seconds, run.seconds), max(row.rss_mb, run.peak_rss_mb)
        row.pss_mb = max(row.pss_mb, run.peak_pss_mb)
        print(f"  {setting}: {run.seconds:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB, PSS {run.peak_pss_mb:.0f} MB",
              flush=True)
    sc.rows.append(row)
    return row


def autoseg_predict(sc: Scenario, work: Path, out: Path, extra: list[str], setting: str, fold: str = "all",
                    inputs: Path | None = None) -> Row:
    cmd = [sys.executable, "-m", "autoseg", "-q", "predict", "-i", str(inputs or sc.tests), "-o", str(out),
           "--workdir", str(work), "-c", "3d_fullres", "-f", fold, "--device", "cpu", "--overwrite"]
    if "--fast" not in extra:
        cmd += ["--step", str(sc.step)] + ([] if sc.tta else ["--no-tta"])
    return _record(sc, setting, cmd + extra, out, _env())


def nnunet_predict(sc: Scenario, work: Path, venv: Path, out: Path, extra: list[str], setting: str) -> Row:
    env, did = nnunet_layout(sc.dataset, work, dataset_id=sc.nnunet_id)
    env.pop("OMP_NUM_THREADS", None)
    cmd = [str(venv.resolve() / "bin" / "nnUNetv2_predict"), "-i", str(sc.tests), "-o", str(out), "-d", str(did),
           "-c", "3d_fullres", "-f", "all", "-tr", TRAINER_NAME, "-step_size", str(sc.step), "-device", "cpu"]
    return _record(sc, setting, cmd + ([] if sc.tta else ["--disable_tta"]) + extra, out, env)


def imported_predict(sc: Scenario, nnunet_work: Path, pred: Path) -> None:
    """Import nnU-Net's model, predict with it in autoseg (fp32) and compare the files with nnU-Net's own."""
    from autoseg.io.image import read_label

    (model,) = (nnunet_work / "nnUNet_results").glob(f"Dataset{sc.nnunet_id:03d}_*/{TRAINER_NAME}__*__3d_fullres")
    work = nnunet_work.parent / "imported_work"
    _must(run_measured([sys.executable, "-m", "autoseg", "import-nnunet", str(model), "--workdir", str(work)]),
          "autoseg import-nnunet")
    if autoseg_predict(sc, work, pred / "autoseg_imported", ["--no-amp"], "autoseg, imported nnU-Net model (fp32)").error:
        return
    differ = total = 0
    for ref in sorted((pred / "nnunet_default").glob("*.nii.gz")):
        a, b = read_label(ref), read_label(pred / "autoseg_imported" / ref.name)
        if a.array.shape != b.array.shape or not np.allclose(a.geometry.spacing, b.geometry.spacing):
            raise SystemExit(f"{ref.name}: the two tools' files differ in grid")
        differ, total = differ + int((a.array != b.array).sum()), total + a.array.size
    print(f"  imported model vs nnU-Net: {differ} of {total} voxels differ ({100 * differ / max(total, 1):.4f} %), "
          "same grids")


def print_table(scenarios: list[Scenario]) -> None:
    head = ("scenario", "tool / setting", "cases", "wall s", "s/case", "peak RSS MB", "peak PSS MB",
            "nnU-Net s / this s", "PSS this / nnU-Net")
    lines = [head]
    for sc in scenarios:
        ref = next((r for r in sc.rows if r.setting.startswith("nnU-Net default") and not r.error), None)
        for r in sc.rows:
            if r.error:
                lines.append((sc.name, r.setting, str(r.n_cases), "FAILED", "", "", "", "", ""))
                continue
            speed = f"{ref.seconds / r.seconds:.2f}x" if ref else "-"
            mem = f"{r.pss_mb / ref.pss_mb:.2f}" if ref else "-"
            lines.append((sc.name, r.setting, str(r.n_cases), f"{r.seconds:.1f}", f"{r.seconds / r.n_cases:.1f}",
                          f"{r.rss_mb:.0f}", f"{r.pss_mb:.0f}", speed, mem))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print("\n" + "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines))
    print("peak RSS sums resident memory over the process tree, counting pages that worker processes share (torch)\n"
          "once per process; peak PSS splits shared pages between processes, the fairer figure for nnU-Net's workers.")


def fast_dice_cost(out: Path) -> None:
    """Dice of autoseg default vs --fast with the demo's fold-0 model on the demo's imagesTs."""
    from autoseg.evaluation.dice import dice_scores
    from autoseg.io.image import read_label

    demo = ROOT / "demo_data"
    work, ds = demo / "autoseg_work", demo / "Dataset001_SyntheticBraTS"
    if not (work / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file():
        print("\n--fast Dice cost: skipped, demo_data has no trained fold 0 (run `make demo` first)")
        return
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    regions = {k: v for k, v in labels.items() if k not in ("background", "ignore")}
    sc = Scenario("demo", ds, ds / "imagesTs", 0, tta=True)
    print(f"\n--fast Dice cost: demo fold-0 model on {len(_test_cases(sc.tests))} imagesTs cases")
    for setting, extra in (("default", []), ("--fast", ["--fast"])):
        pred = out / "demo_pred" / setting.strip("-")
        if autoseg_predict(sc, work, pred, extra, f"autoseg {setting}", fold="0").error:
            continue
        scores = []
        for ref in sorted((ds / "labelsTs").glob("*.nii.gz")):
            p, r = read_label(pred / ref.name).array, read_label(ref).array
            scores.append(dice_scores(p, r, list(regions.values())))
        mean = np.nanmean(np.asarray(scores, dtype=float), axis=0)
        per = ", ".join(f"{k} {v:.4f}" for k, v in zip(regions, mean))
        print(f"    autoseg {setting}: {per}; mean {np.nanmean(mean):.4f}; wall {sc.rows[-1].seconds:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny volumes, to check the script works")
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "predict_vs_nnunet")
    ap.add_argument("--nnunet-venv", type=Path, default=ROOT / ".nnunet-venv")
    ap.add_argument("--no-lean", action="store_true", help="skip nnU-Net's extra -npp 1 -nps 1 run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per predict setting (keeps the fastest)")
    ap.add_argument("--imported", action="store_true", help="also predict with nnU-Net's model imported into autoseg")
    args = ap.parse_args()
    out = (args.out / ("quick" if args.quick else "full")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"OMP_NUM_THREADS unset for the predict commands; outputs under {out}")

    from autoseg.data.synthetic import make_synthetic_dataset

    size, n_test = (32, 2) if args.quick else (64, 6)
    brain_ds = out / "brain" / "Dataset001_SyntheticBraTS"
    if not (brain_ds / "dataset.json").is_file():
        make_synthetic_dataset(brain_ds, n_cases=6 if args.quick else 12, shape=(size,) * 3, n_channels=4,
                               kind="brats", regions=True, n_test=n_test, seed=0)
    ct_ds = make_ct_dataset(out / "ct" / "Dataset002_SyntheticCT", (32, 64, 64) if args.quick else (128, 256, 256),
                            (48, 96, 96) if args.quick else (300, 512, 512))
    if args.quick:
        ct_topo = dict(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                       features_per_stage=[8, 16, 32, 64], n_blocks_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)
        ct_patch = (16, 32, 32)
    else:
        ct_topo = dict(strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, kernel_sizes=[[3, 3, 3]] * 5,
                       features_per_stage=[16, 32, 64, 128, 256], n_blocks_per_stage=[2] * 5,
                       n_conv_per_stage_decoder=[2] * 4)
        ct_patch = (64, 128, 128)
    ct_override = dict(spacing=(2.0, 1.4, 1.4), patch_size=ct_patch, batch_size=2, topology=ct_topo)
    repeat = max(1, args.repeat)
    scenarios = [Scenario("brain", brain_ds, brain_ds / "imagesTs", 981, tta=True, repeat=repeat),
                 Scenario("ct", ct_ds, ct_ds / "imagesTs", 982, tta=False, repeat=repeat)]
    for sc, override in zip(scenarios, (None, ct_override)):
        base = out / sc.name
        work = base / "autoseg_work"
        plans, cfg = autoseg_model(sc, work, override)
        t = cfg.topology
        print(f"\n[{sc.name}] {len(_test_cases(sc.tests))} test case(s); spacing {cfg.spacing}, "
              f"patch {cfg.patch_size}, {t.n_stages} stages {t.features_per_stage}, strides "
              f"{[list(s) for s in t.strides]}, kernels {[list(k) for k in t.kernel_sizes]}, "
              f"convs {t.n_blocks_per_stage}/{t.n_conv_per_stage_decoder}, "
              f"{cfg.normalization[0].scheme} normalisation; step {sc.step}, mirroring TTA "
              f"{'ON' if sc.tta else 'OFF'} for both tools")
        nn_plans = None
        if not args.skip_nnunet:
            nn_plans = nnunet_model(sc, base / "nnunet", args.nnunet_venv, plans, cfg)
        grid_shapes(sc, plans, cfg, nn_plans, args.nnunet_venv)
        pred = base / "pred"
        if not args.skip_nnunet:
            nnunet_predict(sc, base / "nnunet", args.nnunet_venv, pred / "nnunet_default", [],
                           "nnU-Net default (-npp 3 -nps 3)")
            if not args.no_lean:
                nnunet_predict(sc, base / "nnunet", args.nnunet_venv, pred / "nnunet_lean",
                               ["-npp", "1", "-nps", "1"], "nnU-Net lean (-npp 1 -nps 1)")
            if args.imported:
                imported_predict(sc, base / "nnunet", pred)
        autoseg_predict(sc, work, pred / "autoseg_default", [], "autoseg default (bf16 autocast if supported)")
        autoseg_predict(sc, work, pred / "autoseg_fp32", ["--no-amp"], "autoseg --no-amp (fp32)")
        autoseg_predict(sc, work, pred / "autoseg_fast", ["--fast"], "autoseg --fast (not like for like)")
    print_table(scenarios)
    fast_dice_cost(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
