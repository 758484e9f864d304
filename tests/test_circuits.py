"""interplab.circuits and interplab.attention on random tiny Llama / Phi-3 (spec ch08 §6 checks 1-3)."""
import math
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

from interplab import anatomy, attention, circuits, hooks
from interplab.errors import BadParameter
from interplab.models import tiny_random

FAMILIES = ["llama", "phi3"]


def _model(name):
    """A tiny random model whose next-token distribution is peaked (scaled unembedding), so that
    probabilities and scores are far from uniform and comparisons are sharp."""
    model = getattr(tiny_random, name)()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return _model(request.param)


def _batch(seed, lengths, T=None):
    """Right-padded (N, T) ids and mask with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    ids = torch.randint(3, 60, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def pair(model):
    """Clean and corrupted prompts of different lengths, their caches and the clean answers."""
    clean_ids, clean_mask = _batch(0, [7, 5, 6, 7])
    corr_ids, corr_mask = _batch(1, [6, 7, 4, 5], T=8)
    clean = circuits.cache_last(model, clean_ids, clean_mask, batch_size=3)
    corr = circuits.cache_last(model, corr_ids, corr_mask, batch_size=3)
    with torch.no_grad():
        logits = model(input_ids=clean_ids, attention_mask=clean_mask).logits
    last = clean_mask.sum(1) - 1
    answers = logits[torch.arange(4), last].argmax(-1)
    return dict(clean=clean, corr=corr, answers=answers, clean_ids=clean_ids, clean_mask=clean_mask,
                corr_ids=corr_ids, corr_mask=corr_mask, logits=logits[torch.arange(4), last])


def _all_nodes(cache, heads=False):
    return [("embed",)] + cache.nodes("head" if heads else "attn") + cache.nodes("mlp")


# ------------------------------------------------------------------ check 1: head terms


@torch.no_grad()
def test_head_contributions_sum_to_o_proj_output(model):
    ids, _ = _batch(2, [6, 6])
    n_layers = anatomy.n_layers(model)
    sites = [anatomy.resolve(model, f"layer[{l}].attn.out").path for l in range(n_layers)]
    with hooks.trace(model, sites, at="input") as x, hooks.trace(model, sites) as out:
        model(ids)
    for path in sites:
        o_proj = hooks.get_module(model, path)
        c = circuits.head_contributions(x[path], o_proj.weight, anatomy.n_heads(model))
        assert c.shape == (2, 6, anatomy.n_heads(model), out[path].shape[-1])
        assert torch.allclose(c.sum(-2), out[path], atol=1e-4)
        # head h is exactly the slice anatomy.head_slice names
        site = anatomy.head_slice(model, 0, 1)
        assert torch.allclose(c[..., 1, :], x[path][..., site.dims] @ o_proj.weight[:, site.dims].T, atol=1e-6)


def test_cache_is_a_decomposition_of_the_last_residual(model, pair):
    clean = pair["clean"]
    assert clean.heads.shape == (4, 2, 4, 32) and clean.resid.shape == (4, 32)
    assert torch.allclose(clean.heads.sum(2), clean.attn, atol=1e-4)
    assert torch.allclose(clean.embed + clean.attn.sum(1) + clean.mlp.sum(1), clean.resid, atol=1e-4)
    # the cached residual gives the model's own next-token distribution at each row's last token
    p = circuits.answer_prob(model, clean.resid, pair["answers"])
    assert torch.allclose(p, pair["logits"].softmax(-1)[torch.arange(4), pair["answers"]], atol=1e-6)
    assert p.min() > 0.1  # peaked, so the checks below compare non-trivial probabilities
    # gathering the last real token of a padded row equals running that prompt alone
    ids = pair["clean_ids"]
    alone = circuits.cache_last(model, ids[1:2, :5])
    assert torch.allclose(alone.heads[0], clean.heads[1], atol=1e-5)


# ------------------------------------------------------------------ check 2: closed form


@pytest.mark.parametrize("heads", [False, True])
def test_patching_every_node_gives_the_corrupted_residual(model, pair, heads):
    clean, corr, a = pair["clean"], pair["corr"], pair["answers"]
    nodes = _all_nodes(clean, heads)
    assert torch.allclose(circuits.patched_resid(clean, corr, nodes), corr.resid, atol=1e-4)
    p_corr = circuits.answer_prob(model, corr.resid, a)
    assert circuits.patch_score(clean, corr, model, a, nodes) == pytest.approx(1 - p_corr.mean().item(), abs=1e-5)
    assert circuits.patch_score(clean, corr, model, a, []) == pytest.approx(
        1 - circuits.answer_prob(model, clean.resid, a).mean().item(), abs=1e-6)


def _carrier(node):
    """The anatomy name of the module output that carries a node's change."""
    return f"layer[{node[1]}].{'mlp' if node[0] == 'mlp' else 'attn'}.out"


@torch.no_grad()
def _brute_force(model, pair, node):
    """Hooked clean re-run: the node takes its corrupted value at the last position, and every
    other attention / MLP output at the last position is pinned to its clean value."""
    ids, mask = pair["clean_ids"], pair["clean_mask"]
    last = (mask.sum(1) - 1)[:, None]                                       # (N, 1) positions
    corr, clean = pair["corr"], pair["clean"]
    with ExitStack() as stack:
        if node[0] == "head":
            site = anatomy.head_slice(model, node[1], node[2])
            # the corrupted head input z (not only its o_proj term) at the corrupted last position
            with hooks.trace(model, site.path, at="input") as z:
                model(input_ids=pair["corr_ids"], attention_mask=pair["corr_mask"])
            c_last = pair["corr_mask"].sum(1) - 1
            z_corr = z[site.path][torch.arange(4), c_last][:, None, site.dims]

            def put(old, z_corr=z_corr, dims=site.dims):
                new = old.clone()
                new[..., dims] = z_corr
                return new
            stack.enter_context(hooks.replace(model, {site.path: put}, at="input", positions=last))
        else:
            path = anatomy.resolve(model, _carrier(node)).path
            value = corr.node(node)[:, None]
            stack.enter_context(hooks.replace(model, {path: value}, positions=last))
        for l in range(anatomy.n_layers(model)):
            for kind in ("attn", "mlp"):
                other = (kind, l)
                if _carrier(other) == _carrier(node):
                    continue
                path = anatomy.resolve(model, _carrier(other)).path
                stack.enter_context(hooks.replace(model, {path: clean.node(other)[:, None]}, positions=last))
        norm = anatomy.resolve(model, "final_norm").path
        r = stack.enter_context(hooks.trace(model, norm, at="input"))
        logits = model(input_ids=ids, attention_mask=mask).logits
    rows = torch.arange(4)
    return r[norm][rows, last[:, 0]], logits[rows, last[:, 0]].softmax(-1)[rows, pair["answers"]]


def test_closed_form_score_equals_brute_force_rerun(model, pair):
    clean, corr, a = pair["clean"], pair["corr"], pair["answers"]
    g = torch.Generator().manual_seed(3)
    nodes = [family[int(torch.randint(len(family), (1,), generator=g))]
             for family in (clean.nodes("attn"), clean.nodes("head"), clean.nodes("mlp"))]
    scores = circuits.single_node_scores(clean, corr, model, a, nodes)
    for node, score in zip(nodes, scores):
        r, p = _brute_force(model, pair, node)
        assert torch.allclose(r, circuits.patched_resid(clean, corr, [node]), atol=1e-4), node
        assert not torch.allclose(r, clean.resid, atol=1e-3)  # the patch does move the residual
        assert score.item() == pytest.approx(1 - p.mean().item(), abs=1e-4), node
    # the batched family scores are the one-node patch_scores
    heads = circuits.single_node_scores(clean, corr, model, a, "head")
    assert heads.shape == (8,)
    assert heads[5].item() == pytest.approx(circuits.patch_score(clean, corr, model, a, [("head", 1, 1)]), abs=1e-6)


# ------------------------------------------------------------------ greedy, sufficiency


def test_k_star_rule():
    assert circuits.k_star(torch.tensor([0.1, 0.5, 0.96, 0.97]), 0.95, 4) == 3
    assert circuits.k_star(torch.tensor([0.96, 0.2]), 0.95, 2) == 1
    assert circuits.k_star(torch.tensor([0.1, 0.94]), 0.95, 10) == 11  # not reached: family size + 1
    assert circuits.k_star(torch.tensor([]), 0.5, 3) == 4


def test_greedy_circuit_on_a_constructed_case(model, pair):
    clean, a = pair["clean"], pair["answers"]
    # corrupted run = clean, except that MLP 1 pushes the residual against each row's answer
    corr = clean[:]
    corr.mlp = clean.mlp.clone()
    corr.mlp[:, 1] -= 50 * model.lm_head.weight[a].detach()
    circ = circuits.greedy_circuit(clean, corr, model, a, "mlp", delta=0.9)
    assert circ.ranked == [("mlp", 1), ("mlp", 0)]
    assert circ.single[0] > 0.99 and circ.k_star == 1 and circ.reached and circ.nodes == [("mlp", 1)]
    assert circ.curve[0] == pytest.approx(circ.single[0].item())
    never = circuits.greedy_circuit(clean, corr, model, a, "mlp", delta=1.01)
    assert never.k_star == 3 and not never.reached and never.nodes == never.ranked


def test_greedy_circuit_curve_is_the_joint_patch_of_the_ranking(model, pair):
    clean, corr, a = pair["clean"], pair["corr"], pair["answers"]
    circ = circuits.greedy_circuit(clean, corr, model, a, "head", delta=0.5)
    assert len(circ.ranked) == len(circ.curve) == 8 and sorted(circ.ranked) == sorted(clean.nodes("head"))
    assert torch.all(circ.single[:-1] >= circ.single[1:])
    for k in (1, 4, 8):
        assert circ.curve[k - 1].item() == pytest.approx(
            circuits.patch_score(clean, corr, model, a, circ.ranked[:k]), abs=1e-5)
    assert circ.k_star == circuits.k_star(circ.curve, 0.5, 8)
    short = circuits.greedy_circuit(clean, corr, model, a, "head", delta=0.5, max_k=3)
    assert torch.allclose(short.curve, circ.curve[:3]) and short.ranked == circ.ranked


def test_sufficiency_and_random_circuits(model, pair):
    clean, corr, a = pair["clean"], pair["corr"], pair["answers"]
    p_clean = circuits.answer_prob(model, clean.resid, a).mean().item()
    assert circuits.sufficiency(clean, corr, model, a, _all_nodes(clean)) == pytest.approx(p_clean, abs=1e-5)
    assert circuits.sufficiency(clean, corr, model, a, []) == pytest.approx(
        circuits.answer_prob(model, corr.resid, a).mean().item(), abs=1e-6)
    family = clean.nodes("head") + clean.nodes("mlp")
    like = [("head", 0, 1), ("head", 1, 2), ("mlp", 1)]
    draws = circuits.random_circuits(family, like, 5, rng=0)
    assert draws == circuits.random_circuits(family, like, 5, rng=0)
    for d in draws:
        assert [j[0] for j in d] == ["head", "head", "mlp"] and len(set(d)) == 3 and set(d) <= set(family)
    with pytest.raises(BadParameter, match="cannot draw 3 'mlp' nodes from 2"):
        circuits.random_circuits(family, [("mlp", 0)] * 3, 1)


# ------------------------------------------------------------------ direct-path ablation


@torch.no_grad()
def test_ablate_direct(model):
    ids, _ = _batch(4, [7, 7])
    nodes = [("attn", 0), ("head", 1, 2), ("mlp", 1)]
    attn0, mlp1 = (anatomy.resolve(model, _carrier(j)).path for j in (("attn", 0), ("mlp", 1)))
    o_proj = anatomy.resolve(model, "layer[1].attn.out").path
    norm, block = anatomy.resolve(model, "final_norm").path, anatomy.resolve(model, "layer[1]").path
    with hooks.trace(model, [attn0, mlp1]) as out, hooks.trace(model, [o_proj, norm, block], at="input") as x:
        logits = model(ids).logits
    dims, w = anatomy.head_slice(model, 1, 2).dims, hooks.get_module(model, o_proj).weight
    terms = [out[attn0], x[o_proj][..., dims] @ w[:, dims].T, out[mlp1]]      # o_j(t), (B, T, d)
    with circuits.ablate_direct(model, nodes, means=terms):                    # m_j = o_j: no change
        assert torch.allclose(model(ids).logits, logits, atol=1e-6)
    with circuits.ablate_direct(model, nodes), hooks.trace(model, block, at="input") as inside:
        ablated = model(ids).logits
    manual = model.lm_head(hooks.get_module(model, norm)(x[norm] - sum(terms)))
    assert torch.allclose(ablated, manual, atol=1e-5) and not torch.allclose(ablated, logits, atol=1e-3)
    assert torch.equal(inside[block], x[block])  # later blocks still read the unablated stream
    means = {j: t.mean((0, 1)) for j, t in zip(nodes, terms)}                  # mean ablation, (d,)
    with circuits.ablate_direct(model, nodes, means=means):
        mean_ablated = model(ids).logits
    shifted = x[norm] - sum(t - means[j] for j, t in zip(nodes, terms))
    assert torch.allclose(mean_ablated, model.lm_head(hooks.get_module(model, norm)(shifted)), atol=1e-5)
    # with a KV cache each step ablates its own new positions
    with circuits.ablate_direct(model, nodes):
        past = model(ids[:, :5], use_cache=True).past_key_values
        step = model(ids[:, 5:], past_key_values=past).logits
    assert torch.allclose(step, ablated[:, 5:], atol=1e-5)


def test_ablation_table_scores_the_circuit_random_sets_and_the_model(model, pair):
    """Each row: the metric under the circuit's ablation, the mean over random same-size ablations, and as is."""
    ids = pair["clean_ids"]
    with torch.no_grad():
        base = model(ids).logits

    def change(name):  # how far the logits moved: 0 exactly when nothing is ablated
        with torch.no_grad():
            return float((model(ids).logits - base).abs().max())

    heads = pair["clean"].nodes("head")
    rows = circuits.ablation_table(model, heads[:2], heads, change, ["a", "b"], n_random=3,
                                   rng=np.random.default_rng(0))
    assert [r["dataset"] for r in rows] == ["a", "b"] and all(r["original"] == 0.0 for r in rows)
    with circuits.ablate_direct(model, heads[:2]):
        assert rows[0]["circuit ablated"] == change("a") > 0
    randoms = circuits.random_circuits(heads, heads[:2], 3, np.random.default_rng(0))
    expected = []
    for r in randoms:
        with circuits.ablate_direct(model, r):
            expected.append(change("a"))
    assert rows[0]["random ablated"] == pytest.approx(np.mean(expected))


# ------------------------------------------------------------------ attention plan


@torch.no_grad()
def test_planned_attention_with_beta_1_is_eager_exactly(model):
    ids, mask = _batch(5, [7, 5, 6])
    eager = model(input_ids=ids, attention_mask=mask).logits
    with attention.attention_plan(model, capture=[(0, 1), (1, 3)], upweight=[0, 1], beta=1.0) as plan:
        assert model.config._attn_implementation == attention.NAME
        planned = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(planned, eager)
    assert model.config._attn_implementation == "eager" and plan[1, 3].shape == (3, 7, 7)
    with pytest.raises(RuntimeError), attention.attention_plan(model, capture=[(0, 0)]):
        raise RuntimeError("body fails")
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, attention._SLOT) for m in model.modules())


@torch.no_grad()
def test_mask_function_is_required_for_causal_masking(model):
    ids, _ = _batch(6, [6, 6])
    future = ids.clone()
    future[:, -1] = (future[:, -1] + 1) % 60 + 3  # change only the last token
    eager = model(ids).logits
    with attention.attention_plan(model, capture=[(0, 0)]):
        assert torch.equal(model(ids).logits, eager)
        assert torch.equal(model(future).logits[:, :-1], eager[:, :-1])  # causal: no look-ahead
    attention.register("interplab_nomask", mask=False)
    try:
        with attention.attention_plan(model, capture=[(0, 0)], implementation="interplab_nomask") as plan:
            leaky = model(ids).logits
        # transformers 5.x hands an unregistered implementation attention_mask=None: every
        # position then attends to the future, and only the last row is unaffected
        assert not torch.allclose(leaky[:, :-1], eager[:, :-1], atol=1e-3)
        assert (plan[0, 0].triu(1) > 0).any()
    finally:
        del AttentionInterface._global_mapping["interplab_nomask"]


@torch.no_grad()
def test_upweighting_the_argmax_context_key(model):
    ids, _ = _batch(7, [7, 7])
    context = torch.zeros(2, 7, dtype=torch.bool)
    context[:, 1:5] = True
    heads = [(0, h) for h in range(4)]
    with attention.attention_plan(model, capture=heads) as base:
        model(ids)
    beta = 10.0
    with attention.attention_plan(model, capture=heads, upweight=[0], beta=beta, context=context,
                                  queries=6) as plan:
        model(ids)
    top = plan.targets[0][-1]                                                   # (B, H, T_q)
    for _, h in heads:
        w0, w1 = base[0, h], plan[0, h]
        assert torch.allclose(w1.sum(-1), torch.ones(2, 7), atol=1e-5)
        assert torch.equal(w1[:, :6], w0[:, :6])                                # other queries untouched
        k = top[:, h, 6]
        assert torch.equal(k, w0[:, 6, 1:5].argmax(-1) + 1)                     # arg-max inside context
        old, new = w0[torch.arange(2), 6, k], w1[torch.arange(2), 6, k]
        assert torch.all(new > old)
        # adding log(beta) to one score = multiplying its weight by beta, then renormalising
        assert torch.allclose(new, beta * old / (1 - old + beta * old), atol=1e-5)


@torch.no_grad()
def test_upweighting_a_given_key(model):
    ids, _ = _batch(8, [6, 6])
    keys = torch.zeros(2, 6, dtype=torch.bool)
    keys[:, 2] = True
    with attention.attention_plan(model, capture=[(1, 0)]) as base:
        model(ids)
    with attention.attention_plan(model, capture=[(1, 0)], upweight={1: keys}, beta=4.0) as plan:
        model(ids)
    w0, w1 = base[1, 0], plan[1, 0]
    assert torch.all(w1[:, 2:, 2] > w0[:, 2:, 2]) and torch.equal(w1[:, :2], w0[:, :2])
    assert torch.allclose(w1.sum(-1), torch.ones(2, 6), atol=1e-5)


@torch.no_grad()
def test_captured_weights_equal_eager_output_attentions(model):
    ids, mask = _batch(9, [6, 4])
    eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    chosen = [(0, 3), (1, 0), (1, 2)]
    with attention.attention_plan(model, capture=chosen) as plan:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(plan.captured) == sorted(chosen)
    for l, h in chosen:
        assert torch.allclose(plan[l, h], eager[l][:, h], atol=1e-7)


# ------------------------------------------------------------------ attention rows, errors


def test_context_entropy_and_attribution():
    rows = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1],     # sink on 0, uniform over the context
                         [0.5, 0.0, 0.5, 0.0, 0.0],     # all context mass on one key
                         [1.0, 0.0, 0.0, 0.0, 0.0]])    # no context mass
    ctx = torch.tensor([False, True, True, True, True])
    h = circuits.context_entropy(rows, ctx)
    assert h[0].item() == pytest.approx(math.log(4)) and h[1].item() == 0 and torch.isnan(h[2])
    assert circuits.context_argmax(rows[:2], ctx).tolist() == [1, 2]
    gold = torch.tensor([[False, False, True, False, False]])
    assert circuits.attribution_hits(rows[:2], ctx, gold).tolist() == [False, True]


def test_bad_input_names_the_fix(model, pair):
    clean, corr, a = pair["clean"], pair["corr"], pair["answers"]
    with pytest.raises(BadParameter, match=r"head 4 is out of range 0..3"):
        circuits.patch_score(clean, corr, model, a, [("head", 0, 4)])
    with pytest.raises(BadParameter, match="bad node"):
        circuits.patch_score(clean, corr, model, a, [("neuron", 0)])
    with pytest.raises(BadParameter, match="duplicates"):
        circuits.patch_score(clean, corr, model, a, [("mlp", 0), ("mlp", 0)])
    with pytest.raises(BadParameter, match="family='heads' is not valid"):
        circuits.single_node_scores(clean, corr, model, a, "heads")
    with pytest.raises(BadParameter, match="right-padded"):
        circuits.cache_last(model, torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(BadParameter, match="answer_ids must be"):
        circuits.answer_prob(model, clean.resid, a[:2])
    with pytest.raises(BadParameter, match="head 9 is out of range"):
        with attention.attention_plan(model, capture=[(0, 9)]):
            pass
    with pytest.raises(BadParameter, match="beta must be > 0"):
        with attention.attention_plan(model, upweight=[0], beta=0):
            pass
    assert model.config._attn_implementation == "eager"


def test_answer_rate_in_chunks_equals_one_batch_and_reads_the_interventions(model, pair):
    ids, mask = pair["clean_ids"], pair["clean_mask"]
    last = mask.sum(1) - 1
    answers = pair["answers"]
    assert circuits.answer_rate(model, ids, mask, last, answers) == 1.0          # the greedy answers themselves
    heads = pair["clean"].nodes("head")[:3]
    one = circuits.answer_rate(model, ids, mask, last, answers, ablate=heads)
    assert circuits.answer_rate(model, ids, mask, last, answers, ablate=heads, batch_size=3) == one
    with circuits.ablate_direct(model, heads), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert one == float((logits[torch.arange(len(last)), last].argmax(-1) == answers).float().mean())
    ctx = mask.bool()
    up = circuits.answer_rate(model, ids, mask, last, answers, upweight=[0], beta=1.0, context=ctx, batch_size=2)
    assert up == 1.0  # beta = 1 changes nothing


# ------------------------------------------------------------------ hierarchy 1 (§11.7.1)


@torch.no_grad()
def _target_after_source(model, pair, source, target):
    """Brute force: the clean run with ``source``'s output at the last position corrupted; a target MLP
    also gets its own layer's attention pinned clean there, so that only the source moves its input.
    Returns the target's term at the last position (N, d)."""
    last = (pair["clean_mask"].sum(1) - 1)[:, None]
    with ExitStack() as stack:
        path = anatomy.resolve(model, _carrier(source)).path
        stack.enter_context(hooks.replace(model, {path: pair["corr"].node(source)[:, None]}, positions=last))
        if target[0] == "mlp":
            attn = anatomy.resolve(model, f"layer[{target[1]}].attn.out").path
            stack.enter_context(hooks.replace(model, {attn: pair["clean"].node(("attn", target[1]))[:, None]},
                                              positions=last))
        out = anatomy.resolve(model, _carrier(target)).path
        seen = stack.enter_context(hooks.trace(model, out))
        model(input_ids=pair["clean_ids"], attention_mask=pair["clean_mask"])
    return seen[out][torch.arange(4), last[:, 0]]


def test_second_order_recomputes_each_target_from_its_shifted_input_and_nothing_else(model, pair):
    clean, corr, ids, mask = pair["clean"], pair["corr"], pair["clean_ids"], pair["clean_mask"]
    source = ("mlp", 0)
    r = circuits.second_order_resid(model, ids, mask, clean, corr, [("attn", 1), ("mlp", 1)],
                                    [[source], [], [("mlp", 1)]], batch_size=5)
    assert r.shape == (3, 4, clean.resid.shape[-1])
    expected = clean.resid + sum(_target_after_source(model, pair, source, t) - clean.node(t) for t in [("attn", 1), ("mlp", 1)])
    assert torch.allclose(r[0], expected, atol=1e-6)   # changes are ~3e-4
    moved = (r[0] - clean.resid).norm(dim=-1) / clean.resid.norm(dim=-1)
    assert (moved > 1e-3).all()                                      # the source does reach the targets
    assert torch.allclose(r[1], clean.resid, atol=1e-6)               # no sources: the clean residual
    assert torch.allclose(r[2], clean.resid, atol=1e-6)               # a source after its targets: nothing
    # every head of a layer as targets = the layer as one target
    heads = [("head", 1, h) for h in range(clean.n_heads)]
    by_heads = circuits.second_order_resid(model, ids, mask, clean, corr, heads, [[source, ("attn", 0)]])
    by_layer = circuits.second_order_resid(model, ids, mask, clean, corr, [("attn", 1)], [[source, ("attn", 0)]])
    assert torch.allclose(by_heads, by_layer, atol=1e-6)
    with pytest.raises(BadParameter, match="count twice"):
        circuits.second_order_resid(model, ids, mask, clean, corr, [("attn", 1), ("head", 1, 0)], [[source]])


def test_second_order_circuit_ranks_preceding_nodes_and_joins_them(model, pair):
    clean, corr, a = pair["clean"], pair["corr"], pair["answers"]
    targets = [("head", 1, 0), ("head", 1, 1)]
    circ = circuits.second_order_circuit(model, pair["clean_ids"], pair["clean_mask"], clean, corr, a, targets,
                                         "head", delta=0.5)
    assert sorted(circ.ranked) == [("head", 0, h) for h in range(clean.n_heads)]   # only heads before layer 1
    assert (circ.single[:-1] >= circ.single[1:]).all() and len(circ.curve) == clean.n_heads
    top2 = circuits.second_order_resid(model, pair["clean_ids"], pair["clean_mask"], clean, corr, targets,
                                       [circ.ranked[:2]])[0]
    assert circ.curve[1].item() == pytest.approx(1 - circuits.answer_prob(model, top2, a).mean().item(), abs=1e-6)


@torch.no_grad()
def test_second_order_stops_after_its_last_target_layer_and_still_matches_a_rerun(model, pair):
    clean, corr, ids, mask = pair["clean"], pair["corr"], pair["clean_ids"], pair["clean_mask"]
    last = (mask.sum(1) - 1)[:, None]
    attn0 = anatomy.resolve(model, "layer[0].attn.out").path
    mlp0 = anatomy.resolve(model, "layer[0].mlp.out").path
    with hooks.replace(model, {attn0: corr.node(("attn", 0))[:, None]}, positions=last), hooks.trace(model, mlp0) as seen:
        model(input_ids=ids, attention_mask=mask)
    expected = clean.resid + seen[mlp0][torch.arange(4), last[:, 0]] - clean.node(("mlp", 0))
    calls = []
    lm_head = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = circuits.second_order_resid(model, ids, mask, clean, corr, [("mlp", 0)], [[("attn", 0)]])[0]
    finally:
        lm_head.remove()
    assert torch.allclose(r, expected, atol=1e-6) and not calls     # layer 1 and the unembedding never ran


def test_second_order_refuses_mlp_targets_in_parallel_blocks():
    from transformers import PhiConfig, PhiForCausalLM
    torch.manual_seed(0)
    phi2 = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=32)).eval()  # attention and MLP read one norm
    ids, mask = _batch(0, [5, 6])
    clean = circuits.cache_last(phi2, ids, mask)
    with pytest.raises(BadParameter, match="parallel"):
        circuits.second_order_resid(phi2, ids, mask, clean, clean, [("mlp", 1)], [[("mlp", 0)]])
    r = circuits.second_order_resid(phi2, ids, mask, clean, clean, [("attn", 1)], [[("mlp", 0)]])
    assert torch.allclose(r[0], clean.resid, atol=1e-6)     # corrupted = clean: nothing moves
