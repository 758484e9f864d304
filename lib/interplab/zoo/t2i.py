"""The zoo's text-to-image model: Stable Diffusion in miniature. A diffusers ``AutoencoderKL``
(32 x 32 x 3 <-> 8 x 8 x 8; SD-v1: factor 8, 4 channels) and a ``UNet2DConditionModel`` on its
latents, conditioned through cross-attention on the tiny CLIP text tower's token states, as SD-v1
is on CLIP-L's (here the tower is fine-tuned with the UNet; see ``train``). The UNet keeps SD-v1's four-level topology (8/4/2/1 here, 64/32/16/8 in SD) with
cross-attention in the first three levels: 3 down + 1 mid + 6 up = 10 cross-attention layers, the
search space of LocoGen. Trained in two stages, the VAE on reconstruction then the UNet with
v-prediction and 10 % caption dropout (for classifier-free guidance); sampled with DDIM.

Why a VAE: the textures (period 3-4 px, phase-locked to the object) were the one attribute a pixel-space
UNet of this size could not draw. Its samples carried speckle inside the silhouette (texture read back
0.27-0.30 after 4000-6500 steps, colour and shape 0.8-0.97), while a small VAE decodes a texture from
a code that is constant over the object, which the UNet does learn to place: the reason SD diffuses latents.
"""
import contextlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from .. import anatomy, hooks
from .. import toyworld as tw
from ..lora import LoRA
from ..models.diffusion import StableDiffusion
from . import clip as zoo_clip
from . import loop, store

NAME = "t2i"
VAE_STATE = "t2i_vae"  # the resumable state of stage 1 (build/zoo/t2i_vae/)
# v-prediction (Salimans & Ho 2022): with epsilon prediction the x0 estimate at high t divides the
# eps error by sqrt(alpha_bar) (0.16 at t = 900), and small models' samples from pure noise stay noisy
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                clip_sample=False)  # unit-variance latents: clipping x0 to [-1, 1] would cut them
SAMPLER = dict(steps=10, guidance=4.0, eta=1.0)  # what the chapters use (SD: 50 steps, guidance 7.5, eta 0)
# the training distribution: dark backgrounds, fewer relations than CLIP saw, more single objects
T2I_MIX = {"single": 0.45, "pair": 0.12, "relation": 0.05, "style": 0.14, "painting": 0.05, "mascot": 0.08,
           "emblem": 0.06, "action": 0.05}
DARK = tw.Palette(backgrounds=("dark",))


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=8, sample_size=32, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(16, 32, 64), norm_num_groups=8)


def unet_config() -> dict:
    return dict(sample_size=8, in_channels=8, out_channels=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(64, 128, 128, 128), layers_per_block=1, cross_attention_dim=64,
                # diffusers reads attention_head_dim as the number of heads; 2 trains 35 % faster than 8 on CPU
                attention_head_dim=2, norm_num_groups=8)


class ToyDiffusion(StableDiffusion):
    """VAE + UNet + text tower + the toy world's tokenizer."""
    schedule = SCHEDULE
    sampler = SAMPLER  # eta = 1 (stochastic DDIM): fresh noise each step corrects a small model's errors

    def __init__(self, unet: UNet2DConditionModel, text_model, tokenizer, vae: AutoencoderKL):
        super().__init__(unet, text_model, tokenizer, vae)
        self.train_scheduler = self.training_scheduler()

    def tokenize(self, prompts) -> torch.Tensor:
        return tw.encode(self.tokenizer, list(prompts))[0]


def untrained(text_model, tokenizer, seed: int = 0) -> ToyDiffusion:
    """The architecture with random UNet and VAE weights around a given text tower (tests, timing)."""
    torch.manual_seed(seed)
    return ToyDiffusion(UNet2DConditionModel(**unet_config()).eval(), text_model, tokenizer,
                        AutoencoderKL(**vae_config()).eval())


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, gen: torch.Generator, kl_weight: float = 1e-6) -> torch.Tensor:
    """L1 + L2 reconstruction of a latent sample, plus SD's small KL pull towards N(0, I)."""
    x = images * 2 - 1
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=gen)).sample
    return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + kl_weight * post.kl().mean()


def diffusion_loss(model: ToyDiffusion, images, cond, gen: torch.Generator) -> torch.Tensor:
    """v-prediction MSE on a latent sample of each image (the VAE frozen)."""
    with torch.no_grad():
        z0 = model.vae.encode(images * 2 - 1).latent_dist.sample(generator=gen) * model.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=gen)
    t = training_timesteps(len(z0), gen)
    zt = model.train_scheduler.add_noise(z0, noise, t)
    target = model.train_scheduler.get_velocity(z0, noise, t) if SCHEDULE["prediction_type"] == "v_prediction" else noise
    return F.mse_loss(model.unet(zt, t, encoder_hidden_states=cond).sample, target)


T_SHIFT = 0.75  # t = T * u ** T_SHIFT: 60 % of the steps at t > T / 2 (uniform: 50 %)


def training_timesteps(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) timesteps, tilted towards high noise, where a latent's texture is decided from the caption
    alone (from a real latent noised to t = 300 the UNet keeps every texture; from pure noise it did not)."""
    u = torch.rand(n, generator=gen)
    return (SCHEDULE["num_train_timesteps"] * u ** T_SHIFT).long().clamp(max=SCHEDULE["num_train_timesteps"] - 1)


# The UNet's renders put each object at its slot's centre. With the world's +-1 px jitter a texture's
# phase against the VAE's 4 px latent grid varies, so its latent code does too: the mean latent of 32
# jittered renders of one object decodes to the right colour (1.0) and shape (0.99) but the right
# texture only 0.67-0.72 of the time (0.98 without jitter; docs/drafts/src/t2i_latents.py). At high
# noise the UNet predicts such a mean, and textures came out faint (fidelity <= 0.61; without: 0.94).
UNET_JITTER = 0.0


def render(rng: np.random.Generator, n: int, jitter: float = 1.0, mix: dict = T2I_MIX,
           pal: tw.Palette = DARK) -> tuple[list, torch.Tensor]:
    """n training examples of ``mix`` (caption families) drawn from ``pal`` and their noise-free renders
    (n, 3, 32, 32): pixel noise in the data would leave the small-t denoising steps nothing to learn but
    the noise itself."""
    ex = tw.sample_mix(rng, n, mix, pal=pal)
    seed = int(rng.integers(2 ** 31))
    return ex, torch.from_numpy(tw.render_batch([e.scene for e in ex], seed=seed, noise=0.0, jitter=jitter)[0])


def lora_step(model, adapters, batch_size: int, mix: dict, pal: tw.Palette = DARK, text_grad: bool = False,
              layer_drop: float = 0.0):
    """A ``loop.train`` step for adapters (a ``lora.LoRA``) on the UNet: t2i's denoising loss through them on a
    batch of ``mix`` drawn from ``pal``, captions dropped to "" one time in ten (for guidance, as t2i); the text
    tower runs without gradients unless ``text_grad`` (the fine-tunes t2i_ft, t2i_action and Chapter 9's draft
    share it). ``layer_drop`` > 0 also hands each cross-attention layer the empty caption's states in place of
    an example's, independently per layer and example with that probability (``layer_dropped_context``)."""
    def step(rng, gen, i):
        ex, images = render(rng, batch_size, jitter=UNET_JITTER, mix=mix, pal=pal)
        captions = [e.caption if rng.random() >= 0.1 else "" for e in ex]
        with torch.set_grad_enabled(text_grad):
            cond = model.text_model(input_ids=model.tokenize(captions)).last_hidden_state
        drop = contextlib.nullcontext()
        if layer_drop > 0:
            drop = layer_dropped_context(model.unet, model.uncond_conditioning(), layer_drop, gen)
        model.unet.train()
        with adapters.attached(model.unet), drop:
            loss = diffusion_loss(model, images, cond, gen)
        loss.backward()
        model.unet.eval()
        return loss.detach()
    return step


@contextlib.contextmanager
def layer_dropped_context(unet, empty: torch.Tensor, p: float, gen: torch.Generator):
    """Inside, every cross-attention layer (``attn2``) of ``unet`` reads ``empty`` (1, T, d) in place of each
    example's conditioning (B, T, d) with probability p, drawn per layer and example from ``gen``: no single
    layer's reading of the caption is then indispensable, so what the features already hold has to survive
    layers that read nothing."""
    def drop(cond):
        keep = (torch.rand(len(cond), 1, 1, generator=gen) >= p).to(cond.dtype)
        return keep * cond + (1 - keep) * empty.to(cond.dtype)
    with contextlib.ExitStack() as stack:
        for path in anatomy.items(unet, "xattn"):
            stack.enter_context(hooks.edit(unet, path, drop, at="input:encoder_hidden_states"))
        yield


# -- the gates: does the oracle see what the prompt asked for? ---------------------------------
ATTRIBUTES = ("colour", "shape", "texture")


def single_object_prompts(n: int, seed: int) -> tuple[list[str], list[tw.Obj]]:
    rng = np.random.default_rng(seed)
    objs = [tw.captions.random_object(rng, DARK, "top left") for _ in range(n)]
    return [f"a {o.colour} {o.texture} {o.shape}" for o in objs], objs


def read_back(oracle, images: torch.Tensor, objs) -> dict:
    """Fraction of images (N, 3, 32, 32) whose main object the oracle reads as objs[i]'s colour, shape, texture."""
    from .oracle import predict, read_main_object
    main = read_main_object(predict(oracle, images))
    return {k: float(np.mean([getattr(o, k) == main[k][i] for i, o in enumerate(objs)])) for k in ATTRIBUTES}


@torch.no_grad()
def reconstruction(vae: AutoencoderKL, oracle, n: int = 300, seed: int = 777) -> dict:
    """The VAE's gate: the oracle reads colour, shape and texture back from decode(encode(render))."""
    _, objs = single_object_prompts(n, seed)
    x = torch.from_numpy(tw.render_batch([tw.Scene((o,), "dark") for o in objs], seed=seed, noise=0.0)[0])
    rec = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    return read_back(oracle, rec, objs)


def fidelity(model: ToyDiffusion, oracle, n: int = 400, seed: int = 30_001, **kw) -> dict:
    """Fraction of samples in which the oracle reads the prompted colour, shape and texture.

    Single-object prompts "a {colour} {texture} {shape}" (size and place unprompted), and two-object
    prompts "P1 and P2" (each phrase matched to the slot most likely to hold its shape).
    """
    from .oracle import HEADS, predict
    prompts, objs = single_object_prompts(n, seed)
    out = {f"single_{k}": v for k, v in read_back(oracle, model.generate(prompts, seed=seed, **kw), objs).items()}
    rng = np.random.default_rng(seed + 1)
    pairs = []
    for _ in range(n // 4):
        a = tw.captions.random_object(rng, DARK, "top left")
        b = tw.captions.random_object(rng, DARK, "top right", shape=tw.SHAPES[(tw.SHAPES.index(a.shape) + 1 + rng.integers(7)) % 8],
                                      colour=tw.COLOURS[(tw.COLOURS.index(a.colour) + 1 + rng.integers(7)) % 8])
        pairs.append((a, b))
    probs = predict(oracle, model.generate([f"{tw.phrase(a, ('colour', 'texture', 'shape'))} and "
                                            f"{tw.phrase(b, ('colour', 'texture', 'shape'))}" for a, b in pairs],
                                           seed=seed + 1, **kw))
    hits = {k: [] for k in ATTRIBUTES}
    for i, pair in enumerate(pairs):
        for o in pair:
            j = int(probs["shape"][i, :, HEADS["shape"].index(o.shape)].argmax())
            hits["shape"].append(bool(probs["shape"][i, j].argmax() == HEADS["shape"].index(o.shape)))
            for k in ("colour", "texture"):
                hits[k].append(bool(probs[k][i, j].argmax() == HEADS[k].index(getattr(o, k))))
    out.update({f"pair_{k}": float(np.mean(v)) for k, v in hits.items()})
    return out


GATE = 0.8
VAE_GATE = 0.95
DECAY_FROM = 0.62  # fraction of the run at constant lr; then a cosine to 5 %


def lr_factor(step: int, steps: int, warmup: int = 200, decay_from: float = DECAY_FROM) -> float:
    """Warm-up over ``warmup`` steps, constant, then a cosine decay to 5 % over the last
    1 - ``decay_from`` of the run: the fine detail sharpens when the lr falls. A run extended to
    ``steps`` from a state saved before decay_from * steps has followed exactly this schedule."""
    start = decay_from * steps
    decay = 1.0 if step < start else 0.05 + 0.95 * 0.5 * (1 + float(np.cos(np.pi * (step - start) / (steps - start))))
    return min(1.0, (step + 1) / warmup) * decay


def train_vae(steps: int = 5000, batch_size: int = 32, seed: int = 0, lr: float = 1e-3, resume: bool = True):
    """Stage 1: the VAE on T2I_MIX renders; its scaling factor makes the latents unit-variance (SD's 0.18215)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, warmup=100, decay_from=0.0))

    def step(rng, gen, i):
        vae.train()
        loss = vae_loss(vae, render(rng, batch_size)[1], gen)
        loss.backward()
        return loss.detach()

    run = loop.train(VAE_STATE, {"vae": vae}, opt, step, steps, seed, sched=sched, resume=resume)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(render(np.random.default_rng(seed + 99), 512)[1] * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    return vae, run


def train(steps: int = 4000, batch_size: int = 64, seed: int = 0, lr: float = 4e-4, text_lr: float = 4e-4,
          ship: bool = True, resume: bool = True, eval_n: int = 400, vae_steps: int = 5000, oracle=None, clip=None) -> dict:
    """Stage 1 (``train_vae``), then stage 2: the UNet on VAE latents of dark-background scenes,
    conditioned on the text tower of the zoo's shipped ``clip`` (``clip``: a (CLIPModel, tokenizer)
    pair to use instead), fine-tuned with the UNet at ``text_lr`` (0: frozen, as SD-v1's CLIP-L).

    Why not frozen: the zoo's CLIP tells textures apart only weakly (its texture retrieval is
    0.77-0.80), and its token states show it: "dotted" vs "plain" at cosine 0.91 in the last layer,
    "ribbed" vs "slanted" 0.93, "gridded" vs "ringed" 0.94. A UNet on the frozen tower (4500 steps) drew
    colour 0.99 and shape 0.96 but texture 0.52, confusing exactly those pairs (dotted read as plain in
    40 of 44 samples); tuned at 0.1x the UNet's lr the tower hardly moved (texture 0.46), at the UNet's
    lr (with ``training_timesteps``) texture reached 0.61, and 0.94 once the renders lost their jitter
    (``UNET_JITTER``). The tuned tower is copied into this model's files, as an SD pipeline ships its
    text encoder, so retraining ``clip`` later does not change this model; the card records the sha256
    of the CLIP it started from."""
    from .oracle import load as load_oracle
    oracle = oracle or load_oracle()
    vae, vae_run = train_vae(vae_steps, seed=seed, resume=resume)
    recon = reconstruction(vae, oracle)
    vae_gates = {f"vae_{k}": store.gate(v, VAE_GATE) for k, v in recon.items()}
    if not all(g["holds"] for g in vae_gates.values()):  # a UNet on latents that lose the textures is wasted
        return {"gates": vae_gates, **vae_run}
    torch.manual_seed(seed)
    text_source = "given"
    if clip is None:
        clip = zoo_clip.load()
        sha = store.read_card(zoo_clip.NAME)["sha256"]["model.safetensors"]
        text_source = f"text tower of the zoo's clip (model.safetensors sha256 {sha})"
    clip_model, tok = clip
    model = ToyDiffusion(UNet2DConditionModel(**unet_config()), text_encoder_of(clip_model).requires_grad_(text_lr > 0), tok, vae)
    ema, ema_text = loop.EMA(model.unet, decay=0.999), loop.EMA(model.text_model, decay=0.999)
    groups = [{"params": list(model.unet.parameters()), "lr": lr}]
    if text_lr > 0:
        groups.append({"params": list(model.text_model.parameters()), "lr": text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps))

    def step(rng, gen, i):
        model.unet.train()
        ex, images = render(rng, batch_size, jitter=UNET_JITTER)
        captions = [e.caption if rng.random() >= 0.1 else "" for e in ex]  # caption dropout for CFG
        with torch.set_grad_enabled(text_lr > 0):
            cond = model.text_model(input_ids=model.tokenize(captions)).last_hidden_state
        loss = diffusion_loss(model, images, cond, gen)
        loss.backward()
        ema.update(model.unet, i)
        ema_text.update(model.text_model, i)
        return loss.detach()

    modules = {"unet": model.unet, "ema": ema, "text": model.text_model, "ema_text": ema_text}
    run = loop.train(NAME, modules, opt, step, steps, seed, sched=sched, resume=resume)
    model.unet.load_state_dict(ema.state_dict())
    model.text_model.load_state_dict(ema_text.state_dict())
    model.text_model.requires_grad_(False)
    fid = fidelity(model, oracle, n=eval_n)
    gates = dict(vae_gates)
    gates.update({k: store.gate(v, GATE) for k, v in fid.items() if k.startswith("single_")})
    extra = {"pair_fidelity": {k: v for k, v in fid.items() if k.startswith("pair_")}, "sampler": SAMPLER,
             "schedule": SCHEDULE, "batch_size": batch_size, "vae_steps": vae_steps,
             "params": {"unet": sum(p.numel() for p in model.unet.parameters()),
                        "vae": sum(p.numel() for p in vae.parameters())},
             "final_loss": {"unet": float(np.mean(run["losses"][-100:])), "vae": float(np.mean(vae_run["losses"][-100:]))},
             "text_encoder": text_source + (f", fine-tuned at lr {text_lr} (EMA)" if text_lr > 0 else ", frozen")}
    wall, cpu = vae_run["wall_time_s"] + run["wall_time_s"], vae_run["cpu_time_s"] + run["cpu_time_s"]
    if ship:
        ship_model(model, seed=seed, steps=steps, wall_time_s=wall, cpu_time_s=cpu, gates=gates, extra=extra)
    if ship and all(g["holds"] for g in gates.values()):
        loop.finished(NAME)  # a run that misses its gates keeps its state: ``--steps`` more extends it
        loop.finished(VAE_STATE)
    return {"gates": gates, **extra, **run, "wall_time_s": wall, "cpu_time_s": cpu}


def text_encoder_of(clip_model):
    """A stand-alone copy of the CLIPModel's text tower, a CLIPTextModel (an SD pipeline's text_encoder)."""
    import copy
    return copy.deepcopy(clip_model.text_model).eval()


def ship_model(model: ToyDiffusion, **card) -> dict:
    """data/zoo/t2i/: the UNet (unet-0000i-of-0000n.safetensors shards, see ``store.save_weights``) +
    config.json, vae.safetensors + vae_config.json (fp16),
    text_encoder/, tokenizer/, card.json."""
    d = store.zoo_dir(NAME)
    d.mkdir(parents=True, exist_ok=True)
    store.save_weights(d / "unet.safetensors", model.unet.state_dict(), half=True)
    store.provenance.write_json(d / "config.json", unet_config())
    store.save_weights(d / "vae.safetensors", model.vae.state_dict(), half=True)
    store.provenance.write_json(d / "vae_config.json", {**vae_config(), "scaling_factor": model.vae.config.scaling_factor})
    model.text_model.save_pretrained(d / "text_encoder")
    model.tokenizer.save_pretrained(d / "tokenizer")
    return store.write_card(NAME, **card)


def load() -> ToyDiffusion:
    """The EMA UNet, the VAE, the frozen CLIP text encoder and the tokenizer, after verifying every file."""
    import json
    from transformers import CLIPTextModel, PreTrainedTokenizerFast
    store.verify(NAME)
    d = store.zoo_dir(NAME)
    unet = UNet2DConditionModel(**json.loads((d / "config.json").read_text()))
    unet.load_state_dict(store.load_weights(d / "unet.safetensors"))
    vae = AutoencoderKL(**json.loads((d / "vae_config.json").read_text()))
    vae.load_state_dict(store.load_weights(d / "vae.safetensors"))
    text = CLIPTextModel.from_pretrained(d / "text_encoder").eval()
    return ToyDiffusion(unet.eval(), text, PreTrainedTokenizerFast.from_pretrained(d / "tokenizer"), vae.eval())


# -- fine-tunes shipped as LoRA adapters on this t2i (t2i_ft, t2i_action) ---------------------------------------
def base_sha(parts: tuple = ("unet",)) -> dict:
    """The shipped t2i's file hashes whose names start with ``parts``: what a fine-tune of it depends on."""
    return {k: v for k, v in store.read_card(NAME)["sha256"].items() if k.startswith(parts)}


def ship_adapters(name: str, adapters, parts: tuple = ("unet",), weights: dict | None = None, half: bool = False,
                  **card) -> None:
    """Write a fine-tune's adapters (``lora.safetensors`` + ``lora_config.json`` naming the base's hashes),
    any further state dicts (``weights``: file stem -> state; ``half``: all stored as float16) and its card
    to data/zoo/NAME/."""
    d = store.zoo_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob("*.safetensors"):  # weights of an earlier recipe would be hashed into the new card
        stale.unlink()
    store.save_weights(d / "lora.safetensors", adapters.state_dict(), half=half)
    for stem, state in (weights or {}).items():
        store.save_weights(d / f"{stem}.safetensors", state, half=half)
    store.provenance.write_json(d / "lora_config.json", {"rank": adapters.rank, "scale": adapters.scale,
                                                         "paths": adapters.paths, "base_sha256": base_sha(parts)})
    store.write_card(name, **card)
    if all(g["holds"] for g in card["gates"].values()):
        loop.finished(name)


def load_adapted(name: str, parts: tuple = ("unet",)) -> tuple:
    """(the shipped t2i with fine-tune ``name``'s adapters merged into its UNet, the fine-tune's folder for any
    further weights); refuses a fine-tune of another t2i than the shipped one."""
    store.verify(name)
    d = store.zoo_dir(name)
    config = json.loads((d / "lora_config.json").read_text())
    if config["base_sha256"] != base_sha(parts):
        raise store.missing(name, "was fine-tuned from another t2i than the shipped one")
    model = load()
    adapters = LoRA(model.unet, config["rank"], scale=config["scale"], paths=config["paths"])
    adapters.load_state_dict(store.load_weights(d / "lora.safetensors"))
    adapters.merge(model.unet)
    return model, d
