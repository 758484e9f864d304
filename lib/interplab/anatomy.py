"""Model anatomy as data: where each model family keeps its layers, heads and cross-attentions.

Chapters name components; this module turns names into hook sites for ``interplab.hooks``:

    resolve(gpt2, "layer[3].mlp.out")     -> Site("transformer.h.3.mlp.c_proj", "output")
    resolve(clip, "text_encoder.layer[0].self_attn.out")
                                          -> Site("text_model.encoder.layers.0.self_attn.out_proj", "output")
    resolve(unet, "xattn[2].to_k")        -> Site("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", ...)
    head_slice(gpt2, 1, 3)                -> HeadSite("transformer.h.1.attn.c_proj", "input", slice(24, 32))

A *family* is a table of component templates, ``name -> (path template, at)``. Templates use
``{root}`` (the prefix under which the family's blocks live, found by probing, so that
``GPT2LMHeadModel`` and ``GPT2Model`` share one table) and one placeholder per indexed kind
(``{layer}``, ``{xattn}``, ...), filled with the concrete path of the i-th item. The items of
an indexed kind are listed from the live module tree in forward order, so ``n_layers`` is read
from the model itself. A *composite* (CLIPModel, open_clip CLIP) names its towers, and names
are then prefixed by the tower: ``"vision_encoder.layer[1].attn"``.

Per-layer names shared by every transformer family (``i`` in ``0..n_layers-1``):

    layer[i]              the block (output: residual stream after it; at="input": before it)
    layer[i].attn         the attention module           layer[i].attn.out    its output projection
    layer[i].attn.heads   the INPUT of that projection: heads concatenated on the last dim
    layer[i].mlp          the MLP module                 layer[i].mlp.out     its output projection
    layer[i].mlp.neurons  the INPUT of mlp.out (the keys a ROME-style editor uses)
    layer[i].norm1/norm2  the norms before attention / MLP
``self_attn`` is accepted for ``attn`` (HF spelling). Global names: ``embed``, ``final_norm``,
``head`` and a few family-specific ones; ``names(model)`` lists every name that resolves.
UNets index ``xattn[i]`` (cross-attention, ``attn2``) and ``self_attn[i]`` (``attn1``), each
with ``.to_q .to_k .to_v .out .heads``, plus ``down[i]``, ``mid``, ``up[i]``; their ``layer[i]``
are the units of UNet causal tracing: every resnet and every transformer block's attn1, attn2
and ff in forward order (70 for SD-v1, labels from ``unet_layer_label``). Swin adds ``stage[i]``.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from torch import nn

from .errors import InterplabError
from .hooks import ModulePathError, get_module


class UnknownComponent(InterplabError, KeyError):
    """A component name, layer index or head that the model does not have."""

    def __str__(self):
        return self.args[0]


class UnsupportedModel(InterplabError, TypeError):
    """A model class with no registered family."""


class Site(NamedTuple):
    path: str
    at: str = "output"


class HeadSite(NamedTuple):
    path: str   # the attention's output projection
    at: str     # always "input": heads are slices of what the projection reads
    dims: slice  # on the last dim: [head * head_dim, (head + 1) * head_dim)


def _join(*parts: str) -> str:
    return ".".join(p for part in parts for p in part.split(".") if p)


# ------------------------------------------------------------------ the tables


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple            # "package:ClassName", matched along the model's MRO
    probe: str                # template that must exist under the right {root}
    indexed: dict             # kind -> lister(model, root) -> [path of item 0, item 1, ...]
    components: dict          # name -> (template, at)
    roots: tuple = ("",)      # candidate values of {root}, first that passes the probe wins
    model_types: tuple = ()   # HF config.model_type values, for head variants not listed
    heads_kind: str = "layer"  # the indexed kind head_slice uses by default


@dataclass(frozen=True)
class Composite:
    name: str
    classes: tuple
    towers: dict              # tower -> (candidate prefixes, family name or None = detect)
    extra: dict = field(default_factory=dict)  # name -> (path, at), outside every tower
    model_types: tuple = ()


def children(template: str) -> Callable:
    """Lister of the children of the container at ``template`` (a ModuleList / Sequential)."""
    def items(model, root):
        path = _join(template.format(root=root))
        return [_join(path, name) for name in get_module(model, path)._modules]
    return items


def _swin_blocks(model, root):
    """timm Swin: the blocks of every stage, flattened into one layer index in forward order."""
    stages = get_module(model, _join(root, "layers"))
    return [_join(root, "layers", s, "blocks", b)
            for s, stage in stages._modules.items() for b in stage.blocks._modules]


def _maxvit_units(model, root):
    """timm MaxxVit: every block as its units in forward order, flattened: the MBConv (``.conv``), the
    block (window) attention and the grid attention (``.attn_block``, ``.attn_grid``)."""
    stages = get_module(model, _join(root, "stages"))
    return [_join(root, "stages", s, "blocks", b, unit)
            for s, stage in stages._modules.items() for b, blk in stage.blocks._modules.items()
            for unit in ("conv", "attn_block", "attn_grid") if getattr(blk, unit, None) is not None]


def _joint_cross_attention(module: nn.Module) -> bool:
    """DeepFloyd IF's attention: one ``Attention`` whose keys are its own tokens and the text's
    (``add_k_proj`` / ``add_v_proj``), sitting directly in a block's ``attentions``."""
    return getattr(module, "add_k_proj", None) is not None


def _unet_attention(leaf: str) -> Callable:
    """Lister of a UNet's ``attn1`` / ``attn2`` modules in forward order; for ``attn2``, also IF's
    joint self/cross ``Attention`` modules (they read the text too).

    ``named_modules`` lists ``up_blocks`` before ``mid_block`` (registration order), but the
    forward runs down, mid, up; within a block it is registration order.
    """
    def wanted(name, sub):
        if sub is None:
            return False
        return name.rpartition(".")[2] == leaf or (leaf == "attn2" and _joint_cross_attention(sub))

    def items(model, root):
        found = []
        for block in ("down_blocks", "mid_block", "up_blocks"):
            module = getattr(model, block, None)
            if module is None:
                continue
            found += [_join(root, block, name) for name, sub in module.named_modules() if wanted(name, sub)]
        return found
    return items


def _unet_block_layers(block: nn.Module, path: str) -> list:
    """One UNet block's traced layers in forward order: resnet i, then transformer block i's
    attn1, attn2, ff (IF: its joint ``Attention`` i), then a resampling resnet if the block has one
    (IF's down/up blocks resample with a ResnetBlock2D; SD's Downsample2D / Upsample2D are not
    layers). The mid block runs resnet 0, then (attention i, resnet i + 1) pairs."""
    resnets = [f"{path}.resnets.{i}" for i in range(len(block.resnets))]
    attentions = getattr(block, "attentions", None) or []
    transformers = [[f"{path}.attentions.{i}"] if _joint_cross_attention(a) else
                    [f"{path}.attentions.{i}.transformer_blocks.{j}.{leaf}"
                     for j in range(len(a.transformer_blocks)) for leaf in ("attn1", "attn2", "ff")]
                    for i, a in enumerate(attentions)]
    if path.endswith("mid_block"):
        return resnets[:1] + [p for t, r in zip(transformers, resnets[1:]) for p in t + [r]]
    resample = [f"{path}.{kind}.{i}" for kind in ("downsamplers", "upsamplers")
                for i, m in enumerate(getattr(block, kind, None) or []) if type(m).__name__ == "ResnetBlock2D"]
    return [p for i, r in enumerate(resnets) for p in [r] + (transformers[i] if i < len(transformers) else [])] + resample


def _unet_layers(model, root) -> list:
    """Every ResnetBlock2D and every transformer block's attn1 / attn2 / ff of a UNet, in forward
    order: the 70 "layers" that the dissertation's UNet causal tracing restores one at a time (SD-v1)."""
    found = []
    for name in ("down_blocks", "mid_block", "up_blocks"):
        module = getattr(model, name, None)
        if module is None:
            continue
        blocks = [(f"{name}.{i}", b) for i, b in enumerate(module)] if name != "mid_block" else [(name, module)]
        for path, block in blocks:
            found += [_join(root, p) for p in _unet_block_layers(block, path)]
    return found


def unet_layer_label(path: str) -> str:
    """Display label of a traced UNet layer, diffusers' 0-based indices: ``down_blocks.0.attentions.1
    .transformer_blocks.0.attn1`` -> ``down-0-self-attn-1``; ``mid_block.resnets.1`` -> ``mid-resnet-1``;
    SD-XL's deeper transformer blocks add ``.j`` (``down-2-cross-attn-1.3``), IF's joint attention
    reads ``down-1-attn-0`` and its resampling resnets ``down-0-downsampler``."""
    parts = path.split(".")
    where = "mid" if parts[0] == "mid_block" else f"{parts[0].split('_')[0]}-{parts[1]}"
    rest = parts[1:] if parts[0] == "mid_block" else parts[2:]
    if rest[0] in ("downsamplers", "upsamplers"):
        return f"{where}-{rest[0][:-1]}"
    if rest[0] == "attentions" and len(rest) == 2:  # IF: one attention for self and text
        return f"{where}-attn-{rest[1]}"
    kind = {"attn1": "self-attn", "attn2": "cross-attn", "ff": "ff"}.get(rest[-1], "resnet")
    depth = f".{rest[3]}" if len(rest) > 3 and rest[2] == "transformer_blocks" and rest[3] != "0" else ""
    return f"{where}-{kind}-{rest[1]}{depth}"


def _layer_components(attn, attn_out, mlp, mlp_out, norm1, norm2) -> dict:
    """The shared per-layer names; arguments are module names inside one block."""
    return {
        "layer": ("{layer}", "output"),
        "layer.attn": (f"{{layer}}.{attn}", "output"),
        "layer.attn.out": (f"{{layer}}.{attn}.{attn_out}", "output"),
        "layer.attn.heads": (f"{{layer}}.{attn}.{attn_out}", "input"),
        "layer.mlp": (f"{{layer}}.{mlp}", "output"),
        "layer.mlp.out": (f"{{layer}}.{mlp}.{mlp_out}", "output"),
        "layer.mlp.neurons": (f"{{layer}}.{mlp}.{mlp_out}", "input"),
        "layer.norm1": (f"{{layer}}.{norm1}", "output"),
        "layer.norm2": (f"{{layer}}.{norm2}", "output"),
    }


def _attention_components(kind: str) -> dict:
    """A diffusers ``Attention`` module: q/k/v projections and ``to_out[0]``."""
    return {
        kind: (f"{{{kind}}}", "output"),
        **{f"{kind}.{p}": (f"{{{kind}}}.{p}", "output") for p in ("to_q", "to_k", "to_v")},
        f"{kind}.out": (f"{{{kind}}}.to_out.0", "output"),
        f"{kind}.heads": (f"{{{kind}}}.to_out.0", "input"),
    }


FAMILIES: dict = {}


def register(spec) -> None:
    """Add (or replace) a ``Family`` or ``Composite``."""
    FAMILIES[spec.name] = spec


for _spec in [
    Family("gpt2", ("transformers:GPT2LMHeadModel", "transformers:GPT2Model"), "{root}.h",
           {"layer": children("{root}.h")},
           {**_layer_components("attn", "c_proj", "mlp", "c_proj", "ln_1", "ln_2"),
            "embed": ("{root}.wte", "output"), "pos_embed": ("{root}.wpe", "output"),
            "final_norm": ("{root}.ln_f", "output"), "head": ("lm_head", "output")},
           roots=("transformer", ""), model_types=("gpt2",)),
    Family("llama", ("transformers:LlamaForCausalLM", "transformers:LlamaModel"), "{root}.layers",
           {"layer": children("{root}.layers")},
           {**_layer_components("self_attn", "o_proj", "mlp", "down_proj",
                                "input_layernorm", "post_attention_layernorm"),
            "embed": ("{root}.embed_tokens", "output"), "final_norm": ("{root}.norm", "output"),
            "head": ("lm_head", "output")},
           roots=("model", ""), model_types=("llama",)),
    # Phi-3 fuses q, k, v into one projection (and gate, up into mlp.gate_up_proj); o_proj and
    # down_proj are unfused, so the per-layer names mean what they mean for Llama.
    Family("phi3", ("transformers:Phi3ForCausalLM", "transformers:Phi3Model"), "{root}.layers",
           {"layer": children("{root}.layers")},
           {**_layer_components("self_attn", "o_proj", "mlp", "down_proj",
                                "input_layernorm", "post_attention_layernorm"),
            "layer.attn.qkv": ("{layer}.self_attn.qkv_proj", "output"),
            "embed": ("{root}.embed_tokens", "output"), "final_norm": ("{root}.norm", "output"),
            "head": ("lm_head", "output")},
           roots=("model", ""), model_types=("phi3",)),
    # Phi-1/1.5/2 (the LM of Chapter 6's multi-modal Phi-2, Bunny): a *parallel* block,
    # h + attn(ln(h)) + mlp(ln(h)), with one LayerNorm, so norm1 and norm2 are the same module.
    # The attention's output projection is self_attn.dense; mlp.fc2 (with bias) is W_proj.
    Family("phi", ("transformers:PhiForCausalLM", "transformers:PhiModel"), "{root}.layers",
           {"layer": children("{root}.layers")},
           {**_layer_components("self_attn", "dense", "mlp", "fc2", "input_layernorm", "input_layernorm"),
            "embed": ("{root}.embed_tokens", "output"), "final_norm": ("{root}.final_layernorm", "output"),
            "head": ("lm_head", "output")},
           roots=("model", ""), model_types=("phi",)),
    # transformers 5 made CLIPTextModel the tower itself (4.x wrapped a CLIPTextTransformer as
    # .text_model); the {root} probe covers both.
    Family("clip_text", ("transformers:CLIPTextModel", "transformers:CLIPTextModelWithProjection",
                         "transformers:CLIPTextTransformer"), "{root}.encoder.layers",
           {"layer": children("{root}.encoder.layers")},
           {**_layer_components("self_attn", "out_proj", "mlp", "fc2", "layer_norm1", "layer_norm2"),
            "embed": ("{root}.embeddings", "output"),
            "final_norm": ("{root}.final_layer_norm", "output"), "head": ("text_projection", "output")},
           roots=("", "text_model"), model_types=("clip_text_model",)),
    # T5's encoder (DeepFloyd IF's, SD3's text tower): each block is [self-attention sublayer,
    # feed-forward sublayer]; SelfAttention's output[0] is before the residual, the sublayer's after.
    # The gated v1.1 feed-forward (wi_0, wi_1, wo) and the plain one (wi, wo) both end in wo.
    Family("t5_encoder", ("transformers:T5EncoderModel", "transformers:T5Stack"), "{root}.block",
           {"layer": children("{root}.block")},
           {**_layer_components("layer.0.SelfAttention", "o", "layer.1.DenseReluDense", "wo",
                                "layer.0.layer_norm", "layer.1.layer_norm"),
            "embed": ("{root}.embed_tokens", "output"), "final_norm": ("{root}.final_layer_norm", "output")},
           roots=("encoder", "")),
    Family("clip_vision", ("transformers:CLIPVisionModel", "transformers:CLIPVisionModelWithProjection",
                           "transformers:CLIPVisionTransformer"), "{root}.encoder.layers",
           {"layer": children("{root}.encoder.layers")},
           {**_layer_components("self_attn", "out_proj", "mlp", "fc2", "layer_norm1", "layer_norm2"),
            "embed": ("{root}.embeddings", "output"), "pre_norm": ("{root}.pre_layrnorm", "output"),
            "final_norm": ("{root}.post_layernorm", "output"), "head": ("visual_projection", "output")},
           roots=("", "vision_model"), model_types=("clip_vision_model",)),
    Composite("clip", ("transformers:CLIPModel",),
              {"text_encoder": (("text_model",), "clip_text"),
               "vision_encoder": (("vision_model",), "clip_vision")},
              {"text_projection": ("text_projection", "output"),
               "visual_projection": ("visual_projection", "output")}, model_types=("clip",)),
    # Cross-attention i is the attn2 of the i-th transformer block in forward order; its to_k /
    # to_v read the text embeddings (what DiffQuickFix edits). self_attn[i] is attn1 of the same block.
    Family("unet", ("diffusers:UNet2DConditionModel",), "down_blocks",
           {"xattn": _unet_attention("attn2"), "self_attn": _unet_attention("attn1"),
            "down": children("down_blocks"), "up": children("up_blocks"), "layer": _unet_layers},
           {**_attention_components("xattn"), **_attention_components("self_attn"), "layer": ("{layer}", "output"),
            "down": ("{down}", "output"), "up": ("{up}", "output"), "mid": ("mid_block", "output"),
            "conv_in": ("conv_in", "output"), "conv_out": ("conv_out", "output"),
            "time_embedding": ("time_embedding", "output")},
           heads_kind="xattn"),
    Family("timm_vit", ("timm:VisionTransformer",), "blocks", {"layer": children("blocks")},
           {**_layer_components("attn", "proj", "mlp", "fc2", "norm1", "norm2"),
            "embed": ("patch_embed", "output"), "final_norm": ("norm", "output"),
            "head": ("head", "output")}),
    # Swin attention runs on windows: its sites are (B * n_windows, window_tokens, C), and block
    # outputs are (B, H, W, C), so batch/positions in hooks.replace index windows, rows of H.
    Family("timm_swin", ("timm:SwinTransformer",), "layers",
           {"layer": _swin_blocks, "stage": children("layers")},
           {**_layer_components("attn", "proj", "mlp", "fc2", "norm1", "norm2"),
            "stage": ("{stage}", "output"), "embed": ("patch_embed", "output"),
            "final_norm": ("norm", "output"), "head": ("head.fc", "output")}),
    # MaxViT: a layer is one unit of a block (MBConv, window attention, grid attention); an MBConv
    # layer has no attn / mlp children, its residual write is the whole branch (layer[i] output
    # minus its shortcut). Attention sites are partitioned: (B * n_partitions, ph, pw, C).
    Family("timm_maxvit", ("timm:MaxxVit",), "stages", {"layer": _maxvit_units, "stage": children("stages")},
           {**_layer_components("attn", "proj", "mlp", "fc2", "norm1", "norm2"),
            "stage": ("{stage}", "output"), "embed": ("stem", "output"),
            "final_norm": ("norm", "output"), "head": ("head", "output")}),
    # open_clip blocks use nn.MultiheadAttention, which never calls out_proj as a module:
    # attn.out and attn.heads are virtual sites that interplab.hooks serves from the MHA's own
    # inputs and weights. Editing the MHA's *input* changes the query only; edit norm1 instead.
    Family("open_clip_vit", ("open_clip:VisionTransformer",), "transformer.resblocks",
           {"layer": children("transformer.resblocks")},
           {**_layer_components("attn", "out_proj", "mlp", "c_proj", "ln_1", "ln_2"),
            "embed": ("conv1", "output"), "pre_norm": ("ln_pre", "output"),
            "final_norm": ("ln_post", "output")}),
    Family("open_clip_text", ("open_clip:TextTransformer",), "transformer.resblocks",
           {"layer": children("transformer.resblocks")},
           {**_layer_components("attn", "out_proj", "mlp", "c_proj", "ln_1", "ln_2"),
            "embed": ("token_embedding", "output"), "final_norm": ("ln_final", "output")}),
    # open_clip.CLIP keeps its text tower at the top level; CustomTextCLIP keeps it in .text.
    Composite("open_clip", ("open_clip:CLIP", "open_clip:CustomTextCLIP"),
              {"vision_encoder": (("visual",), None), "text_encoder": (("text", ""), "open_clip_text")}),
    # LLaVA: transformers >= 4.52 keeps the LM at model.language_model (a LlamaModel, layers directly
    # below it) and the projector at model.multi_modal_projector; <= 4.51 at language_model (a
    # LlamaForCausalLM: layers at language_model.model.layers) and multi_modal_projector. Both are
    # candidates, so neither layout is pinned.
    Composite("llava", ("transformers:LlavaForConditionalGeneration", "transformers:LlavaModel"),
              {"vision_encoder": (("model.vision_tower", "vision_tower"), "clip_vision"),
               "language_model": (("model.language_model", "language_model"), None)},
              {"projector": (("model.multi_modal_projector", "multi_modal_projector"), "output"),
               "head": (("lm_head", "language_model.lm_head"), "output")}, model_types=("llava",)),
]:
    register(_spec)


# ------------------------------------------------------------------ detection


def detect(model: nn.Module):
    """The ``Family`` or ``Composite`` of ``model``: by class (along the MRO), then HF model_type."""
    for cls in type(model).__mro__:
        key = f"{cls.__module__.split('.')[0]}:{cls.__name__}"
        for spec in FAMILIES.values():
            if key in spec.classes:
                return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedModel(f"no anatomy for {type(model).__name__}; known families: "
                           f"{', '.join(FAMILIES)}; pass family=... or anatomy.register(...) a new one")


def _spec(model, family):
    if family is None:
        return detect(model)
    if family not in FAMILIES:
        raise UnsupportedModel(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _root(model, fam: Family) -> str:
    for root in fam.roots:
        try:
            get_module(model, _join(fam.probe.format(root=root)))
            return root
        except ModulePathError:
            pass
    raise UnsupportedModel(f"{type(model).__name__} does not look like family {fam.name}: "
                           f"none of {[_join(fam.probe.format(root=r)) for r in fam.roots]} exists")


def _tower(model, comp: Composite, tower: str):
    if tower not in comp.towers:
        raise UnknownComponent(f"{type(model).__name__} ({comp.name}) has towers "
                               f"{', '.join(comp.towers)}; prefix names with one, e.g. "
                               f"'{next(iter(comp.towers))}.layer[0].attn'")
    prefixes, family = comp.towers[tower]
    for prefix in prefixes:
        try:
            sub = get_module(model, prefix)
        except ModulePathError:
            continue
        return prefix, sub, _spec(sub, family)
    raise UnsupportedModel(f"{type(model).__name__} has no {tower} at any of {prefixes}")


def tower_of(model: nn.Module, name: str = None, family: str = None):
    """(path prefix, submodule, Family) of tower ``name`` of a composite; ("", model, Family) otherwise."""
    spec = _spec(model, family)
    if isinstance(spec, Composite):
        if name is None:
            raise UnknownComponent(f"{type(model).__name__} ({spec.name}) has several towers; pass "
                                   f"tower= one of {', '.join(spec.towers)}")
        return _tower(model, spec, name)
    return "", model, spec


# ------------------------------------------------------------------ resolving


_NAME = re.compile(r"^(?P<kind>[a-z_]+)\[(?P<index>-?\d+)\](?:\.(?P<rest>.+))?$")
_ALIASES = {"self_attn": "attn"}


def _valid_names(fam: Family) -> str:
    return ", ".join(re.sub(r"^(\w+)", lambda m: m[1] + "[i]" if m[1] in fam.indexed else m[1], n, 1)
                     for n in fam.components)


def items(model: nn.Module, kind: str = "layer", tower: str = None, family: str = None) -> list:
    """Module paths of the items of an indexed kind (``"layer"``, ``"xattn"``...), in forward order."""
    prefix, sub, fam = tower_of(model, tower, family)
    if kind not in fam.indexed:
        raise UnknownComponent(f"family {fam.name} has no {kind}[i]; it indexes {', '.join(fam.indexed)}")
    return [_join(prefix, p) for p in fam.indexed[kind](sub, _root(sub, fam))]


def count(model: nn.Module, kind: str = "layer", tower: str = None, family: str = None) -> int:
    return len(items(model, kind, tower, family))


def n_layers(model: nn.Module, tower: str = None, family: str = None) -> int:
    """Number of transformer blocks (of ``tower`` for a composite), read from the module tree."""
    return count(model, "layer", tower, family)


def n_xattn(model: nn.Module, family: str = None) -> int:
    """Number of cross-attention layers of a UNet."""
    return count(model, "xattn", None, family)


def _resolve_in(model, fam: Family, name: str) -> Site:
    match = _NAME.match(name)
    if match and match["kind"] in fam.indexed:
        kind, index, rest = match["kind"], int(match["index"]), match["rest"]
        if rest:
            rest = ".".join(_ALIASES.get(p, p) for p in rest.split("."))
        key = f"{kind}.{rest}" if rest else kind
    else:
        kind, key = None, name
    if key not in fam.components:
        raise UnknownComponent(f"no component '{name}' in family {fam.name}; valid: {_valid_names(fam)}")
    root = _root(model, fam)
    fill = {"root": root}
    if kind is not None:
        paths = fam.indexed[kind](model, root)
        if not -len(paths) <= index < len(paths):
            raise UnknownComponent(f"{kind}[{index}] is out of range for {fam.name} ({type(model).__name__}): "
                                   f"{kind} has 0..{len(paths) - 1}")
        fill[kind] = paths[index]
    template, at = fam.components[key]
    path = _join(template.format(**fill))
    try:
        get_module(model, path)
    except ModulePathError as err:
        raise UnknownComponent(f"'{name}' of family {fam.name} is not in this model: {err}") from None
    return Site(path, at)


def _extra(model, comp: Composite, name: str) -> Site:
    """A composite's component outside its towers; its path may be a tuple of layout candidates."""
    paths, at = comp.extra[name]
    for path in (paths,) if isinstance(paths, str) else paths:
        if _exists(model, path):
            return Site(path, at)
    raise UnknownComponent(f"'{name}' of {comp.name} is at none of {paths} in {type(model).__name__}")


def resolve(model: nn.Module, name: str, family: str = None) -> Site:
    """The hook site (module path, at) of a component name such as ``"layer[3].mlp.out"``.

    For a composite model prefix the name with a tower: ``"text_encoder.layer[0].attn"``.
    ``family`` overrides detection. Negative indices count from the end.
    """
    spec = _spec(model, family)
    if isinstance(spec, Composite):
        tower, _, rest = name.partition(".")
        if name in spec.extra:
            return _extra(model, spec, name)
        if tower not in spec.towers:
            raise UnknownComponent(f"no component '{name}' in {type(model).__name__} ({spec.name}); prefix "
                                   f"it with a tower ({', '.join(spec.towers)}) or use "
                                   f"{', '.join(spec.extra) or 'no other name'}")
        prefix, sub, fam = _tower(model, spec, tower)
        site = _resolve_in(sub, fam, rest)
        return Site(_join(prefix, site.path), site.at)
    return _resolve_in(model, spec, name)


def names(model: nn.Module, family: str = None) -> list:
    """Every component name that resolves on ``model``, indices expanded (for discovery and tests)."""
    spec = _spec(model, family)
    if isinstance(spec, Composite):
        found = []
        for n in spec.extra:
            try:
                _extra(model, spec, n)
                found.append(n)
            except UnknownComponent:
                pass
        for tower in spec.towers:
            _, sub, fam = _tower(model, spec, tower)
            found += [f"{tower}.{n}" for n in _family_names(sub, fam)]
        return found
    return _family_names(model, spec)


def _exists(model, path):
    try:
        get_module(model, path)
        return True
    except ModulePathError:
        return False


def _family_names(model, fam: Family) -> list:
    root, found = _root(model, fam), []
    for key, (template, _) in fam.components.items():
        kind, _, rest = key.partition(".")
        if kind in fam.indexed:
            paths = fam.indexed[kind](model, root)
            found += [f"{kind}[{i}]" + (f".{rest}" if rest else "") for i, p in enumerate(paths)
                      if _exists(model, _join(template.format(root=root, **{kind: p})))]
        elif _exists(model, _join(template.format(root=root))):
            found.append(key)
    return found


# ------------------------------------------------------------------ heads


def _num_heads(attn: nn.Module) -> int:
    for attr in ("num_heads", "heads", "n_head", "num_attention_heads"):
        value = getattr(attn, attr, None)
        if isinstance(value, int):
            return value
    config = getattr(attn, "config", None)  # e.g. LlamaAttention keeps only its config
    if config is not None and hasattr(config, "num_attention_heads"):
        return config.num_attention_heads
    raise UnsupportedModel(f"cannot find the number of heads of {type(attn).__name__}")


def _in_width(proj: nn.Module) -> int:
    if hasattr(proj, "in_features"):
        return proj.in_features
    return proj.weight.shape[0]  # transformers Conv1D (GPT-2) stores weight as (in, out)


def _attention_name(kind: str, index: int) -> str:
    return f"layer[{index}].attn" if kind == "layer" else f"{kind}[{index}]"


def n_heads(model: nn.Module, layer: int = 0, kind: str = None, tower: str = None, family: str = None) -> int:
    """Heads of the attention module of ``kind[layer]`` (read from the module or its config)."""
    prefix, sub, fam = tower_of(model, tower, family)
    kind = kind or fam.heads_kind
    return _num_heads(get_module(sub, _resolve_in(sub, fam, _attention_name(kind, layer)).path))


def head_slice(model: nn.Module, layer: int, head: int, kind: str = None, tower: str = None,
               family: str = None) -> HeadSite:
    """Where head ``head`` of attention ``kind[layer]`` lives: a slice of its out-projection input.

    The projection input is (..., num_heads * head_dim) with heads in order, so head h is
    ``x[..., h * head_dim:(h + 1) * head_dim]``; its contribution to the attention output is
    that slice times the matching columns of the projection weight. ``kind`` defaults to
    ``"layer"`` (``"xattn"`` for a UNet; ``"self_attn"`` there too).
    """
    prefix, sub, fam = tower_of(model, tower, family)
    kind = kind or fam.heads_kind
    attn_name = _attention_name(kind, layer)
    attn = get_module(sub, _resolve_in(sub, fam, attn_name).path)
    site = _resolve_in(sub, fam, f"{attn_name}.heads")
    heads = _num_heads(attn)
    width = _in_width(get_module(sub, site.path))
    if width % heads:
        raise UnsupportedModel(f"{attn_name}: projection width {width} is not a multiple of {heads} heads")
    if not -heads <= head < heads:
        raise UnknownComponent(f"head {head} is out of range for {attn_name} of {fam.name}: "
                               f"heads 0..{heads - 1}")
    head, dim = head % heads, width // heads
    return HeadSite(_join(prefix, site.path), site.at, slice(head * dim, (head + 1) * dim))
