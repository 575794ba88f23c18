import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def seeds(first, count):
    """The CLI's generators: image i from seed first + i."""
    import torch

    return [torch.Generator().manual_seed(first + i) for i in range(count)]


def test_generate_writes_grid_and_gif(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_ddpm_custom", "generate", "--model", str(tmp_path / "model"), "--num-images", "4",
         "--steps", "5", "--eta", "0", "--seed", "0", "--out", str(tmp_path / "grid.png"), "--gif", str(tmp_path / "d.gif")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "grid.png").size == (16, 16)  # 2 x 2 grid of 8 x 8
    gif = Image.open(tmp_path / "d.gif")
    assert gif.n_frames >= 5
    assert "5/5" in result.stderr  # the progress bar


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    from pipeline_ddpm_custom.cli import main  # in this process (offline, conftest): the command itself is run above

    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and str(tmp_path / "nope") in error


def test_generate_with_a_solver_draws_what_diffusers_draws(tmp_path, capsys):
    """--scheduler sde-dpmsolver++ gives the grid of the same pipeline with diffusers' DPMSolverMultistepScheduler
    (SDE variant, trailing spacing) set by hand and the same seed; --eta with a solver is refused."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from pipeline_ddpm_custom import DDPMCustomPipeline
    from pipeline_ddpm_custom.cli import main
    from pipeline_ddpm_custom.pictures import grid

    tiny_pipeline(num_train_timesteps=50).save_pretrained(tmp_path / "model")
    assert main(["generate", "--model", str(tmp_path / "model"), "--num-images", "4", "--steps", "6", "--seed", "2",
                 "--scheduler", "sde-dpmsolver++", "--out", str(tmp_path / "grid.png")]) == 0
    pipe = DDPMCustomPipeline.from_pretrained(tmp_path / "model")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++",
                                                             timestep_spacing="trailing")
    expected = grid(pipe(batch_size=4, num_inference_steps=6, generator=seeds(2, 4)).images)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(expected))
    assert main(["generate", "--model", str(tmp_path / "model"), "--scheduler", "unipc", "--eta", "0"]) == 2
    assert "unipc takes none (drop --eta)" in capsys.readouterr().err


def test_generate_defaults_to_ddim(tmp_path):
    """Without --eta the CLI's 50-step default runs deterministic DDIM (eta 0), not the pipeline's eta 1, which
    is meant for the full chain: its grid is the pipeline's with eta=0 and the same seed, and differs from eta=1."""
    import numpy as np
    import torch

    from pipeline_ddpm_custom import DDPMCustomPipeline
    from pipeline_ddpm_custom.cli import main
    from pipeline_ddpm_custom.pictures import grid

    tiny_pipeline(num_train_timesteps=50).save_pretrained(tmp_path / "model")
    assert main(["generate", "--model", str(tmp_path / "model"), "--num-images", "4", "--steps", "6", "--seed", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    drawn = np.asarray(Image.open(tmp_path / "grid.png"))
    pipe = DDPMCustomPipeline.from_pretrained(tmp_path / "model")

    def grid_for(eta):
        images = pipe(batch_size=4, num_inference_steps=6, eta=eta, generator=seeds(1, 4)).images
        return np.asarray(grid(images))

    np.testing.assert_array_equal(drawn, grid_for(0.0))
    assert not np.array_equal(drawn, grid_for(1.0))


def test_generate_draws_every_class_in_turn_unless_told_otherwise(tmp_path, capsys):
    """A class-conditional model's grid shows classes 0, 1, 2, 0, ... by default (the pipeline without labels samples
    the null class, which is far weaker); --class-label gives one class, --null-class the pipeline's own default."""
    import warnings

    import numpy as np
    import pytest
    import torch

    from pipeline_ddpm_custom import DDPMCustomPipeline
    from pipeline_ddpm_custom.cli import main
    from pipeline_ddpm_custom.pictures import grid

    plain = tiny_pipeline(num_train_timesteps=50, num_class_embeds=3)
    DDPMCustomPipeline(plain.unet, plain.scheduler, id2label={0: "cat", 1: "dog", 2: "emu"}).save_pretrained(tmp_path / "model")
    pipe = DDPMCustomPipeline.from_pretrained(tmp_path / "model")
    common = ["generate", "--model", str(tmp_path / "model"), "--num-images", "4", "--steps", "4", "--seed", "5"]

    def drawn(*extra):
        assert main([*common, *extra, "--out", str(tmp_path / "grid.png")]) == 0
        return np.asarray(Image.open(tmp_path / "grid.png"))

    def by_hand(labels, **guidance):
        images = pipe(batch_size=4, num_inference_steps=4, eta=0.0, class_labels=labels,
                      generator=seeds(5, 4), **guidance).images
        return np.asarray(grid(images))

    np.testing.assert_array_equal(drawn(), by_hand([0, 1, 2, 0]))
    np.testing.assert_array_equal(drawn("--batch-size", "3"), by_hand([0, 1, 2, 0]))  # labels follow the image, not the batch
    np.testing.assert_array_equal(drawn("--class-label", "2"), by_hand(2))
    np.testing.assert_array_equal(drawn("--class-label", "emu"), by_hand(2))  # by the name the model gives it
    assert main([*common, "--class-label", "yak"]) == 2
    assert "Unknown class names ['yak']; this model's classes are 'cat', 'dog', 'emu'" in capsys.readouterr().err
    interval = drawn("--guidance-scale", "3", "--guidance-interval", "10", "30")  # of the chain 36, 24, 12, 0: two
    np.testing.assert_array_equal(interval, by_hand([0, 1, 2, 0], guidance_scale=3.0, guidance_interval=(10, 30)))
    assert not np.array_equal(interval, by_hand([0, 1, 2, 0], guidance_scale=3.0))
    assert main([*common, "--guidance-interval", "10", "30"]) == 2
    assert "give both" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: the pipeline's no-labels warning is not repeated at the user
        null = drawn("--null-class")
    with pytest.warns(UserWarning, match="null class"):
        np.testing.assert_array_equal(null, by_hand(None))
    assert not np.array_equal(by_hand(None), by_hand([0, 1, 2, 0]))
    assert main([*common, "--null-class", "--guidance-scale", "2"]) == 2
    assert "no class to guide towards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--null-class", "--class-label", "1"])  # one or the other
    tiny_pipeline(num_train_timesteps=50).save_pretrained(tmp_path / "plain")
    assert main(["generate", "--model", str(tmp_path / "plain"), "--null-class"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_each_image_is_its_seed_whatever_the_batch_and_saves_alone(tmp_path):
    """Image i comes from seed SEED + i (as in the Space, evaluate and the cards), so an image does not change with
    the number of images around it or with --batch-size, even where every step draws noise (ancestral sampling);
    --save-images writes each."""
    import numpy as np

    from pipeline_ddpm_custom.cli import main

    tiny_pipeline(num_train_timesteps=50).save_pretrained(tmp_path / "model")
    common = ["generate", "--model", str(tmp_path / "model"), "--steps", "8", "--eta", "1", "--out", str(tmp_path / "grid.png")]
    assert main([*common, "--num-images", "5", "--batch-size", "2", "--seed", "10", "--save-images", str(tmp_path / "five")]) == 0
    assert main([*common, "--num-images", "2", "--seed", "13", "--save-images", str(tmp_path / "two")]) == 0
    assert sorted(os.listdir(tmp_path / "five")) == [f"{i:05d}.png" for i in range(5)]
    for i in range(2):  # seeds 13 and 14: images 3 and 4 of the five
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / f"{i:05d}.png")),
                                      np.asarray(Image.open(tmp_path / "five" / f"{i + 3:05d}.png")))
    assert main([*common, "--batch-size", "0"]) == 2


def test_the_demo_command_draws_the_bundled_models_card_pictures(tmp_path):
    """`make demo`'s command (the bundled model, DDIM 50, guidance 1.2 in t = 80-580, seed 0) draws exactly the
    16 images of the bundled samples.png that the model card shows (training/bundle_model.py drew them), up to
    rounding: the card was drawn on an AVX-512 CPU, and oneDNN's AVX2 kernels sum in another order, which can move
    a pixel by one gray level after 50 steps (one pixel of the 12,544 on an AVX2 EPYC). Another seed rule or
    sampler changes every image by tens of gray levels."""
    import numpy as np

    from pipeline_ddpm_custom.cli import main

    assert main(["generate", "--model", str(ROOT / "models" / "ddpm-fashion-mnist"), "--num-images", "16", "--steps", "50",
                 "--eta", "0", "--guidance-scale", "1.2", "--guidance-interval", "80", "580", "--seed", "0",
                 "--out", str(tmp_path / "grid.png"), "--save-images", str(tmp_path / "images")]) == 0
    card = np.asarray(Image.open(ROOT / "models" / "ddpm-fashion-mnist" / "samples.png").convert("L"))  # 2 rows of 8, RGB
    for i in range(16):
        row, col = divmod(i, 8)
        tile = card[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28]
        drawn = np.asarray(Image.open(tmp_path / "images" / f"{i:05d}.png")).astype(int)
        difference = np.abs(drawn - tile.astype(int))
        assert difference.max() <= 2 and (difference > 0).mean() <= 0.01, \
            f"image {i}: {(difference > 0).sum()} pixels differ from the card's, by up to {difference.max()} gray levels"
