"""mmap/munmap/madvise through ctypes (with errno), shared by the lab's measurements and its agents.

Standard library only: the real-kernel agents (:mod:`thpcow.lab._agent`) import it in a fresh
interpreter that must start fast.
"""

from __future__ import annotations

import ctypes


class Libc:
    """The C library's mmap, munmap and madvise, typed."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.lib = lib
        self.mmap = lib.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.munmap = lib.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.madvise = lib.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
