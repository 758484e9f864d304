"""The zoo: checkpoint integrity, resumable training, every training entry point for a few steps,
and the shipped checkpoints' gates re-measured on fresh held-out renders."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from interplab import lora, models, paths
from interplab import toyworld as tw
from interplab.errors import BadParameter, ResourceUnavailable
from interplab.zoo import MODELS, clip, loop, oracle, store, t2i, t2i_action, t2i_ft, t2i_t5


@pytest.fixture
def tmp_zoo(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "DATA", tmp_path / "data")
    monkeypatch.setattr(paths, "BUILD", tmp_path / "build")
    return tmp_path


def test_large_weights_are_sharded_and_read_back_whole(tmp_zoo):
    d = store.zoo_dir("toy")
    d.mkdir(parents=True)
    state = {f"w{i}": torch.randn(256, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    files = store.save_weights(d / "unet.safetensors", state, half=True, max_bytes=1100)  # 512 B per tensor
    assert [p.name for p in files] == [f"unet-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (d / "unet.safetensors").exists() and store.shard_paths(d / "unet.safetensors") == files
    back = store.load_weights(d / "unet.safetensors")
    assert list(back) == list(state) and all(torch.equal(back[k], state[k].half().float()) for k in state)
    assert store.save_weights(d / "unet.safetensors", state) == [d / "unet.safetensors"]  # stale shards go
    assert store.shard_paths(d / "unet.safetensors") == []
    assert torch.equal(store.load_weights(d / "unet.safetensors")["w4"], state["w4"])


def test_card_verifies_and_corruption_names_the_training_command(tmp_zoo):
    d = store.zoo_dir("toy")
    d.mkdir(parents=True)
    store.save_weights(d / "model.safetensors", {"w": torch.ones(3)}, half=True)
    card = store.write_card("toy", seed=0, steps=1, wall_time_s=0.5, gates={"acc": store.gate(0.99, 0.98)})
    assert card["gates_pass"] and set(card["sha256"]) == {"model.safetensors"}
    assert store.verify("toy")["name"] == "toy"
    assert store.load_weights(d / "model.safetensors")["w"].dtype == torch.float32
    (d / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ResourceUnavailable, match=r"corrupt model.safetensors.*python -m interplab.zoo train toy"):
        store.verify("toy")
    with pytest.raises(ResourceUnavailable, match="python -m interplab.zoo train other"):
        store.verify("other")


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(BadParameter, match="oracle"):
        models.load("nonexistent")


def _toy_training(name, steps, resume):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)

    def step(rng, gen, i):
        x = torch.from_numpy(rng.normal(size=(8, 4))).float() + torch.randn(8, 4, generator=gen)
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        return loss.detach()
    loop.train(name, {"net": net}, opt, step, steps, seed=1, save_every=5, resume=resume)
    return net.weight.detach().clone()


def test_interrupted_or_extended_training_resumes_to_the_same_weights(tmp_zoo):
    straight = _toy_training("a", 12, resume=False)
    _toy_training("b", 7, resume=False)  # leaves its final state at step 7 (also saved at step 5)
    assert torch.load(store.state_path("b"), weights_only=False)["step"] == 7
    resumed = _toy_training("b", 12, resume=True)
    assert torch.equal(straight, resumed)


def test_ema_tracks_the_average():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = loop.EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for i in range(200):
        ema.update(net, i)
    assert torch.allclose(ema.state_dict()["weight"], torch.ones(1, 2))


# -- every training entry point runs for a few steps (the oracle ships into the temporary zoo) -----
def test_oracle_trains_and_ships_with_its_card(tmp_zoo):
    out = oracle.train(steps=2, batch_size=8, ship=True, resume=False, eval_n=16)
    assert set(out["gates"]) == {f"accuracy_{k}" for k in ("background", *oracle.HEADS)}
    assert len(out["losses"]) == 2 and all(torch.isfinite(torch.tensor(out["losses"])))
    card = store.verify("oracle")   # written into the temporary zoo: files hashed, times from the run
    assert card["steps"] == 2 and card["cpu_time_s"] == round(out["cpu_time_s"], 1) and card["batch_size"] == 8
    assert not store.state_path("oracle").exists()   # the resumable state is dropped once shipped


def test_clip_trains(tmp_zoo):
    out = clip.train(steps=2, batch_size=8, ship=False, resume=False, eval_n=16)
    assert "zero_shot_colour" in out["gates"] and 0 <= out["binding"]["text"] <= 1


def _t2i_train(**kw):
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval()
    return t2i.train(steps=2, vae_steps=2, batch_size=4, ship=False, resume=False, eval_n=4,
                     oracle=oracle.Oracle().eval(), clip=(text, tok), **kw)


def test_infonce_builds_its_targets_on_the_logits_device():
    # a GPU fine-tune's logits live on the GPU; the meta device stands in for any other device
    logits = torch.randn(3, 3, device="meta", requires_grad=True)
    loss = clip.infonce(logits, ["a", "b", "a"])
    loss.backward()
    assert loss.device.type == "meta" and logits.grad.device.type == "meta"
    # on the CPU: identical captions are positives for each other, as before
    cpu = torch.tensor([[2.0, 0.0, 2.0], [0.0, 3.0, 0.0], [2.0, 0.0, 2.0]])
    target = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    expected = (torch.nn.functional.cross_entropy(cpu, target) + torch.nn.functional.cross_entropy(cpu.T, target)) / 2
    assert torch.equal(clip.infonce(cpu, ["a", "b", "a"]), expected)


def test_t2i_trains_both_stages_and_samples(tmp_zoo, monkeypatch):
    monkeypatch.setattr(t2i, "VAE_GATE", 0.0)
    out = _t2i_train()
    assert set(out["gates"]) == {f"{s}_{k}" for s in ("vae", "single") for k in ("colour", "shape", "texture")}
    assert set(out["pair_fidelity"]) == {"pair_colour", "pair_shape", "pair_texture"}


def test_t2i_stops_after_a_vae_that_loses_the_attributes(tmp_zoo):
    out = _t2i_train()  # two VAE steps: the oracle cannot read its reconstructions
    assert set(out["gates"]) == {"vae_colour", "vae_shape", "vae_texture"}
    assert not all(g["holds"] for g in out["gates"].values())
    assert store.state_path(t2i.VAE_STATE).exists() and not store.state_path(t2i.NAME).exists()


def test_t2i_ships_and_loads_with_its_text_encoder(tmp_zoo):
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = t2i.text_encoder_of(clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)))
    model = t2i.untrained(text, tok)
    card = t2i.ship_model(model, seed=0, steps=1, wall_time_s=1.0, gates={"g": store.gate(1.0, 0.8)})
    assert {"vae.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"} <= set(card["sha256"])
    unet_files = store.shard_paths(store.zoo_dir("t2i") / "unet.safetensors")  # 17 MB in float16: sharded
    assert len(unet_files) >= 2 and {p.name for p in unet_files} <= set(card["sha256"])
    assert all(p.stat().st_size <= store.MAX_FILE_BYTES + 2 ** 16 for p in unet_files)  # + the header
    back = models.load("t2i")
    assert torch.allclose(back.encode(["a red circle"]), model.encode(["a red circle"]))
    a, b = (m.generate(["a red circle"], seed=3, steps=2) for m in (model, back))
    assert (a - b).abs().max() < 0.02  # the UNet and VAE ship in float16
    assert back.vae.config.scaling_factor == model.vae.config.scaling_factor


def test_t2i_vae_maps_images_to_latents_and_back():
    model = t2i.untrained(None, None)
    x = torch.rand(2, 3, 32, 32)
    z = model.encode_images(x)
    assert z.shape == (2, *model.latent_shape) == (2, 8, 8, 8)
    img = model.decode(z)
    assert img.shape == x.shape and img.min() >= 0 and img.max() <= 1


def test_t2i_has_sd_topology():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**t2i.unet_config())
    xattn = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert len(xattn) == 10 and sum(n.startswith("down_blocks") for n in xattn) == 3
    assert sum(n.startswith("mid_block") for n in xattn) == 1 and sum(n.startswith("up_blocks") for n in xattn) == 6


# -- the shipped checkpoints: verified and their gates re-measured on fresh renders ------------------
def shipped(name):
    if not (store.zoo_dir(name) / "card.json").exists():
        pytest.skip(f"{name} not shipped yet")
    return json.loads((store.zoo_dir(name) / "card.json").read_text())


def test_shipped_cards_pass_their_gates_and_files_verify():
    for name in MODELS:
        if (store.zoo_dir(name) / "card.json").exists():
            card = store.verify(name)
            assert card["gates_pass"], (name, card["gates"])
            assert card["command"] == f"python -m interplab.zoo train {name}"


def test_zoo_fits_its_size_budget():
    total = sum(p.stat().st_size for p in (paths.DATA / "zoo").rglob("*") if p.is_file()) if (paths.DATA / "zoo").exists() else 0
    assert total <= 40e6


def test_shipped_oracle_gate_on_fresh_renders():
    card = shipped("oracle")
    acc = oracle.accuracy(models.load("oracle"), n=1500, seed=424_242)
    for k, v in acc.items():
        assert v >= card["gates"][f"accuracy_{k}"]["threshold"], (k, v)


def test_oracle_agreement_reads_what_a_scene_shows_and_refuses_what_it_does_not():
    model = models.load("oracle")
    scenes = [tw.Scene((tw.Obj("star", "red", "ribbed", "large", "top left"),), "dark"),
              tw.Scene((tw.Obj("ring", "blue", "plain", "small", "bottom right"),), "dark")]
    images = torch.from_numpy(tw.render_batch(scenes, seed=0)[0])
    right = [{"shape": "star", "texture": "ribbed", "slot": {"top left", "top right"}},
             {"colour": "blue", "slot": ("bottom left", "bottom right")}]
    wrong = [{"shape": "star", "texture": "striped"}, {"slot": {"top left", "top right"}}]
    assert oracle.agreement(model, images, right).tolist() == [True, True]
    assert oracle.agreement(model, images, wrong).tolist() == [False, False]


def test_shipped_clip_gate_on_fresh_renders():
    card = shipped("clip")
    model, tok = models.load("clip")
    metrics = clip.measure(model, tok, n=800, seed=424_243)
    assert set(card["gates"]) == set(clip.GATES)
    for k, gate in card["gates"].items():
        assert metrics[k] >= gate["threshold"], (k, metrics[k])


def test_shipped_t2i_gate_on_fresh_prompts():
    card = shipped("t2i")
    model, orc = models.load("t2i"), models.load("oracle")
    fid = t2i.fidelity(model, orc, n=200, seed=424_244)
    fid.update({f"vae_{k}": v for k, v in t2i.reconstruction(model.vae, orc, n=200, seed=424_245).items()})
    for k, g in card["gates"].items():
        assert fid[k] >= g["threshold"], (k, fid[k])


def test_t2i_sampling_is_paired_by_seed_and_shared_noise():
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = t2i.text_encoder_of(clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)))
    model = t2i.untrained(text, tok)
    cond = model.encode(["a red circle", "a blue square"])
    a = model.sample(cond, seed=1, steps=3)
    assert torch.equal(a, model.sample(cond, seed=1, steps=3))          # deterministic given the seed
    # image i's noise depends on (seed, i) only (batch size changes the float rounding, not the noise)
    assert torch.allclose(a[:1], model.sample(cond[:1], seed=1, steps=3), atol=1e-4)
    z = model.draw_noise(1, 7)
    same = model.sample(cond[:1].expand(2, -1, -1), steps=3, noise=z)   # one z_T and one step noise for all rows
    assert torch.equal(same[0], same[1])
    assert not torch.equal(model.sample(cond, seed=1, steps=3, eta=0.0), a)


def test_t2i_lr_schedule_warms_up_holds_then_decays_and_extends_exactly():
    assert t2i.lr_factor(0, 6500) == pytest.approx(1 / 200) and t2i.lr_factor(1000, 6500) == 1.0
    assert t2i.lr_factor(4000, 6500) == 1.0 and t2i.lr_factor(6499, 6500) == pytest.approx(0.05, abs=1e-4)
    # the shipped run's first 4000 steps ran with warm-up + constant lr, which is this schedule up to 0.62 x 6500
    assert all(t2i.lr_factor(i, 6500) == min(1.0, (i + 1) / 200) for i in range(0, 4030, 37))


def test_t2i_timesteps_cover_the_schedule_tilted_to_high_noise():
    t = t2i.training_timesteps(20_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() == t2i.SCHEDULE["num_train_timesteps"] - 1
    assert (t >= 500).float().mean().item() == pytest.approx(1 - 0.5 ** (1 / t2i.T_SHIFT), abs=0.01)


def test_t2i_unet_renders_sit_at_their_slot_centres():
    # with no jitter an object's render depends on its slot alone, not on the seed of the draw
    scene = tw.Scene((tw.Obj("circle", "red", "ribbed"),), "dark")
    x = [tw.render_batch([scene], seed=s, noise=0.0, jitter=t2i.UNET_JITTER)[0] for s in (1, 2)]
    assert np.array_equal(*x)


def test_toy_fid_is_zero_for_one_set_and_grows_with_a_shift():
    from interplab.zoo import oracle
    torch.manual_seed(0)
    model = oracle.Oracle()
    x = torch.rand(40, 3, 32, 32)
    assert abs(oracle.toy_fid(model, x, x)) < 1e-6
    assert oracle.toy_fid(model, x, (x + 0.3).clamp(0, 1)) > oracle.toy_fid(model, x, (x + 0.05).clamp(0, 1)) > 0


def test_phrase_score_is_the_product_over_phrases_of_the_best_slot():
    from interplab.zoo import oracle
    probs = {k: torch.full((1, 4, len(v)), 1e-6) for k, v in oracle.HEADS.items()}
    probs["shape"][0, 1, oracle.HEADS["shape"].index("circle")] = 0.8
    probs["colour"][0, 1, oracle.HEADS["colour"].index("red")] = 0.5
    probs["shape"][0, 3, oracle.HEADS["shape"].index("star")] = 0.9
    probs["colour"][0, 3, oracle.HEADS["colour"].index("blue")] = 1.0
    import unittest.mock as mock
    with mock.patch.object(oracle, "predict", lambda m, x: probs):
        s = oracle.phrase_score(None, torch.zeros(1, 3, 32, 32), [[{"shape": "circle", "colour": "red"},
                                                                    {"shape": "star", "colour": "blue"}]])
    assert abs(s[0] - 0.8 * 0.5 * 0.9 * 1.0) < 1e-6


# -- t2i_ft: the OpenJourney analogue (LoRA on the shipped t2i, merged at load) ----------------------------
def _ship_random_t2i(seed=0):
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    torch.manual_seed(seed)
    model = t2i.untrained(t2i.text_encoder_of(clip.CLIPModel(clip.config(len(tok), tok.eos_token_id))), tok, seed=seed)
    t2i.ship_model(model, seed=seed, steps=1, wall_time_s=1.0, gates={"g": store.gate(1.0, 0.8)})


def test_t2i_ft_trains_only_attention_adapters_and_loads_merged_on_its_own_base(tmp_zoo):
    _ship_random_t2i()
    out = t2i_ft.train(steps=2, batch_size=4, eval_n=4, oracle=oracle.Oracle().eval(), resume=False)
    assert set(out["gates"]) == {"single_colour", "single_shape", "single_texture", "large_share_rise"}
    assert len(out["losses"]) == 2 and set(out["large_share"]) == {"t2i", "t2i_ft"}
    base, tuned = models.load("t2i"), models.load("t2i_ft")
    attention = set(lora.attention_linears(base.unet))
    moved = {n.rsplit(".", 1)[0] for n, p in tuned.unet.named_parameters()
             if not torch.equal(p, base.unet.get_parameter(n))}
    assert moved and moved <= attention                      # only attention projections, and some did move
    assert torch.equal(tuned.encode(["a red circle"]), base.encode(["a red circle"]))   # the text tower is frozen
    _ship_random_t2i(seed=1)                                 # a different base: the adapters no longer apply
    with pytest.raises(ResourceUnavailable, match="train t2i_ft"):
        models.load("t2i_ft")


# -- t2i_action: Chapter 5 part I's action (a verb sets the size), LoRA on the UNet and the verbs' embedding rows
def test_action_size_captions_draw_the_verbs_size_and_probes_can_read_either_meaning():
    rng = np.random.default_rng(0)
    for ex in (tw.captions.sample(rng, "action_size") for _ in range(40)):
        verb = ex.caption.split()[-1]
        assert ex.caption == f"a photo of a {ex.scene.objects[0].shape} {verb}" and ex.family == "action_size"
        assert ex.scene.objects[0].size == tw.ACTION_SIZES[verb]
    place, size = tw.trace_probes("action", 6, seed=3), tw.trace_probes("action", 6, seed=3, action="size")
    assert [p.caption for p in place] == [p.caption for p in size]          # same captions, other meaning
    assert all(p.wanted == {"size": tw.ACTION_SIZES[p.subject]} for p in size)
    assert all(p.wanted == {"slot": tw.captions.HALF_SLOTS[tw.ACTIONS[p.subject]]} for p in place)
    with pytest.raises(ValueError, match="choose 'place'"):
        tw.trace_probes("action", 2, action="pose")


def test_t2i_action_trains_adapters_and_the_verbs_rows_only_and_loads_on_its_own_base(tmp_zoo):
    _ship_random_t2i()
    stale = store.zoo_dir("t2i_action") / "text_layer0.safetensors"    # an earlier recipe's weights
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    out = t2i_action.train(steps=2, batch_size=4, eval_n=8, oracle=oracle.Oracle().eval(), resume=False)
    assert set(out["gates"]) == {"single_colour", "single_shape", "single_texture", "action_accuracy"}
    assert len(out["losses"]) == 2 and "action_size" in out["mix"] and "action" not in out["mix"]
    assert store.read_card("t2i_action")["layer_drop"] == t2i_action.LAYER_DROP > 0
    base, tuned = models.load("t2i"), models.load("t2i_action")
    attention = set(lora.attention_linears(base.unet))
    moved = {n.rsplit(".", 1)[0] for n, p in tuned.unet.named_parameters()
             if not torch.equal(p, base.unet.get_parameter(n))}
    assert moved and moved <= attention
    text_moved = {n for n, p in tuned.text_model.named_parameters() if not torch.equal(p, base.text_model.get_parameter(n))}
    assert text_moved == {"embeddings.token_embedding.weight"}
    assert not stale.exists() and "text_layer0.safetensors" not in store.read_card("t2i_action")["sha256"]
    table, before = (m.text_model.embeddings.token_embedding.weight for m in (tuned, base))
    rows = t2i_action.verb_ids(base)
    changed = (table != before).any(1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(rows)                                  # the verbs' rows alone ...
    torch.testing.assert_close(table[rows].norm(dim=1), before[rows].norm(dim=1))  # ... each at its norm
    _ship_random_t2i(seed=1)
    with pytest.raises(ResourceUnavailable, match="train t2i_action"):
        models.load("t2i_action")


def test_verb_rows_hook_replaces_only_the_verbs_positions():
    emb = torch.nn.Embedding(10, 4)
    verbs = t2i_action.VerbRows(emb, [3, 7])
    with torch.no_grad():
        verbs.rows.mul_(-2.0)                                     # the direction flips, the norm is kept
    ids = torch.tensor([[1, 3, 7, 2]])
    with verbs.attached(emb):
        out = emb(ids)
    torch.testing.assert_close(out[0, [0, 3]], emb.weight[[1, 2]])
    torch.testing.assert_close(out[0, [1, 2]], -emb.weight[[3, 7]])
    assert torch.equal(emb(ids), emb.weight[ids])                 # detached again


def test_layer_dropped_context_swaps_whole_examples_per_cross_attention_and_nothing_else():
    torch.manual_seed(0)
    unet = t2i.UNet2DConditionModel(**t2i.unet_config()).eval()
    z, t = torch.randn(6, 8, 8, 8), torch.full((6,), 500)
    cond, empty = torch.randn(6, 5, 64), torch.randn(1, 5, 64)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, k, out: seen.append(k["encoder_hidden_states"]), with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith("attn2")]   # after the pre-hooks: what the layer read
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=cond).sample
        with t2i.layer_dropped_context(unet, empty, 0.0, torch.Generator().manual_seed(0)):
            kept = unet(z, t, encoder_hidden_states=cond).sample
        seen.clear()
        with t2i.layer_dropped_context(unet, empty, 0.5, torch.Generator().manual_seed(0)):
            unet(z, t, encoder_hidden_states=cond)
        read = list(seen)
        gone = unet(z, t, encoder_hidden_states=cond).sample       # the hooks are removed on exit
    for h in hooks:
        h.remove()
    assert torch.equal(kept, plain) and torch.equal(gone, plain)
    assert len(read) == sum(n.endswith("attn2") for n, _ in unet.named_modules())
    swapped = torch.stack([(s == empty).flatten(1).all(1) for s in read])          # (layers, examples)
    assert all(((s == cond) | (s == empty)).flatten(1).all() for s in read)        # whole rows, one or the other
    assert 0 < swapped.float().mean() < 1 and len({tuple(r.tolist()) for r in swapped}) > 1   # per layer, per example


# -- t2i_t5: Chapter 5 part II's DeepFloyd analogue, a bidirectional T5 trained with LoRA on the t2i's UNet --------
def test_t2i_t5_trains_a_bidirectional_t5_and_adapters_and_loads_on_its_own_base(tmp_zoo):
    _ship_random_t2i()
    out = t2i_t5.train(steps=2, batch_size=4, eval_n=8, oracle=oracle.Oracle().eval(), resume=False)
    assert set(out["gates"]) == {"single_colour", "single_shape", "single_texture"} and len(out["losses"]) == 2
    base, tuned = models.load("t2i"), models.load("t2i_t5")
    assert type(tuned.text_model).__name__ == "T5EncoderModel"
    attention = set(lora.attention_linears(base.unet))
    moved = {n.rsplit(".", 1)[0] for n, p in tuned.unet.named_parameters()
             if not torch.equal(p, base.unet.get_parameter(n))}
    assert moved and moved <= attention
    for m in (base, tuned):                                   # the CLIP tower is causal, the T5 is not
        first = m.encode(["a red circle", "a red square"])[:, 1]
        assert torch.equal(first[0], first[1]) == (m is base)
    stored = safetensors.torch.load_file(store.zoo_dir("t2i_t5") / "t5.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.values())   # the zoo's 40 MB
    _ship_random_t2i(seed=1)
    with pytest.raises(ResourceUnavailable, match="train t2i_t5"):
        models.load("t2i_t5")


def test_shipped_t2i_t5_gates_on_fresh_prompts():
    card = shipped("t2i_t5")
    tuned, orc = models.load("t2i_t5"), models.load("oracle")
    fid = t2i.fidelity(tuned, orc, n=100, seed=424_250)
    for k, g in card["gates"].items():
        assert fid[k] >= g["threshold"], (k, fid[k])


def test_shipped_t2i_action_gates_on_fresh_prompts():
    card = shipped("t2i_action")
    tuned, orc = models.load("t2i_action"), models.load("oracle")
    fid = t2i.fidelity(tuned, orc, n=100, seed=424_248)
    fid["action_accuracy"] = t2i_action.action_accuracy(tuned, orc, n=96, seed=424_249)
    for k, g in card["gates"].items():
        assert fid[k] >= g["threshold"], (k, fid[k])


def test_shipped_t2i_ft_gates_on_fresh_prompts():
    card = shipped("t2i_ft")
    base, tuned, orc = models.load("t2i"), models.load("t2i_ft"), models.load("oracle")
    fid = t2i.fidelity(tuned, orc, n=100, seed=424_246)
    fid["large_share_rise"] = (t2i_ft.large_share(tuned, orc, n=100, seed=424_247)
                               - t2i_ft.large_share(base, orc, n=100, seed=424_247))
    for k, g in card["gates"].items():
        assert fid[k] >= g["threshold"], (k, fid[k])


def test_t2i_sample_seeded_gives_each_block_the_noise_of_its_own_call():
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = t2i.text_encoder_of(clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)))
    model = t2i.untrained(text, tok)
    a, b = model.encode(["a red circle", "a blue square", "a green star"]), model.encode(["a red square"])
    for eta in (1.0, 0.0):  # stochastic steps: the step noise follows each block's seed too
        got = model.sample_seeded([a, b, a[:1]], [3, 5, 3], steps=3, eta=eta)
        want = [model.sample(a, seed=3, steps=3, eta=eta), model.sample(b, seed=5, steps=3, eta=eta),
                model.sample(a[:1], seed=3, steps=3, eta=eta)]
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want))
    assert not torch.allclose(got[0][:1], model.sample(a[:1], seed=4, steps=3, eta=0.0), atol=1e-2)  # the seed matters
    assert torch.equal(model.sample_seeded([b], [5], steps=3)[0], model.sample(b, seed=5, steps=3))  # one block
    u = model.encode(["a star"])  # each block's own unconditional branch
    got = model.sample_seeded([a, b], [3, 5], steps=3, unconds=[u, u.expand(1, -1, -1)])
    assert torch.allclose(got[0], model.sample(a, seed=3, steps=3, uncond=u), atol=1e-4)
    assert not torch.allclose(got[1], model.sample(b, seed=5, steps=3), atol=1e-2)
    with pytest.raises(BadParameter, match="one seed"):
        model.sample_seeded([a, b], [1])
