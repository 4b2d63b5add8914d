"""Training, finetuning and evaluation of LLaMA models built from :mod:`modeling_llama`."""

import logging as _logging

# bitsandbytes (QLoRA) warns on every import on CPUs with AVX512-BF16 that an optional Hub kernel package is
# missing; it then uses its built-in kernels, so the message is noise for our entry points.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# Before anything imports torch: let MKL (torch's float32 BLAS) use its fast kernels on AMD CPUs (see mkl_amd).
from training import mkl_amd as _mkl_amd  # noqa: E402

_mkl_amd.enable()
