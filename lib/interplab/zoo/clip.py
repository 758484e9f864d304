"""The zoo's tiny CLIP: a transformers CLIPModel trained contrastively on toy-world captions.

Text tower: causal, 6 layers x 64 wide, EOS pooling (the largest id, as in CLIP), padded with EOS
like Stable Diffusion's prompts, so its token states can condition the text-to-image model the way
CLIP-L conditions SD. Vision tower: 32 px, patch 4 (64 patches + CLS), 4 layers x 64 wide. Shared
by the causal-tracing, LocoGen, MultimodalCausalTrace (vision tower), RepDecompose (alignment target)
and compositionality chapters.
"""
import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from .. import toyworld as tw
from . import loop, store

NAME = "clip"
MAX_LENGTH = 24
# objects move +-2 px around their quadrant centre in training renders, as in ToyNet (ch07): trained on
# the renderer's default +-1 px, the patch-4 vision tower read ToyNet's shapes at 0.66 instead of 0.98
JITTER = 2.0


def config(vocab_size: int, eos_token_id: int) -> CLIPConfig:
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                pad_token_id=eos_token_id, bos_token_id=2, eos_token_id=eos_token_id)
    vision = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, 3, 32, 32) -> the [-1, 1] range the tiny CLIP was trained on."""
    return images * 2 - 1


def batch(rng: np.random.Generator, n: int, mix=tw.PRETRAIN_MIX, **kw):
    """n (image, caption) pairs of the pre-training distribution: images (n, 3, 32, 32), captions."""
    ex = tw.sample_mix(rng, n, mix, **kw)
    images, _ = tw.render_batch([e.scene for e in ex], seed=int(rng.integers(2 ** 31)), jitter=JITTER)
    return torch.from_numpy(images), [e.caption for e in ex]


def infonce(logits_per_image: torch.Tensor, captions) -> torch.Tensor:
    """Symmetric InfoNCE of (B, B) image-text logits; identical captions in a batch are all positives
    for each other. The targets live on the logits' device (a GPU fine-tune's logits are on the GPU)."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32,
                        device=logits_per_image.device)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


def contrastive_loss(model: CLIPModel, images, ids, captions) -> torch.Tensor:
    """The tiny CLIP's training loss: ``infonce`` of its logits for images and captions."""
    return infonce(model(input_ids=ids, pixel_values=pixel_values(images)).logits_per_image, captions)


@torch.inference_mode()
def embed_text(model: CLIPModel, tok, captions, batch_size: int = 512) -> torch.Tensor:
    """Normalised text embeddings (N, 64)."""
    outs = []
    for i in range(0, len(captions), batch_size):
        ids, _ = tw.encode(tok, captions[i:i + batch_size])
        outs.append(F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1))
    return torch.cat(outs)


@torch.inference_mode()
def embed_images(model: CLIPModel, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Normalised image embeddings (N, 64) of [0, 1] images (N, 3, 32, 32)."""
    return torch.cat([F.normalize(_features(model.get_image_features(pixel_values=pixel_values(images[i:i + batch_size]))), dim=-1)
                      for i in range(0, len(images), batch_size)])


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def zero_shot(model, tok, images, prompts: list[str]) -> torch.Tensor:
    """Index of the best-matching prompt for each image, (N,)."""
    return (embed_images(model, images) @ embed_text(model, tok, prompts).T).argmax(1)


ATTRIBUTE_VALUES = {"colour": tw.COLOURS, "shape": tw.SHAPES, "texture": tw.TEXTURES, "size": tw.SIZES,
                    "background": tw.BACKGROUNDS, "slot": tw.SLOTS}


def full_caption(obj: tw.Obj, background: str) -> str:
    """"a large red striped circle on water at the top left": every attribute named."""
    return tw.phrase(obj) + (f" on {background}" if background != "dark" else "") + f" at the {obj.slot}"


def attribute_accuracy(model, tok, n: int = 800, seed: int = 20_001) -> dict:
    """Image-to-caption retrieval per attribute on held-out single-object renders (random backgrounds).

    For each image the candidates are its full caption with the attribute set to each of its values
    ("... red ...", "... green ...", ...), everything else true; the score is how often the true value
    wins (chance 1/8 for colour, shape and texture, 1/2 size, 1/7 background, 1/4 slot).
    """
    from dataclasses import replace
    rng = np.random.default_rng(seed)
    scenes = [tw.sample(rng, "single", slot_p=0).scene for _ in range(n)]
    img = embed_images(model, torch.from_numpy(tw.render_batch(scenes, seed=seed)[0]))
    out = {}
    for attr, values in ATTRIBUTE_VALUES.items():
        captions, truth = [], []
        for sc in scenes:
            obj = sc.objects[0]
            for v in values:
                o, bg = (obj, v) if attr == "background" else (replace(obj, **{attr: v}), sc.background)
                captions.append(full_caption(o, bg))
            truth.append(values.index(sc.background if attr == "background" else getattr(obj, attr)))
        txt = embed_text(model, tok, captions).view(n, len(values), -1)
        pred = torch.einsum("nd,nvd->nv", img, txt).argmax(1)
        out[attr] = float((pred == torch.tensor(truth)).float().mean())
    return out


def binding_scores(model, tok, n: int = 300, seed: int = 20_002) -> dict:
    """Colour-swap test on two-object images (Chapter 9's premise, reported, not gated).

    text: P(true caption beats the caption with the two colours swapped) (chance 0.5);
    bag: P(true caption beats one with a colour absent from the image) (attributes, not binding).
    """
    rng = np.random.default_rng(seed)
    pal = tw.Palette(shapes=tw.SHAPES[:6], colours=tw.COLOURS[:6])
    true, swap, bag, scenes = [], [], [], []
    for _ in range(n):
        a, b = (tw.captions.random_object(rng, pal, s) for s in ("top left", "bottom right"))
        if a.shape == b.shape or a.colour == b.colour:
            continue
        other = [c for c in pal.colours if c not in (a.colour, b.colour)][rng.integers(4)]
        scenes.append(tw.Scene((a, b)))
        true.append(f"a {a.colour} {a.shape} and a {b.colour} {b.shape}")
        swap.append(f"a {b.colour} {a.shape} and a {a.colour} {b.shape}")
        bag.append(f"a {other} {a.shape} and a {b.colour} {b.shape}")
    img = embed_images(model, torch.from_numpy(tw.render_batch(scenes, seed=seed)[0]))
    s = {k: (img * embed_text(model, tok, v)).sum(1) for k, v in (("true", true), ("swap", swap), ("bag", bag))}
    return {"text": float((s["true"] > s["swap"]).float().mean()), "bag": float((s["true"] > s["bag"]).float().mean())}


def toynet_zero_shot(model, tok, n: int = 1000, seed: int = 20_003) -> float:
    """36-way zero-shot accuracy on ToyNet val images (backgrounds, distractors) with the prompts
    "a {colour} {shape}" (ch07's zero-shot head)."""
    images, labels, _ = tw.toynet(n, seed, split="val")
    return float((zero_shot(model, tok, images, [f"a {c}" for c in tw.TOYNET_CLASSES]) == labels).float().mean())


# The levels the chapter specs set for their CLIP: colour and shape >= 0.9 (ch09's premise gate),
# background >= 0.9 and ToyNet zero-shot >= 0.7 (ch07). Texture, size and place are measured and
# written in the card but not gated: no chapter asks the CLIP for them, and place is what a
# contrastive CLIP learns last or never (docs/toyworld.md, "Why the CLIP is blind to place").
GATES = {"zero_shot_colour": 0.9, "zero_shot_shape": 0.9, "zero_shot_background": 0.9, "zero_shot_toynet": 0.7}


def measure(model, tok, n: int = 800, seed: int = 20_001) -> dict:
    """Every metric under the card's names: {"zero_shot_<attribute>": value, "zero_shot_toynet": value}."""
    out = {f"zero_shot_{k}": v for k, v in attribute_accuracy(model, tok, n, seed).items()}
    out["zero_shot_toynet"] = toynet_zero_shot(model, tok, n=max(n, 36), seed=seed + 2)
    return out


TWIN_ATTRIBUTES = ("shape", "texture", "slot", "size")


def twin_pairs(rng: np.random.Generator, n_pairs: int, pal: tw.Palette = tw.Palette()) -> list[tw.Example]:
    """Minimal pairs: two single-object scenes that differ in one of shape, texture, slot or size,
    captioned identically except for that attribute (always mentioned).

    Stage 2's hard negatives: the in-batch negatives of a contrastive loss almost never differ in
    one attribute only, so the first stage learns the attributes that are cheap to see (colour,
    background, size) and barely looks at shape, texture or place. Both scenes of a pair bind the
    same attributes to one object, so this teaches attributes, not binding.
    """
    from dataclasses import replace
    out = []
    for _ in range(n_pairs):
        attr = TWIN_ATTRIBUTES[rng.integers(len(TWIN_ATTRIBUTES))]
        a = tw.captions.random_object(rng, pal, tw.SLOTS[rng.integers(4)])
        values = {"shape": pal.shapes, "texture": pal.textures, "slot": tw.SLOTS, "size": pal.sizes}[attr]
        b = replace(a, **{attr: [v for v in values if v != getattr(a, attr)][rng.integers(len(values) - 1)]})
        bg = tw.captions.background_for(rng, a.shape, pal, spurious=0.7)
        mention = {m for m in ("size", "colour", "texture", "shape") if rng.random() >= 0.2} | {attr}
        where = f" on {bg}" if bg != "dark" and rng.random() < 0.8 else ""
        say_slot = attr == "slot" or rng.random() < 0.3
        for o in (a, b):
            caption = tw.phrase(o, tuple(mention)) + where + (f" at the {o.slot}" if say_slot else "")
            out.append(tw.Example(tw.Scene((o,), bg), caption, "twin"))
    return out


def _fit(name: str, model: CLIPModel, tok, steps: int, batch_size: int, seed: int, lr: float, twins: float,
         resume: bool) -> dict:
    """Contrastive training of both towers; a fraction ``twins`` of each batch is minimal pairs."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n_pairs = int(batch_size * twins) // 2

    def step(rng, gen, i):
        model.train()
        if n_pairs:
            ex = tw.sample_mix(rng, batch_size - 2 * n_pairs, distractor_p=0.3, slot_p=0.5) + twin_pairs(rng, n_pairs)
            images = torch.from_numpy(tw.render_batch([e.scene for e in ex], seed=int(rng.integers(2 ** 31)),
                                                      jitter=JITTER)[0])
            captions = [e.caption for e in ex]
        else:
            images, captions = batch(rng, batch_size, distractor_p=0.3)
        loss = contrastive_loss(model, images, tw.encode(tok, captions)[0], captions)
        loss.backward()
        return loss.detach()

    return loop.train(name, {"model": model}, opt, step, steps, seed, sched=sched, resume=resume)


def train(steps: int = 8000, batch_size: int = 128, seed: int = 0, lr: float = 1e-3, twins: float = 0.5,
          ship: bool = True, resume: bool = True, eval_n: int = 800) -> dict:
    """Both towers on the pre-training mix (captions name the place half the time) plus minimal-pair
    twins (a fraction ``twins`` of each batch), so that shape, texture, size and place must be seen."""
    torch.manual_seed(seed)
    tok = tw.clip_tokenizer(MAX_LENGTH)
    model = CLIPModel(config(len(tok), tok.eos_token_id))
    run = _fit(NAME, model, tok, steps, batch_size, seed, lr, twins, resume)
    model.eval()
    metrics = measure(model, tok, n=eval_n)
    gates = {k: store.gate(metrics[k], t) for k, t in GATES.items()}
    extra = {"metrics": metrics, "binding": binding_scores(model, tok, n=max(eval_n // 2, 8)),
             "batch_size": batch_size, "twins": twins,
             "params": sum(p.numel() for p in model.parameters()), "final_loss": float(np.mean(run["losses"][-50:]))}
    if ship:
        d = store.zoo_dir(NAME)
        model.save_pretrained(d)  # config.json + model.safetensors (fp32: 0.5 M parameters)
        tok.save_pretrained(d)
        loop.ship(NAME, run, seed=seed, steps=steps, gates=gates, extra=extra)
    return {"gates": gates, **extra, **run}


def load():
    """(CLIPModel in eval mode, tokenizer) after verifying the shipped files."""
    from transformers import PreTrainedTokenizerFast
    store.verify(NAME)
    d = store.zoo_dir(NAME)
    return CLIPModel.from_pretrained(d).eval(), PreTrainedTokenizerFast.from_pretrained(d)
