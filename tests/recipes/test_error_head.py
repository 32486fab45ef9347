"""The learned error head (``network=...:error_head=true``): it leaves the segmentation's training untouched, its
map comes out in the input's geometry, the recipe goes from checkpoint to prediction, and other networks are refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from autoseg.api import predict, train
from autoseg.errors import PluginError
from autoseg.inference.predictor import Predictor
from autoseg.io.image import read_image
from autoseg.io.model_folder import FINAL
from autoseg.networks.checkpoint import CheckpointMeta, load_checkpoint
from autoseg.networks.error_head import ErrorOutput
from autoseg.networks.parts import get_network_part
from autoseg.networks.topology import UNetTopology
from autoseg.planner.recipe import default_recipe, parse_recipe
from autoseg.training.error_head import ErrorHeadLoss
from autoseg.training.loop import TrainingLoop
from autoseg.training.losses import build_loss
from autoseg.training.parts import resolve_recipe

TOPO = UNetTopology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 3, features_per_stage=(4, 8, 8),
                    n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1))


def _step(name, error_head, tmp_path, x, target):
    torch.manual_seed(0)
    net = get_network_part(name, {"error_head": error_head}).build(TOPO, in_channels=1, num_classes=3)
    loss = build_loss(regions=False, batch_dice=True, ignore_label=None, n_outputs=2)
    if error_head:
        loss = ErrorHeadLoss(loss, num_outputs=3, regions=False, ignore_label=None)
    loop = TrainingLoop(net, loss, folder=tmp_path, device=torch.device("cpu"), regions=False, ignore_label=None,
                        amp=False, initial_lr=0.1, weight_decay=3e-5, momentum=0.99, grad_clip=0.05)
    net.train()
    loop.train_step({"data": x, "target": target})
    return net


@pytest.mark.parametrize("name", ["unet", "resenc_unet", "attention_unet"])
def test_the_error_head_leaves_the_segmentation_step_unchanged(name, tmp_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, 8, generator=gen)
    full = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
    target = [full, full[:, :, ::2, ::2, ::2]]
    plain, with_head = _step(name, False, tmp_path, x, target), _step(name, True, tmp_path, x, target)
    seg = plain.state_dict()
    both = with_head.state_dict()
    assert set(both) - set(seg) and all(k.startswith("error_head.") for k in set(both) - set(seg))
    for key, value in seg.items():  # a tiny clip threshold: clipping acts, and still the same seg step
        assert torch.equal(value, both[key]), key
    assert not torch.equal(plain.state_dict()["heads.0.weight"], _fresh(name)["heads.0.weight"])
    # evaluation mode: the segmentation alone; ErrorOutput adds the error logit as one more channel
    with_head.eval()
    with_head.deep_supervision = False
    with torch.no_grad():
        assert with_head(x).shape[1] == 3 and ErrorOutput(with_head)(x).shape[1] == 4


def _fresh(name):
    torch.manual_seed(0)
    return get_network_part(name).build(TOPO, in_channels=1, num_classes=3).state_dict()


@pytest.mark.parametrize("recipe", ["network=swin_unetr:error_head=true"])
def test_networks_without_last_features_are_refused_in_one_line(recipe):
    with pytest.raises(PluginError) as err:
        resolve_recipe(default_recipe().with_overrides(parse_recipe(recipe)))
    assert "error head" in str(err.value) and "unet" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PluginError, match="error head"):
        get_network_part("swin_unetr", {"error_head": True})


def test_the_error_map_round_trips_from_checkpoint_to_predict(planned_factory, tmp_path):
    ds, wd, plans = planned_factory(tmp_path, n_test=1, shape=(16, 16, 16))  # one window per pass
    (res,) = train(ds, "3d_fullres", 0, workdir=wd, recipe=("network=unet:error_head=true",), epochs=1,
                   iters_per_epoch=2, val_iters=1, device="cpu", workers=0, progress=False)
    ckpt = load_checkpoint(res.folder / FINAL)
    assert CheckpointMeta.from_json(ckpt).recipe["network"] == {"name": "unet", "params": {"error_head": True},
                                                                "origin": "built-in"}
    assert any(k.startswith("error_head.") for k in ckpt["network"])
    quality = (res.folder / "val" / "quality.json").read_text()
    assert '"error_head"' in quality  # cross-validation scores it too, so find-best can choose it
    predictor = Predictor.from_workdir(wd, "3d_fullres", folds=[0], device="cpu", amp=False)
    assert len(predictor.error_networks) == 1 and predictor.error_networks[0] is not None
    out = tmp_path / "pred"
    summary = predict(ds.root / "imagesTs", out, workdir=wd, configuration="3d_fullres", folds=[0], device="cpu",
                      progress=False, uncertainty=True)
    (cid,) = summary.written
    image = read_image(next((ds.root / "imagesTs").glob(f"{cid}_0000*")))
    error = read_image(out / "uncertainty" / f"{cid}_error{ds.spec.file_ending}")
    assert error.array.shape == image.array.shape and error.geometry.differences(image.geometry) == []
    assert 0 <= error.array.min() and error.array.max() <= 1 and error.array.max() > 0
    (row,) = csv.DictReader(open(out / "quality.csv", newline=""))
    assert 0 <= float(row["error_head"]) <= 1
    assert float(row["error_head_tta"]) == pytest.approx(float(row["error_head"]) * float(row["tta_agreement"]),
                                                         abs=1e-3)
    assert np.isfinite(error.array).all()
