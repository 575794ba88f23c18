"""A small Fashion-MNIST classifier whose penultimate layer is this project's offline FID/KID
feature space (no downloads, unlike Inception). Trained by training/train_feature_net.py and
shipped in models/fashion-mnist-features/ (safetensors)."""

import contextlib
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from training.digests import batch_digest, weights_digest

FEATURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "fashion-mnist-features")


class FashionFeatureNet(ModelMixin, ConfigMixin):
    """images (B, 1, 28, 28) in [0, 1] -> features (B, num_features); ``classify`` -> logits (B, classes)."""

    @register_to_config
    def __init__(self, num_features: int = 128, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    # features of real images seen inside remembering(), by weights and content, shared by every instance of the
    # process: the evaluation scripts load the net per run, and a benchmark feeds the same 10,000-image reference
    # for every row or seed. Bounded (about 20 MB at 128 features), the oldest batch forgotten first.
    _remembered: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
    REMEMBERED_BATCHES = 400

    @property
    def num_features(self) -> int:  # read by torchmetrics' FID/KID
        return self.config.num_features

    @contextlib.contextmanager
    def remembering(self):
        """Within it, each batch's features are kept in memory under the weights and the batch's content and
        reused when the same batch comes again in this process (Inception keeps its on disk: it is 1,000 times
        slower). For real images that come again; generated ones rarely do."""
        self._remembering_under = weights_digest(self)
        try:
            yield
        finally:
            self._remembering_under = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        weights = getattr(self, "_remembering_under", None)
        if weights is None:
            return super().__call__(images)
        key = (weights, str(images.dtype), batch_digest(images))
        if key in self._remembered:
            self._remembered.move_to_end(key)
            return self._remembered[key].to(images.device)
        with torch.no_grad():  # features for a metric; nothing trains inside remembering()
            features = super().__call__(images)
        self._remembered[key] = features.cpu()
        while len(self._remembered) > self.REMEMBERED_BATCHES:
            self._remembered.popitem(last=False)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (1, 28, 28):
            images = F.interpolate(images.float().mean(dim=1, keepdim=True), size=(28, 28), mode="bilinear", antialias=True)
        return self.body(images.float() * 2 - 1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))
