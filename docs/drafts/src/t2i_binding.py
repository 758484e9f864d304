"""Where the zoo t2i loses attribute binding (docs/drafts/STATUS.md, ch09, 2026-12-06).

1. ``probe``: does the frozen text tower keep each object's colour at its own noun? Logistic probes on the
   final states of "a C1 T1 S1 and a C2 T2 S2" (noun 1 -> C1, noun 2 -> C2 and C1, EOS -> both).
2. ``finetune``: with the tower frozen, does more two-object data teach the UNet to read it? The UNet
   (all weights, or rank-``lora`` adapters on its attention) trained on a pair-heavy mix, ``t2i.fidelity``
   every ``eval_every`` steps. Nothing is saved or shipped.

    OMP_NUM_THREADS=1 python docs/drafts/src/t2i_binding.py probe
    OMP_NUM_THREADS=1 python docs/drafts/src/t2i_binding.py finetune --steps 3000 --pair 0.8 --ema 0.998 --n-eval 400
"""
import argparse
import contextlib
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from interplab import toyworld as tw
from interplab.lora import LoRA
from interplab.zoo import loop
from interplab.zoo import t2i as base
from interplab.zoo.oracle import load as load_oracle


@torch.no_grad()
def probe(n: int = 3000, n_train: int = 2000, seed: int = 0) -> dict:
    """Held-out accuracy of a linear read-out of a colour from one token's final state (chance 1/8)."""
    model = base.load()
    rng = np.random.default_rng(seed)
    captions, c1, c2 = [], [], []
    for _ in range(n):
        a = tw.captions.random_object(rng, base.DARK, "top left")
        b = tw.captions.random_object(rng, base.DARK, "top right")
        captions.append(f"{tw.phrase(a, ('colour', 'texture', 'shape'))} and {tw.phrase(b, ('colour', 'texture', 'shape'))}")
        c1.append(a.colour)
        c2.append(b.colour)
    states = model.text_model(input_ids=model.tokenize(captions)).last_hidden_state.numpy()   # (n, T, d)
    # token 0 is BOS, then "a C1 T1 S1 and a C2 T2 S2", then EOS: noun 1 at 4, noun 2 at 9, EOS at 10
    reads = {"noun 1 -> colour 1": (4, c1), "noun 2 -> colour 2": (9, c2), "noun 2 -> colour 1": (9, c1),
             "EOS -> colour 1": (10, c1), "EOS -> colour 2": (10, c2)}
    out = {}
    for name, (pos, y) in reads.items():
        clf = LogisticRegression(max_iter=2000).fit(states[:n_train, pos], y[:n_train])
        out[name] = round(float(clf.score(states[n_train:, pos], y[n_train:])), 3)
    return out


def finetune(steps: int, pair: float, lr: float, lora: int, ema_decay: float, eval_every: int, n_eval: int,
             batch_size: int = 32, seed: int = 0) -> None:
    oracle, model = load_oracle(), base.load()
    model.text_model.requires_grad_(False)
    mix = {"single": 1 - pair, "pair": pair}
    if lora:
        model.unet.requires_grad_(False)
        adapters = LoRA(model.unet, lora, seed=seed)
        opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
        attached = lambda: adapters.attached(model.unet)  # noqa: E731
    else:
        opt = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=0.01)
        attached = contextlib.nullcontext
    ema = loop.EMA(model.unet, decay=ema_decay) if ema_decay and not lora else None
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)

    def evaluate(step):
        model.unet.eval()
        live = None
        if ema is not None and step:
            live = {k: v.clone() for k, v in model.unet.state_dict().items()}
            model.unet.load_state_dict(ema.state_dict())
        with attached():
            fid = base.fidelity(model, oracle, n=n_eval)
        if live is not None:
            model.unet.load_state_dict(live)
        print(step, {k: round(v, 3) for k, v in fid.items()}, flush=True)

    evaluate(0)
    t0 = time.process_time()
    for i in range(1, steps + 1):
        model.unet.train()
        ex, images = base.render(rng, batch_size, jitter=base.UNET_JITTER, mix=mix)
        captions = [e.caption if rng.random() >= 0.1 else "" for e in ex]   # caption dropout, as t2i
        with torch.no_grad():
            cond = model.text_model(input_ids=model.tokenize(captions)).last_hidden_state
        with attached():
            loss = base.diffusion_loss(model, images, cond, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model.unet, i)
        if i % 100 == 0:
            print(f"step {i} loss {loss.item():.4f} {time.process_time() - t0:.0f} CPU-s", flush=True)
        if i % eval_every == 0:
            evaluate(i)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("probe", "finetune"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pair", type=float, default=0.6, help="share of two-object captions (the rest: single objects)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora", type=int, default=0, help="adapter rank (0: fine-tune every UNet weight)")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated weights (0: the live weights)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--n-eval", type=int, default=200, help="t2i.fidelity's n: n single prompts, n / 4 pairs")
    args = parser.parse_args()
    if args.what == "probe":
        print(probe())
    else:
        finetune(args.steps, args.pair, args.lr, args.lora, args.ema, args.eval_every, args.n_eval)
