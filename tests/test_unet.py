import pytest
import torch

from pipeline_ddpm_custom import DDPMCustomUNet
from pipeline_ddpm_custom.unet_ddpm_custom import ResidualBlock, SelfAttention, SinusoidalPositionEmbeddings

from .conftest import TINY_UNET, public_config, tiny_unet


def test_parts_of_the_seed_notes_are_there():
    unet = tiny_unet()
    kinds = {type(m) for m in unet.modules()}
    assert {SinusoidalPositionEmbeddings, ResidualBlock, SelfAttention} <= kinds
    # attention exactly at the chosen resolution (4 of 8, 4) plus the middle
    assert sum(isinstance(m, SelfAttention) for m in unet.down_blocks.modules()) == 1


@pytest.mark.parametrize("timestep", [5, 5.0, torch.tensor(5), torch.tensor([5]), torch.tensor([5, 5, 5])])
def test_timestep_forms_agree(timestep):
    unet, x = tiny_unet(), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        reference = unet(x, torch.tensor([5, 5, 5])).sample
        out = unet(x, timestep).sample
    assert out.shape == (3, 1, 8, 8)
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("conditional", [False, True])
def test_torch_compile_sees_one_graph(conditional):
    """torch.compile(unet, fullgraph=True) needs a forward without graph breaks: the eager-only label check must not
    read the labels' values while compiling (dynamo's explain traces it without compiling, in seconds); in eager mode
    the check still names a bad label."""
    unet = tiny_unet(num_class_embeds=3 if conditional else None)
    labels = torch.tensor([0, 3]) if conditional else None
    for timestep in (torch.tensor([5, 7]), 5):
        explained = torch._dynamo.explain(unet)(torch.randn(2, 1, 8, 8), timestep, class_labels=labels)
        assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    if conditional:
        with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\]; got \[0, 4\]"):
            unet(torch.randn(2, 1, 8, 8), 5, class_labels=torch.tensor([0, 4]))


def test_output_depends_on_timestep_and_is_per_sample():
    unet, x = tiny_unet(), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a = unet(x, torch.tensor([1, 50, 99])).sample
        b = unet(x[1:2], 50).sample
    assert not torch.allclose(a[0], a[1])
    torch.testing.assert_close(a[1:2], b, atol=1e-5, rtol=1e-5)


def test_class_conditioning_and_learned_variance():
    unet = tiny_unet(num_class_embeds=3, learned_variance=True, in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = unet(x, 10, class_labels=torch.tensor([0, 0])).sample
        b = unet(x, 10, class_labels=torch.tensor([1, unet.null_class_label])).sample
    assert a.shape == (2, 6, 8, 8)
    assert not torch.allclose(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet().train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
            assert unet.is_gradient_checkpointing
        unet(x, t).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    unet = tiny_unet(num_class_embeds=4)
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DDPMCustomUNet.from_pretrained(tmp_path)
    assert public_config(loaded.config) == public_config(unet.config)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3, class_labels=[1]).sample, unet(x, 3, class_labels=[1]).sample)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(sample_size=10, channel_mult=(1, 2, 2)), "multiple of 4"), (dict(attention_resolutions=(3,)), "feature-map sizes")],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMCustomUNet(**{**TINY_UNET, **kwargs})


def test_bad_inputs_raise():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="1-channel"):
        unet(torch.randn(1, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(1, 1, 9, 9), 1)
    with pytest.raises(ValueError, match="unconditional"):
        unet(torch.randn(1, 1, 8, 8), 1, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="length 2"):
        unet(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))
    conditional = tiny_unet(num_class_embeds=3)
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(torch.randn(1, 1, 8, 8), 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        conditional(torch.randn(1, 1, 8, 8), 1, class_labels=torch.tensor([4]))
