"""interplab.decomposition (RepDecompose, ch07): direct contributions sum to each family's own z."""
import math

import pytest
import timm
import torch
from torch import nn

from interplab import anatomy, hooks
from interplab import decomposition as dec
from interplab.decomposition import ablate, decompose
from interplab.anatomy import UnsupportedModel
from interplab.errors import BadParameter
from interplab.models import tiny_random

ATOL = 1e-5  # fp32


def _scramble(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights of O(1) effect everywhere (default inits leave LN betas at 0, biases at 0,
    LayerScale tiny and attention near uniform, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 1 / math.sqrt(p.shape[-1]) if p.dim() >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _timm_z(model):
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def _first(out):
    return out if torch.is_tensor(out) else out.pooler_output


def _open_clip_vit(pool_type, final_ln_after_pool):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2,
                             ls_init_value=0.1, pool_type=pool_type, final_ln_after_pool=final_ln_after_pool,
                             output_dim=32)


def _timm_vit_avg(fc_norm):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10, global_pool="avg", fc_norm=fc_norm, reg_tokens=2, init_values=0.1)


def _with_projection(clip):
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(clip.config.vision_config)


# name -> (builder, reference z: model -> images -> (N, d), family the decomposition reports)
CASES = {
    "timm_vit": (tiny_random.timm_vit, _timm_z, "timm_vit"),
    "timm_vit_avg_fc_norm": (lambda: _timm_vit_avg(True), _timm_z, "timm_vit"),  # + 2 registers, LayerScale
    "timm_vit_avg_token_norm": (lambda: _timm_vit_avg(False), _timm_z, "timm_vit"),  # norm per token, then mean
    "timm_swin": (tiny_random.timm_swin, _timm_z, "timm_swin"),
    "clip": (tiny_random.clip, lambda m: lambda x: _first(m.get_image_features(pixel_values=x)), "clip_vision"),
    "clip_vision": (lambda: tiny_random.clip().vision_model, lambda m: lambda x: m(pixel_values=x).pooler_output,
                    "clip_vision"),
    "clip_vision_with_projection": (lambda: _with_projection(tiny_random.clip()),
                                    lambda m: lambda x: m(pixel_values=x).image_embeds, "clip_vision"),
    "open_clip": (tiny_random.open_clip, lambda m: m.encode_image, "open_clip_vit"),
    "open_clip_avg_ln_after_pool": (lambda: _open_clip_vit("avg", True), lambda m: m, "open_clip_vit"),
    "open_clip_avg_ln_per_token": (lambda: _open_clip_vit("avg", False), lambda m: m, "open_clip_vit"),
}


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cases():
    """name -> (model, images, reference z, Contributions with tokens)."""
    out = {}
    for i, (name, (build, reference, _)) in enumerate(CASES.items()):
        model = _scramble(build(), seed=i)
        x = _images()
        with torch.inference_mode():
            z = reference(model)(x)
        out[name] = (model, x, z, decompose(model, x, tokens=True))
    return out


@pytest.mark.parametrize("name", CASES)
def test_representation_is_the_z_decompose_splits(cases, name):
    model, x, z, _ = cases[name]
    assert torch.equal(dec.representation(model, x).float(), z)
    assert torch.allclose(dec.representation(model, x, batch_size=2).float(), z, rtol=0, atol=1e-6)  # 2 + 1


@pytest.mark.parametrize("name", CASES)
def test_contributions_sum_to_the_models_own_representation(cases, name):
    model, x, z, c = cases[name]
    assert torch.equal(c.z, z)  # z is the model's own forward pass, not the sum
    assert torch.allclose(c.total(), z, rtol=0, atol=ATOL), (c.total() - z).abs().max()
    n, d = z.shape
    L, H = len(c.layers), max(c.n_heads)
    assert c.heads.shape == (n, L, H, d) and c.mlps.shape == c.attn_bias.shape == c.attns.shape == (n, L, d)
    assert c.embed.shape == c.bias.shape == (n, d)
    assert c.family == CASES[name][2] and not c.heads.is_inference()
    assert c.bias.abs().max() > 0.1 and all(c.heads[:, i, h].abs().max() > 1e-3
                                            for i in range(L) for h in range(c.n_heads[i]))


@pytest.mark.parametrize("name", CASES)
def test_head_split_sums_to_the_layers_attention_write(cases, name):
    """heads come from the concatenated heads x W_O column blocks; attns from the module's own output."""
    c = cases[name][3]
    assert torch.allclose(c.heads.sum(2) + c.attn_bias, c.attns, rtol=0, atol=ATOL)
    for i, n in enumerate(c.n_heads):
        assert not c.heads[:, i, n:].any()  # padding rows (Swin's early stages have fewer heads)


@pytest.mark.parametrize("name", CASES)
def test_token_split_sums_to_each_heads_contribution(cases, name):
    c = cases[name][3]
    n, L, H, T, d = c.tokens.shape
    assert (n, L, H, d) == c.heads.shape and T == max(c.n_tokens)
    assert torch.allclose(c.tokens.sum(3), c.heads, rtol=0, atol=ATOL)
    for i, t in enumerate(c.n_tokens):
        assert not c.tokens[:, i, :, t:].any()
    if name == "timm_swin":
        assert c.n_tokens == (256, 256, 64, 64)  # the 16x16 and 8x8 grids of the two stages


def test_names_partition_z_and_select_groups(cases):
    c = cases["timm_swin"][3]
    assert c.names()[:4] == ["embed", "layer[0].attn.head[0]", "layer[0].attn.head[1]", "layer[0].attn.bias"]
    assert c.names("layer") == ["embed", "layer[0].attn", "layer[0].mlp", "layer[1].attn", "layer[1].mlp",
                                "layer[2].attn", "layer[2].mlp", "layer[3].attn", "layer[3].mlp", "bias"]
    for granularity in ("head", "layer"):
        assert torch.allclose(c.stack(c.names(granularity)).sum(0), c.total(), atol=1e-6)
    assert torch.allclose(c["layer[2].attn"], c.heads[:, 2].sum(1) + c.attn_bias[:, 2])
    assert torch.equal(c["layer[-1].mlp"], c.mlps[:, 3])
    assert torch.allclose(c["layer[1]"], c["layer[1].attn"] + c["layer[1].mlp"])
    assert torch.allclose(c["layer[3].attn.head[2].token[5]"], c.tokens[:, 3, 2, 5])
    for bad, hint in [("layer[0].mlpp", "use embed, bias"), ("layer[9].mlp", "covers layers 0..3"),
                      ("layer[0].attn.head[2]", "heads 0..1"),
                      ("layer[2].attn.head[0].token[64]", "tokens 0..63")]:
        with pytest.raises(KeyError, match=hint.replace("[", r"\[")):
            c[bad]


def test_ablation_removes_exactly_the_contribution(cases):
    c = cases["timm_vit"][3]
    total = c.total()
    for name in ["layer[1].attn.head[2]", "layer[0].mlp", "layer[1].attn", "embed", "bias"]:
        assert torch.equal(ablate(c, name), total - c[name])
        assert torch.allclose(ablate(c, [name], mode="mean"), total - c[name] + c[name].mean(0), atol=1e-6)
    assert torch.allclose(ablate(c, c.names()), torch.zeros_like(total), atol=1e-5)
    # mean-ablating every component gives every image the mean representation
    assert torch.allclose(ablate(c, c.names("layer"), mode="mean"), total.mean(0).expand_as(total), atol=1e-5)
    assert torch.equal(ablate(c, ["layer[1]", "layer[1].mlp"]), ablate(c, "layer[1]"))  # overlaps count once
    model = cases["timm_vit"][0]
    ref = dec.Contributions.cat([decompose(model, _images(2, seed=7)), decompose(model, _images(3, seed=8))])
    assert torch.allclose(ablate(c, "layer[0].mlp", mode="mean", reference=ref),
                          total - c["layer[0].mlp"] + ref["layer[0].mlp"].mean(0), atol=1e-6)
    with pytest.raises(BadParameter, match="mode='max' is not valid"):
        ablate(c, "embed", mode="max")


@torch.inference_mode()
def test_heads_and_tokens_in_closed_form_through_the_frozen_final_norm(cases):
    """CLS ViT: head = gamma * centre(z_h[CLS] W_O^h) / sigma(x_L[CLS]); token t: z_h[CLS] -> A[CLS, t] v_t."""
    model, x, _, c = cases["timm_vit"]
    layer, head, token = 1, 2, 3
    site = anatomy.head_slice(model, layer, head)
    qkv_path = f"blocks.{layer}.attn.qkv"
    with hooks.trace(model, [site.path, "norm"], at="input") as t, hooks.trace(model, qkv_path) as qkv:
        model.forward_features(x)
    w_o = hooks.get_module(model, site.path).weight[:, site.dims]
    sigma = (t["norm"][:, 0].var(-1, unbiased=False) + model.norm.eps).sqrt()

    def through_norm(write):
        return model.norm.weight * (write - write.mean(-1, keepdim=True)) / sigma[:, None]

    assert torch.allclose(c.heads[:, layer, head], through_norm(t[site.path][:, 0, site.dims] @ w_o.T), atol=1e-6)
    q, k, v = (part[..., site.dims] for part in qkv[qkv_path].chunk(3, -1))
    attn = (torch.einsum("nd,ntd->nt", q[:, 0], k) / math.sqrt(q.shape[-1])).softmax(-1)  # (N, T) from CLS
    expected = through_norm(attn[:, token, None] * v[:, token] @ w_o.T)
    assert torch.allclose(c.tokens[:, layer, head, token], expected, atol=1e-6)


@pytest.mark.parametrize("name,start", [("timm_vit", 1), ("open_clip", -1), ("timm_swin", 1), ("timm_swin", 2)])
def test_later_start_folds_earlier_layers_into_embed(cases, name, start):
    """Layers before start (and, for Swin, the patch merge at the start of its stage) become embed."""
    model, x, z, full = cases[name]
    c = decompose(model, x, start=start)
    first = start % len(full.layers)
    assert c.layers == full.layers[first:] and torch.allclose(c.total(), z, atol=ATOL)
    assert torch.allclose(c.heads, full.heads[:, first:, :c.heads.shape[2]], atol=1e-6)
    earlier = full.heads[:, :first].sum((1, 2)) + full.attn_bias[:, :first].sum(1) + full.mlps[:, :first].sum(1)
    assert torch.allclose(c.embed + c.bias, full.embed + full.bias + earlier, atol=ATOL)


@torch.inference_mode()
def test_swin_window_layout_is_the_models_own(cases):
    """_to_windows matches what the block hands its attention (traced), and _from_windows inverts it."""
    model = cases["timm_swin"][0]
    for path in anatomy.items(model):
        blk = hooks.get_module(model, path)
        index = {}

        def positions(h):  # replace norm1's output by each position's flat index
            grid = torch.arange(h.shape[1] * h.shape[2], dtype=h.dtype).view(1, *h.shape[1:3], 1)
            index["grid"] = grid[..., 0].expand(len(h), -1, -1)
            return grid.expand_as(h).clone()

        with hooks.edit(model, f"{path}.norm1", positions), hooks.trace(model, f"{path}.attn", at="input") as t:
            model.forward_features(_images(2))
        assert torch.equal(dec._to_windows(index["grid"][..., None], blk)[..., 0], t[f"{path}.attn"][..., 0])
        grid = index["grid"][..., None]
        assert torch.equal(dec._from_windows(dec._to_windows(grid, blk), blk, grid.shape[1:3]), grid)
    assert any(any(hooks.get_module(model, p).shift_size) for p in anatomy.items(model))


def test_batches_give_the_same_result(cases):
    model, x, _, c = cases["timm_swin"]
    b = decompose(model, x, tokens=True, batch_size=2)
    for field in ("z", "embed", "heads", "mlps", "bias", "tokens"):
        assert torch.allclose(getattr(b, field), getattr(c, field), atol=1e-6)


def test_unsupported_models_and_modes_raise_clearly():
    with pytest.raises(anatomy.UnsupportedModel, match="does not support GPT2LMHeadModel .*supported: timm "
                                                       "VisionTransformer .*open_clip CLIP"):
        decompose(tiny_random.gpt2(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(anatomy.UnsupportedModel, match="does not support Linear; supported"):
        decompose(nn.Linear(2, 2), torch.zeros(1, 2))
    vit = tiny_random.timm_vit()
    with pytest.raises(BadParameter, match="model.eval"):
        decompose(vit.train(), _images(1))
    vit.eval()
    with pytest.raises(BadParameter, match="start=5 is out of range"):
        decompose(vit, _images(1), start=5)
    vit.global_pool = "max"
    with pytest.raises(anatomy.UnsupportedModel, match="global_pool='max'"):
        decompose(vit, _images(1))


# ------------------------------------------------------------------ the shipped toy models


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_shipped_zoo_models_decompose_exactly(name):
    from interplab import toyworld as tw
    from interplab.zoo import store, vits

    if not (store.zoo_dir(name) / "card.json").exists():
        pytest.skip(f"no shipped checkpoint; `{store.train_command(name)}` builds it")
    model = vits.load(name)
    x = tw.toynet(8, seed=5, split="val")[0]
    c = decompose(model, x, tokens=name == "vit")
    with torch.inference_mode():
        assert torch.equal(c.z, vits.embed(model, x))
    assert torch.allclose(c.total(), c.z, rtol=0, atol=ATOL), (c.total() - c.z).abs().max()
    assert torch.allclose(c.heads.sum(2) + c.attn_bias, c.attns, rtol=0, atol=ATOL)
    assert c.layers == tuple(range(anatomy.n_layers(model)))
    if name == "vit":
        assert c.tokens.shape[1:4] == (6, 4, 65)
        assert torch.allclose(c.tokens.sum(3), c.heads, rtol=0, atol=ATOL)


def test_paper_encoders_build_offline_and_decompose():
    from interplab.models import vit_encoders

    assert set(vit_encoders.ENCODERS) == {"deit", "dino", "dinov2", "swin", "maxvit", "clip"}
    model = vit_encoders.build("deit", img_size=32)                          # DeiT-B/16, random weights, 2x2 patches
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c = decompose(model, x, start=-5)                                         # the paper's range: blocks 7-11
    assert len(c.layers) == 5 and c.heads.shape[1:3] == (5, 12)
    assert torch.allclose(c.total(), c.z, atol=1e-4)


def test_maxvit_units_decompose_exactly_across_stage_downsamples():
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg

    torch.manual_seed(0)
    model = MaxxVit(MaxxVitCfg(embed_dim=(32, 64), depths=(1, 1), block_type=("M", "M"), stem_width=32,
                               head_hidden_size=64, transformer_cfg=MaxxVitTransformerCfg(
                                   window_size=(4, 4), grid_size=(4, 4), dim_head=16)), img_size=32).eval()
    assert anatomy.items(model)[:3] == ["stages.0.blocks.0.conv", "stages.0.blocks.0.attn_block",
                                        "stages.0.blocks.0.attn_grid"]
    x = _images(3)
    with torch.inference_mode():
        z = model.forward_features(x).mean((2, 3))
    for start in (0, 3, -1):       # 3: the embed passes stage 1's pool + 1x1 conv shortcut
        c = decompose(model, x, start=start)
        assert torch.equal(c.z, z)
        assert torch.allclose(c.total(), c.z, rtol=0, atol=ATOL), (c.total() - c.z).abs().max()
        assert torch.allclose(c.heads.sum(2) + c.attn_bias, c.attns, rtol=0, atol=ATOL)
    assert torch.allclose(dec.representation(model, x), z, rtol=0, atol=1e-6)
    c = decompose(model, x)
    assert c.n_heads == (0, 2, 2, 0, 4, 4)            # MBConv layers have no heads; their branch is the mlp
    assert c.heads[:, 0].abs().max() == 0 and c.mlps[:, 0].abs().max() > 0
    # Fig. 7.2's axis: 5 sublayers per MaxViT block (MBConv, block attention + MLP, grid attention + MLP)
    assert c.names("layer")[1:6] == ["layer[0].mlp", "layer[1].attn", "layer[1].mlp", "layer[2].attn", "layer[2].mlp"]
    assert len(c.names("layer")) == 2 + 2 * 5 and "layer[3].attn.bias" not in c.names()
    for granularity in ("head", "layer"):
        assert torch.allclose(c.stack(c.names(granularity)).sum(0), c.total(), atol=1e-6)
    with pytest.raises(UnsupportedModel, match="tokens"):
        decompose(model, x, tokens=True)


def test_paper_maxvit_decomposes_the_released_range():
    from interplab.models import vit_encoders

    model = vit_encoders.build("maxvit")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    c = decompose(model, x, start=-12)            # stage 3 blocks 3-4 and stage 4 blocks 0-1 (N = 156)
    assert sum(c.n_heads) + 4 * 2 + 4 == 156 and c.z.shape == (1, 768)   # heads + MLPs + MBConvs
    assert torch.allclose(c.total(), c.z, atol=1e-4)
