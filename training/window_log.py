"""What the training loop logs every --logging_steps: the mean loss of the window (every micro-batch since the
last log, on every rank), learning rate, images/s, EMA decay, non-finite steps, gradient norm, and a warning when
the loss spikes."""

import time

import torch

from training.loss_spikes import LossSpikeMonitor


class WindowLog:
    def __init__(self, accelerator, logger, global_batch: int):
        self.accelerator, self.logger, self.global_batch = accelerator, logger, global_batch
        self.spikes = LossSpikeMonitor()
        self.losses, self.images = [], 0
        self.since = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (detached; read only when the window is logged, so no sync per step)."""
        self.losses.append(loss)

    def add_images(self, count: int) -> None:
        self.images += count

    def emit(self, step: int, lr: float, ema_decay: float, nonfinite_total: int, grad_norm=None) -> dict:
        """Log the window at `step` (collective: every rank calls it) and start the next one; returns the logs."""
        losses = self.losses
        mean_loss = self.accelerator.reduce(torch.stack(losses).mean(), "mean").item() if losses else float("nan")
        now = time.perf_counter()
        speed = self.images / max(now - self.since, 1e-9)
        logs = {"train/loss": mean_loss, "train/lr": lr, "train/images_per_second": speed,
                "train/ema_decay": ema_decay, "train/nonfinite_steps": nonfinite_total}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        spike = self.spikes.update(mean_loss, len(losses) * self.global_batch)
        logs["train/loss_spikes"] = self.spikes.count
        if spike:
            self.logger.warning(
                f"loss spike at step {step}: {mean_loss:.4f} is {spike:.1f}x the recent median "
                f"({self.spikes.count} so far). Repeated spikes mean an unstable run whose samples will be grainy: "
                "restart with a lower --learning_rate (a 6.5M model spiked at 5e-4, batch 512 in bf16), a smaller batch "
                "or --mixed_precision no.", main_process_only=True)
        self.accelerator.log(logs, step=step)
        self.since, self.images, self.losses = now, 0, []
        return logs
