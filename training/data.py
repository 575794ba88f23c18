"""Training data: a ``datasets.Dataset`` with an image column (and optionally a label column),
transformed to tensors in [-1, 1] with the model's channel count."""

import gzip
import hashlib
import os
import shutil
import struct
from typing import List, Optional, Tuple

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_dataset, load_from_disk
from PIL import Image as PILImage
from PIL import ImageOps

FASHION_MNIST_IDX = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file.")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def idx_prefix(split: str) -> str:
    """The original IDX files' name for a split: train, or t10k for the test split."""
    return "train" if split == "train" else "t10k"


def idx_file_stem(split: str, kind: str) -> str:
    """The original name (before any .gz) of one split's IDX file of `kind` (images or labels)."""
    return f"{idx_prefix(split)}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"


def fashion_mnist_from_idx(folder: str = FASHION_MNIST_IDX, split: str = "train", cache_dir: Optional[str] = None) -> Dataset:
    """Fashion-MNIST from its original IDX files, with the Hub dataset's schema (image, label).

    The conversion (8 s for the train split) is cached with ``save_to_disk`` and memory-mapped later.
    """
    cache_root = cache_dir or os.environ.get("HF_DATASETS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "datasets")
    stamp = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
    cached = os.path.join(cache_root, "pipeline_ddpm_custom", f"fashion_mnist-{split}-{stamp}")
    if os.path.exists(os.path.join(cached, "dataset_info.json")):
        return load_from_disk(cached)

    def find(kind):
        for name in (idx_file_stem(split, kind) + ".gz", idx_file_stem(split, kind)):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise FileNotFoundError(f"No {idx_prefix(split)} {kind} IDX file in {folder}.")

    images, labels = read_idx(find("images")), read_idx(find("labels"))
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split.")
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    dataset = Dataset.from_dict({"image": [PILImage.fromarray(a, mode="L") for a in images], "label": labels.tolist()}, features=features)
    try:  # written aside and renamed: a concurrent or killed writer never leaves a half cache
        tmp = f"{cached}.tmp-{os.getpid()}"
        dataset.save_to_disk(tmp)
        os.replace(tmp, cached)
        return load_from_disk(cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return dataset


def load_training_dataset(dataset_name: Optional[str], train_data_dir: Optional[str], split: str = "train", cache_dir=None) -> Dataset:
    """The training split from a Hub id, a ``save_to_disk`` folder, parquet files, a folder of IDX files or an image folder;
    Fashion-MNIST (local IDX files when present, else the Hub) when neither is given."""
    if train_data_dir:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir} is not a folder of images.")
        return load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
    if dataset_name is None:
        if os.path.isdir(FASHION_MNIST_IDX):
            return fashion_mnist_from_idx(FASHION_MNIST_IDX, split, cache_dir)
        dataset_name = FASHION_MNIST_HUB
    idx_images = (idx_file_stem("train", "images"), idx_file_stem("test", "images"))
    if os.path.isdir(dataset_name) and any(f.startswith(idx_images) for f in os.listdir(dataset_name)):
        return fashion_mnist_from_idx(dataset_name, split, cache_dir)  # a folder of (Fashion-)MNIST IDX files, either split
    if os.path.isdir(dataset_name) and os.path.exists(os.path.join(dataset_name, "dataset_info.json")):
        return load_from_disk(dataset_name)
    if os.path.isdir(dataset_name) and os.path.exists(os.path.join(dataset_name, "dataset_dict.json")):
        return load_from_disk(dataset_name)[split]
    if dataset_name.endswith(".parquet") or (os.path.isdir(dataset_name) and any(f.endswith(".parquet") for f in os.listdir(dataset_name))):
        files = dataset_name if dataset_name.endswith(".parquet") else os.path.join(dataset_name, "*.parquet")
        return load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)
    return load_dataset(dataset_name, split=split, cache_dir=cache_dir)


def pick_columns(dataset: Dataset, image_column: Optional[str], label_column: Optional[str], need_label: bool) -> Tuple[str, Optional[str]]:
    """The image (and label) column: as given, or the only one of its kind; a clear error otherwise."""
    columns = dataset.column_names

    def choose(given, candidates, kind, flag):
        if given is not None:
            if given not in columns:
                raise ValueError(f"--{flag} {given!r} is not a column of the dataset; its columns are {columns}.")
            return given
        if len(candidates) == 1:
            return candidates[0]
        raise ValueError(
            f"Cannot tell which column holds the {kind}: candidates {candidates or 'none'} among {columns}. Pass --{flag}."
        )

    images = [c for c, f in dataset.features.items() if isinstance(f, Image)]
    image = choose(image_column, images, "images", "image_column")
    if not need_label:
        return image, None
    labels = [c for c, f in dataset.features.items() if isinstance(f, ClassLabel)] or [c for c in columns if c in ("label", "labels")]
    return image, choose(label_column, labels, "class labels", "label_column")


def labels_as_class_ids(dataset: Dataset, label_column: str) -> Dataset:
    """The dataset with class ids 0..K-1 in ``label_column``: a ClassLabel column as it is, integers checked, text
    (e.g. "cat", "dog") encoded by datasets' ``class_encode_column`` (ids in sorted order of the names)."""
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return dataset
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return dataset.class_encode_column(label_column)
    if dtype is None or not dtype.startswith(("int", "uint")):
        raise ValueError(f"--label_column {label_column!r} holds {feature}, not class labels: pass a column of integer "
                         "ids (0, 1, ...) or of class names.")
    lowest = min(dataset[label_column])
    if lowest < 0:
        raise ValueError(f"--label_column {label_column!r} has the label {lowest}: class ids must be 0, 1, ..., "
                         "the number of classes - 1.")
    return dataset


def class_names(dataset: Dataset, label_column: Optional[str]) -> Optional[List[str]]:
    """The names of class ids 0..K-1 where the dataset has them (a ClassLabel column), for the training record."""
    feature = dataset.features[label_column] if label_column else None
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def recorded_class_names(training_config: dict) -> Optional[List[str]]:
    """The class names of a class-conditional training run, from its training_config.json: those it recorded, else
    Fashion-MNIST's for a run on the default data (runs before class_names was recorded); None where unknown."""
    if not training_config.get("class_conditional"):
        return None
    names = training_config.get("class_names")
    if not names and not training_config.get("dataset_name") and not training_config.get("train_data_dir"):
        names = FASHION_MNIST_CLASSES
    if not names or len(names) != training_config.get("num_classes", len(names)):  # a record that does not fit
        return None
    return list(names)


def num_classes(dataset: Dataset, label_column: str) -> int:
    feature = dataset.features[label_column]
    return feature.num_classes if isinstance(feature, ClassLabel) else int(max(dataset[label_column])) + 1


def image_channels(dataset: Dataset, image_column: str) -> int:
    """1 for grayscale datasets, 3 otherwise (judged by the first image)."""
    return 1 if dataset[0][image_column].mode in ("L", "1", "I", "I;16", "F") else 3


def eight_bit(image: PILImage.Image) -> PILImage.Image:
    """16-bit grayscale (a 16-bit PNG opens as I;16) scaled to 8 bits: PIL's convert("L") clips every value above 255,
    which turns nearly all of such a picture white."""
    if not image.mode.startswith("I;16"):
        return image
    levels = np.round(np.asarray(image, dtype=np.float64) / 257.0)  # 65535 -> 255
    return PILImage.fromarray(levels.astype(np.uint8), mode="L")


def make_transform(image_column: str, label_column: Optional[str], resolution: int, channels: int):
    """A ``with_transform`` function: PIL images -> float tensors (C, H, W) in [-1, 1]; labels -> ints.
    (Random flips happen in the training step, from its per-step seed, so a resumed run flips alike.)"""
    mode = "L" if channels == 1 else "RGB"

    def transform(batch):
        pixels = []
        for image in batch[image_column]:
            image = eight_bit(image).convert(mode)
            if image.size != (resolution, resolution):
                # the shorter side scaled to the resolution and the middle square kept (diffusers' scripts' Resize +
                # CenterCrop): a non-square picture keeps its proportions instead of being squashed
                image = ImageOps.fit(image, (resolution, resolution), method=PILImage.BICUBIC)
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
            pixels.append(array[None] if channels == 1 else array.permute(2, 0, 1))
        out = {"pixel_values": pixels}
        if label_column is not None:
            out["labels"] = list(batch[label_column])
        return out

    return transform


def collate(examples):
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous()}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples])
    return batch
