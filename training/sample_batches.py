"""The finished sample batches of one evaluation row, kept on disk so that a killed row resumes where it stopped.

A 10,000-image row of 1000 steps takes about six hours on two cores; --resume keeps finished rows, and these
folders keep the finished batches of the unfinished one. Each row's batches live in
``<results file>.batches/<digest>/``, the digest taken over everything that decides the images (the setup, the
weights, the sampler and its settings, the batch size, the device), so a folder is only ever read by the row
that wrote it. A row's folder is deleted once its numbers are in the results file.
"""

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from training.atomic_files import write_atomically, write_json_atomically


class SampleBatches:
    """Batches of images by their first image's index, written atomically (a batch is there whole or not at all)."""

    def __init__(self, folder: str):
        self.folder = folder

    @classmethod
    def for_row(cls, results_path: str, identity: dict) -> "SampleBatches":
        """The folder of the row that `identity` (JSON-serialisable: everything that decides its images) describes."""
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        batches = cls(os.path.join(all_batches_folder(results_path), key))
        os.makedirs(batches.folder, exist_ok=True)
        write_json_atomically(os.path.join(batches.folder, "row.json"), identity)  # what the folder holds, for a reader
        return batches

    def _path(self, start: int) -> str:
        return os.path.join(self.folder, f"images-{start:07d}.safetensors")

    def count(self) -> int:
        return sum(name.endswith(".safetensors") for name in os.listdir(self.folder))

    def load(self, start: int, num_images: int, device):
        """The batch that starts at image `start`, or None when it was not finished."""
        if not os.path.exists(self._path(start)):
            return None
        images = load_file(self._path(start))["images"]
        if len(images) != num_images:
            raise ValueError(f"{self._path(start)} holds {len(images)} images where this row's batch has {num_images}: "
                             f"delete {self.folder} to sample the row again.")
        return images.to(device)

    def save(self, start: int, images: torch.Tensor) -> None:
        write_atomically(self._path(start), lambda tmp: save_file({"images": images.detach().cpu().contiguous()}, tmp))

    def discard(self) -> None:
        """The row is scored and saved: its batches are no longer needed (nor the parent folder, once empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = os.path.dirname(self.folder)
        if os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)


def all_batches_folder(results_path: str) -> str:
    return f"{results_path}.batches"


def discard_all(results_path: str) -> bool:
    """Every row's batches of `results_path` (a run that starts over keeps none); whether there were any."""
    folder = all_batches_folder(results_path)
    if not os.path.isdir(folder):
        return False
    shutil.rmtree(folder)
    return True
