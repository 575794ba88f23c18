"""The training script, run as users run it (subprocesses, accelerate launch), on tiny settings."""

import gzip
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
import torch

from training import data, precision
from training.train_ddpm import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "training" / "train_ddpm.py")
TINY = ["--resolution", "8", "--base_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
        "--attention_resolutions", "4", "--train_batch_size", "8", "--max_train_samples", "64", "--num_train_timesteps", "100",
        "--validation_steps", "0", "--logging_steps", "1", "--lr_warmup_steps", "2", "--learning_rate", "1e-3"]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    e.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra})
    return e


def run_training(output_dir, *args, launcher=(sys.executable,), extra_env=None, timeout=600):
    cmd = [*launcher, SCRIPT, "--output_dir", str(output_dir), *TINY, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(**(extra_env or {})), timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def unet_weights(folder, variant=None):
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    return load_file(str(Path(folder) / "unet" / name))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--cond_drop_prob", "1.5"], "cond_drop_prob"),
        (["--mixed_precision", "fp16"], "bf16"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "not a complete checkpoint"),
        (["--dataset_name", "x", "--train_data_dir", "y"], "not both"),
        (["--channel_mult", "1,a"], "comma-separated integers"),
        (["--resolution", "30"], "--resolution 30 cannot be halved 2 times (--channel_mult has 3 levels): use a multiple of 4"),
        (["--train_batch_size", "0"], "train_batch_size"),
        (["--input_perturbation", "-0.1"], "--input_perturbation must be >= 0"),
        (["--haze_perturbation", "-1"], "--haze_perturbation must be >= 0"),
        (["--haze_perturbation", "6", "--haze_share", "0"], "--haze_share must lie in"),
        (["--dim_perturbation", "1"], "--dim_perturbation must lie in"),
        (["--dim_perturbation", "0.05", "--dim_share", "1.5"], "--dim_share must lie in"),
        (["--ema_min_decay", "0.9", "--ema_max_decay", "0.5"], "--ema_min_decay <= --ema_max_decay"),
        (["--rollout_hops", "-1"], "--rollout_hops must be >= 0"),
        (["--rollout_hops", "2", "--rollout_share", "0"], "--rollout_share must lie in"),
        (["--rollout_hops", "2", "--rollout_timesteps", "600", "150"], "--rollout_timesteps LOW HIGH must satisfy"),
    ],
)
def test_argument_errors_are_clear(tmp_path, capsys, argv, message):
    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a machine with a GPU; this case checks the CPU-only error")
    assert train_main(["--output_dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes())


def test_attention_defaults_to_the_level_at_half_the_resolution():
    """Without --attention_resolutions the UNet attends at half --resolution (14 at 28 pixels, the fixed default it
    replaces; 16 at 32), so --resolution 32 needs no other flag (the fixed 14 was refused there); a size that is no
    level of the UNet is refused before any data loads."""
    from pipeline_ddpm_custom.unet_ddpm_custom import SelfAttention
    from training.train_ddpm import build_unet, parse_args

    def attention(*argv):
        return parse_args(["--output_dir", "x", *argv]).attention_resolutions

    assert attention() == [14] and attention("--resolution", "32") == [16] and attention("--resolution", "64") == [32]
    assert attention("--resolution", "32", "--attention_resolutions", "8,16") == [8, 16]
    assert attention("--resolution", "32", "--attention_resolutions", "") == []
    unet = build_unet(parse_args(["--output_dir", "x", "--resolution", "32", "--base_channels", "16"]), 3, None)
    assert unet.config.attention_resolutions == [16] and sum(isinstance(m, SelfAttention) for m in unet.down_blocks.modules()) == 2
    with pytest.raises(ValueError, match=r"--attention_resolutions \[14\] are not feature-map sizes at --resolution 32 "
                                         r"with 3 levels: pick from \[32, 16, 8\]"):
        attention("--resolution", "32", "--attention_resolutions", "14")


def test_idx_files_become_the_hub_schema(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9], dtype=np.uint8))
    ds = data.fashion_mnist_from_idx(str(tmp_path), "train", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["image", "label"] and ds.features["label"].names[9] == "Ankle boot"
    np.testing.assert_array_equal(np.asarray(ds[1]["image"]), images[1])
    assert ds[4]["label"] == 9
    again = data.fashion_mnist_from_idx(str(tmp_path), "train", cache_dir=str(tmp_path / "cache"))  # from the cache
    np.testing.assert_array_equal(np.asarray(again[1]["image"]), images[1])


def test_a_folder_with_one_split_of_idx_files_loads_that_split(tmp_path):
    """A folder holding only the test split's IDX files (what an evaluation needs) is still read as IDX files,
    and asking it for the missing split says which files are missing where."""
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 5, 6], dtype=np.uint8))
    ds = data.load_training_dataset(str(tmp_path), None, split="test", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(np.asarray(ds[2]["image"]), images[2])
    assert ds["label"] == [4, 5, 6]
    with pytest.raises(FileNotFoundError, match=f"No train images IDX file in {tmp_path}"):
        data.load_training_dataset(str(tmp_path), None, split="train", cache_dir=str(tmp_path / "cache"))


def test_real_fashion_mnist_idx_files_are_read():
    assert os.path.isdir(data.FASHION_MNIST_IDX), "make setup installs Debian's dataset-fashion-mnist"
    ds = data.fashion_mnist_from_idx(data.FASHION_MNIST_IDX, "test")
    assert len(ds) == 10_000 and ds[0]["image"].size == (28, 28) and set(ds["label"]) == set(range(10))


def test_column_detection_errors():
    from datasets import Dataset, Features, Image as ImageFeature, Value

    ds = Dataset.from_dict({"a": [Image.new("L", (4, 4))], "b": [Image.new("L", (4, 4))], "y": [1]},
                           features=Features({"a": ImageFeature(), "b": ImageFeature(), "y": Value("int64")}))
    with pytest.raises(ValueError, match=r"Pass --image_column"):
        data.pick_columns(ds, None, None, False)
    with pytest.raises(ValueError, match=r"its columns are \['a', 'b', 'y'\]"):
        data.pick_columns(ds, "img", None, False)
    assert data.pick_columns(ds, "a", "y", True) == ("a", "y")


def test_label_columns_become_class_ids_or_a_clear_error():
    """Class names (text) are encoded by datasets' class_encode_column, as the model needs ids 0..K-1; integer ids pass
    as they are; negative ids and non-label columns are refused by name."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    def with_labels(values, dtype):
        return Dataset.from_dict({"image": [Image.new("L", (4, 4))] * len(values), "y": values},
                                 features=Features({"image": ImageFeature(), "y": Value(dtype)}))

    named = data.labels_as_class_ids(with_labels(["dog", "cat", "dog", "emu"], "string"), "y")
    assert named["y"] == [1, 0, 1, 2] and named.features["y"].names == ["cat", "dog", "emu"]
    assert data.num_classes(named, "y") == 3 and data.class_names(named, "y") == ["cat", "dog", "emu"]
    ids = with_labels([2, 0, 1], "int64")
    assert data.labels_as_class_ids(ids, "y") is ids and data.num_classes(ids, "y") == 3
    with pytest.raises(ValueError, match="has the label -1: class ids must be 0, 1, ..."):
        data.labels_as_class_ids(with_labels([0, -1], "int64"), "y")
    with pytest.raises(ValueError, match="not class labels: pass a column of integer ids"):
        data.labels_as_class_ids(with_labels([0.5, 1.5], "float32"), "y")


@pytest.mark.parametrize("config, names", [
    ({"class_conditional": True, "num_classes": 2, "class_names": ["cat", "dog"]}, ["cat", "dog"]),
    ({"class_conditional": True, "num_classes": 10, "dataset_name": None}, data.FASHION_MNIST_CLASSES),  # the default data
    ({"class_conditional": True, "num_classes": 3, "dataset_name": None}, None),  # not Fashion-MNIST's ten, whatever it was
    ({"class_conditional": True, "num_classes": 10, "train_data_dir": "pics"}, None),
    ({"class_conditional": False, "class_names": ["cat", "dog"]}, None),
])
def test_class_names_read_from_a_training_record(config, names):
    assert data.recorded_class_names(config) == names


@pytest.mark.parametrize("size", [(32, 16), (16, 32)])
def test_non_square_images_keep_their_proportions(size):
    """A picture twice as wide (or tall) as high is scaled by its shorter side and its middle square kept, as diffusers'
    scripts crop: here a black middle square between white ends stays black. Squashed, it would be gray-striped."""
    from training.data import make_transform

    width, height = size
    picture = np.full((height, width), 255, dtype=np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    picture[top:top + side, left:left + side] = 0
    pixels = make_transform("image", None, 8, 1)({"image": [Image.fromarray(picture)]})["pixel_values"][0]
    assert pixels.shape == (1, 8, 8)
    # the resampling filter reaches one pixel past the cut, so only the outermost row or column sees the white ends
    inner = pixels[:, :, 1:-1] if width > height else pixels[:, 1:-1, :]
    torch.testing.assert_close(inner, torch.full_like(inner, -1.0))
    assert pixels.mean() < -0.9  # squashed, half of it would be white: a mean near 0


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_pngs_read_as_their_eight_bit_selves(tmp_path, channels):
    """A 16-bit grayscale PNG (PIL mode I;16) gives the pixels of the same picture stored in 8 bits, for a gray or a
    color model; PIL's own convert would clip it to white."""
    from training.data import make_transform

    levels = np.random.default_rng(4).integers(0, 256, (8, 8)).astype(np.uint16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "plain.png")
    with Image.open(tmp_path / "deep.png") as deep, Image.open(tmp_path / "plain.png") as plain:
        assert deep.mode == "I;16"
        transform = make_transform("image", None, 8, channels)
        torch.testing.assert_close(transform({"image": [deep]})["pixel_values"][0],
                                   transform({"image": [plain]})["pixel_values"][0])


def test_image_folder_rgb_with_the_shipped_cpu_config(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    # bf16 comes from the shipped accelerate config file, not from a flag
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "training" / "configs" / "cpu.yaml")]
    result = run_training(out, "--train_data_dir", str(folder), "--max_train_steps", "3", "--random_flip",
                          "--checkpointing_steps", "2", launcher=launcher)
    config = json.loads((out / "training_config.json").read_text())
    # bf16 where this CPU runs it fast; elsewhere the config's bf16 becomes fp32, with a warning that says why
    fast_bf16 = precision.cpu_has_fast_bf16()
    assert config["channels"] == 3 and config["mixed_precision"] == ("bf16" if fast_bf16 else "no")
    assert ("accelerate config asks for bf16" in result.stderr) != fast_bf16
    # the loss curve as users plot it: TensorBoard scalars, through the benchmarks' plotting script
    curve = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_training_loss.py"), str(out / "logs"),
                            "--window-images", "8", "--out", str(tmp_path / "loss.json"), "--plot", str(tmp_path / "loss.png")],
                           capture_output=True, text=True, env=env(), cwd=ROOT)
    assert curve.returncode == 0, curve.stderr[-2000:]
    logged = json.loads((tmp_path / "loss.json").read_text())
    assert logged["step"] == [1, 2, 3] and all(np.isfinite(logged["loss"])) and logged["spike_steps"] == []
    assert Image.open(tmp_path / "loss.png").size[0] > 100
    assert "fewer" not in result.stderr and "memorisation" in result.stderr  # the tiny-dataset warning
    from pipeline_ddpm_custom import DDPMCustomPipeline

    pipe = DDPMCustomPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)
    assert (out / "unet" / "diffusion_pytorch_model.non_ema.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    steps = json.loads((out / "training_config.json").read_text())["validation_inference_steps"]
    assert f"num_inference_steps={steps}, eta=0," in card  # the example samples as the grid was drawn: DDIM


def logged_scalars(output_dir, tag):
    """{step: value} of one scalar in a run's TensorBoard logs, read by the benchmarks' plotting script."""
    spec = importlib.util.spec_from_file_location("plot_training_loss", ROOT / "benchmarks" / "plot_training_loss.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    return dict(plot.read_scalars(str(Path(output_dir) / "logs"))[tag])


def logged_losses(output_dir):
    """{step: train/loss} from a run's TensorBoard logs."""
    return logged_scalars(output_dir, "train/loss")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A 4-step run with every default (a loss logged each step, tensorboard, EMA warm-up): the baseline that
    several tests below compare a flag's run with, trained once (each run is a process importing diffusers)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    run_training(out, "--max_train_steps", "4", "--logging_steps", "1")
    return out


def test_logged_loss_is_the_mean_over_its_logging_window(tmp_path, plain_run):
    """A loss logged every 4 steps is the mean of the 4 steps' losses (two runs with the same seed), not
    the last step's alone: the spike warning and the loss curves read these windows."""
    run_training(tmp_path / "window", "--max_train_steps", "4", "--logging_steps", "4")
    per_step, windowed = logged_losses(plain_run), logged_losses(tmp_path / "window")
    assert sorted(per_step) == [1, 2, 3, 4] and sorted(windowed) == [4]
    assert windowed[4] == pytest.approx(np.mean([per_step[s] for s in (1, 2, 3, 4)]), rel=1e-5)
    assert windowed[4] != pytest.approx(per_step[4], rel=1e-3)  # the steps differ enough to tell the two apart


def test_report_to_none_logs_to_no_tracker_and_trains(tmp_path, plain_run):
    run_training(tmp_path / "quiet", "--max_train_steps", "2", "--report_to", "none")
    assert not list((tmp_path / "quiet").rglob("events.out.tfevents.*"))
    assert list(plain_run.rglob("events.out.tfevents.*"))  # tensorboard by default
    assert (tmp_path / "quiet" / "model_index.json").is_file()


def test_report_to_a_tracker_that_is_not_installed_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """accelerate only warns for a tracker whose package is missing, and the run would log nothing."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else find_spec(name, *rest))
    assert train_main(["--output_dir", str(tmp_path), "--report_to", "wandb"]) == 2
    assert "--report_to wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_constant_ema_decay_from_the_first_step(tmp_path, plain_run):
    """--ema_min_decay equal to --ema_max_decay turns the EMA warm-up off (fine-tuning keeps its starting weights);
    without it the decay warms up from 0, as diffusers' EMAModel does."""
    decay_args = ["--ema_min_decay", "0.95", "--ema_max_decay", "0.95"]
    run_training(tmp_path / "constant", "--max_train_steps", "3", *decay_args)
    constant, warmup = logged_scalars(tmp_path / "constant", "train/ema_decay"), logged_scalars(plain_run, "train/ema_decay")
    # diffusers' EMAModel copies the weights at the first step (decay 0) whatever the settings: one optimizer step from
    # the starting weights, so those are kept
    assert sorted(constant) == [1, 2, 3] and constant[1] == 0 and constant[2] == constant[3] == pytest.approx(0.95)
    assert warmup[2] == pytest.approx(1 - 2 ** -0.75)  # 0.41, the warm-up's second step


def test_sigkill_and_resume_reaches_the_same_weights(tmp_path):
    args = ["--max_train_steps", "30", "--checkpointing_steps", "3", "--class_conditional", "--random_flip",
            "--dropout", "0.1", "--gradient_accumulation_steps", "2", "--checkpoints_total_limit", "2"]
    run_training(tmp_path / "straight", *args)

    killed = tmp_path / "killed"
    cmd = [sys.executable, SCRIPT, "--output_dir", str(killed), *TINY, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-6" / "training_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "model_index.json").exists()  # it really died mid-run

    result = run_training(killed, *args, "--resume_from_checkpoint", "latest")
    assert "resumed from" in result.stderr
    for variant in (None, "non_ema"):
        straight, resumed = unet_weights(tmp_path / "straight", variant), unet_weights(killed, variant)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert np.array_equal(straight[key].numpy(), resumed[key].numpy()), (variant, key)
    assert len(list((killed / "checkpoints").glob("checkpoint-*[0-9]"))) == 2  # total limit honoured
    # the export names its classes from the data's ClassLabel (Fashion-MNIST here), and the pipeline takes the names
    index = json.loads((killed / "model_index.json").read_text())
    assert index["id2label"] == {str(i): name for i, name in enumerate(data.FASHION_MNIST_CLASSES)}
    assert json.loads((killed / "training_config.json").read_text())["class_names"] == data.FASHION_MNIST_CLASSES


def test_resume_position_in_the_data_when_batches_change():
    """A checkpoint read the same way resumes at its own micro-step; with other batch sizes or process counts at the
    same place of the same epoch (counted here in images, by hand); a dataset of another size is refused."""
    from training.checkpoints import data_record, resumed_micro_step

    saved = data_record(dataset_size=100, images_per_micro_step=8, micro_steps_per_epoch=12)  # drop_last: 96 a epoch
    state = {"micro_step": 2 * 12 + 5, "data": saved}  # epoch 2, 40 images into it
    assert resumed_micro_step(state, saved) == (29, None)
    assert resumed_micro_step({"micro_step": 29}, data_record(100, 16, 6)) == (29, None)  # an older checkpoint: as saved
    for per_micro_step, per_epoch in ((16, 6), (4, 25), (24, 4)):  # 2 processes; half the batch; 3 processes
        step, note = resumed_micro_step(state, data_record(100, per_micro_step, per_epoch))
        epoch, within = divmod(step, per_epoch)
        assert epoch == 2 and within * per_micro_step <= 40 < (within + 1) * per_micro_step, (per_micro_step, step)
        assert f"image {within * per_micro_step} of epoch 2 (the checkpoint had read 40 of it)" in note
    with pytest.raises(ValueError, match="trained on 100 images and this run has 64: resume with the same data"):
        resumed_micro_step(state, data_record(64, 8, 8))


def test_a_checkpoint_resumes_on_two_processes_with_gradient_accumulation(tmp_path):
    """Written by one process, resumed by two (batch 8 each, accumulating 2): the run goes on at the same place of the
    epoch, says so, and keeps the ranks in step (accelerate restores its accumulation count only on ranks that have a
    saved RNG file; a rank that restarted it at 0 would disagree about when to all-reduce)."""
    out = tmp_path / "grown"
    run_training(out, "--max_train_steps", "5", "--checkpointing_steps", "5")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    result = run_training(out, "--max_train_steps", "8", "--checkpointing_steps", "5", "--gradient_accumulation_steps", "2",
                          "--resume_from_checkpoint", "latest", launcher=launcher, timeout=300,
                          extra_env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    # 64 images: 8 micro-steps of 8 an epoch before, 4 of 16 now; 5 read 40 images of epoch 0, so on at image 32
    assert "going on at image 32 of epoch 0 (the checkpoint had read 40 of it)" in result.stderr
    assert "resumed from" in result.stderr and "weights and EMA identical on all 2 ranks" in result.stderr
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "training_state.json").read_text())
    # after the resume: 2 micro-steps (one optimizer step) finish epoch 0, then 4 (two steps) of epoch 1
    assert state["global_step"] == 8 and state["micro_step"] == 2 + 2 + 4
    assert state["data"] == {"dataset_size": 64, "images_per_micro_step": 16, "micro_steps_per_epoch": 4}


def test_a_checkpoint_exports_as_the_pipeline_training_exported_at_that_step(tmp_path, capsys):
    """python -m training.export_checkpoint: checkpoint-6 of a 6-step run gives, file for file, the folder training
    exported at its end; checkpoint-3, whose validation grid is moved away, gets the grid drawn as validation drew it,
    and loads and samples. Not a checkpoint, or no run record: refused with what to pass."""
    from training.export_checkpoint import main as export_main

    run = tmp_path / "run"
    run_training(run, "--max_train_steps", "6", "--checkpointing_steps", "3", "--validation_steps", "3",
                 "--num_validation_images", "4", "--validation_inference_steps", "3", "--class_conditional")

    def export(*argv):  # in this process: each `python -m` spends seconds importing diffusers before it starts
        return export_main(list(map(str, argv)))

    again = tmp_path / "exported" / "run"  # the same folder name: the card names its repo after it
    as_users_run_it = subprocess.run([sys.executable, "-m", "training.export_checkpoint", str(run / "checkpoints" / "checkpoint-6"),
                                      "--out", str(again)], capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT)
    assert as_users_run_it.returncode == 0, as_users_run_it.stderr[-3000:]
    trained = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.relative_to(run).parts[0] not in ("checkpoints", "logs"))
    assert trained == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for path in trained:
        assert (run / path).read_bytes() == (again / path).read_bytes(), path

    validation_grid = run / "logs" / "samples" / "step-0000003.png"
    moved = validation_grid.rename(tmp_path / "step-3.png")
    early = tmp_path / "early"
    assert export(run / "checkpoints" / "checkpoint-3", "--out", early) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(early / "samples.png")), np.asarray(Image.open(moved)))
    from pipeline_ddpm_custom import DDPMCustomPipeline

    pipe = DDPMCustomPipeline.from_pretrained(early)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=2, class_labels="Bag", num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 1)
    assert not np.array_equal(unet_weights(early)["conv_in.weight"].numpy(), unet_weights(again)["conv_in.weight"].numpy())

    capsys.readouterr()
    assert export(run, "--out", tmp_path / "x") == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err
    copied = tmp_path / "elsewhere" / "checkpoint-3"
    shutil.copytree(run / "checkpoints" / "checkpoint-3", copied)
    assert export(copied, "--out", tmp_path / "x") == 2
    assert "pass the run's training_config.json with --training_config" in capsys.readouterr().err
    assert export(copied, "--out", tmp_path / "x", "--training_config", run / "training_config.json") == 0

    from .hub_server import HubServer

    with HubServer() as hub:  # published: the pipeline's files, the card naming the repo
        hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                   "HF_HOME": str(tmp_path / "hf_home")}
        pushed = subprocess.run([sys.executable, "-m", "training.export_checkpoint", str(run / "checkpoints" / "checkpoint-3"),
                                 "--out", str(tmp_path / "to-push"), "--push_to_hub", "--hub_model_id", "user/step-3"],
                                capture_output=True, text=True, env=env(**hub_env), timeout=300, cwd=ROOT)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        files = set(hub.repos["user/step-3"].files)
        assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "samples.png", "README.md"} <= files
        assert 'from_pretrained("user/step-3"' in (tmp_path / "to-push" / "README.md").read_text()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_sync_and_export(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    out = tmp_path / "ddp"
    result = run_training(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "4",
                          "--num_validation_images", "3", "--validation_inference_steps", "3", launcher=launcher,
                          extra_env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert result.stderr.count("weights and EMA identical on all 2 ranks") >= 2
    config = json.loads((out / "training_config.json").read_text())
    assert config["num_processes"] == 2 and config["global_batch_size"] == 16
    assert Image.open(out / "samples.png").size == (16, 16)  # 3 images from 2 ranks in a 2 x 2 grid
    from pipeline_ddpm_custom import DDPMCustomPipeline

    pipe = DDPMCustomPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 1)


def test_push_to_hub_round_trip(tmp_path):
    from .hub_server import HubServer

    with HubServer() as hub:
        hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                   "HF_HOME": str(tmp_path / "hf_home")}
        run_training(tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "1", "--push_to_hub",
                     "--hub_model_id", "user/tiny-ddpm", extra_env=hub_env)
        files = set(hub.repos["user/tiny-ddpm"].files)
        assert {"model_index.json", "pipeline_ddpm_custom.py", "unet/unet_ddpm_custom.py", "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.non_ema.safetensors", "scheduler/scheduling_ddpm_custom.py", "README.md"} <= files
        assert not any(f.startswith(("checkpoints/", "logs/")) for f in files), files

        code = ("import sys; sys.modules['pipeline_ddpm_custom'] = None\n"
                "from diffusers import DiffusionPipeline\n"
                "pipe = DiffusionPipeline.from_pretrained('user/tiny-ddpm', trust_remote_code=True)\n"
                "print(pipe(batch_size=2, num_inference_steps=3, output_type='np').images.shape)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(**hub_env),
                                timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "(2, 8, 8, 1)" in result.stdout


def test_fine_tune_from_a_pipeline_switches_the_prediction_type(tmp_path, capsys):
    """--pretrained_model starts from the saved EMA weights (a near-zero learning rate keeps them) and
    exports with the new prediction type but the pretrained scheduler's sampling settings; a different
    noise schedule is warned about; a model that does not fit the data is refused with what to change."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    run_training(base, "--max_train_steps", "2", "--checkpointing_steps", "2")
    base_scheduler = base / "scheduler" / "scheduler_config.json"
    base_config = json.loads(base_scheduler.read_text())
    assert base_config["clip_sample"] is True and base_config["timestep_spacing"] == "leading"  # the defaults
    base_scheduler.write_text(json.dumps({**base_config, "clip_sample": False, "timestep_spacing": "trailing"}))
    result = run_training(tuned, "--max_train_steps", "1", "--checkpointing_steps", "1", "--pretrained_model", str(base),
                          "--prediction_type", "v_prediction", "--learning_rate", "1e-12", "--lr_warmup_steps", "0")
    assert "trained with" not in result.stderr  # same noise schedule: no warning
    before, after = unet_weights(base), unet_weights(tuned)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)
    scheduler = json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["clip_sample"] is False and scheduler["timestep_spacing"] == "trailing"
    result = run_training(tmp_path / "other-schedule", "--max_train_steps", "1", "--pretrained_model", str(base),
                          "--beta_schedule", "squaredcos_cap_v2", "--rollout_hops", "2")  # rollouts: the loop runs them
    assert "trained with beta_schedule='linear'" in result.stderr and "--beta_schedule 'linear'" in result.stderr

    # refused before any data is read (so in this process, like the other argument errors)
    capsys.readouterr()
    argv = ["--output_dir", str(tmp_path / "bad"), *TINY, "--resolution", "16", "--pretrained_model", str(base)]
    assert train_main(argv) == 2
    assert "takes 8-pixel images, but --resolution is 16: match --resolution to it" in capsys.readouterr().err
    argv[argv.index(str(base))] = str(tmp_path / "missing")
    assert train_main(argv) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_in_training_sampling_batches_like_evaluate(monkeypatch):
    """Validation grids and --eval_steps sample in training.evaluate's batches (64 on two CPU cores, not 250)."""
    from accelerate import Accelerator

    from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomScheduler, DDPMCustomUNet
    from training.evaluate import default_batch_size
    from training.train_ddpm import sample_on_all_ranks

    calls, original = [], DDPMCustomPipeline.__call__

    def spy(self, *args, batch_size=1, **kwargs):
        calls.append(batch_size)
        return original(self, *args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(DDPMCustomPipeline, "__call__", spy)
    unet = DDPMCustomUNet(sample_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(), norm_num_groups=4, num_class_embeds=3)
    accelerator = Accelerator(cpu=True)
    batch = default_batch_size(accelerator.device)
    images = sample_on_all_ranks(accelerator, unet, DDPMCustomScheduler(), batch + 3, 1, 0.0, "pt")
    assert calls == [batch, 3]
    assert len(images) == batch + 3


def test_input_perturbation_is_drawn_last_and_only_enters_the_input():
    """With --input_perturbation the step's other draws are those of a plain run (so the per-step seeds
    of a resumed run still hold), and the extra noise has the asked-for scale."""
    from training.train_ddpm import draw_step_inputs, parse_args

    x0, labels = torch.rand(256, 1, 8, 8) * 2 - 1, torch.arange(256) % 10
    drawn = {}
    for gamma in (0.0, 0.1):
        args = parse_args(["--output_dir", "x", "--input_perturbation", str(gamma), "--random_flip"])
        torch.manual_seed(7)
        drawn[gamma] = draw_step_inputs(x0, labels, args, 10)
    for plain, perturbed in zip(drawn[0.0][:4], drawn[0.1][:4]):
        assert torch.equal(plain, perturbed)
    assert drawn[0.0][4] is drawn[0.0][1]
    extra = (drawn[0.1][4] - drawn[0.1][1]) / 0.1
    assert abs(extra.std().item() - 1) < 0.02 and abs(extra.mean().item()) < 0.02


def test_haze_perturbation_is_drawn_last_and_moves_both_noises_on_the_background_only():
    """--haze_perturbation leaves the step's other draws as a plain run's, and adds the same haze noise to the
    target's and the input's noise, where x0 is black and nowhere else."""
    from pipeline_ddpm_custom import DDPMCustomScheduler
    from training.train_ddpm import draw_step_inputs, parse_args

    x0, labels = torch.rand(64, 1, 8, 8) - 0.5, torch.arange(64) % 10  # garment: well above black
    x0[:, :, :3] = -1
    scheduler = DDPMCustomScheduler(prediction_type="v_prediction")
    drawn = {}
    for levels in (0.0, 6.0):
        args = parse_args(["--output_dir", "x", "--haze_perturbation", str(levels), "--input_perturbation", "0.1"])
        torch.manual_seed(7)
        drawn[levels] = draw_step_inputs(x0, labels, args, 10, scheduler=scheduler)
    plain, hazy = drawn[0.0], drawn[6.0]
    assert torch.equal(plain[2], hazy[2]) and torch.equal(plain[3], hazy[3])
    moved = hazy[1] - plain[1]
    torch.testing.assert_close(hazy[4] - plain[4], moved)
    assert moved[:, :, 3:].abs().max() == 0 and moved[:, :, :3].abs().max() > 0
    assert 0.3 < (moved.abs().amax(dim=(1, 2, 3)) > 0).float().mean() < 0.7  # --haze_share's default: half
    every = parse_args(["--output_dir", "x", "--haze_perturbation", "6", "--haze_share", "1"])
    moved_every = draw_step_inputs(x0, labels, every, 10, scheduler=scheduler)[1] - plain[1]
    assert (moved_every.abs().amax(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(ValueError, match="noise scheduler"):
        draw_step_inputs(x0, labels, args, 10)


def test_dim_perturbation_is_drawn_last_and_darkens_the_input_only_where_there_is_garment():
    """--dim_perturbation leaves the step's other draws (the haze's too) as a run without it, and adds the same
    noise to the target's and the input's: x_t then holds the image darkened towards black by at most the asked-for
    fraction, black pixels untouched, while the target's x0 stays the clean image."""
    from pipeline_ddpm_custom import DDPMCustomScheduler
    from training.train_ddpm import draw_step_inputs, parse_args

    x0, labels = torch.rand(256, 1, 8, 8) - 0.5, torch.arange(256) % 10
    x0[:, :, :3] = -1
    scheduler = DDPMCustomScheduler(prediction_type="v_prediction")
    drawn = {}
    for fraction in (0.0, 0.08):
        args = parse_args(["--output_dir", "x", "--haze_perturbation", "6", "--dim_perturbation", str(fraction)])
        torch.manual_seed(7)
        drawn[fraction] = draw_step_inputs(x0, labels, args, 10, scheduler=scheduler)
    plain, dimmed = drawn[0.0], drawn[0.08]
    assert all(torch.equal(plain[i], dimmed[i]) for i in (0, 2, 3))  # x0, timesteps, labels
    moved = dimmed[1] - plain[1]
    torch.testing.assert_close(dimmed[4] - plain[4], moved)
    assert moved[:, :, :3].abs().max() == 0  # the haze on the black rows was drawn the same
    # what the moved noise puts into x_t, in x0 units: sqrt(1 - abar) * moved / sqrt(abar) = -f * (x0 + 1)
    abar = scheduler.alphas_cumprod[plain[2]].view(-1, 1, 1, 1)
    offset = (1 - abar).sqrt() * moved / abar.sqrt()
    fraction = -offset[:, :, 3:] / (x0[:, :, 3:] + 1)
    per_image = fraction.flatten(1)
    torch.testing.assert_close(per_image.amax(1), per_image.amin(1), atol=1e-4, rtol=1e-4)  # one f an image
    assert per_image.min() >= -1e-5 and per_image.max() <= 0.08 + 1e-4
    assert 0.35 < (per_image.amax(1) > 1e-6).float().mean() < 0.65  # --dim_share's default: half
    with pytest.raises(ValueError, match="noise scheduler"):
        draw_step_inputs(x0, labels, args, 10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_rollout_noise_is_the_start_noise_for_a_model_that_knows_x0_and_moves_for_one_that_does_not(prediction_type):
    """losses.rollout_noise: DDIM steps of a model whose x0 estimate is the real x0 keep the noise they start from
    (DDIM's eps stays constant then), at every timestep, the top one included; a model that knows less lands
    elsewhere: where the scheduler's own DDIM steps (checked against diffusers' DDIMScheduler) take it, and the noise
    returned puts x0 exactly there."""
    from types import SimpleNamespace

    from pipeline_ddpm_custom import DDPMCustomScheduler
    from pipeline_ddpm_custom.losses import rollout_noise

    scheduler = DDPMCustomScheduler(prediction_type=prediction_type, clip_sample=False)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1
    start_noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.tensor([0, 10, 300, 700, 990, 999])
    abar = scheduler.alphas_cumprod.float()
    calls = []

    def believing(believed):  # a model whose x0 estimate is always `believed`
        def model(x_t, t, class_labels=None):
            calls.append(t.clone())
            a = abar[t].view(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * believed) / (1 - a).sqrt()
            v = a.sqrt() * eps - (1 - a).sqrt() * believed
            return SimpleNamespace(sample={"epsilon": eps, "sample": believed, "v_prediction": v}[prediction_type])
        return model

    rolled = rollout_noise(believing(x0), scheduler, x0, start_noise, timesteps, None, hops=3, stride=20)
    torch.testing.assert_close(rolled, start_noise, rtol=0, atol=2e-3)

    calls.clear()
    rolled = rollout_noise(believing(x0 * 0.5), scheduler, x0, start_noise, timesteps, None, hops=3, stride=20)
    assert [c.tolist() for c in calls] == [[60, 70, 360, 760, 999, 999], [40, 50, 340, 740, 996, 999],
                                           [20, 30, 320, 720, 993, 999]]
    moved = (rolled - start_noise).abs().amax(dim=(1, 2, 3))
    assert (moved[:4] > 1e-2).all() and moved[4] > 0  # t = 990: from 999, where every image is almost all noise
    assert moved[5] < 1e-6  # t = 999 has no room above it: not moved
    one = slice(2, 3)  # the image at t = 300, brought from 360 by the scheduler's own steps
    scheduler.set_timesteps(timesteps=[360, 340, 320, 300])
    x = scheduler.add_noise(x0[one], start_noise[one], torch.tensor([360]))
    for t in (360, 340, 320):
        x = scheduler.step(believing(x0[one] * 0.5)(x, torch.tensor([t])).sample, t, x, eta=0.0).prev_sample
    landed = abar[300].sqrt() * x0[one] + (1 - abar[300]).sqrt() * rolled[one]
    torch.testing.assert_close(landed, x, rtol=0, atol=1e-4)


def test_rollouts_replace_both_noises_for_their_share_only_and_are_drawn_last():
    """--rollout_hops: draw_step_inputs' numbers are a plain run's; the chosen share's two noises become one and
    the same rollout noise, the others' stay as drawn."""
    from types import SimpleNamespace

    from pipeline_ddpm_custom import DDPMCustomScheduler
    from training.train_ddpm import draw_step_inputs, parse_args, with_rollouts

    scheduler = DDPMCustomScheduler(prediction_type="v_prediction")
    x0, labels = torch.rand(64, 1, 8, 8) * 2 - 1, torch.arange(64) % 10
    zeros = lambda x_t, t, class_labels=None: SimpleNamespace(sample=torch.zeros_like(x_t))  # noqa: E731
    args = parse_args(["--output_dir", "x", "--rollout_hops", "2", "--input_perturbation", "0.1"])
    torch.manual_seed(3)
    x0, noise, timesteps, labels, input_noise = draw_step_inputs(x0, labels, args, 10, scheduler=scheduler)
    new_noise, new_input = with_rollouts(zeros, scheduler, x0, noise, input_noise, timesteps, labels, args)
    chosen = (new_noise != noise).flatten(1).any(dim=1)
    assert 0.3 < chosen.float().mean() < 0.7  # --rollout_share's default: half
    torch.testing.assert_close(new_noise[chosen], new_input[chosen])
    assert torch.equal(new_noise[~chosen], noise[~chosen]) and torch.equal(new_input[~chosen], input_noise[~chosen])
    every = parse_args(["--output_dir", "x", "--rollout_hops", "2", "--rollout_share", "1"])
    replaced, _ = with_rollouts(zeros, scheduler, x0, noise, input_noise, timesteps, labels, every)
    top = timesteps == 999
    assert ((replaced != noise).flatten(1).any(dim=1) | top).all()
    window = parse_args(["--output_dir", "x", "--rollout_hops", "2", "--rollout_share", "1", "--rollout_timesteps", "150", "600"])
    torch.manual_seed(4)
    every_again, _ = with_rollouts(zeros, scheduler, x0, noise, input_noise, timesteps, labels, every)
    torch.manual_seed(4)
    windowed, _ = with_rollouts(zeros, scheduler, x0, noise, input_noise, timesteps, labels, window)
    inside = (timesteps >= 150) & (timesteps <= 600)
    assert inside.any() and (~inside).any()
    assert torch.equal((windowed != noise).flatten(1).any(dim=1), inside)  # all of the window, nothing outside it
    torch.testing.assert_close(windowed[inside], every_again[inside])  # the same draws as without the window
