"""Atomic writes: finished files get the permissions a plain write would give (not mkstemp's owner-only)."""

import os
import stat

from autoseg.io.atomic import current_umask, write_json_atomic


def test_atomic_files_get_umask_permissions(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == 0o666 & ~current_umask()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
