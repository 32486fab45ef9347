"""Which on-disk format suits the preprocessed cases: memory-mapped .npy (autoseg's default), compressed .npz, or
Blosc2 NDArrays read by block (``autoseg plan --storage blosc2``; nnU-Net v2's format), and what each costs a
training run.

    python benchmarks/storage_format.py [--size 160] [--patch 128] [--reads 60] [--train-iters 6] [--cases 4]

1. Patch reads: writes one BraTS-like case (4 float32 channels of size^3, zero background, smooth foreground)
   per format (Blosc2 exactly as autoseg writes it, :func:`autoseg.preprocessing.storage.save_case_array`, plus
   the same layout with nnU-Net's ZSTD level 8 for comparison), then times random patch^3 reads from a freshly
   opened file, with one decompression thread (as in a data-loading worker), warm (page cache holds the file,
   as during training on a local disk with enough memory) and cold (the file's pages dropped with
   ``posix_fadvise(DONTNEED)`` before each read, as on a first epoch or a dataset larger than memory).
2. Training: a synthetic 4-channel dataset of ``--cases`` cases of size^3, planned with the cpu preset once per
   storage, preprocessed, and trained for two epochs of ``--train-iters`` iterations (default workers, CPU,
   no validation); prints the preprocessed folder's size and seconds per iteration of the second epoch (the
   first includes the workers' start-up). ``--train-iters 0`` skips it.

Figures on the 2-core development machine (no GPU), defaults except ``--train-iters 4``, blosc2 4.15 (a second
run gave warm reads of 14 / 27 / 41 ms, so ~20-30 % run to run):

    npy (memory-mapped): 18.0 ms per patch warm, 42.6 ms cold, 65.5 MB on disk, write 0.03 s
    npz (zlib, whole case per read): 452.5 ms per patch warm, 351.6 ms cold, 17.5 MB on disk, write 1.83 s
    blosc2 LZ4-5 (autoseg --storage blosc2): 24.8 ms per patch warm, 37.0 ms cold, 17.0 MB on disk, write 0.10 s
    blosc2 ZSTD-8 (nnU-Net's codec, same layout): 34.4 ms per patch warm, 60.7 ms cold, 15.6 MB on disk, write 1.24 s
    training: 4 cases of 4x160^3, cpu preset 3d_fullres (patch 64x64x80, batch 2), 2 epochs x 4 iterations, CPU, 0 workers
      npy: preprocessed 143.3 MB in 3.3 s; sampler 56 ms per batch; training 11.84 s per iteration (epoch 2)
      blosc2: preprocessed 72.9 MB in 2.3 s; sampler 50 ms per batch; training 11.47 s per iteration (epoch 2)
      same losses from both stores: True

So npy stays the default: its warm reads are the fastest (1.4-1.9x faster than Blosc2 LZ4) and it needs no optional
package, while a training iteration costs the same with either store (the patch read is a few percent of the
sampler's time and far below the network step and augmentation); Blosc2's gain is disk and page cache (2-4x less),
which is what counts at cluster scale: plan with ``--storage blosc2`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.preprocessing.storage import BLOSC2_CPARAMS, blosc2_layout, load_case_array, save_case_array


def _case(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    grid = np.indices((size,) * 3).astype(np.float32) - size / 2
    brain = (grid ** 2).sum(0) < (0.42 * size) ** 2
    data = ndimage.gaussian_filter(rng.normal(size=(4, size, size, size)).astype(np.float32), (0, 2, 2, 2))
    return np.where(brain, data * 3 + 1, 0).astype(np.float32)


def _starts(size: int, patch: int, n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1)
    return [tuple(int(v) for v in rng.integers(0, size - patch, 3)) for _ in range(n)]


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _time_reads(path: Path, read: Callable[[Path, tuple[int, int, int]], object], starts, cold: bool) -> float:
    read(path, starts[0])  # warm-up (imports, first page faults)
    total = 0.0
    for s in starts:
        if cold:
            _drop_cache(path)
        t = time.perf_counter()
        read(path, s)
        total += time.perf_counter() - t
    return total / len(starts)


def _write_zstd(path: Path, data: np.ndarray, patch: int) -> None:
    import blosc2

    chunks, blocks = blosc2_layout(data.shape, (patch,) * 3, data.itemsize)
    arr = blosc2.asarray(data, chunks=chunks, blocks=blocks,
                         cparams={"codec": blosc2.Codec.ZSTD, "clevel": 8, "filters": [blosc2.Filter.SHUFFLE]})
    path.write_bytes(arr.to_cframe())


def _patch_reads(data: np.ndarray, p: int, starts, tmp: Path) -> list[tuple[str, float, float, int, float]]:
    """(name, warm s/read, cold s/read, bytes on disk, write s) per format."""
    def patch(path: Path, s: tuple[int, int, int]) -> np.ndarray:
        z, y, x = s
        return np.ascontiguousarray(load_case_array(path)[:, z:z + p, y:y + p, x:x + p])

    def npz(path: Path, s: tuple[int, int, int]) -> np.ndarray:
        z, y, x = s
        with np.load(path, allow_pickle=False) as f:
            return f["data"][:, z:z + p, y:y + p, x:x + p]

    formats: list[tuple[str, str, Callable, Callable]] = [
        ("npy (memory-mapped)", "c.npy", lambda f: save_case_array(f, data), patch),
        ("npz (zlib, whole case per read)", "c.npz", lambda f: np.savez_compressed(f, data=data), npz)]
    try:
        from autoseg.preprocessing.storage import set_read_threads

        set_read_threads(1)
        import blosc2  # noqa: F401
    except ImportError:
        print('blosc2 not installed: skipped (pip install "autoseg[blosc2]" to include it)')
    else:
        codec = f"{BLOSC2_CPARAMS['codec']}-{BLOSC2_CPARAMS['clevel']}"
        formats += [(f"blosc2 {codec} (autoseg --storage blosc2)", "c.b2nd",
                     lambda f: save_case_array(f, data, patch_size=(p,) * 3), patch),
                    ("blosc2 ZSTD-8 (nnU-Net's codec, same layout)", "z.b2nd", lambda f: _write_zstd(f, data, p), patch)]
    out = []
    for name, fname, write, read in formats:
        path = tmp / fname
        t = time.perf_counter()
        write(path)
        w = time.perf_counter() - t
        few = starts if read is patch else starts[: max(3, len(starts) // 10)]
        warm = _time_reads(path, read, few, cold=False)
        cold = _time_reads(path, read, few, cold=True)
        out.append((name, warm, cold, path.stat().st_size, w))
    return out


def _loader_seconds(folder: Path, case_ids: list[str], patch: tuple[int, ...], batch: int, n: int = 20) -> float:
    """Seconds per batch of the training sampler alone (the initial, pre-augmentation patch of every sample)."""
    from autoseg.training.augmentation import augmentation_params
    from autoseg.training.dataloader import CaseStore, PatchLoader

    loader = PatchLoader(CaseStore(folder, case_ids), patch_size=augmentation_params(patch).initial_patch_size,
                         final_patch_size=patch, batch_size=batch, seed=0)
    loader.generate_train_batch()  # opens the cases
    t = time.perf_counter()
    for _ in range(n):
        loader.generate_train_batch()
    return (time.perf_counter() - t) / n


def _train(storage: str, root: Path, out: Path, args: argparse.Namespace) -> dict[str, object]:
    """Plan (cpu preset) with ``storage``, preprocess, time the sampler and two epochs of training."""
    from autoseg.api import plan, preprocess, train

    wd = out / f"work_{storage}"
    plans = plan(root, workdir=wd, preset="cpu", progress=False, storage=storage)
    cfg = plans.configuration("3d_fullres")
    t = time.perf_counter()
    preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
    prep = time.perf_counter() - t
    folder = wd / "preprocessed" / cfg.data_identifier
    ids = sorted(f.name[:-5] for f in folder.glob("*.json"))
    loader = _loader_seconds(folder, ids, cfg.patch_size, cfg.batch_size)
    (res,) = train(root, "3d_fullres", "all", workdir=wd, epochs=2, iters_per_epoch=args.train_iters, val_iters=0,
                   device="cpu", progress=False, validate=False, workers=args.workers, deterministic=True)
    log = [json.loads(line) for line in (res.folder / "log.jsonl").read_text().splitlines()]
    return {"storage": storage, "prep": prep, "loader": loader, "iter": log[-1]["epoch_time"] / args.train_iters,
            "size": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()), "losses": [r["train_loss"] for r in log],
            "what": f"patch {'x'.join(map(str, cfg.patch_size))}, batch {cfg.batch_size}"}


def _training(args: argparse.Namespace, tmp: Path) -> None:
    from autoseg.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp / "Dataset001_StorageBench", n_cases=args.cases, shape=(args.size,) * 3,
                                  n_channels=4, kind="brats", regions=True, seed=0, shape_jitter=0.0)
    storages = ["npy"]
    try:
        import blosc2  # noqa: F401

        storages.append("blosc2")
    except ImportError:
        pass
    rows = [_train(s, root, tmp, args) for s in storages]
    print(f"training: {args.cases} cases of 4x{args.size}^3, cpu preset 3d_fullres ({rows[0]['what']}), "
          f"2 epochs x {args.train_iters} iterations, CPU, {args.workers} augmentation workers")
    for r in rows:
        print(f"  {r['storage']}: preprocessed {r['size'] / 1e6:.1f} MB in {r['prep']:.1f} s; sampler "
              f"{r['loader'] * 1000:.0f} ms per batch; training {r['iter']:.2f} s per iteration (epoch 2)")
    if len(rows) == 2:
        print(f"  same losses from both stores: {rows[0]['losses'] == rows[1]['losses']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--reads", type=int, default=60)
    ap.add_argument("--train-iters", type=int, default=6, help="training iterations per epoch (0: no training)")
    ap.add_argument("--cases", type=int, default=4, help="cases of the training dataset")
    ap.add_argument("--workers", type=int, default=0,
                    help="augmentation workers in the training runs (default 0: batches built in series with the "
                         "steps, so a slower read shows in full and timings do not depend on scheduling)")
    args = ap.parse_args()
    data, p = _case(args.size), args.patch
    tmp = Path(tempfile.mkdtemp(prefix="autoseg_storage_"))
    try:
        results = _patch_reads(data, p, _starts(args.size, p, args.reads), tmp)
        print(f"case 4x{args.size}^3 float32 ({data.nbytes / 1e6:.1f} MB in memory), patch 4x{p}^3, "
              f"{args.reads} reads, 1 decompression thread")
        for name, warm, cold, size, write in results:
            print(f"  {name}: {warm * 1000:.1f} ms per patch warm, {cold * 1000:.1f} ms cold, "
                  f"{size / 1e6:.1f} MB on disk, write {write:.2f} s")
        if args.train_iters > 0:
            _training(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
