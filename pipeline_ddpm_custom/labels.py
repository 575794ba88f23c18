"""The class labels the project's entry points choose when the user names no class.

A class-conditional pipeline called without ``class_labels`` samples its null class, the unconditional model that
classifier-free guidance extrapolates from. That model is trained on only the training images whose labels were
dropped (``--cond_drop_prob``, 10%) and is far weaker: the bundled model's DDIM-50 FID at 2,000 samples is 25.0 from the
null class against 5.69 with labels (docs/bundled-model.md). So the CLI, the Space, the bundle's pictures and every
evaluation draw every class in turn unless told otherwise.
"""

import contextlib
import warnings
from typing import Iterable, List, Optional


def cycling_class_labels(indices: Iterable[int], classes: Optional[int]) -> Optional[List[int]]:
    """The class label of each image index: i % classes, so that every class gets an equal share (None for an
    unconditional model, which takes no labels). Every evaluation labels its samples this way; by-class studies
    rely on it."""
    return [i % classes for i in indices] if classes else None


def requested_labels(count: int, classes: Optional[int], class_label: Optional[int] = None,
                     null_class: bool = False) -> Optional[List[int]]:
    """The labels of a request for ``count`` images, as the CLI and the Space read it: none for the null class or an
    unconditional model, the class asked for on every image, else every class in turn. The callers check the request
    first (their messages name their own options)."""
    if null_class or not classes:
        return None
    if class_label is not None:
        return [int(class_label)] * count
    return cycling_class_labels(range(count), classes)


@contextlib.contextmanager
def null_class_on_purpose():
    """Silence the pipeline's warning about sampling without labels, where the null class is what was asked for
    (``--null-class``, ``--unconditional``). Not thread-safe, as ``warnings.catch_warnings`` is not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No class_labels: sampling", category=UserWarning)
        yield
