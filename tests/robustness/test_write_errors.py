"""A read-only output folder or a full disk: ``plan``, ``preprocess``, ``train`` and ``predict`` exit 2 with one line
naming the path, the problem and the fix (no traceback), fail before long work where they can, keep the files
finished before, and leave no temporary behind.

The tests run as root, which writes into any folder whatever its mode, so a read-only file system is simulated by
making file and folder creation under a root raise EROFS, and a full disk by sending new files there to
``/dev/full``, where every writer (numpy, torch, SimpleITK, json) meets a real ENOSPC. A test with a real
``chmod 0o555`` folder runs when not root.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.errors import ImageWriteError
from autoseg.io.atomic import write_json_atomic
from autoseg.io.image import Geometry, write_label
from autoseg.networks.checkpoint import FINAL, load_checkpoint

PROBE = ".autoseg-write-test."  # the name ensure_writable gives its test file
linux_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@pytest.fixture(autouse=True)
def _one_thread():
    """torch on one thread in this process: two threads on a shared 2-core machine can be 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _under(root: Path) -> Callable[[object], bool]:
    root = root.resolve()
    return lambda d: d is not None and (Path(str(d)).resolve() == root or root in Path(str(d)).resolve().parents)


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Creating files or folders under ``root`` fails with EROFS, as on a read-only file system."""
    inside, mkstemp, mkdir = _under(root), tempfile.mkstemp, os.mkdir

    def no_file(suffix=None, prefix=None, dir=None, text=False):  # noqa: A002 - tempfile's own argument name
        if inside(dir):
            raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, f"{prefix}tmpname{suffix}"))
        return mkstemp(suffix, prefix, dir, text)

    def no_folder(path, mode=0o777, **kw):
        if inside(Path(path).parent):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return mkdir(path, mode, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", no_file)
    monkeypatch.setattr(os, "mkdir", no_folder)


def full_disk(monkeypatch: pytest.MonkeyPatch, root: Path, names: Callable[[str], bool] = lambda n: True) -> None:
    """New files under ``root`` whose temporary name matches ``names`` are written to ``/dev/full`` (ENOSPC)."""
    inside, mkstemp, chmod = _under(root), tempfile.mkstemp, os.chmod

    def to_full(suffix=None, prefix=None, dir=None, text=False):  # noqa: A002 - tempfile's own argument name
        fd, name = mkstemp(suffix, prefix, dir, text)
        if inside(dir) and names(os.path.basename(name)):
            os.close(fd)
            os.unlink(name)
            os.symlink("/dev/full", name)
            fd = os.open(name, os.O_WRONLY)
        return fd, name

    def guarded_chmod(path, mode, *args, **kw):
        assert not os.path.islink(path), f"{path}: a write that failed was about to be renamed into place"
        return chmod(path, mode, *args, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", to_full)
    monkeypatch.setattr(os, "chmod", guarded_chmod)


def hidden(folder: Path) -> list[str]:
    """Temporaries (hidden files) anywhere under ``folder``."""
    return [p.name for p in folder.rglob(".*")]


def never(what: str) -> Callable[..., None]:
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} although nothing could be saved")
    return fail


# ---- read-only folders: one line, before any long work ------------------------------------------------------
def test_atomic_write_errors_name_the_file_not_its_temporary(tmp_path, monkeypatch):
    read_only(monkeypatch, tmp_path)
    with pytest.raises(OSError) as info:
        write_json_atomic(tmp_path / "plans.json", {})
    assert info.value.errno == errno.EROFS and info.value.filename == str(tmp_path / "plans.json")


def test_plan_into_a_read_only_workdir_fails_before_fingerprinting(tmp_path, monkeypatch, clean_dataset, cli,
                                                                   clear_error):
    work = tmp_path / "work"
    work.mkdir()
    read_only(monkeypatch, work)
    monkeypatch.setattr("autoseg.fingerprint.stage.analyze_dataset", never("the dataset was analysed"))
    status, _, err = cli("plan", clean_dataset, "--workdir", work, "--preset", "cpu")
    clear_error(status, err, str(work), "read-only", "--workdir")
    assert len(err.strip().splitlines()) == 1 and not list(work.iterdir())


def test_train_into_a_read_only_workdir(copy_of, clean_work, clean_dataset, monkeypatch, cli, clear_error, snapshot):
    work = copy_of(clean_work)
    for p in sorted((work / "models").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    before = snapshot(work)
    read_only(monkeypatch, work)
    status, _, err = cli("train", clean_dataset, "3d_fullres", "0", "--workdir", work, "--epochs", "1",
                         "--device", "cpu", "--workers", "0")
    clear_error(status, err, str(work / "models"), "read-only", "--workdir")
    assert snapshot(work) == before


def test_predict_into_a_read_only_folder_fails_before_loading_models(tmp_path, monkeypatch, clean_work,
                                                                     clean_dataset, cli, clear_error):
    out = tmp_path / "out"
    out.mkdir()
    read_only(monkeypatch, out)
    monkeypatch.setattr("autoseg.ensemble.pipeline.load_ensemble", never("the models were loaded"))
    status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", out, "--workdir", clean_work,
                         "--device", "cpu")
    clear_error(status, err, str(out), "read-only", "-o")
    assert not list(out.iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_into_a_chmod_read_only_folder(tmp_path, clean_work, clean_dataset, cli, clear_error):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", out, "--workdir", clean_work,
                             "--device", "cpu")
    finally:
        out.chmod(0o755)
    clear_error(status, err, str(out), "permission denied")
    assert not list(out.iterdir())


# ---- a disk that fills up during the run: finished files kept, no temporary left ------------------------------
@linux_dev_full
def test_disk_full_while_preprocessing(copy_of, clean_work, clean_dataset, monkeypatch, cli, clear_error, snapshot):
    work = copy_of(clean_work)
    folder = work / "preprocessed" / "3d_fullres"
    case = sorted(p.stem for p in folder.glob("*.json"))[1]
    (folder / f"{case}.json").unlink()  # this case must be redone
    before = snapshot(folder)
    full_disk(monkeypatch, folder, names=lambda n: not n.startswith(PROBE))  # the disk fills after the start
    status, _, err = cli("preprocess", clean_dataset, "3d_fullres", "--workdir", work)
    clear_error(status, err, str(folder / f"{case}.npy"), "the disk is full", "free space")
    assert snapshot(folder) == before and not hidden(folder)


@linux_dev_full
def test_disk_full_at_the_first_write_of_preprocessing(copy_of, clean_work, clean_dataset, monkeypatch, cli,
                                                       clear_error):
    work = copy_of(clean_work)
    folder = work / "preprocessed" / "3d_fullres"
    for p in folder.glob("*.json"):
        p.unlink()
    full_disk(monkeypatch, folder)
    monkeypatch.setattr("autoseg.preprocessing.preprocess.read_case", never("a case was read"))
    status, _, err = cli("preprocess", clean_dataset, "3d_fullres", "--workdir", work)
    clear_error(status, err, f"{folder}: cannot write: the disk is full")
    assert not hidden(folder)


@linux_dev_full
def test_disk_full_when_saving_a_checkpoint(copy_of, clean_work, clean_dataset, monkeypatch, cli, clear_error):
    work = copy_of(clean_work)
    fold = work / "models" / "3d_fullres" / "fold_0"
    final = (fold / FINAL).read_bytes()
    full_disk(monkeypatch, fold, names=lambda n: n.endswith(".pt"))
    status, _, err = cli("train", clean_dataset, "3d_fullres", "0", "--workdir", work, "--epochs", "2",
                         "--iters-per-epoch", "1", "--val-iters", "1", "--workers", "0", "--device", "cpu", "--resume")
    clear_error(status, err, str(fold / FINAL), "the disk is full", "free space")
    assert (fold / FINAL).read_bytes() == final and load_checkpoint(fold / FINAL)["epoch"] == 1
    assert not hidden(fold)


@linux_dev_full
def test_disk_full_when_writing_a_prediction(tmp_path, clean_work, clean_dataset, monkeypatch, cli, clear_error):
    out = tmp_path / "out"
    out.mkdir()
    done = (clean_work.parent / "predicted" / "case_000.nii.gz").read_bytes()
    (out / "case_000.nii.gz").write_bytes(done)  # predicted by an earlier run
    full_disk(monkeypatch, out, names=lambda n: n.endswith(".nii.gz"))
    status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", out, "--workdir", clean_work,
                         "--device", "cpu", "--no-tta")
    clear_error(status, err, str(out / "case_001.nii.gz"), "disk is probably full", "Free space")
    assert (out / "case_000.nii.gz").read_bytes() == done
    assert sorted(p.name for p in out.iterdir()) == ["case_000.nii.gz"]


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_nifti_cut_short_by_a_write_limit_is_never_renamed_into_place(tmp_path, ending):
    """SimpleITK's NIfTI writer ignores a failed write (a full disk, a quota, ``ulimit -f``) and leaves a cut-short
    file without raising; it must not appear under the output's name, where a rerun would skip it as finished."""
    import resource

    seg = np.random.default_rng(0).integers(0, 200, (64, 64, 64), dtype=np.uint8)  # ~260 kB, barely compressible
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(ImageWriteError, match="written incompletely"):
            write_label(tmp_path / f"seg{ending}", seg, Geometry.identity(3))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert not list(tmp_path.iterdir())
