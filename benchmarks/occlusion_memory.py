"""Occlusion memory is bounded: the grid-sized maps plus one batch of windows, up to a 512x512x300 volume.

Formula (documented in :func:`autoseg.inference.saliency.saliency_maps`): the peak resident memory added by
``saliency_maps`` is

    4 bytes x K x V   (the float32 maps, K explained outputs, V voxels)
  + one window batch (``batch`` occluded copies of the window and their activations)

beside the caller's data (4 C V bytes, used in place when float32) and boolean masks (K V bytes). No
grid-sized weight or mask copy is made and nothing scales with the number of occluder positions.

Each measurement is a fresh process: a small 3D U-Net (4-8-16 features, 32^3 patch), one channel, random data
and a 4^3 mask in the middle (so only the few windows touching it are explained), occluder 8^3 (64 positions
per window, 8 per network call). The window batch is measured on its own, in another fresh process, as the
peak added by occluding one window; the prediction is that plus the maps. Printed per volume: the peak added
by the call (``VmHWM`` reset before it), the prediction, their ratio, the peak RSS of the whole process and
the seconds taken.

    python benchmarks/occlusion_memory.py     # about 1-2 minutes on 2 cores; needs ~1 GB free

Measured (2 shared cores, loaded): one window batch 129 MB; peak added 146 / 147 / 447 MB at 64^3 / 128^3 /
512x512x300 (78.6 M voxels) against 130 / 137 / 429 MB by the formula (ratios 1.12 / 1.07 / 1.04; the ~16 MB
left over is the same at every size: the unoccluded pass and captum's per-window buffers); 13 s for the large
volume, process peak RSS 977 MB. The code before the fix (a float32 copy of the masks as the target's weight
and a grid of summed window weights: 2 more grid-sized buffers) added 145 / 172 / 1052 MB (ratio 2.45 at
512x512x300). The growth between 64^3 and 128^3 that an earlier version of this benchmark reported (140 MB for
21 MB of buffers) was its own artefact: its warm-up ran on a corner without mask voxels at 128^3, so no window
was occluded there and the first window batch (~130 MB of activations and allocator pools) was counted as
growth with the volume. This version measures each run in a fresh process, with no warm-up, against a window
batch measured the same way. The window batch itself, measured the same way at other ``batch`` sizes: 82 / 82 /
102 / 129 / 188 MB at 1 / 2 / 4 / 8 / 16 windows per call: a ~75 MB floor of first-call allocations (torch's
convolution workspaces and pools) plus ~7 MB per occluded 32^3 window of this network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

PATCH = 32
BLOCK = 8
BATCH = 8
SHAPES = ((64, 64, 64), (128, 128, 128), (512, 512, 300))


def _status(key: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS
        fh.write("5")


def _network():
    import torch

    from autoseg.networks.topology import UNetTopology
    from autoseg.networks.unet import UNet

    torch.manual_seed(0)
    topo = UNetTopology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 3,
                        features_per_stage=(4, 8, 16), n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1))
    return UNet(topo, in_channels=1, num_classes=2, deep_supervision=False).eval()


def _volume(shape: tuple[int, ...]) -> dict:
    """Peak added by ``saliency_maps(method="occlusion")`` on a volume of ``shape``."""
    import numpy as np

    from autoseg.inference.saliency import saliency_maps

    net = _network()
    data = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    mask = np.zeros((1, *shape), bool)
    c = [s // 2 for s in shape]
    mask[0, c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = True
    before = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    saliency_maps([net], data, mask, [1], method="occlusion", patch_size=(PATCH,) * 3, block=(BLOCK,) * 3,
                  batch=BATCH)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "added_mb": peak - before, "peak_rss_mb": peak,
            "seconds": seconds}


def _window() -> dict:
    """Peak added by occluding one window (the window batch of the formula)."""
    import torch

    from autoseg.inference.saliency import occlusion

    net = _network()
    x, w = torch.rand(1, 1, PATCH, PATCH, PATCH), torch.rand(PATCH, PATCH, PATCH)
    before = _status("VmRSS")
    _reset_peak()
    occlusion(net, x, w, 1, block=(BLOCK,) * 3, batch=BATCH)
    return {"window_mb": _status("VmHWM") - before}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_window() if sys.argv[2] == "window" else _volume(tuple(json.loads(sys.argv[2])))))
        return
    window = _child("window")["window_mb"]
    print(f"one window batch ({BATCH} occluded {PATCH}^3 windows and their activations): {window:.1f} MB")
    for shape in SHAPES:
        r = _child(json.dumps(shape))
        maps = 4 * 1 * r["voxels"] / 2**20
        predicted = maps + window
        print(f"volume {'x'.join(map(str, r['shape']))} ({r['voxels'] / 1e6:.1f} M voxels): peak added "
              f"{r['added_mb']:.1f} MB, formula {predicted:.1f} MB (maps {maps:.1f} + window batch {window:.1f}), "
              f"ratio {r['added_mb'] / predicted:.2f}; process peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
