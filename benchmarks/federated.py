"""Federated training on three shifted synthetic sites: centralised vs federated (FedAvg on Flower) vs each site alone.

Three BraTS-like synthetic sites (2 channels, 3 nested regions) differ in case count (10 / 6 / 4 training cases),
voxel spacing (1.0, 1.25, 0.8 mm), intensity scale (x1, x2.5, x0.6) and a per-site multiplicative bias field (a
smooth exponential ramp along a different axis at each site). Each site also has 3 test cases with its own shift;
the pooled test set is the 9 of them. One plan serves every arm: the federated plan (``cpu`` preset, merged from the
sites' statistics), shrunk to a 32^3 patch and a 3-stage 8-16-32 network so that the whole benchmark runs in minutes
on a loaded 2-core CPU. All arms train for the same total number of iterations:

* centralised: the pooled training cases, ``epochs x iters`` (fold ``all``);
* federated: ``rounds`` rounds of 1 local epoch of ``iters`` iterations at each of the 3 sites, as a deployment
  with the plan's iterations per epoch runs it: each site makes the centralised run's sequential steps (FedAvg
  weighted by training cases, the coordinator's defaults; a real Flower server and sites on 127.0.0.1). With
  ``--equal-compute`` each site makes ``iters / 3`` per round instead, so the three sites together do the
  centralised run's iterations (a third of its sequential steps);
* each site alone: its own cases, ``epochs x iters``.

Prints the test Dice (mean of the three regions, per test case, averaged) per site's test set and pooled, for each
arm; the federated traffic per round (MB, weights down + up, from the server's ``federation.json``) and each arm's
wall time. One seed and short training: differences of a few Dice points are noise. Outputs under
benchmarks/out/federated/.

    python benchmarks/federated.py [--rounds 5] [--iters 30] [--no-single] [--equal-compute] [--iid] [--federated-only]
        [--server-lr X] [--server-momentum B] [--local-momentum M] [--initial-lr LR] [--fedprox MU] [--share-momentum]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from autoseg.api import predict, train
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.federated.planning import plan_federation
from autoseg.federated.server import FederationSettings
from autoseg.federated.simulate import simulate
from autoseg.fingerprint.merge import site_statistics
from autoseg.io.atomic import write_json_atomic
from autoseg.io.dataset import load_dataset
from autoseg.networks.topology import UNetTopology
from autoseg.training.settings import TrainSettings

OUT = Path(__file__).resolve().parent / "out" / "federated"
SITES = ((10, 1.0, 1.0, 0), (6, 1.25, 2.5, 1), (4, 0.8, 0.6, 2))  # cases, spacing, intensity scale, bias axis
N_TEST = 3
REGIONS = ((1, 2, 3), (2, 3), (3,))


def _shift(path: Path, scale: float, axis: int) -> None:
    """Multiply an image by the site's scale and bias field (exp ramp of +-30 % along ``axis``), geometry kept."""
    img = sitk.ReadImage(str(path))
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    ramp = np.exp(np.linspace(-0.3, 0.3, a.shape[axis]))
    bias = ramp.reshape([-1 if i == axis else 1 for i in range(a.ndim)])
    out = sitk.GetImageFromArray(a * scale * bias)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


def make_sites(root: Path) -> list[Path]:
    sites = []
    for k, (n, spacing, scale, axis) in enumerate(SITES):
        ds = make_synthetic_dataset(root / f"site{k}" / "Dataset050_Site", n_cases=n, shape=(40, 40, 40),
                                    spacing=(spacing,) * 3, n_channels=2, regions=True, seed=100 + k, n_test=N_TEST)
        for img in sorted((ds / "imagesTr").iterdir()) + sorted((ds / "imagesTs").iterdir()):
            _shift(img, scale, axis)
        sites.append(ds)
    return sites


def pooled_dataset(sites: list[Path], root: Path) -> Path:
    """The union of the sites' training cases (centralised arm), ids prefixed by the site."""
    pooled = root / "Dataset051_Pooled"
    for sub in ("imagesTr", "labelsTr"):
        (pooled / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for k, ds in enumerate(sites):
        for sub in ("imagesTr", "labelsTr"):
            for f in (ds / sub).iterdir():
                shutil.copy(f, pooled / sub / f"s{k}{f.name}")
        n += len(list((ds / "labelsTr").iterdir()))
    spec = json.loads((sites[0] / "dataset.json").read_text())
    write_json_atomic(pooled / "dataset.json", {**spec, "numTraining": n})
    return pooled


def iid_sites(pooled: Path, root: Path) -> list[Path]:
    """The pooled training cases dealt at random into three sites (7/7/6 cases, every shift mixed): a sanity check
    without heterogeneity."""
    ids = sorted(f.name[:-len(".nii.gz")] for f in (pooled / "labelsTr").iterdir())
    np.random.default_rng(0).shuffle(ids)
    spec = json.loads((pooled / "dataset.json").read_text())
    out = []
    for k in range(3):
        ds = root / f"iid{k}" / "Dataset052_Iid"
        for sub in ("imagesTr", "labelsTr"):
            (ds / sub).mkdir(parents=True)
        for cid in ids[k::3]:
            shutil.copy(pooled / "labelsTr" / f"{cid}.nii.gz", ds / "labelsTr")
            for img in (pooled / "imagesTr").glob(f"{cid}_*"):
                shutil.copy(img, ds / "imagesTr")
        write_json_atomic(ds / "dataset.json", {**spec, "numTraining": len(ids[k::3])})
        out.append(ds)
    return out


def small_plans(sites: list[Path]):
    _, plans = plan_federation([site_statistics(load_dataset(s), progress=False) for s in sites],
                               dataset_name="Dataset051_Pooled", preset="cpu")
    cfg = plans.configurations["3d_fullres"]
    topo = UNetTopology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 3,
                        features_per_stage=(8, 16, 32), n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1),
                        block=cfg.topology.block)
    small = dataclasses.replace(cfg, patch_size=(32, 32, 32), topology=topo, batch_size=2)
    return dataclasses.replace(plans, configurations={"3d_fullres": small})


def dice_of(pred_dir: Path, site: Path) -> list[float]:
    """Mean region Dice per test case of one site."""
    out = []
    for lab in sorted((site / "labelsTs").iterdir()):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / lab.name)))
        scores = []
        for region in REGIONS:
            r, g = np.isin(ref, region), np.isin(got, region)
            denom = r.sum() + g.sum()
            scores.append(1.0 if denom == 0 else 2.0 * (r & g).sum() / denom)
        out.append(float(np.mean(scores)))
    return out


def test_dice(workdir: Path, sites: list[Path], name: str) -> dict[str, float]:
    per_site, pooled = {}, []
    for k, site in enumerate(sites):
        target = OUT / "pred" / name / f"site{k}"
        predict(site / "imagesTs", target, workdir=workdir, configuration="3d_fullres", folds=("all",), tta=False,
                device="cpu", progress=False, overwrite=True)
        scores = dice_of(target, site)
        per_site[f"site{k}"] = float(np.mean(scores))
        pooled += scores
    per_site["pooled"] = float(np.mean(pooled))
    return per_site


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="federated rounds = centralised epochs")
    ap.add_argument("--iters", type=int, default=30, help="iterations per centralised epoch (a site: iters / 3)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-site arms (centralised vs federated)")
    ap.add_argument("--equal-compute", action="store_true",
                    help="each site trains --iters / 3 per round (the sites together: the centralised iterations)")
    ap.add_argument("--share-momentum", action="store_true", help="average the sites' momentum with the weights")
    ap.add_argument("--server-lr", type=float, default=1.0,
                    help="server learning rate (default 1: plain FedAvg)")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM's server momentum")
    ap.add_argument("--local-momentum", type=float, default=None,
                    help="SGD momentum of every arm (default: the coordinator's)")
    ap.add_argument("--initial-lr", type=float, default=None,
                    help="first learning rate of every arm (poly decay; default: the coordinator's)")
    ap.add_argument("--fedprox", type=float, default=0.0, metavar="MU", help="FedProx with this mu (0: FedAvg)")
    ap.add_argument("--iid", action="store_true", help="sites: the pooled training cases dealt at random into three")
    ap.add_argument("--federated-only", action="store_true", help="only the federated arm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    sites = make_sites(OUT / "data")
    plans = small_plans(sites)
    # every arm trains with the same optimiser: the coordinator's (or the given) momentum and first learning rate
    defaults = FederationSettings()
    args.local_momentum = defaults.local_momentum if args.local_momentum is None else args.local_momentum
    args.initial_lr = defaults.initial_lr if args.initial_lr is None else args.initial_lr
    settings = TrainSettings(progress=False, device="cpu", workers=0, val_iters=2, validate=False,
                             initial_lr=args.initial_lr, momentum=args.local_momentum)
    arms: dict[str, tuple[dict[str, float], float]] = {}
    pooled = pooled_dataset(sites, OUT / "data")
    training = iid_sites(pooled, OUT / "data") if args.iid else sites  # the test sets stay the shifted sites'
    candidates = [] if args.federated_only else [("centralised", pooled)]
    if not (args.no_single or args.federated_only):
        candidates += [(f"site{k} alone", s) for k, s in enumerate(training)]
    for name, ds in candidates:
        wd = OUT / "work" / name.replace(" ", "_")
        wd.mkdir(parents=True)
        plans.save(wd / "plans.json")
        t = time.time()
        train(ds, "3d_fullres", "all", workdir=wd, settings=dataclasses.replace(
            settings, epochs=args.rounds, iters_per_epoch=args.iters))
        arms[name] = (test_dice(wd, sites, name), time.time() - t)
        print(f"{name}: {arms[name]}", flush=True)
    wd = OUT / "work" / "federated"
    wd.mkdir(parents=True)
    plans.save(wd / "plans.json")
    t = time.time()
    site_iters = max(1, args.iters // 3) if args.equal_compute else args.iters
    simulate(training, wd, FederationSettings(rounds=args.rounds, min_sites=3, iters_per_epoch=site_iters,
                                           eval_every=args.rounds, share_momentum=args.share_momentum,
                                           server_lr=args.server_lr, server_momentum=args.server_momentum,
                                           local_momentum=args.local_momentum, initial_lr=args.initial_lr,
                                           strategy="fedprox" if args.fedprox else "fedavg",
                                           proximal_mu=args.fedprox or 0.01),
             train=settings, fold="all", log=lambda s: None)
    arms["federated"] = (test_dice(wd, sites, "federated"), time.time() - t)
    history = json.loads((wd / "federation.json").read_text())["history"]
    traffic = [h["mb_up"] + h.get("mb_down", 0.0) for h in history if h["kind"] == "fit"]
    momentum_up = [h.get("mb_momentum_up", 0.0) for h in history if h["kind"] == "fit"]
    print(f"\nsettings: {vars(args)}")
    print(f"centralised and single-site iterations: {args.rounds * args.iters}; federated: {args.rounds} rounds x 3 "
          f"sites x {site_iters}")
    print("arm            " + "  ".join(f"{k:>7}" for k in ("site0", "site1", "site2", "pooled")) + "   wall s")
    for name, (dice, wall) in arms.items():
        print(f"{name:<14} " + "  ".join(f"{dice[k]:7.4f}" for k in ("site0", "site1", "site2", "pooled"))
              + f"   {wall:6.0f}")
    print(f"federated traffic per round: {np.mean(traffic):.3f} MB (weights and momentum down + up, 3 sites; "
          f"momentum up {np.mean(momentum_up):.3f} MB, shared momentum {args.share_momentum})")
    if args.federated_only:
        return
    fed, cen = arms["federated"][0]["pooled"], arms["centralised"][0]["pooled"]
    print(f"federated - centralised: {fed - cen:+.4f} (target > -0.01)")
    if not args.no_single:
        best_single = max(arms[f"site{k} alone"][0]["pooled"] for k in range(3))
        print(f"federated - best single site: {fed - best_single:+.4f} (target >= +0.03)")


if __name__ == "__main__":
    sys.exit(main())
