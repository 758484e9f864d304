"""interplab.anatomy: every family's names resolve on a tiny model and mean what they say."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interplab import anatomy, hooks
from interplab.models import tiny_random

BUILDERS = ["gpt2", "llama", "phi3", "clip", "clip_text", "unet", "timm_vit", "timm_swin", "open_clip"]

# Registered components a tiny model legitimately lacks (the projection lives in a wrapper class).
ABSENT = {"clip_text": {"head"}, "clip": {"text_encoder.head", "vision_encoder.head"}}


@pytest.fixture(scope="module")
def models():
    return {name: getattr(tiny_random, name)() for name in BUILDERS}


def _registered(model):
    """Every registered component of the model's family (or towers), index written as [i]."""
    spec = anatomy.detect(model)
    if isinstance(spec, anatomy.Composite):
        out = set(spec.extra)
        for tower in spec.towers:
            _, _, fam = anatomy.tower_of(model, tower)
            out |= {f"{tower}.{n}" for n in _keys(fam)}
        return out
    return _keys(spec)


def _keys(fam):
    return {k.replace(k.split(".")[0], k.split(".")[0] + "[i]", 1) if k.split(".")[0] in fam.indexed else k
            for k in fam.components}


@pytest.mark.parametrize("name", BUILDERS)
def test_every_registered_component_resolves(models, name):
    model = models[name]
    names = anatomy.names(model)
    covered = {n.replace(n[n.index("["):n.index("]") + 1], "[i]") if "[" in n else n for n in names}
    assert covered == _registered(model) - ABSENT.get(name, set())
    for n in names:
        site = anatomy.resolve(model, n)
        assert site.at in hooks.AT
        assert isinstance(hooks.get_module(model, site.path), nn.Module)


@pytest.mark.parametrize("name,family,layers", [
    ("gpt2", "gpt2", 2), ("llama", "llama", 2), ("phi3", "phi3", 2), ("clip_text", "clip_text", 2),
    ("timm_vit", "timm_vit", 2), ("timm_swin", "timm_swin", 4)])
def test_detection_and_layer_counts(models, name, family, layers):
    model = models[name]
    assert anatomy.detect(model).name == family
    assert anatomy.n_layers(model) == layers


def test_layer_counts_follow_the_config(models):
    assert anatomy.n_layers(models["gpt2"]) == models["gpt2"].config.n_layer
    assert anatomy.n_layers(models["llama"]) == models["llama"].config.num_hidden_layers
    clip = models["clip"]
    assert anatomy.n_layers(clip, tower="text_encoder") == clip.config.text_config.num_hidden_layers
    assert anatomy.n_layers(clip, tower="vision_encoder") == clip.config.vision_config.num_hidden_layers
    assert anatomy.n_layers(models["open_clip"], tower="vision_encoder") == 2
    assert anatomy.n_layers(models["open_clip"], tower="text_encoder") == 2
    assert anatomy.n_xattn(models["unet"]) == 4  # first down block, mid block, 2 in the last up block


def test_concrete_paths(models):
    gpt2, clip, unet = models["gpt2"], models["clip"], models["unet"]
    assert anatomy.resolve(gpt2, "layer[1].mlp.out") == ("transformer.h.1.mlp.c_proj", "output")
    assert anatomy.resolve(gpt2, "layer[-1].attn.heads") == ("transformer.h.1.attn.c_proj", "input")
    assert anatomy.resolve(gpt2.transformer, "layer[0].mlp") == ("h.0.mlp", "output")  # GPT2Model
    assert anatomy.resolve(clip, "text_encoder.layer[0].self_attn.out") == (
        "text_model.encoder.layers.0.self_attn.out_proj", "output")
    assert anatomy.resolve(clip.text_model, "layer[0].attn.out") == ("encoder.layers.0.self_attn.out_proj", "output")
    assert anatomy.resolve(clip, "vision_encoder.final_norm").path == "vision_model.post_layernorm"
    assert anatomy.resolve(unet, "xattn[1].to_v").path == "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    assert anatomy.resolve(unet, "self_attn[1]").path == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert anatomy.resolve(models["timm_swin"], "layer[2].mlp.out").path == "layers.1.blocks.0.mlp.fc2"
    assert anatomy.resolve(models["open_clip"], "vision_encoder.layer[1].attn.heads") == (
        "visual.transformer.resblocks.1.attn.out_proj", "input")
    assert anatomy.resolve(models["open_clip"], "text_encoder.final_norm").path == "ln_final"
    assert anatomy.resolve(models["phi3"], "layer[1].attn.heads") == ("model.layers.1.self_attn.o_proj", "input")
    assert anatomy.resolve(models["phi3"], "layer[0].attn.qkv").path == "model.layers.0.self_attn.qkv_proj"
    assert anatomy.resolve(models["open_clip"].visual, "layer[0].mlp.neurons") == (
        "transformer.resblocks.0.mlp.c_proj", "input")


def _call_order(model, paths, run):
    order = []
    handles = [hooks.get_module(model, p).register_forward_hook(lambda m, a, o, p=p: order.append(p))
               for p in paths]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order


def test_unet_cross_attention_order_is_call_order(models):
    unet = models["unet"]
    xattn = anatomy.items(unet, "xattn")
    registration = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert sorted(registration) == sorted(xattn) and registration != xattn  # named_modules: up before mid
    run = lambda: unet(torch.randn(1, 4, 16, 16), 3, encoder_hidden_states=torch.randn(1, 5, 32))
    assert _call_order(unet, xattn, run) == xattn
    self_attn = anatomy.items(unet, "self_attn")
    assert _call_order(unet, self_attn, run) == self_attn


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sd_unet_has_the_70_traced_layers_of_chapter_5_in_call_order(version):
    from interplab.models.diffusion import random_sd
    unet, _ = random_sd(version, width=32, text_layers=1)
    layers = anatomy.items(unet, "layer")
    kinds = [p.rpartition(".")[2] for p in layers]
    assert len(layers) == 70 and kinds.count("attn2") == 16 and sum("resnets" in p for p in layers) == 22
    xattn = [p for p in layers if p.endswith("attn2")]
    assert xattn == anatomy.items(unet, "xattn") and xattn == sorted(xattn)  # part II's list: sorted names
    run = lambda: unet(torch.randn(1, 4, 16, 16), 3, encoder_hidden_states=torch.randn(1, 3, unet.config.cross_attention_dim))
    assert _call_order(unet, layers, run) == layers  # forward order, not registration order
    assert [anatomy.unet_layer_label(layers[i]) for i in (0, 1, 26, 28, 69)] == [
        "down-0-resnet-0", "down-0-self-attn-0", "mid-resnet-0", "mid-cross-attn-0", "up-3-ff-2"]
    assert layers[35:38] == [f"up_blocks.1.attentions.0.transformer_blocks.0.{x}" for x in ("attn1", "attn2", "ff")]


def test_sdxl_unet_has_70_cross_attentions_at_the_indices_the_dissertation_names():
    from diffusers import UNet2DConditionModel
    from interplab.models.diffusion import sd_unet_config
    unet = UNet2DConditionModel(**sd_unet_config("xl", 32)).eval()
    xattn, layers = anatomy.items(unet, "xattn"), anatomy.items(unet, "layer")
    assert len(xattn) == 70 and len(layers) == 17 + 70 * 3 and xattn == sorted(xattn)
    assert xattn[45] == "up_blocks.0.attentions.1.transformer_blocks.1.attn2"      # style / facts (m = 3: 45-47)
    assert xattn[15] == "down_blocks.2.attentions.1.transformer_blocks.1.attn2"    # objects (m = 5: 15-19)
    assert xattn[24] == "mid_block.attentions.0.transformer_blocks.0.attn2" and xattn[64].startswith("up_blocks.1.")
    text = torch.randn(1, 3, 2048)
    added = dict(text_embeds=torch.randn(1, 1280), time_ids=torch.randn(1, 6))
    run = lambda: unet(torch.randn(1, 4, 8, 8), 3, encoder_hidden_states=text, added_cond_kwargs=added)
    assert _call_order(unet, xattn, run) == xattn
    assert anatomy.unet_layer_label(xattn[15]) == "down-2-cross-attn-1.1"


def test_if_unet_has_22_joint_attentions_that_read_the_text():
    from diffusers import UNet2DConditionModel
    from interplab.models.diffusion import sd_unet_config
    unet = UNet2DConditionModel(**sd_unet_config("if", 32)).eval()
    xattn, layers = anatomy.items(unet, "xattn"), anatomy.items(unet, "layer")
    assert len(xattn) == 22 and xattn == sorted(xattn)                              # down 3 x 3, mid 1, up 3 x 4
    assert all(unet.get_submodule(p).add_k_proj is not None for p in xattn)
    assert xattn[0] == "down_blocks.1.attentions.0" and xattn[9] == "mid_block.attentions.0"
    run = lambda: unet(torch.randn(1, 3, 16, 16), 3, encoder_hidden_states=torch.randn(1, 5, unet.config.encoder_hid_dim))
    assert _call_order(unet, xattn, run) == xattn
    assert _call_order(unet, layers, run) == layers                                 # resnets, attentions, resamplers
    assert "down_blocks.0.downsamplers.0" in layers and anatomy.unet_layer_label("down_blocks.0.downsamplers.0") == "down-0-downsampler"
    assert anatomy.resolve(unet, "xattn[9].to_k").path == "mid_block.attentions.0.to_k"


def test_zoo_t2i_unet_has_44_traced_layers_and_10_cross_attentions():
    from diffusers import UNet2DConditionModel
    from interplab.zoo import t2i
    unet = UNet2DConditionModel(**t2i.unet_config())
    layers = anatomy.items(unet, "layer")
    assert len(layers) == 44 and anatomy.n_xattn(unet) == 10 and sum("resnets" in p for p in layers) == 14


def test_swin_layers_are_flattened_in_call_order(models):
    swin = models["timm_swin"]
    layers = anatomy.items(swin)
    assert layers == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert _call_order(swin, layers, lambda: swin(torch.randn(1, 3, 32, 32))) == layers


# ------------------------------------------------------------------------ heads

_INPUTS = {
    "gpt2": lambda m: m(torch.randint(3, 60, (2, 6))),
    "llama": lambda m: m(torch.randint(3, 60, (2, 6))),
    "phi3": lambda m: m(torch.randint(3, 60, (2, 6))),
    "clip_text": lambda m: m(torch.randint(3, 60, (2, 6))),
    "timm_vit": lambda m: m(torch.randn(2, 3, 32, 32)),
    "timm_swin": lambda m: m(torch.randn(2, 3, 32, 32)),
    "unet": lambda m: m(torch.randn(2, 4, 16, 16), 3, encoder_hidden_states=torch.randn(2, 5, 32)),
}
_HEADS = [(name, None) for name in _INPUTS] + [
    ("clip", "vision_encoder"), ("open_clip", "vision_encoder"), ("open_clip", "text_encoder")]


def _run(name, model):
    if name == "clip":
        return model(input_ids=torch.randint(3, 60, (2, 6)), pixel_values=torch.randn(2, 3, 32, 32))
    if name == "open_clip":
        return model(torch.randn(2, 3, 32, 32), torch.randint(3, 60, (2, 16)))
    return _INPUTS[name](model)


@pytest.mark.parametrize("name,tower", _HEADS)
def test_head_slices_partition_the_out_projection_input(models, name, tower):
    model = models[name]
    kind = anatomy.detect(model).heads_kind if tower is None else "layer"
    layers = anatomy.count(model, kind, tower=tower)
    sites = []
    for layer in range(layers):
        n = anatomy.n_heads(model, layer, tower=tower)
        sites.append([anatomy.head_slice(model, layer, h, tower=tower) for h in range(n)])
    paths = [s[0].path for s in sites]
    with torch.no_grad(), hooks.trace(model, paths, at="input") as t:
        _run(name, model)
    for layer_sites in sites:
        path = layer_sites[0].path
        assert {s.path for s in layer_sites} == {path} and all(s.at == "input" for s in layer_sites)
        full = t[path]
        assert torch.equal(torch.cat([full[..., s.dims] for s in layer_sites], -1), full)
        assert layer_sites[-1].dims.stop == full.shape[-1] and len(layer_sites) > 1


def test_head_counts_come_from_the_config_or_module(models):
    assert anatomy.n_heads(models["gpt2"]) == models["gpt2"].config.n_head
    assert anatomy.n_heads(models["llama"]) == models["llama"].config.num_attention_heads
    assert anatomy.n_heads(models["clip"], tower="text_encoder") == 4
    assert anatomy.n_heads(models["timm_swin"], 2) == 4  # second stage: num_heads=(2, 4)
    assert anatomy.n_heads(models["open_clip"], tower="vision_encoder") == 64 // 16  # width / head_width
    # diffusers' attention_head_dim=8 is really the number of heads in UNet2DConditionModel
    assert anatomy.n_heads(models["unet"], 1) == 8
    assert anatomy.head_slice(models["unet"], 1, 1).dims == slice(8, 16)  # 64 channels / 8 heads


@torch.no_grad()
def test_gpt2_head_slice_is_that_heads_attention_output(models):
    """Closed form: head h = softmax(q_h k_h^T / sqrt(d) + causal) v_h, from c_attn's output."""
    model = models["gpt2"]
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    layer, head = 1, 2
    site = anatomy.head_slice(model, layer, head)
    qkv_path = anatomy.resolve(model, f"layer[{layer}].attn").path + ".c_attn"
    with hooks.trace(model, qkv_path) as qkv, hooks.trace(model, site.path, at=site.at) as z:
        model(ids)
    q, k, v = qkv[qkv_path].split(model.config.n_embd, dim=-1)
    q, k, v = (x[..., site.dims] for x in (q, k, v))
    d = site.dims.stop - site.dims.start
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(z[site.path][..., site.dims], scores.softmax(-1) @ v, atol=1e-5)


@torch.no_grad()
def test_open_clip_head_slice_is_that_heads_attention_output(models):
    """Same closed form through the virtual out_proj site of nn.MultiheadAttention (vision, no mask)."""
    model = models["open_clip"]
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layer, head = 0, 3
    site = anatomy.head_slice(model, layer, head, tower="vision_encoder")
    norm1 = anatomy.resolve(model, f"vision_encoder.layer[{layer}].norm1").path
    mha = hooks.get_module(model, site.path.rpartition(".")[0])
    with hooks.trace(model, norm1) as x, hooks.trace(model, site.path, at=site.at) as z:
        model.encode_image(image)
    q, k, v = F.linear(x[norm1], mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t[..., site.dims] for t in (q, k, v))
    d = site.dims.stop - site.dims.start
    expected = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v
    assert torch.allclose(z[site.path][..., site.dims], expected, atol=1e-5)


@torch.no_grad()
def test_zeroing_one_head_through_anatomy_and_hooks(models):
    """Ablate head h of a timm ViT: the attention output drops exactly that head's term."""
    model = models["timm_vit"]
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    site = anatomy.head_slice(model, 0, 1)
    proj = hooks.get_module(model, site.path)
    with hooks.trace(model, site.path, at="input") as z, hooks.trace(model, site.path) as out:
        model(image)
    zero = lambda r: r.index_fill(-1, torch.arange(site.dims.start, site.dims.stop), 0.0)
    with hooks.edit(model, site.path, zero, at=site.at), hooks.trace(model, site.path) as ablated:
        model(image)
    term = z[site.path][..., site.dims] @ proj.weight[:, site.dims].T
    assert torch.allclose(ablated[site.path], out[site.path] - term, atol=1e-5)


# ------------------------------------------------------------------------ errors


def test_errors_name_valid_values(models):
    gpt2, clip, unet = models["gpt2"], models["clip"], models["unet"]
    with pytest.raises(KeyError, match=r"^layer\[7\] is out of range for gpt2 \(GPT2LMHeadModel\): layer has 0..1$"):
        anatomy.resolve(gpt2, "layer[7].mlp")
    with pytest.raises(anatomy.UnknownComponent, match=r"no component 'layer\[0\].mlpp' in family gpt2; "
                                                       r"valid: layer\[i\], layer\[i\].attn, "):
        anatomy.resolve(gpt2, "layer[0].mlpp")
    with pytest.raises(anatomy.UnknownComponent, match=r"xattn\[9\] is out of range .* xattn has 0..3"):
        anatomy.resolve(unet, "xattn[9].to_k")
    with pytest.raises(anatomy.UnknownComponent, match="prefix it with a tower \\(text_encoder, vision_encoder\\)"):
        anatomy.resolve(clip, "layer[0].mlp")
    with pytest.raises(anatomy.UnknownComponent, match="pass tower= one of text_encoder, vision_encoder"):
        anatomy.n_layers(clip)
    with pytest.raises(anatomy.UnknownComponent, match=r"head 4 is out of range .* heads 0..3"):
        anatomy.head_slice(gpt2, 0, 4)
    with pytest.raises(anatomy.UnknownComponent, match="family unet has no stage"):
        anatomy.items(unet, "stage")
    with pytest.raises(anatomy.UnsupportedModel, match="no anatomy for Linear; known families: gpt2, llama"):
        anatomy.resolve(nn.Linear(2, 2), "layer[0]")
    with pytest.raises(anatomy.UnknownComponent, match="'head' of family clip_text is not in this model"):
        anatomy.resolve(models["clip_text"], "head")
    for err in (anatomy.UnknownComponent("x"), anatomy.UnsupportedModel("x")):
        assert "\n" not in str(err)


def test_family_override_and_registration(models):
    llama = models["llama"]
    assert anatomy.resolve(llama.model, "layer[1].attn.out") == ("layers.1.self_attn.o_proj", "output")
    with pytest.raises(anatomy.UnsupportedModel, match="does not look like family gpt2"):
        anatomy.resolve(llama, "layer[0]", family="gpt2")
    with pytest.raises(anatomy.UnsupportedModel, match="unknown family 'gtp2'"):
        anatomy.resolve(llama, "layer[0]", family="gtp2")

    class Toy(nn.Module):  # a new family is a table, not code
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    anatomy.register(anatomy.Family("toy", ("test_anatomy:Toy",), "blocks",
                                    {"layer": anatomy.children("blocks")}, {"layer": ("{layer}", "output")}))
    try:
        assert anatomy.n_layers(Toy()) == 3 and anatomy.resolve(Toy(), "layer[-1]").path == "blocks.2"
    finally:
        del anatomy.FAMILIES["toy"]
