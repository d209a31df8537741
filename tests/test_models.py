import pytest
import torch
import torch.nn.functional as F

from deedsr.config import preset
from deedsr.models import DABlock, DeeDSR, ModulatedUNet, per_sample_depthwise3x3


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_sd21_base_parameter_counts():
    with torch.device("meta"):
        model = DeeDSR(preset("sd21-base"))
    assert count(model.learner) == 85_011_008
    assert count(model.adapter) == 75_903_744
    assert count(model.unet) == 906_111_044
    assert count(model.unet.unet) == 853_131_204
    assert count(model.unet.modulation) == 52_979_840


def test_per_sample_depthwise_matches_grouped_conv_and_is_batch_independent():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9, 7)
    k = torch.randn(3, 5, 3, 3)
    out = per_sample_depthwise3x3(x, k)
    grouped = F.conv2d(x.reshape(1, 15, 9, 7), k.reshape(15, 1, 3, 3), groups=15, padding=1).reshape(3, 5, 9, 7)
    torch.testing.assert_close(out, grouped, rtol=0, atol=1e-5)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], per_sample_depthwise3x3(x[i : i + 1], k[i : i + 1]), rtol=0, atol=0)


def test_da_block_batch_equals_each_sample_alone():
    torch.manual_seed(0)
    block = DABlock(16, 24, reduction=4).eval()
    x, d = torch.randn(3, 16, 8, 8), torch.randn(3, 24)
    batched = block(x, block.condition(d))
    for i in range(3):
        single = block(x[i : i + 1], block.condition(d[i : i + 1]))
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)
    assert batched.abs().max() > 0


def test_zero_modulation_equals_plain_diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = preset("tiny")
    modulated = ModulatedUNet(cfg.unet, cfg.adapter.local_channels, cfg.modulation_hidden).eval()
    plain = UNet2DConditionModel(**cfg.unet).eval()
    plain.set_default_attn_processor()
    plain.load_state_dict(modulated.unet.state_dict())
    x, tokens = torch.randn(2, 4, 16, 24), torch.randn(2, 6, cfg.unet["cross_attention_dim"])
    local = [torch.randn(2, cfg.adapter.local_channels, 16 // 2**i, 24 // 2**i) for i in range(4)]
    t = torch.tensor([981.0, 21.0])
    with torch.no_grad():
        ours = modulated(x, t, tokens, local)
        ref = plain(x, t, encoder_hidden_states=tokens).sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # and the modulation does change the output once it has weights
    with torch.no_grad():
        for m in modulated.modulation:
            m.gamma.weight.normal_(0, 0.05)
        assert (modulated(x, t, tokens, local) - ref).abs().max() > 1e-3


def test_adapter_outputs_shapes_and_condition_does_not_depend_on_t(tiny_model):
    cfg = tiny_model.config
    z = torch.randn(2, 4, 16, 32)
    d = torch.randn(2, cfg.learner.out_dim)
    with torch.no_grad():
        conditions = tiny_model.adapter.condition(d)
        local, tokens = tiny_model.adapter(z, torch.tensor([500.0, 500.0]), conditions)
        local2, _ = tiny_model.adapter.forward_from_degradation(z, torch.tensor([500.0, 500.0]), d)
    assert len(conditions) == tiny_model.adapter.num_conditions == 16
    assert [tuple(m.shape) for m in local] == [(2, 32, 16 // 2**i, 32 // 2**i) for i in range(4)]
    assert tuple(tokens.shape) == (2, 2 * 4, cfg.adapter.token_dim)
    torch.testing.assert_close(local[0], local2[0])


def test_learner_maps_any_size_to_degradation_vector(tiny_model):
    with torch.no_grad():
        assert tuple(tiny_model.learner(torch.rand(2, 3, 40, 56)).shape) == (2, 64)


def test_config_validation():
    from deedsr.config import DeeDSRConfig

    with pytest.raises(ValueError, match="unknown config keys"):
        DeeDSRConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    data = preset("tiny").to_dict()
    assert DeeDSRConfig.from_dict(data).to_dict() == data


@pytest.mark.parametrize("kind", ["self", "cross", "spatial"])
def test_scaled_attention_equals_diffusers_attention(kind):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from deedsr.models.attention import ScaledDotProductAttention

    torch.manual_seed(0)
    if kind == "spatial":  # the VAE's mid-block form: GroupNorm, 4D input, residual
        attn = Attention(32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                         rescale_output_factor=2.0, _from_deprecated_attn_block=True)
        x, context = torch.randn(2, 32, 6, 5), None
    else:
        attn = Attention(32, heads=4, dim_head=8, cross_attention_dim=24 if kind == "cross" else None)
        x, context = torch.randn(2, 30, 32), (torch.randn(2, 7, 24) if kind == "cross" else None)
    attn.eval()
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        ref = attn(x, encoder_hidden_states=context)
        attn.set_processor(ScaledDotProductAttention())
        ours = attn(x, encoder_hidden_states=context)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention masks are not used"):
        attn(x, encoder_hidden_states=context, attention_mask=torch.ones(2, 30))
