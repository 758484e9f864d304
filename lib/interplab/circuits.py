"""Direct-effect circuits of a decoder LM at the last prompt position (Chapter 8, hierarchy 0; hierarchy 1
of §11.7.1 in ``second_order_circuit``).

The pre-final-norm residual at the last position T is a sum of direct terms,

    r_T = e_T + sum_l ( A_l(T) + M_l(T) ),      A_l(T) = sum_h c_{l,h}(T)   (no o_proj bias)

so patching a node set S from a corrupted run into the clean one, with everything downstream kept
clean, is closed form: r_S = r_clean + sum_{j in S} (o_j^corr - o_j^clean), then recompute the final
norm and the unembedding. One cached forward pass per prompt gives every node's score.

    clean = cache_last(model, ids_clean, mask_clean)      # NodeCache: embed, attn, heads, mlp, resid
    corr = cache_last(model, ids_corr, mask_corr)
    circ = greedy_circuit(clean, corr, model, answer_ids, "head", delta=0.95)
    circ.ranked[:circ.k_star], circ.curve                  # the head circuit and s(k)

Nodes are tuples: ("embed",), ("attn", l), ("head", l, h) (query heads), ("mlp", l). Families are
"attn", "head", "mlp". Caches live on ``device`` (CPU by default: the paper profile's head cache is
N x L x H x d) and are moved to the model in chunks when scored. Modules are found through
``interplab.anatomy``, so any registered decoder family works (Llama, Phi-3, GPT-2; for GPT-2 the
heads sum to the attention output minus the c_proj bias, and ``embed`` includes positions).
"""
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import anatomy, hooks
from .editing import weight_of
from .errors import BadParameter, check_choice

FAMILIES = ("attn", "head", "mlp")
KINDS = ("embed",) + FAMILIES
BUDGET = 2 ** 25  # floats per scoring chunk (128 MB in fp32): bounds the (N, nodes, d) stacks


def head_contributions(heads_input: torch.Tensor, o_proj_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head terms of the output projection: (..., H*dh), (d, H*dh) -> (..., H, d).

    c_h = x[..., h*dh:(h+1)*dh] @ W[:, h*dh:(h+1)*dh].T; their sum over h is x @ W.T.
    """
    width = heads_input.shape[-1]
    if width % n_heads or o_proj_weight.shape[-1] != width:
        raise BadParameter(f"heads input width {width} must equal o_proj in_features "
                           f"{o_proj_weight.shape[-1]} and be a multiple of n_heads={n_heads}")
    z = heads_input.unflatten(-1, (n_heads, width // n_heads))   # (..., H, dh)
    w = o_proj_weight.unflatten(-1, (n_heads, width // n_heads))  # (d, H, dh)
    return torch.einsum("...hk,dhk->...hd", z, w.to(z.dtype))


# ------------------------------------------------------------------ the cache


@dataclass
class NodeCache:
    """Every node's direct term at the last real position of N prompts (fp32)."""
    embed: torch.Tensor  # (N, d)        residual entering block 0
    attn: torch.Tensor   # (N, L, d)     attention-layer outputs (o_proj output)
    heads: torch.Tensor  # (N, L, H, d)  per-query-head terms; sum over H == attn (no bias)
    mlp: torch.Tensor    # (N, L, d)
    resid: torch.Tensor  # (N, d)        pre-final-norm residual

    @property
    def n(self) -> int:
        return self.resid.shape[0]

    @property
    def n_layers(self) -> int:
        return self.attn.shape[1]

    @property
    def n_heads(self) -> int:
        return self.heads.shape[2]

    def nodes(self, family: str) -> list:
        """The node ids of a family ("attn", "head", "mlp"), in layer (then head) order."""
        check_choice("family", family, FAMILIES)
        if family == "head":
            return [("head", l, h) for l in range(self.n_layers) for h in range(self.n_heads)]
        return [(family, l) for l in range(self.n_layers)]

    def node(self, node) -> torch.Tensor:
        """(N, d) direct term of one node."""
        node = check_node(node, self.n_layers, self.n_heads)
        kind = node[0]
        if kind == "embed":
            return self.embed
        if kind == "head":
            return self.heads[:, node[1], node[2]]
        return getattr(self, kind)[:, node[1]]

    def stack(self, nodes) -> torch.Tensor:
        """(N, n, d) direct terms of ``nodes``, in the order given."""
        if not len(nodes):
            return self.resid.new_zeros(self.n, 0, self.resid.shape[-1])
        return torch.stack([self.node(j) for j in nodes], 1)

    def mean(self, nodes) -> dict:
        """{node: (d,)} mean direct term over the N prompts (the m_j of mean ablation)."""
        return {tuple(j): self.node(j).mean(0) for j in nodes}

    def __getitem__(self, rows) -> "NodeCache":
        """The cache of a subset of prompts (any index that selects rows)."""
        return NodeCache(*(t[rows] for t in (self.embed, self.attn, self.heads, self.mlp, self.resid)))


def check_node(node, n_layers: int, n_heads: int) -> tuple:
    """``node`` as a tuple, or BadParameter saying what is wrong with it."""
    node = tuple(node) if isinstance(node, (tuple, list)) else (node,)
    size = {"embed": 1, "attn": 2, "mlp": 2, "head": 3}.get(node[0])
    if size is None or len(node) != size:
        raise BadParameter(f"bad node {node!r}; use ('embed',), ('attn', l), ('head', l, h) or ('mlp', l)")
    if size > 1 and not 0 <= node[1] < n_layers:
        raise BadParameter(f"node {node!r}: layer {node[1]} is out of range 0..{n_layers - 1}")
    if size > 2 and not 0 <= node[2] < n_heads:
        raise BadParameter(f"node {node!r}: head {node[2]} is out of range 0..{n_heads - 1}")
    return node


def _nodes(cache: NodeCache, nodes) -> list:
    """A family name or a node list -> validated list of distinct node tuples."""
    if isinstance(nodes, str):
        return cache.nodes(nodes)
    nodes = [check_node(j, cache.n_layers, cache.n_heads) for j in nodes]
    if len(set(nodes)) != len(nodes):
        raise BadParameter("node list has duplicates; each node's term would be counted twice")
    return nodes


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token; the mask must be right-padded."""
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise BadParameter("attention_mask is not right-padded (a real token follows padding); "
                           "use tokenizer.padding_side = 'right' so positions start at 0 in every row")
    if not mask[:, 0].all():
        raise BadParameter("attention_mask has an empty row")
    return mask.sum(1) - 1


def _module(model, name):
    return hooks.get_module(model, anatomy.resolve(model, name).path)


@contextmanager
def _reading(model, name: str, fn, at: str = None):
    """Call ``fn(tensor)`` on a component's tensor (its resolved site unless ``at``); never edits it."""
    site = anatomy.resolve(model, name)
    with hooks.edit(model, site.path, lambda t: (fn(t), t)[1], at=at or site.at):
        yield


def cache_last(model, input_ids: torch.Tensor, attention_mask: torch.Tensor = None, batch_size: int = 16,
               device="cpu") -> NodeCache:
    """Run ``model`` on (N, T) prompts and keep each node's direct term at the last real token.

    Prompts of different lengths: right padding plus ``attention_mask`` (N, T); position ids
    then start at 0 in every row, as in an unpadded run. One forward pass per ``batch_size``
    rows; only the (B, d) rows at the last positions are kept, on ``device``, in fp32.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    last_all = last_positions(attention_mask)
    n_layers = anatomy.n_layers(model)
    n_heads = {anatomy.n_heads(model, l) for l in range(n_layers)}
    if len(n_heads) != 1:
        raise BadParameter(f"layers have different head counts {sorted(n_heads)}; NodeCache needs one")
    n_heads = n_heads.pop()
    run_device = next(model.parameters()).device
    got = {}  # "last": (B,) positions of the running batch; key -> (B, ...) terms

    def keep(key, o_proj=None):
        def read(t):                                      # t (B, T, width)
            # device_map="auto" (Llama-3-70B): the layer's tensor may sit on another GPU than the first
            v = t[torch.arange(len(t), device=t.device), got["last"].to(t.device)].float()
            if o_proj is not None:                        # heads input -> (B, H, d)
                v = head_contributions(v, weight_of(o_proj).float(), n_heads)
            got[key] = v.to(device)
        return read

    parts = []
    with torch.inference_mode(), ExitStack() as stack:
        stack.enter_context(_reading(model, "layer[0]", keep("embed"), at="input"))
        stack.enter_context(_reading(model, "final_norm", keep("resid"), at="input"))
        for l in range(n_layers):
            o_proj = _module(model, f"layer[{l}].attn.out")
            stack.enter_context(_reading(model, f"layer[{l}].attn.out", keep(("attn", l))))
            stack.enter_context(_reading(model, f"layer[{l}].attn.heads", keep(("heads", l), o_proj)))
            stack.enter_context(_reading(model, f"layer[{l}].mlp.out", keep(("mlp", l))))
        for i in range(0, len(input_ids), batch_size):
            got["last"] = last_all[i:i + batch_size].to(run_device)
            model(input_ids=input_ids[i:i + batch_size].to(run_device),
                  attention_mask=attention_mask[i:i + batch_size].to(run_device))
            layers = lambda kind: torch.stack([got[(kind, l)] for l in range(n_layers)], 1)
            parts.append((got["embed"], layers("attn"), layers("heads"), layers("mlp"), got["resid"]))
    return NodeCache(*(torch.cat(ts) for ts in zip(*parts)))


# ------------------------------------------------------------------ closed-form patching


def answer_prob(model, resid: torch.Tensor, answer_ids: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """softmax(W_U Norm_final(r))[a]: resid (..., N, d), answer_ids (N,) -> (..., N) fp32.

    The final norm is recomputed on every residual (freezing its scale changes the scores).
    Rows go through the model's own norm and head in chunks of ``rows``.
    """
    norm, head = _module(model, "final_norm"), _module(model, "head")
    answer_ids = torch.as_tensor(answer_ids)
    shape = resid.shape[:-1]
    if answer_ids.dim() != 1 or not shape or shape[-1] != len(answer_ids):
        raise BadParameter(f"answer_ids must be (N,) matching resid (..., N, d); got "
                           f"{tuple(answer_ids.shape)} and {tuple(resid.shape)}")
    param = next(head.parameters())
    flat = resid.reshape(-1, resid.shape[-1])
    answers = answer_ids.expand(shape).reshape(-1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(flat), rows):
            logits = head(norm(flat[i:i + rows].to(param.device, param.dtype))).float()
            a = answers[i:i + rows].to(param.device)[:, None]
            out.append((logits.gather(-1, a) - logits.logsumexp(-1, keepdim=True))[:, 0].exp())
    return torch.cat(out).reshape(shape).to(resid.device)


def patched_resid(base: NodeCache, source: NodeCache, nodes) -> torch.Tensor:
    """(N, d) residual of ``base`` with the direct terms of ``nodes`` taken from ``source``."""
    nodes = _nodes(base, nodes)
    return base.resid + (source.stack(nodes) - base.stack(nodes)).sum(1)


def patch_score(clean: NodeCache, corr: NodeCache, model, answer_ids, nodes) -> float:
    """mean_i (1 - P_S(a_i)) with S = ``nodes`` patched from the corrupted run (hierarchy 0)."""
    return 1 - answer_prob(model, patched_resid(clean, corr, nodes), answer_ids).mean().item()


def _chunk(n_rows: int, d: int) -> int:
    return max(1, BUDGET // max(1, n_rows * d))


def single_node_scores(clean: NodeCache, corr: NodeCache, model, answer_ids, family) -> torch.Tensor:
    """(n,) score({j}) for every node j of ``family`` (a name or a node list), batched."""
    nodes = _nodes(clean, family)
    step, scores = _chunk(clean.n, clean.resid.shape[-1]), []
    for i in range(0, len(nodes), step):
        part = nodes[i:i + step]
        r = clean.resid[:, None] + corr.stack(part) - clean.stack(part)           # (N, c, d)
        scores.append(1 - answer_prob(model, r.transpose(0, 1), answer_ids).mean(1))
    return torch.cat(scores) if scores else torch.zeros(0)


def cumulative_scores(clean: NodeCache, corr: NodeCache, model, answer_ids, nodes) -> torch.Tensor:
    """(K,) s(k) = score(nodes[:k]) for k = 1..K: joint patches of growing prefixes, batched."""
    nodes = _nodes(clean, nodes)
    step, scores, running = _chunk(clean.n, clean.resid.shape[-1]), [], clean.resid
    for i in range(0, len(nodes), step):
        part = nodes[i:i + step]
        r = running[:, None] + (corr.stack(part) - clean.stack(part)).cumsum(1)  # (N, c, d)
        scores.append(1 - answer_prob(model, r.transpose(0, 1), answer_ids).mean(1))
        running = r[:, -1]
    return torch.cat(scores) if scores else torch.zeros(0)


def k_star(curve: torch.Tensor, delta: float, family_size: int) -> int:
    """min k (1-based) with curve[k-1] >= delta; ``family_size + 1`` when never reached."""
    hits = (torch.as_tensor(curve) >= delta).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else family_size + 1


@dataclass
class Circuit:
    """Greedy hierarchy-0 circuit of one node family."""
    ranked: list          # all family nodes by single-node score, descending
    single: torch.Tensor  # (n,) their single-node scores, same order
    curve: torch.Tensor   # (K,) s(k) = score(ranked[:k]), k = 1..K
    delta: float
    k_star: int           # min k with s(k) >= delta, or family size + 1 ("not reached")

    @property
    def reached(self) -> bool:
        return self.k_star <= len(self.ranked)

    @property
    def nodes(self) -> list:
        """The circuit: ranked[:k*] (every ranked node when delta was not reached)."""
        return self.ranked[:self.k_star]


def greedy_circuit(clean: NodeCache, corr: NodeCache, model, answer_ids, family, delta: float,
                   max_k: int = None) -> Circuit:
    """Rank ``family`` by single-node score, then patch the top-k jointly for k = 1..max_k.

    ``family``: "attn" | "head" | "mlp" or a node list. Without ``max_k`` the curve covers the
    whole family; a k* beyond max_k also reads "not reached" (family size + 1).
    """
    nodes = _nodes(clean, family)
    single = single_node_scores(clean, corr, model, answer_ids, nodes)
    order = torch.argsort(single, descending=True, stable=True)
    ranked = [nodes[i] for i in order.tolist()]
    K = len(ranked) if max_k is None else max(0, min(max_k, len(ranked)))
    curve = cumulative_scores(clean, corr, model, answer_ids, ranked[:K])
    return Circuit(ranked, single[order], curve, delta, k_star(curve, delta, len(ranked)))


# ------------------------------------------------------------------ hierarchy 1 (§11.7.1)


def _order(node) -> int:
    """Place of a node in the forward pass: embed, then attention before MLP in each layer."""
    return -1 if node[0] == "embed" else 2 * node[1] + (node[0] == "mlp")


def second_order_resid(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, clean: NodeCache,
                       corr: NodeCache, targets, source_sets, batch_size: int = 16) -> torch.Tensor:
    """(S, N, d) residuals at the last position when the hierarchy-0 ``targets`` are recomputed with
    their input at T shifted by the corrupted-minus-clean terms of each set's sources that precede them
    (hierarchy 1: spec 2.3, §11.7.1).

    Every target keeps its clean inputs at the other positions (its own attention over the context) and
    only the targets' changed outputs at T reach r_T: r = r_clean + sum_t (o_t' - o_t). ``input_ids`` /
    ``attention_mask`` (N, T): the clean prompts ``clean`` was cached from (right-padded). Targets: heads,
    attention layers or MLPs (not a head and its own layer). One forward pass per (set, prompt) row.
    """
    targets = _nodes(clean, targets)
    source_sets = [_nodes(clean, S) for S in source_sets]
    attn_layers = sorted({t[1] for t in targets if t[0] in ("attn", "head")})
    mlp_layers = sorted({t[1] for t in targets if t[0] == "mlp"})
    if any(("attn", l) in targets and any(t[0] == "head" and t[1] == l for t in targets) for l in attn_layers):
        raise BadParameter("targets hold an attention layer and one of its heads: the head would count twice")
    if mlp_layers and anatomy.resolve(model, "layer[0].norm1").path == anatomy.resolve(model, "layer[0].norm2").path:
        raise BadParameter("MLP targets need sequential blocks (attention, then MLP); this model's blocks are parallel")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    last_all = last_positions(attention_mask)
    delta = {j: corr.node(j) - clean.node(j) for S in source_sets for j in S}          # (N, d) each
    base = sum((clean.node(t) for t in targets), torch.zeros_like(clean.resid))
    rows = [(s, i) for s in range(len(source_sets)) for i in range(clean.n)]
    run_device = next(model.parameters()).device
    got, out = {}, []

    def shift(order):  # (R, d) summed source terms that precede a node at ``order``, for the running rows
        return torch.stack([sum((delta[j][i] for j in source_sets[s] if _order(j) < order),
                                torch.zeros_like(clean.resid[0])) for s, i in got["rows"]])

    def at_last(t):  # (rows, last positions) on t's device (device_map="auto" spreads layers over GPUs)
        return got["at"].to(t.device), got["last"].to(t.device)

    def shifted(order):
        def fn(t):
            t = t.clone()
            t[at_last(t)] += shift(order).to(t)
            return t
        return fn

    def restored(term):  # record the recomputed term at T, give the clean one back so later layers stay clean
        def fn(t):
            got[term[:2]] = t[at_last(t)].float()
            t = t.clone()
            clean_term = clean.attn if term[0] == "attn" else clean.mlp
            t[at_last(t)] = clean_term[got["examples"], term[1]].to(t)
            return t
        return fn

    def heads_of(l):
        def fn(t):
            w = weight_of(_module(model, f"layer[{l}].attn.out")).float()
            got[("heads", l)] = head_contributions(t[at_last(t)].float(), w, clean.n_heads)
            return t
        return fn

    with torch.inference_mode(), ExitStack() as stack:
        for l in attn_layers:
            stack.enter_context(_editing(model, f"layer[{l}].norm1", shifted(2 * l), at="input"))
            stack.enter_context(_editing(model, f"layer[{l}].attn.heads", heads_of(l)))
            stack.enter_context(_editing(model, f"layer[{l}].attn.out", restored(("attn", l))))
        for l in mlp_layers:
            stack.enter_context(_editing(model, f"layer[{l}].norm2", shifted(2 * l + 1), at="input"))
            stack.enter_context(_editing(model, f"layer[{l}].mlp.out", restored(("mlp", l))))
        # nothing after the last target layer is read: stop the pass there (the unembedding over every position too)
        last_layer = _module(model, f"layer[{max(attn_layers + mlp_layers)}]")
        stack.callback(last_layer.register_forward_hook(_stop).remove)
        for k in range(0, len(rows), batch_size):
            got["rows"] = rows[k:k + batch_size]
            got["examples"] = torch.tensor([i for _, i in got["rows"]])
            got["at"] = torch.arange(len(got["rows"]), device=run_device)
            got["last"] = last_all[got["examples"]].to(run_device)
            try:
                model(input_ids=input_ids[got["examples"]].to(run_device),
                      attention_mask=attention_mask[got["examples"]].to(run_device))
            except _Stopped:
                pass
            new = sum(((got[("heads", t[1])][:, t[2]] if t[0] == "head" else got[t[:2]]).to(run_device)
                       for t in targets), torch.zeros_like(got["at"], dtype=torch.float32)[:, None])
            out.append(clean.resid[got["examples"]] + new.to(clean.resid) - base[got["examples"]])
    return torch.cat(out).view(len(source_sets), clean.n, -1)


class _Stopped(Exception):
    """Raised by ``_stop`` to end a forward pass once the layers that matter have run."""


def _stop(module, args, output):
    raise _Stopped


def _editing(model, name: str, fn, at: str = None):
    """``hooks.edit`` at a component's resolved site (or its ``at``)."""
    site = anatomy.resolve(model, name)
    return hooks.edit(model, site.path, fn, at=at or site.at)


def second_order_circuit(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, clean: NodeCache,
                         corr: NodeCache, answer_ids, targets, family, delta: float, max_k: int = None,
                         batch_size: int = 16) -> Circuit:
    """Greedy hierarchy-1 circuit: the nodes of ``family`` that precede some target, ranked by
    score({j}) = mean 1 - P(a) of ``second_order_resid``, then joined for k = 1..max_k (§11.7.1's
    "components with a high direct effect on the hierarchy-0 components")."""
    targets = _nodes(clean, targets)
    last_target = max(_order(t) for t in targets)
    nodes = [j for j in _nodes(clean, family) if _order(j) < last_target and j not in targets]
    score = lambda sets: 1 - answer_prob(model, second_order_resid(  # noqa: E731
        model, input_ids, attention_mask, clean, corr, targets, sets, batch_size), answer_ids).mean(1)
    single = score([[j] for j in nodes]) if nodes else torch.zeros(0)
    order = torch.argsort(single, descending=True, stable=True)
    ranked = [nodes[i] for i in order.tolist()]
    K = len(ranked) if max_k is None else max(0, min(max_k, len(ranked)))
    curve = score([ranked[:k] for k in range(1, K + 1)]) if K else torch.zeros(0)
    return Circuit(ranked, single[order], curve, delta, k_star(curve, delta, len(ranked)))


# ------------------------------------------------------------------ validation


def sufficiency(clean: NodeCache, corr: NodeCache, model, answer_ids, nodes) -> float:
    """mean P(a) when only ``nodes`` keep their clean direct terms, all others corrupted (2.4a)."""
    return answer_prob(model, patched_resid(corr, clean, nodes), answer_ids).mean().item()


def random_circuits(family_nodes, like, n_draws: int, rng=None) -> list:
    """``n_draws`` random node sets with the composition of ``like`` (as many of each kind).

    Each kind's nodes are drawn without replacement from the nodes of that kind in
    ``family_nodes``. ``rng``: seed or numpy Generator.
    """
    rng = np.random.default_rng(rng)
    pools = {}
    for j in map(tuple, family_nodes):
        pools.setdefault(j[0], []).append(j)
    counts = Counter(tuple(j)[0] for j in like)
    for kind, k in counts.items():
        if k > len(pools.get(kind, ())):
            raise BadParameter(f"cannot draw {k} {kind!r} nodes from {len(pools.get(kind, ()))} in family_nodes")
    return [[pools[kind][i] for kind, k in counts.items() for i in rng.choice(len(pools[kind]), k, replace=False)]
            for _ in range(n_draws)]


def _direct_term(model, node):
    """(component name, at or None for its own site, fn: its tensor -> the node's (B, T, d) term)."""
    kind = node[0]
    if kind == "embed":
        return "layer[0]", "input", lambda t: t
    if kind == "attn":
        return f"layer[{node[1]}].attn.out", None, lambda t: t
    if kind == "mlp":
        return f"layer[{node[1]}].mlp.out", None, lambda t: t
    w = weight_of(_module(model, f"layer[{node[1]}].attn.out"))
    dims = anatomy.head_slice(model, node[1], node[2]).dims
    return f"layer[{node[1]}].attn.heads", None, lambda t: t[..., dims] @ w[:, dims].T.to(t.dtype)


@contextmanager
def ablate_direct(model, nodes, means=None):
    """Remove the direct paths of ``nodes`` to the unembedding, at every position (2.4b).

    Inside the block, every forward pass caches o_j(t) of each node and the final norm reads
    r_t - sum_j (o_j(t) - m_j); the blocks themselves still see the unablated outputs.
    ``means``: None (zero ablation, m_j = 0), {node: tensor} or a sequence aligned with
    ``nodes``; each m_j broadcasts to (B, T, d) (a (d,) mean, or a full traced output).
    Works during ``generate`` with a KV cache (each step's new positions only).
    """
    n_layers, n_heads = anatomy.n_layers(model), anatomy.n_heads(model)
    nodes = [check_node(j, n_layers, n_heads) for j in nodes]
    if len(set(nodes)) != len(nodes):
        raise BadParameter("node list has duplicates; each node's direct path would be removed twice")
    if means is None:
        means = {}
    elif not isinstance(means, dict):
        means = list(means)
        if len(means) != len(nodes):
            raise BadParameter(f"means has {len(means)} entries for {len(nodes)} nodes")
        means = dict(zip(nodes, means))
    else:
        means = {tuple(k): v for k, v in means.items()}
    terms = {}

    def store(node, fn):
        def read(t):
            terms[node] = fn(t)
        return read

    def subtract(r):
        missing = [j for j in nodes if j not in terms]
        if missing:
            raise BadParameter(f"nodes {missing} did not run before the final norm")
        # terms sit on their layer's device (device_map="auto"): bring each to the final norm's
        delta = sum(terms[j].to(r.device) - torch.as_tensor(means.get(j, 0.0)).to(r.device, r.dtype)
                    for j in nodes)
        terms.clear()
        return r - delta

    with ExitStack() as stack:
        for j in nodes:
            name, at, fn = _direct_term(model, j)
            stack.enter_context(_reading(model, name, store(j, fn), at=at))
        if nodes:
            site = anatomy.resolve(model, "final_norm")
            stack.enter_context(hooks.edit(model, site.path, subtract, at="input"))
        yield


# ------------------------------------------------------------------ attention rows


def ablation_table(model, nodes, family_nodes, accuracy, datasets, n_random: int = 5, rng=None) -> list:
    """Fig 8.4's rows: ``accuracy(dataset)`` with the direct paths of ``nodes`` ablated, with each of
    ``n_random`` random same-size sets of ``family_nodes`` ablated (their mean), and of the model as is."""
    rows = []
    for name in datasets:
        with ablate_direct(model, nodes):
            circuit = accuracy(name)
        rand = []
        for r in random_circuits(family_nodes, nodes, n_random, rng):
            with ablate_direct(model, r):
                rand.append(accuracy(name))
        rows.append({"dataset": name, "original": accuracy(name), "circuit ablated": circuit,
                     "random ablated": float(np.mean(rand))})
    return rows


@torch.no_grad()
def answer_rate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: torch.Tensor, target,
                upweight=None, ablate=(), beta: float = 10.0, context: torch.Tensor = None,
                batch_size: int = None) -> float:
    """Share of prompts whose greedy token at ``last`` (N,) is ``target`` (an id or (N,) ids) while the direct
    paths of ``ablate`` are removed (``ablate_direct``) and, with ``upweight``, attention is up-weighted by
    ``beta`` (``attention.attention_plan`` over ``context`` keys (N, T), from the query at ``last``): §8.3.3's
    switching from the memory circuit to the context circuit. input_ids / attention_mask: (N, T), right-padded;
    ``batch_size`` None runs them as one batch."""
    from .attention import attention_plan
    dev = next(model.parameters()).device
    target = torch.as_tensor(target).expand(len(last))
    step = batch_size or len(last)
    hits = []
    for at in range(0, len(last), step):
        sl = slice(at, at + step)
        inputs = dict(input_ids=input_ids[sl].to(dev), attention_mask=attention_mask[sl].to(dev))
        with ablate_direct(model, list(ablate)):
            if upweight is None:
                logits = model(**inputs).logits
            else:
                with attention_plan(model, upweight=upweight, beta=beta, context=context[sl].to(dev),
                                    queries=last[sl].to(dev)):
                    logits = model(**inputs).logits
        pred = logits[torch.arange(len(logits), device=logits.device), last[sl].to(logits.device)].argmax(-1).cpu()
        hits.append(pred == target[sl])
    return float(torch.cat(hits).float().mean())


def context_entropy(attn_rows: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of attention restricted to context keys and renormalised: (..., T_k) -> (...).

    attn_rows: post-softmax rows; ctx_mask: bool, broadcastable to attn_rows. Restricting
    matters: the BOS / sink token would otherwise dominate every head. NaN where a row puts no
    mass on the context.
    """
    p = attn_rows.float() * ctx_mask
    mass = p.sum(-1, keepdim=True)
    p = p / mass
    return torch.where(mass[..., 0] > 0, -torch.xlogy(p, p).sum(-1), torch.nan)


def context_argmax(attn_rows: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
    """(...,) key index of the largest attention among context keys; rows (..., T_k)."""
    return attn_rows.float().masked_fill(~ctx_mask.bool(), -torch.inf).argmax(-1)


def attribution_hits(attn_rows: torch.Tensor, ctx_mask: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
    """(...,) bool: the context arg-max key lies in the gold span (gold_mask (..., T_k) bool).

    ``attribution_hits(...).float().mean()`` is a head's attribution accuracy.
    """
    top = context_argmax(attn_rows, ctx_mask)
    return gold_mask.bool().expand(attn_rows.shape).gather(-1, top[..., None])[..., 0]
