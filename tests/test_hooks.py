"""interplab.hooks on unmodified transformers, diffusers, timm and open_clip models.

Every check compares against something computed without interplab: a raw
``register_forward_hook``, the clean forward pass bit for bit, or a closed form.
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interplab import anatomy, hooks
from interplab.errors import BadParameter
from interplab.models import tiny_random

B = 3  # batch size of every case


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@dataclass
class Case:
    build: Callable
    inputs: Callable    # seed -> inputs
    run: Callable       # (model, inputs) -> (B, ...) tensor, one row per example
    block: str          # a block whose output is a (tuple of) hidden states (B, T, d)
    linear: str         # an nn.Linear inside the model


def _ids(seed, vocab=tiny_random.VOCAB, length=8):
    return torch.randint(3, vocab, (B, length), generator=_gen(seed))


def _image(seed):
    return torch.randn(B, 3, 32, 32, generator=_gen(seed))


def _clip_rows(model, x):
    out = model(input_ids=x[0], pixel_values=x[1])
    return torch.cat([out.image_embeds, out.text_embeds], 1)


CASES = {
    "gpt2": Case(tiny_random.gpt2, _ids, lambda m, x: m(x).logits,
                 "transformer.h.0", "lm_head"),
    "llama": Case(tiny_random.llama, _ids, lambda m, x: m(x).logits,
                  "model.layers[0]", "model.layers.1.mlp.down_proj"),
    "clip": Case(tiny_random.clip, lambda s: (_ids(s), _image(s)), _clip_rows,
                 "vision_model.encoder.layers.0", "text_model.encoder.layers.1.mlp.fc2"),
    "unet": Case(tiny_random.unet,
                 lambda s: (torch.randn(B, 4, 16, 16, generator=_gen(s)),
                            torch.randn(B, 8, 32, generator=_gen(s + 100))),
                 lambda m, x: m(x[0], 10, encoder_hidden_states=x[1]).sample,
                 "down_blocks.0.attentions.0",
                 "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    "timm_vit": Case(tiny_random.timm_vit, _image, lambda m, x: m(x), "blocks.0", "blocks.1.attn.proj"),
    "open_clip": Case(tiny_random.open_clip, lambda s: (_image(s), _ids(s, length=16)),
                      lambda m, x: torch.cat([m.encode_image(x[0]), m.encode_text(x[1])], 1),
                      "visual.transformer.resblocks.0", "transformer.resblocks.1.mlp.c_fc"),
}


@pytest.fixture(scope="module")
def models():
    return {name: case.build() for name, case in CASES.items()}


@pytest.fixture(params=list(CASES))
def case(request, models):
    """(name, Case, model, clean inputs, clean output)."""
    c = CASES[request.param]
    model, x = models[request.param], c.inputs(0)
    with torch.no_grad():
        clean = c.run(model, x)
    return request.param, c, model, x, clean


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
                    or m._forward_pre_hooks_with_kwargs) for m in model.modules())


def _first(x):
    return x if torch.is_tensor(x) else next(v for v in x if torch.is_tensor(v))


# ------------------------------------------------------------------------- reading


@torch.no_grad()
def test_trace_matches_a_raw_forward_hook(case):
    name, c, model, x, clean = case
    raw = {}
    handles = [hooks.get_module(model, c.block).register_forward_hook(
                   lambda m, a, o: raw.__setitem__("block", _first(o).clone())),
               hooks.get_module(model, c.linear).register_forward_pre_hook(
                   lambda m, a: raw.__setitem__("linear_in", a[0].clone()))]
    try:
        with hooks.trace(model, [c.block]) as out, hooks.trace(model, c.linear, at="input") as inp:
            c.run(model, x)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out[c.block], raw["block"])
    assert torch.equal(inp[c.linear], raw["linear_in"])
    assert _no_hooks(model)


@torch.no_grad()
def test_replacing_a_block_with_its_own_value_is_bit_identical(case):
    name, c, model, x, clean = case
    with hooks.trace(model, c.block) as t:
        c.run(model, x)
    with hooks.replace(model, {c.block: t[c.block]}):
        assert torch.equal(c.run(model, x), clean)
    with hooks.add(model, {c.block: 0.0}):
        assert torch.equal(c.run(model, x), clean)
    with hooks.edit(model, c.block, lambda h: h):
        assert torch.equal(c.run(model, x), clean)
    # not a constant shift: the next LayerNorm would remove it (open_clip's output is unchanged)
    noise = torch.randn(t[c.block].shape, generator=_gen(2))
    with hooks.replace(model, {c.block: t[c.block] + noise}):
        assert not torch.allclose(c.run(model, x), clean)
    assert _no_hooks(model)


@torch.no_grad()
def test_replacing_a_linear_input_gives_w_x_plus_b(case):
    name, c, model, x, clean = case
    lin = hooks.get_module(model, c.linear)
    assert isinstance(lin, nn.Linear)
    with hooks.trace(model, c.linear, at="input") as t:
        c.run(model, x)
    x_new = torch.randn(t[c.linear].shape, generator=_gen(7))
    with hooks.replace(model, {c.linear: x_new}, at="input"), hooks.trace(model, c.linear) as out:
        c.run(model, x)
    assert torch.allclose(out[c.linear], F.linear(x_new, lin.weight, lin.bias), atol=1e-5)


@torch.no_grad()
def test_batched_patch_changes_only_the_targeted_row(case):
    name, c, model, x, clean = case
    with hooks.trace(model, c.block) as other:  # activations of a different input
        c.run(model, c.inputs(1))
    with hooks.replace(model, {c.block: other[c.block][1:2]}, batch=[1]):
        patched = c.run(model, x)
    assert torch.equal(patched[0], clean[0]) and torch.equal(patched[2], clean[2])
    assert not torch.allclose(patched[1], clean[1])


def test_trace_keeps_the_graph_when_asked(models):
    model, x = models["gpt2"], CASES["gpt2"].inputs(0)
    with hooks.trace(model, "transformer.h.1", detach=False) as t:
        logits = model(x).logits
    h = t["transformer.h.1"]
    assert h.requires_grad
    (grad,) = torch.autograd.grad(logits[:, -1].sum(), h)
    assert grad.abs().sum() > 0 and grad[:, -1].abs().sum() > 0


# ------------------------------------------------------------ batch and positions


@torch.no_grad()
def test_per_row_positions_patch_exactly_the_region(models):
    """Row 0 patched at token 2, row 2 at token 5; row 1 and earlier tokens stay bit-identical."""
    model, x = models["gpt2"], CASES["gpt2"].inputs(0)
    path = "transformer.h.0"
    with hooks.trace(model, path) as t:
        clean = model(x).logits
    d = t[path].shape[-1]
    value = torch.randn(2, 1, d, generator=_gen(3))
    positions = torch.tensor([[2], [5]])
    with hooks.replace(model, {path: value}, batch=[0, 2], positions=positions), \
            hooks.trace(model, path) as seen:
        logits = model(x).logits
    expected = t[path].clone()
    expected[0, 2], expected[2, 5] = value[0, 0], value[1, 0]
    assert torch.equal(seen[path], expected)
    assert torch.equal(logits[1], clean[1])
    assert torch.equal(logits[0, :2], clean[0, :2]) and torch.equal(logits[2, :5], clean[2, :5])
    assert not torch.allclose(logits[0, 2:], clean[0, 2:])
    assert not torch.allclose(logits[2, 5:], clean[2, 5:])


def test_region_semantics_and_shapes():
    h = torch.arange(4 * 5 * 2.0).reshape(4, 5, 2)
    assert hooks.region(h) is None
    assert h[hooks.region(h, batch=slice(1, 3))].shape == (2, 5, 2)
    assert h[hooks.region(h, batch=torch.tensor([True, False, False, True]))].shape == (2, 5, 2)
    assert h[hooks.region(h, positions=3)].shape == (4, 1, 2)
    idx = hooks.region(h, batch=[1, 3], positions=torch.tensor([[0, 4], [2, 2]]))
    assert torch.equal(h[idx], torch.stack([h[1, [0, 4]], h[3, [2, 2]]]))
    with pytest.raises(BadParameter, match="positions must be"):
        hooks.region(h, batch=[0, 1], positions=torch.zeros(3, 1, dtype=torch.long))


@torch.no_grad()
def test_callable_values_and_broadcasting(models):
    model, x = models["timm_vit"], CASES["timm_vit"].inputs(0)
    with hooks.trace(model, "blocks.0") as t:
        model(x)
    h = t["blocks.0"]
    with hooks.add(model, {"blocks.0": lambda r: 2 * r}, positions=slice(0, 1)), \
            hooks.trace(model, "blocks.0") as seen:
        model(x)
    assert torch.equal(seen["blocks.0"][:, 1:], h[:, 1:])
    assert torch.equal(seen["blocks.0"][:, 0], 3 * h[:, 0])
    with pytest.raises(BadParameter, match="does not broadcast"):
        with hooks.replace(model, {"blocks.0": torch.zeros(7)}):
            model(x)
    assert _no_hooks(model)


# ------------------------------------------------------------------ composition


@torch.no_grad()
def test_nested_edits_compose_and_traces_see_the_edited_value(models):
    model, x = models["llama"], CASES["llama"].inputs(0)
    path = "model.layers.0.mlp"
    with hooks.trace(model, path) as t:
        model(x)
    h = t[path]
    with hooks.trace(model, path) as outer_trace:            # registered before the edits
        with hooks.edit(model, path, lambda v: 2 * v):       # outer
            with hooks.edit(model, path, lambda v: v + 1):   # inner runs first
                with hooks.trace(model, [path, "model.layers.1"]) as inner_trace:
                    model(x)
    assert torch.equal(outer_trace[path], 2 * (h + 1))
    assert torch.equal(inner_trace[path], 2 * (h + 1))
    assert "model.layers[1]" in inner_trace
    assert _no_hooks(model)


@torch.no_grad()
def test_hooks_are_removed_after_an_exception(models):
    model, x = models["unet"], CASES["unet"].inputs(0)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.trace(model, ["down_blocks.0", "mid_block"]), hooks.add(model, {"conv_in": 1.0}):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(BadParameter, match=r"must return a tensor of shape \(3, 32, 16, 16\)"):
        with hooks.edit(model, "conv_in", lambda h: h[:1]):
            CASES["unet"].run(model, x)
    assert _no_hooks(model)


def test_trace_records_last_or_every_call(models):
    model = models["unet"]
    sample, text = CASES["unet"].inputs(0)
    path = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    with torch.no_grad(), hooks.trace(model, path, all_calls=True) as every, hooks.trace(model, path) as last:
        for t in (1, 500):  # a two-step "denoising loop"
            model(sample, t, encoder_hidden_states=text)
    assert len(every[path]) == 2 and torch.equal(every[path][1], last[path])
    assert not torch.equal(every[path][0], every[path][1])


# ------------------------------------------------------------- inputs and outputs


class _KeywordsOnly(nn.Module):
    """Calls its child with keywords only, as diffusers blocks often do."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(scale=torch.tensor(2.0), hidden_states=x)


class _Inner(nn.Module):
    def forward(self, hidden_states, scale):
        return hidden_states * scale, "not a tensor"


def test_keyword_only_inputs_and_tuple_outputs():
    model, x = _KeywordsOnly(), torch.ones(2, 3)
    with hooks.trace(model, "inner", at="input") as t:
        model(x)
    assert torch.equal(t["inner"], x)
    with hooks.replace(model, {"inner": torch.zeros(3)}, at="input"):
        out, tag = model(x)
    assert torch.equal(out, torch.zeros(2, 3)) and tag == "not a tensor"
    with hooks.add(model, {"inner": 1.0}):
        out, tag = model(x)
    assert torch.equal(out, torch.full((2, 3), 3.0)) and tag == "not a tensor"


@torch.no_grad()
def test_model_output_structure_is_preserved(models):
    model, x = models["gpt2"], CASES["gpt2"].inputs(0)
    with hooks.edit(model, "", lambda logits: logits * 0):
        out = model(x)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert torch.equal(out.logits, torch.zeros_like(out.logits)) and out.past_key_values is not None


# --------------------------------------------------------- nn.MultiheadAttention


@torch.no_grad()
@pytest.mark.parametrize("tower,inputs", [("visual.transformer.resblocks.1.attn", 0),
                                          ("transformer.resblocks.0.attn", 1)])  # text: causal mask
def test_open_clip_out_proj_is_a_virtual_site(models, tower, inputs):
    model, x = models["open_clip"], CASES["open_clip"].inputs(0)
    run = CASES["open_clip"].run
    clean = run(model, x)
    mha = hooks.get_module(model, tower)
    fired = []
    handle = mha.out_proj.register_forward_hook(lambda *a: fired.append(1))
    try:
        run(model, x)
    finally:
        handle.remove()
    assert not fired, "torch now calls out_proj as a module: the virtual site can go"

    with hooks.trace(model, tower) as attn, hooks.trace(model, tower + ".out_proj", at="input") as heads:
        run(model, x)
    z = heads[tower + ".out_proj"]
    assert z.shape == attn[tower].shape  # (B, L, d): batch_first
    assert torch.allclose(mha.out_proj(z), attn[tower], atol=1e-5)
    with hooks.edit(model, tower + ".out_proj", lambda v: v, at="input"):
        assert torch.equal(run(model, x), clean)
    z_new = torch.randn(z.shape, generator=_gen(5))
    with hooks.replace(model, {tower + ".out_proj": z_new}, at="input"), hooks.trace(model, tower) as edited:
        run(model, x)
    assert torch.allclose(edited[tower], mha.out_proj(z_new), atol=1e-5)
    assert _no_hooks(model)


# ------------------------------------------------------------------------ errors


def test_bad_paths_name_the_deepest_prefix(models):
    model = models["gpt2"]
    with pytest.raises(KeyError) as err:
        hooks.get_module(model, "transformer.h[30].mlp")
    assert str(err.value) == "no module 'transformer.h.30.mlp' in GPT2LMHeadModel; 'transformer.h' has 0..1"
    with pytest.raises(hooks.ModulePathError, match="'transformer.h.1' has ln_1, attn, ln_2, mlp"):
        with hooks.trace(model, "transformer.h.1.mlpp"):
            pass
    with pytest.raises(BadParameter, match="at='outptu' is not valid"):
        with hooks.edit(model, "lm_head", lambda h: h, at="outptu"):
            pass
    with hooks.trace(model, "transformer.h.0") as t:
        pass
    with pytest.raises(KeyError, match="never ran"):
        t["transformer.h[0]"]
    assert _no_hooks(model)


def test_token_contributions_sum_to_the_attention_output_and_respect_causality():
    from interplab import attention
    text = tiny_random.clip_text()
    layer = text.text_model.encoder.layers[0] if hasattr(text, "text_model") else text.encoder.layers[0]
    ids = torch.randint(3, tiny_random.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hooks.trace(text, ["encoder.layers.0.layer_norm1", "encoder.layers.0.self_attn"]) as seen:
        text(input_ids=ids)
    with torch.no_grad():
        terms = attention.token_contributions(layer.self_attn, seen["encoder.layers.0.layer_norm1"])
    assert terms.shape == (2, 7, 7, 64)
    out = terms.sum(2) + layer.self_attn.out_proj.bias
    assert torch.allclose(out, seen["encoder.layers.0.self_attn"], atol=1e-5)   # the sanity identity of §9.2.3
    cont = terms.norm(dim=-1)
    i, j = torch.tril_indices(7, 7)
    assert (cont.triu(1) == 0).all() and (cont[:, i, j] > 0).all()            # j > i never writes into i


def test_a_named_keyword_input_is_its_own_site():
    class Cross(nn.Module):
        def forward(self, x, context=None):
            return x + context.sum(-1, keepdim=True)
    model = nn.Sequential(Cross())
    x, ctx = torch.zeros(2, 3), torch.ones(2, 4)
    with hooks.trace(model, ["0"], at="input:context") as seen:
        model[0](x, context=ctx)
    assert torch.equal(seen["0"], ctx)
    with hooks.edit(model, "0", lambda c: 2 * c, at="input:context"):
        assert torch.equal(model[0](x, context=ctx), torch.full((2, 3), 8.0))
    with pytest.raises(BadParameter, match="keyword argument 'context'"), hooks.trace(model, ["0"], at="input:context"):
        model[0](x, ctx)                                         # passed positionally: not a keyword
    with pytest.raises(BadParameter, match="only inputs are named"), hooks.trace(model, ["0"], at="output:context"):
        pass


def test_contributions_by_layer_are_each_layers_token_contribution_norms():
    from interplab import attention
    text = tiny_random.clip_text()
    ids = torch.randint(3, tiny_random.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    conts = attention.contributions_by_layer(text, ids)
    n = anatomy.n_layers(text)
    assert conts.shape == (2, n, 7, 7)
    last = f"encoder.layers.{n - 1}"
    with torch.no_grad(), hooks.trace(text, [f"{last}.layer_norm1"]) as seen:
        text(input_ids=ids)
    layer = text.get_submodule(f"{last}.self_attn")
    with torch.no_grad():
        want = attention.token_contributions(layer, seen[f"{last}.layer_norm1"]).norm(dim=-1)
    assert torch.allclose(conts[:, -1], want, atol=1e-6)
