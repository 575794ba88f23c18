"""A small Fashion-MNIST classifier whose penultimate layer is this project's offline FID/KID
feature space (no downloads, unlike Inception). Trained by training/train_feature_net.py and
shipped in models/fashion-mnist-features/ (safetensors)."""

import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

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

    @property
    def num_features(self) -> int:  # read by torchmetrics' FID/KID
        return self.config.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (1, 28, 28):
            images = F.interpolate(images.float().mean(dim=1, keepdim=True), size=(28, 28), mode="bilinear", antialias=True)
        return self.body(images.float() * 2 - 1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))
