"""t2i_ft: the zoo's t2i fine-tuned on a shifted image distribution (the OpenJourney analogue).

OpenJourney is Stable Diffusion v1.5 fine-tuned on Midjourney images: the same architecture and text
encoder, a different look. Chapter 5's LocoGen asks whether a fine-tune moves the layers that control
style and objects (the dissertation: it does not). t2i_ft is that fine-tune in the toy world: every
object is drawn large (the base draws small and large alike) and styles and paintings are twice as
common, so the look shifts while the captions keep their grammar.

Deviation, stated: OpenJourney updates every UNet weight; t2i_ft trains rank-8 LoRA adapters on every
attention projection of the UNet (self- and cross-attention, diffusers' LoRA recipe) and ships only
them (the zoo's 40 MB cannot hold a second 17 MB UNet). ``load`` merges them into the shipped t2i's
weights, so the chapters get a plain UNet of the same architecture. The text tower stays frozen.
"""
import numpy as np
import torch

from .. import toyworld as tw
from ..lora import LoRA
from . import loop, store
from . import t2i as base

NAME = "t2i_ft"
RANK = 8
MIX = {"single": 0.35, "pair": 0.10, "relation": 0.04, "style": 0.28, "painting": 0.10, "mascot": 0.06,
       "emblem": 0.04, "action": 0.03}
LARGE = tw.Palette(backgrounds=("dark",), sizes=("large",))
SHIFT_GATE = 0.2  # the share of unprompted-size samples drawn large must rise by this much: a fine-tune that did something


@torch.no_grad()
def large_share(model, oracle, n: int = 200, seed: int = 30_001) -> float:
    """Fraction of samples of "a {colour} {texture} {shape}" (size unprompted) whose object the oracle reads as large."""
    from .oracle import predict, read_main_object
    prompts, _ = base.single_object_prompts(n, seed)
    main = read_main_object(predict(oracle, model.generate(prompts, seed=seed)))
    return float(np.mean([s == "large" for s in main["size"]]))


def train(steps: int = 500, batch_size: int = 32, seed: int = 0, lr: float = 1e-3, ship: bool = True,
          resume: bool = True, eval_n: int = 400, oracle=None) -> dict:
    """LoRA adapters (rank ``RANK``) on the shipped t2i's UNet attention, trained with t2i's loss on the
    shifted mix (caption dropout 0.1 for guidance, as t2i). Gates: t2i's single-object fidelity, and the
    look moved (``large_share`` up by ``SHIFT_GATE``)."""
    from .oracle import load as load_oracle
    oracle = oracle or load_oracle()
    model = base.load()
    model.unet.requires_grad_(False)
    model.text_model.requires_grad_(False)
    torch.manual_seed(seed)
    adapters = LoRA(model.unet, RANK, seed=seed)
    opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)

    step = base.lora_step(model, adapters, batch_size, MIX, LARGE)   # the shifted look
    before = large_share(model, oracle, n=max(eval_n // 2, 1))
    run = loop.train(NAME, {"lora": adapters}, opt, step, steps, seed, resume=resume)
    adapters.merge(model.unet)
    after = large_share(model, oracle, n=max(eval_n // 2, 1))
    fid = base.fidelity(model, oracle, n=eval_n)
    gates = {k: store.gate(v, base.GATE) for k, v in fid.items() if k.startswith("single_")}
    gates["large_share_rise"] = store.gate(after - before, SHIFT_GATE)
    extra = {"pair_fidelity": {k: v for k, v in fid.items() if k.startswith("pair_")},
             "large_share": {"t2i": before, "t2i_ft": after}, "rank": RANK, "lr": lr, "batch_size": batch_size,
             "mix": MIX, "base": "the zoo's t2i", "base_unet_sha256": base.base_sha(),
             "final_loss": float(np.mean(run["losses"][-50:]))}
    if ship:
        base.ship_adapters(NAME, adapters, seed=seed, steps=steps, wall_time_s=run["wall_time_s"],
                           cpu_time_s=run["cpu_time_s"], gates=gates, extra=extra)
    return {"gates": gates, **extra, **run}


def load():
    """The shipped t2i with t2i_ft's adapters merged into its UNet (a ToyDiffusion), after verifying both."""
    return base.load_adapted(NAME)[0]
