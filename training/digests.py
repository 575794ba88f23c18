"""Content digests that key what is kept for later: evaluation rows, remembered features."""

import hashlib

import torch


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers: new weights saved under the same folder name are a
    different row (the folder's name alone would not tell)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_digest(images: torch.Tensor) -> str:
    """SHA-256 of a batch's shape and values (the file names of Inception's remembered features: keep it stable)."""
    return hashlib.sha256(str(tuple(images.shape)).encode() + images.detach().cpu().numpy().tobytes()).hexdigest()
