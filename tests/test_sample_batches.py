"""The kept sample batches of an evaluation row (training/sample_batches.py)."""

import os

import pytest
import torch

from training import sample_batches
from training.digests import weights_digest
from training.sample_batches import SampleBatches

from .conftest import tiny_unet


def test_a_batch_is_read_back_whole_or_not_at_all(tmp_path, monkeypatch):
    batches = SampleBatches.for_row(str(tmp_path / "results.json"), {"steps": 3})
    images = torch.rand(4, 1, 8, 8)
    batches.save(0, images)
    assert torch.equal(batches.load(0, 4, "cpu"), images)
    assert batches.load(4, 4, "cpu") is None  # not sampled yet

    def dies_midway(tensors, path):
        open(path, "wb").write(b"half a fi")
        raise OSError("killed")

    monkeypatch.setattr(sample_batches, "save_file", dies_midway)
    with pytest.raises(OSError):
        batches.save(4, images)
    assert batches.load(4, 4, "cpu") is None and batches.count() == 1  # no half-written batch left to be read


def test_a_batch_of_another_size_is_refused_with_what_to_do(tmp_path):
    batches = SampleBatches.for_row(str(tmp_path / "results.json"), {"steps": 3})
    batches.save(0, torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match=f"holds 4 images where this row's batch has 5: delete {batches.folder}"):
        batches.load(0, 5, "cpu")


def test_rows_get_their_own_folders_and_a_saved_row_leaves_nothing(tmp_path):
    out = str(tmp_path / "results.json")
    first, second = SampleBatches.for_row(out, {"steps": 3}), SampleBatches.for_row(out, {"steps": 4})
    assert first.folder != second.folder and SampleBatches.for_row(out, {"steps": 3}).folder == first.folder
    first.discard()
    assert os.path.isdir(second.folder)
    second.discard()
    assert not os.path.exists(f"{out}.batches")


def test_weights_digest_tells_weights_apart():
    assert weights_digest(tiny_unet(seed=0)) == weights_digest(tiny_unet(seed=0)) != weights_digest(tiny_unet(seed=1))
