"""Pilot for Chapter 5 part I (issue 4; nothing shipped): the shipped t2i_action's UNet cut to two levels.

The t2i's 8 x 8 latent leaves its 2 x 2 / 1 x 1 levels unused (zeroing the mid block moves its images by <= 0.002),
so no layer there can be causal. Here the 8 x 8 and 4 x 4 levels and the mid block keep their weights and the mid
block sits at 4 x 4 (the former up_blocks.2 / 3 become up_blocks.0 / 1: the same channel counts and skips), the
whole UNet is fine-tuned on t2i_action's mix (optionally with ``t2i.layer_dropped_context``), then Chapter 5 part I's
UNet tracing runs on the draft's probe captions of seeds 0 and 1, and the mid block is zeroed once.

    python docs/drafts/src/t2i_truncated.py STEPS CAPTIONS LAYER_DROP     (the session ran 600 4|12 0|0.25)
"""
import json
import sys

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from interplab import models, tracing, anatomy
from interplab import toyworld as tw
from interplab.zoo import t2i, t2i_action, loop
from interplab.zoo import oracle as zo

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
n_cap = int(sys.argv[2]) if len(sys.argv) > 2 else 4
LD = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
pipe = t2i_action.load()
cfg = dict(pipe.unet.config)
cfg.update(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
           block_out_channels=(64, 128))
cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
small = UNet2DConditionModel(**cfg)
old = pipe.unet.state_dict()
rename = {"up_blocks.2.": "up_blocks.0.", "up_blocks.3.": "up_blocks.1."}
new = {}
for k, v in old.items():
    if k.startswith(("down_blocks.2", "down_blocks.3", "up_blocks.0", "up_blocks.1", "down_blocks.1.downsamplers")):
        continue
    for a, b in rename.items():
        if k.startswith(a):
            k = b + k[len(a):]
    new[k] = v
missing, unexpected = small.load_state_dict(new, strict=False)
print("missing", missing, "unexpected", unexpected)
pipe.unet = small.eval()
orc = models.load("oracle")
print("before fine-tune", t2i.fidelity(pipe, orc, n=96, seed=5))

# full fine-tune of the cut UNet on t2i_action's mix, text frozen (verbs' rows already written)
pipe.unet.requires_grad_(True)
opt = torch.optim.AdamW(pipe.unet.parameters(), lr=2e-4, weight_decay=0.0)
def step(rng, gen, i):
    ex, images = t2i.render(rng, 32, jitter=t2i.UNET_JITTER, mix=t2i_action.MIX, pal=t2i.DARK)
    captions = [e.caption if rng.random() >= 0.1 else "" for e in ex]
    with torch.no_grad():
        cond = pipe.text_model(input_ids=pipe.tokenize(captions)).last_hidden_state
    pipe.unet.train()
    if LD > 0:
        with t2i.layer_dropped_context(pipe.unet, pipe.uncond_conditioning(), LD, gen):
            loss = t2i.diffusion_loss(pipe, images, cond, gen)
    else:
        loss = t2i.diffusion_loss(pipe, images, cond, gen)
    loss.backward()
    pipe.unet.eval()
    return loss.detach()
run = loop.train("t2i_truncated_pilot", {"unet": pipe.unet}, opt, step, steps, 0, resume=False)
pipe.unet.requires_grad_(False).eval()
print("after", steps, "steps", run["wall_time_s"], t2i.fidelity(pipe, orc, n=96, seed=5),
      "action", t2i_action.action_accuracy(pipe, orc, n=48))

p = ["a red striped circle", "a blue dotted square", "a green plain star", "a yellow ribbed heart"]
a = pipe.generate(p, seed=3)
h = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
b = pipe.generate(p, seed=3); h.remove()
print("mid zeroed: max |diff|", (a - b).abs().max().item())

text = pipe.text_model
EMBED = ("text_model." if hasattr(text, "text_model") else "") + "embeddings.token_embedding"
layers = anatomy.items(pipe.unet, "layer")
labels = [anatomy.unet_layer_label(x) for x in layers]
group = np.array([lab.split("-")[0] for lab in labels])
for seed in (0, 1):
    probes = {a_: tw.trace_probes(a_, n_cap, seed, action="size") for a_ in ("objects", "style", "color", "action")}
    ids = {pr.caption: pipe.tokenize([pr.caption]) for ps in probes.values() for pr in ps}
    subj = {c: tracing.subject_positions(pipe.tokenizer, ids[c][0], pr.subject) for ps in probes.values() for pr in ps for c in [pr.caption]}
    sigma = tracing.noise_scale(text.get_input_embeddings(), torch.cat([ids[c][0, s] for c, s in subj.items()]))
    out = {}
    for a_, ps in probes.items():
        hits = []
        for pr in ps:
            conds = tracing.trace_text_states(text, ids[pr.caption], tracing.Noise(EMBED, subj[pr.caption], sigma, nu=3.0, seed=seed))
            imgs = tracing.trace_unet_layers(pipe, conds[:1], conds[1:2], layers, seed=seed, batch_size=len(layers))
            hits.append(zo.agreement(orc, imgs, [pr.wanted] * len(imgs)).astype(float))
        acc = np.mean(hits, 0)
        R = tracing.restoration_score(acc[0], acc[1], acc[2:]).numpy()
        causal = R >= 0.5
        out[a_] = dict(clean=float(acc[0]), corrupted=float(acc[1]), n=int(causal.sum()), groups=sorted(set(group[causal])),
                       layers=[labels[i] for i in np.flatnonzero(causal)])
    print("seed", seed, json.dumps(out))
