"""Gradio demo of pipeline-ddpm-custom: generate, watch the denoising, explore the forward process,
image to image. Run locally with `python space/app.py` (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
are honoured); the model comes from MODEL_ID (Hub repo id or folder), default the bundled one."""

import contextlib
import functools
import inspect
import math
import os
import random
import sys

# offline-safe defaults, before gradio / huggingface_hub are imported
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the library, when run from a checkout

import gradio as gr  # noqa: E402

import inference  # noqa: E402
from pipeline_ddpm_custom.pictures import enlarge  # noqa: E402

try:  # ZeroGPU on Hugging Face Spaces; a no-op everywhere else
    import spaces

    gpu = spaces.GPU(duration=60)
except ImportError:
    def gpu(fn):
        return fn

EXAMPLES_DIR = os.path.join(HERE, "examples")
# the class dropdown's values besides "0".."K-1"; every class in turn is the default because the null class, what the
# pipeline samples without labels, is a far weaker model (pipeline_ddpm_custom/labels.py)
EVERY_CLASS, NULL_CLASS = "every", "null"


def class_title(label, id2label):
    """"3: Dress" for a class the model names (its id2label); None for one it does not."""
    return f"{label}: {id2label[label]}" if id2label and label in id2label else None


def class_choices(classes, id2label=None):
    """The class dropdown's (label, value) pairs, "3: Dress" where the model names its classes (id2label); none for an
    unconditional model. The values stay the ids, which the API and the examples use."""
    if not classes:
        return []
    return [("every class in turn", EVERY_CLASS), *[(class_title(i, id2label) or str(i), str(i)) for i in range(classes)],
            ("none: the null class (unconditional, weaker)", NULL_CLASS)]


def class_from_choice(value):
    """(class label, null class?) of a class dropdown value: every class in turn (the default, also for an API caller
    that names none) and the null class carry no label."""
    null = value == NULL_CLASS
    return (None if null or value in (None, "", EVERY_CLASS) else int(value)), null


def image_captions(labels, seeds, pipe):
    """Each generated image's class and seed under it ("3: Dress, seed 7"; "class 3" where the model has no names,
    "null class"; the seed alone for an unconditional model), from what it was sampled with: one image of the
    batch is drawn again alone by its seed and class."""
    if not pipe.unet.config.num_class_embeds:
        return [f"seed {seed}" for seed in seeds]
    if labels is None:
        return [f"null class, seed {seed}" for seed in seeds]
    return [f"{class_title(label, pipe.config.id2label) or f'class {label}'}, seed {seed}" for label, seed in zip(labels, seeds)]


def example_class(path, classes):
    """The class dropdown value of an example image, from its name ("3-dress.png" -> "3"); the null class where the
    model has no such class."""
    prefix = os.path.basename(path).split("-")[0]
    return prefix if classes and prefix.isdigit() and int(prefix) < classes else (NULL_CLASS if classes else None)


def guidance_for_class(class_label, guidance_scale):
    """The guidance slider after a class choice: 1 for the null class (it has no class to guide towards, and the
    request would be refused), unchanged otherwise."""
    return 1.0 if class_label == NULL_CLASS else guidance_scale


def guidance_interval_from(guide_in_interval, guided_from, guided_to):
    """The request's guidance interval from the checkbox and its two timestep boxes; None (every step) when unticked."""
    if not guide_in_interval:
        return None
    if guided_from is None or guided_to is None:
        raise inference.RequestError("Fill in both timesteps of the guidance interval, or untick it to guide every step.")
    return int(guided_from), int(guided_to)


def generate_request(num_images, sampler, steps, eta, seed, class_label, guidance_scale, guide_in_interval, guided_from,
                     guided_to) -> inference.GenerateRequest:
    """The request the Generate tab's form values make (the class dropdown's value and the interval's three boxes
    turned into the pipeline's terms)."""
    label, null = class_from_choice(class_label)
    return inference.GenerateRequest(num_images=num_images, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                     class_label=label, null_class=null, guidance_scale=guidance_scale,
                                     guidance_interval=guidance_interval_from(guide_in_interval, guided_from, guided_to))


# the Generate tab's examples: (label, images, sampler, steps, eta, seed), each sampler as README measured it
EXAMPLE_SAMPLERS = [("DDIM", 16, "DDIM (deterministic)", 50, 0.0, 0),
                    ("DDIM", 16, "DDIM (deterministic)", 10, 0.0, 1),
                    ("DDPM ancestral", 4, "DDPM (ancestral)", 250, 1.0, 2),
                    ("DPM-Solver++", 16, "DPM-Solver++ (multistep)", 10, 0.0, 1),
                    ("SDE-DPM-Solver++", 16, "SDE-DPM-Solver++ (multistep)", 50, 0.0, 0)]


def generate_examples(conditional, num_train_timesteps):
    """The Generate tab's examples as (label, row) pairs, a row holding num_images, sampler, steps, eta, seed and
    randomize seed (off), and for a class-conditional model also class, guidance scale, interval box ticked, from t and
    to t: an example sets the seed and the guidance too, so that it draws what its label says whatever the visitor
    changed before. The first is the setting that measured best for the bundled model (README, "Samplers at 50
    steps"), the second the same unguided, the rest each sampler as it was measured, unguided. Steps are capped at the
    model's timesteps."""
    samplers = []
    for name, num_images, sampler, steps, eta, seed in EXAMPLE_SAMPLERS:
        steps = min(steps, num_train_timesteps, inference.MAX_STEPS)
        samplers.append((f"{name}, {steps} steps", [num_images, sampler, steps, eta, seed, False]))
    if not conditional:
        return samplers
    low, high = inference.best_guidance_interval(num_train_timesteps)
    scale = inference.BEST_GUIDANCE_SCALE
    # labels stay under 60 characters, beyond which Gradio cuts them short
    best = (f"{samplers[0][0]}, guidance {scale} at t = {low}-{high}",
            samplers[0][1] + [EVERY_CLASS, scale, True, low, high])
    unguided = [(f"{label}, no guidance", row + [EVERY_CLASS, 1.0, False, low, high]) for label, row in samplers]
    return [best, *unguided]


def _gr_error(fn):
    """Turn the library's RequestError / ValueError into a gr.Error the visitor can act on."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as error:
                raise gr.Error(str(error))
    else:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ValueError as error:
                raise gr.Error(str(error))
    return wrapped


def build_demo(pipe) -> gr.Blocks:
    conditional = bool(pipe.unet.config.num_class_embeds)
    T = pipe.scheduler.config.num_train_timesteps
    example_images = sorted(os.path.join(EXAMPLES_DIR, f) for f in os.listdir(EXAMPLES_DIR)) if os.path.isdir(EXAMPLES_DIR) else []

    @gpu
    @_gr_error
    def generate(num_images=16, sampler="DDIM (deterministic)", steps=50, eta=None, seed=0, randomize_seed=False,
                 class_label=None, guidance_scale=1.0, guide_in_interval=False, guided_from=None, guided_to=None,
                 progress=gr.Progress()):
        """Generate images; streams the x0 prediction while denoising. Returns (preview, images, gif, seed).
        guide_in_interval: guidance only where guided_from <= t <= guided_to."""
        if randomize_seed:
            seed = random.randint(0, 2**31 - 1)
        request = generate_request(num_images, sampler, steps, eta, seed, class_label, guidance_scale,
                                   guide_in_interval, guided_from, guided_to)
        # closed with this generator (Gradio closes it on Stop or when the page goes): the pipeline stops too
        with contextlib.closing(inference.generate_stream(pipe, request)) as updates:
            for update in updates:
                if "preview" in update:
                    progress((update["step"], update["total"]), desc="denoising")
                    yield enlarge(update["preview"], 448), None, None, seed
                else:
                    images = inference.upscale(update["images"])
                    captions = image_captions(update["labels"], update["seeds"], pipe)
                    yield gr.skip(), list(zip(images, captions)), update["gif"], seed

    @_gr_error
    def explore(image, t, seed=0):
        x_t, snr = inference.forward_process(pipe, image, int(t), int(seed))
        return x_t, f"t = {int(t)}   SNR = {snr:.4g}   ({10 * math.log10(max(snr, 1e-30)):.1f} dB)"

    @gpu
    @_gr_error
    def img2img(image, strength=0.5, steps=50, seed=0, class_label=None, progress=gr.Progress()):
        """Denoise a noised image; yields at every step (nothing shown until the end) so that Stop can close it."""
        label, _ = class_from_choice(class_label)  # no label: the null class, for an upload of unknown class
        request = inference.image_to_image_request(pipe, image, strength, steps, seed, class_label=label)
        with contextlib.closing(inference.generate_stream(pipe, request, animate=False)) as updates:
            for update in updates:
                if "preview" in update:
                    progress((update["step"], update["total"]), desc="denoising")
                    yield gr.skip()
                else:
                    yield inference.upscale(update["images"])

    with gr.Blocks(title="DDPM: denoising diffusion, step by step") as demo:
        gr.Markdown(
            "# Denoising diffusion, step by step\n"
            "A DDPM (Ho et al., 2020) trained on Fashion-MNIST with "
            "[pipeline-ddpm-custom](https://pypi.org/project/pipeline-ddpm-custom/). "
            "Generate images, watch them emerge from noise, and explore how noise is added."
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    num_images = gr.Slider(1, inference.MAX_IMAGES, value=16, step=1, label="Number of images", elem_id="num_images")
                    # bundled model at 50 steps (README, "Samplers at 50 steps"): DDIM guided in the interval below best,
                    # SDE-DPM-Solver++ best unguided; DDIM the default (its output is a fixed function of the seed's noise)
                    sampler = gr.Dropdown(list(inference.SAMPLERS), value="DDIM (deterministic)", label="Sampler", elem_id="sampler")
                    steps = gr.Slider(1, min(T, inference.MAX_STEPS), value=50, step=1, label="Steps", elem_id="steps")
                    eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="eta (0 = DDIM, 1 = DDPM; DDIM/DDPM samplers)", elem_id="eta")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                        randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="randomize")
                    class_label = gr.Dropdown(class_choices(pipe.unet.config.num_class_embeds, pipe.config.id2label), value=EVERY_CLASS if conditional else None,
                                              label="Class", visible=conditional, elem_id="class_label")
                    # the defaults are the guidance that measured best for the bundled model (inference.BEST_GUIDANCE_*):
                    # guidance at every step costs FID, a little of it in the middle of the chain gains
                    guidance = gr.Slider(1.0, 10.0, value=inference.BEST_GUIDANCE_SCALE if conditional else 1.0, step=0.1,
                                         label="Guidance scale (1 = none)", visible=conditional, elem_id="guidance")
                    best_from, best_to = inference.best_guidance_interval(T)
                    with gr.Group(visible=conditional):
                        guide_in_interval = gr.Checkbox(value=conditional, elem_id="guide_in_interval",
                                                        label="Guide only between the two timesteps below (no guidance elsewhere)")
                        with gr.Row():
                            guided_from = gr.Number(value=best_from, precision=0, minimum=0, maximum=T - 1, label="from t",
                                                    elem_id="guided_from")
                            guided_to = gr.Number(value=best_to, precision=0, minimum=0, maximum=T - 1, label="to t",
                                                  elem_id="guided_to")
                    with gr.Row():
                        button = gr.Button("Generate", variant="primary", elem_id="generate")
                        # ends a running generation: its steps stop at once, freeing the CPU for the queue
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column(scale=2):
                    preview = gr.Image(label="Live preview: the current x0 prediction", type="pil", elem_id="preview", height=320)
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery", format="png", height=420)
            gif = gr.Image(label="Denoising animation (GIF, download with the button)", type="filepath", elem_id="gif",
                           format="gif", buttons=["download"])
            sampler.change(lambda s: 1.0 if s.startswith("DDPM") else 0.0, sampler, eta, api_visibility="private")
            class_label.change(guidance_for_class, [class_label, guidance], guidance, api_visibility="private")
            generating = button.click(generate, [num_images, sampler, steps, eta, seed, randomize, class_label, guidance,
                                                 guide_in_interval, guided_from, guided_to],
                                      [preview, gallery, gif, seed], api_name="generate")
            stop.click(None, None, None, cancels=[generating], api_visibility="private")
            examples = generate_examples(conditional, T)
            example_inputs = [num_images, sampler, steps, eta, seed, randomize]
            if conditional:
                example_inputs += [class_label, guidance, guide_in_interval, guided_from, guided_to]
            gr.Examples([row for _, row in examples], example_inputs, example_labels=[label for label, _ in examples],
                        label="Examples (fill the settings; press Generate)" + (
                            ": the first measured best for the bundled model" if conditional else ""),
                        elem_id="generate_examples")
        with gr.Tab("Forward process"):
            gr.Markdown("q(x_t | x_0): the image at noise level t. The signal-to-noise ratio is abar_t / (1 - abar_t).")
            with gr.Row():
                source = gr.Image(label="Image (pick an example or upload)", type="pil", elem_id="forward_source",
                                  value=example_images[0] if example_images else None, height=224)
                noisy = gr.Image(label="x_t", type="pil", elem_id="forward_output", height=224)
            t = gr.Slider(0, T - 1, value=T // 4, step=1, label="t", elem_id="forward_t")
            snr_text = gr.Textbox(label="Signal-to-noise ratio", elem_id="forward_snr")
            t.change(explore, [source, t], [noisy, snr_text], api_name="forward_process", trigger_mode="always_last")
            source.change(explore, [source, t], [noisy, snr_text], api_visibility="private")
            if example_images:
                gr.Examples([[p] for p in example_images], [source], label="Fashion-MNIST test images")
        with gr.Tab("Image to image"):
            gr.Markdown("Noise an image to `strength` of the way up the chain, then denoise it (the seed notes' `sample(start_step, prior)`).")
            with gr.Row():
                with gr.Column():
                    prior = gr.Image(label="Image", type="pil", elem_id="i2i_source", height=224)
                    strength = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Strength", elem_id="i2i_strength")
                    i2i_steps = gr.Slider(1, min(T, inference.MAX_STEPS), value=50, step=1, label="Steps")
                    i2i_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    # an upload's class is unknown, so the null class is the default here; naming it conditions on that
                    # class, the model that generates far better than the null class (labels.py)
                    i2i_class = gr.Dropdown(class_choices(pipe.unet.config.num_class_embeds, pipe.config.id2label)[1:], value=NULL_CLASS if conditional else None,
                                            label="Class of the image", visible=conditional, elem_id="i2i_class")
                    with gr.Row():
                        i2i_button = gr.Button("Denoise", variant="primary", elem_id="i2i_run")
                        i2i_stop = gr.Button("Stop", variant="stop", elem_id="i2i_stop")
                i2i_out = gr.Gallery(label="Result", columns=1, elem_id="i2i_gallery", format="png")
            denoising = i2i_button.click(img2img, [prior, strength, i2i_steps, i2i_seed, i2i_class], i2i_out,
                                         api_name="image_to_image")
            i2i_stop.click(None, None, None, cancels=[denoising], api_visibility="private")
            if example_images:  # named "<class>-<name>.png": a class-conditional model gets the class with the image
                gr.Examples([[p, 0.6, example_class(p, pipe.unet.config.num_class_embeds)] for p in example_images[:3]],
                            [prior, strength, i2i_class])
    # a bounded queue: visitors beyond max_size are told to retry instead of piling up
    demo.queue(max_size=int(os.environ.get("QUEUE_MAX_SIZE", 32)),
               default_concurrency_limit=int(os.environ.get("CONCURRENCY_LIMIT", 2)))
    return demo


def main():
    demo = build_demo(inference.load_pipeline())
    demo.launch(max_file_size="10mb", footer_links=["api"])


if __name__ == "__main__":
    main()
