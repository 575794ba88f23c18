"""Does one training recipe learn the same on each device? The H100 runs of the 6.5M model stalled at a loss the
same recipe leaves behind on a CPU within 200 steps (docs/bundled-model.md, "A larger model on the H100"); this script is the test
that narrows down why, one device-specific piece at a time.

    python benchmarks/training_by_device.py --devices cpu cuda --steps 300 --out benchmarks/results/training-by-device.json

First, the model's arithmetic alone: one step from the same weights and inputs, its gradients compared with a float64
reference computed on the CPU, per device and, on CUDA, per kernel setting (cuDNN in fp32, cuDNN with TF32 as
training runs it, torch's own kernels, float64); pytorch/pytorch#150700 reports cuDNN on H100s giving gradient norms
far from the CPU's. Then the optimizer alone: the same sequence of gradients fed to AdamW with clipping on every
device (CUDA takes the `foreach` kernels, the CPU the per-tensor loop). Then `--steps` optimizer steps of
train_ddpm.py's training step (its `draw_step_inputs`, same data order and per-step seeds, AdamW, gradient
clipping; no accelerate, no EMA) per device and variant, reporting the mean loss of each third of the run. Variants other than `default` change one thing
on CUDA and are skipped on other devices; those that draw their random numbers on the CPU (`cpu_draws`, `as_cpu`, `fp64`) see
exactly the CPU run's noise, timesteps and data, so the step at which their loss parts from the CPU run's is reported
(list `cpu` first).
"""

import argparse
import contextlib
import os
import shlex
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_ddpm_custom.losses import training_losses  # noqa: E402
from training import data  # noqa: E402
from training.atomic_files import write_json_atomically  # noqa: E402
from training.train_ddpm import build_noise_scheduler, build_unet, draw_step_inputs, step_seed  # noqa: E402
from training.train_ddpm import parse_args as training_args  # noqa: E402

# the 6.5M model of the H100 runs
MODEL_FLAGS = ("--base_channels 64 --channel_mult 1,2,2 --num_res_blocks 2 --attention_resolutions 7 "
               "--prediction_type v_prediction --beta_schedule linear --class_conditional")
VARIANTS = {
    "default": "the training step as train_ddpm.py runs it (cuDNN convolutions in TF32, torch's default)",
    "no_tf32": "cuDNN convolutions in full fp32 (torch.backends.cudnn.allow_tf32 = False)",
    "no_cudnn": "torch's own convolution kernels instead of cuDNN",
    "cpu_draws": "noise, timesteps and label drops drawn on the CPU, then moved to the device",
    "no_reseed": "one seed for the whole run instead of train_ddpm.py's seed per step",
    "as_cpu": "the CPU's random draws and full-fp32 convolutions: the same numbers as the CPU run, up to rounding",
    "fp64": "the CPU's random draws, the whole step in float64: rounding ruled out, so a stall here is a kernel's logic",
    "math_sdpa": "attention through SDPA's plain math kernel instead of the flash / memory-efficient ones",
    "no_foreach": "AdamW and gradient clipping without the foreach kernels (CUDA's default), as on the CPU",
}
# variants whose random draws are the CPU run's, so that their per-step losses can be compared with it step by step
CPU_DRAWS = ("cpu_draws", "as_cpu", "fp64")
# the kernel settings of the one-step gradient check on CUDA (the CPU has one: fp32)
GRADIENT_SETTINGS = ("fp32", "tf32", "no_cudnn", "fp64")


@contextlib.contextmanager
def backend_flags(variant: str):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled
    torch.backends.cudnn.allow_tf32 = variant not in ("no_tf32", "as_cpu", "fp32")
    torch.backends.cudnn.enabled = variant != "no_cudnn"
    try:
        if variant == "math_sdpa":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled = saved


class InDtype(torch.nn.Module):
    """The UNet run in another dtype (float64): training_losses forms x_t in float32, so the input is cast on the way in."""

    def __init__(self, unet, dtype):
        super().__init__()
        self.unet = unet.to(dtype)
        self.dtype = dtype

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample.to(self.dtype), timestep, class_labels=class_labels)


def nudged_unet(model_args, channels: int, classes):
    """Seed-0 weights with every parameter nudged: the UNet zero-initialises its output convolution, the residual
    blocks' second convolutions and the attention projections, so from fresh weights only the output layer would get
    a gradient and a check would test nothing behind it."""
    torch.manual_seed(0)
    unet = build_unet(model_args, channels, classes)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return unet


def one_step(model_args, scheduler, batch, device: str, setting: str = "fp32") -> tuple:
    """Loss and gradients (float64, on the CPU) of one step from the nudged weights, under a kernel `setting`:
    fp32 (TF32 off), tf32 (cuDNN's default, as training runs), no_cudnn, or fp64 (the whole model in float64)."""
    unet = nudged_unet(model_args, batch["channels"], batch["classes"])
    model = InDtype(unet, torch.float64) if setting == "fp64" else unet
    model = model.to(device).train()
    with backend_flags(setting):
        loss = training_losses(model, scheduler, batch["x0"].to(device), batch["t"].to(device), noise=batch["noise"].to(device),
                               class_labels=None if batch["labels"] is None else batch["labels"].to(device)).mean()
        loss.backward()
    return loss.item(), {name: p.grad.double().cpu() for name, p in unet.named_parameters() if p.grad is not None}


def compare_gradients(grads: dict, reference: dict) -> dict:
    """Relative L2 difference per parameter against the reference, the worst five, and the ratio of total norms.
    A parameter whose gradient vanishes analytically (a bias followed by a GroupNorm of one channel per group)
    is measured against 1e-4 of the total gradient norm instead of its own, which is rounding noise."""
    total = lambda gs: float(torch.stack([g.norm() for g in gs.values()]).norm())  # noqa: E731
    floor = 1e-4 * total(reference)
    differences = {n: float((grads[n] - g).norm() / g.norm().clamp_min(floor)) for n, g in reference.items()}
    worst = sorted(differences, key=differences.get, reverse=True)[:5]
    return {"worst_relative_grad_difference": differences[worst[0]], "worst_parameters": [[n, differences[n]] for n in worst],
            "grad_norm_ratio": total(grads) / total(reference), "parameters": len(differences),
            "parameters_without_gradient": sum(1 for g in reference.values() if g.norm() == 0)}


def optimizer_check(model_args, channels: int, classes, grads: dict, device: str, steps: int = 20) -> list:
    """Parameters (float64, on the CPU) after `steps` AdamW steps with clipping, fed the same gradient sequence
    (the reference gradients, each step scaled per tensor by a fixed random factor) on `device`."""
    unet = nudged_unet(model_args, channels, classes).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(model_args.adam_beta1, model_args.adam_beta2),
                                  weight_decay=model_args.adam_weight_decay)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for name, p in unet.named_parameters():
            p.grad = (grads[name] * (0.5 + torch.rand((), generator=generator, dtype=torch.float64))).float().to(device)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), model_args.max_grad_norm)
        optimizer.step()
    return [p.detach().double().cpu() for p in unet.parameters()]


def train(model_args, scheduler, dataset, channels: int, classes, device: str, variant: str, steps: int, batch_size: int,
          lr: float) -> list:
    """Per-step losses of `steps` steps of train_ddpm.py's training step."""
    torch.manual_seed(0)
    unet = build_unet(model_args, channels, classes)
    model = InDtype(unet, torch.float64) if variant == "fp64" else unet
    model = model.to(device).train()
    foreach = False if variant == "no_foreach" else None  # None: torch's default for the device
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(model_args.adam_beta1, model_args.adam_beta2),
                                  weight_decay=model_args.adam_weight_decay, foreach=foreach)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=data.collate, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    draw_on = "cpu" if variant in CPU_DRAWS else device
    losses = []
    with backend_flags(variant):
        while len(losses) < steps:
            for batch in loader:
                if len(losses) == steps:
                    break
                if variant != "no_reseed":
                    torch.manual_seed(step_seed(0, len(losses), 0))
                labels = batch.get("labels")
                x0, noise, timesteps, labels, input_noise = draw_step_inputs(batch["pixel_values"].float().to(device),
                                                                None if labels is None else labels.to(device),
                                                                model_args, classes, draw_on)
                loss = training_losses(model, scheduler, x0, timesteps, noise=noise, class_labels=labels,
                                       input_noise=input_noise).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), model_args.max_grad_norm, foreach=foreach)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
    return losses


def first_divergence(losses: list, reference: list, tolerance: float = 1e-3):
    """The first step whose loss differs from the reference run's by more than `tolerance` (relative), or None."""
    return next((i for i, (a, b) in enumerate(zip(losses, reference)) if abs(a - b) > tolerance * abs(b)), None)


def thirds(losses: list) -> list:
    n = len(losses) // 3 or 1
    return [round(sum(part) / len(part), 4) for part in (losses[:n], losses[n:2 * n], losses[2 * n:]) if part]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--model-flags", default=MODEL_FLAGS, help="train_ddpm.py's model and diffusion flags")
    parser.add_argument("--train-data-dir", default=None, help="an image folder instead of Fashion-MNIST")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    for device in args.devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--devices names {device}, but torch sees no CUDA device here: drop it, or run on a GPU machine.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    model_args = training_args(["--output_dir", "unused"] + shlex.split(args.model_flags))
    scheduler = build_noise_scheduler(model_args)
    dataset = data.load_training_dataset(None, args.train_data_dir)
    image_column, label_column = data.pick_columns(dataset, None, None, model_args.class_conditional)
    classes = data.num_classes(dataset, label_column) if model_args.class_conditional else None
    channels = data.image_channels(dataset, image_column)
    dataset.set_transform(data.make_transform(image_column, label_column, model_args.resolution, channels))

    first = data.collate([dataset[i] for i in range(min(32, len(dataset)))])
    generator = torch.Generator().manual_seed(1)
    batch = {"x0": first["pixel_values"].float(), "labels": first.get("labels"), "channels": channels, "classes": classes,
             "noise": torch.randn(first["pixel_values"].shape, generator=generator),
             "t": torch.randint(0, scheduler.config.num_train_timesteps, (len(first["pixel_values"]),), generator=generator)}
    results = {"setup": {k: v for k, v in vars(args).items() if k != "out"}, "gradient_check": [], "optimizer_check": []}
    results["runs"] = []
    # the truth to compare with: the same step in float64 on the CPU
    reference_loss, reference = one_step(model_args, scheduler, batch, "cpu", "fp64")
    for device in args.devices:
        for setting in GRADIENT_SETTINGS if device.startswith("cuda") else ("fp32",):
            loss, grads = one_step(model_args, scheduler, batch, device, setting)
            entry = {"device": device, "setting": setting, "loss": loss, "loss_fp64_cpu": reference_loss,
                     **compare_gradients(grads, reference)}
            results["gradient_check"].append(entry)
            print(f"one step on {device} ({setting}): loss {loss:.6f} (fp64 CPU {reference_loss:.6f}), gradient norm "
                  f"{entry['grad_norm_ratio']:.4f}x the reference's, worst parameters "
                  + ", ".join(f"{n} {d:.1e}" for n, d in entry["worst_parameters"][:3]), flush=True)
    reference_params = None
    for device in args.devices:
        params = optimizer_check(model_args, channels, classes, reference, device)
        if reference_params is None:
            reference_params = params
        difference = max(float((p - r).norm() / r.norm().clamp_min(1e-30)) for p, r in zip(params, reference_params))
        results["optimizer_check"].append({"device": device, "worst_relative_param_difference": difference,
                                           "against": args.devices[0]})
        print(f"AdamW + clipping on {device}: parameters within {difference:.1e} of {args.devices[0]}'s after 20 steps", flush=True)
    if args.out:
        write_json_atomically(args.out, results)

    cpu_losses = None
    for device in args.devices:
        for variant in args.variants:
            if variant != "default" and not device.startswith("cuda"):
                continue
            start = time.time()
            losses = train(model_args, scheduler, dataset, channels, classes, device, variant, args.steps, args.batch_size, args.learning_rate)
            run = {"device": device, "variant": variant, "what": VARIANTS[variant], "steps": args.steps,
                   "mean_loss_by_third": thirds(losses), "first_losses": [round(x, 6) for x in losses[:50]],
                   "seconds": round(time.time() - start, 1)}
            if device == "cpu" and variant == "default":
                cpu_losses = losses
            if cpu_losses is not None and device != "cpu" and variant in CPU_DRAWS:
                # same draws and data as the CPU run: where the two part is where the devices' arithmetic does
                run["parts_from_cpu_run_at_step"] = first_divergence(losses, cpu_losses)
            results["runs"].append(run)
            parts = f", parts from the CPU run at step {run['parts_from_cpu_run_at_step']}" if "parts_from_cpu_run_at_step" in run else ""
            print(f"{device:>6} {variant:>9}: mean loss by third {run['mean_loss_by_third']}{parts}", flush=True)
            if args.out:
                write_json_atomically(args.out, results)
    return results


if __name__ == "__main__":
    main()
