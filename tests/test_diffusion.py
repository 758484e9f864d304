"""interplab.models.diffusion: one sampler for the toy and Stable Diffusion, SD's architecture as facts."""
import torch

from interplab import anatomy, tracing
from interplab import toyworld as tw
from interplab.models.diffusion import SD_TEXT, StableDiffusion, random_sd


def _tiny_sd():
    from diffusers import AutoencoderKL
    unet, text = random_sd("v1", width=32, text_layers=1)
    unet.config.sample_size = 8  # 8 x 8 latents: the real topology, a small canvas
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).eval()  # one level: latents = pixels
    tok = tw.clip_tokenizer(24)
    return StableDiffusion(unet, text, tok, vae)


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
