import os
import subprocess
import sys

from PIL import Image

from .conftest import tiny_pipeline


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


def test_missing_model_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline_ddpm_custom", "generate", "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stderr.startswith("error:")
