"""Importers: SD 2.1-base diffusers folder -> DeeDSR, reference (ControlLDM) checkpoint -> DeeDSR.

No real checkpoint is available offline, so reference checkpoints are synthesised from a
tiny DeeDSR model through an inverse key mapping written here, and that mapping is
checked against key/shape lists enumerated from the reference source's module structure
(UNetModel_spade, Encoder_degrad, blindsr.ResNet) and against the reference attention /
DA-block arithmetic re-implemented here from its semantics.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from deedsr.checkpoints import CheckpointError
from deedsr.config import preset
from deedsr.importers import (
    ImportReport,
    import_reference_checkpoint,
    init_from_sd_base,
)
from deedsr.models import DeeDSR, load_checkpoint
from deedsr.models.unet import _resnets_in_order


class _Opaque:
    """Something torch.load(weights_only=True) must refuse."""


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny")


def _random_model(cfg) -> DeeDSR:
    """A DeeDSR with every tensor random (no zero-initialised layer left)."""
    torch.manual_seed(0)
    model = DeeDSR(cfg).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def tiny_model(cfg):
    return _random_model(cfg)


@pytest.fixture(scope="module")
def reference_state(tiny_model):
    return to_reference_layout(tiny_model)


def _two_layer_config():
    """tiny, but with SD's two ResNet blocks per UNet level (three per up level)."""
    cfg = preset("tiny")
    cfg.unet["layers_per_block"] = 2
    return cfg


@pytest.fixture(scope="module", params=["tiny", "tiny-2-layers"])
def ref_case(request, cfg, tiny_model, reference_state):
    """(config, random model, its reference-layout state dict)."""
    if request.param == "tiny":
        return cfg, tiny_model, reference_state
    cfg2 = _two_layer_config()
    model = _random_model(cfg2)
    return cfg2, model, to_reference_layout(model)


# --------------------------------------------------------------------------------------
# Inverse mapping: our model -> reference (ControlLDM) state dict
# --------------------------------------------------------------------------------------

RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet_keys(ours: dict, our_prefix: str, ref_prefix: str, out: dict) -> None:
    for key, tensor in ours.items():
        if key.startswith(our_prefix):
            module, leaf = key[len(our_prefix):].split(".")
            out[f"{ref_prefix}{RESNET_TO_LDM[module]}.{leaf}"] = tensor


def _unet_to_ldm(model: DeeDSR) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel (+ our modulation) -> ldm UNetModel_spade keys."""
    cfg = model.config.unet
    layers = cfg["layers_per_block"]
    sd = model.unet.unet.state_dict()
    out: dict[str, torch.Tensor] = {}
    plain = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for ours, ref in plain.items():
        for leaf in ("weight", "bias"):
            out[f"{ref}.{leaf}"] = sd[f"{ours}.{leaf}"]

    resnet_ldm_path: dict[str, str] = {}  # diffusers resnet path -> ldm path

    def transformer(our_prefix: str, ref_prefix: str) -> None:
        for key, tensor in sd.items():
            if key.startswith(our_prefix):
                out[ref_prefix + key[len(our_prefix):]] = tensor

    n_down = len(cfg["down_block_types"])
    index = 1
    for b in range(n_down):
        for j in range(layers):
            resnet_ldm_path[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{index}.0"
            if cfg["down_block_types"][b].startswith("CrossAttn"):
                transformer(f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{index}.1.")
            index += 1
        if b != n_down - 1:
            for leaf in ("weight", "bias"):
                out[f"input_blocks.{index}.0.op.{leaf}"] = sd[f"down_blocks.{b}.downsamplers.0.conv.{leaf}"]
            index += 1
    resnet_ldm_path["mid_block.resnets.0"] = "middle_block.0"
    transformer("mid_block.attentions.0.", "middle_block.1.")
    resnet_ldm_path["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for b, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            resnet_ldm_path[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attn:
                transformer(f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{index}.1.")
            if j == layers and b != len(cfg["up_block_types"]) - 1:
                slot = 2 if attn else 1
                for leaf in ("weight", "bias"):
                    out[f"output_blocks.{index}.{slot}.conv.{leaf}"] = sd[f"up_blocks.{b}.upsamplers.0.conv.{leaf}"]
            index += 1

    for path, ref in resnet_ldm_path.items():
        _resnet_keys(sd, path + ".", ref + ".", out)
    # modulation i belongs to the i-th ResNet block in _resnets_in_order
    names = {id(m): n for n, m in model.unet.unet.named_modules()}
    msd = model.unet.modulation.state_dict()
    for i, (resnet, _) in enumerate(_resnets_in_order(model.unet.unet)):
        ref = resnet_ldm_path[names[id(resnet)]]
        for ours, theirs in (("shared", "mlp_shared.0"), ("gamma", "mlp_gamma"), ("beta", "mlp_beta")):
            for leaf in ("weight", "bias"):
                out[f"{ref}.spade.{theirs}.{leaf}"] = msd[f"{i}.{ours}.{leaf}"]
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def _vae_to_ldm(model: DeeDSR) -> dict[str, torch.Tensor]:
    sd = model.vae.state_dict()
    n = len(model.config.vae["block_out_channels"])
    out: dict[str, torch.Tensor] = {}

    def resnet(key: str) -> str:
        return key.replace("conv_shortcut", "nin_shortcut")

    for key, tensor in sd.items():
        k = key
        for part in ("encoder", "decoder"):
            k = k.replace(f"{part}.conv_norm_out", f"{part}.norm_out")
            k = k.replace(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
            k = k.replace(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        if ".mid_block.attentions.0." in k:
            part, _, rest = k.partition(".mid_block.attentions.0.")
            module, leaf = rest.rsplit(".", 1)
            module = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[module]
            if leaf == "weight" and module != "norm":
                tensor = tensor[:, :, None, None]  # ldm uses 1x1 convolutions
            k = f"{part}.mid.attn_1.{module}.{leaf}"
        for i in range(n):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
        out["first_stage_model." + resnet(k)] = tensor
    return out


def _legacy_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Stack diffusers q/k/v projections into an ldm `qkv` in the legacy (per-head q, k, v) order."""
    c = q.shape[0]
    ch = c // heads
    parts = [t.reshape(heads, ch, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * c, *q.shape[1:])


def _adapter_to_ldm(model: DeeDSR) -> dict[str, torch.Tensor]:
    cfg = model.config.adapter
    sd = model.adapter.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, ref in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                      ("conv_in", "input_blocks.0.0")):
        for leaf in ("weight", "bias"):
            out[f"{ref}.{leaf}"] = sd[f"{ours}.{leaf}"]

    def attention(our: str, ref: str) -> None:
        out[f"{ref}.norm.weight"] = sd[f"{our}.group_norm.weight"]
        out[f"{ref}.norm.bias"] = sd[f"{our}.group_norm.bias"]
        q, k, v = (sd[f"{our}.to_{x}.weight"] for x in "qkv")
        out[f"{ref}.qkv.weight"] = _legacy_qkv(q, k, v, cfg.num_heads)[..., None]
        out[f"{ref}.qkv.bias"] = _legacy_qkv(*(sd[f"{our}.to_{x}.bias"] for x in "qkv"), cfg.num_heads)
        out[f"{ref}.proj_out.weight"] = sd[f"{our}.to_out.0.weight"][..., None]
        out[f"{ref}.proj_out.bias"] = sd[f"{our}.to_out.0.bias"]

    dag = {"compress": "chain.0", "conv1": "body.0.conv1", "conv2": "body.0.conv2", "conv_out": "body.1"}
    for n in (1, 2):
        dag.update({f"da_conv{n}.kernel.0": f"body.0.da_conv{n}.kernel.0",
                    f"da_conv{n}.kernel.2": f"body.0.da_conv{n}.kernel.2",
                    f"da_conv{n}.conv": f"body.0.da_conv{n}.conv",
                    f"da_conv{n}.channel_attention.0": f"body.0.da_conv{n}.ca.conv_du.0",
                    f"da_conv{n}.channel_attention.2": f"body.0.da_conv{n}.ca.conv_du.2"})
    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        _resnet_keys(sd, f"resnets.{level}.", f"input_blocks.{index}.0.", out)
        prefix = f"da_blocks.{level}."
        for key, tensor in sd.items():
            if key.startswith(prefix):
                module, leaf = key[len(prefix):].rsplit(".", 1)
                out[f"input_blocks.{index}.1.{dag[module]}.{leaf}"] = tensor
        if level in cfg.attention_levels:
            attention(f"attentions.{level}", f"input_blocks.{index}.2")
        index += 1
        if level != levels - 1:
            _resnet_keys(sd, f"downsamplers.{level}.", f"input_blocks.{index}.0.", out)
            index += 1
        _resnet_keys(sd, f"local_heads.{level}.", f"fea_tran.{level}.", out)
    _resnet_keys(sd, "mid_resnet1.", "middle_block.0.", out)
    attention("mid_attention", "middle_block.1")
    _resnet_keys(sd, "mid_resnet2.", "middle_block.2.", out)
    for key, tensor in model.learner.state_dict().items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            key = f"layer{int(i) + 1}.{rest}"
        out[f"degrad_encoder.{key}"] = tensor
    return {"Encoder_degrad." + k: v for k, v in out.items()}


NON_MODEL_KEYS = {
    "betas": torch.linspace(0.1, 0.2, 10),
    "alphas_cumprod": torch.linspace(0.9, 0.1, 10),
    "scale_factor": torch.tensor(0.18215),
    "model_ema.decay": torch.tensor(0.999),
    "cond_stage_model.transformer.weight": torch.ones(2, 2),
    "first_stage_model.loss.logvar": torch.zeros(()),
}


def to_reference_layout(model: DeeDSR) -> dict[str, torch.Tensor]:
    state = {**_unet_to_ldm(model), **_vae_to_ldm(model), **_adapter_to_ldm(model), **NON_MODEL_KEYS}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# --------------------------------------------------------------------------------------
# Key/shape lists enumerated from the reference source's module structure
# --------------------------------------------------------------------------------------


def _ldm_resblock(shapes, prefix, cin, cout, temb, spade=None):
    """ldm ResBlock / ResBlockDual (openaimodel.py): in_layers, emb_layers, [spade], out_layers, skip."""
    shapes[f"{prefix}.in_layers.0.weight"] = shapes[f"{prefix}.in_layers.0.bias"] = (cin,)
    shapes[f"{prefix}.in_layers.2.weight"], shapes[f"{prefix}.in_layers.2.bias"] = (cout, cin, 3, 3), (cout,)
    shapes[f"{prefix}.emb_layers.1.weight"], shapes[f"{prefix}.emb_layers.1.bias"] = (cout, temb), (cout,)
    if spade is not None:  # SPADE(norm_nc=cout, label_nc=semb), nhidden hidden channels, 3x3
        semb, nhidden = spade
        shapes[f"{prefix}.spade.mlp_shared.0.weight"] = (nhidden, semb, 3, 3)
        shapes[f"{prefix}.spade.mlp_shared.0.bias"] = (nhidden,)
        for name in ("mlp_gamma", "mlp_beta"):
            shapes[f"{prefix}.spade.{name}.weight"], shapes[f"{prefix}.spade.{name}.bias"] = (cout, nhidden, 3, 3), (cout,)
    shapes[f"{prefix}.out_layers.0.weight"] = shapes[f"{prefix}.out_layers.0.bias"] = (cout,)
    shapes[f"{prefix}.out_layers.3.weight"], shapes[f"{prefix}.out_layers.3.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        shapes[f"{prefix}.skip_connection.weight"], shapes[f"{prefix}.skip_connection.bias"] = (cout, cin, 1, 1), (cout,)


def _ldm_spatial_transformer(shapes, prefix, ch, context_dim):
    """SpatialTransformer(use_linear=True, depth=1), heads * dim_head == ch (attention.py)."""
    shapes[f"{prefix}.norm.weight"] = shapes[f"{prefix}.norm.bias"] = (ch,)
    shapes[f"{prefix}.proj_in.weight"], shapes[f"{prefix}.proj_in.bias"] = (ch, ch), (ch,)
    t = f"{prefix}.transformer_blocks.0"
    for attn, kv_in in (("attn1", ch), ("attn2", context_dim)):
        shapes[f"{t}.{attn}.to_q.weight"] = (ch, ch)
        shapes[f"{t}.{attn}.to_k.weight"] = shapes[f"{t}.{attn}.to_v.weight"] = (ch, kv_in)
        shapes[f"{t}.{attn}.to_out.0.weight"], shapes[f"{t}.{attn}.to_out.0.bias"] = (ch, ch), (ch,)
    shapes[f"{t}.ff.net.0.proj.weight"], shapes[f"{t}.ff.net.0.proj.bias"] = (8 * ch, ch), (8 * ch,)  # GEGLU
    shapes[f"{t}.ff.net.2.weight"], shapes[f"{t}.ff.net.2.bias"] = (ch, 4 * ch), (ch,)
    for norm in ("norm1", "norm2", "norm3"):
        shapes[f"{t}.{norm}.weight"] = shapes[f"{t}.{norm}.bias"] = (ch,)
    shapes[f"{prefix}.proj_out.weight"], shapes[f"{prefix}.proj_out.bias"] = (ch, ch), (ch,)


def ldm_unet_spade_shapes(mc, mult, nrb, attention_resolutions, context_dim, semb, nhidden, cin=4, cout=4):
    """Keys and shapes of UNetModel_spade.__init__ (resblock_updown=False, conv_resample)."""
    temb = 4 * mc
    s: dict[str, tuple] = {}
    s["time_embed.0.weight"], s["time_embed.0.bias"] = (temb, mc), (temb,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (temb, temb), (temb,)
    s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"] = (mc, cin, 3, 3), (mc,)
    chans, ch, ds, i = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            _ldm_resblock(s, f"input_blocks.{i}.0", ch, m * mc, temb, (semb, nhidden))
            ch = m * mc
            if ds in attention_resolutions:
                _ldm_spatial_transformer(s, f"input_blocks.{i}.1", ch, context_dim)
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            s[f"input_blocks.{i}.0.op.weight"], s[f"input_blocks.{i}.0.op.bias"] = (ch, ch, 3, 3), (ch,)
            chans.append(ch)
            ds *= 2
            i += 1
    _ldm_resblock(s, "middle_block.0", ch, ch, temb, (semb, nhidden))
    _ldm_spatial_transformer(s, "middle_block.1", ch, context_dim)
    _ldm_resblock(s, "middle_block.2", ch, ch, temb, (semb, nhidden))
    k = 0
    for level, m in list(enumerate(mult))[::-1]:
        for j in range(nrb + 1):
            ich = chans.pop()
            _ldm_resblock(s, f"output_blocks.{k}.0", ch + ich, mc * m, temb, (semb, nhidden))
            ch = mc * m
            slot = 1
            if ds in attention_resolutions:
                _ldm_spatial_transformer(s, f"output_blocks.{k}.1", ch, context_dim)
                slot = 2
            if level and j == nrb:
                s[f"output_blocks.{k}.{slot}.conv.weight"], s[f"output_blocks.{k}.{slot}.conv.bias"] = (ch, ch, 3, 3), (ch,)
                ds //= 2
            k += 1
    s["out.0.weight"] = s["out.0.bias"] = (ch,)
    s["out.2.weight"], s["out.2.bias"] = (cout, mc, 3, 3), (cout,)
    return s


def _ldm_attention_block(s, prefix, ch):
    s[f"{prefix}.norm.weight"] = s[f"{prefix}.norm.bias"] = (ch,)
    s[f"{prefix}.qkv.weight"], s[f"{prefix}.qkv.bias"] = (3 * ch, ch, 1), (3 * ch,)
    s[f"{prefix}.proj_out.weight"], s[f"{prefix}.proj_out.bias"] = (ch, ch, 1), (ch,)


def _dag_chain(s, prefix, ch, deg_dim, reduction):
    s[f"{prefix}.chain.0.weight"] = (ch, deg_dim)
    for n in (1, 2):
        d = f"{prefix}.body.0.da_conv{n}"
        s[f"{d}.kernel.0.weight"], s[f"{d}.kernel.2.weight"] = (ch, ch), (9 * ch, ch)
        s[f"{d}.conv.weight"], s[f"{d}.conv.bias"] = (ch, ch, 1, 1), (ch,)
        s[f"{d}.ca.conv_du.0.weight"] = (ch // reduction, ch, 1, 1)
        s[f"{d}.ca.conv_du.2.weight"] = (ch, ch // reduction, 1, 1)
    for conv in ("body.0.conv1", "body.0.conv2", "body.1"):
        s[f"{prefix}.{conv}.weight"], s[f"{prefix}.{conv}.bias"] = (ch, ch, 3, 3), (ch,)


def _resnet_learner(s, prefix, stem, widths, blocks):
    """blindsr.ResNet with BasicBlocks (no fc)."""
    def bn(p, c):
        s[f"{p}.weight"] = s[f"{p}.bias"] = s[f"{p}.running_mean"] = s[f"{p}.running_var"] = (c,)
        s[f"{p}.num_batches_tracked"] = ()
    s[f"{prefix}.conv1.weight"] = (stem, 3, 7, 7)
    bn(f"{prefix}.bn1", stem)
    inplanes = stem
    for n, (w, count) in enumerate(zip(widths, blocks), start=1):
        for j in range(count):
            p = f"{prefix}.layer{n}.{j}"
            s[f"{p}.conv1.weight"] = (w, inplanes, 3, 3)
            bn(f"{p}.bn1", w)
            s[f"{p}.conv2.weight"] = (w, w, 3, 3)
            bn(f"{p}.bn2", w)
            if j == 0 and (n > 1 or inplanes != w):
                s[f"{p}.downsample.0.weight"] = (w, inplanes, 1, 1)
                bn(f"{p}.downsample.1", w)
            inplanes = w


def encoder_degrad_shapes(cfg):
    """Keys and shapes of Encoder_degrad.__init__ (num_res_blocks=1, resblock_updown=True)."""
    a = cfg.adapter
    mc, temb = a.base_channels, a.time_embed_dim
    s: dict[str, tuple] = {}
    s["time_embed.0.weight"], s["time_embed.0.bias"] = (temb, mc), (temb,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (temb, temb), (temb,)
    s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"] = (mc, a.in_channels, 3, 3), (mc,)
    chans, ch, ds, i = [], mc, 1, 1
    attention_resolutions = [2 ** level for level in a.attention_levels]
    for level, m in enumerate(a.channel_mult):
        _ldm_resblock(s, f"input_blocks.{i}.0", ch, m * mc, temb)
        ch = m * mc
        _dag_chain(s, f"input_blocks.{i}.1", ch, a.degradation_dim, a.da_reduction)
        if ds in attention_resolutions:
            _ldm_attention_block(s, f"input_blocks.{i}.2", ch)
        chans.append(ch)
        i += 1
        if level != len(a.channel_mult) - 1:
            _ldm_resblock(s, f"input_blocks.{i}.0", ch, ch, temb)
            i += 1
            ds *= 2
    _ldm_resblock(s, "middle_block.0", ch, ch, temb)
    _ldm_attention_block(s, "middle_block.1", ch)
    _ldm_resblock(s, "middle_block.2", ch, ch, temb)
    for n, c in enumerate(chans):
        _ldm_resblock(s, f"fea_tran.{n}", c, a.local_channels, temb)
    _resnet_learner(s, "degrad_encoder", cfg.learner.stem_channels, cfg.learner.widths, cfg.learner.blocks)
    return s


def _shapes(state, prefix):
    return {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------
# Reference checkpoint import
# --------------------------------------------------------------------------------------


def test_inverse_unet_mapping_matches_reference_structure(ref_case):
    cfg, _, reference_state = ref_case
    u = cfg.unet
    expected = ldm_unet_spade_shapes(
        mc=u["block_out_channels"][0],
        mult=[c // u["block_out_channels"][0] for c in u["block_out_channels"]],
        nrb=u["layers_per_block"],
        attention_resolutions=[1, 2, 4],
        context_dim=u["cross_attention_dim"],
        semb=cfg.adapter.local_channels,
        nhidden=cfg.modulation_hidden,
    )
    got = _shapes(reference_state, "model.diffusion_model.")
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    assert got == expected
    # every one of those keys becomes exactly one tensor of ours (backbone + modulation)
    with torch.device("meta"):
        n_ours = len(DeeDSR(cfg).unet.state_dict())
    assert len(expected) == n_ours


def test_inverse_adapter_mapping_matches_reference_structure(ref_case):
    cfg, _, reference_state = ref_case
    expected = encoder_degrad_shapes(cfg)
    got = _shapes(reference_state, "Encoder_degrad.")
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    assert got == expected


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_reference_checkpoint_roundtrip(ref_case, tmp_path, fmt):
    cfg, tiny_model, reference_state = ref_case
    path = tmp_path / f"deedsr.{fmt}"
    if fmt == "safetensors":
        save_file(reference_state, str(path))
    else:
        torch.save({"state_dict": reference_state, "global_step": 3, "epoch": 1}, path)
    model = import_reference_checkpoint(path, config=cfg)
    assert not model.training
    ours, theirs = tiny_model.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert theirs[key].dtype == tensor.dtype, key
        assert torch.equal(theirs[key], tensor), key
    assert not any(t.is_meta for t in model.state_dict().values())
    # and the imported model runs
    z = torch.randn(1, 4, 16, 16)
    d = model.learner(torch.rand(1, 3, 16, 16))
    local, tokens = model.adapter.forward_from_degradation(z, torch.tensor(10), d)
    eps = model.unet(z, torch.tensor(10), tokens, local)
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    # a DeeDSR checkpoint can be written from it (no tensor shares storage with another)
    model.save_pretrained(tmp_path / "converted")
    # imported public weights sample as the public code does at test time, and say so in the
    # checkpoint they are written to; the caller's config is left as it was
    assert model.config.sampler.profile == "reference-code" and cfg.sampler.profile == "paper"
    assert load_checkpoint(tmp_path / "converted").config.sampler.profile == "reference-code"


def _legacy_attention_block(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, heads, groups):
    """ldm AttentionBlock._forward with QKVAttentionLegacy: heads are split first, then q/k/v."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(x, groups, norm_w, norm_b, eps=1e-5), qkv_w, qkv_b)
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    return (x + F.conv1d(a, proj_w, proj_b)).reshape(b, c, h, w)


def _reference_dag_chain(x, deg, p):
    """blindsr.DAG_chain(n_blocks=1).forward from its semantics: per-sample depthwise kernel
    as a grouped conv over batch x channels, channel attention, residual."""
    b, c, h, w = x.shape
    d = F.silu(F.linear(deg, p["chain.0.weight"]))

    def da_conv(feat, n):
        pre = f"body.0.da_conv{n}."
        kernel = F.linear(F.silu(F.linear(d, p[pre + "kernel.0.weight"])), p[pre + "kernel.2.weight"])
        out = F.silu(F.conv2d(feat.reshape(1, -1, h, w), kernel.reshape(-1, 1, 3, 3), groups=b * c, padding=1))
        out = F.conv2d(out.reshape(b, -1, h, w), p[pre + "conv.weight"], p[pre + "conv.bias"])
        att = torch.sigmoid(
            F.conv2d(F.silu(F.conv2d(d[:, :, None, None], p[pre + "ca.conv_du.0.weight"])), p[pre + "ca.conv_du.2.weight"])
        )
        return out + feat * att * 2

    out = F.silu(da_conv(x, 1))
    out = F.silu(F.conv2d(out, p["body.0.conv1.weight"], p["body.0.conv1.bias"], padding=1))
    out = F.silu(da_conv(out, 2))
    out = F.conv2d(out, p["body.0.conv2.weight"], p["body.0.conv2.bias"], padding=1)
    out = F.conv2d(out, p["body.1.weight"], p["body.1.bias"], padding=1)
    return x + out


def test_reference_adapter_arithmetic_matches_after_import(cfg, reference_state, tmp_path):
    """Independent of the inverse mapping: fresh random reference-layout tensors for one
    attention block, the middle attention and one DAG_chain; the imported modules must compute
    what the reference arithmetic computes with them."""
    g = torch.Generator().manual_seed(1)
    state = dict(reference_state)
    heads, groups = cfg.adapter.num_heads, cfg.adapter.norm_groups
    blocks = {"Encoder_degrad.input_blocks.3.2.": ("attentions", 1), "Encoder_degrad.middle_block.1.": ("mid", None)}
    for prefix in blocks:
        for key in [k for k in state if k.startswith(prefix)]:
            state[key] = torch.randn(state[key].shape, generator=g) * 0.3
    dag_prefix = "Encoder_degrad.input_blocks.5.1."  # level 2 DA block (64 channels)
    for key in [k for k in state if k.startswith(dag_prefix)]:
        state[key] = torch.randn(state[key].shape, generator=g) * 0.2
    path = tmp_path / "fresh.safetensors"
    save_file(state, str(path))
    model = import_reference_checkpoint(path, config=cfg)

    with torch.no_grad():
        for prefix, (kind, level) in blocks.items():
            attn = model.adapter.attentions[level] if kind == "attentions" else model.adapter.mid_attention
            c = attn.to_q.weight.shape[0]
            x = torch.randn(2, c, 4, 5, generator=g)
            want = _legacy_attention_block(
                x, *(state[prefix + n] for n in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias",
                                                   "proj_out.weight", "proj_out.bias")), heads=heads, groups=groups
            )
            torch.testing.assert_close(attn(x), want, rtol=1e-4, atol=1e-5)

        # in float64: the chain of per-sample convolutions amplifies float32 rounding
        p = {k[len(dag_prefix):]: v.double() for k, v in state.items() if k.startswith(dag_prefix)}
        block = model.adapter.da_blocks[2].double()
        x = torch.randn(2, 64, 6, 5, generator=g, dtype=torch.float64)
        deg = torch.randn(2, cfg.adapter.degradation_dim, generator=g, dtype=torch.float64)
        want = _reference_dag_chain(x, deg, p)
        torch.testing.assert_close(block(x, block.condition(deg)), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("key, expected", [
    ("Encoder_degrad.input_blocks.1.1.body.0.extra.weight", r"Encoder_degrad\.input_blocks\.1\.1\.body\.0\.extra\.weight"),
    ("model.diffusion_model.input_blocks.1.0.spade.mlp_extra.weight", r"spade\.mlp_extra\.weight"),
], ids=["adapter", "unet"])
def test_reference_unknown_key_fails(cfg, reference_state, tmp_path, key, expected):
    state = dict(reference_state)
    state[key] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=expected):
        import_reference_checkpoint(path, config=cfg)


def test_reference_missing_key_fails(cfg, reference_state, tmp_path):
    state = dict(reference_state)
    del state["Encoder_degrad.fea_tran.2.out_layers.3.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"adapter\.local_heads\.2\.conv2\.weight"):
        import_reference_checkpoint(path, config=cfg)


def test_reference_wrong_config_fails(reference_state, tmp_path):
    path = tmp_path / "ref.safetensors"
    save_file({k: v for k, v in reference_state.items() if k.startswith("Encoder_degrad.")}, str(path))
    cfg = preset("tiny")
    cfg.adapter.base_channels = 16  # shapes no longer fit
    with pytest.raises(CheckpointError, match="shape"):
        import_reference_checkpoint(path, config=cfg)


def test_reference_ckpt_needing_unsafe_unpickling_is_refused(reference_state, tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "hparams": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="unsafe unpickling.*safetensors"):
        import_reference_checkpoint(path, config=preset("tiny"))


def test_reference_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        import_reference_checkpoint(tmp_path / "nope.ckpt", config=preset("tiny"))


# --------------------------------------------------------------------------------------
# SD 2.1-base diffusers folder
# --------------------------------------------------------------------------------------

SD_CROSS_DIM = 32  # stands for SD 2.1's 1024 (ours is 64 in the tiny preset)


@pytest.fixture(scope="module")
def sd_parts(cfg):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{**cfg.unet, "cross_attention_dim": SD_CROSS_DIM})
    vae = AutoencoderKL(**cfg.vae)
    return unet, vae


def _write_sd(folder, sd_parts, unet_kwargs=None, vae_kwargs=None):
    unet, vae = sd_parts
    unet.save_pretrained(folder / "unet", **(unet_kwargs or {}))
    vae.save_pretrained(folder / "vae", **(vae_kwargs or {}))
    return folder


@pytest.mark.parametrize(
    "layout",
    [
        "single",
        pytest.param("sharded_and_bin", id="sharded-unet-bin-vae"),
    ],
)
def test_init_from_sd_base(cfg, sd_parts, tmp_path, layout):
    kwargs = ({}, {}) if layout == "single" else ({"max_shard_size": "100KB"}, {"safe_serialization": False})
    folder = _write_sd(tmp_path / "sd", sd_parts, *kwargs)
    if layout != "single":
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert (folder / "vae" / "diffusion_pytorch_model.bin").is_file()
    sd_unet, sd_vae = sd_parts
    torch.manual_seed(4)
    model = DeeDSR(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report = init_from_sd_base(model, folder)

    assert isinstance(report, ImportReport)
    src = sd_unet.state_dict()
    kv = [k for k in src if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert len(kv) == 2 * 10  # 10 transformer blocks in the tiny UNet
    assert report.skipped == {f"unet.unet.{k}": "shape" for k in kv}
    assert report.loaded == len(src) - len(kv) + len(sd_vae.state_dict())
    text = report.summary()
    assert "shape" in text and str(report.loaded) in text

    after = model.state_dict()
    for key, tensor in src.items():
        if key in kv:
            assert torch.equal(after[f"unet.unet.{key}"], before[f"unet.unet.{key}"]), key  # fresh init kept
        else:
            assert torch.equal(after[f"unet.unet.{key}"], tensor), key
    for key, tensor in sd_vae.state_dict().items():
        assert torch.equal(after[f"vae.{key}"], tensor), key
    for key, tensor in after.items():
        if key.startswith(("learner.", "adapter.", "unet.modulation.")):
            assert torch.equal(tensor, before[key]), key
    for mod in model.unet.modulation:
        assert not mod.gamma.weight.any() and not mod.gamma.bias.any()
        assert not mod.beta.weight.any() and not mod.beta.bias.any()


def test_init_from_sd_base_missing_vae_folder(cfg, sd_parts, tmp_path):
    folder = tmp_path / "sd"
    sd_parts[0].save_pretrained(folder / "unet")
    with pytest.raises(CheckpointError, match="vae"):
        init_from_sd_base(DeeDSR(cfg), folder)
    with pytest.raises(CheckpointError, match="missing"):
        init_from_sd_base(DeeDSR(cfg), tmp_path / "nowhere")


def test_init_from_sd_base_bad_vae_tensor_names_file(cfg, sd_parts, tmp_path):
    folder = _write_sd(tmp_path / "sd", sd_parts)
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:, :8].contiguous()
    save_file(state, str(file))
    model = DeeDSR(cfg)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*decoder\.conv_out\.weight"):
        init_from_sd_base(model, folder)
    del state["decoder.conv_out.weight"]
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"vae.*missing tensor 'decoder\.conv_out\.weight'"):
        init_from_sd_base(model, folder)


def test_init_from_sd_base_contradicting_config(cfg, sd_parts, tmp_path):
    folder = _write_sd(tmp_path / "sd", sd_parts)
    file = folder / "unet" / "config.json"
    config = json.loads(file.read_text())
    config["norm_num_groups"] = 4
    file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        init_from_sd_base(DeeDSR(cfg), folder)
    init_from_sd_base(DeeDSR(cfg), folder, strict=False)  # allowed when asked for
