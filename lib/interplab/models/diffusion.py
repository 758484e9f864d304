"""Text-to-image pipelines behind one small interface, so tracing and editing code runs on both
the zoo's toy model and Stable Diffusion:

    pipe.encode(prompts)            -> conditioning (N, T, d): the text encoder's last_hidden_state
    pipe.sample(cond, seed, noise=) -> images (N, 3, H, W) in [0, 1], DDIM with classifier-free guidance
    pipe.unet, pipe.text_model, pipe.tokenizer

``Text2Image`` holds the sampling loop; ``StableDiffusion`` (VAE latents, paper profile) says how
latents become images, and ``zoo.t2i.ToyDiffusion`` is the same pipeline at toy size.
``StableDiffusionXL`` adds the second text tower and the pooled / time-id conditioning,
``DeepFloydIF`` samples IF's stage I in pixel space from T5 states. The
unconditional conditioning is ``encode([""])``, never corrupted, restored or edited.

Paper-profile architectures are written here as facts (``SD_UNET``, ``SD_TEXT``) so tests can build
them with random weights offline; ``StableDiffusion.from_pretrained`` loads real weights by hub id.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..errors import BadParameter, resource_unavailable


class Text2Image:
    """A UNet conditioned through cross-attention on a frozen text encoder's token states.

    Subclasses set ``latent_shape`` (C, h, w), ``schedule`` (DDIM kwargs), ``sampler`` defaults
    and ``decode`` (latents -> [0, 1] images).
    """
    latent_shape: tuple
    schedule: dict
    sampler = dict(steps=50, guidance=7.5, eta=0.0)
    needs_added = False  # SD-XL: the UNet also reads pooled text and time ids (``added_conditions``)

    def __init__(self, unet, text_model, tokenizer):
        self.unet, self.text_model, self.tokenizer = unet, text_model, tokenizer

    @property
    def device(self):
        return self.unet.device

    def tokenize(self, prompts) -> torch.Tensor:
        """Token ids (N, T), padded to the encoder's context length."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    @torch.no_grad()  # not inference_mode: training and fine-tuning reuse these states
    def encode(self, prompts) -> torch.Tensor:
        """Token states of the frozen text encoder, (N, T, d): what cross-attention reads."""
        return self.text_model(input_ids=self.tokenize(prompts).to(self.text_model.device)).last_hidden_state

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, *latent_shape) -> images (N, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> latents (N, *latent_shape), what the UNet denoises."""
        raise NotImplementedError

    def training_scheduler(self) -> DDPMScheduler:
        """The noise schedule the UNet was trained with (``add_noise`` for fine-tuning); sampling-only
        keys of ``schedule`` (DDIM's ``set_alpha_to_one``) are not DDPM's and are left out."""
        ddpm = inspect.signature(DDPMScheduler.__init__).parameters
        return DDPMScheduler(**{k: v for k, v in self.schedule.items() if k in ddpm})

    def draw_noise(self, rows: int, seed: int) -> torch.Tensor:
        """z_T (rows, *latent_shape) from a seed: what ``sample(noise=...)`` takes."""
        return torch.randn(rows, *self.latent_shape, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, seed: int = 0, steps: int = None, guidance: float = None,
               uncond: torch.Tensor | None = None, batch_size: int = 256, noise: torch.Tensor | None = None,
               eta: float = None, switch: tuple | None = None, added: dict | None = None,
               latent_update=None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for conditionings (N, T, d): DDIM with CFG
        ``eps_u + guidance (eps_c - eps_u)`` (diffusers' form; Eq. 5.3's alpha = guidance - 1).

        Every UNet call sees the batch [uncond of rows..., cond of rows...], the order
        ``tracing.restore_from_row(cfg=True)`` assumes. All noise of image i (z_T and, for eta > 0,
        every step's) depends only on (seed, i), so two calls with the same seed and different
        conditionings (clean vs edited) share it. ``noise`` (N or 1, *latent_shape) overrides z_T;
        with one row every image also shares the step noise (clean, corrupted and restored samples
        of one caption ride the same noise, each on its own trajectory). ``switch = (tau, late)``:
        below timestep tau condition on ``late`` (N, T, d) instead (SWITCH-OFF, §9.2.5).
        ``added``: the UNet's extra conditioning of the conditional rows, {name: (N or 1, ...)}
        (SD-XL's pooled text embedding and time ids, ``added_conditions``); the unconditional rows
        get ``uncond_added``'s. cond (N, K, T, d): K conditionings per image composed with Composable
        Diffusion's AND (Liu et al. 2022), ``eps_u + guidance * sum_k (eps_k - eps_u)``; K = 1 is CFG.
        ``latent_update(x, t, k, rows) -> x``: moves the latents of rows ``rows`` (a slice of cond)
        before step k (Attend-and-Excite, ``guidance.attend_and_excite``).
        """
        composed = cond.dim() == 4
        if composed and (switch is not None or added is not None):
            raise BadParameter("composed conditionings (N, K, T, d) take neither switch nor added conditioning")
        if added is None and self.needs_added:
            raise BadParameter(f"{type(self).__name__} conditions its UNet on pooled text too: pass "
                               "added=pipe.added_conditions(prompts) (generate does)")
        steps = self.sampler["steps"] if steps is None else steps
        guidance = self.sampler["guidance"] if guidance is None else guidance
        eta = self.sampler["eta"] if eta is None else eta
        self.unet.eval()
        if uncond is None:
            uncond = self.uncond_conditioning()
        shared = noise is not None and len(noise) == 1
        rows = 1 if shared else len(cond)
        if noise is None:
            noise = self.draw_noise(rows, seed)
        dtype = self.unet.dtype
        noise = noise.expand(len(cond), *self.latent_shape).to(self.device, dtype)
        sched = DDIMScheduler(**self.schedule)
        sched.set_timesteps(steps)
        step_noise = [self.draw_noise(rows, seed * 7919 + k + 1).expand(len(cond), *self.latent_shape)
                      for k in range(len(sched.timesteps))] if eta else None
        cond, uncond = cond.to(self.device, dtype), uncond.to(self.device, dtype)
        tau, late = switch if switch is not None else (-1, None)
        late = late.to(self.device, dtype) if late is not None else None
        out = []
        for i in range(0, len(cond), batch_size):
            c = cond[i:i + batch_size]
            u = uncond.expand(len(c), -1, -1) if len(uncond) == 1 else uncond[i:i + batch_size]
            x = noise[i:i + batch_size]
            extra = {}
            if added is not None:
                a = {k: (v if len(v) == 1 else v[i:i + batch_size]).expand(len(c), *v.shape[1:])
                     for k, v in added.items()}
                a = {k: v.to(self.device, dtype) for k, v in a.items()}
                a_u = self.uncond_added(a)
                extra["added_cond_kwargs"] = {k: torch.cat([a_u[k], a[k]]) for k in a}
            parts = c.shape[1] if composed else 1
            for k, t in enumerate(sched.timesteps):
                if latent_update is not None:
                    x = latent_update(x, t, k, slice(i, i + len(c)))
                c_t = late[i:i + batch_size] if late is not None and t < tau else c
                x_in = torch.cat([x, x.repeat_interleave(parts, 0)])
                out_t = self.unet(x_in, t, encoder_hidden_states=torch.cat([u, c_t.flatten(0, 1) if composed else c_t]),
                                  **extra).sample
                eps = self.noise_prediction(out_t)
                e_u, e_c = eps[:len(x)], eps[len(x):].unflatten(0, (len(x), parts))
                z = step_noise[k][i:i + batch_size].to(x) if eta else None
                x = sched.step(e_u + guidance * (e_c - e_u[:, None]).sum(1), t, x, eta=eta, variance_noise=z).prev_sample
            out.append(self.decode(x).float().cpu())
        return torch.cat(out)

    def noise_prediction(self, out: torch.Tensor) -> torch.Tensor:
        """What the scheduler steps with, from the UNet's output (IF: its first half; the rest is variance)."""
        return out

    def uncond_conditioning(self) -> torch.Tensor:
        """(1, T, d): what the unconditional CFG branch reads (SD: the empty prompt's states)."""
        return self.encode([""])

    def uncond_added(self, added: dict) -> dict:
        raise BadParameter(f"{type(self).__name__} takes no added conditioning")

    def generate(self, prompts, seed: int = 0, **kw) -> torch.Tensor:
        """Images (N, 3, H, W) for prompts; see ``sample``."""
        if self.needs_added:
            kw.setdefault("added", self.added_conditions(prompts))
        return self.sample(self.encode(prompts), seed=seed, **kw)


# ---------------------------------------------------------------- Stable Diffusion (paper profile)

# Facts from the released configs (CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-2-1).
SD_UNET = {
    "v1": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32),
    "v2": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
               attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32),
    # stabilityai/stable-diffusion-xl-base-1.0: 70 cross-attentions (transformer depth 1, 2, 10 per level)
    "xl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
               transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    # DeepFloyd IF stage I: the *structure* (block types, 3 layers per block, attention at the three
    # lower resolutions, T5 states through encoder_hid_proj, text-time embedding, scale-shift norms);
    # the real widths are read from the hub config at load time, these are placeholders.
    "if": dict(sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
               block_out_channels=(320, 640, 960, 1280), cross_attention_dim=1280, attention_head_dim=64,
               encoder_hid_dim=4096, addition_embed_type="text", addition_embed_type_num_heads=64,
               cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
               down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
               mid_block_type="UNetMidBlock2DSimpleCrossAttn",
               up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",), norm_num_groups=32),
}
SD_TEXT = {  # v1: CLIP ViT-L/14's text tower; v2: OpenCLIP ViT-H/14's, cut at its penultimate block
    "v1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "v2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
               num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
}
SD_IDS = {"v1": "CompVis/stable-diffusion-v1-4", "v2": "stabilityai/stable-diffusion-2-1"}
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd_unet_config(version: str = "v1", width: int | None = None) -> dict:
    """The UNet config of SD v1 / v2 / XL or IF stage I (``version`` "v1", "v2", "xl", "if");
    ``width`` scales block_out_channels to (w, 2w, 4w, 4w) for tests (same topology)."""
    cfg = dict(SD_UNET[version])
    if width is not None:
        cfg["block_out_channels"] = (width, 2 * width, 4 * width, 4 * width)[:len(cfg["block_out_channels"])]
        if version == "v2":  # head_dim 64 at full width -> keep whole heads at reduced width
            cfg["attention_head_dim"] = (2, 4, 8, 8)
        if version == "xl":
            cfg["attention_head_dim"] = (1, 2, 4)
        if version == "if":  # narrow text and time widths too, so a test model stays small
            cfg.update(attention_head_dim=width // 2, cross_attention_dim=4 * width, encoder_hid_dim=2 * width,
                       addition_embed_type_num_heads=2)
    return cfg


def random_sd(version: str = "v1", width: int = 32, text_layers: int | None = None, seed: int = 0):
    """SD's UNet (channels scaled to ``width``) and text encoder (real width, ``text_layers`` deep),
    random weights: the module paths and counts of the real models, built offline."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd_unet_config(version, width)).eval()
    text_cfg = dict(SD_TEXT[version])
    if text_layers is not None:
        text_cfg["num_hidden_layers"] = text_layers
    return unet, CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()


class StableDiffusion(Text2Image):
    """SD v1.x / v2.x: UNet + VAE + CLIP text encoder, loaded by hub id; images 512 (v2: 768) px."""
    schedule = SD_SCHEDULE
    sampler = dict(steps=50, guidance=7.5, eta=0.0)

    def __init__(self, unet, text_model, tokenizer, vae):
        super().__init__(unet, text_model, tokenizer)
        self.vae = vae
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def decode(self, latents):
        x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images):
        x = (images * 2 - 1).to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @classmethod
    def from_pretrained(cls, model_id: str = SD_IDS["v1"], device="cuda", dtype=torch.float16):
        """The UNet and VAE in ``dtype``; the text encoder in float32 (corruption noise and closed-form
        edits want full precision). Offline without the weights: ``ResourceUnavailable``."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        try:
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype)
            text = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=torch.float32)
            tok = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
        except (OSError, ValueError) as err:
            raise resource_unavailable(f"model `{model_id}` ({type(err).__name__})",
                                       f"run `hf download {model_id}` on a machine with hub access "
                                       "(accept the licence first) and set HF_HOME") from None
        return cls(unet.to(device).eval(), text.to(device).eval(), tok, vae.to(device).eval())


SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


class StableDiffusionXL(StableDiffusion):
    """SD-XL base: two CLIP text towers whose penultimate states are concatenated (768 + 1280 =
    2048 per token: what every cross-attention reads), plus the second tower's pooled, projected EOS
    embedding and the size / crop ids [h, w, top, left, h, w], which enter the time embedding
    (``added_cond_kwargs``). The unconditional branch reads zeros for both (the base model's
    ``force_zeros_for_empty_prompt``). ``text_model`` is the first tower, ``text_model_2`` the second."""
    needs_added = True
    sampler = dict(steps=50, guidance=5.0, eta=0.0)  # the pipeline's default guidance

    def __init__(self, unet, text_model, tokenizer, vae, text_model_2, tokenizer_2, size: int = 1024):
        super().__init__(unet, text_model, tokenizer, vae)
        self.text_model_2, self.tokenizer_2, self.size = text_model_2, tokenizer_2, size

    def _states(self, prompts):
        out = []
        for model, tok in ((self.text_model, self.tokenizer), (self.text_model_2, self.tokenizer_2)):
            ids = tok(list(prompts), padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(model.device)
            out.append(model(input_ids=ids, output_hidden_states=True))
        return out

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        """(N, T, d1 + d2): both towers' penultimate hidden states, concatenated per token."""
        first, second = self._states(prompts)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)

    @torch.no_grad()
    def added_conditions(self, prompts) -> dict:
        """{"text_embeds": (N, d2) pooled projection of the second tower, "time_ids": (N, 6)}."""
        _, second = self._states(prompts)
        return {"text_embeds": second.text_embeds, "time_ids": self.time_ids(len(prompts)).to(second.text_embeds)}

    def time_ids(self, rows: int) -> torch.Tensor:
        """(rows, 6) size / crop ids [h, w, top, left, h, w] of a full, uncropped image."""
        s = self.size
        return torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32).expand(rows, -1)

    def uncond_conditioning(self) -> torch.Tensor:
        return torch.zeros_like(self.encode([""]))

    def uncond_added(self, added: dict) -> dict:
        return {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}

    @classmethod
    def from_pretrained(cls, model_id: str = SDXL_ID, device="cuda", dtype=torch.float16,
                        vae_id: str | None = "madebyollin/sdxl-vae-fp16-fix"):
        """UNet and VAE in ``dtype`` (the fp16-fix VAE by default: SD-XL's own VAE overflows in
        float16), both text towers in float32. Offline without the weights: ``ResourceUnavailable``."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        try:
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype)
            vae = (AutoencoderKL.from_pretrained(vae_id, torch_dtype=dtype) if vae_id else
                   AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=torch.float32))
            text = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=torch.float32)
            text_2 = CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder_2",
                                                                 torch_dtype=torch.float32)
            tok = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
            tok_2 = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer_2")
        except (OSError, ValueError) as err:
            raise resource_unavailable(f"model `{model_id}` or VAE `{vae_id}` ({type(err).__name__})",
                                       f"run `hf download {model_id}` (and `{vae_id}`) on a machine with "
                                       "hub access and set HF_HOME") from None
        return cls(unet.to(device).eval(), text.to(device).eval(), tok, vae.to(device).eval(),
                   text_2.to(device).eval(), tok_2)


IF_ID = "DeepFloyd/IF-I-XL-v1.0"
IF_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


class DeepFloydIF(Text2Image):
    """DeepFloyd IF stage I: a pixel-space UNet (64 x 64) reading a frozen T5 encoder's states through
    ``encoder_hid_proj`` into joint self/cross attentions, and pooling them into its time embedding.
    The UNet predicts noise and a variance (6 channels); sampling steps with the noise half. Stage II
    (the 256 px upscaler) is not part of this pipeline: LocoGen and LocoEdit act on stage I."""
    schedule = IF_SCHEDULE
    sampler = dict(steps=100, guidance=7.0, eta=0.0)

    def __init__(self, unet, text_model, tokenizer, max_length: int = 77):
        super().__init__(unet, text_model, tokenizer)
        self.max_length = max_length
        self.latent_shape = (3, unet.config.sample_size, unet.config.sample_size)

    def tokenize(self, prompts) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").input_ids

    def noise_prediction(self, out):
        return out[:, :3]

    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images):
        return (images * 2 - 1).to(self.device, self.unet.dtype)

    @classmethod
    def from_pretrained(cls, model_id: str = IF_ID, device="cuda", dtype=torch.float16):
        """Stage I's UNet in ``dtype`` and its T5-XXL encoder (float16 too: 4.7 B parameters);
        gated licence. Offline without the weights: ``ResourceUnavailable``."""
        from diffusers import UNet2DConditionModel
        text, tok = cls.text_encoder(model_id, device, dtype)
        try:
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise _if_unavailable(model_id, err) from None
        return cls(unet.to(device).eval(), text, tok)

    @staticmethod
    def text_encoder(model_id: str = IF_ID, device="cuda", dtype=torch.float16) -> tuple:
        """(T5EncoderModel, tokenizer) of IF alone: the T5 of Chapter 9's Figs 9.4 / 9.5."""
        from transformers import T5EncoderModel, T5TokenizerFast
        try:
            text = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=dtype)
            tok = T5TokenizerFast.from_pretrained(model_id, subfolder="tokenizer")
        except (OSError, ValueError) as err:
            raise _if_unavailable(model_id, err) from None
        return text.to(device).eval(), tok


def _if_unavailable(model_id, err):
    return resource_unavailable(f"model `{model_id}` ({type(err).__name__})",
                                f"accept the licence on the model page, run `hf download {model_id}` "
                                "on a machine with hub access and set HF_HOME")


def clip_bpe_tokenizer(max_length: int = 77):
    """SD-v1's tokenizer (CLIP's BPE) built offline from the vocabulary inside the open_clip wheel: the
    same ids as ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` (BOS 49406, EOS 49407,
    padded with EOS), for tests and offline checks of the paper profile's tokenization."""
    import json
    import tempfile

    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{d}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", pad_token="<|endoftext|>", model_max_length=max_length)


class ClipScore:
    """CLIP-Score S(x, text) = cos(E_img(x), E_txt(text)), raw (no x100, no clipping), as §5.2.5 uses it.

    Built from two functions returning unit-norm embeddings (N, d); ``from_pretrained`` loads the
    paper's evaluator, CLIP ViT-L/14-336 (never the text encoder an edit changes).
    """

    def __init__(self, embed_images, embed_texts):
        self.embed_images, self.embed_texts = embed_images, embed_texts

    def __call__(self, images: torch.Tensor, texts) -> torch.Tensor:
        """(N,) scores of images (N, 3, H, W) in [0, 1] against N texts."""
        return (self.embed_images(images) * self.embed_texts(list(texts))).sum(-1).float().cpu()

    @classmethod
    def from_pretrained(cls, model_id: str = "openai/clip-vit-large-patch14-336", device="cuda"):
        from transformers import CLIPModel, CLIPProcessor
        try:
            model = CLIPModel.from_pretrained(model_id).to(device).eval()
            proc = CLIPProcessor.from_pretrained(model_id)
        except (OSError, ValueError) as err:
            raise resource_unavailable(f"CLIP-Score evaluator `{model_id}` ({type(err).__name__})",
                                       f"run `hf download {model_id}` on a machine with hub access") from None

        def unit(x):
            x = x if torch.is_tensor(x) else x.pooler_output
            return torch.nn.functional.normalize(x, dim=-1)

        @torch.inference_mode()
        def images(x):
            pixels = proc(images=list(x.float().cpu()), return_tensors="pt", do_rescale=False).pixel_values
            return unit(model.get_image_features(pixel_values=pixels.to(device)))

        @torch.inference_mode()
        def texts(t):
            ids = proc(text=t, return_tensors="pt", padding=True, truncation=True).to(device)
            return unit(model.get_text_features(**ids))
        return cls(images, texts)
