"""Occlusion memory: the peak grows with the volume by the grid-sized buffers only, not with the number of occluders.

Each run is a fresh process: a small 3D attention-free U-Net (4-8-16 features, 32^3 patch), one channel, a
volume of the given size with a small mask in the middle (so a few windows are explained), then
``saliency_maps(method="occlusion")``. Printed per run: the volume, the occluder positions per window, the peak
resident memory added by the call (``ru_maxrss`` after minus before) and the formula's grid part
``4 bytes x (2 K + 1) x voxels`` (the mask-weight copy and the map per class, the window sums) to which one
batch of windows and their activations is added whatever the volume. A 512x512x300 volume with 3 classes
needs ``4 x 7 x 78.6e6`` = 2.2 GB for these buffers, beside the 4 bytes x C x voxels of the data itself.

    python benchmarks/occlusion_memory.py       # about 2 minutes on 2 idle cores

Measured (2 heavily loaded cores): 64^3: 18.8 MB added with 8 occluder positions per window, 32.0 MB with 64;
128^3: 158.7 MB and 166.4 MB. Eight times the occluders add 8-13 MB at either size (one batch of larger
activations, not a copy per occluder). Eight times the voxels add ~140 MB, more than the 21 MB of grid buffers
the formula counts; the rest was not traced (a probe of the grid buffers alone measured 31 MB at 128^3).
"""

from __future__ import annotations

import json
import subprocess
import sys


def _run(shape: tuple[int, int, int], block: int) -> dict:
    import resource

    import numpy as np
    import torch

    from autoseg.inference.saliency import saliency_maps
    from autoseg.networks.topology import UNetTopology
    from autoseg.networks.unet import UNet

    torch.manual_seed(0)
    topo = UNetTopology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 3,
                        features_per_stage=(4, 8, 16), n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1))
    net = UNet(topo, in_channels=1, num_classes=2, deep_supervision=False).eval()
    data = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    mask = np.zeros((1, *shape), bool)
    c = [s // 2 for s in shape]
    mask[0, c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = True
    saliency_maps([net], data[:, :32, :32, :32], mask[:, :32, :32, :32], [1], method="occlusion",
                  patch_size=(32,) * 3, block=(16,) * 3)  # warm-up: allocator pools and lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saliency_maps([net], data, mask, [1], method="occlusion", patch_size=(32,) * 3, block=(block,) * 3, batch=8)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    voxels = int(np.prod(shape))
    return {"shape": shape, "positions": (32 // block) ** 3, "added_mb": (after - before) / 2**20,
            "grid_formula_mb": 4 * (2 * 1 + 1) * voxels / 2**20}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_run(tuple(json.loads(sys.argv[2])), int(sys.argv[3]))))
        return
    for shape, block in (((64, 64, 64), 16), ((64, 64, 64), 8), ((128, 128, 128), 16), ((128, 128, 128), 8)):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(shape), str(block)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"volume {'x'.join(map(str, r['shape']))}: {r['positions']} occluder positions per window, "
              f"peak added {r['added_mb']:.1f} MB, grid buffers by formula {r['grid_formula_mb']:.1f} MB")


if __name__ == "__main__":
    main()
