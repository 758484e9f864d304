"""What the zoo's t2i_t5 draws beyond its gates: the world's styles, mascots and emblems, against the t2i's
(same prompts, same noise; 64 prompts per family, the oracle reads the attributes each family fixes).

    python docs/drafts/src/t2i_t5_check.py      # about 1 min with 2 threads
"""
import numpy as np
import torch

from interplab import toyworld as tw
from interplab.models import load
from interplab.zoo import t2i as base
from interplab.zoo.oracle import agreement

FAMILIES = {"style": ("texture",), "mascot": ("shape", "colour", "texture"), "emblem": ("shape", "colour")}


@torch.no_grad()
def main(n: int = 64, seed: int = 5) -> None:
    oracle, models = load("oracle"), {name: load(name) for name in ("t2i", "t2i_t5")}
    rng = np.random.default_rng(seed)
    for family, keys in FAMILIES.items():
        ex = [tw.captions.sample(rng, family, base.DARK) for _ in range(n)]
        wanted = [{k: getattr(e.scene.objects[0], k) for k in keys} for e in ex]
        scores = {name: float(agreement(oracle, m.generate([e.caption for e in ex], seed=3), wanted).mean())
                  for name, m in models.items()}
        print(family, {k: round(v, 3) for k, v in scores.items()})


if __name__ == "__main__":
    main()
