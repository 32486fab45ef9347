"""How many voxel bytes a NIfTI file needs and how many it holds: finds files cut short, which ITK reads (the
missing part as zeros) and writes (a full disk gives no error) without complaint."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np


def nifti_lengths(path: Path) -> tuple[int, int] | None:
    """``(needed, present)`` bytes of a NIfTI file, or None when its header cannot be parsed.

    ITK fills the missing part of a truncated NIfTI file with zeros instead of failing, so the reader
    checks the length itself. For ``.nii.gz`` the gzip trailer gives the length cheaply; only when it
    disagrees (a truncated or multi-member file) is the stream decompressed to count its bytes.
    """
    import nibabel as nib  # lazy: only NIfTI reads need it

    try:
        proxy = nib.load(str(path)).dataobj  # the header's own vox_offset is reset by nibabel; the proxy's is not
        needed = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * int(np.dtype(proxy.dtype).itemsize)
    except Exception:  # not parseable: SimpleITK's own error message is the better one
        return None
    if path.name.lower().endswith(".nii"):
        return needed, path.stat().st_size
    with path.open("rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == needed % 2**32:
            return needed, needed
    return needed, gzip_length(path)


def gzip_length(path: Path) -> int:
    """Bytes a (possibly multi-member, possibly truncated) gzip file decompresses to before it ends."""
    present = 0
    inflater = zlib.decompressobj(wbits=31)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                try:
                    present += len(inflater.decompress(chunk))
                except zlib.error:
                    return present
                chunk = inflater.unused_data if inflater.eof else b""
                if inflater.eof:
                    inflater = zlib.decompressobj(wbits=31)
    return present
