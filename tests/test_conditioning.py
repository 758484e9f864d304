"""interplab.conditioning and interplab.guidance: diffusion scores, CLP / WiCLP, SWITCH-OFF, Composable Diffusion and
Attend-and-Excite on the zoo's t2i architecture."""
import math

import pytest
import torch

from interplab import anatomy, conditioning, guidance
from interplab.errors import BadParameter


def _toy():
    from interplab import toyworld as tw
    from interplab.zoo import clip, t2i
    torch.manual_seed(0)
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval().text_model
    return t2i.untrained(text, tok)


@pytest.mark.parametrize("s", [0, 1, 2])
def test_window_projection_starts_at_the_identity_and_sees_exactly_its_window(s):
    proj = conditioning.WindowProjection(8, s)
    c = torch.randn(2, 6, 8)
    with torch.no_grad():
        assert torch.equal(proj(c), c)                                   # bit for bit
        win = proj.window(c)
    assert win.shape == (2, 6, (2 * s + 1) * 8)
    assert torch.equal(win[:, 3, s * 8:(s + 1) * 8], c[:, 3])           # the centre block is the token itself
    if s:
        assert torch.equal(win[:, 0, :8], torch.zeros(2, 8))            # zero padding before token 0
        assert torch.equal(win[:, 3, :8], c[:, 3 - s])                  # leftmost neighbour i - s
        assert torch.equal(win[:, 3, -8:], c[:, 3 + s])                 # rightmost neighbour i + s


def test_identity_projection_leaves_generation_unchanged_and_switch_off_swaps_late_steps():
    pipe = _toy()
    cond = pipe.encode(["a red striped circle", "a blue ring"])
    proj = conditioning.WindowProjection(cond.shape[-1], 1)
    with torch.no_grad():
        base = pipe.sample(cond, seed=0, steps=3)
        assert torch.equal(pipe.sample(proj(cond), seed=0, steps=3), base)
        other = pipe.encode(["a green heart", "a cyan star"])
        never = pipe.sample(cond, seed=0, steps=3, switch=(-1, other))          # tau below every step
        always = pipe.sample(cond, seed=0, steps=3, switch=(10_000, other))     # every step is late
    assert torch.equal(never, base) and torch.equal(always, pipe.sample(other, seed=0, steps=3))


def test_diffusion_score_shares_its_draws_across_captions_and_is_deterministic():
    pipe = _toy()
    images = torch.rand(2, 3, 32, 32)
    conds = pipe.encode(["a red circle", "a blue star", "a red circle"])
    d = conditioning.diffusion_score(pipe, images, conds, n=4)
    assert d.shape == (2, 3) and torch.equal(d[:, 0], d[:, 2])           # same draws: identical captions tie
    assert torch.equal(d, conditioning.diffusion_score(pipe, images, conds, n=4))


def test_sds_gradient_reaches_the_student_and_not_the_teacher():
    pipe = _toy()
    for p in pipe.unet.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(64, 8 * 8 * 8)              # h_w: an image embedding -> a latent
    emb = torch.randn(2, 64, requires_grad=True)       # stands for the CLIP image embedding f_phi(x)
    z = head(emb).view(2, *pipe.latent_shape)
    loss = conditioning.sds_loss(pipe, z, pipe.encode(["a red circle", "a blue star"]), torch.Generator().manual_seed(0))
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0 and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_predicted_noise_recovers_eps_from_the_exact_v():
    from interplab.zoo import t2i
    sched = _toy().training_scheduler()
    x0, eps, t = torch.randn(3, 12, 4, 4), torch.randn(3, 12, 4, 4), torch.tensor([5, 500, 990])
    zt = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    assert t2i.SCHEDULE["prediction_type"] == "v_prediction"
    assert torch.allclose(conditioning.predicted_noise(sched, v, zt, t), eps, atol=1e-4)


# ---------------------------------------------------------------- LocoGen and neuron editing (Chapter 5, part II)


def test_altered_cross_attention_identity_noop_and_every_layer_equals_generating_from_the_other_prompt():
    pipe = _toy()
    cond, alt = pipe.encode(["a red striped circle"]), pipe.encode(["a blue dotted heart"])
    every = {i: [0] for i in range(10)}
    with torch.no_grad():
        base = pipe.sample(cond, seed=0, steps=3)
        with conditioning.altered_cross_attention(pipe.unet, every, cond):     # c' = c: nothing changes
            assert torch.equal(pipe.sample(cond, seed=0, steps=3), base)
        with conditioning.altered_cross_attention(pipe.unet, every, alt):      # m = M: generation from T'
            swapped = pipe.sample(cond, seed=0, steps=3)
        assert torch.allclose(swapped, pipe.sample(alt, seed=0, steps=3), atol=1e-6)
        with conditioning.altered_cross_attention(pipe.unet, {4: [0]}, alt):   # one layer: a third image
            one = pipe.sample(cond, seed=0, steps=3)
    assert not torch.allclose(one, base) and not torch.allclose(one, swapped)


def test_altered_cross_attention_touches_only_the_conditional_rows_it_names():
    pipe = _toy()
    path = conditioning._xattn_path(pipe.unet, 3)
    assert path == "mid_block.attentions.0.transformer_blocks.0.attn2"
    x = pipe.encode(["a red circle", "a blue star", "a green heart"])
    batch = torch.cat([pipe.encode([""]).expand(3, -1, -1), x])              # [uncond x 3, cond x 3]
    alt = torch.randn(3, *x.shape[1:])
    from interplab import hooks
    with torch.no_grad(), conditioning.altered_cross_attention(pipe.unet, {3: [1]}, alt), \
            hooks.trace(pipe.unet, [path], at="input:encoder_hidden_states") as seen:
        pipe.unet(torch.randn(6, *pipe.latent_shape), 500, encoder_hidden_states=batch)
    got = seen[path]
    assert torch.equal(got[4], alt[1])                                      # cond row of sample 1
    keep = [0, 1, 2, 3, 5]
    assert torch.equal(got[keep], batch[keep])                              # uncond half and other samples
    with pytest.raises(Exception, match="out of range"):
        conditioning._xattn_path(pipe.unet, 10)


def test_adjacent_windows_include_the_last_and_never_clip():
    w = conditioning.adjacent_windows(10, 3)
    assert len(w) == 8 and w[0] == [0, 1, 2] and w[-1] == [7, 8, 9]
    assert conditioning.adjacent_windows(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(Exception, match="window size"):
        conditioning.adjacent_windows(4, 5)


def test_sample_windows_rows_are_clean_all_altered_and_one_per_window():
    pipe = _toy()
    cond, alt = pipe.encode(["a red striped circle"]), pipe.encode(["a blue dotted heart"])
    windows = [[0, 1], [8, 9], list(range(10))]
    with torch.no_grad():
        imgs = conditioning.sample_windows(pipe, cond, alt, windows, seed=3, steps=3)
        noise = pipe.draw_noise(1, 3)
        clean = pipe.sample(cond, seed=3, steps=3, noise=noise)
        other = pipe.sample(alt, seed=3, steps=3, noise=noise)
    assert imgs.shape == (5, 3, 32, 32)
    assert torch.allclose(imgs[0], clean[0], atol=1e-5) and torch.allclose(imgs[1], other[0], atol=1e-5)
    assert torch.allclose(imgs[4], imgs[1], atol=1e-6)                      # the window of every layer
    assert not torch.allclose(imgs[2], imgs[0], atol=1e-3)
    with torch.no_grad():   # two loops of 2 + 2 rows give the same images as one loop of 2 + 3
        chunked = conditioning.sample_windows(pipe, cond, alt, windows, seed=3, steps=3, batch_size=4)
    assert chunked.shape == imgs.shape and torch.allclose(chunked, imgs, atol=1e-5)
    with pytest.raises(BadParameter, match="batch_size"):
        conditioning.sample_windows(pipe, cond, alt, windows, seed=3, steps=3, batch_size=2)


def test_sample_window_pairs_equal_each_pairs_own_sample_windows():
    pipe = _toy()
    conds = pipe.encode(["a red striped circle", "a green plain star", "a blue dotted heart"])
    alts = pipe.encode(["a blue dotted heart", "a red plain star", "a green striped circle"])
    windows = [[0, 1], [8, 9]]
    with torch.no_grad():
        alone = [conditioning.sample_windows(pipe, conds[p:p + 1], alts[p:p + 1], windows, seed=s, steps=3)
                 for p, s in enumerate((3, 4, 9))]
        together = conditioning.sample_window_pairs(pipe, conds, alts, windows, [3, 4, 9], batch_size=8, steps=3)
        one_by_one = conditioning.sample_window_pairs(pipe, conds, alts, windows, [3, 4, 9], batch_size=4, steps=3)
    assert together.shape == (3, 4, 3, 32, 32)                              # two pairs per loop, then one
    assert torch.allclose(together, torch.stack(alone), atol=1e-4)
    assert torch.allclose(one_by_one, together, atol=1e-4)
    assert not torch.allclose(together[0, 0], together[1, 0], atol=1e-2)     # each pair its own seed and prompt
    with pytest.raises(BadParameter, match="as many"):
        conditioning.sample_window_pairs(pipe, conds, alts[:2], windows, [3, 4, 9])


def test_select_window_takes_the_smallest_m_that_meets_the_threshold():
    scores = {1: [0.9, 0.5, 0.9], 2: [0.9, 0.15]}                           # clean 1.0, all-altered 0.0
    assert conditioning.select_window(scores, 1.0, 0.0) == dict(m=2, j=1, change=0.85, full_change=1.0, met=True)
    low = conditioning.select_window({1: [0.9, 0.5, 0.9]}, 1.0, 0.0)
    assert low["met"] is False and low["j"] == 1 and low["change"] == 0.5
    fact = conditioning.select_window({1: [0.1, 0.95]}, 0.0, 1.0, lower_is_success=False)
    assert fact["j"] == 1 and fact["met"] and abs(fact["change"] - 0.95) < 1e-12


def test_neuron_zscores_match_a_numpy_reference_with_population_std():
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen) + 1, torch.randn(4, 5, generator=gen)
    an, bn = a.double().numpy(), b.double().numpy()
    ref = (an.mean(0) - bn.mean(0)) / np.sqrt(an.std(0) ** 2 / 7 + bn.std(0) ** 2 / 4)   # np.std: ddof=0
    assert np.allclose(conditioning.neuron_zscores(a, b).numpy(), ref, rtol=1e-5)


def test_ablated_neurons_set_only_the_chosen_coordinates_of_the_conditional_rows():
    lin = torch.nn.Linear(4, 6)
    model = torch.nn.Sequential(lin)
    x = torch.randn(4, 3, 4)                                                # [uncond x 2, cond x 2], T = 3
    with torch.no_grad():
        base = model(x)
        with conditioning.ablated_neurons(model, {"0": [1, 4]}):
            zero = model(x)
        means = {"0": torch.arange(6.0)}
        with conditioning.ablated_neurons(model, {"0": [2]}, value=means, rows=[1]):
            mean = model(x)
    changed = (zero != base)
    assert changed[:2].sum() == 0 and torch.equal(zero[2:, :, [1, 4]], torch.zeros(2, 3, 2))
    assert torch.equal(zero[2:][..., [0, 2, 3, 5]], base[2:][..., [0, 2, 3, 5]])
    assert torch.equal(mean[3, :, 2], torch.full((3,), 2.0))
    assert torch.equal(mean[:3], base[:3])                                 # other rows untouched
    assert torch.equal(mean[3][..., [0, 1, 3, 4, 5]], base[3][..., [0, 1, 3, 4, 5]])


def test_altered_cross_attention_projects_the_alternative_text_of_an_if_unet():
    from diffusers import UNet2DConditionModel
    from interplab.models.diffusion import sd_unet_config
    unet = UNet2DConditionModel(**sd_unet_config("if", 32)).eval()
    gen = torch.Generator().manual_seed(0)
    x, c, c2 = (torch.randn(*s, generator=gen) for s in ((2, 3, 16, 16), (2, 4, 64), (2, 4, 64)))
    every = {i: [0] for i in range(22)}
    with torch.no_grad():
        base = unet(x, 5, encoder_hidden_states=c).sample
        with conditioning.altered_cross_attention(unet, every, c[1:]):   # raw T5-width states, projected inside
            same = unet(x, 5, encoder_hidden_states=c).sample
        with conditioning.altered_cross_attention(unet, every, c2[1:]):
            altered = unet(x, 5, encoder_hidden_states=c).sample
        other = unet(x, 5, encoder_hidden_states=c2).sample
    assert torch.allclose(same, base, atol=1e-6)                           # c' = c: nothing changes
    assert torch.equal(altered[0], base[0])                                # the uncond row is untouched
    # every attention reads T', yet the text-time embedding still pools T: not the same as generating from T'
    assert not torch.allclose(altered[1], base[1], atol=1e-4) and not torch.allclose(altered[1], other[1], atol=1e-4)


def test_the_pre_hook_equals_the_releases_to_k_to_v_output_hook_on_sd_v1():
    from interplab import anatomy, hooks
    from interplab.models.diffusion import random_sd
    unet, _ = random_sd("v1", width=32, text_layers=1)
    gen = torch.Generator().manual_seed(0)
    x, c, c2 = (torch.randn(*s, generator=gen) for s in ((2, 4, 16, 16), (2, 5, 768), (1, 5, 768)))
    layer = anatomy.items(unet, "xattn")[7]
    attn = unet.get_submodule(layer)

    def release_hook(projected):   # the release: overwrite output[1] (the cond row) with emb @ W^T
        return lambda h: h.index_put((torch.tensor([1]),), projected)
    with torch.no_grad():
        k2, v2 = attn.to_k(c2), attn.to_v(c2)
        with conditioning.altered_cross_attention(unet, {7: [0]}, c2):
            ours = unet(x, 5, encoder_hidden_states=c).sample
        with hooks.edit(unet, f"{layer}.to_k", release_hook(k2)), hooks.edit(unet, f"{layer}.to_v", release_hook(v2)):
            theirs = unet(x, 5, encoder_hidden_states=c).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_fit_conditioning_trains_only_the_conditioning_or_the_projection():
    pipe = _toy()
    cond = pipe.encode(["a red circle and a blue square", "a green heart"])
    latents = torch.randn(2, 3, *pipe.latent_shape)                      # 3 "renders" per prompt
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    c_star, losses = conditioning.fit_conditioning(pipe, cond, latents, steps=3, batch_size=4, progress=False)
    assert c_star.shape == cond.shape and not torch.equal(c_star, cond) and len(losses) == 3
    proj = conditioning.WindowProjection(cond.shape[-1], 1)
    trained, _ = conditioning.fit_conditioning(pipe, cond, latents, transform=proj, steps=2, batch_size=4, progress=False)
    assert trained is proj and not torch.equal(proj.linear.bias, torch.zeros_like(proj.linear.bias))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())      # the UNet never moves
    assert all(p.requires_grad for p in pipe.unet.parameters())                          # and is unfrozen after


def test_sds_clip_trains_layer_norms_and_h_w_only_and_its_sds_gradient_reaches_the_image_tower():
    from interplab import distillation
    from interplab import toyworld as tw
    from interplab.zoo import clip
    pipe = _toy()
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    teacher_clip = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval()
    student = distillation.SdsClip(teacher_clip, pipe.latent_shape)
    assert torch.equal(student.h_w.weight, torch.zeros_like(student.h_w.weight))
    trainable = {id(p) for p in student.trainable()}
    assert trainable == {id(p) for p in distillation.layer_norms(student.clip)} | {id(p) for p in student.h_w.parameters()}
    frozen_before = {k: v.clone() for k, v in student.clip.state_dict().items() if "norm" not in k}
    original = {k: v.clone() for k, v in teacher_clip.state_dict().items()}
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def batches(rng):
        return torch.rand(4, 3, 32, 32, generator=gen), ["a red circle", "a blue square", "a red circle", "a cyan star"]
    losses = distillation.finetune(student, lambda c: tw.encode(tok, c)[0], pipe, batches, lam=1.0, steps=2, progress=False)
    assert len(losses) == 2 and losses[0][1] > 0
    assert not torch.equal(student.h_w.weight, torch.zeros_like(student.h_w.weight))      # L_SDS reached h_w
    assert all(torch.equal(v, frozen_before[k]) for k, v in student.clip.state_dict().items() if k in frozen_before)
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, original[k]) for k, v in teacher_clip.state_dict().items())  # the student is a copy


def test_chunked_sds_equals_one_pass_and_finetune_with_chunks_matches_without():
    from interplab import distillation
    from interplab import toyworld as tw
    from interplab.zoo import clip
    pipe = _toy()
    z = torch.randn(5, *pipe.latent_shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cond = pipe.encode(["a red circle", "a blue square", "a cyan star", "a red star", "a blue circle"])
    loss = conditioning.sds_loss(pipe, z, cond, torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(loss, z)
    for chunk in (1, 2, 5):
        l_c, g_c = conditioning.sds_loss_and_grad(pipe, z, cond, torch.Generator().manual_seed(3), chunk)
        torch.testing.assert_close(l_c, loss.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_c, grad, rtol=1e-5, atol=1e-9)
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    torch.manual_seed(0)
    base = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    caps = ["a red circle", "a blue square", "a red circle", "a cyan star"]
    students, losses = [], []
    for chunk in (None, 3):
        student = distillation.SdsClip(base, pipe.latent_shape)
        losses.append(distillation.finetune(student, lambda c: tw.encode(tok, c)[0], pipe, lambda rng: (images, caps),
                                            lam=1.0, steps=2, progress=False, sds_chunk=chunk))
        students.append(student)
    assert [x for row in losses[0] for x in row] == pytest.approx([x for row in losses[1] for x in row], rel=1e-5)
    for a, b in zip(students[0].trainable(), students[1].trainable()):
        # Adam moves an entry by ~lr (1e-3) whatever its gradient's size, so entries whose gradient is at rounding
        # level may differ by a fraction of a step; all others agree to 1e-6
        diff = (a - b).abs()
        assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3
    assert not torch.equal(students[1].h_w.weight, torch.zeros_like(students[1].h_w.weight))


def test_cross_attention_maps_are_distributions_over_tokens_read_by_each_pixel():
    pipe = _toy()
    cond = pipe.encode(["a red circle and a blue square", "a green heart"])
    with torch.no_grad():
        maps, images = conditioning.cross_attention_maps(pipe, cond, 0, seed=0, steps=2)
        before = pipe.sample(cond, seed=0, steps=2)
    assert torch.equal(images, before)                                  # the images of the same sampling
    assert maps.shape == (2, cond.shape[1], 8, 8) and (maps >= 0).all()
    assert torch.allclose(maps.sum(1), torch.ones(2, 8, 8), atol=1e-5)   # every pixel's attention sums to 1
    assert torch.equal(pipe.sample(cond, seed=0, steps=2), before)        # the hook is gone afterwards


def test_cross_attention_maps_average_the_layers_of_one_resolution_and_refuse_mixed_ones():
    from interplab.errors import BadParameter
    pipe = _toy()
    cond = pipe.encode(["a red circle and a blue square"])
    paths = anatomy.items(pipe.unet, "xattn")
    with torch.no_grad():
        one = [conditioning.cross_attention_maps(pipe, cond, i, seed=0, steps=2)[0] for i in (0, 8)]   # both 8 x 8
        both, _ = conditioning.cross_attention_maps(pipe, cond, [paths[0], 8], seed=0, steps=2)
        assert one[0].shape == one[1].shape == (1, cond.shape[1], 8, 8)
        assert torch.allclose(both, (one[0] + one[1]) / 2, atol=1e-6) and not torch.allclose(one[0], one[1])
        with pytest.raises(BadParameter, match="resolutions"):
            conditioning.cross_attention_maps(pipe, cond, [0, 1], seed=0, steps=1)


def test_fit_text_encoder_trains_a_copy_of_the_chosen_blocks_and_leaves_the_pipeline_alone():
    pipe = _toy()
    prompts = ["a red circle and a blue square", "a green heart"]
    latents = torch.randn(2, 3, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in pipe.text_model.named_parameters()}
    encode, losses = conditioning.fit_text_encoder(pipe, prompts, latents, last_layers=1, steps=3, lr=1e-2,
                                                   batch_size=4, progress=False)
    assert len(losses) == 3
    assert all(torch.equal(p, before[n]) for n, p in pipe.text_model.named_parameters())   # the pipeline's tower
    tuned = encode.text
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    last = anatomy.items(tuned, "layer")[-1]
    assert changed and all(n.startswith((last, "final_layer_norm")) for n in changed)
    c = encode(prompts)
    assert c.shape == pipe.encode(prompts).shape and not torch.allclose(c, pipe.encode(prompts))
    proj = conditioning.WindowProjection(c.shape[-1], 1)
    encode2, _ = conditioning.fit_text_encoder(pipe, prompts, latents, last_layers=1, transform=proj, steps=2,
                                               lr=1e-2, batch_size=4, progress=False)
    assert not torch.equal(proj.linear.weight[:, c.shape[-1]:2 * c.shape[-1]], torch.eye(c.shape[-1]))  # trained jointly


def test_composed_splits_conjuncts_and_pads_with_the_unconditional_conditioning():
    pipe = _toy()
    prompts = ["a red circle and a blue square", "a green star"]
    cond = conditioning.composed(pipe, prompts)
    assert cond.shape == (2, 2, *pipe.encode(["a"]).shape[1:])
    assert torch.allclose(cond[0], pipe.encode(["a red circle", "a blue square"]), atol=1e-6)
    assert torch.allclose(cond[1, 0], pipe.encode(["a green star"])[0], atol=1e-6)
    assert torch.allclose(cond[1, 1], pipe.uncond_conditioning()[0], atol=1e-6)
    # the padded row samples as its one conjunct alone (the padding's guidance term is zero)
    alone = pipe.sample(pipe.encode(["a green star"]), seed=0, steps=2, noise=pipe.draw_noise(2, 0)[1:])
    padded = pipe.sample(cond[1:], seed=0, steps=2, noise=pipe.draw_noise(2, 0)[1:])
    assert torch.allclose(alone, padded, atol=1e-5)
    with pytest.raises(BadParameter):
        conditioning.composed(pipe, ["a red circle and "])


# ---------------------------------------------------------------- Attend-and-Excite (interplab.guidance)


def test_excite_loss_is_zero_when_every_subject_owns_a_pixel_and_high_when_one_is_neglected():
    # 4 pixels, tokens: BOS, w1, w2, w3, EOS; subjects at 1 and 3
    owned = torch.zeros(1, 4, 5)
    owned[0, 0, 1] = owned[0, 1, 3] = 1.0            # pixel 0 reads w1 only, pixel 1 reads w3 only
    owned[0, 2:, 2] = 1.0
    neglected = owned.clone()
    neglected[0, 1] = 0.0
    neglected[0, 1, 2] = 1.0                         # nobody reads w3 any more
    loss = guidance.excite_loss(torch.cat([owned, neglected]), torch.tensor([[1, 3], [1, 3]]), torch.tensor([4, 4]))
    centre = (1 / (1 + 2 * torch.exp(torch.tensor(-2.0)))) ** 2   # a lone peak keeps the 3 x 3 Gaussian's centre weight
    assert loss[0] == pytest.approx(1 - float(centre), abs=2e-3) and loss[1] > 0.99
    # BOS and EOS never compete: all mass on them leaves the text tokens uniform
    bos_eos = torch.zeros(1, 4, 5)
    bos_eos[0, :, 0] = bos_eos[0, :, 4] = 0.5
    assert guidance.excite_loss(bos_eos, torch.tensor([[1, 3]]), torch.tensor([4])) == pytest.approx(2 / 3, abs=1e-5)


def test_a_gradient_step_on_the_latents_lowers_the_excite_loss():
    pipe = _toy()
    cond = pipe.encode(["a red circle and a blue square"])
    x = pipe.draw_noise(1, 0).requires_grad_(True)
    args = (pipe, x, torch.tensor(500), cond, [[3, 7]], [8], [2, 4, 5])
    before = guidance.excite_loss_at(*args)
    (grad,) = torch.autograd.grad(before.sum(), x)
    after = guidance.excite_loss_at(pipe, x.detach() - 1e-2 * grad / grad.norm(), *args[2:])
    assert after < before


def test_attend_and_excite_only_moves_the_first_steps_and_checks_its_positions():
    pipe = _toy()
    cond = pipe.encode(["a red circle and a blue square", "a blue ring and a red star"])
    plain = pipe.sample(cond, seed=0, steps=2)
    kw = dict(subjects=[[3, 7]] * 2, eos=[8] * 2, layers=[2, 4, 5], seed=0, steps=2)
    assert torch.allclose(guidance.attend_and_excite(pipe, cond, alter_share=0.0, **kw), plain, atol=1e-6)
    assert not torch.allclose(guidance.attend_and_excite(pipe, cond, scale=1e3, **kw), plain, atol=1e-4)
    with pytest.raises(BadParameter):
        guidance.attend_and_excite(pipe, cond, **{**kw, "subjects": [[3, 8]] * 2})


def test_structured_values_align_phrases_and_reduce_to_plain_sampling_when_values_equal_keys():
    pipe = _toy()
    prompts = ["a red circle and a blue square"]
    c, c_bar = conditioning.structured_values(pipe, prompts)
    phrases = pipe.encode(["a red circle", "a blue square"])
    expected = (c[0] + torch.cat([c[0, :1], phrases[0, 1:4], c[0, 4:]]) + torch.cat([c[0, :5], phrases[1, 1:4], c[0, 8:]])) / 3
    torch.testing.assert_close(c_bar[0], expected)     # <bos> a red circle | and | a blue square | <eos> ...
    plain = pipe.sample(c, seed=0, steps=2)
    assert torch.allclose(conditioning.sample_structured(pipe, c, c, seed=0, steps=2), plain, atol=1e-6)
    assert not torch.allclose(conditioning.sample_structured(pipe, c, c_bar, seed=0, steps=2), plain, atol=1e-4)
    with pytest.raises(BadParameter, match="not found"):
        conditioning._span_of([1, 2, 3], [4])


def test_feature_distillation_regresses_h_w_onto_frozen_unet_features_without_moving_the_unet():
    from interplab import distillation
    from interplab import toyworld as tw
    from interplab.zoo import clip
    pipe = _toy()
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = pipe.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        z = pipe.encode_images(images)
        out = pipe.denoise(z, torch.full((2,), 200), cond)
    assert torch.allclose(distillation.unet_features(pipe, images, cond, t=200), out)      # Eq. 11.19 as written
    mid = distillation.unet_features(pipe, images, cond, t=200, layer="mid_block")
    assert mid.shape[1:] == distillation.feature_shape(pipe, layer="mid_block") != out.shape[1:]
    # a larger batch is brought to the teacher's side first
    assert distillation.unet_features(pipe, torch.rand(2, 3, 48, 48), cond).shape == out.shape

    student = distillation.SdsClip(clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval(),
                                   distillation.feature_shape(pipe, layer="mid_block"))
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    def batches(rng):
        return images, ["a red circle", "a blue square"]
    losses = distillation.finetune(student, lambda c: tw.encode(tok, c)[0], pipe, batches, lam=1.0, steps=3,
                                   objective="features", feature_layer="mid_block", lr_h=1e-2, progress=False)
    # the first step's loss is ||0 - I||^2: h_w starts at zero
    assert losses[0][1] == pytest.approx(float((mid ** 2).mean()), rel=1e-4)
    assert losses[-1][1] < losses[0][1]
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(ValueError):
        distillation.finetune(student, lambda c: tw.encode(tok, c)[0], pipe, batches, lam=1.0, steps=1,
                              objective="dream", progress=False)


def test_syngen_loss_rewards_a_modifier_sharing_its_nouns_pixels_and_not_the_others():
    # 4 pixels; tokens: BOS, red(1), circle(2), blue(3), square(4), EOS
    bound = torch.full((1, 4, 6), 1e-3)
    bound[0, :2, 1] = bound[0, :2, 2] = 1.0                  # red and circle on pixels 0-1
    bound[0, 2:, 3] = bound[0, 2:, 4] = 1.0                  # blue and square on pixels 2-3
    swapped = bound.clone()
    swapped[0, :, 1], swapped[0, :, 3] = bound[0, :, 3], bound[0, :, 1]   # the colours sit on the other object
    pairs = [[(1, 2), (3, 4)]]
    loss = guidance.syngen_loss(torch.cat([bound, swapped]), pairs * 2)
    assert loss[0] < 0 < loss[1]                             # bound: L_pos ~ 0 and L_neg < 0; swapped: the reverse
    alone = guidance.syngen_loss(bound, [[(1, 2)]])           # one pair, nothing to push away from
    assert alone[0] == pytest.approx(0.0, abs=1e-3)


def test_modifier_pairs_and_syngen_only_move_the_first_steps():
    from interplab import word_order
    from interplab.toyworld import binding
    pipe = _toy()
    prompts = ["a red circle and a blue square", "a circle"]
    pairs = [guidance.modifier_pairs(pipe.tokenizer, binding.TAGGER(p)) for p in prompts]
    assert pairs == [[(2, 3), (6, 7)], []]                    # <bos> a red circle and a blue square <eos>
    assert guidance.modifier_pairs(pipe.tokenizer, word_order.tagged_by(["box", "lid"], [])("the box lid")) == [(2, 3)]
    cond = pipe.encode(prompts)
    plain = pipe.sample(cond, seed=0, steps=2)
    kw = dict(pairs=pairs, layers=[2, 4, 5], seed=0, steps=2)
    assert torch.allclose(guidance.syngen(pipe, cond, alter_share=0.0, **kw), plain, atol=1e-6)
    moved = guidance.syngen(pipe, cond, scale=1e3, **kw)
    assert not torch.allclose(moved[0], plain[0], atol=1e-4)
    assert torch.allclose(moved[1], plain[1], atol=1e-6)     # a prompt without pairs is sampled plainly
    generator = guidance.SynGen(pipe, binding.TAGGER, [2, 4, 5])
    assert torch.allclose(generator.generate(prompts, seed=0, steps=2, scale=1e3), moved, atol=1e-6)
    with pytest.raises(BadParameter):
        guidance.syngen(pipe, cond, **{**kw, "pairs": pairs[:1]})


def _half_sd():
    """The tiny random SD v1 with its UNet and VAE in float16, as the paper profile loads SD (text tower float32)."""
    from interplab.models import tiny_random
    pipe = tiny_random.stable_diffusion()
    pipe.unet.half()
    pipe.vae.half()
    return pipe


def test_sds_through_a_half_precision_unet_runs_in_float32_and_its_gradient_does_not_underflow():
    import copy
    pipe = _half_sd()
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cond = pipe.encode(["a red circle", "a blue star"])
    head = torch.nn.Linear(16, 4 * 8 * 8)                # h_w (float32, trainable)
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))

    def grad(unet_pipe):
        head.zero_grad()
        loss = conditioning.sds_loss(unet_pipe, head(emb).view(2, *pipe.latent_shape), cond, torch.Generator().manual_seed(0))
        (1e-3 * loss).backward()                         # SDS-CLIP's lambda: ~4e-9 per element, below fp16's range
        return head.weight.grad.clone()

    with pytest.raises(BadParameter):                     # a half-precision backward would train nothing: refused
        grad(pipe)
    with conditioning.frozen(pipe.unet), conditioning.float32_modules(pipe.unet):
        assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
        g = grad(pipe)                                     # forward and backward inside the block
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(v.dtype == torch.float16 and torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    reference = copy.copy(pipe)                           # the same weights held in float32 throughout
    reference.unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
    assert torch.allclose(grad(reference), g, rtol=1e-5, atol=0)


def test_fits_through_a_half_precision_unet_train_float32_parameters_with_finite_nonzero_gradients():
    pipe = _half_sd()
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    prompts = ["a red circle and a blue square", "a green heart"]
    cond = pipe.encode(prompts)
    latents = torch.randn(2, 3, *pipe.latent_shape, generator=torch.Generator().manual_seed(0)).half()  # an fp16 VAE's
    proj = conditioning.WindowProjection(cond.shape[-1], 1)
    trained, losses = conditioning.fit_conditioning(pipe, cond, latents, transform=proj, steps=2, batch_size=4,
                                                    progress=False)
    g = proj.linear.weight.grad                           # the last step's gradient (CLP / WiCLP)
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 and all(map(math.isfinite, losses))
    c_star, _ = conditioning.fit_conditioning(pipe, cond, latents, steps=2, batch_size=4, lr=1e-2, progress=False)
    assert c_star.dtype == torch.float32 and torch.isfinite(c_star).all() and not torch.equal(c_star, cond)   # c*
    _, losses = conditioning.fit_text_encoder(pipe, prompts, latents, last_layers=1, steps=1, batch_size=2,
                                              progress=False)                                                 # §9.2.8
    assert all(map(math.isfinite, losses))
    assert all(v.dtype == torch.float16 and torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert all(p.requires_grad for p in pipe.unet.parameters())


def test_float32_modules_restores_each_tensors_dtype_bit_for_bit_and_leaves_float32_alone():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    m[0].half()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = {k: id(p) for k, p in m.named_parameters()}
    with conditioning.float32_modules(m):
        assert all(v.dtype == torch.float32 for v in m.state_dict().values() if v.is_floating_point())
    assert {k: v.dtype for k, v in m.state_dict().items()} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert ids == {k: id(p) for k, p in m.named_parameters()}   # the same Parameter objects
