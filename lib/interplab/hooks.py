"""Read, replace or add to any module's input or output by its path, on unmodified models.

One API for transformers, diffusers, timm and open_clip models: a *site* is a module path
(``"transformer.h.3.mlp"`` or ``"transformer.h[3].mlp"``) plus ``at="output"`` or
``at="input"``. Every function is a context manager that registers ordinary PyTorch hooks
and removes them on exit, also when the body raises.

    with trace(model, ["transformer.h.1", "transformer.h.1.mlp"]) as t:   # read
        model(ids)
    t["transformer.h[1]"]                                     # (B, T, d) hidden states

    with replace(model, {"transformer.h.1": t["transformer.h.1"]},  # patch row 0 at token 2
                 batch=[0], positions=[2]):
        model(ids)

What is read or written is the *first tensor* of a site:

- output: the output itself, else the first tensor of a tuple (hidden states for HF blocks,
  which may also return caches or attention weights), else the first tensor value of a
  ``ModelOutput`` / dict. The rest of the structure passes through untouched.
- input: the first positional tensor argument, else the ``hidden_states`` keyword, else the
  first tensor keyword (diffusers calls many blocks with keywords only). ``at="input:NAME"``
  picks the keyword argument NAME instead, e.g. a cross-attention's ``encoder_hidden_states``
  (the text it reads). Other arguments pass through untouched. For ``nn.MultiheadAttention``
  this is the *query* only: key and value keep their values, so to change what a self-attention
  layer reads, edit the norm before it.

Composition. Contexts nest freely. On one module, every edit runs before every trace, so a
trace records what the module really passed on. Two edits of the same site compose like the
nesting reads, ``outer(inner(x))``: the innermost edit runs first. A module that runs several
times per forward (a UNet inside a denoising loop) is edited on every call; ``trace`` keeps
the last call unless ``all_calls=True``.

``nn.MultiheadAttention`` (open_clip's ViT and text tower) uses ``out_proj``'s weights inside
``F.multi_head_attention_forward`` without calling ``out_proj`` as a module, so hooks on
``out_proj`` never fire. A path ending in ``<mha>.out_proj`` is therefore a *virtual* site:
``at="output"`` is the attention output, and ``at="input"`` (the concatenated heads, which
per-head analysis needs) is recomputed from the MHA's own inputs and weights, in the MHA's
layout ((B, L, d) when ``batch_first``). Edits there are applied exactly through linearity,
``out + W (z' - z)``, so an edit that changes nothing leaves the output bit-identical.
"""
import copy
import inspect
import re
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadParameter, InterplabError, check_choice

AT = ("output", "input")


class ModulePathError(InterplabError, KeyError):
    """A module path that does not exist in the model."""

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


# ---------------------------------------------------------------------------- paths


def normalize(path: str) -> str:
    """``"transformer.h[3].mlp"`` -> ``"transformer.h.3.mlp"`` (the form ``named_modules`` uses)."""
    return re.sub(r"\[(-?\d+)\]", r".\1", path).strip(".")


def _children_hint(module: nn.Module) -> str:
    names = list(module._modules)
    if not names:
        return "no children"
    if all(n.isdigit() for n in names):
        return f"{names[0]}..{names[-1]}"
    more = f", ... ({len(names)} in all)" if len(names) > 8 else ""
    return ", ".join(names[:8]) + more


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``""`` is the model itself).

    Raises ``ModulePathError`` (a ``KeyError``) naming the deepest prefix that exists and
    what it contains, e.g. ``no module 'transformer.h.30' in GPT2LMHeadModel; 'transformer.h'
    has 0..3``.
    """
    module, walked = model, []
    for name in filter(None, normalize(path).split(".")):
        child = module._modules.get(name)
        if child is None:
            where = f"'{'.'.join(walked)}'" if walked else "the model"
            raise ModulePathError(f"no module '{normalize(path)}' in {type(model).__name__}; "
                                  f"{where} has {_children_hint(module)}")
        module = child
        walked.append(name)
    return module


def _mha_parent(model, path):
    """The ``nn.MultiheadAttention`` owning ``path`` if ``path`` is its ``out_proj``, else None."""
    parent_path, _, leaf = normalize(path).rpartition(".")
    if leaf != "out_proj":
        return None
    parent = get_module(model, parent_path)
    return parent if isinstance(parent, nn.MultiheadAttention) else None


# ------------------------------------------------------- first tensor of a site


def _split_output(out, where):
    """(first tensor of ``out``, rebuild) where ``rebuild(new)`` is ``out`` with it swapped."""
    if torch.is_tensor(out):
        return out, lambda new: new
    if isinstance(out, Mapping):  # ModelOutput, diffusers BaseOutput, dict
        for key, value in out.items():
            if torch.is_tensor(value):
                def rebuild(new, key=key):
                    out2 = copy.copy(out)
                    out2[key] = new
                    return out2
                return value, rebuild
    if isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            if torch.is_tensor(value):
                def rebuild(new, i=i):
                    items = list(out)
                    items[i] = new
                    # a namedtuple takes fields positionally; tuple and list take one iterable
                    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
                return value, rebuild
    raise BadParameter(f"{where} has no tensor to hook (got {type(out).__name__})")


def _split_input(args, kwargs, where, name=None):
    """(first input tensor, or keyword ``name``'s, rebuild) where ``rebuild(new)`` returns new
    ``(args, kwargs)``."""
    if name is not None:
        if not torch.is_tensor(kwargs.get(name)):
            raise BadParameter(f"{where} was called without a tensor keyword argument {name!r} "
                               f"(keywords: {sorted(kwargs)})")
        return kwargs[name], lambda new: (args, {**kwargs, name: new})
    for i, value in enumerate(args):
        if torch.is_tensor(value):
            return value, lambda new: (args[:i] + (new,) + args[i + 1:], kwargs)
    keys = ["hidden_states"] if torch.is_tensor(kwargs.get("hidden_states")) else []
    keys += [k for k, v in kwargs.items() if torch.is_tensor(v)]
    if keys:
        return kwargs[keys[0]], lambda new: (args, {**kwargs, keys[0]: new})
    raise BadParameter(f"{where} was called without a tensor argument; hook its output or a parent")


# ----------------------------------------------------------------- hook adapters
# Every adapter wraps ``fn(tensor) -> tensor | None``: None leaves the site alone and the
# hook returns None, because a forward hook that returns anything replaces the output.


def _output_hook(fn, where):
    def hook(module, args, kwargs, output):
        tensor, rebuild = _split_output(output, where)
        new = fn(tensor)
        return None if new is None else rebuild(new)
    return hook


def _input_hook(fn, where, name=None):
    def hook(module, args, kwargs):
        tensor, rebuild = _split_input(args, kwargs, where, name)
        new = fn(tensor)
        return None if new is None else rebuild(new)
    return hook


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def mha_heads(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """What ``mha.out_proj`` would receive for this call: the concatenated heads.

    Recomputed with the module's own weights by running ``F.multi_head_attention_forward``
    with an identity output projection (exact: multiplying by an identity matrix). Returns
    (B, L, d) when ``mha.batch_first`` else (L, B, d); head h is ``[..., h*dh:(h+1)*dh]``.
    """
    if mha.training and mha.dropout > 0:
        raise BadParameter("cannot recompute the heads of a MultiheadAttention with dropout in "
                           "training mode; call model.eval()")
    call = _MHA_SIGNATURE.bind(mha, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    batched = query.dim() == 3
    if mha.batch_first and batched:  # the functional form wants (L, B, d)
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    separate = not mha._qkv_same_embed_dim
    eye = torch.eye(mha.embed_dim, dtype=query.dtype, device=query.device)
    heads, _ = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.bias_k, mha.bias_v, mha.add_zero_attn, 0.0, eye, None, training=False,
        key_padding_mask=a["key_padding_mask"], need_weights=False, attn_mask=a["attn_mask"],
        use_separate_proj_weight=separate, q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None,
        v_proj_weight=mha.v_proj_weight if separate else None, is_causal=a["is_causal"])
    return heads.transpose(0, 1) if mha.batch_first and batched else heads


def _mha_out_proj_hook(fn, at):
    """Forward hook on an ``nn.MultiheadAttention`` standing in for one on its ``out_proj``."""
    def hook(mha, args, kwargs, output):
        attn_out = output[0]
        if at == "output":
            new = fn(attn_out)
            return None if new is None else (new, *output[1:])
        heads = mha_heads(mha, args, kwargs)
        new = fn(heads)
        if new is None:
            return None
        # out_proj is affine, so the edited output is the real one plus W (z' - z): exact where
        # z' == z, and no dependence on how closely the recomputed z matches the fused kernel.
        return (attn_out + F.linear(new - heads, mha.out_proj.weight), *output[1:])
    return hook


def _attach(model, path, at, fn, first):
    """Register ``fn`` at a site; ``first`` puts it ahead of the hooks already there."""
    at, _, name = at.partition(":")
    check_choice("at", at, AT)
    if name and at != "input":
        raise BadParameter(f"only inputs are named (at='input:NAME'), got at={at + ':' + name!r}")
    module = get_module(model, path)
    where = f"'{normalize(path)}' ({type(module).__name__})"
    mha = _mha_parent(model, path)
    if mha is not None and not name:
        return mha.register_forward_hook(_mha_out_proj_hook(fn, at), with_kwargs=True, prepend=first)
    if at == "output":
        return module.register_forward_hook(_output_hook(fn, where), with_kwargs=True, prepend=first)
    return module.register_forward_pre_hook(_input_hook(fn, where, name or None), with_kwargs=True, prepend=first)


# -------------------------------------------------------------------- reading


class Trace(dict):
    """Recorded activations, path -> tensor (or list of tensors with ``all_calls=True``).

    Keys are normalised paths, and lookups normalise too, so ``t["h[3]"]`` is ``t["h.3"]``.
    A path that was hooked but whose module never ran is absent (``KeyError`` says so).
    """

    def __init__(self, paths):
        super().__init__()
        self.paths = [normalize(p) for p in paths]

    def __getitem__(self, path):
        key = normalize(path)
        if not super().__contains__(key):
            hint = ("it was traced but its module never ran in the forward pass" if key in self.paths
                    else f"traced paths are {', '.join(self.paths)}")
            raise ModulePathError(f"no activation for '{key}': {hint}")
        return super().__getitem__(key)

    def __contains__(self, path):
        return super().__contains__(normalize(path))

    def get(self, path, default=None):
        return super().get(normalize(path), default)


@contextmanager
def trace(model: nn.Module, paths, at: str = "output", detach: bool = True, all_calls: bool = False):
    """Record the first tensor of each site during the forward passes run inside the block.

    paths: one path or a list. Yields a ``Trace`` filled as modules run. ``detach=True``
    stores a detached copy (safe from later in-place ops, no graph); ``detach=False`` stores
    the live tensor, so gradients can flow from a loss on it.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    found = Trace(paths)

    def recorder(key):
        def record(tensor):
            value = tensor.detach().clone() if detach else tensor
            if all_calls:
                dict.setdefault(found, key, []).append(value)
            else:
                dict.__setitem__(found, key, value)
            return None  # reading only: never replace the site
        return record

    with ExitStack() as stack:
        for key in found.paths:
            stack.callback(_attach(model, key, at, recorder(key), first=False).remove)
        yield found


# -------------------------------------------------------------------- writing


@contextmanager
def edit(model: nn.Module, path: str, fn, at: str = "output"):
    """Replace the first tensor of a site by ``fn(tensor)`` (same shape) on every call.

    Tuples, ``ModelOutput``s, other args and kwargs are kept; only that tensor changes.
    """
    key = normalize(path)

    def checked(tensor):
        new = fn(tensor)
        if not torch.is_tensor(new) or new.shape != tensor.shape:
            got = tuple(new.shape) if torch.is_tensor(new) else type(new).__name__
            raise BadParameter(f"edit of '{key}' {at} must return a tensor of shape "
                               f"{tuple(tensor.shape)}, got {got}")
        return new

    handle = _attach(model, key, at, checked, first=True)
    try:
        yield
    finally:
        handle.remove()


def _as_index(index, device):
    if isinstance(index, slice):
        return index
    if isinstance(index, int):
        index = [index]
    return torch.as_tensor(index, device=device)


def region(h: torch.Tensor, batch=None, positions=None):
    """Index tuple selecting the patched region of ``h`` (B, T, ...), or None for all of it.

    batch: None (all rows) | int | slice | list / 1-D long tensor of rows | bool mask (B,)
        -> k selected rows.
    positions: None (every position) | int | slice | 1-D long (p,) shared by all k rows |
        2-D long (k, p), row j of which lists the positions patched in the j-th selected row.
    The region ``h[idx]`` is (k, *h.shape[1:]) without positions and (k, p, *h.shape[2:])
    with them. Positions index dim 1: tokens for (B, T, d) activations, channels for
    (B, C, H, W) maps.
    """
    if batch is None and positions is None:
        return None
    rows = torch.arange(h.shape[0], device=h.device)
    if batch is not None:
        rows = rows[_as_index(batch, h.device)].reshape(-1)
    if positions is None:
        return (rows,)
    pos = positions
    if isinstance(pos, slice):
        pos = torch.arange(h.shape[1], device=h.device)[pos]
    pos = _as_index(pos, h.device)
    if pos.dim() == 1:
        pos = pos.expand(len(rows), -1)
    if pos.dim() != 2 or pos.shape[0] != len(rows):
        raise BadParameter(f"positions must be 1-D or ({len(rows)}, p) for {len(rows)} selected rows, "
                           f"got shape {tuple(pos.shape)}")
    return rows[:, None].expand_as(pos), pos


def _patch_fn(key, value, batch, positions, combine):
    """fn for ``edit``: ``combine(old_region, value)`` written back into the region."""
    def fn(h):
        idx = region(h, batch, positions)
        old = h if idx is None else h[idx]
        v = value(old) if callable(value) else torch.as_tensor(value, dtype=h.dtype, device=h.device)
        try:
            new = combine(old, v.to(h.dtype)).expand(old.shape)
        except RuntimeError:
            raise BadParameter(f"value of shape {tuple(v.shape)} for '{key}' does not broadcast to "
                               f"the patched region {tuple(old.shape)}") from None
        # clone: never hand the model a view of the caller's tensor (it might write into it)
        return new.clone() if idx is None else h.index_put(idx, new)
    return fn


@contextmanager
def _patch(model, values, at, batch, positions, combine):
    with ExitStack() as stack:
        for path, value in values.items():
            fn = _patch_fn(normalize(path), value, batch, positions, combine)
            stack.enter_context(edit(model, path, fn, at))
        yield


def replace(model: nn.Module, values: dict, at: str = "output", batch=None, positions=None):
    """Overwrite sites: for each ``{path: value}``, the site's first tensor h (B, T, ...) becomes

        batch  positions        written                                  value broadcasts to
        None   None             h = value                                (B, T, ...)
        rows   None             h[rows[j]] = value[j]                    (k, T, ...)
        rows   pos (p,)         h[rows[j], pos[i]] = value[j, i]         (k, p, ...)
        rows   pos (k, p)       h[rows[j], pos[j, i]] = value[j, i]      (k, p, ...)

    rows are the k rows ``batch`` selects (None = all B); see ``region``. ``value`` may also be
    a callable ``old_region -> new_region``. Everything outside the region is left
    bit-identical. So ``batch=[0, 1], positions=torch.tensor([[2], [5]])`` with ``value`` of
    shape (2, 1, d) patches row 0 at token 2 and row 1 at token 5 in one forward pass.
    """
    return _patch(model, values, at, batch, positions, combine=lambda old, v: v)


def add(model: nn.Module, deltas: dict, at: str = "output", batch=None, positions=None):
    """Add to sites: ``h[idx] = h[idx] + delta``; same arguments and shapes as ``replace``."""
    return _patch(model, deltas, at, batch, positions, combine=lambda old, d: old + d)
