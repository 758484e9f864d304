"""interplab.tracing: batched corrupt-and-restore and the reference-row mode for diffusion.

Every engine result is checked against the clean / corrupted forward pass bit for bit or against
a plain per-restoration loop written directly with ``interplab.hooks``.
"""
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from torch import nn

from interplab import hooks, tracing
from interplab import toyworld as tw
from interplab.errors import BadParameter
from interplab.models import tiny_random

T = 8
SUBJECT = [2, 3]


@pytest.fixture(scope="module")
def gpt2():
    return tiny_random.gpt2(n_layer=4)


def _ids(seed=0):
    return torch.randint(3, tiny_random.VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def _last_logits(model):
    return lambda ids: model(input_ids=ids).logits[:, -1]


def _noise(model, seed=0):
    sigma = tracing.noise_scale(model.transformer.wte, _ids()[0, SUBJECT])
    return tracing.Noise("transformer.wte", SUBJECT, sigma, seed=seed)


def _identity(logits):
    return logits  # (rows, V): compare whole logit rows, stronger than one probability


def test_subject_positions_match_token_ids_and_fail_naming_span_and_prompt():
    tok = tw.clip_tokenizer(24)
    ids, _ = tw.encode(tok, ["a red striped circle and a red square"])
    assert tracing.subject_positions(tok, ids[0], "red striped") == [2, 3]
    assert tracing.subject_positions(tok, ids, "red", occurrence=-1) == [7]
    with pytest.raises(BadParameter, match=r"'blue circle'.*not in the prompt.*red striped circle"):
        tracing.subject_positions(tok, ids[0], "blue circle")


def test_noise_scale_is_the_std_of_the_subject_embeddings():
    emb = nn.Embedding(10, 4)
    assert tracing.noise_scale(emb, [1, 2, 2]) == pytest.approx(float(emb.weight.detach()[[1, 2, 2]].std()))


def test_span_sigma_pools_the_probe_set_and_subject_noise_takes_it():
    pipe = tiny_random.stable_diffusion()
    text, tok = pipe.text_model, pipe.tokenizer
    probes = [("a red star in the style of van gogh", "van gogh"), ("a photo of a blue ring", "blue ring")]
    one = [tracing.subject_noise(text, tok, pipe.tokenize([p]), s).sigma for p, s in probes]
    pooled = tracing.span_sigma(text, tok, probes)
    embed = text.get_input_embeddings().weight.detach()
    ids = [pipe.tokenize([p])[0, tracing.subject_positions(tok, pipe.tokenize([p])[0], s)] for p, s in probes]
    assert pooled == pytest.approx(float(embed[torch.cat(ids)].std()))
    assert tracing.span_sigma(text, tok, probes[:1]) == pytest.approx(one[0]) and pooled not in one
    noise = tracing.subject_noise(text, tok, pipe.tokenize([probes[0][0]]), probes[0][1], sigma=pooled)
    assert noise.sigma == pooled


def test_noise_is_one_draw_shared_by_every_corrupted_row(gpt2):
    noise = _noise(gpt2)
    ids = _ids().repeat(3, 1)
    with torch.inference_mode(), hooks.trace(gpt2, "transformer.wte") as clean:
        gpt2(ids)
    with torch.inference_mode(), noise.apply(gpt2, rows=[1, 2]), hooks.trace(gpt2, "transformer.wte") as t:
        gpt2(ids)
    h, h0 = t["transformer.wte"], clean["transformer.wte"]
    assert torch.equal(h[0], h0[0]) and torch.equal(h[1], h[2])
    assert torch.allclose(h[1, SUBJECT] - h0[1, SUBJECT], noise.draw(32), atol=1e-7, rtol=0)
    assert torch.equal(h[1, 4:], h0[1, 4:])                      # only the subject is corrupted
    assert torch.equal(noise.draw(32), _noise(gpt2).draw(32))    # same seed, same tensor
    assert not torch.equal(noise.draw(32), _noise(gpt2, seed=1).draw(32))


@pytest.mark.parametrize("corruption", ["noise", "substitute"])
def test_restore_everything_gives_clean_and_nothing_gives_corrupted(gpt2, corruption):
    spec = _noise(gpt2) if corruption == "noise" else tracing.Substitute(SUBJECT, [5, 6])
    blocks = [f"transformer.h.{i}" for i in range(4)]
    everything = [(b, None) for b in blocks] + [(f"{b}.mlp", list(range(T))) for b in blocks]
    res = tracing.corrupt_and_restore(gpt2, _last_logits(gpt2), _ids(), spec, [everything, [], everything],
                                      _identity, batch_size=2)
    with torch.inference_mode():
        clean = gpt2(_ids()).logits[0, -1]
    assert torch.equal(res.clean, clean) and not torch.equal(res.corrupted, clean)
    assert torch.equal(res.restored[0], res.clean) and torch.equal(res.restored[2], res.clean)
    assert torch.equal(res.restored[1], res.corrupted)


def _loop(model, ids, noise, restorations):
    """The reference: one forward pass per restoration, written with hooks.replace directly."""
    paths = sorted({p for r in restorations for p, _ in r})
    with torch.inference_mode(), hooks.trace(model, paths) as clean:
        model(ids)
    rows = []
    for restoration in restorations:
        with torch.inference_mode(), ExitStack() as stack:
            for path, pos in restoration:
                stack.enter_context(hooks.replace(model, {path: clean[path][:, pos]}, positions=pos))
            stack.enter_context(noise.apply(model))  # innermost edit runs first: restoring overwrites it
            rows.append(model(ids).logits[0, -1])
    return torch.stack(rows)


def test_batched_restorations_equal_a_per_restoration_loop(gpt2):
    noise = _noise(gpt2)
    mlp = [f"transformer.h.{i}.mlp" for i in range(4)]
    restorations = [[(mlp[0], [2])], [(mlp[1], [3])], [(m, [3]) for m in mlp[:3]],
                    [("transformer.h.2.attn", [5, 7])], [(mlp[3], [7]), ("transformer.wte", [2, 3])],
                    [(mlp[2], [0])]]
    res = tracing.corrupt_and_restore(gpt2, _last_logits(gpt2), _ids(), noise, restorations, _identity,
                                      batch_size=4)
    assert res.restored.shape == (6, tiny_random.VOCAB)
    assert torch.equal(res.restored, _loop(gpt2, _ids(), noise, restorations))
    assert torch.equal(res.restored[5], res.corrupted)     # position 0 is never corrupted by noise at 2-3
    assert torch.allclose(res.normalized, res.effect / (res.clean - res.corrupted))


def test_window_is_centred_like_rome_and_clipped():
    assert list(tracing.window(0, 3, 6)) == [0, 1]
    assert list(tracing.window(3, 3, 6)) == [2, 3, 4]
    assert list(tracing.window(5, 10, 6)) == [0, 1, 2, 3, 4, 5]
    assert list(tracing.window(3, 4, 6)) == [1, 2, 3, 4]
    assert list(tracing.window(4, 3, 6, align="start")) == [4, 5]


def test_trace_grid_cells_are_windows_and_respect_causality():
    model = tiny_random.llama(n_layer=4)
    answer = 7

    def prob(logits):
        return logits.softmax(-1)[:, answer]

    sub = tracing.Substitute([4], [9])
    res = tracing.trace_grid(model, _last_logits(model), _ids(), sub, prob, kind="mlp", window_size=3)
    assert res.restored.shape == (4, T) and res.labels["paths"][1] == "model.layers.1.mlp"
    # causal decoder, token 4 replaced: earlier positions are identical in both runs, so IE = 0 exactly
    assert torch.equal(res.effect[:, :4], torch.zeros(4, 4))
    cell = tracing.corrupt_and_restore(model, _last_logits(model), _ids(), sub,
                                       [[(f"model.layers.{j}.mlp", 4) for j in (1, 2, 3)]], prob)
    assert torch.equal(res.restored[2, 4], cell.restored[0])
    groups = tracing.trace_grid(model, _last_logits(model), _ids(), sub, prob, kind="attn",
                                positions=[4, [4, 5, 6, 7]], window_size=1)
    assert groups.restored.shape == (4, 2) and groups.labels["positions"] == [4, [4, 5, 6, 7]]


# ---------------------------------------------------------------- reference-row mode


def test_restore_from_row_copies_the_source_row_in_cfg_halves():
    lin = nn.Linear(3, 3)
    x = torch.randn(8, 2, 3)        # N = 4 samples: rows 0-3 uncond, 4-7 cond
    with torch.inference_mode():
        y = lin(x)
        for branches, changed in [("both", [1, 3, 5, 7]), ("cond", [5, 7]), ("uncond", [1, 3])]:
            with tracing.restore_from_row(lin, {"": [1, 3]}, src=0, cfg=True, restore_branches=branches):
                out = lin(x)
            for row in range(8):
                want = y[4 * (row >= 4)] if row in changed else y[row]
                assert torch.equal(out[row], want), (branches, row)
        with tracing.restore_from_row(lin, {"": 2}, src=1, positions=[1]):
            out = lin(x)
        assert torch.equal(out[2, 1], y[1, 1]) and torch.equal(out[2, 0], y[2, 0])
    with pytest.raises(BadParameter, match="reference row"):
        with tracing.restore_from_row(lin, {"": [0]}):
            pass


def _toy_diffusion():
    from interplab.zoo import clip, t2i
    torch.manual_seed(0)
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval()
    return t2i.untrained(text.text_model, tok)


@pytest.mark.parametrize("branches", ["both", "cond"])
def test_reference_row_sampling_on_toy_diffusion(branches):
    from interplab import anatomy
    model = _toy_diffusion()
    prompt = "a red striped circle"
    ids, _ = tw.encode(model.tokenizer, [prompt])
    subject = tracing.subject_positions(model.tokenizer, ids[0], "red striped")
    emb = model.text_model.embeddings.token_embedding
    noise = tracing.Noise("embeddings.token_embedding", subject, tracing.noise_scale(emb, ids[0, subject]))
    with torch.inference_mode():
        with noise.apply(model.text_model, rows=[1, 2, 3, 4]):
            cond = model.encode([prompt] * 5)   # rows: clean, corrupted, all, nothing, one xattn
        top = [n for n, _ in model.unet.named_children() if n not in ("down_blocks", "up_blocks")]
        every = anatomy.items(model.unet, "xattn") + anatomy.items(model.unet, "down") \
            + anatomy.items(model.unet, "up") + top
        plan = {path: [2] for path in every}
        plan[anatomy.items(model.unet, "xattn")[3]] = [2, 4]
        with tracing.restore_from_row(model.unet, plan, src=0, cfg=True, restore_branches=branches):
            x = model.sample(cond, steps=2, noise=model.draw_noise(1, 0))
    # equal up to float summation order (bitwise with one thread; GEMM blocking over 2+ threads differs per row)
    assert torch.allclose(x[2], x[0], atol=1e-5, rtol=0)     # every layer restored: the clean sample
    assert torch.allclose(x[3], x[1], atol=1e-5, rtol=0)     # nothing restored: the corrupted sample
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[4], x[1]) and not torch.equal(x[4], x[0])


def test_corrupted_inputs_of_another_length_are_refused(gpt2):
    with pytest.raises(BadParameter, match="clean inputs' shapes"):
        tracing.corrupt_and_restore(gpt2, _last_logits(gpt2), _ids(), _ids()[:, :5], [[]], _identity)


def _corrupted_caption(model, prompt="a red striped circle", span="red striped"):
    ids, _ = tw.encode(model.tokenizer, [prompt])
    subject = tracing.subject_positions(model.tokenizer, ids[0], span)
    emb = model.text_model.embeddings.token_embedding
    return ids, subject, tracing.Noise("embeddings.token_embedding", subject, tracing.noise_scale(emb, ids[0, subject]))


def test_text_states_restored_everywhere_give_clean_and_before_the_subject_do_nothing():
    from interplab import anatomy
    model = _toy_diffusion()
    ids, subject, noise = _corrupted_caption(model)
    sites = [s for kind in ("attn", "mlp") for s in tracing.layer_sites(model.text_model, kind)]
    before = [p for p in range(ids.shape[1]) if p < subject[0]]
    embed = anatomy.resolve(model.text_model, "embed")
    conds = tracing.trace_text_states(model.text_model, ids, noise,
                                      [[(s, None) for s in sites], [], [(sites[0], before)],
                                       [(anatomy.resolve(model.text_model, "layer[0].attn"), [subject[-1]])],
                                       [(embed, None)]])
    clean, corrupted, modules, nothing, causal_past, one, embedding = conds
    assert torch.allclose(embedding, clean, atol=1e-5) and torch.equal(nothing, corrupted)
    # every attention and MLP output restored: the noise still rides the residual stream at the subject
    rest = [p for p in range(ids.shape[1]) if p not in subject]
    assert torch.allclose(modules[rest], clean[rest], atol=1e-5) and not torch.allclose(modules[subject], clean[subject])
    assert torch.equal(causal_past, corrupted)           # causal mask: earlier positions never saw the noise
    assert torch.equal(clean[:subject[0]], corrupted[:subject[0]]) and not torch.allclose(one, corrupted)


def test_unet_layer_tracing_batches_equal_one_layer_at_a_time():
    from interplab import anatomy
    model = _toy_diffusion()
    ids, _, noise = _corrupted_caption(model)
    clean, corrupted = tracing.trace_text_states(model.text_model, ids, noise)[:, None]
    layers = anatomy.items(model.unet, "layer")
    picks = [layers[i] for i in (0, 1, 2, 12, 43)]
    batched = tracing.trace_unet_layers(model, clean, corrupted, picks, steps=2, batch_size=3)
    alone = [tracing.trace_unet_layers(model, clean, corrupted, [p], steps=2) for p in picks]
    assert batched.shape == (2 + len(picks), 3, 32, 32)
    base = tracing.sample_rows(model, torch.cat([clean, corrupted]), steps=2)
    assert torch.allclose(batched[:2], base, atol=1e-5)
    for j, images in enumerate(alone):
        assert torch.allclose(batched[2 + j], images[2], atol=1e-5)
    # an item may be a group restored jointly: a group of one is its layer, and every layer at once is the clean image
    groups = tracing.trace_unet_layers(model, clean, corrupted, [[picks[1]], layers], steps=2)
    assert torch.allclose(groups[2], batched[3], atol=1e-5) and torch.allclose(groups[3], base[0], atol=1e-5)


def test_restoration_score_is_the_fraction_of_damage_undone():
    r = tracing.restoration_score(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.2, 0.5, 0.4]),
                                  torch.tensor([[0.6, 1.0, 0.2], [0.9, 0.5, 0.1], [0.3, 0.3, 0.3]]))
    assert torch.allclose(r[0], torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert r[1:].isnan().all()  # no damage, or the corruption helped: nothing to restore
    # float64 means of 12 verdicts (as a chapter averages them): 11 clean, 5 corrupted, 8 restored undo
    # exactly half the damage
    hits = lambda k: np.mean([1.0] * k + [0.0] * (12 - k))  # noqa: E731
    assert (hits(8) - hits(5)) / (hits(11) - hits(5)) < 0.5       # what float division gives
    assert tracing.restoration_score(hits(11), hits(5), [hits(8)]).item() == 0.5


def test_t5_text_states_trace_through_the_anatomy_and_the_noise_reaches_every_position():
    from transformers import T5Config, T5EncoderModel
    from interplab import anatomy
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu")).eval()
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    subject = [2, 3]
    embed = anatomy.resolve(t5, "embed")
    assert embed.path == "encoder.embed_tokens" and anatomy.n_layers(t5) == 2
    noise = tracing.Noise(embed.path, subject, tracing.noise_scale(t5.encoder.embed_tokens, ids[0, subject]))
    sites = [s for kind in ("attn", "mlp") for s in tracing.layer_sites(t5, kind)]
    assert sites[0].path == "encoder.block.0.layer.0.SelfAttention" and sites[-1].path == "encoder.block.1.layer.1.DenseReluDense"
    clean, corrupted, modules, embedding, one = tracing.trace_text_states(
        t5, ids, noise, [[(s, None) for s in sites], [(embed, None)], [(sites[0], [subject[-1]])]])
    assert torch.allclose(embedding, clean, atol=1e-5)
    rest = [p for p in range(7) if p not in subject]
    assert torch.allclose(modules[rest], clean[rest], atol=1e-5) and not torch.allclose(modules[subject], clean[subject])
    assert not torch.allclose(clean[:subject[0]], corrupted[:subject[0]])   # bidirectional: earlier tokens see it
    assert not torch.allclose(one, corrupted)
