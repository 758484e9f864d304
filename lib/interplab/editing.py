"""Closed-form key-to-value edits of one linear map, applied reversibly.

The regularised least-squares edit shared by DIFF-QUICKFIX (Eq. 5.9), LocoEdit and MULTEDIT:

    W_new = argmin_W  ||K W^T - V||_F^2 + lam ||W - W0||_F^2
          = (lam W0 + V^T K) (lam I_d + K^T K)^{-1}                         (direct, d x d)
          = W0 + (V - K W0^T)^T (lam I_n + K K^T)^{-1} K                    (Woodbury, n x n)

with W0 (d_out, d_in), keys K (n, d_in) (what the layer reads) and values V (n, d_out) (what it
should write, bias excluded). The two forms agree because lam W0 = W0 (lam I + K^T K) - W0 K^T K
and K (lam I_d + K^T K)^{-1} = (lam I_n + K K^T)^{-1} K (push-through identity). Both are solved
in float64 with ``torch.linalg.solve``, never an explicit inverse.

    edit = compute_edit(model, "text_model.encoder.layers.0.self_attn.out_proj", K, V, lam=0.01)
    with apply_edit(model, edit):        # weight restored bit-exactly on exit, also on errors
        images = pipe.generate(prompts)
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hooks
from .errors import BadParameter, check_choice


def solve_update(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float,
                 method: str = "auto") -> torch.Tensor:
    """W_new (d_out, d_in) mapping keys K (n, d_in) to values V (n, d_out), regularised to W.

    method: "direct" solves the d_in x d_in system, "woodbury" the n x n one; "auto" picks
    Woodbury when n < d_in (cheaper, and still exact as lam -> 0 when K has full row rank).
    lam = 0 is allowed where the chosen system is invertible. Computed in float64 on W's
    device; returned in W's dtype.
    """
    check_choice("method", method, ("auto", "direct", "woodbury"))
    if lam < 0:
        raise BadParameter(f"lam must be >= 0, got {lam}")
    d_out, d_in = W.shape
    if K.dim() != 2 or V.dim() != 2 or K.shape[1] != d_in or V.shape != (K.shape[0], d_out):
        raise BadParameter(f"for W {tuple(W.shape)} expected K (n, {d_in}) and V (n, {d_out}), "
                           f"got K {tuple(K.shape)} and V {tuple(V.shape)}")
    W64, K64, V64 = (x.detach().to(W.device, torch.float64) for x in (W, K, V))
    n = K.shape[0]
    if method == "woodbury" or (method == "auto" and n < d_in):
        gram = K64 @ K64.T + lam * torch.eye(n, dtype=torch.float64, device=W.device)
        new = W64 + (V64 - K64 @ W64.T).T @ torch.linalg.solve(gram, K64)
    else:
        # W_new A = B with A symmetric: solve A X = B^T, then W_new = X^T
        A = K64.T @ K64 + lam * torch.eye(d_in, dtype=torch.float64, device=W.device)
        new = torch.linalg.solve(A, (lam * W64 + V64.T @ K64).T).T
    return new.to(W.dtype)


# ---------------------------------------------------------------- weights of linear layers


def _transposed(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as (d_in, d_out)."""
    return type(module).__name__ == "Conv1D"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as a (d_out, d_in) map (a view; transposed for GPT-2's Conv1D)."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
        raise BadParameter(f"{type(module).__name__} has no 2-D weight to edit")
    return module.weight.T if _transposed(module) else module.weight


@torch.no_grad()
def _write(module: nn.Module, W: torch.Tensor) -> None:
    """Copy a (d_out, d_in) map into the weight in place (keeps the Parameter object)."""
    weight_of(module).copy_(W)


# ---------------------------------------------------------------- the saved diff


@dataclass
class Edit:
    """One edit of the linear map at ``path``: W_new = W + delta.

    delta: (d_out, d_in) float32 (the layout of ``nn.Linear.weight``). relative_change:
    ||delta|| / ||W||; residual: ||K W_new^T - V|| / ||V|| (nan if unknown); wall_time_s: the
    solve. ``apply`` keeps the original weight so ``revert`` restores it bit-exactly.
    """
    path: str
    delta: torch.Tensor
    relative_change: float
    residual: float = float("nan")
    wall_time_s: float = 0.0
    lam: float = float("nan")
    _saved: dict = field(default_factory=dict, repr=False, compare=False)

    def module(self, model: nn.Module) -> nn.Module:
        return hooks.get_module(model, self.path)

    def apply(self, model: nn.Module) -> "Edit":
        """Write W + delta into ``model`` (in place); computed in float32, cast to the weight dtype."""
        module = self.module(model)
        key = id(module.weight)
        if key in self._saved:
            raise BadParameter(f"edit of '{self.path}' is already applied to this model; revert it first")
        W = weight_of(module)
        self._saved[key] = W.detach().clone()
        _write(module, (W.float() + self.delta.to(W.device)).to(W.dtype))
        return self

    def revert(self, model: nn.Module) -> None:
        """Restore the exact weight ``apply`` replaced."""
        module = self.module(model)
        saved = self._saved.pop(id(module.weight), None)
        if saved is None:
            raise BadParameter(f"edit of '{self.path}' was not applied to this model; nothing to revert")
        _write(module, saved)


def edit_from_weights(path: str, W: torch.Tensor, W_new: torch.Tensor, K=None, V=None,
                      wall_time_s: float = 0.0, lam: float = float("nan")) -> Edit:
    """Package W -> W_new (both (d_out, d_in)) as an ``Edit``; K, V give its fit residual."""
    delta = W_new.detach().double() - W.detach().double()
    residual = float("nan")
    if K is not None and V is not None:
        V64 = V.detach().double().to(W.device)
        fit = K.detach().double().to(W.device) @ W_new.detach().double().T - V64
        residual = float(fit.norm() / V64.norm())
    return Edit(hooks.normalize(path), delta.float(), float(delta.norm() / W.detach().double().norm()),
                residual, wall_time_s, lam)


def compute_edit(model: nn.Module, path: str, K: torch.Tensor, V: torch.Tensor, lam: float,
                 method: str = "auto", preserve: tuple = None, preserve_weight: float = 1.0) -> Edit:
    """Solve the edit of the linear map at ``path`` (keys K (n, d_in) -> values V (n, d_out)).

    V is what ``W k`` should become; subtract the layer's bias from desired outputs first.
    ``preserve`` = (K_p (m, d_in), V_p (m, d_out)) from ``preservation_rows``: stacked under the
    edit's rows, scaled so that together they weigh ``preserve_weight`` times the n edit rows
    whatever m is. The objective becomes lam ||W - W'||^2 + preserve_weight n/m sum_p ||W k_p - v_p||^2
    besides the fit: the change is kept off the key directions ordinary prompts use (MEMIT's key
    covariance C = E[k k^T] in row form). Needed when n exceeds the layer's width: then K^T K alone
    is full rank and a small lam lets the edit rewrite every direction. The residual is the fit of
    K, V alone. The model is not changed: use ``apply_edit`` or ``Edit.apply``.
    """
    W = weight_of(hooks.get_module(model, path))
    K_fit, V_fit = K, V
    if preserve is not None:
        if preserve_weight <= 0:
            raise BadParameter(f"preserve_weight must be > 0, got {preserve_weight}")
        Kp, Vp = preserve
        scale = (preserve_weight * len(K) / len(Kp)) ** 0.5
        K_fit, V_fit = torch.cat([K, scale * Kp.to(K)]), torch.cat([V, scale * Vp.to(V)])
    if W.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    W_new = solve_update(W, K_fit, V_fit, lam, method)
    if W.device.type == "cuda":
        torch.cuda.synchronize()
    return edit_from_weights(path, W, W_new, K, V, time.perf_counter() - start, lam)


# ---------------------------------------------------------------- keys and values read from a model


def positions_from_last_token(ids: torch.Tensor, eos_id: int) -> list:
    """Per row of ids (N, T): [p, p + 1, ..., T - 1] with p the token before the first EOS (the
    last subject token when the subject ends the prompt), i.e. it and every EOS / padding after it."""
    out = []
    for row in ids.tolist():
        if eos_id not in row[1:]:
            raise BadParameter(f"no EOS (id {eos_id}) after position 0 in token ids {row}")
        p = row.index(eos_id, 1) - 1
        out.append(list(range(p, len(row))))
    return out


def read_inputs(model: nn.Module, path: str, run, inputs, positions: list) -> torch.Tensor:
    """Rows (n, d_in) of what the linear map at ``path`` reads: row i's ``positions[i]`` of its input
    (N, T, d_in) during ``run(inputs)``, concatenated in order."""
    with torch.no_grad(), hooks.trace(model, [path], at="input") as seen:
        run(inputs)
    h = seen[path]
    return torch.cat([h[i, list(pos)] for i, pos in enumerate(positions)])


def paired_positions(key_ids: torch.Tensor, value_ids: torch.Tensor, eos_id: int,
                     positions: str = "subject_and_after") -> tuple:
    """Which positions of key prompts (N, T) pair with which of value prompts (N, T): per pair, the
    last subject token and every EOS / padding after it (``"subject_and_after"``), the value side cut
    to as many (or padded with T - 1); or the last subject token alone (``"subject"``)."""
    check_choice("positions", positions, ("subject_and_after", "subject"))
    if key_ids.shape[1] != value_ids.shape[1]:
        raise BadParameter(f"key and value prompts must be padded to one length, got {key_ids.shape[1]} "
                           f"and {value_ids.shape[1]}")
    pk = positions_from_last_token(key_ids, eos_id)
    pad = key_ids.shape[1] - 1
    pv = [(p + [pad] * len(k))[:len(k)] for k, p in zip(pk, positions_from_last_token(value_ids, eos_id))]
    if positions == "subject":
        pk, pv = [p[:1] for p in pk], [p[:1] for p in pv]
    return pk, pv


def quickfix_rows(model: nn.Module, path: str, run, key_ids: torch.Tensor, value_ids: torch.Tensor,
                  eos_id: int, bias_mode: str = "exact", positions: str = "subject_and_after") -> tuple:
    """Keys K (n, d_in) and values V (n, d_out) of DIFF-QUICKFIX (Eq. 5.8) for prompt pairs.

    key_ids, value_ids (N, T): prompts naming the concept (c_k) and its replacement (c_v). Key
    positions of pair i (``positions="subject_and_after"``, the release's rows): the last subject token
    of c_k and every EOS / padding after it; value positions the same for c_v, cut to as many (or
    padded with T - 1). ``positions="subject"``: the last subject token alone, one row per pair, as
    Eq. 5.8 is written; with a narrow layer the release's rows can outnumber its width, and then even a
    small lambda rewrites the whole map. k = input of the linear map at ``path`` (e.g. text layer 0's
    ``self_attn.out_proj``) for c_k; v = W' (its input for c_v): the output without the bias
    (``bias_mode="exact"``) or with it (``"as_released"``, the release's choice, which leaves the
    edited layer writing v + 2b).
    """
    check_choice("bias_mode", bias_mode, ("exact", "as_released"))
    pk, pv = paired_positions(key_ids, value_ids, eos_id, positions)
    rows = read_inputs(model, path, run, torch.cat([key_ids, value_ids]), pk + pv)  # one forward pass
    n_k = sum(map(len, pk))
    module = hooks.get_module(model, path)
    K, V = rows[:n_k], rows[n_k:] @ weight_of(module).detach().T
    if bias_mode == "as_released" and getattr(module, "bias", None) is not None:
        V = V + module.bias.detach()
    return K, V


def preservation_rows(model: nn.Module, path: str, run, ids: torch.Tensor) -> tuple:
    """Rows that ask the linear map at ``path`` to keep its outputs on ordinary prompts ids (N, T).

    Keys K_p (N T, d_in) are its inputs at every position (a text tower's EOS / padding states are
    read downstream too); values V_p = W' K_p (bias excluded), its current outputs. They depend on
    the model and the prompts only, so one read serves every edit of the layer (``compute_edit``'s
    ``preserve``).
    """
    K = read_inputs(model, path, run, ids, [range(ids.shape[1])] * len(ids))
    return K, K @ weight_of(hooks.get_module(model, path)).detach().T


def last_token_states(states: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, d): conditioning states (N, T, d) at the token before the first EOS of each row of ids
    (N, T), i.e. the last subject token of prompts that end with their subject. ``states`` is what
    cross-attention reads (``pipe.encode``: one tower's last states, SD-XL's two towers concatenated)."""
    last = [p[0] for p in positions_from_last_token(ids, eos_id)]
    return states[torch.arange(len(ids)), last]


def locoedit_inputs(key_states: torch.Tensor, key_ids: torch.Tensor, target_states: torch.Tensor,
                    target_ids: torch.Tensor, eos_id: int, positions: str = "subject") -> tuple:
    """LocoEdit's keys and targets as (states (N, T, d), positions per row) pairs: conditioning states
    of prompts naming the concept and of prompts naming its replacement (ids (N, T), one length), and
    the positions ``paired_positions`` picks. ``positions``: "subject" (the last subject token, the
    release's default) or "subject_and_after" (also every EOS / padding state after it, the release's
    ``--eos``: a causal tower carries the concept there, and cross-attention reads those states too).
    Pass them to ``locoedit`` as they are when a layer transforms the conditioning before its
    projections (IF: ``encoder_hid_proj``, then a GroupNorm over the whole sequence)."""
    pk, pv = paired_positions(key_ids, target_ids, eos_id, positions)
    return (key_states, pk), (target_states, pv)


def _take(states: torch.Tensor, positions: list) -> torch.Tensor:
    """Rows (n, d) of states (N, T, d): row i's ``positions[i]``, concatenated."""
    return torch.cat([states[i, list(p)] for i, p in enumerate(positions)])


def locoedit_rows(key_states: torch.Tensor, key_ids: torch.Tensor, target_states: torch.Tensor,
                  target_ids: torch.Tensor, eos_id: int, positions: str = "subject") -> tuple:
    """LocoEdit's keys (n, d) and targets (n, d) as rows of the conditioning states; the arguments are
    ``locoedit_inputs``'. Rows serve every layer that reads the conditioning as it is (SD, SD-XL)."""
    keys, targets = locoedit_inputs(key_states, key_ids, target_states, target_ids, eos_id, positions)
    return _take(*keys), _take(*targets)


def xattn_inputs(unet: nn.Module, layer: str, states: torch.Tensor) -> torch.Tensor:
    """(N, T, d'): what the key / value projections of cross-attention ``layer`` read, from the
    conditioning states (N, T, d) the UNet is called with: IF's ``encoder_hid_proj`` (4096 -> d'),
    then the layer's ``norm_cross`` (IF: a GroupNorm whose statistics span the whole sequence, so one
    position's input depends on the others). The identity for SD and SD-XL."""
    attn = hooks.get_module(unet, layer)
    proj = getattr(unet, "encoder_hid_proj", None)
    h = states.to(next(attn.parameters()))
    with torch.no_grad():
        if proj is not None:
            h = proj(h)
        if getattr(attn, "norm_cross", None) is not None:
            h = attn.norm_encoder_hidden_states(h)
    return h


def _reads_as_is(unet: nn.Module, layer: str) -> bool:
    attn = hooks.get_module(unet, layer)
    return getattr(unet, "encoder_hid_proj", None) is None and getattr(attn, "norm_cross", None) is None


def xattn_projections(unet: nn.Module, layer: str) -> tuple:
    """Names of the projections that read the text in cross-attention ``layer``: ``to_k`` / ``to_v``,
    or IF's ``add_k_proj`` / ``add_v_proj`` (its joint attention keeps to_k / to_v for the image)."""
    attn = hooks.get_module(unet, layer)
    return ("add_k_proj", "add_v_proj") if getattr(attn, "add_k_proj", None) is not None else ("to_k", "to_v")


def _layer_rows(unet: nn.Module, layer: str, x) -> torch.Tensor:
    """Rows (n, d') that ``layer``'s projections read, from rows (n, d), from (states (N, T, d),
    positions) or, for preservation, from states (N, T, d) at every position."""
    if isinstance(x, tuple):
        return _take(xattn_inputs(unet, layer, x[0]), x[1])
    if x.dim() == 3:
        return xattn_inputs(unet, layer, x).flatten(0, 1)
    if not _reads_as_is(unet, layer):
        raise BadParameter(f"{layer} transforms the conditioning before its projections (encoder_hid_proj / "
                           "norm_cross over the sequence): pass (states, positions) from locoedit_inputs, not rows")
    return x


def locoedit(unet: nn.Module, layers, keys, targets, lam: float = 0.01, projections=None,
             preserve: torch.Tensor = None, preserve_weight: float = 1.0) -> list:
    """LocoEdit (§5.9.1): edits of the key and value projections of cross-attention ``layers``
    (module paths) so that the concept's text states are read as its replacement's are.

    keys / targets: final text states at the last subject token of prompts naming the concept / what
    should replace it, as rows (n, d) (``locoedit_rows``) or as (states (N, T, d), positions)
    (``locoedit_inputs``; needed for IF, whose layers read ``xattn_inputs`` of the whole sequence).
    Per projection W (``projections``, default ``xattn_projections``): min ||K W^T - T W_0^T||^2 +
    lam ||W - W_0||^2 over the rows each layer reads, DIFF-QUICKFIX's solve with values v = W_0 t
    (bias kept). ``preserve``: conditioning of ordinary prompts whose projections should not move,
    rows (m, d) or states (N, T, d) (every position), weighed as in ``compute_edit``. Returns the
    ``Edit``s (apply them together with ``apply_edit(unet, edits)``)."""
    edits = []
    for layer in layers:
        K, T = _layer_rows(unet, layer, keys), _layer_rows(unet, layer, targets)
        P = None if preserve is None else _layer_rows(unet, layer, preserve)
        for proj in projections or xattn_projections(unet, layer):
            path = f"{layer}.{proj}"
            W = weight_of(hooks.get_module(unet, path)).detach()
            rows = None if P is None else (P.to(W), P.to(W) @ W.T)
            edits.append(compute_edit(unet, path, K.to(W), T.to(W) @ W.T, lam, preserve=rows,
                                      preserve_weight=preserve_weight))
    return edits


@contextmanager
def apply_edit(model: nn.Module, edit):
    """Apply an edit (or a list of edits) inside the block; original weights are restored
    bit-exactly on exit.

    edit: an ``Edit`` (its path is looked up in ``model``), a list of them, or a (d_out, d_in)
    tensor W_new for ``model`` itself being the linear layer (``apply_edit(linear, W_new)``).
    Yields what was applied.
    """
    if torch.is_tensor(edit):
        edit = edit_from_weights("", weight_of(model), edit)
    edits = list(edit) if isinstance(edit, (list, tuple)) else [edit]
    applied = []
    try:
        for e in edits:
            applied.append(e.apply(model))
        yield edit
    finally:
        for e in reversed(applied):
            e.revert(model)


# ---------------------------------------------------------------- MULTEDIT (Chapter 6, Eq. 6.3-6.5)


def optimise_value(model: nn.Module, path: str, position: int, loss_fn, run, inputs, steps: int = 50,
                   lr: float = 0.1, l2: float = 1e-3, max_ratio: float = 4.0, stop_loss: float = None) -> tuple:
    """z* = W'k + delta: the output of the linear map at ``path`` at ``position`` that minimises
    ``loss_fn(run(inputs))`` (e.g. -log P(O*)), every other activation left as the model computes it.

    Adam on delta (init 0) with an L2 penalty ``l2 ||delta||^2`` and ||delta|| clamped to
    ``max_ratio ||W'k||``; stops early once the loss is below ``stop_loss``. Returns
    (k (d_in,), z* (d_out,) without bias, losses). The model's weights never change.
    """
    module = hooks.get_module(model, path)
    with torch.no_grad(), hooks.trace(model, [path], at="input") as seen_in, \
            hooks.trace(model, [path]) as seen_out:
        run(inputs)
    k, out = seen_in[path][0, position].float(), seen_out[path][0, position].float()
    bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else 0.0
    delta = torch.zeros_like(out, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    limit = max_ratio * float((out - bias).norm())
    losses = []

    def add_delta(h):
        h = h.clone()
        h[:, position] = h[:, position] + delta.to(h.dtype)
        return h

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            with hooks.edit(model, path, add_delta):
                loss = loss_fn(run(inputs))
            losses.append(float(loss.detach()))
            if stop_loss is not None and losses[-1] < stop_loss:
                break
            opt.zero_grad()
            (loss + l2 * delta.pow(2).sum()).backward()
            opt.step()
            with torch.no_grad():
                delta.mul_(min(1.0, limit / (float(delta.norm()) + 1e-12)))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return k, (out - bias + delta).detach(), losses


def multedit(model: nn.Module, path: str, key: torch.Tensor, value: torch.Tensor, lam: float) -> Edit:
    """MULTEDIT's closed form (Eq. 6.5): W* = argmin ||W k - z*||^2 + lam ||W - W'||_F^2 for the
    linear map at ``path`` (e.g. an early MLP's ``down_proj``): the rank-one update
    W' + (z* - W'k) k^T / (lam + k^T k). key (d_in,) or (n, d_in); value (d_out,) or (n, d_out)."""
    return compute_edit(model, path, key.reshape(-1, key.shape[-1]), value.reshape(-1, value.shape[-1]), lam)


@contextmanager
def finetuned(params, loss_fn, steps: int = 50, lr: float = 1e-3, stop_loss: float = None, linf: float = None):
    """Fine-tune ``params`` on ``loss_fn()`` with Adam inside the block (ROME's FT baseline); with
    ``linf``, each step projects every weight back into ||W - W'||_inf <= linf (FT-C, Zhu et al. 2020).
    Half-precision weights are trained through float32 master copies (cast back after every step), since
    Adam's state underflows in fp16 and its eps (1e-8) rounds to 0 there; float32 weights are trained in
    place. The original values are restored bit-exactly on exit. Yields the losses."""
    params = list(params)
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    masters = [p.detach().float().requires_grad_(True) if p.dtype in (torch.float16, torch.bfloat16) else p
               for p in params]
    opt = torch.optim.Adam(masters, lr=lr)
    losses = []
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            loss = loss_fn()
            losses.append(float(loss.detach()))
            if stop_loss is not None and losses[-1] < stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            for p, m in zip(params, masters):
                if m is not p:
                    m.grad, p.grad = (None if p.grad is None else p.grad.float()), None
            opt.step()
            with torch.no_grad():
                for p, m, p0 in zip(params, masters, saved):
                    if linf is not None:
                        p0 = p0.to(m.dtype)  # the master's dtype: float32 for half weights, else their own
                        m.copy_(torch.maximum(torch.minimum(m, p0 + linf), p0 - linf))
                    if m is not p:
                        p.copy_(m)
        yield losses
    finally:
        with torch.no_grad():
            for p, p0, flag in zip(params, saved, flags):
                p.copy_(p0)
                p.requires_grad_(flag)
