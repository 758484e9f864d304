"""Chapter 5 part I, diagnosis: restore groups of the tiny UNet's layers jointly. Where does each attribute live?

    SEED=0 OMP_NUM_THREADS=2 .venv/bin/python docs/drafts/src/ch05a_unet_groups.py   # about 1 min
    SEED=0 ETA=0 STEPS=50 ...   # the sampler SD uses (deterministic DDIM, 50 steps) instead of the toy's

The draft's tracing (ch05a.py) restores one layer per sample; here one sample restores a whole group (a
resolution level, every cross-attention, everything else) at every sampling step, in both CFG halves, with
the draft's probes (12 captions per attribute) and sampler (unless ETA / STEPS say otherwise), and its noise
rule: 3 sigma on the subject, sigma the std of these captions' subject-token embeddings (the draft also counts its
validation captions, so its sigma differs slightly). Prints R per (attribute, group); docs/drafts/STATUS.md (ch05a)
holds the seeds 0 and 1 table.
"""
import os

import numpy as np
import torch

from interplab import anatomy, tracing
from interplab import toyworld as tw
from interplab.models import load as load_zoo
from interplab.zoo import oracle as zo

SEED = int(os.environ.get("SEED", "0"))
SAMPLER = {k: cast(os.environ[k.upper()]) for k, cast in (("eta", float), ("steps", int)) if k.upper() in os.environ}
N_CAPTIONS = 12
ATTRIBUTES = ("objects", "style", "color", "action")

pipe, oracle = load_zoo("t2i_action"), load_zoo("oracle")
text = pipe.text_model
embed = ("text_model." if hasattr(text, "text_model") else "") + "embeddings.token_embedding"
layers = anatomy.items(pipe.unet, "layer")
kind = [anatomy.unet_layer_label(p) for p in layers]                     # e.g. "down-0-cross-attn-0", "mid-ff-0"
block = ["mid" if k.startswith("mid") else "-".join(k.split("-")[:2]) for k in kind]
GROUPS = {
    "down-0, 8 x 8": [b == "down-0" for b in block],
    "down-1 ... up-1, 4 x 4 and coarser": [b in ("down-1", "down-2", "down-3", "mid", "up-0", "up-1") for b in block],
    "up-2, 4 x 4 upsampled to 8 x 8": [b == "up-2" for b in block],
    "up-3, 8 x 8": [b == "up-3" for b in block],
    "every cross-attention": ["cross-attn" in k for k in kind],
    "everything but the cross-attentions": ["cross-attn" not in k for k in kind],
}
groups = [[layer for layer, member in zip(layers, members) if member] for members in GROUPS.values()]

probes = {a: tw.trace_probes(a, N_CAPTIONS + 2, SEED, action="size")[:N_CAPTIONS] for a in ATTRIBUTES}
ids = {p.caption: pipe.tokenize([p.caption]) for ps in probes.values() for p in ps}
subject = {p.caption: tracing.subject_positions(pipe.tokenizer, ids[p.caption][0], p.subject)
           for ps in probes.values() for p in ps}
sigma = tracing.noise_scale(text.get_input_embeddings(), torch.cat([ids[c][0, s] for c, s in subject.items()]))

print({g: sum(m) for g, m in GROUPS.items()}, "layers per group; sampler", {**pipe.sampler, **SAMPLER})
for a, ps in probes.items():
    hits = []
    for p in ps:
        noise = tracing.Noise(embed, subject[p.caption], sigma, nu=3.0, seed=SEED)
        conds = tracing.trace_text_states(text, ids[p.caption], noise)          # (2, T, d): clean, corrupted
        images = tracing.trace_unet_layers(pipe, conds[:1], conds[1:2], groups, seed=SEED, batch_size=len(groups),
                                           **SAMPLER)
        hits.append(zo.agreement(oracle, images, [p.wanted] * len(images)).astype(float))
    acc = np.mean(hits, 0)
    r = tracing.restoration_score(acc[0], acc[1], acc[2:]).numpy()
    print(f"{a}: clean {acc[0]:.2f}, corrupted {acc[1]:.2f};", {g: round(float(v), 2) for g, v in zip(GROUPS, r)})
