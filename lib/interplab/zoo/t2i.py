"""The zoo's text-to-image model: a diffusers UNet2DConditionModel conditioned on the frozen tiny
CLIP text tower's token states through cross-attention, as Stable Diffusion is on CLIP-L.

No VAE (a deviation from SD): the "latent" is the image itself, reshaped exactly and invertibly by
``pixel_unshuffle`` from 32 x 32 x 3 to 16 x 16 x 12, so the UNet keeps SD-v1's four-level topology
(16/8/4/2 here, 64/32/16/8 in SD) with cross-attention in the first three levels: 3 down + 1 mid +
6 up = 10 cross-attention layers, the search space of LocoGen. Trained with v-prediction and
10 % caption dropout (for classifier-free guidance); sampled with DDIM.
"""
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from .. import toyworld as tw
from ..models.diffusion import Text2Image
from . import clip as zoo_clip
from . import loop, store

NAME = "t2i"
# v-prediction (Salimans & Ho 2022): with epsilon prediction the x0 estimate at high t divides the
# eps error by sqrt(alpha_bar) (0.16 at t = 900), and this small model's samples from pure noise stayed
# speckled (background 0.35 instead of 0.06) while its one-step denoising of real images was good
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
SAMPLER = dict(steps=10, guidance=4.0, eta=1.0)  # what the chapters use (SD: 50 steps, guidance 7.5, eta 0)
# the training distribution: dark backgrounds, fewer relations than CLIP saw, more single objects
T2I_MIX = {"single": 0.45, "pair": 0.12, "relation": 0.05, "style": 0.14, "painting": 0.05, "mascot": 0.08,
           "emblem": 0.06, "action": 0.05}
DARK = tw.Palette(backgrounds=("dark",))


def unet_config() -> dict:
    return dict(sample_size=16, in_channels=12, out_channels=12,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=64,
                # diffusers reads attention_head_dim as the number of heads; 2 trains 35 % faster than 8 on CPU
                attention_head_dim=2, norm_num_groups=8)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, 3, 32, 32) -> UNet space (N, 12, 16, 16) in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, 2)


def to_image(latents: torch.Tensor) -> torch.Tensor:
    return ((F.pixel_shuffle(latents, 2) + 1) / 2).clamp(0, 1)


class ToyDiffusion(Text2Image):
    """UNet + frozen text tower + tokenizer; the "latent" is the pixel-unshuffled image."""
    latent_shape = (12, 16, 16)
    schedule = SCHEDULE
    sampler = SAMPLER  # eta = 1 (stochastic DDIM): deterministic DDIM left this small model's
    # samples full of high-frequency noise; fresh noise each step corrects the accumulated eps errors

    def __init__(self, unet: UNet2DConditionModel, text_model, tokenizer):
        super().__init__(unet, text_model, tokenizer)
        self.train_scheduler = self.training_scheduler()

    def tokenize(self, prompts) -> torch.Tensor:
        return tw.encode(self.tokenizer, list(prompts))[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return to_image(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return to_latent(images)


def diffusion_loss(model: ToyDiffusion, images, cond, gen: torch.Generator) -> torch.Tensor:
    x0 = to_latent(images)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, SCHEDULE["num_train_timesteps"], (len(x0),), generator=gen)
    xt = model.train_scheduler.add_noise(x0, noise, t)
    target = model.train_scheduler.get_velocity(x0, noise, t) if SCHEDULE["prediction_type"] == "v_prediction" else noise
    return F.mse_loss(model.unet(xt, t, encoder_hidden_states=cond).sample, target)


# -- the gate: does the oracle see what the prompt asked for? ----------------------------------
def single_object_prompts(n: int, seed: int) -> tuple[list[str], list[tw.Obj]]:
    rng = np.random.default_rng(seed)
    objs = [tw.captions.random_object(rng, DARK, "top left") for _ in range(n)]
    return [f"a {o.colour} {o.texture} {o.shape}" for o in objs], objs


def fidelity(model: ToyDiffusion, oracle, n: int = 400, seed: int = 30_001, **kw) -> dict:
    """Fraction of samples in which the oracle reads the prompted colour, shape and texture.

    Single-object prompts "a {colour} {texture} {shape}" (size and place unprompted), and two-object
    prompts "P1 and P2" (each phrase matched to the slot most likely to hold its shape).
    """
    from .oracle import predict, read_main_object
    prompts, objs = single_object_prompts(n, seed)
    main = read_main_object(predict(oracle, model.generate(prompts, seed=seed, **kw)))
    out = {f"single_{k}": float(np.mean([getattr(o, k) == main[k][i] for i, o in enumerate(objs)]))
           for k in ("colour", "shape", "texture")}
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
    hits = {k: [] for k in ("colour", "shape", "texture")}
    from .oracle import HEADS
    for i, pair in enumerate(pairs):
        for o in pair:
            p_shape = probs["shape"][i, :, HEADS["shape"].index(o.shape)]
            j = int(p_shape.argmax())
            hits["shape"].append(bool(probs["shape"][i, j].argmax() == HEADS["shape"].index(o.shape)))
            for k in ("colour", "texture"):
                hits[k].append(bool(probs[k][i, j].argmax() == HEADS[k].index(getattr(o, k))))
    out.update({f"pair_{k}": float(np.mean(v)) for k, v in hits.items()})
    return out


GATE = 0.8


DECAY_FROM = 0.62  # fraction of the run at constant lr; then a cosine to 5 %


def lr_factor(step: int, steps: int) -> float:
    """Warm-up over 200 steps, constant, then a cosine decay over the last 38 % of the run: the fine
    detail (textures) sharpens when the lr falls. A run extended to ``steps`` from a state saved
    before DECAY_FROM * steps has followed exactly this schedule."""
    start = DECAY_FROM * steps
    decay = 1.0 if step < start else 0.05 + 0.95 * 0.5 * (1 + float(np.cos(np.pi * (step - start) / (steps - start))))
    return min(1.0, (step + 1) / 200) * decay


def train(steps: int = 6500, batch_size: int = 64, seed: int = 0, lr: float = 4e-4, ship: bool = True,
          resume: bool = True, eval_n: int = 400, oracle=None, clip=None) -> dict:
    """The UNet on dark-background scenes, conditioned on the frozen text tower of the zoo's shipped
    ``clip`` (``clip``: a (CLIPModel, tokenizer) pair to use instead). The text tower is copied into
    this model's files, as an SD pipeline ships CLIP-L's, so retraining ``clip`` later does not change
    this model; the card records the sha256 of the CLIP it was trained on. Targets are noise-free
    renders: pixel noise in the data would leave the small-t denoising steps nothing to learn but the
    noise itself."""
    from .oracle import load as load_oracle
    torch.manual_seed(seed)
    text_source = "given"
    if clip is None:
        clip = zoo_clip.load()
        sha = store.read_card(zoo_clip.NAME)["sha256"]["model.safetensors"]
        text_source = f"text tower of the zoo's clip (model.safetensors sha256 {sha})"
    clip_model, tok = clip
    model = ToyDiffusion(UNet2DConditionModel(**unet_config()), text_encoder_of(clip_model).requires_grad_(False), tok)
    ema = loop.EMA(model.unet, decay=0.999)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps))

    def step(rng, gen, i):
        model.unet.train()
        ex = tw.sample_mix(rng, batch_size, T2I_MIX, pal=DARK)
        captions = [e.caption if rng.random() >= 0.1 else "" for e in ex]  # caption dropout for CFG
        images = torch.from_numpy(tw.render_batch([e.scene for e in ex], seed=int(rng.integers(2 ** 31)), noise=0.0)[0])
        loss = diffusion_loss(model, images, model.encode(captions), gen)
        loss.backward()
        ema.update(model.unet, i)
        return loss.detach()

    run = loop.train(NAME, {"unet": model.unet, "ema": ema}, opt, step, steps, seed, sched=sched, resume=resume)
    model.unet.load_state_dict(ema.state_dict())
    fid = fidelity(model, oracle or load_oracle(), n=eval_n)
    gates = {k: store.gate(v, GATE) for k, v in fid.items() if k.startswith("single_")}
    extra = {"pair_fidelity": {k: v for k, v in fid.items() if k.startswith("pair_")}, "sampler": SAMPLER,
             "schedule": SCHEDULE, "batch_size": batch_size, "params": sum(p.numel() for p in model.unet.parameters()),
             "final_loss": float(np.mean(run["losses"][-100:])), "text_encoder": text_source + ", frozen"}
    if ship:
        ship_model(model, seed=seed, steps=steps, wall_time_s=run["wall_time_s"], cpu_time_s=run["cpu_time_s"],
                   gates=gates, extra=extra)
    if ship and all(g["holds"] for g in gates.values()):
        loop.finished(NAME)  # a run that misses its gates keeps its state: ``--steps`` more extends it
    return {"gates": gates, **extra, **run}


def text_encoder_of(clip_model):
    """A stand-alone copy of the CLIPModel's text tower, a CLIPTextModel (an SD pipeline's text_encoder)."""
    import copy
    return copy.deepcopy(clip_model.text_model).eval()


def ship_model(model: ToyDiffusion, **card) -> dict:
    """data/zoo/t2i/: unet.safetensors (fp16) + config.json, text_encoder/, tokenizer/, card.json."""
    d = store.zoo_dir(NAME)
    d.mkdir(parents=True, exist_ok=True)
    store.save_weights(d / "unet.safetensors", model.unet.state_dict(), half=True)
    store.provenance.write_json(d / "config.json", unet_config())
    model.text_model.save_pretrained(d / "text_encoder")
    model.tokenizer.save_pretrained(d / "tokenizer")
    return store.write_card(NAME, **card)


def load() -> ToyDiffusion:
    """The EMA UNet with its frozen CLIP text encoder and tokenizer, after verifying every file."""
    import json
    from transformers import CLIPTextModel, PreTrainedTokenizerFast
    store.verify(NAME)
    d = store.zoo_dir(NAME)
    unet = UNet2DConditionModel(**json.loads((d / "config.json").read_text()))
    unet.load_state_dict(store.load_weights(d / "unet.safetensors"))
    text = CLIPTextModel.from_pretrained(d / "text_encoder").eval()
    return ToyDiffusion(unet.eval(), text, PreTrainedTokenizerFast.from_pretrained(d / "tokenizer"))
