"""Which mixed precision a run really uses: bf16 autocast only pays on CPUs that do bf16 natively.

oneDNN runs bf16 convolutions and matmuls fast on CPUs with AVX-512 (and faster with AVX512-BF16 or
AMX); elsewhere (AVX2-only CPUs, e.g. many AMD EPYC cloud machines) it falls back to slow reference
kernels. Measured on such a machine: one fp32 training step of the bundled 1.6M-parameter UNet at
batch 128 takes 2.4 s, the same step under bf16 autocast 29 s. The shipped CPU accelerate config
asks for bf16, so a run that takes its precision from the config falls back to fp32 there.
"""

import os
from typing import Optional, Tuple

import torch
from accelerate.utils import parse_flag_from_env


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 natively (the CPU has the AVX-512 core set, AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # the private check moved: judge by the ISA torch dispatches to
        return "AVX512" in torch.backends.cpu.get_cpu_capability()


def runs_on_cpu() -> bool:
    """Whether accelerate will place this process on the CPU (no GPU, or `accelerate launch --cpu`)."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()  # as accelerate reads it


def resolve_mixed_precision(flag: Optional[str], on_cpu: bool, fast_bf16: bool,
                            configured: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """(mixed precision to give Accelerator, warning to log or None).

    ``flag`` is --mixed_precision (None: take the accelerate config's, ``configured``). bf16 on a CPU
    without fast bf16 is ~12x slower than fp32: taken from the config, it becomes fp32 with a warning;
    asked for explicitly with the flag, it is kept, with the same warning.
    """
    wanted = flag or configured
    if wanted != "bf16" or not on_cpu or fast_bf16:
        return flag, None
    slow = ("this CPU has no fast bf16 (oneDNN needs AVX-512, AVX512-BF16 or AMX; "
            f"torch dispatches to {torch.backends.cpu.get_cpu_capability()}), where bf16 autocast is about 12x slower than fp32")
    if flag == "bf16":
        return "bf16", f"--mixed_precision bf16 kept as asked, but {slow}: pass --mixed_precision no."
    return "no", f"the accelerate config asks for bf16, but {slow}: training in fp32 instead (--mixed_precision bf16 forces it)."


def configured_mixed_precision() -> Optional[str]:
    """The mixed precision `accelerate launch` passes on from its config file (None outside a launch)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION")
