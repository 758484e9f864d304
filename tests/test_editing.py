"""interplab.editing: the closed-form key-to-value update and its reversible application.

The update is checked against an independent least-squares solve of the same objective, and the
application against bit-exact weight copies.
"""
import numpy as np
import pytest
import torch
from torch import nn

from interplab import editing
from interplab.errors import BadParameter
from interplab.models import tiny_random


def _problem(n, d_in=16, d_out=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W, K, V = (torch.randn(*shape, generator=gen, dtype=torch.float64)
               for shape in ((d_out, d_in), (n, d_in), (n, d_out)))
    return W, K, V


def _lstsq(W, K, V, lam):
    """argmin ||K X^T - V||^2 + lam ||X - W||^2 as one stacked least-squares problem."""
    A = torch.cat([K, lam ** 0.5 * torch.eye(K.shape[1], dtype=K.dtype)])
    B = torch.cat([V, lam ** 0.5 * W.T])
    return torch.linalg.lstsq(A, B).solution.T


@pytest.mark.parametrize("n", [4, 16, 40])
def test_direct_and_woodbury_agree_and_solve_the_objective(n):
    W, K, V = _problem(n)
    direct = editing.solve_update(W, K, V, 0.3, method="direct")
    woodbury = editing.solve_update(W, K, V, 0.3, method="woodbury")
    assert direct.dtype == torch.float64
    assert torch.allclose(direct, woodbury, atol=1e-8, rtol=0)
    assert torch.allclose(direct, _lstsq(W, K, V, 0.3), atol=1e-8, rtol=0)
    assert torch.equal(editing.solve_update(W, K, V, 0.3), woodbury if n < 16 else direct)


def test_lam_to_zero_maps_keys_to_values_and_to_infinity_keeps_w():
    W, K, V = _problem(6)
    exact = editing.solve_update(W, K, V, 0.0)  # Woodbury: K K^T is invertible for n <= d_in
    assert torch.allclose(K @ exact.T, V, atol=1e-9, rtol=0)
    tiny = editing.solve_update(W, K, V, 1e-9, method="direct")
    assert torch.allclose(K @ tiny.T, V, atol=1e-6, rtol=0)
    for method in ("direct", "woodbury"):
        huge = editing.solve_update(W, K, V, 1e12, method=method)
        assert torch.allclose(huge, W, atol=1e-9, rtol=0)


def test_float32_weights_are_solved_in_float64_and_cast_back():
    W, K, V = _problem(5)
    out = editing.solve_update(W.float(), K.float(), V.float(), 0.1)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), editing.solve_update(W, K.float().double(), V.float().double(), 0.1)
                          .float().double(), atol=1e-6)


def test_bad_shapes_and_lam_are_named():
    W, K, V = _problem(5)
    with pytest.raises(BadParameter, match=r"expected K \(n, 16\) and V \(n, 10\)"):
        editing.solve_update(W, K.T, V, 0.1)
    with pytest.raises(BadParameter, match="lam must be >= 0"):
        editing.solve_update(W, K, V, -1.0)


def test_apply_edit_is_reversible_bit_exactly_also_on_errors():
    torch.manual_seed(0)
    lin = nn.Linear(16, 10)
    before = lin.weight.detach().clone()
    K, V = torch.randn(5, 16), torch.randn(5, 10)
    W_new = editing.solve_update(lin.weight, K, V, 1e-6)
    with editing.apply_edit(lin, W_new) as edit:
        assert torch.allclose(lin.weight, W_new, atol=1e-6)
        assert torch.allclose(lin(K) - lin.bias, V, atol=1e-3)   # the keys now write the values
        assert edit.relative_change > 0
    assert torch.equal(lin.weight, before)
    with pytest.raises(RuntimeError, match="boom"):
        with editing.apply_edit(lin, W_new):
            raise RuntimeError("boom")
    assert torch.equal(lin.weight, before)


def test_compute_edit_reports_fit_and_applies_to_a_model_path():
    model = tiny_random.llama()
    path = "model.layers.0.mlp.down_proj"          # nn.Linear (32, 64)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    K, V = torch.randn(3, 64), torch.randn(3, 32)
    edit = editing.compute_edit(model, path, K, V, lam=1e-8)
    assert edit.path == path and edit.delta.shape == (32, 64) and edit.wall_time_s >= 0
    assert edit.residual < 1e-6 and edit.relative_change > 0
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # solving changes nothing
    edit.apply(model)
    with pytest.raises(BadParameter, match="already applied"):
        edit.apply(model)
    assert torch.allclose(model.model.layers[0].mlp.down_proj(K), V, atol=1e-4)
    edit.revert(model)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    with pytest.raises(BadParameter, match="not applied"):
        edit.revert(model)


def test_gpt2_conv1d_weight_is_edited_in_its_transposed_layout():
    model = tiny_random.gpt2()
    path = "transformer.h.0.mlp.c_proj"             # Conv1D: weight stored (d_in=128, d_out=32)
    module = model.transformer.h[0].mlp.c_proj
    assert editing.weight_of(module).shape == (32, 128)
    K, V = torch.randn(4, 128), torch.randn(4, 32)
    with editing.apply_edit(model, editing.compute_edit(model, path, K, V, lam=1e-8)):
        assert torch.allclose(module(K) - module.bias, V, atol=1e-4)


def _toy_text():
    from interplab import toyworld as tw
    from interplab.zoo import clip
    torch.manual_seed(0)
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    return clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).text_model.eval(), tok


def test_positions_from_last_token_cover_the_subject_and_every_eos_after_it():
    eos = 9
    ids = torch.tensor([[1, 5, 6, eos, eos, eos], [1, 5, eos, eos, eos, eos]])
    assert editing.positions_from_last_token(ids, eos) == [[2, 3, 4, 5], [1, 2, 3, 4, 5]]
    with pytest.raises(BadParameter, match="no EOS"):
        editing.positions_from_last_token(torch.tensor([[1, 5, 6]]), eos)


@pytest.mark.parametrize("bias_mode", ["exact", "as_released"])
def test_quickfix_edit_makes_the_concept_read_like_its_replacement(bias_mode):
    from interplab import hooks
    from interplab import toyworld as tw
    text, tok = _toy_text()
    path = "encoder.layers.0.self_attn.out_proj"
    key_ids, _ = tw.encode(tok, ["a photo of a blorp", "a blorp"])
    value_ids, _ = tw.encode(tok, ["a photo of a star", "a large red star"])  # 2nd: longer, P_v padded
    run = lambda ids: text(input_ids=ids)
    K, V = editing.quickfix_rows(text, path, run, key_ids, value_ids, tok.eos_token_id, bias_mode)
    pk = editing.positions_from_last_token(key_ids, tok.eos_token_id)
    pv = editing.positions_from_last_token(value_ids, tok.eos_token_id)
    assert len(pv[0]) == len(pk[0]) and len(pv[1]) < len(pk[1])
    assert K.shape == (len(pk[0]) + len(pk[1]), 64) and V.shape == K.shape
    bias = hooks.get_module(text, path).bias.detach()
    with torch.no_grad(), hooks.trace(text, [path]) as before:
        run(value_ids)
    value_out = torch.cat([before[path][0, pv[0]], before[path][1, (pv[1] + [key_ids.shape[1] - 1] * 99)[:len(pk[1])]]])
    assert torch.allclose(V, value_out - (bias if bias_mode == "exact" else 0), atol=1e-5)
    n = len(pk[0])  # one pair: 20 rows of width 64, so lam -> 0 fits them exactly
    edit = editing.compute_edit(text, path, K[:n], V[:n], lam=1e-6)
    with editing.apply_edit(text, edit), torch.no_grad(), hooks.trace(text, [path]) as after:
        run(key_ids)
    assert edit.residual < 1e-4
    assert torch.allclose(after[path][0, pk[0]] - bias, V[:n], atol=1e-3)  # exact: the value's output; released: + b


def test_quickfix_counts_the_releases_291_key_rows_with_the_real_clip_tokenizer():
    # CLIP's BPE vocabulary ships in the open_clip wheel: no download. The release prints
    # "Length of Keys: 291" for the four "van gogh" prompts of DIFF-QUICKFIX on SD-v1.4's tokenizer.
    from open_clip.tokenizer import SimpleTokenizer, tokenize
    assert SimpleTokenizer().encode("van gogh") == [2451, 19697]
    ids = tokenize(["van gogh", "A photo of van gogh", "An image of van gogh", "A picture of van gogh"])
    positions = editing.positions_from_last_token(ids, eos_id=49407)
    assert [ids[i, p[0]].item() for i, p in enumerate(positions)] == [19697] * 4  # "gogh": the last subject token
    assert [len(p) for p in positions] == [75, 72, 72, 72] and sum(map(len, positions)) == 291


def test_quickfix_subject_rows_are_the_first_of_the_release_rows():
    from interplab import toyworld as tw
    text, tok = _toy_text()
    path = "encoder.layers.0.self_attn.out_proj"
    key_ids, _ = tw.encode(tok, ["a photo of a blorp", "a blorp"])
    value_ids, _ = tw.encode(tok, ["a photo of a star", "a large red star"])
    run = lambda ids: text(input_ids=ids)
    K, V = editing.quickfix_rows(text, path, run, key_ids, value_ids, tok.eos_token_id)
    Ks, Vs = editing.quickfix_rows(text, path, run, key_ids, value_ids, tok.eos_token_id, positions="subject")
    first = [0, len(editing.positions_from_last_token(key_ids, tok.eos_token_id)[0])]
    assert Ks.shape == (2, 64) and torch.allclose(Ks, K[first], atol=1e-5) and torch.allclose(Vs, V[first], atol=1e-5)
    with pytest.raises(BadParameter, match="positions"):
        editing.quickfix_rows(text, path, run, key_ids, value_ids, tok.eos_token_id, positions="all")


def test_preservation_rows_keep_ordinary_outputs_and_weigh_the_same_for_any_prompt_count():
    from interplab import hooks
    from interplab import toyworld as tw
    text, tok = _toy_text()
    path = "encoder.layers.0.self_attn.out_proj"
    run = lambda ids: text(input_ids=ids)
    names = ["blorp", "kel varo", "the emblem of zubria", "red star"]
    key_ids, _ = tw.encode(tok, [f"{t}{x}" for x in names for t in ("", "a photo of ", "a painting of ")])
    value_ids, _ = tw.encode(tok, [f"{t}{x}" for x in ("star", "painting", "a blue heart", "square") for t in ("", "a photo of ", "a painting of ")])
    K, V = editing.quickfix_rows(text, path, run, key_ids, value_ids, tok.eos_token_id)
    assert len(K) > 64  # more rows than the layer is wide: K^T K is full rank
    ordinary, _ = tw.encode(tok, ["a small green circle on grass", "a blue square", "a striped ring in the top left"])
    Kp, Vp = editing.preservation_rows(text, path, run, ordinary)
    assert Kp.shape == (ordinary.numel(), 64)
    with torch.no_grad(), hooks.trace(text, [path]) as seen:
        run(ordinary)
    bias = hooks.get_module(text, path).bias.detach()
    assert torch.allclose(Vp, seen[path].flatten(0, 1) - bias, atol=1e-5)  # their current outputs

    plain = editing.compute_edit(text, path, K, V, lam=0.01)
    kept = editing.compute_edit(text, path, K, V, lam=0.01, preserve=(Kp, Vp))
    moved = lambda e: float((Kp @ e.delta.T).norm())
    assert moved(kept) < 0.5 * moved(plain)
    assert kept.residual > plain.residual  # the residual is the concept rows' fit alone
    scale = (len(K) / len(Kp)) ** 0.5
    stacked = editing.compute_edit(text, path, torch.cat([K, scale * Kp]), torch.cat([V, scale * Vp]), lam=0.01)
    assert torch.allclose(stacked.delta, kept.delta, atol=1e-6)
    twice = editing.compute_edit(text, path, K, V, lam=0.01, preserve=(torch.cat([Kp, Kp]), torch.cat([Vp, Vp])))
    assert torch.allclose(twice.delta, kept.delta, atol=1e-5)  # the weight does not grow with the prompt count
    with pytest.raises(BadParameter, match="preserve_weight"):
        editing.compute_edit(text, path, K, V, lam=0.01, preserve=(Kp, Vp), preserve_weight=0.0)


def test_locoedit_maps_the_concept_to_its_target_in_to_k_and_to_v_and_nothing_else():
    from interplab import anatomy
    from interplab.models.diffusion import random_sd
    unet, text = random_sd("v1", width=32, text_layers=2)
    layers = anatomy.items(unet, "xattn")[6:8]
    gen = torch.Generator().manual_seed(0)
    keys, targets, other = (torch.randn(n, 768, generator=gen) for n in (1, 1, 8))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    edits = editing.locoedit(unet, layers, keys, targets, lam=0.01)
    assert [e.path for e in edits] == [f"{p}.{q}" for p in layers for q in ("to_k", "to_v")]
    with editing.apply_edit(unet, edits):
        changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {f"{e.path}.weight" for e in edits}              # to_k and to_v of the window only
        for e in edits:
            proj = unet.get_submodule(e.path)
            W0 = before[f"{e.path}.weight"]
            want = targets @ W0.T
            assert ((proj(keys) - want).norm() / want.norm()) < 1e-3     # c^o is read as c^t was
            # a direction orthogonal to the key is read as before (the identity term dominates there)
            ortho = other - (other @ keys.T) / (keys @ keys.T) * keys
            assert torch.allclose(proj(ortho), ortho @ W0.T, atol=1e-3, rtol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())   # reverted bit-exactly


def test_locoedit_equals_the_ridge_formula():
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.to_k, model.attn.to_v = nn.Linear(12, 6, bias=False), nn.Linear(12, 6, bias=False)
    gen = torch.Generator().manual_seed(1)
    X_o, X_t = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
    for edit in editing.locoedit(model, ["attn"], X_o, X_t, lam=0.5):
        W0 = model.get_submodule(edit.path).weight.detach().double()
        Xo, Xt = X_o.double(), X_t.double()
        # W^T = (X_o^T X_o + lam I)^-1 (X_o^T X_t W0^T + lam W0^T)   (the spec's corrected closed form)
        ridge = torch.linalg.solve(Xo.T @ Xo + 0.5 * torch.eye(12, dtype=torch.float64), Xo.T @ Xt @ W0.T + 0.5 * W0.T).T
        assert torch.allclose(W0 + edit.delta.double(), ridge, atol=1e-5)


def test_locoedit_rows_pair_subject_and_eos_states_and_preservation_keeps_other_states():
    from interplab import prompts
    gen = torch.Generator().manual_seed(2)
    eos = 9
    key_ids = torch.tensor([[1, 4, 5, eos, eos, eos], [1, 6, eos, eos, eos, eos]])
    target_ids = torch.tensor([[1, 7, eos, eos, eos, eos], [1, 7, 8, 3, eos, eos]])
    ks, ts = torch.randn(2, 6, 12, generator=gen), torch.randn(2, 6, 12, generator=gen)
    K, T = editing.locoedit_rows(ks, key_ids, ts, target_ids, eos)                     # the release's default
    assert torch.equal(K, ks[[0, 1], [2, 1]]) and torch.equal(T, ts[[0, 1], [1, 3]])
    K, T = editing.locoedit_rows(ks, key_ids, ts, target_ids, eos, "subject_and_after")  # its --eos
    assert torch.equal(K, torch.cat([ks[0, 2:], ks[1, 1:]]))
    assert torch.equal(T, torch.cat([ts[0, 1:5], ts[1, [3, 4, 5, 5, 5]]]))  # cut to as many, padded with T - 1
    with pytest.raises(BadParameter, match="positions"):
        editing.locoedit_rows(ks, key_ids, ts, target_ids, eos, "eos")

    model = nn.Module()
    model.attn = nn.Module()
    model.attn.to_k, model.attn.to_v = nn.Linear(12, 6, bias=False), nn.Linear(12, 6, bias=False)
    ordinary = torch.randn(40, 12, generator=gen)
    plain = editing.locoedit(model, ["attn"], K, T, lam=0.01)                  # 9 key rows of 12 dims
    kept = editing.locoedit(model, ["attn"], K, T, lam=0.01, preserve=ordinary)
    for p_, k_ in zip(plain, kept):
        assert (ordinary @ k_.delta.T).norm() < 0.5 * (ordinary @ p_.delta.T).norm()

    caps = prompts.ordinary_captions(50, ["red", "circle"], np.random.default_rng(0), tiny=True)
    assert len(caps) == 50 and not any({"red", "circle"} & set(c.split()) for c in caps)
    assert caps == prompts.ordinary_captions(50, ["red", "circle"], np.random.default_rng(0), tiny=True)
    paper = prompts.ordinary_captions(20, ["dog"], np.random.default_rng(0), tiny=False)
    assert len(paper) == 20 and not any("dog" in c.split() for c in paper) and "a photo of an apple in the park" in \
        prompts.ordinary_captions(10_000, [], np.random.default_rng(0), tiny=False)


def test_last_token_states_read_the_token_before_the_first_eos():
    from interplab import toyworld as tw
    from interplab.zoo import clip
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    model = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval().text_model
    ids = torch.tensor(tok(["a red circle", "a photo of a blorp"], padding="max_length",
                           max_length=clip.MAX_LENGTH)["input_ids"])
    with torch.no_grad():
        h = model(input_ids=ids).last_hidden_state
    got = editing.last_token_states(h, ids, tok.eos_token_id)
    assert torch.equal(got[0], h[0, 3]) and torch.equal(got[1], h[1, 5])   # "circle", "blorp" (after <bos>)


def test_locoedit_on_deepfloyd_if_edits_add_kv_on_what_the_layer_reads():
    from interplab import anatomy, hooks
    from interplab.models import tiny_random
    pipe = tiny_random.deepfloyd_if()
    unet, eos = pipe.unet, pipe.tokenizer.eos_token_id
    layer = anatomy.items(unet, "xattn")[5]
    assert editing.xattn_projections(unet, layer) == ("add_k_proj", "add_v_proj")
    prompts_ = ["a photo of snoopy", "a photo of a dog"]
    ids, states = pipe.tokenize(prompts_), pipe.encode(prompts_)

    # xattn_inputs is what add_k_proj receives inside the UNet (encoder_hid_proj, then norm_cross's GroupNorm)
    with torch.no_grad(), hooks.trace(unet, [f"{layer}.add_k_proj"], at="input") as seen:
        unet(torch.randn(2, 3, 8, 8), torch.tensor([500, 500]), encoder_hidden_states=states)
    assert torch.allclose(editing.xattn_inputs(unet, layer, states), seen[f"{layer}.add_k_proj"], atol=1e-5)

    keys, targets = editing.locoedit_inputs(states[:1], ids[:1], states[1:], ids[1:], eos)
    with pytest.raises(BadParameter, match="locoedit_inputs"):   # rows cannot pass a sequence-wide GroupNorm
        editing.locoedit(unet, [layer], *editing.locoedit_rows(states[:1], ids[:1], states[1:], ids[1:], eos))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    edits = editing.locoedit(unet, [layer], keys, targets, lam=1e-4)
    assert [e.path for e in edits] == [f"{layer}.add_k_proj", f"{layer}.add_v_proj"]
    k_in = editing.xattn_inputs(unet, layer, keys[0])[0, keys[1][0]]
    t_in = editing.xattn_inputs(unet, layer, targets[0])[0, targets[1][0]]
    with editing.apply_edit(unet, edits):
        changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {f"{e.path}.weight" for e in edits}
        for e in edits:
            proj = unet.get_submodule(e.path)
            want = t_in @ before[f"{e.path}.weight"].T + proj.bias
            assert ((proj(k_in) - want).norm() / want.norm()) < 1e-3       # snoopy is read as the dog was
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def _ft_problem(dtype, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(8, 4).to(dtype)
    x, y = torch.randn(16, 8).to(dtype), torch.randn(16, 4)
    x[:, :3] = 0      # zero gradients: Adam's 0 / (0 + eps) is 0 / 0 in fp16, where eps = 1e-8 rounds to 0
    return lin, lambda: (lin(x).float() - y).pow(2).mean()


@pytest.mark.parametrize("linf", [None, 1e-2])
def test_finetuned_in_float32_is_plain_adam_on_the_weights(linf):
    """The pre-master-copy algorithm, written out: float32 weights take exactly the same steps."""
    lin, loss_fn = _ft_problem(torch.float32)
    with editing.finetuned(lin.parameters(), loss_fn, steps=7, lr=1e-2, linf=linf) as losses:
        got = [p.detach().clone() for p in lin.parameters()]
    ref, ref_loss = _ft_problem(torch.float32)
    saved = [p.detach().clone() for p in ref.parameters()]
    opt, ref_losses = torch.optim.Adam(ref.parameters(), lr=1e-2), []
    for _ in range(7):
        loss = ref_loss()
        ref_losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if linf is not None:
            with torch.no_grad():
                for p, p0 in zip(ref.parameters(), saved):
                    p.copy_(torch.maximum(torch.minimum(p, p0 + linf), p0 - linf))
    assert losses == ref_losses and all(torch.equal(a, b) for a, b in zip(got, ref.parameters()))


@pytest.mark.parametrize("linf", [None, 1e-2])
def test_finetuned_half_precision_weights_stay_finite_and_move(linf):
    lin, loss_fn = _ft_problem(torch.float16)
    saved = [p.detach().clone() for p in lin.parameters()]
    with editing.finetuned(lin.parameters(), loss_fn, steps=20, lr=1e-3, linf=linf) as losses:
        assert all(torch.isfinite(p).all() and p.dtype == torch.float16 for p in lin.parameters())
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
        moved = (lin.weight != saved[0])
        assert moved[:, 3:].all() and not moved[:, :3].any()    # zero-gradient weights stay put
        if linf is not None:   # the ball holds on the float32 master; the cast adds at most half an fp16 ulp
            half_ulp = 2 ** -11 * float(saved[0].abs().max() + linf)
            assert float((lin.weight.detach().float() - saved[0].float()).abs().max()) <= linf + half_ulp
    assert all(torch.equal(p, p0) and p.grad is None for p, p0 in zip(lin.parameters(), saved))
