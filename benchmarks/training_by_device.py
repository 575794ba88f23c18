"""Does one training recipe learn the same on each device? The H100 runs of the 6.5M model stalled at a loss the
same recipe leaves behind on a CPU within 200 steps (README, "A larger model on the H100"); this script is the test
that narrows down why, one device-specific piece at a time.

    python benchmarks/training_by_device.py --devices cpu cuda --variants default no_tf32 no_cudnn cpu_draws no_reseed as_cpu \\
        --steps 300 --out benchmarks/results/training-by-device.json

First, one step from the same weights and inputs on every device, in full fp32: the loss and the worst relative
gradient difference against the first device (the model's arithmetic alone). Then `--steps` optimizer steps of
train_ddpm.py's training step (its `draw_step_inputs`, same data order and per-step seeds, AdamW, gradient
clipping; no accelerate, no EMA) per device and variant, reporting the mean loss of each third of the run. Variants other than `default` change one thing
on CUDA and are skipped on other devices; those that draw their random numbers on the CPU (`cpu_draws`, `as_cpu`) see
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
}
# variants whose random draws are the CPU run's, so that their per-step losses can be compared with it step by step
CPU_DRAWS = ("cpu_draws", "as_cpu")


@contextlib.contextmanager
def backend_flags(variant: str):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled
    torch.backends.cudnn.allow_tf32 = variant not in ("no_tf32", "as_cpu")
    torch.backends.cudnn.enabled = variant != "no_cudnn"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled = saved


def one_step(model_args, scheduler, batch, device: str) -> tuple:
    """Loss and gradients of one step, fp32 with TF32 off, from seed-0 weights with every parameter nudged
    (the UNet zero-initialises its output convolution, the residual blocks' second convolutions and the
    attention projections: from a fresh model only the output layer would get a gradient, and the check
    would test nothing behind it)."""
    torch.manual_seed(0)
    unet = build_unet(model_args, batch["channels"], batch["classes"])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    unet = unet.to(device).train()
    with backend_flags("no_tf32"):
        loss = training_losses(unet, scheduler, batch["x0"].to(device), batch["t"].to(device), noise=batch["noise"].to(device),
                               class_labels=None if batch["labels"] is None else batch["labels"].to(device)).mean()
        loss.backward()
    return loss.item(), {name: p.grad.double().cpu() for name, p in unet.named_parameters() if p.grad is not None}


def train(model_args, scheduler, dataset, channels: int, classes, device: str, variant: str, steps: int, batch_size: int,
          lr: float) -> list:
    """Per-step losses of `steps` steps of train_ddpm.py's training step."""
    torch.manual_seed(0)
    unet = build_unet(model_args, channels, classes).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(model_args.adam_beta1, model_args.adam_beta2),
                                  weight_decay=model_args.adam_weight_decay)
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
                x0, noise, timesteps, labels = draw_step_inputs(batch["pixel_values"].float().to(device),
                                                                None if labels is None else labels.to(device),
                                                                model_args, classes, draw_on)
                loss = training_losses(unet, scheduler, x0, timesteps, noise=noise, class_labels=labels).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), model_args.max_grad_norm)
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
    results = {"setup": {k: v for k, v in vars(args).items() if k != "out"}, "gradient_check": {}, "runs": []}
    for device in args.devices:
        loss, grads = one_step(model_args, scheduler, batch, device)
        if device == args.devices[0]:
            reference_loss, reference_grads = loss, grads
        differences = {n: float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in reference_grads.items()}
        worst = max(differences, key=differences.get)
        results["gradient_check"][device] = {
            "loss": loss, "loss_reference": reference_loss, "worst_relative_grad_difference": differences[worst],
            "worst_parameter": worst, "parameters": len(differences),
            "parameters_without_gradient": sum(1 for g in reference_grads.values() if g.norm() == 0)}
        print(f"one step on {device}: loss {loss:.6f} ({args.devices[0]}: {reference_loss:.6f}), worst gradient "
              f"difference {differences[worst]:.1e} ({worst}), over all {len(differences)} parameters", flush=True)
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
