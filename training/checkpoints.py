"""Checkpoints: accelerate's ``save_state`` (model, optimizer, LR scheduler, grad scaler, EMA, RNG
states) plus the data position, written atomically and rotated."""

import json
import os
import re
import shutil
from typing import Optional, Tuple

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


def list_checkpoints(folder: str):
    """Complete checkpoints in ``folder``, oldest first (unfinished ``*.tmp`` folders are not listed)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(folder, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return [path for _, path in sorted(found)]


def resolve_resume(resume_from: Optional[str], checkpoints_dir: str) -> Optional[str]:
    """``latest`` -> the newest complete checkpoint (None when there is none yet); a path -> itself, checked."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from, STATE_FILE)):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from} is not a complete checkpoint (no {STATE_FILE}); "
            f"pass 'latest' or a checkpoint-N folder."
        )
    return resume_from


def save_checkpoint(accelerator, checkpoints_dir: str, step: int, state: dict, total_limit: Optional[int]) -> str:
    """All ranks call this. Writes into ``checkpoint-N.tmp`` and renames it when complete, so a kill
    at any moment leaves either the old set of checkpoints or the new one, never a broken newest."""
    final = os.path.join(checkpoints_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)  # re-saving the same step (e.g. after a resume)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_state_file(path: str) -> dict:
    """The checkpoint's own record: steps taken, data position."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(accelerator, path: str) -> dict:
    accelerator.load_state(path)
    return load_state_file(path)


def data_record(dataset_size: int, images_per_micro_step: int, micro_steps_per_epoch: int) -> dict:
    """How a run reads its data, saved with each checkpoint so that a resume can tell whether it reads the same way."""
    return {"dataset_size": dataset_size, "images_per_micro_step": images_per_micro_step,
            "micro_steps_per_epoch": micro_steps_per_epoch}


def resumed_micro_step(state: dict, current: dict) -> Tuple[int, Optional[str]]:
    """The micro-step at which a resumed run goes on reading the data, and a note when it is not the checkpoint's own.

    ``current`` is this run's ``data_record``. Read the same way as the checkpoint's run (or a checkpoint from before
    the record), the saved micro-step is exact: the run sees what the uninterrupted one would have. With another batch
    size or number of processes (micro-steps hold other numbers of images) it is the micro-step at the same place of
    the same epoch, so no image of that epoch is seen twice or skipped beyond one batch; the order within the epoch then
    differs from the uninterrupted run's. A dataset of another size has no such place: refused."""
    micro_step, saved = state["micro_step"], state.get("data")
    if saved is None or saved == current:
        return micro_step, None
    if saved["dataset_size"] != current["dataset_size"]:
        raise ValueError(
            f"The checkpoint was trained on {saved['dataset_size']} images and this run has {current['dataset_size']}: "
            "resume with the same data (--dataset_name, --train_data_dir, --max_train_samples), or train on the new data "
            "as a fine-tune, with a new --output_dir and --pretrained_model set to the exported pipeline.")
    epoch, within = divmod(micro_step, saved["micro_steps_per_epoch"])
    images_read = within * saved["images_per_micro_step"]
    resumed_within = min(images_read // current["images_per_micro_step"], current["micro_steps_per_epoch"])
    note = (f"The checkpoint read {saved['images_per_micro_step']} images per micro-step (batch x processes) and this "
            f"run reads {current['images_per_micro_step']}: going on at image {resumed_within * current['images_per_micro_step']} "
            f"of epoch {epoch} (the checkpoint had read {images_read} of it), in an order that differs from an "
            "uninterrupted run's for the rest of this epoch.")
    return epoch * current["micro_steps_per_epoch"] + resumed_within, note
