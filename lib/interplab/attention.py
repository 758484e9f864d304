"""A transformers attention function that records chosen heads and up-weights chosen keys.

Registered under ``NAME`` with ``transformers.AttentionInterface`` and, with it, the eager
mask builder under the same name in ``masking_utils.AttentionMaskInterface``: in transformers
5.x a model whose ``_attn_implementation`` has no registered mask function gets
``attention_mask=None``, so causal masking would be silently lost.

    with attention_plan(model, capture=[(3, 1)], upweight=[2, 3], beta=10, context=ctx,
                        queries=T - 1) as plan:
        model(ids)
    plan[3, 1]          # (B, T_q, T_k) post-softmax weights of layer 3, head 1 (last call)

Per call of a planned layer the function runs the model's own ``eager_attention_forward`` and
keeps only the captured heads, so long prompts never hold every layer's weights. Up-weighting
(spec 2.8 (i)) adds log(beta) to the pre-softmax score of a target key at chosen queries, i.e.
multiplies that key's unnormalised weight by beta before normalisation. It is passed to eager
attention as an extra additive mask term, so beta = 1 reproduces eager bit for bit. Targets:
"argmax" (per head and query, the context key with the largest unmodified attention; one extra
eager pass on that layer) or a bool key mask (B, T) (e.g. the answer slot).
"""
import math
import numbers
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from . import anatomy, hooks
from .errors import BadParameter

NAME = "interplab"
_SLOT = "_interplab_plan"  # attribute set on planned attention modules: (plan, layer)


def _eager(module):
    """The eager attention of the module's own modeling file (Llama's when it has none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", llama_eager)


def planned_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention, plus the plan of ``module`` if it has one. query (B, H, T_q, dh)."""
    eager = _eager(module)
    slot = getattr(module, _SLOT, None)
    if slot is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    plan, layer = slot
    if layer in plan.upweight:
        bias = plan.bias(layer, module, query, key, value, attention_mask, kwargs)
        attention_mask = bias if attention_mask is None else attention_mask + bias
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    for h in plan.capture.get(layer, ()):
        plan.captured.setdefault((layer, h), []).append(weights[:, h].detach().clone())
    return out, weights


def register(name: str = NAME, mask: bool = True) -> None:
    """Register ``planned_attention`` (and, unless ``mask=False``, the eager mask) as ``name``."""
    AttentionInterface.register(name, planned_attention)
    if mask:
        AttentionMaskInterface.register(name, eager_mask)


register()


def _fit(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A (B, T) bool mask over absolute positions, cut or False-padded to ``length``."""
    mask = mask.bool()[:, :length]
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]))


@dataclass
class AttentionPlan:
    """What ``planned_attention`` does per layer; filled with captured weights as the model runs."""
    capture: dict                  # layer -> [heads] whose weights are kept
    upweight: dict                 # layer -> "argmax" | bool key mask (B, T)
    beta: float = 10.0
    context: torch.Tensor = None   # (B, T) bool: keys the "argmax" target is chosen among (None: all)
    queries: object = None         # None (all) | int / (B,) first absolute query position | (B, T) bool
    captured: dict = field(default_factory=dict)  # (l, h) -> [(B, T_q, T_k) per forward call]
    targets: dict = field(default_factory=dict)   # l -> [(B, H, T_q) arg-max keys per call]

    def __getitem__(self, layer_head) -> torch.Tensor:
        """(B, T_q, T_k) weights of (layer, head) from the last forward call."""
        if tuple(layer_head) not in self.captured:
            raise BadParameter(f"no weights captured for {tuple(layer_head)}; captured: {sorted(self.captured)}")
        return self.captured[tuple(layer_head)][-1]

    def clear(self) -> None:
        self.captured.clear()
        self.targets.clear()

    def _query_rows(self, batch: int, t_q: int, t_k: int, device) -> torch.Tensor:
        """(B, T_q) bool: which queries get the bias. Query i sits at absolute t_k - t_q + i."""
        pos = torch.arange(t_k - t_q, t_k, device=device)
        if self.queries is None:
            return torch.ones(batch, t_q, dtype=torch.bool, device=device)
        q = torch.as_tensor(self.queries, device=device)
        if q.dtype == torch.bool:
            return _fit(q, t_k)[:, t_k - t_q:]
        return pos[None, :] >= q.reshape(-1, 1)

    def bias(self, layer, module, query, key, value, attention_mask, kwargs) -> torch.Tensor:
        """(B, H or 1, T_q, T_k) additive score term: log(beta) at (query, target key) pairs."""
        batch, _, t_q, _ = query.shape
        t_k = key.shape[2]
        rows = self._query_rows(batch, t_q, t_k, query.device)[:, None, :, None]  # (B, 1, T_q, 1)
        target = self.upweight[layer]
        if isinstance(target, str):
            _, weights = _eager(module)(module, query, key, value, attention_mask, **kwargs)
            ctx = (torch.ones(batch, t_k, dtype=torch.bool, device=query.device) if self.context is None
                   else _fit(self.context.to(query.device), t_k))
            top = weights.float().masked_fill(~ctx[:, None, None, :], -torch.inf).argmax(-1)  # (B, H, T_q)
            self.targets.setdefault(layer, []).append(top)
            hit = torch.nn.functional.one_hot(top, t_k).bool() & ctx.any(-1)[:, None, None, None]
        else:
            hit = _fit(target.to(query.device), t_k)[:, None, None, :]               # (B, 1, 1, T_k)
        return (hit & rows).to(query.dtype) * math.log(self.beta)


def _check_layer(layer, n_layers):
    if not isinstance(layer, numbers.Integral) or not 0 <= layer < n_layers:
        raise BadParameter(f"layer {layer!r} is out of range 0..{n_layers - 1}")


@contextmanager
def attention_plan(model, capture=(), upweight=None, beta: float = 10.0, context=None, queries=None,
                   implementation: str = NAME):
    """Run ``model`` with ``planned_attention`` inside the block; restore its implementation after.

    capture: [(layer, head)] query heads whose post-softmax weights are kept (GQA: query heads).
    upweight: None | layers (target "argmax") | {layer: "argmax" or bool key mask (B, T)}.
    beta: factor on the target key's unnormalised weight (> 0). context: (B, T) bool keys among
    which "argmax" picks (positions past T never qualify). queries: None (all) | int or (B,)
    first absolute query position (covers every later generated step) | (B, T) bool mask.
    Absolute positions assume an unpadded or right-padded prompt (no left padding, no sliding-
    window cache). Yields the ``AttentionPlan``; its ``captured`` fills as the model runs.
    """
    if not model._can_set_attn_implementation():
        raise anatomy.UnsupportedModel(f"{type(model).__name__} cannot switch attention implementation")
    previous = model.config._attn_implementation
    if previous == implementation:
        raise BadParameter("attention_plan does not nest: the model already runs planned attention")
    if not beta > 0:
        raise BadParameter(f"beta must be > 0, got {beta}")
    n_layers = anatomy.n_layers(model)
    capture_by_layer = {}
    for layer, head in capture:
        _check_layer(layer, n_layers)
        if not 0 <= head < anatomy.n_heads(model, layer):
            raise BadParameter(f"head {head} is out of range 0..{anatomy.n_heads(model, layer) - 1} "
                               f"of layer {layer}")
        capture_by_layer.setdefault(layer, []).append(head)
    if upweight is None:
        upweight = {}
    elif not isinstance(upweight, dict):
        upweight = {layer: "argmax" for layer in upweight}
    for layer, target in upweight.items():
        _check_layer(layer, n_layers)
        if isinstance(target, str) and target != "argmax":
            raise BadParameter(f"upweight target {target!r} of layer {layer}: use 'argmax' or a bool key mask")
    plan = AttentionPlan(capture_by_layer, upweight, beta, context, queries)
    planned = {l: hooks.get_module(model, anatomy.resolve(model, f"layer[{l}].attn").path)
               for l in set(capture_by_layer) | set(upweight)}
    model.set_attn_implementation(implementation)
    try:
        for layer, module in planned.items():
            setattr(module, _SLOT, (plan, layer))
        yield plan
    finally:
        for module in planned.values():
            if hasattr(module, _SLOT):
                delattr(module, _SLOT)
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------- per-token contributions (Chapter 9, §9.2.3)


def token_contributions(attn: torch.nn.Module, x: torch.Tensor, causal: bool = True,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """What each source token j writes into each target token i through one attention module.

    attn: a module with ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``) and
    ``num_heads`` (transformers' CLIPAttention); x (B, T, d): its input (the output of the
    layer's pre-attention norm). Returns terms (B, T_i, T_j, d) with
    ``terms[b, i, j] = sum_h a^h_ij (x_j W_v^h + b_v^h) W_o^hT``; summed over j plus
    ``out_proj.bias`` they give the module's output at i. The bias belongs to no token and is
    left out. ``mask`` (B, T) marks valid keys (False = padding), combined with the causal mask.
    ``cont_ij = terms.norm(dim=-1)`` is the dissertation's attention contribution.
    """
    B, T, d = x.shape
    h = attn.num_heads
    dh = d // h

    def heads(t):  # (B, T, d) -> (B, h, T, dh)
        return t.view(B, T, h, dh).transpose(1, 2)
    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    scores = (q @ k.transpose(-1, -2)) * dh ** -0.5                   # (B, h, T_i, T_j)
    allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(B, 1, T, T)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, h, T_i, T_j)
    W_o = attn.out_proj.weight.view(d, h, dh)                         # (d_out, h, dh)
    written = torch.einsum("bhjc,ohc->bhjo", v, W_o)                  # (B, h, T_j, d): head h's write of token j
    return torch.einsum("bhij,bhjo->bijo", probs, written)


@torch.no_grad()
def contributions_by_layer(model: torch.nn.Module, input_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """cont_ij of every layer, (B, L, T_i, T_j): ``token_contributions``' norms for each attention
    layer of an encoder in the anatomy registry (e.g. a CLIP text tower), from one forward pass of
    input_ids (B, T); each layer's input is its pre-attention norm applied to the residual stream."""
    hs = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    out = []
    for layer in range(anatomy.n_layers(model)):
        attn = model.get_submodule(anatomy.resolve(model, f"layer[{layer}].attn").path)
        norm = model.get_submodule(anatomy.resolve(model, f"layer[{layer}].norm1").path)
        out.append(token_contributions(attn, norm(hs[layer]), causal=causal).norm(dim=-1))
    return torch.stack(out, dim=1)


@torch.no_grad()
def t5_contributions_by_layer(model: torch.nn.Module, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """cont_ij of every layer of a T5 encoder (``T5EncoderModel``), (B, L, T_i, T_j).

    T5 adds a relative position bias to the scores and has no projection biases, so the weights
    come from the model itself (``output_attentions``, eager) and each layer's values are
    ``v(layer_norm(x))``; Eq. 6.1's ``weighted_contributions`` then gives every source token's write.
    """
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # output_attentions needs the weights themselves
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    conts = []
    for layer, probs in enumerate(out.attentions):  # probs (B, H, T, T)
        sub = model.encoder.block[layer].layer[0]
        attn = sub.SelfAttention
        values = attn.v(sub.layer_norm(out.hidden_states[layer]))
        values = values.view(*values.shape[:2], attn.n_heads, attn.key_value_proj_dim)
        conts.append(weighted_contributions(probs, values, attn.o.weight).norm(dim=-1))
    return torch.stack(conts, dim=1)


def unintended_layers(conts: torch.Tensor, a1, o1, a2, o2, bidirectional: bool = False) -> torch.Tensor:
    """Per prompt "a1 o1 and a2 o2", the number of layers where an object token receives more from the
    other object's attribute than from its own (§9.2.3): cont[o2, a1] > cont[o2, a2], and for a
    bidirectional encoder (T5) also cont[o1, a2] > cont[o1, a1]. conts (B, L, T, T); positions (B,)."""
    b = torch.arange(len(conts))
    pos = [torch.as_tensor(p).expand(len(conts)) for p in (a1, o1, a2, o2)]
    a1, o1, a2, o2 = pos
    wrong = conts[b, :, o2, a1] > conts[b, :, o2, a2]                                    # (B, L)
    if bidirectional:
        wrong |= conts[b, :, o1, a2] > conts[b, :, o1, a1]
    return wrong.sum(1)


# ---------------------------------------------------------------- contributions from eager weights (Chapter 6, Eq. 6.1)


def weighted_contributions(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor) -> torch.Tensor:
    """a_ij = sum_h A^h_ij (u_j W_v^h) W_o^h (Eq. 6.1) from a model's own attention weights.

    probs (B, H, Q, T): post-softmax weights of Q chosen queries (RoPE and masks already inside);
    values (B, T, H_kv, dh): ``v_proj`` of the attention input, per key-value head (grouped-query
    attention: query head h reads kv head h // (H / H_kv)); o_weight (d, H * dh). Returns
    (B, Q, T, d); summed over T it is the output projection's output at the Q queries (no bias).
    """
    B, H, Q, T = probs.shape
    h_kv, dh = values.shape[-2:]
    if H % h_kv or o_weight.shape[-1] != H * dh:
        raise BadParameter(f"{H} query heads, {h_kv} kv heads of {dh} and o_proj {tuple(o_weight.shape)} disagree")
    v = values.repeat_interleave(H // h_kv, dim=2)                              # (B, T, H, dh)
    written = torch.einsum("bjhc,ohc->bhjo", v, o_weight.view(-1, H, dh).to(v.dtype))  # (B, H, T, d)
    return torch.einsum("bhqj,bhjo->bqjo", probs.to(v.dtype), written)


@torch.no_grad()
def attention_contributions(model: torch.nn.Module, layers, queries, tower: str = None, **inputs) -> dict:
    """layer -> (B, Q, T, d) Eq. 6.1 terms of the decoder's attention at positions ``queries`` (Q,).

    One eager forward of ``model(**inputs, output_attentions=True)`` (e.g. ``inputs_embeds=...``);
    the attention input u_j is read at the module's ``hidden_states`` (after the pre-norm), values
    by the module's own ``v_proj`` (its bias included), the output projection found by anatomy
    (Llama's ``o_proj``, Phi's ``dense``; GQA aware). Summed over T a layer's terms are the attention
    output less the output projection's bias (``output_bias``).
    """
    prefix = f"{tower}." if tower else ""
    paths = {l: anatomy.resolve(model, f"{prefix}layer[{l}].attn").path for l in layers}
    outs = {l: model.get_submodule(anatomy.resolve(model, f"{prefix}layer[{l}].attn.out").path) for l in layers}
    with hooks.trace(model, list(paths.values()), at="input:hidden_states") as seen:
        out = model(**inputs, output_attentions=True)
    idx = torch.as_tensor(queries).reshape(-1)
    result = {}
    for l, path in paths.items():
        attn = model.get_submodule(path)
        u = seen[path]
        B, T, _ = u.shape
        values = attn.v_proj(u).view(B, T, -1, attn.head_dim)
        probs = out.attentions[l][:, :, idx]
        result[l] = weighted_contributions(probs, values, outs[l].weight)
    return result


def output_bias(model: torch.nn.Module, layer: int, tower: str = None):
    """The bias (d,) of a layer's attention output projection (Phi's ``dense``), or 0.0 (Llama's ``o_proj``
    has none): what ``attention_contributions``' terms add up to the attention output without."""
    prefix = f"{tower}." if tower else ""
    bias = model.get_submodule(anatomy.resolve(model, f"{prefix}layer[{layer}].attn.out").path).bias
    return 0.0 if bias is None else bias.detach()
