"""Evidence for two design notes in docs/toyworld.md (t2i): how far a colour / texture / shape swap moves
the VAE's latent, and whether the mean latent over the world's +-1 px jitter keeps an object's texture.
usage: python docs/drafts/src/t2i_latents.py   (a minute on one core)"""
import dataclasses

import numpy as np
import torch

from interplab import models
from interplab import toyworld as tw
from interplab.zoo import t2i
from interplab.zoo.oracle import predict, read_main_object

torch.set_grad_enabled(False)
vae, oracle = models.load("t2i").vae, models.load("oracle")
rng = np.random.default_rng(5)
base = [tw.captions.random_object(rng, t2i.DARK, "top left") for _ in range(200)]


def latents(objs, seed=1, jitter=1.0):
    x = torch.from_numpy(tw.render_batch([tw.Scene((o,), "dark") for o in objs], seed=seed, noise=0.0, jitter=jitter)[0])
    return vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor


z0 = latents(base)
for attr, values in (("colour", tw.COLOURS), ("texture", tw.TEXTURES), ("shape", tw.SHAPES)):
    alt = [dataclasses.replace(o, **{attr: values[(values.index(getattr(o, attr)) + 1 + rng.integers(len(values) - 1)) % len(values)]})
           for o in base]
    print(f"swap {attr:8s}: mean |dz|^2 per image {float(((latents(alt) - z0) ** 2).sum((1, 2, 3)).mean()):.1f}")
for jitter in (1.0, 0.0):
    n = 32 if jitter else 1  # without jitter (and noise) the 32 renders would be one image
    means = torch.stack([latents([o] * n, seed=i, jitter=jitter).mean(0) for i, o in enumerate(base[:96])])
    rec = ((vae.decode(means / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    main = read_main_object(predict(oracle, rec))
    print(f"mean latent over {n} render(s), jitter {jitter}: oracle reads",
          {k: round(float(np.mean([getattr(o, k) == main[k][i] for i, o in enumerate(base[:96])])), 3) for k in t2i.ATTRIBUTES})
