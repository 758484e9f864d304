"""Our samplers against diffusers' own pipelines: the same random reduced model, the same z_T and the
same solver must give the same images, so the paper profile samples what the released pipelines sample.

IF is compared under our DDIM solver (its release samples with DDPM and a learned variance; see
``DeepFloydIF``); the pipeline only needs to be told to drop the variance channels.
"""
import diffusers
import pytest
import torch

from interplab.models import tiny_random

PROMPTS = ["a red cat", "a blue dog on a sofa"]


def _ours(pipe, z):
    kw = dict(eta=0.0) if pipe.stochastic_steps else {}
    return pipe.generate(PROMPTS, noise=z, steps=4, guidance=pipe.sampler["guidance"], **kw)


def _theirs(ref, pipe, z, **kw):
    ref.set_progress_bar_config(disable=True)
    return ref(PROMPTS, num_inference_steps=4, guidance_scale=pipe.sampler["guidance"], **kw).images


def _sd(pipe):
    return diffusers.StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_model, tokenizer=pipe.tokenizer,
                                             unet=pipe.unet, scheduler=pipe.solver(**pipe.schedule), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False), {}


def _sdxl(pipe):
    ref = diffusers.StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_model, text_encoder_2=pipe.text_model_2,
                                              tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
                                              scheduler=pipe.solver(**pipe.schedule))
    return ref, dict(original_size=(pipe.size, pipe.size), target_size=(pipe.size, pipe.size))


def _pixart(pipe):
    ref = diffusers.PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_model, vae=pipe.vae,
                                        transformer=pipe.unet, scheduler=pipe.solver(**pipe.schedule))
    return ref, dict(use_resolution_binning=False, max_sequence_length=pipe.max_length)


def _sd3(pipe):
    ref = diffusers.StableDiffusion3Pipeline(transformer=pipe.unet, scheduler=pipe.solver(**pipe.schedule), vae=pipe.vae,
                                             text_encoder=pipe.text_model, tokenizer=pipe.tokenizer,
                                             text_encoder_2=pipe.text_model_2, tokenizer_2=pipe.tokenizer_2,
                                             text_encoder_3=pipe.text_model_3, tokenizer_3=pipe.tokenizer_3)
    return ref, dict(max_sequence_length=pipe.t5_length)


FAMILIES = {"sd": (tiny_random.stable_diffusion, _sd), "sdxl": (tiny_random.stable_diffusion_xl, _sdxl),
            "pixart": (tiny_random.pixart_alpha, _pixart), "sd3": (tiny_random.stable_diffusion_3, _sd3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_matches_the_diffusers_pipeline(family):
    build, reference = FAMILIES[family]
    pipe = build()
    ref, kw = reference(pipe)
    z = pipe.draw_noise(2, 0)
    side = z.shape[-1] * ref.vae_scale_factor
    theirs = _theirs(ref, pipe, z, latents=z, output_type="pt", height=side, width=side, **kw)
    assert torch.allclose(_ours(pipe, z), theirs, atol=1e-5)


def test_flux_matches_the_diffusers_pipeline():
    pipe = tiny_random.flux()
    ref = diffusers.FluxPipeline(scheduler=pipe.solver(**pipe.schedule), vae=pipe.vae, text_encoder=pipe.text_model,
                                 tokenizer=pipe.tokenizer, transformer=pipe.unet, text_encoder_2=pipe.text_model_2,
                                 tokenizer_2=pipe.tokenizer_2)
    z = pipe.draw_noise(2, 0)
    packed = ref._pack_latents(z, *z.shape)      # the pipeline takes its latents as 2 x 2 patches
    theirs = _theirs(ref, pipe, z, latents=packed, output_type="pt", height=z.shape[-1], width=z.shape[-1],
                     max_sequence_length=pipe.t5_length)
    assert torch.allclose(_ours(pipe, z), theirs, atol=1e-5)


def test_deepfloyd_if_matches_the_diffusers_pipeline_under_our_solver():
    pipe = tiny_random.deepfloyd_if(max_length=77)                  # IFPipeline pads T5's input to 77 tokens
    solver = pipe.solver(**pipe.schedule)
    solver.register_to_config(variance_type="fixed_small")         # the pipeline then steps with the noise half
    ref = diffusers.IFPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_model, unet=pipe.unet, scheduler=solver,
                               safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    z = pipe.draw_noise(2, 0)
    ref.prepare_intermediate_images = lambda *a, **k: z.clone()    # IFPipeline takes no latents argument
    with torch.no_grad():
        states, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=True, clean_caption=False)
    assert torch.equal(pipe.encode(PROMPTS), states)               # T5 with the padding masked, as the pipeline runs it
    theirs = _theirs(ref, pipe, z, output_type="np", height=z.shape[-1], width=z.shape[-1], clean_caption=False)
    assert torch.allclose(_ours(pipe, z), torch.from_numpy(theirs).permute(0, 3, 1, 2), atol=1e-5)


def test_deepfloyd_if_stage_2_matches_the_diffusers_pipeline_under_our_solver():
    stage_1 = tiny_random.deepfloyd_if(max_length=77)
    pipe = tiny_random.deepfloyd_if_stage_2(stage_1)
    low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))     # stage I's images in [0, 1]
    z = pipe.draw_noise(2, 0)
    ours = pipe.sample(stage_1.encode(PROMPTS), seed=0, noise=z, steps=4, added=pipe.low_res_conditioning(low, seed=0))
    solver = pipe.solver(**pipe.schedule)
    solver.register_to_config(variance_type="fixed_small")
    ref = diffusers.IFSuperResolutionPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_model, unet=pipe.unet,
                                              scheduler=solver,
                                              image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                                              safety_checker=None, feature_extractor=None, watermarker=None,
                                              requires_safety_checker=False)
    ref.prepare_intermediate_images = lambda *a, **k: z.clone()
    # with z_T given, the pipeline's generator draws only the low-resolution image's augmentation noise, ours too
    theirs = _theirs(ref, pipe, z, image=low * 2 - 1, noise_level=pipe.noise_level, output_type="np",
                     height=z.shape[-1], width=z.shape[-1], clean_caption=False,
                     generator=pipe.augmentation_generator(0))
    assert torch.allclose(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2), atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_stable_diffusion_loads_the_checkpoints_own_schedule(tmp_path, prediction):
    """SD v2.1 (768 px) predicts v, v1.x noise: the loader must read which from the checkpoint, or every
    image and denoising loss of a v-model is wrong. The checkpoint is a random reduced one saved to disk."""
    from diffusers import DDIMScheduler

    from interplab.models.diffusion import StableDiffusion, clip_bpe_tokenizer
    build = tiny_random.stable_diffusion()
    build.unet.register_to_config(sample_size=8)                    # saved with the small canvas it samples on
    diffusers.StableDiffusionPipeline(vae=build.vae, text_encoder=build.text_model, tokenizer=clip_bpe_tokenizer(77),
                                      unet=build.unet, scheduler=DDIMScheduler(**{**build.schedule, "prediction_type": prediction}),
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(tmp_path)   # the hub's layout
    pipe = StableDiffusion.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)
    assert pipe.schedule["prediction_type"] == prediction and pipe.training_scheduler().config.prediction_type == prediction
    assert pipe.latent_shape == (4, 8, 8)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    z = pipe.draw_noise(2, 0)
    theirs = _theirs(ref, pipe, z, latents=z, output_type="pt", height=z.shape[-1], width=z.shape[-1])
    assert torch.allclose(_ours(pipe, z), theirs, atol=1e-5)
