"""interplab.conditioning: diffusion scores, CLP / WiCLP, SWITCH-OFF on the zoo's t2i architecture."""
import pytest
import torch

from interplab import conditioning


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
