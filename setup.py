"""The optional native 4- and 8-bit kernels (lmforge/models/qkernel.c, qstep.c and fstep.c: a whole
decoding step; gelu.c: tanh-GELU for training; rowattn.c: attention over packed rows; attend32.c
and attend16.c: attention for training in float32 and bfloat16; rmsnorm.c: RMSNorm for training); everything else is in pyproject.toml.

They are optional: where they do not build (no C compiler), lmforge installs without them and
quantised layers use torch's own kernels (lmforge.models.qkernel.available() says which)."""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]  # Apple clang and MSVC: serial
setup(ext_modules=[Extension(
    "lmforge.models._qkernel", ["lmforge/models/qkernel.c", "lmforge/models/qstep.c", "lmforge/models/fstep.c",
                                "lmforge/models/gelu.c", "lmforge/models/rowattn.c",
                                "lmforge/models/attend32.c", "lmforge/models/attend16.c",
                                "lmforge/models/rmsnorm.c"],
    depends=["lmforge/models/qkernel.h", "lmforge/models/simd.h"],
    extra_compile_args=["-O3", "-std=c11", *openmp] if sys.platform != "win32" else ["/O2"],
    extra_link_args=openmp,
    optional=True,
)])
