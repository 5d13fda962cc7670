"""Where the tensors run, and the GPU fast paths: one home for the device policy.

- :func:`resolve_device`: ``"auto"`` -> CUDA when there is one, else the CPU.
- :func:`fast_paths`: whether bf16 autocast and the channels_last memory format apply on a device.
  They pay on CUDA (tensor cores, cuDNN's NHWC kernels) and are off on the CPU, so CPU results stay
  float32 everywhere (bf16 speed on a CPU depends on its instruction set). Setting the environment
  variable ``STIMAGE_NB_CPU_FAST_PATHS=1`` turns them on for the CPU too: the CPU then runs exactly
  the mixed-precision code a GPU runs, which is how the tests check that path without a GPU.
- :func:`autocast`: the bf16 autocast context of a device, enabled by the policy above.
- :func:`synchronize`: wait for a device's queued work (timings).
- :func:`for_batches`: run a function over ``[0, n)`` in batches, retrying a batch that does not fit
  in the device's memory at half the size (prediction and feature extraction use it; training, whose
  results depend on the batch size, stops instead with a message that names the fix).

Every training, prediction and benchmark path asks these functions, so a GPU and a CPU differ in
one place only.
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import StimageInputError

log = logging.getLogger(__name__)

CPU_FAST_PATHS_ENV = "STIMAGE_NB_CPU_FAST_PATHS"
#: What running out of device memory raises (``torch.OutOfMemoryError`` since torch 2.5).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


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


def free_memory(device: str | torch.device) -> None:
    """Return the cached blocks of a CUDA device to the driver (after an out-of-memory error)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def halve_batch_after_oom(batch_size: int, device: str | torch.device, what: str) -> int:
    """The batch size to retry with after ``device`` ran out of memory on ``batch_size`` items.

    Call it outside the ``except`` clause (the failed batch's tensors are then freed). A batch of one
    that does not fit is an input error: the model is too large for the device.
    """
    free_memory(device)
    if batch_size <= 1:
        raise StimageInputError(f"{what}: one tile does not fit in the memory of {device}; use a smaller model "
                                "or tiles (out_px), or --device cpu.")
    new = max(1, batch_size // 2)
    log.warning("%s: out of memory on %s with batches of %d; retrying with %d", what, device, batch_size, new)
    return new


def for_batches(fn, n: int, batch_size: int, device: str | torch.device, what: str, progress=None) -> None:
    """Call ``fn(start, stop)`` for consecutive batches covering ``[0, n)``.

    A batch that runs out of device memory is retried at half the size (:func:`halve_batch_after_oom`)
    and later batches keep the smaller size. ``progress``: a tqdm-like bar, advanced by each batch.
    """
    i, bs = 0, max(1, int(batch_size))
    while i < n:
        stop = min(n, i + bs)
        try:
            fn(i, stop)
            failed = False
        except OUT_OF_MEMORY:
            failed = True
        if failed:  # handled outside the except clause, so the failed batch's tensors can be freed
            bs = halve_batch_after_oom(bs, device, what)
            continue
        if progress is not None:
            progress.update(stop - i)
        i = stop
