"""Which device a run uses: ``cpu``, ``cuda[:N]`` or ``auto``; how its CPU treats denormals."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

from ..errors import PyroVAEError


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda[:N]``, or ``auto`` (a GPU when there is one)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyroVAEError(f"--device {name} asked for, but no CUDA GPU is available; use cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PyroVAEError(
            f"unknown device {name!r}; choose from: cpu, cuda, cuda:N, auto"
        ) from None


def flushing_denormals() -> bool:
    """Whether the CPU now flushes subnormal floats to zero, on this thread and on each
    of torch's intra-op threads (a product large enough to be split among them)."""
    small = torch.full((1 << 17,) if torch.get_num_threads() > 1 else (1,), 1e-30)
    return not bool((small * 1e-9).count_nonzero())  # 1e-39, below float32's 1.2e-38


def set_flush_denormal(flush: bool) -> bool:
    """``torch.set_flush_denormal`` on this thread and on every thread of torch's OpenMP
    pool; False where the CPU has no such mode.

    ``torch.set_flush_denormal`` sets the calling thread's mode only, and threads take
    it from the thread that starts them: once torch's pool has started, its workers keep
    theirs, and half of a 2-thread elementwise op still ran through subnormals. So the
    mode is also set inside one OpenMP parallel region of the pool's own runtime
    (found among the loaded libraries, Linux), a thread at a time.
    """
    if not torch.set_flush_denormal(flush):
        return False
    gomp = _torch_libgomp()
    if gomp is not None and torch.get_num_threads() > 1:
        gomp.GOMP_parallel(_SET_MODE[flush], None, torch.get_num_threads(), 0)
    return True


_PARALLEL_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_SET_MODE = {
    flush: _PARALLEL_BODY(lambda _, flush=flush: torch.set_flush_denormal(flush))
    for flush in (True, False)
}


@functools.cache
def _torch_libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs its intra-op threads on (GNU's, or Intel's, which
    implements GNU's entry points), or None (another system)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            gomp = ctypes.CDLL(path)
            gomp.GOMP_parallel.argtypes = [
                _PARALLEL_BODY,
                ctypes.c_void_p,
                ctypes.c_uint,
                ctypes.c_uint,
            ]
        except (OSError, AttributeError):
            continue
        return gomp
    return None


@contextlib.contextmanager
def denormals(mode: str, device: torch.device) -> Iterator[None]:
    """Within: on the CPU, ``"flush"`` sets flush-to-zero and denormals-are-zero on every
    thread torch computes on (:func:`set_flush_denormal`); ``"keep"``, or another device,
    changes nothing. The mode before is restored after.

    IEEE subnormals (magnitudes below 1.2e-38 in float32) take a slow path through x86
    CPUs. Training makes them: Adam's running moments of a weight whose gradient is
    mostly zero (from a pixel that is nearly always off) decay through them. An M2
    epoch on MNIST at lr 1e-2 slowed from 18 s to 141 s by its tenth; with them flushed
    it took 17 s, with the same validation and test accuracy and a train loss equal to
    9 digits (docs/PERFORMANCE.md).
    """
    if mode != "flush" or device.type != "cpu":
        yield
        return
    before = flushing_denormals()
    if not set_flush_denormal(True):  # a CPU without the FTZ/DAZ modes
        yield
        return
    try:
        yield
    finally:
        set_flush_denormal(before)
