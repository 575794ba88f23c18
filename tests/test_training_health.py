"""The training loop's guards: bf16 only where the CPU runs it fast, and loss-spike warnings (and what is logged)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training import precision
from training.loss_spikes import LossSpikeMonitor

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "flag,on_cpu,fast,configured,expected,warns",
    [
        (None, True, False, "bf16", "no", "training in fp32"),  # the shipped CPU config on an AVX2-only CPU
        ("bf16", True, False, None, "bf16", "--mixed_precision no"),  # asked for explicitly: kept, with the warning
        (None, True, True, "bf16", None, None),  # fast bf16: the config's choice stands
        (None, False, False, "bf16", None, None),  # a GPU: not the CPU's business
        ("no", True, False, "bf16", "no", None),
        (None, True, False, "no", None, None),
        (None, True, False, None, None, None),  # not launched through accelerate
    ],
)
def test_mixed_precision_falls_back_only_where_bf16_is_slow(flag, on_cpu, fast, configured, expected, warns):
    chosen, warning = precision.resolve_mixed_precision(flag, on_cpu, fast, configured)
    assert chosen == expected
    if warns is None:
        assert warning is None
    else:
        assert warns in warning and "12x slower" in warning


def test_fast_bf16_check_agrees_with_a_timing():
    """The check is a private torch call: time a bf16 and an fp32 convolution so that a wrong answer shows."""
    import time

    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(32, 64, 28, 28)

    def seconds(bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                conv(x)
            return time.perf_counter() - start

    ratio = seconds(True) / seconds(False)
    if precision.cpu_has_fast_bf16():
        assert ratio < 3, f"bf16 reported fast but {ratio:.1f}x slower than fp32"
    else:
        assert ratio > 3, f"bf16 reported slow but only {ratio:.1f}x slower than fp32"


def test_steady_noisy_losses_raise_no_spike():
    rng = np.random.default_rng(0)
    monitor = LossSpikeMonitor()
    # a healthy run: fast descent, then a plateau with 10% noise between logging windows
    losses = list(np.linspace(1.0, 0.2, 30)) + list(0.15 * (1 + 0.1 * rng.standard_normal(500)))
    assert all(monitor.update(float(x), num_samples=640) is None for x in losses)
    assert monitor.count == 0


def test_a_jump_over_twice_the_median_is_a_spike():
    monitor = LossSpikeMonitor()
    for _ in range(10):
        assert monitor.update(0.15, num_samples=640) is None
    assert monitor.update(0.45, num_samples=640) == pytest.approx(3.0)
    assert monitor.update(0.2, num_samples=640) is None  # below 1.5 times the median
    assert monitor.update(0.9, num_samples=5) is None  # a 5-image window is too noisy to judge
    assert monitor.update(float("nan"), num_samples=640) is None
    assert monitor.count == 1


def test_needs_some_history_first():
    monitor = LossSpikeMonitor(min_history=5)
    assert [monitor.update(x, num_samples=640) for x in (0.1, 0.5, 0.1, 0.6, 0.1)] == [None] * 5
    assert monitor.update(0.6, num_samples=640) is not None


def test_flags_the_unstable_h100_run_and_not_stable_cpu_runs():
    """Real logged losses: the 6.5M H100 run at lr 5e-4, batch 512 (unstable, FID 170-180), and four stable
    CPU runs at batch 64: the bundled architecture at lr 2e-4 and 1e-3, the 6.5M one at 5e-4 and 2e-4
    (benchmarks/plot_training_loss.py wrote them all from TensorBoard logs). All five were logged before
    the window fix, one batch per logged loss: the stable runs pass even at 64 images a point."""
    def spikes(name):
        run = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
        monitor = LossSpikeMonitor()
        flagged = [monitor.update(x, num_samples=run["window_images"]) for x in run["loss"]]
        return monitor.count, next((i for i, f in enumerate(flagged) if f), None)

    count, first = spikes("loss-h100-v64-lr5e-4.json")
    assert count >= 10 and first < 40  # caught within the first 2,000 of 7,000 steps
    for stable in ("loss-cpu-lr2e-4.json", "loss-cpu-lr1e-3.json", "loss-cpu-v64-lr5e-4.json", "loss-cpu-v64-lr2e-4.json"):
        run = json.loads((ROOT / "benchmarks" / "results" / stable).read_text())
        assert run["window_images"] >= LossSpikeMonitor().min_samples  # judged, not ignored as too small
        assert spikes(stable) == (0, None)


class RecordingLogger:
    def __init__(self):
        self.warnings = []

    def warning(self, message, main_process_only=True):
        self.warnings.append(message)


def test_window_log_means_every_micro_batch_since_the_last_log_and_warns_of_spikes():
    from accelerate import Accelerator

    from training.window_log import WindowLog

    logger = RecordingLogger()
    window = WindowLog(Accelerator(cpu=True), logger, global_batch=64)
    for step in range(1, 7):  # a steady window of two micro-batches (0.1 and 0.3) per log
        window.add_loss(torch.tensor(0.1))
        window.add_loss(torch.tensor(0.3))
        window.add_images(128)
        logs = window.emit(step, lr=1e-4, ema_decay=0.99, nonfinite_total=0, grad_norm=torch.tensor(0.5))
        assert logs["train/loss"] == pytest.approx(0.2) and logs["train/images_per_second"] > 0
    assert logs["train/grad_norm"] == 0.5 and logs["train/loss_spikes"] == 0 and not logger.warnings

    window.add_loss(torch.tensor(0.9))  # the next window starts empty: only this micro-batch counts
    logs = window.emit(7, lr=1e-4, ema_decay=0.99, nonfinite_total=1)
    assert logs["train/loss"] == pytest.approx(0.9) and logs["train/nonfinite_steps"] == 1
    assert logs["train/loss_spikes"] == 1 and "train/grad_norm" not in logs
    assert len(logger.warnings) == 1 and "loss spike at step 7" in logger.warnings[0] and "--learning_rate" in logger.warnings[0]

    assert np.isnan(window.emit(8, lr=1e-4, ema_decay=0.99, nonfinite_total=2)["train/loss"])  # every step skipped


def test_bad_factor_is_refused():
    with pytest.raises(ValueError, match="factor must exceed 1"):
        LossSpikeMonitor(factor=1.0)


def square_images(folder):
    """32 dark 8x8 images with one bright square each: learnable by a tiny UNet in a few dozen steps."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        image = np.zeros((8, 8), dtype=np.uint8)
        x, y = rng.integers(0, 5, 2)
        image[y:y + 3, x:x + 3] = 255
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


TINY_MODEL_FLAGS = ("--resolution 8 --base_channels 16 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 4 "
                    "--num_train_timesteps 100 --prediction_type v_prediction")


def test_training_by_device_checks_gradients_and_learns(tmp_path, monkeypatch, capsys):
    """benchmarks/training_by_device.py, the test that narrows down why H100 runs stall: on one device its
    one-step gradient check is within rounding of the float64 reference, its optimizer check finds no difference,
    its copy of the training step lowers the loss of a tiny model, and a CUDA device on a machine without one is
    refused with a clear error."""
    import training_by_device

    folder = square_images(tmp_path / "images")
    flags = TINY_MODEL_FLAGS
    results = training_by_device.main(["--devices", "cpu", "cpu", "--steps", "60", "--batch-size", "8", "--learning-rate", "2e-3",
                                       "--model-flags", flags, "--train-data-dir", str(folder), "--out", str(tmp_path / "r.json")])
    fp32, again = results["gradient_check"]  # one entry per listed device; the CPU has one kernel setting
    assert fp32["setting"] == again["setting"] == "fp32" and fp32["device"] == "cpu"
    # against the float64 reference: rounding-sized, not zero (a check that compared a thing with itself would give 0)
    assert 0 < fp32["worst_relative_grad_difference"] < 1e-3 and abs(fp32["grad_norm_ratio"] - 1) < 1e-4
    assert again["worst_relative_grad_difference"] == fp32["worst_relative_grad_difference"]
    assert len(fp32["worst_parameters"]) == 5 and fp32["worst_parameters"][0][1] == fp32["worst_relative_grad_difference"]
    # every parameter's gradient is compared, not only the output layer's (the UNet zero-initialises several)
    assert fp32["parameters_without_gradient"] == 0 and fp32["parameters"] == len(list(training_by_device.build_unet(
        training_by_device.training_args(["--output_dir", "x"] + flags.split()), 1, None).parameters()))
    assert [c["worst_relative_param_difference"] for c in results["optimizer_check"]] == [0.0, 0.0]
    first, _, last = results["runs"][0]["mean_loss_by_third"]
    assert last < 0.8 * first
    assert [run["variant"] for run in results["runs"]] == ["default", "default"]  # CUDA variants skipped on the CPU
    assert json.loads((tmp_path / "r.json").read_text())["runs"] == results["runs"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        training_by_device.parse_args(["--devices", "cpu", "cuda"])
    assert "torch sees no CUDA device here" in capsys.readouterr().err


def test_training_by_device_variants_change_only_what_they_name(tmp_path):
    """The variants meant for CUDA, run on the CPU: float64 gives the float64 reference's gradients exactly, runs
    every layer in float64 and gives losses within rounding of fp32's; SDPA's math kernel agrees with the default kernel to rounding; AdamW
    without foreach is the CPU's default path, so it repeats the default run exactly."""
    import training_by_device
    from training import data

    args = training_by_device.training_args(["--output_dir", "x"] + TINY_MODEL_FLAGS.split())
    scheduler = training_by_device.build_noise_scheduler(args)
    dataset = data.load_training_dataset(None, str(square_images(tmp_path / "images")))
    dataset.set_transform(data.make_transform("image", None, 8, 1))
    first = data.collate([dataset[i] for i in range(8)])
    batch = {"x0": first["pixel_values"].float(), "labels": None, "channels": 1, "classes": None,
             "noise": torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)), "t": torch.arange(8) * 12}
    _, reference = training_by_device.one_step(args, scheduler, batch, "cpu", "fp64")
    _, again = training_by_device.one_step(args, scheduler, batch, "cpu", "fp64")
    assert training_by_device.compare_gradients(again, reference)["worst_relative_grad_difference"] == 0.0

    def losses(variant):
        return training_by_device.train(args, scheduler, dataset, 1, None, "cpu", variant, 6, 8, 2e-3)

    default = losses("default")
    assert losses("no_foreach") == default
    assert np.allclose(losses("math_sdpa"), default, rtol=1e-4)
    dtypes = set()  # what every layer of the fp64 run put out: float64 only, or the variant would be a no-op
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: dtypes.add(output.dtype) if isinstance(output, torch.Tensor) else None)
    try:
        fp64 = losses("fp64")
    finally:
        hook.remove()
    assert dtypes == {torch.float64} and np.allclose(fp64, default, rtol=1e-3)


def test_first_divergence_finds_where_two_loss_curves_part():
    from training_by_device import first_divergence

    assert first_divergence([0.5, 0.4, 0.3], [0.5, 0.4, 0.3]) is None
    assert first_divergence([0.5, 0.40001, 0.33], [0.5, 0.4, 0.3]) == 2  # 2.5e-5 is rounding, 10% is not
