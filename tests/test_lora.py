"""interplab.lora: LoRA adapters by hooks and GORS's reward-weighted fine-tuning, on the zoo's t2i architecture."""
import pytest
import torch
from torch import nn

from interplab import lora
from interplab.errors import BadParameter


def _toy():
    from interplab import toyworld as tw
    from interplab.zoo import clip, t2i
    torch.manual_seed(0)
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval().text_model
    return t2i.untrained(text, tok)


def test_attention_linears_are_the_projections_of_every_attention_module():
    pipe = _toy()
    unet = lora.attention_linears(pipe.unet)
    assert unet and {p.rsplit(".", 1)[-1] for p in unet} == {"to_q", "to_k", "to_v", "0"}
    assert sum(p.endswith("attn2.to_k") for p in unet) == sum(p.endswith("attn1.to_k") for p in unet)
    text = lora.attention_linears(pipe.text_model)
    n_layers = pipe.text_model.config.num_hidden_layers
    assert len(text) == 4 * n_layers and {p.rsplit(".", 1)[-1] for p in text} == {"q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"}


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_adds_exactly_its_low_rank_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    adapter = lora.LoRA(model, rank=2, scale=0.5, paths=["0", "2"])
    plain = model(x)
    with adapter.attached(model):
        assert torch.equal(model(x), plain)
        with torch.no_grad():
            adapter.up[0].normal_()
        h = torch.relu(model[0](x))   # the hooked layer, called alone
    manual = model[0](x) + 0.5 * x @ adapter.down[0].T @ adapter.up[0].T
    assert torch.allclose(h, torch.relu(manual), atol=1e-6)
    assert torch.equal(model(x), plain)   # detached on exit
    with pytest.raises(BadParameter):
        lora.LoRA(model, paths=["1"])
    with pytest.raises(BadParameter):
        lora.LoRA(nn.Sequential(nn.ReLU()))


def test_merging_writes_the_attached_adapter_into_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    adapter = lora.LoRA(model, rank=2, scale=0.5, paths=["0", "2"])
    with torch.no_grad():
        for up in adapter.up:
            up.normal_()
    x = torch.randn(4, 6)
    with adapter.attached(model):
        hooked = model(x)
    assert not torch.allclose(hooked, model(x))
    assert torch.allclose(adapter.merge(model)(x), hooked, atol=1e-6)


def test_gors_trains_only_the_adapters_and_weights_each_sample_by_its_reward():
    pipe = _toy()
    prompts = ["a red circle and a blue square", "a green heart"]
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in [*pipe.unet.named_parameters(), *pipe.text_model.named_parameters()]}
    cond = pipe.encode(prompts)
    # reward 0 everywhere: the loss is 0, no adapter moves off zero, sampling is unchanged
    idle, losses = lora.gors_finetune(pipe, prompts, latents, [0.0, 0.0], steps=2, batch_size=2, progress=False)
    assert losses == [0.0, 0.0] and all(torch.equal(u, torch.zeros_like(u)) for u in idle.unet.up)
    adapters, losses = lora.gors_finetune(pipe, prompts, latents, [1.0, 0.5], steps=8, batch_size=2, lr=1e-2,
                                          text_lr=1e-2, progress=False)
    assert len(losses) == 8
    assert all(torch.equal(p, before[n]) for n, p in [*pipe.unet.named_parameters(),
                                                      *pipe.text_model.named_parameters()])
    assert any(u.abs().sum() > 0 for u in adapters.unet.up) and any(u.abs().sum() > 0 for u in adapters.text.up)
    with adapters.attached(pipe):
        tuned = pipe.encode(prompts)
    assert not torch.allclose(tuned, cond) and torch.equal(pipe.encode(prompts), cond)
    with pytest.raises(BadParameter):
        lora.gors_finetune(pipe, prompts, latents, [1.0], steps=1, progress=False)
    with pytest.raises(BadParameter):
        lora.gors_finetune(pipe, [], latents[:0], [], steps=1, progress=False)


def test_denoising_target_is_eps_or_the_velocity():
    pipe = _toy()
    sched = pipe.training_scheduler()
    x0, eps, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 500, 999])
    target = lora.denoising_target(sched, x0, eps, t)
    abar = sched.alphas_cumprod[t][:, None]
    expected = eps if sched.config.prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(target, expected, atol=1e-6)


def test_gors_through_a_half_precision_unet_trains_in_float32_with_finite_nonzero_gradients():
    from interplab.models import tiny_random
    pipe = tiny_random.stable_diffusion()
    pipe.unet.half()                                      # as the paper profile loads SD
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    prompts = ["a red circle and a blue square", "a green heart"]
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0)).half()
    adapters, losses = lora.gors_finetune(pipe, prompts, latents, [1.0, 0.5], steps=2, batch_size=2, progress=False)
    grads = [u.grad for u in adapters.unet.up]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(torch.tensor(losses)))
    assert all(v.dtype == torch.float16 and torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
