"""Text-to-image pipelines behind one small interface, so tracing and editing code runs on both
the zoo's toy model and Stable Diffusion:

    pipe.encode(prompts)            -> conditioning (N, T, d): the text encoder's last_hidden_state
    pipe.sample(cond, seed, noise=) -> images (N, 3, H, W) in [0, 1], the family's solver (DDIM unless it
                                       says otherwise) with classifier-free guidance
    pipe.denoise(z, t, cond, added) -> the denoiser's raw output
    pipe.unet (a DiT for PixArt-alpha, SD3, FLUX), pipe.text_model, pipe.tokenizer

``Text2Image`` holds the sampling loop; ``StableDiffusion`` (VAE latents, paper profile) says how
latents become images, and ``zoo.t2i.ToyDiffusion`` is the same pipeline at toy size.
``StableDiffusionXL`` adds the second text tower and the pooled / time-id conditioning,
``DeepFloydIF`` samples IF's stage I in pixel space from T5 states (``DeepFloydIFStageII`` upscales
to 256 px); ``PixArtAlpha`` (a DiT on T5 states, DPM-Solver++), ``StableDiffusion3`` (an MMDiT on
CLIP-L / CLIP-G / T5 states, rectified flow) and ``Flux`` (FLUX.1-dev, guidance-distilled) are the
other families of Table 9.2. ``pipe.denoise(z, t, cond, added)`` is the one forward pass every sampler
and loss calls. The unconditional conditioning is ``encode([""])``, never corrupted, restored or edited.

Paper-profile architectures are written here as facts (``SD_UNET``, ``SD_TEXT``, ``PIXART_TRANSFORMER``,
``SD3_TRANSFORMER``, ``FLUX_TRANSFORMER``) so tests can build them with random weights offline;
``load_t2i(name)`` / each class's ``from_pretrained`` load real weights by hub id.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

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
        ids = self.tokenize(prompts).to(self.text_model.device)
        return self.text_model(**self.text_inputs(ids)).last_hidden_state

    def text_inputs(self, ids: torch.Tensor) -> dict:
        """The text encoder's call for token ids (N, T), as the family's diffusers pipeline makes it
        (CLIP towers read the ids alone; IF's T5 also the padding mask)."""
        return {"input_ids": ids}

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

    def draw_step_noise(self, rows: int, seed: int, k: int) -> torch.Tensor:
        """The noise (rows, *latent_shape) that step k of ``sample(seed=seed)`` adds when eta > 0."""
        return self.draw_noise(rows, seed * 7919 + k + 1)

    def sample_seeded(self, conds: Sequence[torch.Tensor], seeds: Sequence[int], steps: int = None,
                      eta: float = None, unconds: Sequence[torch.Tensor] | None = None, shared: bool = False,
                      **kw) -> list:
        """Several ``sample(conds[j], seed=seeds[j], uncond=unconds[j])`` calls in one batched loop (small
        calls waste the batch): images (n_j, 3, H, W) per call, each image on the noise it gets alone (z_T and
        every step's), so equal to the separate calls up to float rounding. conds: (n_j, T, d) each; unconds
        (1 or n_j, T, d) each, e.g. the empty prompt under an edited text encoder (None: ``uncond_conditioning``).
        ``shared``: every row of a call rides that call's one noise draw, as ``sample(noise=draw_noise(1, seed))``."""
        if len(conds) != len(seeds) or (unconds is not None and len(unconds) != len(conds)):
            raise BadParameter(f"sample_seeded needs one seed (and uncond) per conditioning block, got {len(seeds)} "
                               f"seeds for {len(conds)} blocks")
        if len(conds) == 1:  # nothing to batch (and IF's stage II keeps its own pairing)
            one = {} if unconds is None else {"uncond": unconds[0]}
            if shared:
                one["noise"] = self.draw_noise(1, seeds[0])
            return [self.sample(conds[0], seed=seeds[0], steps=steps, eta=eta, **one, **kw)]
        if getattr(self, "stage_2", None) is not None:
            raise BadParameter("sample_seeded samples one stage: detach stage_2 or call sample per seed")
        steps = self.sampler["steps"] if steps is None else steps
        eta = self.sampler["eta"] if eta is None else eta
        sizes = [len(c) for c in conds]
        draws = [(1 if shared else n, n) for n in sizes]  # (rows drawn, rows used)
        noise = torch.cat([self.draw_noise(d, s).expand(n, *self.latent_shape) for (d, n), s in zip(draws, seeds)])
        n_steps = len(self.sampling_scheduler(steps).timesteps)
        step_noise = [torch.cat([self.draw_step_noise(d, s, k).expand(n, *self.latent_shape)
                                 for (d, n), s in zip(draws, seeds)]) for k in range(n_steps)] if eta else None
        if unconds is not None:
            kw["uncond"] = torch.cat([u.expand(n, -1, -1) for u, n in zip(unconds, sizes)])
        images = self.sample(torch.cat(list(conds)), steps=steps, eta=eta, noise=noise, step_noise=step_noise, **kw)
        return list(images.split(sizes))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, seed: int = 0, steps: int = None, guidance: float = None,
               uncond: torch.Tensor | None = None, batch_size: int = 256, noise: torch.Tensor | None = None,
               eta: float = None, switch: tuple | None = None, added: dict | None = None,
               latent_update=None, step_noise: list | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for conditionings (N, T, d): ``solver`` (DDIM here) with CFG
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
        before step k (Attend-and-Excite, ``guidance.attend_and_excite``). ``step_noise`` (one (N, *latent_shape)
        tensor per step) overrides the step noise of eta > 0, as ``noise`` does z_T (``sample_seeded``).
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
        if eta and not self.stochastic_steps:
            raise BadParameter(f"{type(self).__name__} samples with a deterministic solver: eta must be 0")
        n_steps = len(self.sampling_scheduler(steps).timesteps)
        if eta and step_noise is None:
            step_noise = [self.draw_step_noise(rows, seed, k).expand(len(cond), *self.latent_shape)
                          for k in range(n_steps)]
        elif eta and (len(step_noise) != n_steps or any(len(z) != len(cond) for z in step_noise)):
            raise BadParameter(f"step_noise needs {n_steps} tensors of {len(cond)} rows, one per sampling step")
        cond, uncond = cond.to(self.device, dtype), uncond.to(self.device, dtype)
        tau, late = switch if switch is not None else (-1, None)
        late = late.to(self.device, dtype) if late is not None else None
        out = []
        for i in range(0, len(cond), batch_size):
            c = cond[i:i + batch_size]
            u = uncond.expand(len(c), -1, -1) if len(uncond) == 1 else uncond[i:i + batch_size]
            x = noise[i:i + batch_size]
            a_both = None
            if added is not None:
                a = {k: (v if len(v) == 1 else v[i:i + batch_size]).expand(len(c), *v.shape[1:])
                     for k, v in added.items()}
                a = {k: v.to(self.device, dtype) for k, v in a.items()}
                a_u = self.uncond_added(a)
                a_both = {k: torch.cat([a_u[k], a[k]]) for k in a}
            parts = c.shape[1] if composed else 1
            sched = self.sampling_scheduler(steps)  # one per batch: multistep and flow solvers keep state
            for k, t in enumerate(sched.timesteps):
                if latent_update is not None:
                    x = latent_update(x, t, k, slice(i, i + len(c)))
                c_t = late[i:i + batch_size] if late is not None and t < tau else c
                x_in = torch.cat([x, x.repeat_interleave(parts, 0)])
                out_t = self.denoise(x_in, t, torch.cat([u, c_t.flatten(0, 1) if composed else c_t]), a_both)
                eps = self.noise_prediction(out_t)
                e_u, e_c = eps[:len(x)], eps[len(x):].unflatten(0, (len(x), parts))
                z = step_noise[k][i:i + batch_size].to(x) if eta else None
                x = self.scheduler_step(sched, e_u + guidance * (e_c - e_u[:, None]).sum(1), t, x, eta, z)
            out.append(self.decode(x).float().cpu())
        return torch.cat(out)

    def denoise(self, z: torch.Tensor, t, cond: torch.Tensor, added: dict | None = None) -> torch.Tensor:
        """The denoiser's raw output (N, C_out, h, w) for noisy latents z (N, *latent_shape) at timestep t
        (a scalar or (N,)), reading cond (N, T, d); ``added``: its extra inputs, {name: (N, ...)} (SD-XL's
        pooled text and time ids). Every forward pass of the library's samplers and losses goes through here."""
        extra = {} if added is None else {"added_cond_kwargs": added}
        return self.unet(z, t, encoder_hidden_states=cond, **extra).sample

    solver = DDIMScheduler   # PixArt-alpha: DPM-Solver++; SD3: flow-matching Euler (both deterministic)

    @property
    def stochastic_steps(self) -> bool:
        """Whether the solver takes eta > 0 (DDIM does)."""
        return self.solver is DDIMScheduler

    def sampling_scheduler(self, steps: int):
        """A fresh ``solver`` on ``schedule`` with its timesteps set."""
        sched = self.solver(**self.schedule)
        sched.set_timesteps(steps)
        return sched

    def scheduler_step(self, sched, out: torch.Tensor, t, x: torch.Tensor, eta: float, noise) -> torch.Tensor:
        """x_{t-1} (N, *latent_shape) from the guided prediction ``out`` (N, *latent_shape)."""
        if self.stochastic_steps:
            return sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        return sched.step(out, t, x).prev_sample

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
    # DeepFloyd/IF-II-L-v1.0 (1.2 B): the 256 px upscaler; reads [noisy x ; stage I upsampled] (6 channels) and the
    # augmentation's noise level as a class embedding, the same T5 states as stage I
    "if-ii": dict(sample_size=256, in_channels=6, out_channels=6, layers_per_block=(2, 2, 3, 5, 5),
                  block_out_channels=(160, 320, 640, 960, 1280), cross_attention_dim=1280, attention_head_dim=64,
                  encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text",
                  addition_embed_type_num_heads=64, class_embed_type="timestep", cross_attention_norm="group_norm",
                  resnet_time_scale_shift="scale_shift", act_fn="gelu", mid_block_scale_factor=1.4142271248762552,
                  resnet_out_scale_factor=1.4142271248762552, resnet_skip_time_act=True,
                  down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                  up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3, norm_num_groups=32),
}
SD_TEXT = {  # v1: CLIP ViT-L/14's text tower; v2: OpenCLIP ViT-H/14's, cut at its penultimate block
    "v1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "v2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
               num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
}
SD_IDS = {"v1": "CompVis/stable-diffusion-v1-4", "v2": "stabilityai/stable-diffusion-2-1"}
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def released_schedule(model_id: str, default: dict) -> dict:
    """``default``'s keys as the checkpoint's own scheduler config sets them (scheduler/scheduler_config.json):
    SD v1.x and OpenJourney predict noise, SD v2.1 (768 px) the velocity v; a key the file lacks keeps its
    default."""
    cfg = DDIMScheduler.load_config(model_id, subfolder="scheduler")
    return {k: cfg.get(k, v) for k, v in default.items()}


def sd_unet_config(version: str = "v1", width: int | None = None) -> dict:
    """The UNet config of SD v1 / v2 / XL or IF stage I / II (``version`` "v1", "v2", "xl", "if", "if-ii");
    ``width`` scales block_out_channels to (w, 2w, 4w, 4w) (IF stage II: (w, 2w, 4w, 6w, 8w)) for tests
    (same topology)."""
    cfg = dict(SD_UNET[version])
    if width is not None:
        cfg["block_out_channels"] = (width, 2 * width, 4 * width, 4 * width)[:len(cfg["block_out_channels"])]
        if version == "if-ii":
            cfg["block_out_channels"] = (width, 2 * width, 4 * width, 6 * width, 8 * width)
        if version == "v2":  # head_dim 64 at full width -> keep whole heads at reduced width
            cfg["attention_head_dim"] = (2, 4, 8, 8)
        if version == "xl":
            cfg["attention_head_dim"] = (1, 2, 4)
        if version in ("if", "if-ii"):  # narrow text and time widths too, so a test model stays small
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

    @property
    def image_size(self) -> int:
        """Side of the images in pixels: the latent side times the VAE's downsampling."""
        return self.latent_shape[-1] * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode(self, latents):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0  # SD3's VAE centres its latents
        x = self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        x = (images * 2 - 1).to(self.device, self.vae.dtype)
        return (self.vae.encode(x).latent_dist.mean - shift) * self.vae.config.scaling_factor

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
            schedule = released_schedule(model_id, cls.schedule)
        except (OSError, ValueError) as err:
            raise resource_unavailable(f"model `{model_id}` ({type(err).__name__})",
                                       f"run `hf download {model_id}` on a machine with hub access "
                                       "(accept the licence first) and set HF_HOME") from None
        pipe = cls(unet.to(device).eval(), text.to(device).eval(), tok, vae.to(device).eval())
        pipe.schedule = schedule
        return pipe


SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _tower_outputs(towers, prompts) -> list:
    """Each (CLIP text model, tokenizer)'s outputs with every hidden state, prompts padded to its context
    (SD-XL's and SD3's two towers)."""
    out = []
    for model, tok in towers:
        ids = tok(list(prompts), padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids.to(model.device)
        out.append(model(input_ids=ids, output_hidden_states=True))
    return out


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
        return _tower_outputs([(self.text_model, self.tokenizer), (self.text_model_2, self.tokenizer_2)], prompts)

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
    The UNet predicts noise and a variance (6 channels); sampling steps with the noise half. LocoGen and
    LocoEdit act on stage I; with ``stage_2`` (a ``DeepFloydIFStageII``) attached, ``sample`` passes its
    64 px images through the 256 px upscaler reading the same conditioning (the prompt's, unaltered: hooks
    and edits on stage I's UNet do not reach stage II's). Deviation: the release samples with DDPM and the
    UNet's learned variance; here DDIM at eta 0 on the same noise schedule, so that z_T fixes the image and
    clean, corrupted and edited rows share one trajectory (test_diffusion_reference checks everything else
    against diffusers' IFPipeline under this solver). Prompts are encoded as written: IFPipeline's default
    ``clean_caption`` (lowercasing and markup removal, where bs4 and ftfy are installed) is not applied."""
    schedule = IF_SCHEDULE
    sampler = dict(steps=100, guidance=7.0, eta=0.0)
    stage_2 = None

    def sample(self, cond: torch.Tensor, seed: int = 0, **kw) -> torch.Tensor:
        images = super().sample(cond, seed=seed, **kw)
        if self.stage_2 is None:
            return images
        shared = kw.get("noise") is not None and len(kw["noise"]) == 1  # rows that shared stage I's noise share II's
        return self.stage_2.upscale(images, cond, seed=seed, shared_noise=shared, batch_size=kw.get("batch_size", 256))

    def __init__(self, unet, text_model, tokenizer, max_length: int = 77):
        super().__init__(unet, text_model, tokenizer)
        self.max_length = max_length
        self.latent_shape = (3, unet.config.sample_size, unet.config.sample_size)

    def tokenize(self, prompts) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").input_ids

    def text_inputs(self, ids: torch.Tensor) -> dict:
        """IF's pipeline runs T5 with the padding masked out of attention (its states at the padding
        positions, which the UNet also reads, then attend to the prompt alone): the tokenizer's mask,
        every position up to the first EOS (padding follows it; T5's pad differs from its EOS, a CLIP
        tokenizer's does not)."""
        eos = ids.eq(self.tokenizer.eos_token_id).long()
        return {"input_ids": ids, "attention_mask": (eos.cumsum(1) - eos).eq(0).long()}  # up to the first EOS

    @property
    def image_size(self) -> int:
        return self.latent_shape[-1]

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
            raise _gated_unavailable(model_id, err) from None
        return cls(unet.to(device).eval(), text, tok)

    @staticmethod
    def text_encoder(model_id: str = IF_ID, device="cuda", dtype=torch.float16) -> tuple:
        """(T5EncoderModel, tokenizer) of IF alone: the T5 of Chapter 9's Figs 9.4 / 9.5."""
        from transformers import T5EncoderModel, T5TokenizerFast
        try:
            text = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=dtype)
            tok = T5TokenizerFast.from_pretrained(model_id, subfolder="tokenizer")
        except (OSError, ValueError) as err:
            raise _gated_unavailable(model_id, err) from None
        return text.to(device).eval(), tok


IF_II_ID = "DeepFloyd/IF-II-L-v1.0"


class DeepFloydIFStageII(DeepFloydIF):
    """DeepFloyd IF stage II: 64 -> 256 px. Its UNet reads the noisy image concatenated with stage I's image
    upsampled bilinearly and noised to ``noise_level`` (250 in the pipeline), that level as a class embedding,
    and the same T5 states as stage I; classifier-free guidance on the text alone (both halves read the same
    low-resolution image). The pipeline's defaults: 50 steps, guidance 4."""
    schedule = IF_SCHEDULE
    sampler = dict(steps=50, guidance=4.0, eta=0.0)
    needs_added = True

    def __init__(self, unet, text_model, tokenizer, max_length: int = 77, noise_level: int = 250):
        super().__init__(unet, text_model, tokenizer, max_length)
        self.noise_level = noise_level
        side = unet.config.sample_size or 256  # the hub config leaves it unset
        self.latent_shape = (3, side, side)

    def low_res_conditioning(self, images: torch.Tensor, seed: int = 0, shared_noise: bool = False) -> dict:
        """{"image": (N, 3, S, S) stage I's images (N, 3, h, w) in [0, 1] upsampled and noised to ``noise_level``,
        "noise_level": (N,)}: what every denoising step of ``upscale`` reads besides the text. ``shared_noise``:
        one augmentation noise for every row."""
        x = F.interpolate(images.float() * 2 - 1, size=self.latent_shape[1:], mode="bilinear", align_corners=True)
        level = torch.full((len(x),), self.noise_level)
        noise = torch.randn(1 if shared_noise else len(x), *x.shape[1:],
                            generator=self.augmentation_generator(seed)).expand_as(x)
        return {"image": DDPMScheduler(beta_schedule="squaredcos_cap_v2").add_noise(x, noise, level), "noise_level": level}

    @staticmethod
    def augmentation_generator(seed: int) -> torch.Generator:
        """Where the low-resolution image's augmentation noise comes from (its own stream: never z_T's)."""
        return torch.Generator().manual_seed(seed * 7919 + 17)

    def uncond_added(self, added: dict) -> dict:
        return added

    def denoise(self, z, t, cond, added=None):
        if added is None:
            raise BadParameter("stage II reads a low-resolution image: use upscale(images, cond)")
        return self.unet(torch.cat([z, added["image"].to(z)], dim=1), t, encoder_hidden_states=cond,
                         class_labels=added["noise_level"]).sample

    def upscale(self, images: torch.Tensor, cond: torch.Tensor, seed: int = 0, shared_noise: bool = False,
                **kw) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1]: stage I's images (N, 3, h, w) upscaled under conditionings cond (N, T, d);
        ``shared_noise``: every row rides one noise draw (rows that differ only by stage I stay comparable)."""
        if shared_noise:
            kw["noise"] = self.draw_noise(1, seed)
        return self.sample(cond, seed=seed, added=self.low_res_conditioning(images, seed, shared_noise), **kw)

    @classmethod
    def from_pretrained(cls, stage_1: DeepFloydIF, model_id: str = IF_II_ID, device="cuda", dtype=torch.float16):
        """Stage II's UNet in ``dtype``, sharing stage I's T5 (4.7 B parameters are loaded once); gated
        licence. Offline without the weights: ``ResourceUnavailable``."""
        from diffusers import UNet2DConditionModel
        try:
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise _gated_unavailable(model_id, err) from None
        return cls(unet.to(device).eval(), stage_1.text_model, stage_1.tokenizer, max_length=stage_1.max_length)


def _gated_unavailable(model_id, err):
    return resource_unavailable(f"model `{model_id}` ({type(err).__name__})",
                                f"accept the licence on the model page, run `hf download {model_id}` "
                                "on a machine with hub access and set HF_HOME")


def _per_row(t, z: torch.Tensor) -> torch.Tensor:
    """Timestep t (scalar or (N,)) as (N,) on z's device: what the DiTs' timestep embeddings take."""
    t = torch.as_tensor(t, device=z.device)
    return t.expand(len(z)) if t.dim() == 0 else t


# PixArt-alpha/PixArt-XL-2-1024-MS (and -512x512: sample_size 64): a DiT of 28 blocks (16 heads x 72) with
# cross-attention to T5 v1.1 XXL states (120 tokens, 4096 wide, projected to 1152); it predicts noise and a
# variance (8 channels), trained on the linear beta schedule 1e-4 .. 2e-2; the pipeline samples with
# DPM-Solver++ (order 2), 20 steps, guidance 4.5. The 1024 model also reads resolution and aspect ratio.
PIXART_TRANSFORMER = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                          cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                          norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                          activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000)
PIXART_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2)
PIXART_IDS = {512: "PixArt-alpha/PixArt-XL-2-512x512", 1024: "PixArt-alpha/PixArt-XL-2-1024-MS"}


class PixArtAlpha(StableDiffusion):
    """PixArt-alpha: ``unet`` is its DiT (``PixArtTransformer2DModel``; the name is the interface's), reading
    T5 states through cross-attention with the prompt's attention mask (padding is never attended: the mask
    travels as the added conditioning ``encoder_attention_mask``; the unconditional branch reads the empty
    prompt's states and mask, as the pipeline's). Samples with DPM-Solver++. The pipeline's caption
    cleaning (lower case, no URLs) is not applied."""
    schedule = PIXART_SCHEDULE
    sampler = dict(steps=20, guidance=4.5, eta=0.0)
    needs_added = True
    solver = DPMSolverMultistepScheduler

    def __init__(self, transformer, text_model, tokenizer, vae, max_length: int = 120):
        super().__init__(transformer, text_model, tokenizer, vae)
        self.max_length = max_length

    @property
    def transformer(self):
        return self.unet

    def _tokens(self, prompts):
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              add_special_tokens=True, return_tensors="pt")

    def tokenize(self, prompts) -> torch.Tensor:
        return self._tokens(prompts).input_ids

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        """(N, 120, 4096): T5 states of the prompt, padding masked inside the encoder."""
        tok = self._tokens(prompts).to(self.text_model.device)
        return self.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state

    def added_conditions(self, prompts) -> dict:
        """{"encoder_attention_mask": (N, 120)}: which tokens cross-attention may read."""
        return {"encoder_attention_mask": self._tokens(prompts).attention_mask.float()}

    def uncond_added(self, added: dict) -> dict:
        mask = self.added_conditions([""])["encoder_attention_mask"]
        return {"encoder_attention_mask": mask.to(added["encoder_attention_mask"]).expand_as(added["encoder_attention_mask"])}

    def denoise(self, z, t, cond, added=None):
        size = dict(resolution=None, aspect_ratio=None)
        if self.unet.use_additional_conditions:  # the 1024 model: [h, w] in pixels and h / w
            px = self.image_size
            size = dict(resolution=torch.tensor([[px, px]]).to(z).expand(len(z), 2), aspect_ratio=torch.ones(len(z), 1).to(z))
        mask = None if added is None else added["encoder_attention_mask"]
        return self.unet(z, encoder_hidden_states=cond, timestep=_per_row(t, z), encoder_attention_mask=mask,
                         added_cond_kwargs=size).sample

    def noise_prediction(self, out):
        return out[:, :self.latent_shape[0]]

    @classmethod
    def from_pretrained(cls, model_id: str = PIXART_IDS[512], device="cuda", dtype=torch.float16):
        """The DiT and VAE in ``dtype``, T5-XXL in ``dtype`` too (4.7 B parameters); the released
        scheduler config replaces ``schedule``. Offline without the weights: ``ResourceUnavailable``."""
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer
        try:
            dit = PixArtTransformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype)
            text = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=dtype)
            tok = T5Tokenizer.from_pretrained(model_id, subfolder="tokenizer")
            sched = dict(DPMSolverMultistepScheduler.from_pretrained(model_id, subfolder="scheduler").config)
        except (OSError, ValueError) as err:
            raise resource_unavailable(f"model `{model_id}` ({type(err).__name__})",
                                       f"run `hf download {model_id}` on a machine with hub access and set HF_HOME") from None
        pipe = cls(dit.to(device).eval(), text.to(device).eval(), tok, vae.to(device).eval())
        pipe.schedule = {k: v for k, v in sched.items() if not k.startswith("_")}
        return pipe


class RectifiedFlow:
    """SD3's training path in the shape of a diffusers scheduler: z_t = (1 - s) x0 + s eps with s = t / T,
    the transformer predicting the velocity v = eps - x0 (``prediction_type`` "flow")."""

    def __init__(self, num_train_timesteps: int = 1000):
        from types import SimpleNamespace
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps, prediction_type="flow")

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """s = t / T broadcast against ``like`` (N, ...)."""
        return (t.to(like.device, like.dtype) / self.config.num_train_timesteps).view(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * eps


# stabilityai/stable-diffusion-3-medium-diffusers: an MMDiT of 24 joint blocks (24 heads x 64), reading CLIP-L and
# CLIP-G penultimate states (768 + 1280, zero-padded to 4096) followed by T5-XXL's (256 tokens) and the two
# towers' pooled projections (768 + 1280 = 2048); 16-channel VAE latents; rectified flow sampled with
# flow-matching Euler at shift 3, 28 steps, guidance 7.
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)
SD3_ID = "stabilityai/stable-diffusion-3-medium-diffusers"


class StableDiffusion3(StableDiffusion):
    """SD3 medium: ``unet`` is its MMDiT (``SD3Transformer2DModel``), conditioned on the sequence
    [CLIP-L ; CLIP-G | zero pad] (77 tokens) + T5 (``t5_length`` tokens), all 4096 wide: what WiCLP
    projects. The pooled projections enter through ``added`` ({"pooled_projections": (N, 2048)}); the
    unconditional branch reads the empty prompt's states and pooled projections, as the pipeline's."""
    schedule = SD3_SCHEDULE
    sampler = dict(steps=28, guidance=7.0, eta=0.0)
    needs_added = True
    solver = FlowMatchEulerDiscreteScheduler

    def __init__(self, transformer, text_model, tokenizer, vae, text_model_2, tokenizer_2, text_model_3,
                 tokenizer_3, t5_length: int = 256):
        super().__init__(transformer, text_model, tokenizer, vae)
        self.text_model_2, self.tokenizer_2 = text_model_2, tokenizer_2
        self.text_model_3, self.tokenizer_3, self.t5_length = text_model_3, tokenizer_3, t5_length

    @property
    def transformer(self):
        return self.unet

    def _clip(self, prompts):
        """[(penultimate states (N, 77, d_k), pooled projection (N, d_k)) for CLIP-L and CLIP-G]."""
        towers = [(self.text_model, self.tokenizer), (self.text_model_2, self.tokenizer_2)]
        return [(o.hidden_states[-2], o.text_embeds) for o in _tower_outputs(towers, prompts)]

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        """(N, 77 + t5_length, 4096): the joint attention's text sequence."""
        (l_states, _), (g_states, _) = self._clip(prompts)
        ids = self.tokenizer_3(list(prompts), padding="max_length", truncation=True, max_length=self.t5_length,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5 = self.text_model_3(input_ids=ids.to(self.text_model_3.device)).last_hidden_state
        clip = torch.cat([l_states, g_states], dim=-1).to(t5)
        return torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)

    @torch.no_grad()
    def added_conditions(self, prompts) -> dict:
        (_, l_pooled), (_, g_pooled) = self._clip(prompts)
        return {"pooled_projections": torch.cat([l_pooled, g_pooled], dim=-1)}

    def uncond_added(self, added: dict) -> dict:
        pooled = self.added_conditions([""])["pooled_projections"]
        return {"pooled_projections": pooled.to(added["pooled_projections"]).expand_as(added["pooled_projections"])}

    def denoise(self, z, t, cond, added=None):
        if added is None:
            raise BadParameter("SD3 reads pooled projections too: pass added=pipe.added_conditions(prompts)")
        return self.unet(hidden_states=z, encoder_hidden_states=cond, pooled_projections=added["pooled_projections"],
                         timestep=_per_row(t, z)).sample

    def training_scheduler(self) -> RectifiedFlow:
        return RectifiedFlow(self.schedule["num_train_timesteps"])

    @classmethod
    def from_pretrained(cls, model_id: str = SD3_ID, device="cuda", dtype=torch.float16):
        """The MMDiT, VAE and T5 in ``dtype``, both CLIP towers in float32 (gated licence). Offline without
        the weights: ``ResourceUnavailable``."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
        try:
            dit = SD3Transformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype)
            towers = [CLIPTextModelWithProjection.from_pretrained(model_id, subfolder=f"text_encoder{k}",
                                                                  torch_dtype=torch.float32) for k in ("", "_2")]
            toks = [CLIPTokenizer.from_pretrained(model_id, subfolder=f"tokenizer{k}") for k in ("", "_2")]
            t5 = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder_3", torch_dtype=dtype)
            tok_3 = T5TokenizerFast.from_pretrained(model_id, subfolder="tokenizer_3")
        except (OSError, ValueError) as err:
            raise _gated_unavailable(model_id, err) from None
        return cls(dit.to(device).eval(), towers[0].to(device).eval(), toks[0], vae.to(device).eval(),
                   towers[1].to(device).eval(), toks[1], t5.to(device).eval(), tok_3)


# black-forest-labs/FLUX.1-dev (11.9 B): 19 double-stream and 38 single-stream blocks (24 heads x 128) over 2 x 2-packed
# 16-channel latents and T5-XXL states (512 tokens), CLIP-L's pooled output and an embedded guidance value (the model is
# guidance-distilled: one pass per step, no unconditional branch); rectified flow with a resolution-dependent shift.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                        axes_dims_rope=(16, 56, 56))
FLUX_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
FLUX_ID = "black-forest-labs/FLUX.1-dev"


class Flux(StableDiffusion):
    """FLUX.1-dev: ``unet`` is its transformer; latents (16, S, S) are packed into (S / 2)^2 tokens of 64 inside
    ``denoise``, so the rest of the library sees ordinary latents. ``encode`` gives T5's states, the added
    conditioning CLIP-L's pooled output; ``sample``'s guidance is the value the transformer embeds (3.5 in the
    pipeline), not classifier-free guidance, which FLUX.1-dev does without (Table 9.2's FLUX row is a baseline)."""
    schedule = FLUX_SCHEDULE
    sampler = dict(steps=28, guidance=3.5, eta=0.0)
    needs_added = True
    solver = FlowMatchEulerDiscreteScheduler

    def __init__(self, transformer, text_model, tokenizer, vae, text_model_2, tokenizer_2, size: int = 1024,
                 t5_length: int = 512):
        Text2Image.__init__(self, transformer, text_model, tokenizer)
        self.vae, self.text_model_2, self.tokenizer_2, self.t5_length = vae, text_model_2, tokenizer_2, t5_length
        side = size // 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_shape = (vae.config.latent_channels, side, side)

    @property
    def transformer(self):
        return self.unet

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        """(N, t5_length, 4096): T5's states, what the double-stream blocks attend to."""
        ids = self.tokenizer_2(list(prompts), padding="max_length", truncation=True, max_length=self.t5_length,
                               return_tensors="pt").input_ids
        return self.text_model_2(input_ids=ids.to(self.text_model_2.device)).last_hidden_state

    @torch.no_grad()
    def added_conditions(self, prompts) -> dict:
        """{"pooled_projections": (N, 768)}: CLIP-L's pooled output."""
        ids = self.tokenize(prompts).to(self.text_model.device)
        return {"pooled_projections": self.text_model(input_ids=ids).pooler_output}

    def denoise(self, z, t, cond, added=None):
        if added is None:
            raise BadParameter("FLUX reads CLIP's pooled output too: pass added=pipe.added_conditions(prompts)")
        n, c, h, w = z.shape
        tokens = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(z)
        guidance = added.get("guidance") if self.unet.config.guidance_embeds else None
        out = self.unet(hidden_states=tokens, encoder_hidden_states=cond, pooled_projections=added["pooled_projections"],
                        timestep=_per_row(t, z).to(z) / 1000, img_ids=img_ids, txt_ids=cond.new_zeros(cond.shape[1], 3),
                        guidance=guidance).sample
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def training_scheduler(self) -> RectifiedFlow:
        return RectifiedFlow(self.schedule["num_train_timesteps"])

    def sampling_scheduler(self, steps: int):
        """Flow-matching Euler on sigmas 1 .. 1 / steps, shifted for the image's token count as the pipeline does."""
        import numpy as np
        sched = self.solver(**self.schedule)
        cfg, seq = sched.config, self.latent_shape[1] * self.latent_shape[2] // 4
        mu = cfg.base_shift + (cfg.max_shift - cfg.base_shift) * (seq - cfg.base_image_seq_len) / (
            cfg.max_image_seq_len - cfg.base_image_seq_len)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, seed: int = 0, steps: int = None, guidance: float = None,
               batch_size: int = 256, noise: torch.Tensor | None = None, added: dict | None = None, eta: float = None,
               uncond=None, switch=None, latent_update=None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for conditionings cond (N, T, d) and ``added`` {"pooled_projections":
        (N or 1, 768)}: one transformer pass per step reading ``guidance`` as an input. Noise as in
        ``Text2Image.sample``; no unconditional branch, so ``uncond``, ``switch``, ``latent_update`` and
        composed conditionings are refused."""
        if cond.dim() == 4 or any(x is not None for x in (uncond, switch, latent_update)) or eta:
            raise BadParameter("FLUX.1-dev is guidance-distilled: no unconditional branch, composed conditionings, "
                               "SWITCH-OFF, latent updates or eta")
        if added is None:
            raise BadParameter("pass added=pipe.added_conditions(prompts) (generate does)")
        steps = self.sampler["steps"] if steps is None else steps
        guidance = self.sampler["guidance"] if guidance is None else guidance
        self.unet.eval()
        dtype = self.unet.dtype
        rows = 1 if noise is not None and len(noise) == 1 else len(cond)
        noise = (self.draw_noise(rows, seed) if noise is None else noise).expand(len(cond), *self.latent_shape)
        out = []
        for i in range(0, len(cond), batch_size):
            c = cond[i:i + batch_size].to(self.device, dtype)
            pooled = added["pooled_projections"]
            pooled = (pooled if len(pooled) == 1 else pooled[i:i + batch_size]).expand(len(c), -1).to(self.device, dtype)
            a = {"pooled_projections": pooled, "guidance": torch.full((len(c),), float(guidance), device=self.device)}
            x = noise[i:i + batch_size].to(self.device, dtype)
            sched = self.sampling_scheduler(steps)
            for t in sched.timesteps:
                x = sched.step(self.denoise(x, t, c, a), t, x).prev_sample
            out.append(self.decode(x).float().cpu())
        return torch.cat(out)

    @classmethod
    def from_pretrained(cls, model_id: str = FLUX_ID, device="cuda", dtype=torch.bfloat16):
        """The transformer, VAE and T5 in ``dtype`` (bfloat16, as released), CLIP-L in float32 (gated licence).
        Offline without the weights: ``ResourceUnavailable``."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
        try:
            dit = FluxTransformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype)
            clip = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=torch.float32)
            tok = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
            t5 = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder_2", torch_dtype=dtype)
            tok_2 = T5TokenizerFast.from_pretrained(model_id, subfolder="tokenizer_2")
        except (OSError, ValueError) as err:
            raise _gated_unavailable(model_id, err) from None
        return cls(dit.to(device).eval(), clip.to(device).eval(), tok, vae.to(device).eval(), t5.to(device).eval(), tok_2)


# Table 9.2's models by name: (pipeline class, hub id)
T2I_FAMILIES = {"sd-v1.4": ("StableDiffusion", SD_IDS["v1"]), "sd-v2": ("StableDiffusion", SD_IDS["v2"]),
                "sdxl": ("StableDiffusionXL", SDXL_ID), "deepfloyd-if": ("DeepFloydIF", IF_ID),
                "pixart-512": ("PixArtAlpha", PIXART_IDS[512]), "pixart-1024": ("PixArtAlpha", PIXART_IDS[1024]),
                "sd3": ("StableDiffusion3", SD3_ID), "flux": ("Flux", FLUX_ID)}


def load_t2i(name: str, device="cuda", dtype=torch.float16) -> Text2Image:
    """One of ``T2I_FAMILIES`` by name, weights from the hub cache (``ResourceUnavailable`` offline)."""
    from ..errors import check_choice
    check_choice("text-to-image model", name, T2I_FAMILIES)
    cls, model_id = T2I_FAMILIES[name]
    return globals()[cls].from_pretrained(model_id, device=device, dtype=dtype)


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
