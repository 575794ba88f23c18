"""Our UNet against diffusers' UNet2DModel at the same parameter count, resolution and attention
placement, side by side in one run, reported as ratios.

    python benchmarks/bench_unet.py [--quick] [--compile] [--device cpu|cuda] [--out benchmarks/results-cpu.json]

Measures training images/s (fp32 and bf16 autocast, batch 64 and 128), sampling image-steps/s
(batch 1, 16, 256), wall time for 16 images in 25 DDIM steps through the full pipeline, and peak
memory. The machines are shared and noisy: each measurement alternates the two models and takes
the median of several repeats. Each row also says how close each model runs to the machine's arithmetic
ceiling (GFLOP/s against large dense operations in the same precision, measured in the same run) and, on CPU,
what share of its time goes to the dense kernels (convolutions, matrix products, attention), which bounds what
any change to the rest could buy (roofline.py).
With --compile, each row also times both models under torch.compile
(inductor) in the same run, so the table says what compilation buys each of them and the ratio between
the compiled pair.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import UNet2DModel  # noqa: E402

from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomScheduler, DDPMCustomUNet  # noqa: E402
from pipeline_ddpm_custom.losses import training_losses  # noqa: E402
from training.atomic_files import write_json_atomically  # noqa: E402
from training.precision import cpu_has_fast_bf16  # noqa: E402

from roofline import dense_kernel_share, dense_peak_gflops, flops_per_call  # noqa: E402

# the bundled model's architecture (models/ddpm-fashion-mnist/unet/config.json)
OURS = dict(sample_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
            attention_resolutions=(7,), attention_head_dim=32, norm_num_groups=16)
# diffusers' UNet2DModel with the same levels, widths, blocks per level and attention placement
PEER = dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=32)


def params(model):
    return sum(p.numel() for p in model.parameters())


def make_models(device, channels_last):
    torch.manual_seed(0)
    ours, peer = DDPMCustomUNet(**OURS).to(device), UNet2DModel(**PEER).to(device)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    return {"ours": ours, "diffusers": peer}


def add_compiled(models):
    """Adds a torch.compile'd twin of each model (sharing its weights). Inductor's freezing folds the weights
    into no-grad graphs as constants, which is where a CPU gains at sampling; it does not touch training graphs.
    dynamic=False gives each batch size, precision and mode its own specialised graph, hence the raised limit."""
    import torch._dynamo.config
    import torch._inductor.config

    torch._inductor.config.freezing = True
    torch._dynamo.config.recompile_limit = 64
    return {**models, **{f"{name} compiled": torch.compile(model, dynamic=False) for name, model in models.items()}}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """(median seconds of ``fn`` over ``repeats`` calls, seconds of the warm-up call before them, which include
    any compilation)."""
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def training_step_fn(model, device, batch, bf16):
    scheduler = DDPMCustomScheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    model.train()

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = training_losses(model, scheduler, x0, t).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def inference_fn(model, device, batch, bf16, steps=5):
    x = torch.randn(batch, 1, 28, 28, device=device)
    model.eval()

    @torch.no_grad()
    def run():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            for t in range(steps):
                model(x, torch.full((batch,), 999 - t, device=device)).sample
    return run, steps


def peak_memory_mb(name, device, batch, repeats=5):
    """Peak memory of an fp32 training step at ``batch`` above the model's weights: the CUDA allocator's
    peak, or on CPU the median over ``repeats`` fresh processes of the growth of peak RSS over the first step (one
    process per measurement, so that neither model is charged with the other's allocations or allocator state)."""
    if device == "cuda":
        step = training_step_fn(make_models(device, channels_last=False)[name], device, batch, False)
        step()  # optimizer state allocated: we measure a steady-state step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # RSS growth varies by 10-25% between identical processes (allocator and thread-pool timing)
    samples = []
    for _ in range(repeats):
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", name, str(batch)],
                               capture_output=True, text=True, check=True)
        samples.append(float(child.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


def memory_status_mb(field):
    """A VmRSS/VmHWM line of /proc/self/status in MB. Unlike getrusage's ru_maxrss, which a child started
    by fork/vfork + exec inherits from its parent (Linux keeps the larger of the two), VmHWM belongs to
    this process's own address space, so a parent holding gigabytes cannot mask the child's growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory on CPU needs Linux")


def memory_child(name, batch):
    """Runs in its own process: peak RSS over the first training step above the RSS before it (activations,
    gradients, Adam's state); a later step cannot be measured because RSS peaks never come down."""
    step = training_step_fn(make_models("cpu", channels_last=False)[name], "cpu", batch, False)
    before = memory_status_mb("VmRSS")
    try:  # reset VmHWM to the current RSS (Linux >= 4.0), so earlier transient peaks (imports) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM also holds the setup's peak, and the growth can only be under-counted
    step()
    print(memory_status_mb("VmHWM") - before)


def default_precisions(device) -> list:
    """Both, except on a CPU without fast bf16 (AVX2 only), where bf16 autocast runs about 12x slower than fp32 and
    neither the training script nor the pipeline uses it: its rows would take most of the run and say nothing."""
    if device == "cpu" and not cpu_has_fast_bf16():
        print(f"This CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast bf16: timing the fp32 rows only "
              "(--precisions fp32 bf16 times both)", flush=True)
        return ["fp32"]
    return ["fp32", "bf16"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="batch 64 training, batch 1 and 16 sampling, and 2 repeats unless --repeats is given")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile (inductor, with freezing) in the same run")
    parser.add_argument("--only", choices=["all", "memory"], default="all", help="memory: only the peak-memory rows")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="which rows to time (default both, or fp32 alone on a CPU without fast bf16, where bf16 "
                             "autocast is about 12x slower and neither training nor sampling uses it)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats}): each row is the median of that many timed calls")
    device, repeats = args.device, args.repeats or (2 if args.quick else 5)
    precisions = args.precisions or default_precisions(device)
    autocast_modes = [precision == "bf16" for precision in precisions]  # bf16 autocast off, on
    torch.backends.cudnn.benchmark = True
    models = make_models(device, channels_last=False)
    eager_names = list(models)
    results = {"compiled": args.compile, "device": device, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if device == "cuda" else None,
               # the bf16 rows depend on it: without fast bf16 (AVX2-only CPUs) autocast is ~12x slower than fp32
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_fast_bf16": cpu_has_fast_bf16(),
               "params": {k: params(m) for k, m in models.items()}, "precisions": precisions, "rows": []}
    if args.only == "all":
        # the arithmetic of one image (training step) and one image-step (sampling), counted on the eager models
        # (a compiled twin does the same arithmetic), and the machine's ceiling for it in each precision
        results["gflop_per_image"] = {
            name: {"train": flops_per_call(training_step_fn(model, device, 4, False)) / 4e9,
                   "sample": flops_per_call(inference_fn(model, device, 4, False, steps=1)[0]) / 4e9}
            for name, model in models.items()}
        results["peak_gflops"] = {name: dense_peak_gflops(device, torch.float32 if name == "fp32" else torch.bfloat16)
                                  for name in precisions}
        print(f"GFLOP per image: {results['gflop_per_image']}; dense peak GFLOP/s: {results['peak_gflops']}")
    if args.compile:
        models = add_compiled(models)
    print(f"parameters: ours {results['params']['ours']:,}  diffusers {results['params']['diffusers']:,}")

    def compare(label, make, unit, per_call):
        row = {"what": label, "unit": unit}
        mode, precision = label.split()[:2]
        peak = results["peak_gflops"][precision]["ceiling"]
        for name, model in models.items():
            seconds, first_call_seconds = timed(make(model), device, repeats)
            row[name] = per_call / seconds
            row[f"{name} GFLOP/s"] = row[name] * results["gflop_per_image"][name.removesuffix(" compiled")][mode]
            row[f"{name} fraction of peak"] = row[f"{name} GFLOP/s"] / peak
            if name.endswith("compiled"):
                row[f"{name} first call seconds"] = first_call_seconds  # mostly compilation
        row["ratio"] = row["ours"] / row["diffusers"]
        line = (f"{label:<24} ours {row['ours']:>7.1f}  diffusers {row['diffusers']:>7.1f} {unit}  ratio {row['ratio']:.2f}x"
                f"  ({row['ours fraction of peak']:.0%} and {row['diffusers fraction of peak']:.0%} of peak)")
        if device == "cpu":
            for name in eager_names:
                row[f"{name} dense share"] = dense_kernel_share(make(models[name]))
            # the most any model calling diffusers' kernels with its shapes could gain: none of the rest left
            row["ratio bound at the same kernels"] = 1 / row["diffusers dense share"]
            line += (f"  dense kernels {row['ours dense share']:.0%} and {row['diffusers dense share']:.0%}"
                     f" of the time: bound {row['ratio bound at the same kernels']:.2f}x")
        if args.compile:
            row["ratio compiled"] = row["ours compiled"] / row["diffusers compiled"]
            for name in eager_names:
                row[f"compile gain {name}"] = row[f"{name} compiled"] / row[name]
            line += (f" | compiled: ours {row['ours compiled']:>7.1f}  diffusers {row['diffusers compiled']:>7.1f}"
                     f"  ratio {row['ratio compiled']:.2f}x")
        results["rows"].append(row)
        print(line, flush=True)

    train_batches = [64] if args.quick else [64, 128]
    infer_batches = [1, 16] if args.quick else [1, 16, 256]
    if args.only == "memory":
        train_batches, infer_batches = [], []
    for bf16 in autocast_modes:
        for batch in train_batches:
            compare(f"train {'bf16' if bf16 else 'fp32'} batch {batch}", lambda m: training_step_fn(m, device, batch, bf16),
                    "images/s", batch)
    for bf16 in autocast_modes:
        for batch in infer_batches:
            compare(f"sample {'bf16' if bf16 else 'fp32'} batch {batch}",
                    lambda m: inference_fn(m, device, batch, bf16)[0], "image-steps/s", batch * 5)

    # the user-facing number: 16 images, 25 DDIM steps, through the pipeline
    for name, model in models.items() if args.only == "all" else ():
        pipe = DDPMCustomPipeline(unet=model, scheduler=DDPMCustomScheduler())
        pipe.set_progress_bar_config(disable=True)
        for bf16 in autocast_modes:
            def run():
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                    pipe(batch_size=16, num_inference_steps=25, eta=0.0, output_type="np")
            seconds, _ = timed(run, device, repeats)
            results.setdefault("pipeline_16x25_seconds", {})[f"{name} {'bf16' if bf16 else 'fp32'}"] = seconds
            print(f"16 images x 25 steps, {name} {'bf16' if bf16 else 'fp32'}: {seconds:.2f} s", flush=True)

    for name in eager_names:
        results.setdefault("peak_memory_mb", {})[f"{name} train fp32 batch 128"] = peak_memory_mb(name, device, 128, repeats)
    print("peak memory (MB):", results["peak_memory_mb"], flush=True)
    if args.out:
        write_json_atomically(args.out, results)
    return results


if __name__ == "__main__":
    main()
