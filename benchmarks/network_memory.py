"""Compare the planner's memory estimate with the measured memory of one training step.

    python benchmarks/network_memory.py [--device cpu|cuda] [--large]

Plans a few hand-made fingerprints with ``plan_experiment`` (plus hand-made topologies), builds each
configuration's U-Net (deep supervision on) and runs one SGD step on a random batch with
``autoseg.networks.unet.measure_training_step``. One line per case: topology, patch, batch, the estimate,
the measured peak and measured / estimate, and the bytes autograd saved per feature-map element.

* CPU (default without a GPU): fp32, compared with ``BYTES_PER_ELEMENT_FP32`` / ``BYTES_PER_PARAMETER_FP32``;
  the peak is read from the profiler's allocation events.
* CUDA (default with a GPU): fp16 autocast, compared with the default (mixed-precision) factors; the peak
  is ``torch.cuda.max_memory_allocated``. Each case also runs in fp32 on the GPU (``fp32`` rows).

``--large`` adds full-size nnU-Net default plans (a 3D 128^3-class patch needs several GB and minutes on
CPU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from math import prod

import torch

from autoseg.fingerprint.model import CaseFingerprint, DatasetFingerprint, IntensityStats
from autoseg.networks.memory import (
    BYTES_PER_ELEMENT_FP32,
    BYTES_PER_PARAMETER_FP32,
    count_parameters,
    estimate_training_bytes,
    feature_map_elements,
)
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet, measure_training_step
from autoseg.planner.planner import plan_experiment

STATS = IntensityStats(mean=100.0, std=50.0, median=95.0, min=-1000.0, max=3000.0,
                       percentile_00_5=-900.0, percentile_99_5=1500.0)


def fingerprint(name: str, spacing: tuple[float, ...], shape: tuple[int, ...], n_cases: int, n_labels: int,
                is_2d: bool = False) -> DatasetFingerprint:
    """A dataset of identical cases."""
    cases = tuple(CaseFingerprint(case_id=f"case_{i:04d}", spacing=spacing, shape=shape, shape_after_crop=shape,
                                  class_voxels={0: 1}) for i in range(n_cases))
    labels = {"background": 0, **{f"class{k}": k for k in range(1, n_labels)}}
    return DatasetFingerprint(dataset_name=name, channel_names=("MRI",), labels=labels, num_training=n_cases,
                              is_2d=is_2d, cases=cases, intensity=(STATS,))


def hand_made() -> Iterator[tuple[str, UNetTopology, tuple[int, ...], int, int]]:
    """Small topologies the planner would not pick: residual 2D, anisotropic residual 3D."""
    yield ("hand residual 2d", UNetTopology(strides=((1, 1),) + ((2, 2),) * 4, kernel_sizes=((3, 3),) * 5,
                                            features_per_stage=(16, 32, 64, 128, 256), n_blocks_per_stage=(1, 2, 3, 4, 4),
                                            n_conv_per_stage_decoder=(1,) * 4, block="residual"), (256, 256), 4, 3)
    yield ("hand residual 3d aniso", UNetTopology(
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), kernel_sizes=((1, 3, 3),) * 2 + ((3, 3, 3),) * 2,
        features_per_stage=(16, 32, 64, 128), n_blocks_per_stage=(1, 2, 2, 2), n_conv_per_stage_decoder=(1,) * 3,
        block="residual"), (16, 96, 96), 2, 3)


def planned(large: bool) -> Iterator[tuple[str, UNetTopology, tuple[int, ...], int, int]]:
    """Configurations ``plan_experiment`` derives for a few hand-made datasets."""
    datasets = [("hippocampus", fingerprint("Hippo", (1.0, 1.0, 1.0), (36, 50, 35), 260, 3), "default"),
                ("brain-cpu", fingerprint("Brain", (1.0, 1.0, 1.0), (138, 169, 138), 100, 4), "cpu"),
                ("cardiac-cpu", fingerprint("Heart", (10.0, 1.5625, 1.5625), (9, 237, 256), 100, 4), "cpu")]
    if large:
        datasets.append(("brain-default", fingerprint("Brain", (1.0, 1.0, 1.0), (138, 169, 138), 100, 4), "default"))
    for label, fp, preset in datasets:
        plans = plan_experiment(fp, preset=preset)
        for config in plans.configurations.values():
            if config.name == "3d_cascade_fullres":
                continue
            yield (f"{label} {config.name}", config.topology, tuple(config.patch_size), config.batch_size,
                   len(fp.labels))


def summary(topo: UNetTopology) -> str:
    """E.g. ``plain 5st 32-320 s=[1,2,2,2,2]``."""
    feats = topo.features_per_stage
    strides = ",".join("".join(str(v) for v in s) for s in topo.strides)
    return f"{topo.block} {topo.n_stages}st {feats[0]}-{feats[-1]} s={strides}"


def run_case(name: str, topo: UNetTopology, patch: tuple[int, ...], batch: int, classes: int, device: str,
             amp: bool) -> str:
    """Measure one case and format its line."""
    torch.manual_seed(0)
    net = UNet(topo, in_channels=1, num_classes=classes)
    if amp:
        est = estimate_training_bytes(topo, patch, batch_size=batch, in_channels=1, num_classes=classes)
    else:
        est = estimate_training_bytes(topo, patch, batch_size=batch, in_channels=1, num_classes=classes,
                                      bytes_per_element=BYTES_PER_ELEMENT_FP32,
                                      bytes_per_parameter=BYTES_PER_PARAMETER_FP32)
    start = time.perf_counter()
    m = measure_training_step(net, patch, batch_size=batch, device=device, amp=amp)
    seconds = time.perf_counter() - start
    elements = feature_map_elements(topo, patch, num_classes=classes) * batch
    params = count_parameters(topo, in_channels=1, num_classes=classes)
    precision = ("fp16" if device.startswith("cuda") else "bf16") if amp else "fp32"
    del net
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return (f"{name:28s} {summary(topo):42s} patch={'x'.join(map(str, patch)):11s} batch={batch:<3d} "
            f"{precision} params={params / 1e6:6.2f}M est={est / 2**20:9.1f}MiB meas={m.peak_bytes / 2**20:9.1f}MiB "
            f"meas/est={m.peak_bytes / est:5.2f} saved={m.saved_bytes / elements:4.2f}B/el ({seconds:.1f}s)")


def main() -> None:
    """Parse arguments and print one line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--large", action="store_true", help="add full-size default plans (slow on CPU)")
    parser.add_argument("--amp", action="store_true", help="on CPU, also run bf16 autocast rows (isotropic kernels only)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, topo, patch, batch, classes in [*planned(args.large), *hand_made()]:
        if not cuda and prod(patch) * batch > 2**22 and not args.large:
            continue  # keep the default CPU run short
        aniso = any(len(set(k)) > 1 for k in topo.kernel_sizes)
        # bf16 autocast on CPU crashed (SIGSEGV in oneDNN, torch 2.13) on an anisotropic 3D plan: skip those
        modes = (True, False) if cuda else ((False, True) if args.amp and not aniso else (False,))
        for amp in modes:
            print(run_case(name, topo, patch, batch, classes, args.device, amp), flush=True)


if __name__ == "__main__":
    main()
