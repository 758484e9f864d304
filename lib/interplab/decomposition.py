"""RepDecompose (Chapter 7): a vision transformer's image representation z as a sum of component writes.

    c = decompose(model, images)              # images (N, 3, H, W); model in eval mode
    c.total()                                 # (N, d) == c.z, the model's own representation
    c.heads[:, i, h]                          # (N, d) direct contribution of head h of layer start+i
    c["layer[5].attn.head[2]"], c.names()     # the same by name; names() partitions z
    ablate(c, ["layer[5].mlp"], mode="mean")  # z with that MLP's contribution replaced by its mean

Works on unmodified models, read through ``interplab.hooks`` (traces of module inputs and outputs)
and ``interplab.anatomy`` (where each family keeps its blocks). Nothing is monkeypatched.

What z is (ch07 spec section 2.1):

    timm VisionTransformer       forward_head(forward_features(x), pre_logits=True)  (CLS or avg pool)
    timm SwinTransformer         the same: mean over positions of the final-norm features
    transformers CLIPModel,      visual_projection(post_layernorm(x_L[:, 0])), the image embedding
      CLIPVisionModelWithProjection
    transformers CLIPVisionModel post_layernorm(x_L[:, 0]) (pooler_output; there is no projection)
    open_clip CLIP / VisionTransformer   visual(x) = ln_post(pool(x_L)) @ proj (encode_image, unnormalised)

Components. The residual stream entering block ``start`` is ``embed`` (patch and position
embeddings, class token, pre-norms, and everything the blocks before ``start`` wrote). Every
block from ``start`` on writes an attention term and an MLP term; the attention term splits
into one write per head (the head's slice of the concatenated head outputs times the matching
columns of the output projection, times LayerScale if any) plus the projection's bias
(``attn_bias``). Only *direct* contributions are counted: a component's write carried to z along
the residual stream, not through later components (the dissertation's choice, section 7.1.1).

Linearising the final norm. LayerNorm(x) = gamma * (x - mean(x)) / sigma + beta. The centring is
linear; sigma is taken from the clean forward pass (one scalar per image and position, biased
variance, the module's eps) and frozen. Each write w then reaches z as
``proj(gamma * centre(w) / sigma)``, and ``beta`` (through ``proj``, plus any projection bias) is
the separate ``bias`` term. Swin's patch merging (concatenate 2x2 neighbours, LayerNorm,
linear reduction) is linearised the same way with the clean pass's statistics, so earlier
stages' writes flow through it; its beta (through the reduction and later stages) is in ``bias``.
The sum of all terms equals z up to float error (1e-5 in fp32 on the tests' models).

Per-token split (``tokens=True``). A head's output at a query position p is a sum over source
tokens q of A[p, q] * v[q]; its contribution through token q is A[p, q] v[q] W_O carried to z,
summed over the query positions z reads (the CLS position, or every pooled position).
Attention probabilities are recomputed from the module's own weights and traced inputs. The
token index is the position in the block's *input* sequence (ViT: with the class token at 0;
Swin: the row-major H x W grid of the block's stage, window partition and cyclic shift undone).

Conventions: layers are named by their forward index ``layer[i]`` (anatomy's names; Swin's
blocks are numbered across stages). The dissertation's figures count from the last block
(L00 = last): there, ``L{k:02d}`` is ``layer[n_layers - 1 - k]``. Ordering sublayers from the
output backwards (section 7.3) is ``names("layer")[-2:0:-1]``. Results are float32.
"""
import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import anatomy, hooks
from .anatomy import UnsupportedModel
from .errors import BadParameter, check_choice

SUPPORTED = ("timm VisionTransformer (family timm_vit)", "timm SwinTransformer (timm_swin)", "timm MaxxVit (timm_maxvit)",
             "transformers CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection (clip, clip_vision)",
             "open_clip CLIP / VisionTransformer (open_clip, open_clip_vit)")


# ===================================================================== the result


@dataclass
class Contributions:
    """Direct contributions to z of N images (float32): embed + heads + attn_bias + mlps + bias = z.

    z          (N, d)        the model's own representation (its forward pass, not the sum)
    embed      (N, d)        the residual stream entering block ``layers[0]``
    heads      (N, L, H, d)  head h of layer ``layers[i]``; H = max heads over layers, and the
                             rows h >= n_heads[i] are zero (Swin stages differ in head count)
    attn_bias  (N, L, d)     the attention output projection's bias (times LayerScale)
    mlps       (N, L, d)     each MLP's write
    bias       (N, d)        final-norm beta through the projection (+ projection bias, + Swin
                             patch-merging betas)
    attns      (N, L, d)     check value: each attention sublayer's write read from the module's
                             own output; equals heads.sum(2) + attn_bias up to float error
    tokens     (N, L, H, T, d) or None: head h of layer ``layers[i]`` through input token t; sums
                             over t to ``heads``; T = max tokens, rows t >= n_tokens[i] are zero
    layers     forward indices of the L decomposed layers (start .. n_layers - 1)
    n_heads    heads per decomposed layer;  n_tokens: tokens per decomposed layer (or None)
    family     anatomy family name of the decomposed model
    """
    z: torch.Tensor
    embed: torch.Tensor
    heads: torch.Tensor
    attn_bias: torch.Tensor
    mlps: torch.Tensor
    bias: torch.Tensor
    attns: torch.Tensor
    tokens: Optional[torch.Tensor]
    layers: tuple
    n_heads: tuple
    n_tokens: Optional[tuple]
    family: str

    def total(self) -> torch.Tensor:
        """(N, d): the sum of all components (== z up to float error)."""
        return self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlps.sum(1) + self.bias

    def names(self, granularity: str = "head") -> list:
        """Component names that partition z, in forward order, ``embed`` first and ``bias`` last.

        "head": ``layer[i].attn.head[h]`` for every head, ``layer[i].attn.bias``, ``layer[i].mlp``.
        "layer": ``layer[i].attn`` (all heads + bias) and ``layer[i].mlp``.
        A layer without heads (MaxViT's MBConv) has no attention entry, only its ``mlp``.
        """
        check_choice("granularity", granularity, ("head", "layer"))
        names = ["embed"]
        for layer, n in zip(self.layers, self.n_heads):
            if n == 0:      # its attention terms are zero by construction: no step on Fig. 7.2's axis
                pass
            elif granularity == "head":
                names += [f"layer[{layer}].attn.head[{h}]" for h in range(n)] + [f"layer[{layer}].attn.bias"]
            else:
                names.append(f"layer[{layer}].attn")
            names.append(f"layer[{layer}].mlp")
        return names + ["bias"]

    def __getitem__(self, name: str) -> torch.Tensor:
        """(N, d) contribution of a component name (see ``names``), or of a group: ``layer[i]``,
        ``layer[i].attn``; with tokens also ``layer[i].attn.head[h].token[t]``."""
        return _sum_selected(self, _select(self, [name]))

    def row(self, layer: int) -> int:
        """Row of ``layer[layer]`` (a forward index, negative from the end) in the (N, L, ...) tensors."""
        n_layers = self.layers[-1] + 1
        index = layer + n_layers if layer < 0 else layer
        if index not in self.layers:
            raise KeyError(f"layer[{layer}] is not decomposed: this decomposition covers layers "
                           f"{self.layers[0]}..{self.layers[-1]} (earlier layers are part of 'embed')")
        return index - self.layers[0]

    def stack(self, names: list = None) -> torch.Tensor:
        """(K, N, d): the named contributions (default: ``names()``) stacked."""
        return torch.stack([self[n] for n in (self.names() if names is None else names)])

    def to(self, device) -> "Contributions":
        """The same decomposition with every tensor on ``device`` (e.g. "cpu" to gather GPU batches)."""
        return Contributions(**{f.name: getattr(self, f.name).to(device) if torch.is_tensor(getattr(self, f.name))
                                else getattr(self, f.name) for f in fields(Contributions)})

    @staticmethod
    def cat(parts: list) -> "Contributions":
        """Concatenate decompositions of image batches along N (same layers; new tensors)."""
        values = {}
        for f in fields(Contributions):
            items = [getattr(p, f.name) for p in parts]
            values[f.name] = torch.cat(items) if torch.is_tensor(items[0]) else items[0]
        return Contributions(**values)


_NAME = re.compile(r"^layer\[(?P<layer>-?\d+)\](?:\.(?P<part>attn|mlp)"
                   r"(?:\.(?:(?P<bias>bias)|head\[(?P<head>\d+)\](?:\.token\[(?P<token>\d+)\])?))?)?$")


def _select(contrib, names) -> dict:
    """Boolean masks (embed, bias, heads (L, H), attn_bias (L,), mlps (L,), tokens (L, H, T))."""
    L, H = contrib.heads.shape[1:3]
    T = 0 if contrib.tokens is None else contrib.tokens.shape[3]
    m = {"embed": False, "bias": False, "heads": torch.zeros(L, H, dtype=torch.bool),
         "attn_bias": torch.zeros(L, dtype=torch.bool), "mlps": torch.zeros(L, dtype=torch.bool),
         "tokens": torch.zeros(L, H, T, dtype=torch.bool)}
    for name in [names] if isinstance(names, str) else names:
        if name in ("embed", "bias"):
            m[name] = True
            continue
        match = _NAME.match(name)
        if match is None:
            raise KeyError(f"no component {name!r}; use embed, bias, layer[i], layer[i].attn, "
                           f"layer[i].attn.head[h], layer[i].attn.bias, layer[i].mlp")
        row = contrib.row(int(match["layer"]))
        part, head = match["part"], match["head"]
        if part in (None, "mlp"):
            m["mlps"][row] = True
        if part in (None, "attn") and head is None and match["bias"] is None:
            m["heads"][row] = True
        if part in (None, "attn") and head is None:
            m["attn_bias"][row] = True
        if head is not None:
            _select_head(contrib, m, row, int(head), match["token"])
    m["tokens"] &= ~m["heads"][..., None]  # a selected head already covers its tokens
    return m


def _select_head(contrib, m, row, head, token):
    if head >= contrib.n_heads[row]:
        raise KeyError(f"head {head} is out of range: layer[{contrib.layers[row]}] has heads "
                       f"0..{contrib.n_heads[row] - 1}")
    if token is None:
        m["heads"][row, head] = True
        return
    if contrib.tokens is None:
        raise KeyError("token components need decompose(..., tokens=True)")
    if int(token) >= contrib.n_tokens[row]:
        raise KeyError(f"token {token} is out of range: layer[{contrib.layers[row]}] has tokens "
                       f"0..{contrib.n_tokens[row] - 1}")
    m["tokens"][row, head, int(token)] = True


def _sum_selected(contrib, m) -> torch.Tensor:
    """(N, d) sum of the components selected by ``_select``'s masks."""
    dev = contrib.z.device
    out = torch.zeros_like(contrib.z)
    for key in ("embed", "bias"):
        if m[key]:
            out = out + getattr(contrib, key)
    out = out + (contrib.heads * m["heads"].to(dev)[None, ..., None]).sum((1, 2))
    out = out + (contrib.attn_bias * m["attn_bias"].to(dev)[None, :, None]).sum(1)
    out = out + (contrib.mlps * m["mlps"].to(dev)[None, :, None]).sum(1)
    if m["tokens"].any():
        out = out + (contrib.tokens * m["tokens"].to(dev)[None, ..., None]).sum((1, 2, 3))
    return out


def ablate(contrib: Contributions, components, mode: str = "zero",
           reference: Contributions = None) -> torch.Tensor:
    """(N, d): z rebuilt from the contributions with ``components`` removed.

    components: a name or list of names (``Contributions.names``, or groups ``layer[i]``,
    ``layer[i].attn``; overlapping names count once). mode "zero": drop them, so the result is
    ``total() - sum(c[name])`` exactly. mode "mean": replace each by its mean over the images of
    ``reference`` (default: ``contrib`` itself), as in the dissertation's Fig. 7.2 (spec 2.5):
    only the direct contribution changes, nothing downstream is recomputed.
    """
    check_choice("mode", mode, ("zero", "mean"))
    masks = _select(contrib, components)
    z = contrib.total() - _sum_selected(contrib, masks)
    if mode == "zero":
        return z
    reference = contrib if reference is None else reference
    if (reference.layers, reference.n_heads) != (contrib.layers, contrib.n_heads):
        raise BadParameter("reference must decompose the same layers and heads as contrib "
                           f"(got layers {reference.layers[0]}.. vs {contrib.layers[0]}..)")
    return z + _sum_selected(reference, masks).mean(0)


# ===================================================================== entry point


def decompose(model: nn.Module, images: torch.Tensor, start: int = 0, tokens: bool = False,
              batch_size: int = 64) -> Contributions:
    """Decompose the representation z of ``images`` (N, 3, H, W) into direct contributions.

    start: first decomposed block (forward index, negative counts from the end); the residual
    stream entering it is ``embed``. tokens: also split every head over its input tokens
    (memory: N * L * H * T * d floats, plus, for Swin, H * T * window_area * 4**merges * C per
    batch while computing). Images run ``batch_size`` at a time under ``torch.inference_mode``;
    the returned tensors are ordinary ones (usable as inputs to autograd, e.g. to fit COMPALIGN
    maps). Raises ``UnsupportedModel`` for other model families or unsupported variants
    (pooling, norms, attention types), ``BadParameter`` for a model in training mode.
    """
    build = _builder(model)
    if model.training:
        raise BadParameter("decompose needs model.eval(): dropout and stochastic depth make the "
                           "forward pass random and break the exact sum")
    spec = build(model)
    start = _check_start(start, len(spec.blocks))
    with torch.inference_mode():
        parts = [spec.decompose(images[i:i + batch_size], start, tokens)
                 for i in range(0, len(images), batch_size)]
    return Contributions.cat(parts)  # outside inference mode: ordinary tensors


def representation(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """z (N, d) of images (N, 3, H, W): the representation ``decompose`` splits, from the model's own
    forward pass alone (no hooks, no decomposition), ``batch_size`` images at a time."""
    build = _builder(model)
    if model.training:
        raise BadParameter("representation needs model.eval(), as decompose does")
    spec = build(model)
    with torch.inference_mode():
        return torch.cat([spec.represent(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _check_start(start: int, n_layers: int) -> int:
    if not -n_layers <= start < n_layers:
        raise BadParameter(f"start={start} is out of range for a model with {n_layers} layers")
    return start % n_layers


def _family(module) -> Optional[str]:
    try:
        return anatomy.detect(module).name
    except UnsupportedModel:
        return None


def _builder(model) -> Callable:
    family = _family(model)
    build = _BUILDERS.get(family)
    if build is None:
        raise UnsupportedModel(f"decompose does not support {type(model).__name__}"
                               f"{f' (family {family})' if family else ''}; supported: {'; '.join(SUPPORTED)}")
    return build


# ===================================================================== LayerNorm, linearised


@dataclass
class _LinearNorm:
    """A LayerNorm with frozen statistics: c -> gamma * centre(c) (the caller divides by sigma)."""
    gamma: torch.Tensor  # (C,)
    beta: torch.Tensor   # (C,)
    eps: float

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """(...,) standard deviation the module divides by, for its full input x (..., C)."""
        return (x.float().var(-1, unbiased=False) + self.eps).sqrt()

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return self.gamma * (c - c.mean(-1, keepdim=True))


def _linear_norm(norm: nn.Module, where: str) -> Optional[_LinearNorm]:
    """The linearisation of ``norm``; None for Identity; raises for other normalisations."""
    if isinstance(norm, nn.Identity):
        return None
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise UnsupportedModel(f"{where} is {type(norm).__name__}; decompose linearises LayerNorm "
                               f"over the last dim only (or Identity)")
    width = norm.normalized_shape[0]
    ref = next(iter(norm.parameters()), None)
    device = ref.device if ref is not None else None
    gamma = norm.weight.float() if norm.weight is not None else torch.ones(width, device=device)
    beta = norm.bias.float() if norm.bias is not None else torch.zeros(width, device=device)
    return _LinearNorm(gamma.detach(), beta.detach(), norm.eps)


def _weight(linear: nn.Module) -> torch.Tensor:
    return linear.weight.detach().float()


def _bias(linear: nn.Module) -> torch.Tensor:
    w = linear.weight
    return torch.zeros(w.shape[0], device=w.device) if linear.bias is None else linear.bias.detach().float()


@contextmanager
def _record_call(module: nn.Module, store: dict, key: str):
    """Store the (args, kwargs) of ``module``'s last call under ``store[key]`` (a pre-hook)."""
    def hook(mod, args, kwargs):
        store[key] = (args, kwargs)
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ===================================================================== token-pooled ViTs


@dataclass
class _VitBlock:
    """Where one ViT block's pieces are (paths relative to the tower) and how to read them."""
    path: str            # the block: its input is the residual stream
    heads: str           # the attention output projection: its input is the concatenated heads
    out_proj: nn.Module  # weight (C, H * dh), bias (C,)
    n_heads: int
    post: Callable       # the linear map after attention (LayerScale or identity)
    attn_write: str      # path whose output is the attention sublayer's residual write
    mlp_write: str       # path whose output is the MLP's residual write
    qkv_paths: tuple     # traced (output) for the per-token split
    qkv: Callable        # traced outputs -> q, k, v each (N, H, T, dh) (q, k after any q/k norm)
    scale: float


@dataclass
class _VitReadout:
    """z = proj(gamma * centre(sum_p omega_p x_p)) + bias for a residual-stream write x (N, T, C).

    omega (N, T) folds the pooling weights and the frozen 1/sigma: (e_0 or uniform) / sigma,
    with sigma of the pooled vector (norm after pooling) or of each position (norm before).
    """
    omega: torch.Tensor
    norm: Optional[_LinearNorm]
    proj: Optional[torch.Tensor]  # (C, d)
    proj_bias: Optional[torch.Tensor]
    width: int  # C

    def channels(self, c: torch.Tensor) -> torch.Tensor:
        """(N, *extra, C) -> (N, *extra, d): the affine-free norm and the projection."""
        if self.norm is not None:
            c = self.norm(c)
        return c if self.proj is None else c @ self.proj

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, *rest) -> (N, *rest), weighted by omega."""
        return torch.einsum("nt,nt...->n...", self.omega, x.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.channels(self.pool(x))

    def constant(self, n: int) -> torch.Tensor:
        """(n, d): beta through the projection, plus the projection's bias."""
        beta = self.norm.beta if self.norm is not None else self.omega.new_zeros(self.width)
        out = beta if self.proj is None else beta @ self.proj
        out = out if self.proj_bias is None else out + self.proj_bias
        return out.expand(n, -1)


@dataclass
class _VitSpec:
    """One token-pooled ViT: its blocks, final norm, pooling and projection, and how to run it."""
    family: str
    tower: nn.Module            # hooks attach here
    run: Callable               # images -> z (N, d): the model's own forward
    blocks: list                # [_VitBlock]
    norm: Optional[nn.Module]   # the final LayerNorm (None: no norm)
    norm_path: str              # traced at input: the final norm's input
    norm_after_pool: bool
    pool_weights: Callable      # T -> (T,) pooling weights over the block output's positions
    proj: Optional[torch.Tensor] = None       # (C, d)
    proj_bias: Optional[torch.Tensor] = None  # (d,)

    def represent(self, images) -> torch.Tensor:
        return self.run(images)

    def decompose(self, images, start, tokens) -> Contributions:
        blocks = self.blocks[start:]
        ins = [self.blocks[start].path, self.norm_path] + [b.heads for b in blocks]
        outs = [p for b in blocks for p in (b.attn_write, b.mlp_write, *(b.qkv_paths if tokens else ()))]
        with hooks.trace(self.tower, ins, at="input") as t_in, hooks.trace(self.tower, outs) as t_out:
            z = self.represent(images).float()
        read = self._readout(t_in, t_in[self.blocks[start].path].shape[1])
        per_block = [_vit_block_terms(b, read, t_in, t_out, tokens) for b in blocks]
        return _assemble(self.family, z, read(t_in[self.blocks[start].path]), per_block,
                         read.constant(len(z)), range(start, len(self.blocks)), tokens)

    def _readout(self, t_in, n_tokens) -> _VitReadout:
        norm = None if self.norm is None else _linear_norm(self.norm, self.norm_path)
        x = t_in[self.norm_path]
        w = self.pool_weights(n_tokens).to(x.device)
        if norm is None:
            omega = w.expand(len(x), -1)
        elif self.norm_after_pool:
            omega = w / norm.sigma(x)[:, None]   # x: (N, C), the pooled vector
        else:
            omega = w / norm.sigma(x)            # x: (N, T, C), every position
        return _VitReadout(omega, norm, self.proj, self.proj_bias, x.shape[-1])


def _vit_block_terms(b: _VitBlock, read: _VitReadout, t_in, t_out, tokens) -> dict:
    """One block's heads (N, H, d), attn_bias, attn, mlp (N, d) and tokens (N, H, T, d)."""
    w = _weight(b.out_proj).view(-1, b.n_heads, b.out_proj.weight.shape[1] // b.n_heads)  # (C, H, dh)
    pooled = read.pool(t_in[b.heads]).view(-1, b.n_heads, w.shape[2])                   # (N, H, dh)
    heads = read.channels(b.post(torch.einsum("nhd,chd->nhc", pooled, w)))
    weight_sum = read.omega.sum(1, keepdim=True)                                         # (N, 1)
    terms = {"heads": heads, "attn_bias": read.channels(b.post(_bias(b.out_proj)) * weight_sum),
             "attn": read(t_out[b.attn_write]), "mlp": read(t_out[b.mlp_write])}
    if tokens:
        q, k, v = (x.float() for x in b.qkv(t_out))
        attn = ((q * b.scale) @ k.transpose(-1, -2)).softmax(-1)       # (N, H, T, T)
        through = torch.einsum("np,nhpq->nhq", read.omega, attn)       # (N, H, T)
        values = torch.einsum("nhqd,chd->nhqc", v, w)                  # (N, H, T, C)
        terms["tokens"] = read.channels(b.post(through[..., None] * values))
    return terms


def _assemble(family, z, embed, per_block, bias, layers, tokens) -> Contributions:
    """Stack per-block terms into a ``Contributions`` (zero-padding heads and tokens)."""
    n, d, dev = z.shape[0], z.shape[1], z.device
    n_heads = tuple(t["heads"].shape[1] for t in per_block)
    heads = torch.zeros(n, len(per_block), max(n_heads), d, device=dev)
    for i, t in enumerate(per_block):
        heads[:, i, :n_heads[i]] = t["heads"]
    stack = lambda key: torch.stack([t[key] for t in per_block], 1)
    tok, n_tokens = None, None
    if tokens:
        n_tokens = tuple(t["tokens"].shape[2] for t in per_block)
        tok = torch.zeros(n, len(per_block), max(n_heads), max(n_tokens), d, device=dev)
        for i, t in enumerate(per_block):
            tok[:, i, :n_heads[i], :n_tokens[i]] = t["tokens"]
    return Contributions(z=z, embed=embed, heads=heads, attn_bias=stack("attn_bias"), mlps=stack("mlp"),
                         bias=bias, attns=stack("attn"), tokens=tok, layers=tuple(layers),
                         n_heads=n_heads, n_tokens=n_tokens, family=family)


def _cls_weights(n_tokens: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(0), n_tokens).float()


def _mean_weights(n_prefix: int) -> Callable:
    def weights(n_tokens):
        w = torch.zeros(n_tokens)
        w[n_prefix:] = 1 / (n_tokens - n_prefix)
        return w
    return weights


def _heads_4d(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(N, T, H * dh) -> (N, H, T, dh)."""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def _attn_sites(tower, i):
    attn = hooks.get_module(tower, anatomy.resolve(tower, f"layer[{i}].attn").path)
    out_path = anatomy.resolve(tower, f"layer[{i}].attn.out").path
    return attn, out_path, hooks.get_module(tower, out_path), anatomy.n_heads(tower, i)


# ----------------------------------------------------------------- timm VisionTransformer


def _timm_vit(model) -> _VitSpec:
    attn_pool = getattr(model, "attn_pool", None) is not None
    if attn_pool or model.global_pool not in ("token", "avg"):
        raise UnsupportedModel(f"timm ViT global_pool={model.global_pool!r}"
                               f"{' with attention pooling' if attn_pool else ''}: "
                               "decompose supports 'token' and 'avg' (linear pooling)")
    blocks = [_timm_vit_block(model, i, path) for i, path in enumerate(anatomy.items(model))]
    if model.global_pool == "token":
        weights = _cls_weights
    else:
        weights = _mean_weights(0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens)
    norm, path, after = _timm_final_norm(model)
    return _VitSpec("timm_vit", model, lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
                    blocks, norm, path, after, weights)


def _timm_final_norm(model):
    """(norm, path traced at input, applied after pooling?) of a timm ViT."""
    if not isinstance(model.norm, nn.Identity):
        if not isinstance(model.fc_norm, nn.Identity):
            raise UnsupportedModel("timm ViT with both norm and fc_norm is not supported")
        return model.norm, "norm", False
    if not isinstance(model.fc_norm, nn.Identity):
        return model.fc_norm, "fc_norm", True
    return None, "head", True  # no final norm: trace the head's input only to keep one code path


def _timm_vit_block(model, i, path) -> _VitBlock:
    block = hooks.get_module(model, path)
    attn, out_path, out_proj, n_heads = _attn_sites(model, i)
    if type(block).__name__ != "Block" or not hasattr(attn, "qkv"):
        raise UnsupportedModel(f"timm ViT block {path} is {type(block).__name__} with "
                               f"{type(attn).__name__}; decompose supports Block with fused-qkv Attention")
    mixes_heads = not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
    if mixes_heads or getattr(attn, "gate", None) is not None:
        raise UnsupportedModel(f"{path}.attn normalises or gates the concatenated heads, which mixes "
                               "heads nonlinearly; per-head contributions are not defined")

    def qkv(t_out):
        q, k, v = t_out[f"{path}.attn.qkv"].unflatten(-1, (3, n_heads, -1)).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v

    return _VitBlock(path, out_path, out_proj, n_heads, block.ls1, f"{path}.ls1", f"{path}.ls2",
                     (f"{path}.attn.qkv",), qkv, attn.scale)


# ----------------------------------------------------------------- transformers CLIP


def _hf_clip(model) -> _VitSpec:
    """CLIPModel / CLIPVisionModelWithProjection (z = image embedding) or CLIPVisionModel (pooler)."""
    projection = getattr(model, "visual_projection", None)
    tower = model.vision_model if projection is not None else model
    blocks = [_hf_clip_block(tower, i, path) for i, path in enumerate(anatomy.items(tower))]

    def run(x):
        pooled = tower(pixel_values=x).pooler_output
        return pooled if projection is None else projection(pooled)

    proj = None if projection is None else _weight(projection).T
    proj_bias = None if projection is None or projection.bias is None else _bias(projection)
    norm_path = anatomy.resolve(tower, "final_norm").path
    return _VitSpec("clip_vision", tower, run, blocks, hooks.get_module(tower, norm_path), norm_path,
                    True, _cls_weights, proj, proj_bias)


def _hf_clip_block(tower, i, path) -> _VitBlock:
    attn, out_path, out_proj, n_heads = _attn_sites(tower, i)
    names = tuple(f"{path}.self_attn.{p}_proj" for p in "qkv")

    def qkv(t_out):
        return tuple(_heads_4d(t_out[p], n_heads) for p in names)

    return _VitBlock(path, out_path, out_proj, n_heads, lambda x: x, f"{path}.self_attn",
                     f"{path}.mlp", names, qkv, attn.scale)


# ----------------------------------------------------------------- open_clip


def _open_clip(model) -> _VitSpec:
    visual = getattr(model, "visual", model)
    if _family(visual) != "open_clip_vit":
        raise UnsupportedModel(f"open_clip vision tower {type(visual).__name__} is not a VisionTransformer; "
                               f"decompose supports: {'; '.join(SUPPORTED)}")
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise UnsupportedModel(f"open_clip VisionTransformer pool_type={visual.pool_type!r}"
                               f"{' with attention pooling' if visual.attn_pool is not None else ''}: "
                               "decompose supports 'tok' and 'avg'")
    blocks = [_open_clip_block(visual, i, path) for i, path in enumerate(anatomy.items(visual))]

    def run(x):
        out = visual(x)
        return out[0] if isinstance(out, tuple) else out

    weights = _cls_weights if visual.pool_type == "tok" else _mean_weights(1)
    proj = None if visual.proj is None else visual.proj.detach().float()
    return _VitSpec("open_clip_vit", visual, run, blocks, visual.ln_post, "ln_post",
                    visual.final_ln_after_pool, weights, proj)


def _open_clip_block(visual, i, path) -> _VitBlock:
    block = hooks.get_module(visual, path)
    mha, out_path, out_proj, n_heads = _attn_sites(visual, i)
    if not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first or not mha._qkv_same_embed_dim:
        raise UnsupportedModel(f"{path}.attn must be a batch-first nn.MultiheadAttention with one in_proj")

    def qkv(t_out):
        q, k, v = F.linear(t_out[f"{path}.ln_1"], mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        return tuple(_heads_4d(x, n_heads) for x in (q, k, v))

    dh = mha.embed_dim // n_heads
    return _VitBlock(path, out_path, out_proj, n_heads, block.ls_1, f"{path}.ls_1", f"{path}.ls_2",
                     (f"{path}.ln_1",), qkv, dh ** -0.5)


# ===================================================================== timm Swin


@dataclass
class _Merge:
    """A linearised PatchMerging: 2x2 concat, LayerNorm with frozen sigma, linear reduction."""
    norm: _LinearNorm
    reduction: nn.Module
    sigma: torch.Tensor  # (N, H/2, W/2) of the clean pass


@dataclass
class _SwinReadout:
    """Carries a residual-stream write at stage s (N, *extra, H, W, C) to z (N, *extra, d).

    With frozen statistics the map is position-wise: position p reaches z as s_p * M_k(p)(x_p).
    The scalar s_p is 1 / (final grid size * the sigmas p is divided by: one per later patch merge,
    at the merged position containing p, and the final norm's). M_k is linear: at each later merge
    the vector goes into its quadrant's block of the concatenated 4C vector (k(p) records the
    quadrant at every merge, 4 ** merges classes), then gamma * centring and the reduction; finally
    gamma * centring of the final norm. A write is therefore pooled per class with weights s_p
    first, and M_k applied once per class.
    """
    merges: dict               # stage t -> _Merge into stage t
    final: _LinearNorm
    final_sigma: torch.Tensor  # (N, Hf, Wf)
    n_stages: int

    def _later(self, stage: int) -> list:
        return [self.merges[t] for t in range(stage + 1, self.n_stages) if t in self.merges]

    def weights(self, stage: int, grid: tuple) -> torch.Tensor:
        """(N, H, W, K): s_p at p's class k(p), zero elsewhere, for the stage's (H, W) grid."""
        merges = self._later(stage)
        rows = torch.arange(grid[0], device=self.final_sigma.device)[:, None]
        cols = torch.arange(grid[1], device=self.final_sigma.device)[None, :]
        classes = torch.zeros(grid, dtype=torch.long, device=rows.device)
        scale = torch.ones(len(self.final_sigma), *grid, device=rows.device)
        for level, merge in enumerate(merges):
            classes = classes + _quadrant(rows >> level, cols >> level) * 4 ** level
            scale = scale / _upsample(merge.sigma, 2 ** (level + 1))
        scale = scale / _upsample(self.final_sigma, 2 ** len(merges)) / self.final_sigma[0].numel()
        return scale[..., None] * F.one_hot(classes, 4 ** len(merges))

    def maps(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """(..., K, C) -> (..., K, d): M_k applied to row k."""
        for level, merge in enumerate(self._later(stage)):
            quadrant = torch.arange(x.shape[-2], device=x.device) // 4 ** level % 4
            x = (x.unsqueeze(-2) * F.one_hot(quadrant, 4).to(x.dtype)[:, :, None]).flatten(-2)  # (..., K, 4C)
            x = F.linear(merge.norm(x), _weight(merge.reduction))
        return self.final(x)

    def __call__(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        n, (h, w, c) = x.shape[0], x.shape[-3:]
        pooled = torch.einsum("nhwk,nehwc->nekc", self.weights(stage, (h, w)), x.float().reshape(n, -1, h, w, c))
        return self.maps(pooled, stage).sum(-2).reshape(*x.shape[:-3], -1)


def _quadrant(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Block of a position in timm's PatchMerging concat, from row / col indices: (0,0), (1,0), (0,1), (1,1)."""
    return cols % 2 * 2 + rows % 2


def _upsample(sigma: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, h, w) -> (N, h * factor, w * factor), each value repeated over its cell."""
    return sigma.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, H/2, W/2, 4C): what ``_SwinReadout`` assumes PatchMerging concatenates."""
    n, h, w, c = x.shape
    block = _quadrant(torch.arange(h, device=x.device)[:, None], torch.arange(w, device=x.device)[None, :])
    placed = x.unsqueeze(-2) * F.one_hot(block, 4).to(x.dtype)[..., None]  # (N, H, W, 4, C)
    return placed.view(n, h // 2, 2, w // 2, 2, 4 * c).sum((2, 4))


def _window_ops():
    """timm's own window partition / reverse (imported lazily: timm is optional for other families)."""
    from timm.models.swin_transformer import window_partition, window_reverse
    return window_partition, window_reverse


def _from_windows(x: torch.Tensor, blk, grid) -> torch.Tensor:
    """(N * nW, window_area, *rest) -> (N, H, W, *rest): undo window partition and cyclic shift."""
    _, reverse = _window_ops()
    (h, w), (wh, ww) = grid, blk.window_size
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    rest = x.shape[2:]
    out = reverse(x.reshape(-1, wh, ww, math.prod(rest)), blk.window_size, hp, wp)[:, :h, :w]
    if any(blk.shift_size):
        out = torch.roll(out, shifts=tuple(blk.shift_size), dims=(1, 2))
    return out.reshape(out.shape[0], h, w, *rest)


def _to_windows(x: torch.Tensor, blk) -> torch.Tensor:
    """(N, H, W, *rest) -> (N * nW, window_area, *rest): the block's shift and partition (no padding)."""
    partition, _ = _window_ops()
    rest = x.shape[3:]
    if any(blk.shift_size):
        x = torch.roll(x, shifts=tuple(-s for s in blk.shift_size), dims=(1, 2))
    out = partition(x.reshape(*x.shape[:3], math.prod(rest)), blk.window_size)
    return out.reshape(out.shape[0], -1, *rest)


@dataclass
class _SwinSpec:
    """A timm SwinTransformer: blocks across stages, patch merges, final norm and average pool."""
    model: nn.Module
    blocks: list   # paths, forward order
    stages: list   # stage index of each block
    family: str = "timm_swin"

    def represent(self, images) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def decompose(self, images, start, tokens) -> Contributions:
        model, blocks = self.model, self.blocks[start:]
        merge_stages = [t for t, stage in enumerate(model.layers) if not isinstance(stage.downsample, nn.Identity)]
        ins = ["norm", *[f"layers.{t}.downsample{s}" for t in merge_stages for s in ("", ".norm")]]
        ins += [p for b in blocks for p in (b, f"{b}.attn.proj", f"{b}.norm2")]
        outs = [p for b in blocks for p in (f"{b}.mlp", *((f"{b}.attn.qkv",) if tokens else ()))]
        calls = {}
        with ExitStack() as stack:
            t_in = stack.enter_context(hooks.trace(model, ins, at="input"))
            t_out = stack.enter_context(hooks.trace(model, outs))
            for b in blocks if tokens else ():
                stack.enter_context(_record_call(hooks.get_module(model, f"{b}.attn"), calls, b))
            z = self.represent(images).float()
        read = self._readout(t_in, merge_stages)
        first = self.stages[start]
        per_block = [self._block_terms(b, s, read, t_in, t_out, calls, tokens)
                     for b, s in zip(blocks, self.stages[start:])]
        bias = read.final.beta.expand(len(z), -1) + self._merge_constants(read, t_in, first, len(z))
        return _assemble(self.family, z, read(t_in[blocks[0]], first), per_block, bias,
                         range(start, len(self.blocks)), tokens)

    def _readout(self, t_in, merge_stages) -> _SwinReadout:
        model = self.model
        merges = {}
        for t in merge_stages:
            ds = model.layers[t].downsample
            if not (hasattr(ds, "norm") and hasattr(ds, "reduction")):
                raise UnsupportedModel(f"layers.{t}.downsample is {type(ds).__name__}; "
                                       "decompose needs PatchMerging")
            x, merged = t_in[f"layers.{t}.downsample"], t_in[f"layers.{t}.downsample.norm"]
            if x.shape[1] % 2 or x.shape[2] % 2 or not torch.equal(_merge(x), merged):
                raise UnsupportedModel(f"layers.{t}.downsample does not merge 2x2 patches in the order "
                                       "decompose assumes (or pads an odd grid)")
            norm = _linear_norm(ds.norm, f"layers.{t}.downsample.norm")
            merges[t] = _Merge(norm, ds.reduction, norm.sigma(merged))
        final = _linear_norm(model.norm, "norm")
        if final is None or model.global_pool != "avg":
            raise UnsupportedModel("timm Swin needs a final LayerNorm and global_pool='avg'")
        return _SwinReadout(merges, final, final.sigma(t_in["norm"]), len(model.layers))

    def _merge_constants(self, read: _SwinReadout, t_in, first_stage: int, n: int) -> torch.Tensor:
        """(n, d): the betas of the patch merges after ``first_stage``, carried to z."""
        out = torch.zeros_like(read.final.beta).expand(n, -1)
        for t, merge in read.merges.items():
            if t > first_stage:
                grid = t_in[f"layers.{t}.downsample.norm"].shape[1:3]
                const = F.linear(merge.norm.beta, _weight(merge.reduction), None if merge.reduction.bias is None
                                 else merge.reduction.bias.float())
                out = out + read(const.expand(n, *grid, -1), t)
        return out

    def _block_terms(self, path, stage, read, t_in, t_out, calls, tokens) -> dict:
        blk = hooks.get_module(self.model, path)
        resid = t_in[path]                                     # (N, H, W, C)
        n, h, w, c = resid.shape
        n_heads = blk.attn.num_heads
        wo = _weight(blk.attn.proj).view(c, n_heads, -1)     # (C, H, dh)
        concat = t_in[f"{path}.attn.proj"].float()           # (N * nW, area, H * dh)
        writes = torch.einsum("bahd,chd->bahc", concat.unflatten(-1, (n_heads, -1)), wo)
        heads = read(_from_windows(writes, blk, (h, w)).permute(0, 3, 1, 2, 4), stage)
        terms = {"heads": heads,
                 "attn_bias": read(_bias(blk.attn.proj).expand(n, h, w, c), stage),
                 "attn": read(t_in[f"{path}.norm2"].view(n, h, w, c).float() - resid.float(), stage),
                 "mlp": read(t_out[f"{path}.mlp"].view(n, h, w, c), stage)}
        if tokens:
            terms["tokens"] = self._token_terms(blk, path, stage, read, t_out, calls, wo, (h, w))
        return terms

    def _token_terms(self, blk, path, stage, read, t_out, calls, wo, grid) -> torch.Tensor:
        """(N, H, T, d): head h through source token t of the block's (unshifted) input grid.

        Per window, the head's output at p is sum_j A[p, j] u_j (u_j = v_j W_O^h); p reaches z as
        s_p M_k(p), so token j contributes sum_k M_k((sum_{p in class k} s_p A[p, j]) u_j).
        """
        if grid[0] % blk.window_size[0] or grid[1] % blk.window_size[1]:
            raise UnsupportedModel(f"{path}: the grid {grid} is padded to whole windows, and padded "
                                   "tokens have no input position; tokens=True is not supported there")
        qkv = t_out[f"{path}.attn.qkv"].float().unflatten(-1, (3, blk.attn.num_heads, -1))  # (B_, area, 3, H, dh)
        attn = self._attention(blk, qkv, calls[path])                                       # (B_, H, p, j)
        weights = _to_windows(read.weights(stage, grid), blk)                               # (B_, p, K)
        through = torch.einsum("bpk,bhpj->bhjk", weights, attn)                             # (B_, H, j, K)
        u = torch.einsum("bjhd,chd->bhjc", qkv[:, :, 2], wo)                                # (B_, H, j, C)
        tok = read.maps(through[..., None] * u[:, :, :, None], stage).sum(-2)              # (B_, H, j, d)
        tok = _from_windows(tok.transpose(1, 2), blk, grid)                                 # (N, h, w, H, d)
        return tok.permute(0, 3, 1, 2, 4).flatten(2, 3)

    @staticmethod
    def _attention(blk, qkv, call) -> torch.Tensor:
        """(B_, H, area, area) attention probabilities from the traced qkv (B_, area, 3, H, dh) and call."""
        args, kwargs = call
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B_, H, area, dh)
        scores = (q * blk.attn.scale) @ k.transpose(-1, -2) + blk.attn._get_rel_pos_bias().float()
        if mask is not None:
            n_win, area = mask.shape[0], scores.shape[-1]
            scores = (scores.view(-1, n_win, blk.attn.num_heads, area, area) + mask[None, :, None].float())
            scores = scores.view(-1, blk.attn.num_heads, area, area)
        return scores.softmax(-1)


def _swin(model) -> _SwinSpec:
    blocks = anatomy.items(model)
    return _SwinSpec(model, blocks, [int(p.split(".")[1]) for p in blocks])


# ===================================================================== timm MaxViT


@dataclass
class _MaxVitSpec:
    """A timm MaxxVit: each block as three layers (MBConv, window attention, grid attention), the
    stage downsamples on the MBConv shortcut, z = the average over positions of forward_features
    (the release's choice: the head's LayerNorm2d and tanh pre-logits are not decomposed). An MBConv
    layer has no heads; its nonlinear branch is the layer's one component, stored as its ``mlp``."""
    model: nn.Module
    blocks: list   # unit paths, forward order
    family: str = "timm_maxvit"

    def represent(self, images) -> torch.Tensor:
        return self.model.forward_features(images).mean((2, 3))

    def decompose(self, images, start, tokens) -> Contributions:
        if tokens:
            raise UnsupportedModel("decompose(tokens=True) is not implemented for MaxViT")
        if not isinstance(self.model.norm, nn.Identity):   # the released models norm in the head
            raise UnsupportedModel("MaxViT with a norm inside forward_features (no head_hidden_size) is not supported")
        model, units = self.model, self.blocks[start:]
        convs = [u for u in units if u.endswith(".conv")]
        attns = [u for u in units if not u.endswith(".conv")]
        ins = [units[0], *[f"{u}.attn.proj" for u in attns], *[f"{u}.norm2" for u in attns], *attns]
        outs = [*attns, *[f"{u}.conv3_1x1" for u in convs]]
        with hooks.trace(model, ins, at="input") as t_in, hooks.trace(model, outs) as t_out:
            z = self.represent(images).float()
        downs = self._downsamples(start)
        embed = t_in[units[0]].float()
        embed = embed if units[0].endswith((".attn_block", ".attn_grid")) else embed.permute(0, 2, 3, 1)
        per_block = [self._unit_terms(u, start + i, downs, t_in, t_out) for i, u in enumerate(units)]
        bias = z.new_zeros(z.shape[1])
        for k, sc in downs.items():   # each shortcut's conv bias, constant over its output grid
            if isinstance(sc.expand, nn.Conv2d) and sc.expand.bias is not None:
                grid = t_out[f"{self.blocks[k]}.conv3_1x1"].shape[2:]
                bias = bias + self._carry(sc.expand.bias.float().expand(*grid, -1), k, downs)
        bias = bias.expand(len(z), -1)
        return _assemble(self.family, z, self._carry(embed, start - 1, downs), per_block, bias,
                         range(start, len(self.blocks)), False)

    def _downsamples(self, start) -> dict:
        """{layer index: shortcut} of the MBConv shortcuts at or after ``start`` that are not the
        identity (a stage's first block: pool, then a 1 x 1 conv with bias)."""
        out = {}
        for k in range(start, len(self.blocks)):
            path = self.blocks[k]
            if not path.endswith(".conv"):
                continue
            sc = hooks.get_module(self.model, path).shortcut
            if isinstance(sc, nn.Identity):
                continue
            if not (hasattr(sc, "pool") and isinstance(getattr(sc, "expand", None), (nn.Conv2d, nn.Identity))):
                raise UnsupportedModel(f"{path}.shortcut is {type(sc).__name__}; decompose needs pool + 1x1 conv")
            out[k] = sc
        return out

    @staticmethod
    def _linear(sc, x: torch.Tensor) -> torch.Tensor:
        """The shortcut without its bias on channels-last maps (..., H, W, C)."""
        lead = x.shape[:-3]
        y = sc.pool(x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2))
        if isinstance(sc.expand, nn.Conv2d):
            y = F.conv2d(y, sc.expand.weight.float())
        return y.permute(0, 2, 3, 1).reshape(*lead, *y.shape[2:], y.shape[1])

    @classmethod
    def _carry(cls, x: torch.Tensor, k: int, downs: dict) -> torch.Tensor:
        """A write (..., H, W, C) made by layer k carried through the later shortcuts (linear parts)
        and averaged over positions: (..., d)."""
        for j, sc in downs.items():
            if j > k:
                x = cls._linear(sc, x)
        return x.mean((-3, -2))

    def _unit_terms(self, path, k, downs, t_in, t_out) -> dict:
        if path.endswith(".conv"):
            mlp = self._carry(t_out[f"{path}.conv3_1x1"].float().permute(0, 2, 3, 1), k, downs)
            zero = torch.zeros_like(mlp)
            return {"heads": mlp.new_zeros(len(mlp), 0, mlp.shape[1]), "attn_bias": zero, "attn": zero, "mlp": mlp}
        unit = hooks.get_module(self.model, path)
        resid, mid, out = t_in[path].float(), t_in[f"{path}.norm2"].float(), t_out[path].float()
        n, h, w, c = resid.shape
        attn = unit.attn
        g1 = getattr(unit.ls1, "gamma", None)   # LayerScale; the MLP's write is read whole (out - mid)
        wo = _weight(attn.proj).view(c, attn.num_heads, -1)                          # (C, H, dh)
        concat = t_in[f"{path}.attn.proj"].float()                                   # (B', ph, pw, H * dh)
        per_head = torch.einsum("bpqhd,chd->bpqhc", concat.unflatten(-1, (attn.num_heads, -1)), wo)
        per_head = per_head.flatten(-2)                                              # (B', ph, pw, H * C)
        if g1 is not None:
            per_head = per_head * g1.float().repeat(attn.num_heads)
        reverse = _maxvit_reverse(unit)
        heads = reverse(per_head, unit.partition_size, (h, w)).unflatten(-1, (attn.num_heads, c))  # (N, H, W, heads, C)
        heads = self._carry(heads.permute(0, 3, 1, 2, 4), k, downs)                  # (N, heads, d)
        b = _bias(attn.proj) * (1 if g1 is None else g1.float())
        return {"heads": heads, "attn_bias": self._carry(b.expand(n, h, w, c), k, downs),
                "attn": self._carry(mid - resid, k, downs), "mlp": self._carry(out - mid, k, downs)}


def _maxvit_reverse(unit):
    """The partition's own inverse (timm's window_reverse / grid_reverse), on any channel count."""
    from timm.models import maxxvit
    return maxxvit.window_reverse if unit.partition_block else maxxvit.grid_reverse


def _maxvit(model) -> _MaxVitSpec:
    return _MaxVitSpec(model, anatomy.items(model))


_BUILDERS = {"timm_vit": _timm_vit, "timm_swin": _swin, "timm_maxvit": _maxvit, "clip_vision": _hf_clip, "clip": _hf_clip,
             "open_clip_vit": _open_clip, "open_clip": _open_clip}
