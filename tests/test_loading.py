"""The three ways to load a saved pipeline, each in a fresh process."""

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline_ddpm_custom import DDPMCustomPipeline

from .conftest import tiny_pipeline

HIDE_PACKAGE = "import sys; sys.modules['pipeline_ddpm_custom'] = None  # the package is not importable\n"
GENERATE = "import numpy as np, torch; np.save({out!r}, pipe(batch_size=2, num_inference_steps=5, output_type='np', generator=torch.Generator().manual_seed(0)).images)\n"


def run_python(code: str, tmp_path):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf_home")}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def saved(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    return pipe, tmp_path / "pipe"


def test_saved_layout_is_remote_code(saved):
    _, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ddpm_custom", "DDPMCustomPipeline"]
    assert index["unet"] == ["unet_ddpm_custom", "DDPMCustomUNet"]
    assert index["scheduler"] == ["scheduling_ddpm_custom", "DDPMCustomScheduler"]
    for path in ("pipeline_ddpm_custom.py", "unet/unet_ddpm_custom.py", "scheduler/scheduling_ddpm_custom.py",
                 "unet/diffusion_pytorch_model.safetensors", "unet/config.json", "scheduler/scheduler_config.json"):
        assert (folder / path).is_file(), path


def expected_images(pipe, tmp_path):
    import torch

    return pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_path1_package_class(saved, tmp_path):
    pipe, folder = saved
    out = tmp_path / "p1.npy"
    run_python(f"from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomUNet\n"
               f"pipe = DDPMCustomPipeline.from_pretrained({str(folder)!r})\n"
               "assert type(pipe.unet) is DDPMCustomUNet, type(pipe.unet)\n" + GENERATE.format(out=str(out)), tmp_path)
    np.testing.assert_allclose(np.load(out), expected_images(pipe, tmp_path), atol=1e-6)


def test_path2_remote_code_without_the_package(saved, tmp_path):
    pipe, folder = saved
    out = tmp_path / "p2.npy"
    run_python(HIDE_PACKAGE + "from diffusers import DiffusionPipeline\n"
               f"pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
               "assert type(pipe).__module__.startswith('diffusers_modules'), type(pipe)\n"
               + GENERATE.format(out=str(out)), tmp_path)
    np.testing.assert_allclose(np.load(out), expected_images(pipe, tmp_path), atol=1e-6)


def test_path2_refuses_without_trust(saved, tmp_path):
    _, folder = saved
    result = subprocess.run([sys.executable, "-c", HIDE_PACKAGE + "from diffusers import DiffusionPipeline\n"
                             f"DiffusionPipeline.from_pretrained({str(folder)!r})"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf_home")}, timeout=300)
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


def test_path3_resave_remote_loaded_pipeline(saved, tmp_path):
    pipe, folder = saved
    out = tmp_path / "p3.npy"
    run_python(HIDE_PACKAGE + "from diffusers import DiffusionPipeline\n"
               f"first = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
               f"first.save_pretrained({str(tmp_path / 'again')!r})\n"
               f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'again')!r}, trust_remote_code=True)\n"
               + GENERATE.format(out=str(out)), tmp_path)
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["unet"] == ["unet_ddpm_custom", "DDPMCustomUNet"]
    np.testing.assert_allclose(np.load(out), expected_images(pipe, tmp_path), atol=1e-6)


def test_swapped_diffusers_scheduler_is_saved_as_diffusers(tmp_path):
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "ddim")
    index = json.loads((tmp_path / "ddim" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    loaded = DDPMCustomPipeline.from_pretrained(tmp_path / "ddim")
    assert isinstance(loaded.scheduler, DDIMScheduler)


def test_fp16_variant_and_dtype(tmp_path):
    import torch

    pipe = tiny_pipeline()
    pipe.to(torch.float16).save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = DDPMCustomPipeline.from_pretrained(tmp_path / "v", variant="fp16", dtype=torch.float32)
    assert loaded.unet.dtype == torch.float32


def diffusers_own_load(folder, **options):
    """The reference: the same folder through diffusers' own loader (the saved remote code)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **options)


@contextlib.contextmanager
def diffusers_log():
    """The warnings diffusers logs meanwhile (conftest quiets them; its loggers do not propagate to pytest's caplog)."""
    from diffusers.utils import logging as diffusers_logging

    messages, verbosity = [], diffusers_logging.get_verbosity()
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    diffusers_logging.set_verbosity_warning()
    try:
        yield messages
    finally:
        diffusers_logging.set_verbosity(verbosity)
        root.removeHandler(handler)


@pytest.mark.parametrize("options", [
    "dtype=torch.float16",
    "dtype={'unet': torch.bfloat16}",
    "dtype={'scheduler': torch.float16}",  # a dict that does not name the unet: diffusers' float32
    "dtype={'default': torch.float16}",
    "use_safetensors=True, low_cpu_mem_usage=False",
    "disable_mmap=True",
])
def test_path1_takes_diffusers_loading_options(saved, options):
    """DDPMCustomPipeline.from_pretrained reads dtype (diffusers 0.42's name; torch_dtype is deprecated there) and the
    model-loading options as diffusers' own loader does: same dtype, same weights."""
    import torch

    _, folder = saved
    options = eval(f"dict({options})", {"torch": torch})
    ours, reference = DDPMCustomPipeline.from_pretrained(folder, **options), diffusers_own_load(folder, **options)
    assert ours.unet.dtype == reference.unet.dtype
    for (name, ours_tensor), (_, reference_tensor) in zip(ours.unet.state_dict().items(), reference.unet.state_dict().items()):
        assert ours_tensor.dtype == reference_tensor.dtype and torch.equal(ours_tensor, reference_tensor), name


def test_path1_reads_torch_dtype_with_diffusers_deprecation(saved):
    import torch

    _, folder = saved
    with pytest.warns(FutureWarning, match="torch_dtype"):
        loaded = DDPMCustomPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16


def test_path1_says_what_a_folder_without_a_pipeline_is(saved, tmp_path):
    """A training checkpoint, one component's folder or any other folder without model_index.json: the error says
    which it is and what to pass (diffusers' loader only says that the file is missing)."""
    _, folder = saved
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    for path, words in [(checkpoint, "is a training checkpoint (accelerate's state), not a saved pipeline: export it "
                                     f"with `python -m training.export_checkpoint {checkpoint} --out DIR`"),
                        (folder / "unet", "holds one component of a pipeline (no model_index.json): pass the folder above it"),
                        (tmp_path / "run", "has no model_index.json: pass a folder written by save_pretrained")]:
        with pytest.raises(OSError) as raised:
            DDPMCustomPipeline.from_pretrained(path)
        assert words in str(raised.value), str(raised.value)


def test_path1_says_when_a_path_is_neither_a_folder_nor_a_repo_id(tmp_path):
    with pytest.raises(OSError, match="neither a folder here nor a Hub repo id"):
        DDPMCustomPipeline.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


@pytest.mark.parametrize("options, error, words", [
    ({"device_map": "balanced"}, TypeError, ["device_map", "pipe.to(device)", "trust_remote_code=True"]),
    ({"dtype": "float16"}, ValueError, ["torch.dtype", "'float16'"]),
    ({"dtype": "f16", "torch_dtype": "f16"}, ValueError, ["not both"]),
])
def test_path1_refuses_what_it_does_not_take_by_name(saved, options, error, words):
    _, folder = saved
    with pytest.raises(error) as raised:
        DDPMCustomPipeline.from_pretrained(folder, **options)
    for word in words:
        assert word in str(raised.value)


def test_a_compiled_unet_saves_as_its_model(tmp_path):
    """pipe.unet = torch.compile(pipe.unet) (as diffusers' speed guides do), then save_pretrained: the folder names and
    carries the UNet's own code, not torch's compile wrapper's, and loads the second way to the same images."""
    import torch

    pipe = tiny_pipeline()
    pipe.unet = torch.compile(pipe.unet)  # a wrapper; nothing compiles until it is called
    pipe.save_pretrained(tmp_path / "compiled")
    assert json.loads((tmp_path / "compiled" / "model_index.json").read_text())["unet"] == ["unet_ddpm_custom", "DDPMCustomUNet"]
    assert sorted(os.listdir(tmp_path / "compiled" / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                                  "unet_ddpm_custom.py"]
    out = tmp_path / "compiled.npy"
    run_python(HIDE_PACKAGE + "from diffusers import DiffusionPipeline\n"
               f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'compiled')!r}, trust_remote_code=True)\n"
               + GENERATE.format(out=str(out)), tmp_path)
    pipe.unet = pipe.unet._orig_mod
    np.testing.assert_allclose(np.load(out), expected_images(pipe, tmp_path), atol=1e-6)


def test_id2label_survives_all_three_ways(tmp_path):
    """id2label (diffusers' DiTPipeline's name) is saved in model_index.json and read back by our loader, by
    diffusers' own (remote code) and by a save of what diffusers loaded; ids come back as ints."""
    from pipeline_ddpm_custom import DDPMCustomScheduler

    from .conftest import tiny_unet

    names = {0: "cat", 1: "dog", 2: "emu"}
    DDPMCustomPipeline(tiny_unet(num_class_embeds=3), DDPMCustomScheduler(num_train_timesteps=20), id2label=names
                       ).save_pretrained(tmp_path / "named")
    assert json.loads((tmp_path / "named" / "model_index.json").read_text())["id2label"] == {"0": "cat", "1": "dog", "2": "emu"}
    with diffusers_log() as log:
        ours, reference = DDPMCustomPipeline.from_pretrained(tmp_path / "named"), diffusers_own_load(tmp_path / "named")
    assert not [line for line in log if "id2label" in line], log  # diffusers checks the JSON's text keys against the annotation
    assert ours.config.id2label == reference.config.id2label == names
    assert ours.get_label_ids(["emu", "cat"]) == reference.get_label_ids(["emu", "cat"]) == [2, 0]
    reference.save_pretrained(tmp_path / "again")
    assert DDPMCustomPipeline.from_pretrained(tmp_path / "again").config.id2label == names


def test_from_pipe_shares_the_unet_and_the_class_names(tmp_path):
    """diffusers' from_pipe, which moves a model over only when its class is the annotated one: ours hands the UNet over,
    so a pipeline made from ours (or from the remote-code copy, or from diffusers' DDPMPipeline) shares its UNet, keeps
    id2label and samples as the original with the scheduler swapped by hand."""
    import torch
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

    from pipeline_ddpm_custom import DDPMCustomScheduler

    from .conftest import tiny_unet

    def images(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0),
                    **kwargs).images

    names = {0: "cat", 1: "dog", 2: "emu"}
    DDPMCustomPipeline(tiny_unet(num_class_embeds=3), DDPMCustomScheduler(num_train_timesteps=20), id2label=names
                       ).save_pretrained(tmp_path / "named")
    for original in (DDPMCustomPipeline.from_pretrained(tmp_path / "named"), diffusers_own_load(tmp_path / "named")):
        ddim = type(original).from_pipe(original, scheduler=DDIMScheduler.from_config(original.scheduler.config))
        assert ddim.unet is original.unet and ddim.config.id2label == names
        assert type(original.scheduler).__name__ == "DDPMCustomScheduler"  # the original keeps its own
        by_hand = type(original)(unet=original.unet, scheduler=DDIMScheduler.from_config(original.scheduler.config))
        np.testing.assert_array_equal(images(ddim, class_labels=["emu", "cat"]), images(by_hand, class_labels=[2, 0]))

    theirs = DDPMPipeline(unet=tiny_pipeline().unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    ours = DDPMCustomPipeline.from_pipe(theirs)
    assert ours.unet is theirs.unet and isinstance(ours.scheduler, DDPMScheduler)
    np.testing.assert_allclose(images(ours), images(theirs), atol=1e-6)
