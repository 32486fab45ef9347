"""ONNX export of trained fold networks, and ONNX Runtime sessions that the sliding window calls like networks.

    >>> from autoseg.inference.onnx_backend import export_onnx
    >>> export_onnx("autoseg_work/Dataset001", "3d_fullres", folds=[0])  # doctest: +SKIP
    [PosixPath('autoseg_work/Dataset001/models/3d_fullres/fold_0/network.onnx')]
    >>> autoseg.predict("imagesTs", "out", workdir="autoseg_work/Dataset001", backend="onnx")  # doctest: +SKIP

Each fold's U-Net (built without deep supervision, as :meth:`Predictor.from_workdir` builds it) becomes
``models/<config>/fold_<k>/network.onnx`` next to its checkpoint: one input ``image`` ``(batch, C, *spatial)``
and one output ``logits`` ``(batch, K, *spatial)``, float32, opset :data:`OPSET`. The batch and spatial axes are
dynamic; spatial sizes must be multiples of the network's ``divisible_by`` (the sliding window always feeds
whole patches). The model's metadata records the SHA-256 of the checkpoint it was exported from, so a stale
file (the fold was retrained) is noticed and, in a work folder, exported again.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing) needs only the ``onnx`` package and
takes ~0.2 s for a tiny network, ~2 s with the check for the demo's 3d_fullres; it is deprecated since torch 2.9
but works up to at least 2.13, with logits within ~1e-6 of torch relative to the largest logit.
``exporter="dynamo"`` (``torch.export``) gives the same interface and accuracy but also needs ``onnxscript`` and
takes ~5 s; use it when a future torch drops the TorchScript path. Every export is checked: ONNX Runtime's logits
on a random patch must match torch's within :data:`EXPORT_RTOL`.

Speed (benchmarks/onnx_vs_torch.py, demo model, one CPU thread each): 2D windows run ~3x faster than torch's,
3D windows ~1.45x slower than torch's traced, oneDNN-optimised graph (float32, CPU patches up to 300k voxels).
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import BundleError, ModelNotFoundError, OnnxBackendError, OnnxUnavailableError
from autoseg.inference.sliding_window import InferenceError
from autoseg.io.atomic import atomic_path
from autoseg.io.model_folder import (
    configuration_folder,
    is_bundle,
    sha256,
    trained_configurations,
    trained_folds,
)
from autoseg.networks.checkpoint import FINAL, CheckpointMeta, load_checkpoint
from autoseg.planner.plans import Plans

#: file name of a fold's ONNX network, next to its checkpoint
ONNX_FILE = "network.onnx"
#: ONNX opset of exported networks (the oldest the dynamo exporter writes; ONNX Runtime >= 1.14 runs it)
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORTERS = ("torchscript", "dynamo")
BACKENDS = ("torch", "onnx")
#: largest |ONNX Runtime - torch| logit difference an export may show on a random patch, relative to the largest
#: |logit| (at least 1); measured ~2e-6 on the demo model's 56^3 patch
EXPORT_RTOL = 1e-4
INSTALL = "pip install autoseg[onnx]"
_META_CHECKPOINT = "autoseg.checkpoint_sha256"


def require(package: str) -> Any:
    """Import ``package`` (``onnx``, ``onnxruntime`` or ``onnxscript``) or say how to install it.

    Raises:
        OnnxUnavailableError: the package is not installed.
    """
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise OnnxUnavailableError(f"the ONNX backend needs the Python package {package!r}, which is not installed: "
                                   f"run `{INSTALL}` (or `pip install {package}`), or use --backend torch.") from err


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else an error listing them."""
    if backend not in BACKENDS:
        raise InferenceError(f"backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)} (--backend).")
    return backend


def network_to_onnx(network: torch.nn.Module, *, in_channels: int, patch_size: Sequence[int],
                    exporter: str = "torchscript", metadata: Mapping[str, str] | None = None) -> bytes:
    """The serialised ONNX model of a U-Net in evaluation mode, full-resolution output only.

    Args:
        network: the network (switched to eval mode and deep supervision off).
        in_channels: input channels.
        patch_size: the example input's spatial size (a patch of the configuration).
        exporter: ``torchscript`` (needs ``onnx``) or ``dynamo`` (also needs ``onnxscript``).
        metadata: strings stored in the model's metadata.

    Returns:
        The model's bytes (input ``image``, output ``logits``, dynamic batch and spatial axes).

    Raises:
        OnnxUnavailableError: a needed package is missing.
        OnnxBackendError: an unknown exporter, or the export failed.
    """
    onnx = require("onnx")
    if exporter not in EXPORTERS:
        raise OnnxBackendError(f"exporter {exporter!r} is unknown; choose one of {', '.join(EXPORTERS)}.")
    network.eval()
    if hasattr(network, "deep_supervision"):
        network.deep_supervision = False
    patch = tuple(int(p) for p in patch_size)
    example = torch.zeros((1, int(in_channels), *patch))
    spatial = {a + 2: f"size{a}" for a in range(len(patch))}
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the network's shape checks, deprecation notes
            if exporter == "torchscript":
                buffer = io.BytesIO()
                legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
                torch.onnx.export(network, (example,), buffer, dynamic_axes={
                    name: {0: "batch", **spatial} for name in (INPUT_NAME, OUTPUT_NAME)}, **common, **legacy)
                model = onnx.load_model_from_string(buffer.getvalue())
            else:
                require("onnxscript")
                from torch.export import Dim

                div = getattr(getattr(network, "topology", None), "divisible_by", (1,) * len(patch))
                shapes = {0: Dim("batch", min=1, max=4096),
                          **{a + 2: int(d) * Dim(f"k{a}", min=1, max=4096) for a, d in enumerate(div)}}
                program = torch.onnx.export(network, (example,), None, dynamic_shapes=(shapes,), dynamo=True,
                                            external_data=False, verbose=False, **common)
                model = program.model_proto
    except OnnxUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - the exporters raise many types; say which step failed
        raise OnnxBackendError(f"ONNX export ({exporter}) of the network failed: {type(err).__name__}: {err}. Try "
                               f"the other exporter ({', '.join(e for e in EXPORTERS if e != exporter)}) or predict "
                               "with --backend torch.") from err
    onnx.helper.set_model_props(model, {"autoseg.exporter": exporter, "autoseg.torch": torch.__version__,
                                        **(metadata or {})})
    return model.SerializeToString()


class OnnxNetwork:
    """An ONNX Runtime session called like a network: a ``(B, C, *spatial)`` tensor -> logits on the input's device.

    The session runs on CPUExecutionProvider, or CUDAExecutionProvider for a CUDA ``device`` when this
    onnxruntime has it (``onnxruntime-gpu``); it uses as many threads as torch (``torch.get_num_threads()``).
    Inputs go through numpy as float32; mixed precision does not apply.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        source: the file the model came from (or ``"<memory>"``).
        metadata: the model's metadata (checkpoint hash, exporter, torch version).
    """

    def __init__(self, model: str | os.PathLike[str] | bytes, *, device: str | torch.device = "cpu") -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 4  # fatal only: failures surface as InferenceError
        # idle threads sleep instead of spinning: between windows torch's own threads flip and accumulate
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.source = "<memory>" if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=_providers(ort, torch.device(device)))
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise OnnxBackendError(f"{self.source}: ONNX Runtime cannot load this model ({err}). Export it again "
                                   "(`autoseg export ... --onnx`, or delete it in a work folder) or use --backend "
                                   "torch.") from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        shape = self.session.get_inputs()[0].shape
        self.in_channels = shape[1] if isinstance(shape[1], int) else None

    @property
    def providers(self) -> list[str]:
        """The execution providers the session uses, preferred first."""
        return list(self.session.get_providers())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch (float32, on ``x``'s device)."""
        if x.ndim < 3 or (self.in_channels is not None and x.shape[1] != self.in_channels):
            raise InferenceError(f"{self.source}: input of shape {tuple(x.shape)}; the network takes "
                                 f"(batch, {self.in_channels}, *spatial).")
        data = x.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            out = self.session.run([OUTPUT_NAME], {INPUT_NAME: data})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InferenceError(f"{self.source}: ONNX Runtime failed on an input of shape {tuple(x.shape)}: {err}. "
                                 "Spatial sizes must be multiples of the network's strides (whole patches).") from err
        result = torch.from_numpy(np.ascontiguousarray(out))
        return result if x.device.type == "cpu" else result.to(x.device)


def _providers(ort: Any, device: torch.device) -> list[Any]:
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        warnings.warn("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); the ONNX networks "
                      "run on the CPU.", stacklevel=4)
    elif device.type != "cpu":
        warnings.warn(f"the ONNX backend runs on the CPU here, not on {device.type}.", stacklevel=4)
    return ["CPUExecutionProvider"]


def compare_with_torch(model: bytes | str | os.PathLike[str] | OnnxNetwork, network: torch.nn.Module, *,
                       in_channels: int, spatial: Sequence[int], batch: int = 1, seed: int = 0
                       ) -> tuple[float, float]:
    """``(max |ONNX Runtime - torch|, max |torch|)`` of the logits of a random standard-normal input."""
    runner = model if isinstance(model, OnnxNetwork) else OnnxNetwork(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, int(in_channels), *(int(s) for s in spatial)), generator=gen)
    network.eval()
    with torch.no_grad():
        expected = network(x)
    return float((runner(x) - expected).abs().max()), float(expected.abs().max())


def _fold_onnx(fold_dir: Path, config: Any, exporter: str, verify: bool) -> bytes:
    """Export the final checkpoint of one fold folder (its hash goes into the model's metadata)."""
    from autoseg.inference.model import network_from_checkpoint, network_part

    ckpt = load_checkpoint(fold_dir / FINAL, map_location="cpu")
    part = network_part(CheckpointMeta.from_json(ckpt, fold_dir / FINAL))
    if not part.exports_onnx:
        raise OnnxBackendError(f"{fold_dir / FINAL}: this network ({type(part).__name__}) cannot be exported to ONNX; "
                               "predict with --backend torch and export the bundle without --onnx.")
    net, meta = network_from_checkpoint(ckpt, config, fold_dir / FINAL)
    in_channels = meta.in_channels
    data = network_to_onnx(net, in_channels=in_channels, patch_size=config.patch_size, exporter=exporter,
                           metadata={_META_CHECKPOINT: sha256(fold_dir / FINAL), "autoseg.configuration": config.name,
                                     "autoseg.patch_size": ",".join(str(p) for p in config.patch_size)})
    if verify:
        diff, scale = compare_with_torch(data, net, in_channels=in_channels, spatial=config.patch_size)
        if not diff <= EXPORT_RTOL * max(1.0, scale):
            raise OnnxBackendError(f"{fold_dir / FINAL}: the ONNX export's logits differ from torch's by {diff:.3g} "
                                   f"(logits up to {scale:.3g}; allowed: {EXPORT_RTOL} of that); try "
                                   "exporter='dynamo' or use --backend torch.")
    return data


def _plans(root: Path, configuration: str) -> Plans:
    model_plans = configuration_folder(root, configuration) / "plans.json"
    return Plans.load(model_plans if model_plans.is_file() else root / "plans.json")


def export_onnx(source: str | os.PathLike[str], configurations: str | Sequence[str] | None = None,
                folds: Sequence[int | str] | None = None, *, output: str | os.PathLike[str] | None = None,
                exporter: str = "torchscript", verify: bool = True) -> list[Path]:
    """Export the fold networks of a work folder (or a bundle) to ONNX.

    Each network goes to ``<output>/models/<configuration>/fold_<k>/network.onnx``; ``output`` defaults to
    ``source`` itself (next to the checkpoints) for a work folder. A bundle's files are fixed by its manifest, so
    exporting from a bundle needs ``output`` (or re-export the bundle with ``autoseg export ... --onnx``).

    Args:
        source: a work folder or bundle.
        configurations: default: every trained configuration (with a cascade's first stage when present).
        folds: default: every trained fold of each configuration.
        output: where the ``models/`` tree of ONNX files goes.
        exporter: ``torchscript`` (default, needs ``onnx``) or ``dynamo`` (also ``onnxscript``).
        verify: compare ONNX Runtime's logits with torch's on a random patch (needs ``onnxruntime``).

    Returns:
        The ONNX files written.

    Raises:
        ModelNotFoundError: a configuration or fold is not trained.
        OnnxUnavailableError: onnx / onnxruntime (or onnxscript) is missing.
        OnnxBackendError: the export failed or does not match torch.
        BundleError: ``source`` is a bundle and no ``output`` was given.

    Example:
        >>> export_onnx("autoseg_work/Dataset001", "3d_fullres", folds=[0], output="deploy")  # doctest: +SKIP
        [PosixPath('deploy/models/3d_fullres/fold_0/network.onnx')]
    """
    root = Path(source)
    if output is None and is_bundle(root):
        raise BundleError(f"{root}: a bundle's files are fixed by its manifest; pass an output folder, or export the "
                          f"bundle again with `autoseg export --workdir W -o {root} --overwrite --onnx`.")
    dest = Path(output) if output is not None else root
    names = [configurations] if isinstance(configurations, str) else \
        list(configurations or trained_configurations(root))
    if not names:
        raise ModelNotFoundError(f"{root}: no trained model (models/<configuration>/fold_*/{FINAL}); train one first.")
    written = []
    for name in names:
        have = trained_folds(configuration_folder(root, name))
        wanted = [str(f) for f in folds] if folds is not None else have
        missing = [f for f in wanted if f not in have]
        if not wanted or missing:
            raise ModelNotFoundError(f"{root / 'models' / name}: fold(s) {', '.join(missing) or '(none)'} not trained "
                                     f"(trained: {', '.join(have) or 'none'}).")
        config = _plans(root, name).configuration(name)
        for f in wanted:
            data = _fold_onnx(configuration_folder(root, name) / f"fold_{f}", config, exporter, verify)
            path = configuration_folder(dest, name) / f"fold_{f}" / ONNX_FILE
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            written.append(path)
    return written


def bundle_onnx(bundle: str | os.PathLike[str], models: Sequence[tuple[str, Sequence[str]]], *,
                exporter: str = "torchscript") -> dict[str, Any]:
    """Export the networks a bundle being written holds; returns its manifest's ``onnx`` record.

    Args:
        bundle: the (unfinished) bundle folder, whose ``models/`` already holds the checkpoints.
        models: ``(configuration, folds)`` pairs to export.
        exporter: see :func:`export_onnx`.
    """
    root = Path(bundle)
    files: list[str] = []
    merged: dict[str, list[str]] = {}
    for name, folds in models:  # a configuration may come twice (an ensemble member and a cascade's first stage)
        merged.setdefault(name, [])
        merged[name] += [str(f) for f in folds if str(f) not in merged[name]]
    for name, folds in merged.items():
        paths = export_onnx(root, name, folds, output=root, exporter=exporter)
        files += [p.relative_to(root).as_posix() for p in paths]
    return {"opset": OPSET, "exporter": exporter, "files": sorted(files), "input": INPUT_NAME, "output": OUTPUT_NAME,
            "onnx": require("onnx").__version__, "onnxruntime": require("onnxruntime").__version__,
            "torch": torch.__version__}


def load_fold_onnx(fold_dir: str | os.PathLike[str], config: Any, *, device: str | torch.device = "cpu",
                   cache: bool = True, exporter: str = "torchscript") -> OnnxNetwork:
    """The ONNX Runtime network of one fold, exported from its checkpoint on first use when ``cache`` is True.

    ``fold_dir/network.onnx`` is used when its metadata names the current checkpoint's hash. Otherwise, with
    ``cache`` (a work folder) the checkpoint is exported and written there for next time (a read-only folder
    keeps the model in memory only); without it (a bundle) it is an error.

    Raises:
        ModelNotFoundError: no ``network.onnx`` and ``cache`` is False (the message names ``autoseg export --onnx``).
        OnnxBackendError: the file was exported from another checkpoint (or is damaged) and ``cache`` is False.
        OnnxUnavailableError: onnxruntime (or onnx, to export) is not installed.
    """
    require("onnxruntime")  # before any export work
    fold = Path(fold_dir)
    path = fold / ONNX_FILE
    expected = sha256(fold / FINAL)
    if path.is_file():
        try:
            net = OnnxNetwork(path, device=device)
        except OnnxBackendError:
            if not cache:
                raise
            net = None  # a damaged cache file is replaced
        if net is not None and net.metadata.get(_META_CHECKPOINT) == expected:
            return net
        if not cache:
            raise OnnxBackendError(f"{path}: exported from another checkpoint than {fold / FINAL}; export again with "
                                   "`autoseg export --workdir W -o BUNDLE --onnx`.")
    elif not cache:
        bundle = fold.parent.parent.parent
        raise ModelNotFoundError(f"{path}: this bundle has no ONNX networks, needed by --backend onnx. Export the "
                                 f"bundle with them: `autoseg export --workdir W -o {bundle} --overwrite --onnx` (or "
                                 "predict with --backend torch).")
    data = _fold_onnx(fold, config, exporter, verify=True)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError:  # a read-only work folder: use the export without caching it
        return OnnxNetwork(data, device=device)
    return OnnxNetwork(path, device=device)
