"""interplab.models.diffusion: one sampler for the toy and Stable Diffusion, SD's architecture as facts."""
import pytest
import torch

from interplab import anatomy, tracing
from interplab.models import tiny_random
from interplab.errors import BadParameter
from interplab.models.diffusion import SD_TEXT, random_sd


def _tiny_sd():
    return tiny_random.stable_diffusion()


def test_sd_text_encoder_is_clip_l_and_paths_resolve():
    _, text = random_sd("v1", width=32, text_layers=2)
    assert text.config.hidden_size == SD_TEXT["v1"]["hidden_size"] == 768
    assert anatomy.resolve(text, "layer[0].attn.out").path == "encoder.layers.0.self_attn.out_proj"
    assert anatomy.resolve(text, "embed").path == "embeddings"


def test_stable_diffusion_samples_decodes_and_traces_with_random_weights():
    pipe = _tiny_sd()
    cond = pipe.encode(["a red star", "a blue ring"])
    assert cond.shape == (2, 24, 768)
    images = pipe.sample(cond, seed=0, steps=2)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    again = pipe.sample(cond[:1], seed=0, steps=2)
    assert torch.allclose(images[0], again[0], atol=1e-5)         # noise of image i depends on (seed, i) only
    assert pipe.encode_images(images).shape == (2, 4, 8, 8)
    layers = anatomy.items(pipe.unet, "layer")
    out = tracing.trace_unet_layers(pipe, cond[:1], cond[1:], [layers[1], layers[28]], steps=2)
    assert out.shape == (4, 3, 8, 8)
    assert not torch.equal(out[2], out[1]) and torch.allclose(out[:2], tracing.sample_rows(pipe, cond, steps=2), atol=1e-5)


def test_composed_conditionings_are_a_sum_of_guidance_terms():
    pipe = _tiny_sd()
    cond = pipe.encode(["a red star", "a blue ring"])
    plain = pipe.sample(cond, seed=0, steps=2, guidance=3.0)
    assert torch.allclose(pipe.sample(cond[:, None], seed=0, steps=2, guidance=3.0), plain, atol=1e-5)  # K = 1: CFG
    # the same part twice is CFG at twice the guidance: eps_u + g (2 eps_c - 2 eps_u)
    twice = pipe.sample(torch.stack([cond, cond], 1), seed=0, steps=2, guidance=1.5)
    assert torch.allclose(twice, plain, atol=1e-5)
    both = pipe.sample(torch.stack([cond, cond.flip(0)], 1), seed=0, steps=2, guidance=3.0)
    assert not torch.allclose(both, plain, atol=1e-3)
    with pytest.raises(BadParameter):
        pipe.sample(torch.stack([cond, cond], 1), steps=2, switch=(500, cond))


def _small_sdxl():
    return tiny_random.stable_diffusion_xl()


def test_sdxl_reads_both_towers_penultimate_states_and_the_pooled_second():
    pipe = _small_sdxl()
    prompts = ["a van gogh painting of a bridge", "a photo of a dog"]
    with torch.no_grad():
        cond = pipe.encode(prompts)
        ids = pipe.tokenize(prompts)
        h1 = pipe.text_model(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        second = pipe.text_model_2(input_ids=ids, output_hidden_states=True)
        added = pipe.added_conditions(prompts)
    assert cond.shape == (2, 77, 64) and torch.equal(cond[..., :32], h1) and torch.equal(cond[..., 32:], second.hidden_states[-2])
    assert torch.equal(added["text_embeds"], second.text_embeds) and added["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
    assert torch.equal(pipe.uncond_conditioning(), torch.zeros(1, 77, 64))
    with pytest.raises(Exception, match="added="):
        pipe.sample(cond, steps=1)


def test_sdxl_generates_and_locogen_windows_at_index_45_alter_only_what_they_name():
    from interplab import anatomy, conditioning
    pipe = _small_sdxl()
    T, T2 = ["a house in the style of van gogh"], ["a house in the style of painting"]
    with torch.no_grad():
        images = pipe.generate(T * 2, seed=0, steps=2)
        added = pipe.added_conditions(T)
        rows = conditioning.sample_windows(pipe, pipe.encode(T), pipe.encode(T2), [[45, 46, 47]], seed=0, steps=2, added=added)
        plain = pipe.sample(pipe.encode(T), seed=0, steps=2, noise=pipe.draw_noise(1, 0), added=added)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert anatomy.n_xattn(pipe.unet) == 70 and rows.shape == (3, 3, 8, 8)
    assert torch.allclose(rows[0], plain[0], atol=1e-5) and not torch.allclose(rows[2], rows[0], atol=1e-4)


def test_deepfloyd_if_pipeline_steps_with_the_noise_half_and_locogen_projects_t5_states():
    from interplab import anatomy, conditioning
    pipe = tiny_random.deepfloyd_if()
    T, T2 = ["the british monarch"], ["king charles"]
    with torch.no_grad():
        cond = pipe.encode(T)
        out = pipe.unet(torch.randn(1, 3, 8, 8), 10, encoder_hidden_states=cond).sample
        images = pipe.generate(T, seed=0, steps=2)
        rows = conditioning.sample_windows(pipe, cond, pipe.encode(T2), [[0, 1, 2]], seed=0, steps=2)
    assert cond.shape == (1, 16, pipe.unet.config.encoder_hid_dim) and out.shape == (1, 6, 8, 8)
    assert torch.equal(pipe.noise_prediction(out), out[:, :3]) and images.shape == (1, 3, 8, 8)
    assert anatomy.n_xattn(pipe.unet) == 22 and rows.shape == (3, 3, 8, 8) and not torch.allclose(rows[2], rows[0])


def test_sdxl_text_tracing_corrupts_both_towers_and_restores_one_state_in_one():
    from interplab import anatomy
    pipe = _small_sdxl()
    prompt, span = "a red star in the style of van gogh", "van gogh"
    embed = [(anatomy.resolve(pipe.text_model, "embed"), None)]
    embed_2 = [(anatomy.resolve(pipe.text_model_2, "embed"), None)]
    conds, added = tracing.trace_sdxl_text_states(pipe, prompt, span, [embed], [embed_2, []])
    assert conds.shape[0] == added["text_embeds"].shape[0] == added["time_ids"].shape[0] == 5
    clean, corrupted, one_restored, two_restored, nothing = conds
    d1 = pipe.text_model.config.hidden_size
    assert torch.allclose(clean, pipe.encode([prompt])[0], atol=1e-5)
    assert torch.allclose(added["text_embeds"][0], pipe.added_conditions([prompt])["text_embeds"][0], atol=1e-5)
    assert not torch.allclose(corrupted[:, :d1], clean[:, :d1]) and not torch.allclose(corrupted[:, d1:], clean[:, d1:])
    assert torch.allclose(one_restored[:, :d1], clean[:, :d1], atol=1e-5) and torch.equal(one_restored[:, d1:], corrupted[:, d1:])
    assert torch.allclose(two_restored[:, d1:], clean[:, d1:], atol=1e-5) and torch.equal(two_restored[:, :d1], corrupted[:, :d1])
    assert torch.allclose(added["text_embeds"][3], added["text_embeds"][0], atol=1e-5)   # tower 2 restored: its pooled too
    assert torch.equal(nothing, corrupted) and torch.equal(added["text_embeds"][4], added["text_embeds"][1])
    images = tracing.sample_rows(pipe, conds[:2], added={k: v[:2] for k, v in added.items()}, steps=2, batch_size=1)
    assert images.shape[:2] == (2, 3) and not torch.allclose(images[0], images[1])


def test_sdxl_unet_tracing_carries_the_pooled_conditioning_and_batches_like_one_at_a_time():
    from interplab import anatomy
    pipe = _small_sdxl()
    conds, added = tracing.trace_sdxl_text_states(pipe, "a red star in the style of van gogh", "van gogh")
    layers = anatomy.items(pipe.unet, "layer")
    picks = [layers[0], layers[5], layers[-1]]
    batched = tracing.trace_unet_layers(pipe, conds[:1], conds[1:2], picks, steps=2, batch_size=2, added=added)
    assert batched.shape[0] == 2 + len(picks)
    base = tracing.sample_rows(pipe, conds, added=added, steps=2)
    assert torch.allclose(batched[:2], base, atol=1e-5)
    alone = tracing.trace_unet_layers(pipe, conds[:1], conds[1:2], picks[1:2], steps=2, added=added)
    assert torch.allclose(batched[3], alone[2], atol=1e-5)


@pytest.mark.parametrize("cls", ["StableDiffusion", "StableDiffusionXL", "DeepFloydIF", "PixArtAlpha",
                                 "StableDiffusion3", "Flux", "ClipScore", "DeepFloydIFStageII"])
def test_offline_pipelines_name_the_hf_command(cls, monkeypatch, tmp_path):
    """huggingface_hub >= 1 ships the ``hf`` command only; the hint must be one a user can run."""
    from interplab.errors import ResourceUnavailable
    from interplab.models import diffusion
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ResourceUnavailable, match="`hf download "):
        if cls == "DeepFloydIFStageII":
            diffusion.DeepFloydIFStageII.from_pretrained(tiny_random.deepfloyd_if(), device="cpu")
        else:
            getattr(diffusion, cls).from_pretrained(device="cpu")


def test_pixart_and_sd3_configs_are_the_released_models():
    """Built on the meta device from the facts in models.diffusion: PixArt-alpha's 0.6 B DiT (28 blocks with
    cross-attention from T5's 4096-wide states into 1152) and SD3 medium's 2 B MMDiT (24 joint blocks, text
    sequence 4096 wide projected to 1536, pooled 2048)."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    from interplab.models.diffusion import PIXART_TRANSFORMER, SD3_TRANSFORMER
    with torch.device("meta"):
        pixart, sd3 = PixArtTransformer2DModel(**PIXART_TRANSFORMER), SD3Transformer2DModel(**SD3_TRANSFORMER)
    assert sum(p.numel() for p in pixart.parameters()) == 611_349_152
    assert len(pixart.transformer_blocks) == 28 and pixart.use_additional_conditions  # the 1024 model
    assert pixart.caption_projection.linear_1.in_features == 4096
    assert all(b.attn2.to_k.in_features == 1152 and b.attn2.heads == 16 for b in pixart.transformer_blocks)
    assert sum(p.numel() for p in sd3.parameters()) == 2_028_328_000
    assert len(sd3.transformer_blocks) == 24 and sd3.transformer_blocks[-1].context_pre_only
    assert (sd3.context_embedder.in_features, sd3.context_embedder.out_features) == (4096, 1536)
    assert sd3.time_text_embed.text_embedder.linear_1.in_features == 2048


def test_pixart_never_reads_masked_padding_and_samples_alike_in_any_batch():
    pipe = tiny_random.pixart_alpha()
    prompts = ["a red book and a yellow vase", "a cat"]
    cond, added = pipe.encode(prompts), pipe.added_conditions(prompts)
    mask = added["encoder_attention_mask"]
    assert cond.shape == (2, 16, 32) and mask[1].sum() < mask[0].sum() < 16
    z, t = torch.randn(2, *pipe.latent_shape), torch.tensor([500, 500])
    noisy = cond + 10 * torch.randn_like(cond) * (1 - mask)[..., None]   # change only what the mask hides
    with torch.no_grad():
        assert torch.allclose(pipe.denoise(z, t, cond, added), pipe.denoise(z, t, noisy, added), atol=1e-5)
        assert not torch.allclose(pipe.denoise(z, t, cond), pipe.denoise(z, t, noisy), atol=1e-3)
    images = pipe.sample(cond, seed=0, steps=3, added=added)
    assert images.shape == (2, 3, 8, 8)
    # DPM-Solver keeps a history: one solver per batch, so batches of one give the same images
    assert torch.allclose(pipe.sample(cond, seed=0, steps=3, added=added, batch_size=1), images, atol=1e-5)
    with pytest.raises(BadParameter):
        pipe.sample(cond, steps=3, added=added, eta=1.0)
    size_conditioned = tiny_random.pixart_alpha(use_additional_conditions=True)
    assert size_conditioned.generate(prompts[:1], steps=2).shape == (1, 3, 8, 8)


def test_sd3_conditions_on_padded_clip_then_t5_and_pooled_projections():
    pipe = tiny_random.stable_diffusion_3()
    prompts = ["a red book and a yellow vase", "a cat"]
    cond, added = pipe.encode(prompts), pipe.added_conditions(prompts)
    assert cond.shape == (2, 77 + 8, 64) and added["pooled_projections"].shape == (2, 16 + 24)
    assert cond[:, :77, 16 + 24:].abs().max() == 0                     # CLIP-L ; CLIP-G, zero-padded to T5's width
    ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(cond[:, 77:], pipe.text_model_3(input_ids=ids).last_hidden_state, atol=1e-6)
    with pytest.raises(BadParameter):
        pipe.denoise(torch.zeros(1, *pipe.latent_shape), 500, cond[:1])
    images = pipe.sample(cond, seed=0, steps=3, added=added)
    assert images.shape == (2, 3, 8, 8)
    assert torch.allclose(pipe.sample(cond, seed=0, steps=3, added=added, batch_size=1), images, atol=1e-5)


def test_rectified_flow_noise_and_target_agree_with_the_eps_the_losses_use():
    from interplab import conditioning, lora
    sched = tiny_random.stable_diffusion_3().training_scheduler()
    x0, eps = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    t = torch.tensor([0, 400, 999])
    zt = sched.add_noise(x0, eps, t)
    assert torch.allclose(zt[0], x0[0]) and torch.allclose(zt[1], 0.6 * x0[1] + 0.4 * eps[1], atol=1e-6)
    v = lora.denoising_target(sched, x0, eps, t)
    assert torch.allclose(conditioning.predicted_noise(sched, v, zt, t), eps, atol=1e-5)


@pytest.mark.parametrize("family", ["stable_diffusion_xl", "pixart_alpha", "stable_diffusion_3"])
def test_wiclp_trains_with_each_familys_added_conditioning_and_starts_as_a_no_op(family):
    """Table 9.2's WiCLP on SD-XL, PixArt-alpha and SD3: the identity projection samples the same images bit
    for bit; fitting it (their pooled text / mask held fixed) moves only the projection."""
    from interplab import conditioning
    pipe = getattr(tiny_random, family)()
    prompts = ["a red book and a yellow vase", "a blue bear and a brown boat"]
    cond, added = pipe.encode(prompts), pipe.added_conditions(prompts)
    proj = conditioning.WindowProjection(cond.shape[-1], 1)
    with torch.no_grad():
        assert torch.equal(pipe.sample(proj(cond), seed=0, steps=2, added=added), pipe.sample(cond, seed=0, steps=2, added=added))
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    latents = torch.randn(2, 1, *pipe.latent_shape)
    proj, losses = conditioning.fit_conditioning(pipe, cond, latents, transform=proj, steps=2, lr=1e-2, batch_size=2,
                                                 progress=False, added=added)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(proj.linear.weight, conditioning.WindowProjection(cond.shape[-1], 1).linear.weight)
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters()))


def test_if_stage_2_is_the_released_upscaler_and_rereads_the_unaltered_prompt():
    """IF-II-L's config as facts (1.2 B parameters on the meta device); attached to stage I, sample() upscales
    stage I's images under the conditioning it was given, so a LocoGen window (hooks on stage I's UNet) changes
    the 64 px image that stage II then re-reads with the original prompt."""
    from diffusers import UNet2DConditionModel

    from interplab import conditioning
    from interplab.models.diffusion import sd_unet_config
    with torch.device("meta"):
        full = UNet2DConditionModel(**sd_unet_config("if-ii"))
    assert sum(p.numel() for p in full.parameters()) == 1_187_608_070
    assert full.conv_in.in_channels == 6 and full.class_embedding is not None
    assert [type(b).__name__ for b in full.down_blocks][-2:] == ["SimpleCrossAttnDownBlock2D"] * 2
    stage_1 = tiny_random.deepfloyd_if()
    stage_2 = tiny_random.deepfloyd_if_stage_2(stage_1)
    stage_2.sampler = dict(steps=2, guidance=4.0, eta=0.0)
    cond = stage_1.encode(["a red star", "a blue ring"])
    low = stage_1.sample(cond, seed=0, steps=2)
    stage_1.stage_2 = stage_2
    high = stage_1.sample(cond, seed=0, steps=2)
    assert low.shape == (2, 3, 8, 8) and high.shape == (2, 3, 32, 32)
    assert torch.equal(high, stage_2.upscale(low, cond, seed=0))
    assert not torch.allclose(high, stage_2.upscale(low.flip(0), cond, seed=0), atol=1e-3)  # it reads the image
    with pytest.raises(BadParameter):
        stage_2.denoise(torch.zeros(1, 3, 32, 32), 500, cond[:1])
    every = list(range(len(anatomy.items(stage_1.unet, "xattn"))))
    # rows: clean, every layer reading the other prompt, the empty window, the window of every layer
    windows = conditioning.sample_windows(stage_1, cond[:1], cond[1:], [[], every], steps=2)
    assert windows.shape == (4, 3, 32, 32)
    assert torch.allclose(windows[2], windows[0], atol=1e-5) and torch.allclose(windows[3], windows[1], atol=1e-5)
    assert not torch.allclose(windows[1], windows[0], atol=1e-3)


def test_flux_is_the_released_guidance_distilled_model_and_packs_latents_inside_denoise():
    """FLUX.1-dev's config as facts (11.9 B parameters on the meta device); one transformer pass per step with the
    guidance value as an input, so an unconditional branch or composed conditionings are refused; the 2 x 2 token
    packing is internal: a denoiser that returns its input token-wise gives the latents back."""
    from diffusers import FluxTransformer2DModel

    from interplab.models.diffusion import FLUX_TRANSFORMER
    with torch.device("meta"):
        full = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    assert sum(p.numel() for p in full.parameters()) == 11_901_408_320
    assert (len(full.transformer_blocks), len(full.single_transformer_blocks)) == (19, 38)
    pipe = tiny_random.flux()
    prompts = ["a red book and a yellow vase", "a cat"]
    cond, added = pipe.encode(prompts), pipe.added_conditions(prompts)
    assert cond.shape == (2, 8, 32) and added["pooled_projections"].shape == (2, 16)
    images = pipe.sample(cond, seed=0, steps=3, added=added)
    assert images.shape == (2, 3, 8, 8)
    assert torch.allclose(pipe.sample(cond, seed=0, steps=3, added=added, batch_size=1), images, atol=1e-5)
    assert not torch.allclose(pipe.sample(cond, seed=0, steps=3, added=added, guidance=8.0), images, atol=1e-4)
    for bad in (dict(uncond=cond[:1]), dict(switch=(800, cond)), dict(eta=1.0)):
        with pytest.raises(BadParameter):
            pipe.sample(cond, steps=2, added=added, **bad)
    z = torch.randn(2, *pipe.latent_shape)
    pipe.unet.forward = lambda hidden_states, **kw: type("Out", (), {"sample": hidden_states})()
    assert torch.equal(pipe.denoise(z, 500, cond, dict(added, guidance=torch.ones(2))), z)
