"""Sizes too large for memory, found before they crash: estimates and one-line errors.

A model is first built on PyTorch's ``meta`` device, which allocates nothing, to
count its parameters; training keeps four tensors of that size (the parameters,
their gradients and Adam's two moments), which must fit in the memory the device
has free. Whatever still fails to allocate becomes a :class:`PyroVAEError`
naming what was too large, instead of the allocator's traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

import torch

from ..errors import PyroVAEError

TENSORS_PER_PARAMETER = 4
"""Parameter, gradient and Adam's two moments."""


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``, or None where it cannot be told.

    The CPU: what the OS reports as available, or less where a control group (a
    container's memory limit, cgroup v2) leaves less.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = limit - used if free is None else min(free, limit - used)
    return free


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    """A number from a control-group file (``max`` and missing files: None)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _virtual_bytes() -> int | None:
    """This process's virtual memory size (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def limited_to_free_memory() -> Iterator[None]:
    """Inside the block, an allocation beyond the memory the OS has free fails at once.

    The address space is capped (``RLIMIT_AS``) at its size now plus what is free, so a
    huge allocation raises instead of being granted lazily and then ending the process
    in the kernel's out-of-memory killer. The limit holds for the whole process while
    the block runs (other threads too), so keep the block short: building a model.
    Where that is not possible (not Linux, or a tighter limit already set), the block
    runs unchanged.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used, free = _virtual_bytes(), available_bytes(torch.device("cpu"))
    if used is None or free is None:
        yield
        return
    limit = used + free
    if (
        soft != resource.RLIM_INFINITY
        and soft <= limit
        or (hard != resource.RLIM_INFINITY and limit > hard)
    ):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CPU or GPU)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


@contextlib.contextmanager
def too_large(what: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into our error, saying ``what`` was too large."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise PyroVAEError(f"{what} does not fit in memory ({_first_line(e)})") from None


def describe_out_of_memory(error: BaseException) -> str:
    """One line for an allocation failure nobody caught closer to its cause."""
    return f"out of memory ({_first_line(error)}); try a smaller batch, --particles or model"


def _first_line(error: BaseException) -> str:
    """What the allocator said, shortly: how much it was asked for, where it says so."""
    text = str(error)
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    if asked:
        return f"{int(asked.group(1)) / 1e9:,.1f} GB asked for at once"
    asked = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", text)
    if asked:
        return asked.group(0).replace("Tried", "tried")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:160] if lines else type(error).__name__


def check_model_fits(build: Callable[[], torch.nn.Module], device: torch.device, what: str):
    """Refuse a model whose training state would not fit in ``device``'s free memory.

    ``build`` runs on the meta device; components that cannot be built there (Pyro's
    autoregressive flows read values while they are built) skip the estimate, and
    their real allocation is guarded by :func:`too_large` instead.
    """
    try:
        with torch.device("meta"):
            model = build()
    except PyroVAEError:
        raise
    except Exception:
        return
    count = sum(p.numel() for p in model.parameters())
    need = TENSORS_PER_PARAMETER * sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_bytes(device)
    if free is not None and need > free:
        raise PyroVAEError(
            f"{what} has {count:,} parameters: training needs about {_gigabytes(need)}, "
            f"and {device} has {_gigabytes(free)} free"
        )
