"""Freed memory kept for the next training step (glibc's malloc on Linux).

    keep_freed_memory()   once per process, before the first step

Each training step allocates its activations, their gradients and the optimizer's temporaries
afresh, up to hundreds of MB, and frees most of them by its end. glibc hands a freed block back
to the kernel when it came from mmap (blocks above a threshold that it raises on its own to at
most 32 MB) and trims the top of its heap once more than twice that threshold lies free there.
The next step then touches fresh pages: each one is a page fault, and the kernel zeroes it. On
the bench's models (`python -m bench train`, 2-core Zen 4 EPYC) that was 17,000-58,000 faults a
step (70-230 MB) and 33-130 ms of kernel time.

`keep_freed_memory` fixes the mmap threshold at its 32 MB maximum (blocks up to that size come
from the heap) and lets up to `KEEP` bytes lie free at the heap's top: afterwards the faults
were 0-1,400 a step and the kernel time 1-9 ms. Median step-time ratio over five alternating
pairs of processes (torch 2.13, 2 threads): GPT-2-like 6x384 1.05x in float32, 1.12x in
bfloat16; BERT-like 1.05x in bfloat16; T5-like 4+4x256 1.02x in float32, 1.01x in bfloat16.
The cost is resident memory: it stays near the step's peak between steps, instead of
shrinking and growing again.

Elsewhere (macOS, musl, Windows) it does nothing and says so by returning False. The setting is
process-wide: `lmforge.train.loop.train` makes it when it trains on CPU (a training run owns its
process); inference (embeddings, generation) faults far less and leaves malloc alone.
`LMFORGE_KEEP_MEMORY=0` turns it off (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

KEEP = 1 << 30  # bytes of free heap glibc may keep (M_TRIM_THRESHOLD)
MMAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (see the module's docstring). Returns whether the
    settings are in force: False without glibc, or with LMFORGE_KEEP_MEMORY=0. Once per process."""
    if os.environ.get("LMFORGE_KEEP_MEMORY", "1") != "0" and platform.system() == "Linux" \
            and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
        # mallopt returns 1 on success
        return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 \
            and libc.mallopt(_M_TRIM_THRESHOLD, KEEP) == 1
    return False
