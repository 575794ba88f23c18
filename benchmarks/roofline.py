"""How close a model runs to the machine's arithmetic ceiling: the work of one call, counted by
torch's own FlopCounterMode, and the speed of a large matrix product measured in the same run.

A speed ratio between two implementations of the same architecture is bounded by how far the slower
one sits below that ceiling: when both already run near it, no kernel choice can make one 1.3x faster
than the other; only less arithmetic (another architecture) or a faster number format (bf16) can.
"""

import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def flops_per_call(fn) -> int:
    """Floating-point operations (a multiply-add counts 2) of one ``fn()``: convolutions and matrix
    products forward and backward, which is where a UNet spends its arithmetic. Attention is counted through
    its math path (two batched products), because torch's counter has no formula for every fused CPU
    attention kernel; the arithmetic is the same whichever kernel runs."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):  # two warm-up calls (oneDNN builds its kernels on the first)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


@torch.no_grad()
def dense_peak_gflops(device: str, dtype: torch.dtype, repeats: int = 10) -> dict:
    """GFLOP/s of two large, efficient dense operations in this precision with the threads this process uses:
    a 2048-square matrix product and a 3x3 convolution of 256 channels at 16x16 (batch 32, channels-last).
    Their maximum is the practical ceiling. Both are measured because neither library wins everywhere: on AMD
    CPUs MKL's fp32 matrix product can trail oneDNN's convolutions, which pick their AVX-512 kernels themselves."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(32, 256, 16, 16, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    peaks = {"matmul": 2 * 2048**3 / median_seconds(lambda: a @ a, device, repeats) / 1e9,
             "conv3x3": flops_per_call(lambda: conv(x)) / median_seconds(lambda: conv(x), device, repeats) / 1e9}
    return {**peaks, "ceiling": max(peaks.values())}


# torch's CPU operators that do a UNet's dense arithmetic (oneDNN convolutions forward and backward, matrix
# products, fused attention); everything else (norms, activations, copies, the optimizer) is overhead around them
DENSE_OPERATORS = ("convolution", "mm", "scaled_dot_product")


def dense_kernel_share(fn, calls: int = 2) -> float:
    """The share of ``fn()``'s CPU time spent inside dense-arithmetic operators (self time, profiled over
    ``calls`` calls). Its inverse bounds what any rewrite of the rest can buy: a model that calls the same
    kernels with the same shapes cannot run more than 1/share times faster than this one."""
    events = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            fn()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    dense = sum(event.self_cpu_time_total for event in events
                if event.key.startswith("aten::") and any(name in event.key for name in DENSE_OPERATORS))
    return dense / total
