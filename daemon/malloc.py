"""glibc's heap, told to hand back the free pages a reconcile leaves behind. A no-op where the
C library is not glibc."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # glibc only: musl lacks it
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the heap's free pages to the kernel; True when some were."""
    return bool(_TRIM(0)) if _TRIM is not None else False
