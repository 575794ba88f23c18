"""Checkpoints: accelerate's ``save_state`` (model, optimizer, LR scheduler, grad scaler, EMA, RNG
states) plus the data position, written atomically and rotated."""

import json
import os
import re
import shutil
from typing import Optional

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


def load_checkpoint(accelerator, path: str) -> dict:
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
