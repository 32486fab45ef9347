"""A third-party package of recipe parts, as a user writes it from the README (examples/plugin_package: the
``tiny_unet`` network and the ``soft_dice_l1`` loss), pip-installed into a scratch folder and used through the CLI:
plan, train, export, verify and predict with it; without it, a bundle that needs it is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import autoseg
from autoseg.errors import TrainingConfigError
from autoseg.io.model_folder import FINAL
from autoseg.networks.checkpoint import CheckpointMeta, load_checkpoint
from autoseg.networks.topology import UNetTopology
from autoseg.planner.plans import Plans

PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "plugin_package"
#: the autoseg under test (the subprocesses import this one, not another installed copy)
SOURCE = Path(autoseg.__file__).resolve().parents[1]
RECIPE = ["network=tiny_unet", "loss=soft_dice_l1:l1_weight=0.25"]


def _install(site: Path, scratch: Path) -> str:
    """Install the example package into ``site`` the ordinary way (pip, from a copy: setuptools builds in the source
    folder); where pip or setuptools is missing, write the package and its dist-info by hand. Returns which."""
    copy = shutil.copytree(PACKAGE, scratch / "plugin_package", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    if importlib.util.find_spec("pip") and importlib.util.find_spec("setuptools"):
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site),
                              str(copy)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        return "pip"
    import tomllib  # only reached without pip/setuptools (Python >= 3.11 there)

    meta = tomllib.loads((copy / "pyproject.toml").read_text())["project"]
    shutil.copytree(copy / "tinyparts", site / "tinyparts")
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = meta["entry-points"]["autoseg.plugins"]
    (info / "entry_points.txt").write_text("[autoseg.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return "dist-info written by hand"


def _autoseg(args: list[str], cwd: Path, site: Path | None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    paths = [str(SOURCE), *([str(site)] if site else []), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "autoseg", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(args: list[str], cwd: Path, site: Path, timeout: int = 600) -> str:
    run = _autoseg(args, cwd, site, timeout)
    assert run.returncode == 0, (args, run.stdout[-2000:], run.stderr[-3000:])
    return run.stdout


@pytest.mark.slow
def test_an_installed_part_package_plans_trains_exports_and_predicts_and_is_named_when_missing(tmp_path):
    if any(ep.name in ("tiny_unet", "soft_dice_l1") for ep in entry_points(group="autoseg.plugins")):
        pytest.skip("the example package is installed in this environment; the test installs its own copy")
    from autoseg.data.synthetic import make_synthetic_dataset

    site = tmp_path / "site"
    print("installed with:", _install(site, tmp_path))
    dataset = make_synthetic_dataset(tmp_path / "Dataset001_Tiny", n_cases=6, shape=(20, 20, 20), n_channels=1,
                                     kind="brats", n_test=1, seed=0)
    wd, bundle = tmp_path / "work", tmp_path / "bundle"

    listing = _ok(["plugins"], tmp_path, site, timeout=120)
    assert "tiny_unet (network, entry point tinyparts.parts:TINY_UNET of package autoseg-tinyparts)" in listing
    assert "soft_dice_l1 (loss, entry point tinyparts.parts:SOFT_DICE_L1 of package autoseg-tinyparts)" in listing and "l1_weight=0.5" in listing

    _ok(["plan", str(dataset), "--workdir", str(wd), "--preset", "cpu", "-j", "1", "--recipe", *RECIPE], tmp_path, site)
    recipe = Plans.load(wd / "plans.json").recipe("3d_fullres")
    assert (recipe.network.name, recipe.loss.name, recipe.loss.params) == ("tiny_unet", "soft_dice_l1",
                                                                           {"l1_weight": 0.25})
    _ok(["train", str(dataset), "3d_fullres", "0", "--workdir", str(wd), "--epochs", "1", "--iters-per-epoch", "2",
         "--val-iters", "1", "--device", "cpu", "--workers", "0"], tmp_path, site)
    meta = CheckpointMeta.from_json(load_checkpoint(wd / "models" / "3d_fullres" / "fold_0" / FINAL))
    assert meta.recipe["network"]["origin"] == "entry point tinyparts.parts:TINY_UNET of package autoseg-tinyparts"

    _ok(["export", "--workdir", str(wd), "-o", str(bundle), "-c", "3d_fullres", "-f", "0", "--dataset", str(dataset)],
        tmp_path, site)
    recorded = json.loads((bundle / "manifest.json").read_text())["recipes"]["3d_fullres"]
    assert recorded["network"] == {"name": "tiny_unet", "params": {},
                                   "origin": "entry point tinyparts.parts:TINY_UNET of package autoseg-tinyparts"}
    assert recorded["loss"] == {"name": "soft_dice_l1", "params": {"l1_weight": 0.25},
                                "origin": "entry point tinyparts.parts:SOFT_DICE_L1 of package autoseg-tinyparts"}
    _ok(["verify-bundle", str(bundle)], tmp_path, site)
    predict = ["predict", "-i", str(dataset / "imagesTs"), "--bundle", str(bundle), "--device", "cpu"]
    _ok([*predict, "-o", str(tmp_path / "pred")], tmp_path, site)
    assert (tmp_path / "pred" / "test_000.nii.gz").is_file()

    # the same bundle where the package is not installed: one line naming the part and where it came from
    run = _autoseg([*predict, "-o", str(tmp_path / "pred_missing")], tmp_path, None, timeout=120)
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, (run.returncode, lines)
    assert "tiny_unet" in lines[0] and "tinyparts.parts:TINY_UNET" in lines[0] and "autoseg-tinyparts" in lines[0]
    assert "Traceback" not in lines[0]
    assert not list((tmp_path / "pred_missing").glob("*.nii.gz"))


# the parts themselves, imported from the example's source folder (fast)

def _topology(n_stages: int) -> UNetTopology:
    return UNetTopology(strides=((1, 1, 1),) + ((2, 2, 2),) * (n_stages - 1), kernel_sizes=((3, 3, 3),) * n_stages,
                        features_per_stage=tuple(4 * 2 ** i for i in range(n_stages)),
                        n_blocks_per_stage=(1,) * n_stages, n_conv_per_stage_decoder=(1,) * (n_stages - 1))


@pytest.fixture
def tinyparts(monkeypatch):
    monkeypatch.syspath_prepend(str(PACKAGE))
    from tinyparts import parts

    return parts


@pytest.mark.parametrize("n_stages, sizes", [(2, [16]), (3, [16, 8]), (4, [16, 8, 4])])
def test_the_tiny_unet_returns_one_output_per_supervised_scale(tinyparts, n_stages, sizes):
    net = tinyparts.TINY_UNET.create().build(_topology(n_stages), in_channels=1, num_classes=3)
    outputs = net(torch.zeros(2, 1, 16, 16, 16))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, s, s, s) for s in sizes]
    net.deep_supervision = False
    assert tuple(net(torch.zeros(1, 1, 16, 16, 16)).shape) == (1, 3, 16, 16, 16)


def test_the_loss_ignores_the_ignore_label_and_refuses_regions(tinyparts):
    factory = tinyparts.SOFT_DICE_L1.create({"l1_weight": "0.25"})
    loss = factory(regions=False, batch_dice=True, ignore_label=3)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 8, 8, 8)).float()
    loss(logits, target).backward()
    ignored = (target == 3).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0 and logits.grad[~ignored].abs().max() > 0
    with pytest.raises(TrainingConfigError, match="soft_dice_l1"):
        factory(regions=True, batch_dice=True, ignore_label=None)
