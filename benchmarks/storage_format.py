"""Which on-disk format reads training patches fastest here: memory-mapped .npy (autoseg's choice),
compressed .npz, or Blosc2 NDArrays read by chunk (nnU-Net v2's default, if the `blosc2` package is installed).

    python benchmarks/storage_format.py [--size 160] [--patch 96] [--reads 60]

Writes one BraTS-like case (4 float32 channels of size^3, zero background, smooth foreground) per format,
then times random patch reads of patch^3 from a cold Python object (page cache warm, as during training),
and prints per format: milliseconds per patch, bytes on disk and write time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def _case(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    grid = np.indices((size,) * 3).astype(np.float32) - size / 2
    brain = (grid ** 2).sum(0) < (0.42 * size) ** 2
    data = ndimage.gaussian_filter(rng.normal(size=(4, size, size, size)).astype(np.float32), (0, 2, 2, 2))
    return np.where(brain, data * 3 + 1, 0).astype(np.float32)


def _starts(size: int, patch: int, n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1)
    return [tuple(int(v) for v in rng.integers(0, size - patch, 3)) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--reads", type=int, default=60)
    args = ap.parse_args()
    data, p = _case(args.size), args.patch
    starts = _starts(args.size, p, args.reads)
    tmp = Path(tempfile.mkdtemp(prefix="autoseg_storage_"))
    results = []
    try:
        t = time.perf_counter()
        np.save(tmp / "c.npy", data)
        w = time.perf_counter() - t
        t = time.perf_counter()
        for z, y, x in starts:
            arr = np.load(tmp / "c.npy", mmap_mode="r")
            np.ascontiguousarray(arr[:, z:z + p, y:y + p, x:x + p])
        results.append(("npy (memory-mapped)", (time.perf_counter() - t) / len(starts), (tmp / "c.npy").stat().st_size, w))

        t = time.perf_counter()
        np.savez_compressed(tmp / "c.npz", data=data)
        w = time.perf_counter() - t
        t = time.perf_counter()
        for z, y, x in starts[: max(3, len(starts) // 10)]:
            np.load(tmp / "c.npz")["data"][:, z:z + p, y:y + p, x:x + p]
        results.append(("npz (zlib, whole case per read)", (time.perf_counter() - t) / max(3, len(starts) // 10),
                        (tmp / "c.npz").stat().st_size, w))
        try:
            import blosc2
        except ImportError:
            print("blosc2 not installed: skipped (pip install blosc2 to include it)")
        else:
            blosc2.set_nthreads(1)
            chunks = (1, min(args.size, p), min(args.size, p), min(args.size, p))
            blocks = (1, 32, 32, 32)
            t = time.perf_counter()
            blosc2.asarray(np.ascontiguousarray(data), urlpath=str(tmp / "c.b2nd"), mode="w", chunks=chunks,
                           blocks=blocks, cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 8})
            w = time.perf_counter() - t
            t = time.perf_counter()
            for z, y, x in starts:
                arr = blosc2.open(str(tmp / "c.b2nd"), mode="r", mmap_mode="r")
                arr[:, z:z + p, y:y + p, x:x + p]
            results.append(("blosc2 LZ4HC (chunked)", (time.perf_counter() - t) / len(starts),
                            (tmp / "c.b2nd").stat().st_size, w))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"case 4x{args.size}^3 float32 ({data.nbytes / 1e6:.0f} MB in memory), patch 4x{p}^3, {args.reads} reads")
    for name, read, size, write in results:
        print(f"{name}: {read * 1000:.1f} ms per patch, {size / 1e6:.1f} MB on disk, write {write:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
