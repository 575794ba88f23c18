import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from .conftest import tiny_pipeline


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_same_seed_same_images_as_diffusers_ddpm_pipeline(pipe):
    """Noise is drawn exactly as diffusers draws it: DDPMPipeline + DDPMScheduler gives the same images."""
    ref = DDPMPipeline(unet=pipe.unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    ref.set_progress_bar_config(disable=True)
    expected = ref(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=100, output_type="np").images
    ours = run(pipe, seed=3, batch_size=2, num_inference_steps=100)
    # float64 tables (ours) vs float32 (diffusers) differ by ~1e-5 per chain: far below one 8-bit grey level
    np.testing.assert_allclose(ours, expected, atol=0.25 / 255)
    assert not np.allclose(ours, run(pipe, seed=4, batch_size=2, num_inference_steps=100), atol=0.1)


def test_custom_timesteps_follow_diffusers_ddpm_scheduler(pipe):
    """pipe(timesteps=[...]) runs exactly that chain: the same images as diffusers' DDPMScheduler given the
    same list, the same as num_inference_steps when the list is the scheduler's own spacing."""
    chain = [99, 60, 30, 12, 5, 2, 0]  # uneven on purpose: denser near t = 0
    ours = run(pipe, seed=3, batch_size=2, timesteps=chain)
    assert pipe.scheduler.timesteps.tolist() == chain
    ref = DDPMScheduler.from_config(pipe.scheduler.config)
    reference = type(pipe)(unet=pipe.unet, scheduler=ref)
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(ours, run(reference, seed=3, batch_size=2, timesteps=chain), atol=0.25 / 255)
    assert not np.allclose(ours, run(pipe, seed=3, batch_size=2, timesteps=[99, 50, 0]), atol=0.05)

    pipe.scheduler.set_timesteps(10)
    spaced = pipe.scheduler.timesteps.tolist()
    np.testing.assert_array_equal(run(pipe, seed=1, timesteps=spaced, eta=0.0), run(pipe, seed=1, num_inference_steps=10, eta=0.0))

    with pytest.raises(ValueError, match="either num_inference_steps or timesteps"):
        pipe(num_inference_steps=3, timesteps=chain)
    ddim = type(pipe)(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    with pytest.raises(ValueError, match="DDIMScheduler does not take custom timesteps"):
        ddim(timesteps=chain)


def test_determinism_by_seed(pipe):
    a, b, c = run(pipe, 1, batch_size=2, num_inference_steps=10), run(pipe, 1, batch_size=2, num_inference_steps=10), run(pipe, 2, batch_size=2, num_inference_steps=10)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_generator_list_gives_each_sample_its_own_seed(pipe):
    batch = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)],
                 num_inference_steps=10, eta=1.0, output_type="np").images
    for i, seed in enumerate((5, 6, 7)):
        single = run(pipe, seed, batch_size=1, num_inference_steps=10, eta=1.0)
        np.testing.assert_allclose(batch[i : i + 1], single, atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        pipe(batch_size=2, generator=[torch.Generator()])


def test_output_types(pipe):
    pil = pipe(batch_size=2, num_inference_steps=2, output_type="pil").images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "L"
    arr = run(pipe, batch_size=2, num_inference_steps=2)
    assert arr.shape == (2, 8, 8, 1) and arr.min() >= 0 and arr.max() <= 1
    pt = run(pipe, batch_size=2, num_inference_steps=2, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1, 8, 8)
    tup = pipe(num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (1, 8, 8, 1)


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors)))
        assert tensors["pred_original_sample"].shape == tensors["latents"].shape
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 4 else {}

    images = run(pipe, batch_size=1, num_inference_steps=5, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])
    assert [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    np.testing.assert_allclose(images, 0.5)  # zero latents -> mid-grey
    with pytest.raises(ValueError, match="unknown"):
        pipe(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_a_callback_can_interrupt_the_loop(pipe):
    """diffusers' convention: a callback sets pipe._interrupt; no later step calls the UNet, the images are those of
    the latents at that step, and the next call runs in full."""
    calls, seen = [], {}
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))

    def stop_after_third(p, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        if i == 2:
            p._interrupt = True
        return {}

    try:
        images = run(pipe, batch_size=2, num_inference_steps=10, callback_on_step_end=stop_after_third, output_type="pt")
        assert len(calls) == 3 and sorted(seen) == [0, 1, 2] and pipe.interrupt and pipe.num_timesteps == 10
        torch.testing.assert_close(images, (seen[2] / 2 + 0.5).clamp(0, 1))
        calls.clear()
        run(pipe, batch_size=2, num_inference_steps=10)
        assert len(calls) == 10 and not pipe.interrupt
    finally:
        hook.remove()


def test_diffusers_pipeline_callbacks_can_cut_guidance_off():
    """A diffusers PipelineCallback that sets pipe._guidance_scale = 0 after a step (as diffusers' SD cutoff callbacks
    do) leaves the later steps unguided: the same images as guidance_interval holding only the earlier steps.
    MultiPipelineCallbacks runs several, with the tensor inputs they ask for; one asking for what this pipeline does
    not have is refused."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    class GuidanceCutoff(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            cutoff = self.config.cutoff_step_index
            if step_index == (cutoff if cutoff is not None else int(pipeline.num_timesteps * self.config.cutoff_step_ratio)):
                pipeline._guidance_scale = 0.0
            return callback_kwargs

    class Recorder(PipelineCallback):
        tensor_inputs = ["pred_original_sample"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            assert callback_kwargs["pred_original_sample"] is not None
            self.scales.append(pipeline.guidance_scale)
            return callback_kwargs

    pipe = tiny_pipeline(num_class_embeds=3)
    common = dict(batch_size=2, num_inference_steps=10, eta=0.0, class_labels=[0, 2], guidance_scale=3.0)
    recorder = Recorder()
    recorder.scales = []
    cut = run(pipe, **common, callback_on_step_end=MultiPipelineCallbacks([GuidanceCutoff(cutoff_step_ratio=None, cutoff_step_index=3), recorder]))
    assert recorder.scales == [3.0] * 3 + [0.0] * 7 and not pipe.do_classifier_free_guidance
    assert pipe.scheduler.timesteps[:4].tolist() == [90, 80, 70, 60]  # guided: steps 0-3, the cutoff step's model call included
    np.testing.assert_array_equal(cut, run(pipe, **common, guidance_interval=(60, 99)))
    np.testing.assert_array_equal(run(pipe, **common, callback_on_step_end=GuidanceCutoff(cutoff_step_ratio=0.5)),
                                  run(pipe, **common, guidance_interval=(40, 99)))
    assert not np.allclose(cut, run(pipe, **common), atol=0.01)

    class WantsPromptEmbeds(GuidanceCutoff):
        tensor_inputs = ["prompt_embeds"]

    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs \['prompt_embeds'\] unknown"):
        pipe(batch_size=1, class_labels=0, num_inference_steps=2, callback_on_step_end=WantsPromptEmbeds())


def test_img2img_strength(pipe):
    image = np.random.default_rng(0).random((8, 8, 1)).astype(np.float32)
    same = run(pipe, image=image, strength=0.0, num_inference_steps=10)
    np.testing.assert_allclose(same[0], image, atol=1e-6)
    steps = []
    run(pipe, image=image, strength=0.5, num_inference_steps=10, callback_on_step_end=lambda p, i, t, k: steps.append(int(t)) or {})
    assert steps == pipe.scheduler.timesteps[5:].tolist()
    pil = Image.fromarray((image[:, :, 0] * 255).astype(np.uint8))
    out = run(pipe, image=[pil, pil], strength=0.3, num_inference_steps=10)
    assert out.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="strength"):
        pipe(image=image, strength=1.5)


def test_img2img_reads_every_usual_image_form_as_its_pil_image_would_be(pipe):
    """strength 0 returns the image as the pipeline read it: 8-bit arrays, float arrays, tensors, color arrays for a
    grayscale model and 4-D batches read as the same picture given as a PIL image (PIL's own conversions are the
    reference: convert("L") for color)."""
    rng = np.random.default_rng(1)
    gray8, color8 = rng.integers(0, 256, (8, 8), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    as_pil = run(pipe, image=Image.fromarray(gray8), strength=0.0)
    with_alpha = np.stack([gray8, np.full_like(gray8, 255)], axis=-1)
    for same in (gray8, gray8[:, :, None], with_alpha, gray8.astype(np.float32) / 255, torch.from_numpy(gray8)[None],
                 torch.from_numpy(gray8)[None].float() / 255):
        np.testing.assert_allclose(run(pipe, image=same, strength=0.0), as_pil, atol=1e-6)
    color_as_pil = run(pipe, image=Image.fromarray(color8), strength=0.0)  # PIL rounds its luma to 8 bits
    for same in (color8, color8.astype(np.float32) / 255):
        np.testing.assert_allclose(run(pipe, image=same, strength=0.0), color_as_pil, atol=0.5 / 255 + 1e-6)
    # 4-D batches, (B, H, W, C) arrays and (B, C, H, W) tensors as diffusers reads them: one sample per image, as for a list
    as_list = run(pipe, image=[Image.fromarray(gray8), Image.fromarray(255 - gray8)], strength=0.0)
    batch = np.stack([gray8, 255 - gray8])[:, :, :, None]
    for same in (batch, torch.from_numpy(batch).permute(0, 3, 1, 2)):
        np.testing.assert_allclose(run(pipe, image=same, strength=0.0), as_list, atol=1e-6)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got values up to 255.*divide 0-255 values by 255"):
        pipe(image=gray8.astype(np.float32), strength=0.5, num_inference_steps=2)


def test_img2img_gives_a_color_model_gray_images_as_pil_would():
    rgb = tiny_pipeline(in_channels=3)
    gray8 = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)
    as_pil = run(rgb, image=Image.fromarray(gray8), strength=0.0)
    assert as_pil.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(run(rgb, image=gray8.astype(np.float32) / 255, strength=0.0), as_pil, atol=1e-6)
    rgba8 = np.random.default_rng(3).integers(0, 256, (8, 8, 4), dtype=np.uint8)  # PIL drops the alpha too
    np.testing.assert_allclose(run(rgb, image=rgba8, strength=0.0), run(rgb, image=Image.fromarray(rgba8), strength=0.0),
                               atol=1e-6)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_swapped_diffusers_schedulers_follow_their_contract(pipe, scheduler_cls):
    """The pipeline's loop equals the canonical loop written out here: init_noise_sigma, scale_model_input, step."""
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    ours = run(pipe, 4, batch_size=2, num_inference_steps=8, eta=0.0, output_type="pt")
    scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(8)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((2, 1, 8, 8), generator=gen) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipe.unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, **({"generator": gen} if scheduler_cls is not DDIMScheduler else {"eta": 0.0})).prev_sample
    torch.testing.assert_close(ours, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_classifier_free_guidance():
    pipe = tiny_pipeline(num_class_embeds=3)
    plain = run(pipe, batch_size=2, num_inference_steps=5, class_labels=[0, 1])
    guided = run(pipe, batch_size=2, num_inference_steps=5, class_labels=[0, 1], guidance_scale=3.0)
    other = run(pipe, batch_size=2, num_inference_steps=5, class_labels=2)
    assert not np.allclose(plain, guided) and not np.allclose(plain, other)
    with pytest.warns(UserWarning, match="null class.*Pass class_labels") as caught:
        unconditional = run(pipe, batch_size=2, num_inference_steps=5)  # no labels: the null class
    assert unconditional.shape == plain.shape
    assert caught[0].filename == __file__  # it points at the caller's line, not the pipeline's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labels, or a model without classes: nothing to warn about
        run(pipe, batch_size=2, num_inference_steps=2, class_labels=[0, 1])
        run(tiny_pipeline(), batch_size=2, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"\[0, 2\] \(this model's classes\); got \[3\]\.$"):
        pipe(batch_size=4, class_labels=3)  # four copies of one wrong label: named once
    with pytest.raises(ValueError, match=r"got \[-1, 5\]\.$"):
        pipe(batch_size=3, class_labels=[5, 0, -1])
    with pytest.raises(ValueError, match="one label or one per image"):
        pipe(batch_size=3, class_labels=[0, 1])


def test_class_names_sample_as_their_ids():
    from pipeline_ddpm_custom import DDPMCustomPipeline

    plain = tiny_pipeline(num_class_embeds=3)
    pipe = DDPMCustomPipeline(plain.unet, plain.scheduler, id2label={0: "cat", 1: "dog", 2: "emu"})
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(pipe, batch_size=3, num_inference_steps=3, class_labels=["emu", "cat", "dog"]),
                                  run(pipe, batch_size=3, num_inference_steps=3, class_labels=[2, 0, 1]))
    np.testing.assert_array_equal(run(pipe, batch_size=2, num_inference_steps=3, class_labels="dog"),
                                  run(pipe, batch_size=2, num_inference_steps=3, class_labels=1))
    assert pipe.get_label_ids("emu") == [2] and pipe.labels == {"cat": 0, "dog": 1, "emu": 2}
    with pytest.raises(ValueError, match=r"Unknown class names \['cow'\]; this model's classes are 'cat', 'dog', 'emu'"):
        pipe(batch_size=1, class_labels="cow", num_inference_steps=2)
    with pytest.raises(ValueError, match="no id2label"):
        plain(batch_size=1, class_labels="dog", num_inference_steps=2)
    with pytest.raises(ValueError, match=r"id2label names the classes \[0, 3\], but the unet has 3 classes"):
        DDPMCustomPipeline(plain.unet, plain.scheduler, id2label={0: "cat", 3: "yak"})
    with pytest.raises(ValueError, match="but the unet has no classes"):
        DDPMCustomPipeline(tiny_pipeline().unet, plain.scheduler, id2label={0: "cat"})


def test_guidance_interval_guides_only_the_steps_inside_it():
    """guidance_interval=(30, 60): the loop written out here with diffusers' DDIMScheduler, guiding by hand (two
    UNet calls, eps = uncond + s (cond - uncond)) only where 30 <= t <= 60 and taking the conditional prediction
    elsewhere; an interval holding every step is plain guidance, one holding none is no guidance."""
    pipe = tiny_pipeline(num_class_embeds=3)
    labels = torch.tensor([0, 2])
    ours = run(pipe, 4, batch_size=2, num_inference_steps=10, eta=0.0, class_labels=labels, guidance_scale=3.0,
               guidance_interval=(30, 60), output_type="pt")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    guided_steps = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipe.unet(x, t, class_labels=labels).sample
            if 30 <= int(t) <= 60:
                guided_steps.append(int(t))
                uncond = pipe.unet(x, t, class_labels=torch.full_like(labels, 3)).sample
                out = uncond + 3.0 * (out - uncond)
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample  # as ours (clip_sample)
    assert guided_steps == [60, 50, 40, 30]
    torch.testing.assert_close(ours, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)

    common = dict(batch_size=2, num_inference_steps=10, eta=0.0, class_labels=labels)
    guided, unguided = run(pipe, **common, guidance_scale=3.0), run(pipe, **common)
    np.testing.assert_array_equal(run(pipe, **common, guidance_scale=3.0, guidance_interval=(0, 99)), guided)
    np.testing.assert_array_equal(run(pipe, **common, guidance_scale=3.0, guidance_interval=(91, 99)), unguided)
    assert not np.allclose(guided, unguided, atol=0.01) and not np.allclose(ours.permute(0, 2, 3, 1).numpy(), guided, atol=0.01)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch_size=0), "positive integer"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(guidance_scale=2.0, guidance_interval=(60, 30)), r"guidance_interval .*lowest <= highest.*\(60, 30\)"),
        (dict(guidance_scale=2.0, guidance_interval=50), "guidance_interval must be two timesteps"),
        (dict(output_type="latent"), "output_type"),
        (dict(class_labels=1), "unconditional"),
        (dict(num_inference_steps=101), "1 to 100"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), "latents must have shape"),
    ],
)
def test_bad_arguments_raise(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
