"""Training, finetuning and evaluation of LLaMA models built from :mod:`modeling_llama`."""

import logging as _logging

# bitsandbytes (QLoRA) warns on every import on CPUs with AVX512-BF16 that an optional Hub kernel package is
# missing; it then uses its built-in kernels, so the message is noise for our entry points.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
