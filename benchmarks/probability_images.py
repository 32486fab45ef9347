"""Peak memory of `predict --save-probabilities nifti`: writing one float32 image per class or region.

The images are written one output at a time, so besides the float16 probabilities the export already holds
(2 bytes x K outputs x N voxels) the writing adds a constant number of bytes per voxel, whatever K: one float32
volume and ITK's copy of it (8 bytes x N) plus the NIfTI writer's buffers (measured: 8.2 bytes x N on 300x512x512 with K = 2 and 4, 12.6 on
60x256x256 with K = 2, 4, 8). Each K runs in a fresh process; the peak resident memory the writing adds over the probabilities
is printed next to that formula.

    python benchmarks/probability_images.py [--shape 300 512 512] [--outputs 2 4 8]

Default shape 100x256x256 (a 512x512x300 volume takes minutes per class to compress on a small machine; the
figures scale with N). Prints one figure per line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(shape: tuple[int, ...], n_outputs: int) -> dict[str, float]:
    import numpy as np

    from autoseg.inference.export import write_probability_images
    from autoseg.io.image import Geometry

    rng = np.random.default_rng(0)
    probs = np.empty((n_outputs, *shape), np.float16)
    for k in range(n_outputs):
        for z in range(shape[0]):  # slice by slice: no full-size temporary raises the baseline
            probs[k, z] = rng.random(shape[1:], dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_probability_images(tmp, Path(tmp) / "case.nii.gz", probs, [f"k{i}" for i in range(n_outputs)],
                                 Geometry.identity(3))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"added_peak_mib": (after - before) / 2**20, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(100, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--outputs", type=int, nargs="+", default=(2, 4, 8))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(args.shape)
    if args.child is not None:
        print(json.dumps(_one(shape, args.child)))
        return
    n = shape[0] * shape[1] * shape[2]
    print(f"volume {'x'.join(map(str, shape))} = {n} voxels; bound: added peak = c x N bytes with c constant in K "
          f"(8 bytes x N = {8 * n / 2**20:.0f} MiB for one float32 volume + ITK's copy, plus the writer's buffers)")
    for k in args.outputs:
        out = subprocess.run([sys.executable, __file__, "--shape", *map(str, shape), "--child", str(k)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"K={k}: added peak RSS {r['added_peak_mib']:.0f} MiB ({r['added_peak_mib'] * 2**20 / n:.1f} bytes/voxel), "
              f"probabilities held {2 * k * n / 2**20:.0f} MiB, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
