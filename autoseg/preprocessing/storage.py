"""How preprocessed case arrays are stored: memory-mapped ``.npy`` or compressed Blosc2 NDArrays (``.b2nd``).

The format is a dataset-level choice, ``autoseg plan --storage npy|blosc2`` (``Plans.storage``; plans written
before the choice existed are ``npy``). It applies to a case's image (``<case>.npy`` / ``<case>.b2nd``) and label
map (``<case>_seg.npy`` / ``<case>_seg.b2nd``); the small foreground-location table stays ``.npy``. Readers open
them with :func:`load_case_array`, which picks the format from the file name (and ``case_paths(folder, case)``
finds the stored one), so a reader never needs the plans. Not yet switched: the final validation
(``training/validation.py``) and the channel plugins' fit (``plugins/channels.py``) still ``np.load`` the ``.npy``
file, so with ``blosc2`` train with ``--no-validation`` and without channel plugins until they are.

``npy`` (the default): uncompressed, memory-mapped, a patch read copies only the patch's bytes from the page
cache. ``blosc2``: 2-4x smaller on disk (3.9x for the benchmark's BraTS-sized case with its zero background, 2x for
a synthetic training set cropped closer to the foreground), and a patch read decompresses only the Blosc2 blocks
that the patch touches (slicing the opened NDArray; the file is memory-mapped, never decompressed whole).
``benchmarks/storage_format.py`` measured (4x160^3 float32 case, 128^3 patches, one thread): warm patch reads
18 ms (npy) vs 25 ms (blosc2), cold reads 43 vs 37 ms, and the same seconds per training iteration with either
store. npy is the default because it reads fastest and needs no optional package; choose ``blosc2`` when the
preprocessed data do not fit the disk or the page cache (a cluster's shared file system, many large datasets).

Blosc2 layout (:func:`blosc2_layout`), from the configuration's training patch ``P`` (spatial; a 2D
configuration reads one slice: ``(1, *P)``):

* chunk = every channel x about half the patch per axis (``next_pow2(P) / 2``, at most the image): a patch read
  touches at most 3 chunks per axis (27 in 3D) and every chunk it opens is mostly inside the patch;
* block = every channel x a power-of-two box of at most 32 KiB (:data:`BLOCK_BYTES`, the per-core L1 data cache),
  halving the longest axis of the chunk until it fits: 4x8x16x16 float32 for four channels, 32^3 for an int8
  label map. Blosc2 decompresses only the blocks a slice intersects, so a read decodes at most about one block
  edge more than the patch per side. (nnU-Net v2 uses the same idea: blocks sized to the L1 cache, chunks grown
  towards the patch.) Measured alternatives (chunks of 1/4, 1/2 or the whole patch, blocks of 16-128 KiB, one or
  all channels per block) read a 4x128^3 patch in 23-31 ms, within the noise of the chosen layout's 25-28 ms:
  the LZ4 decode of the patch's bytes, not the layout, sets the time.
* codec = LZ4 at level 5 with byte shuffle (:data:`BLOSC2_CPARAMS`): it decodes 1.4-2x faster than ZSTD
  (nnU-Net v2's choice, level 8) for files ~10 % larger (17.0 vs 15.6 MB), and the decode is what every training
  iteration pays; ZSTD level 8 also writes 10-15x slower. The reading side follows whatever a file holds.

Example:
    >>> chunks, blocks = blosc2_layout((4, 160, 160, 160), (128, 128, 128), itemsize=4)
    >>> chunks, blocks
    ((4, 64, 64, 64), (4, 8, 16, 16))
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import FileFormatError, MissingDependencyError, PlanningError
from autoseg.io.atomic import atomic_path
from autoseg.planner.plans import STORAGES

#: the array-file suffix of each format ``autoseg plan --storage`` accepts (:data:`STORAGES`)
SUFFIXES = {"npy": ".npy", "blosc2": ".b2nd"}
#: what ``autoseg plan`` chooses without ``--storage`` (see the module docstring and the benchmark)
DEFAULT_STORAGE = "npy"
INSTALL = 'pip install "autoseg[blosc2]"'
#: upper bound of one Blosc2 block (all channels): a typical per-core L1 data cache
BLOCK_BYTES = 32 * 1024
#: LZ4 level 5, byte shuffle (the filter pipeline's last slot, as Blosc2 lists it)
BLOSC2_CPARAMS = {"codec": "LZ4", "clevel": 5, "filter": "SHUFFLE"}

_read_threads: int | None = None


def check_storage(storage: str, *, need_package: bool = True) -> str:
    """A valid storage name (and, for ``blosc2``, the package installed unless ``need_package=False``).

    Raises:
        PlanningError: an unknown name (the message lists the valid ones).
        MissingDependencyError: ``blosc2`` without the blosc2 package (one line naming the pip command).
    """
    if storage not in SUFFIXES:
        raise PlanningError(f"storage {storage!r} is not one of {', '.join(STORAGES)}.")
    if storage == "blosc2" and need_package:
        import_blosc2()
    return storage


def import_blosc2() -> Any:
    """The ``blosc2`` module, with the readers' thread count applied (see :func:`set_read_threads`).

    Raises:
        MissingDependencyError: not installed; the message names ``pip install "autoseg[blosc2]"``.
    """
    try:
        import blosc2
    except ImportError as err:
        raise MissingDependencyError(f"storage 'blosc2' needs the blosc2 package: {INSTALL} (or plan with "
                                     "--storage npy)") from err
    if _read_threads is not None and blosc2.nthreads != _read_threads:
        blosc2.set_nthreads(_read_threads)
    return blosc2


def set_read_threads(n: int | None) -> None:
    """Decompression threads per process (the data-loading workers use 1, as their BLAS; None: Blosc2's
    default). Takes effect now if blosc2 is loaded, else when it is."""
    global _read_threads
    _read_threads = n
    import sys

    module = sys.modules.get("blosc2")
    if n is not None and module is not None:
        module.set_nthreads(n)


def storage_of(path: str | os.PathLike[str]) -> str:
    """The format of an array file, from its suffix (``.b2nd`` is blosc2, anything else npy)."""
    return "blosc2" if str(path).endswith(SUFFIXES["blosc2"]) else "npy"


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def blosc2_layout(shape: Sequence[int], patch_size: Sequence[int], itemsize: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Blosc2 ``(chunks, blocks)`` for a ``(C, *spatial)`` array read by patches of ``patch_size``.

    Args:
        shape: the array's shape, channels first.
        patch_size: the training patch (spatial; shorter than the spatial axes for a 2D configuration on
            volumes, whose reads take one slice of the leading axis).
        itemsize: bytes per element.

    Returns:
        Chunks (every channel, about half the patch per axis) and blocks (every channel, at most
        :data:`BLOCK_BYTES`), as described in the module docstring.
    """
    channels, spatial = int(shape[0]), [int(s) for s in shape[1:]]
    patch = [1] * (len(spatial) - len(patch_size)) + [int(p) for p in patch_size]
    chunk = [max(1, min(s, _pow2_at_least(p) // 2)) for s, p in zip(spatial, patch, strict=True)]
    block = [_pow2_at_least(c) for c in chunk]
    while channels * math.prod(block) * itemsize > BLOCK_BYTES and max(block) > 1:
        longest = block.index(max(block))
        block[longest] //= 2
    block = [min(b, c) for b, c in zip(block, chunk, strict=True)]
    return (channels, *chunk), (channels, *block)


def save_case_array(path: str | os.PathLike[str], array: np.ndarray, *,
                    patch_size: Sequence[int] | None = None) -> None:
    """Write one case array atomically in the format its suffix names (see :data:`SUFFIXES`).

    Args:
        path: ``<case>.npy`` / ``<case>.b2nd`` (and the ``_seg`` files).
        array: ``(C, *spatial)``.
        patch_size: the training patch the Blosc2 chunks are laid out for (default: the whole image).

    Raises:
        MissingDependencyError: a ``.b2nd`` file without the blosc2 package.
    """
    array = np.ascontiguousarray(array)
    if storage_of(path) == "npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
        return
    blosc2 = import_blosc2()
    chunks, blocks = blosc2_layout(array.shape, patch_size or array.shape[1:], array.itemsize)
    cparams = {"codec": getattr(blosc2.Codec, BLOSC2_CPARAMS["codec"]), "clevel": BLOSC2_CPARAMS["clevel"],
               "filters": [getattr(blosc2.Filter, BLOSC2_CPARAMS["filter"])]}
    frame = blosc2.asarray(array, chunks=chunks, blocks=blocks, cparams=cparams).to_cframe()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a contiguous frame is what a .b2nd file holds
        fh.write(frame)


def load_case_array(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """Open a stored case array (the one function every reader of preprocessed cases should use).

    Args:
        path: a ``.npy`` or ``.b2nd`` file (:func:`storage_of`).
        mmap: True: an array-like whose slices read only what they cover (a read-only ``np.memmap``, or a Blosc2
            NDArray whose slicing decompresses only the blocks it touches; both give ``numpy`` arrays when sliced,
            and have ``shape``, ``ndim`` and ``dtype``). False: the whole array as a ``numpy`` array in memory.

    Raises:
        MissingDependencyError: a ``.b2nd`` file without the blosc2 package.
        FileFormatError: a ``.b2nd`` file that is not a Blosc2 NDArray.
        OSError: a missing or unreadable file.
    """
    if storage_of(path) == "npy":
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    blosc2 = import_blosc2()
    if not Path(path).is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    arr = blosc2.open(str(path), mode="r", mmap_mode="r")
    if not isinstance(arr, blosc2.NDArray):
        raise FileFormatError(f"{path}: not a Blosc2 NDArray written by autoseg; preprocess again.")
    return arr if mmap else arr[...]
