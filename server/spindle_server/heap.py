"""What a shard asks of glibc's heap. Off glibc both are no-ops: that allocator decides."""

from __future__ import annotations

import ctypes

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def _glibc_call(name: str, *args: int) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


def single_malloc_arena() -> None:
    """Every thread allocates from glibc's main arena. The engine runs on its own thread (service.engine_thread),
    whose arena hands a large forward's activations back to the OS when they are freed and faults them in again
    on the next one: a 16 x 256-token bf16 prefill (SmolLM2-135M, 2 Sapphire Rapids cores) took 1.6 s for the
    first two and 0.88 s median on that thread against 0.77 s on the main thread; with one arena, 0.77 s on both.
    gRPC's threads allocate little, and the C++ kernels keep their per-thread scratch between calls (kScratchKeep in
    cpu_kernels.cpp), so OpenMP's threads do not queue on the shared arena's lock either."""
    _glibc_call("mallopt", M_ARENA_MAX, 1)


def return_freed_heap() -> None:
    """Hand the heap memory Warmup's largest activations freed back to the OS. glibc keeps freed blocks of a
    process that has freed large ones (its mmap threshold rises), so without this a shard's resident memory
    keeps Warmup's peak (over 250 MiB on SmolLM2-135M's shapes at 4096 rows) whether serving needs it or not."""
    _glibc_call("malloc_trim", 0)
