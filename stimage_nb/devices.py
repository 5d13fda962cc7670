"""Where the tensors run, and the GPU fast paths: one home for the device policy.

- :func:`resolve_device`: ``"auto"`` -> CUDA when there is one, else the CPU.
- :func:`fast_paths`: whether bf16 autocast and the channels_last memory format apply on a device.
  They pay on CUDA (tensor cores, cuDNN's NHWC kernels) and are off on the CPU, so CPU results stay
  float32 everywhere (bf16 speed on a CPU depends on its instruction set). Setting the environment variable ``STIMAGE_NB_CPU_FAST_PATHS=1`` turns them on for the
  CPU too: the CPU then runs exactly the mixed-precision code a GPU runs (slowly), which is how the
  tests check that path on machines without a GPU.
- :func:`autocast`: the bf16 autocast context of a device, enabled by the policy above.
- :func:`synchronize`: wait for a device's queued work (timings).

Every training, prediction and benchmark path asks these functions, so a GPU and a CPU differ in
one place only.
"""

from __future__ import annotations

import os

import torch

from .errors import StimageInputError

CPU_FAST_PATHS_ENV = "STIMAGE_NB_CPU_FAST_PATHS"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; asking for CUDA without one is an input error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise StimageInputError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise StimageInputError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto.")
    return d


def fast_paths(device: str | torch.device) -> bool:
    """Whether bf16 autocast and channels_last apply on ``device`` (CUDA; the CPU only when
    ``STIMAGE_NB_CPU_FAST_PATHS=1``)."""
    d = torch.device(device)
    return d.type == "cuda" or (d.type == "cpu" and os.environ.get(CPU_FAST_PATHS_ENV, "") == "1")


def autocast(device: str | torch.device, enabled: bool = True):
    """bf16 autocast on ``device`` when ``enabled`` and the device's :func:`fast_paths` are on
    (a disabled context otherwise)."""
    d = torch.device(device)
    return torch.autocast(d.type, dtype=torch.bfloat16, enabled=bool(enabled) and fast_paths(d))


def channels_last(device: str | torch.device, enabled: bool = True) -> bool:
    """Whether to use the channels_last memory format on ``device``."""
    return bool(enabled) and fast_paths(device)


def synchronize(device: str | torch.device) -> None:
    """Wait until ``device`` has finished its queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
