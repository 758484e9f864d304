"""t2i_action: the zoo's t2i taught to draw an action, for Chapter 5 part I's causal tracing.

The dissertation traces actions ("a dog running"): a verb that changes how the subject looks. The
toy world's ``action`` family made a verb a *place* (a small object in one half), and the t2i draws no
place from words at all (docs/drafts/STATUS.md: its samples sit in the slot the noise seed picks,
whatever the verb, and fine-tunes did not change that). t2i_action gives the same four verbs an
appearance instead: the ``action_size`` family, where floating / drifting draw the object small and
resting / wandering large (``toyworld.ACTION_SIZES``).

What trains, and why: rank-8 LoRA adapters on every attention projection of the UNet (as t2i_ft) and
the text tower's first layer. The tower must change because the zoo's place-blind CLIP never told the
four verbs apart (their final states agree at cosine 0.95-0.999), so no UNet adapter can read them; it
changes in layer 0 only because Chapter 5 part I asks where the tower keeps an attribute, and the
dissertation finds CLIP's knowledge in its first layer: training the whole tower spread the verb over
three causal states (a pilot at lr 4e-4). ``load`` merges the adapters and loads the layer, so the
chapter gets a plain t2i of the same architecture.
"""
import numpy as np
import torch

from .. import toyworld as tw
from ..lora import LoRA
from . import loop, store
from . import t2i as base

NAME = "t2i_action"
RANK = 8
_REST = {k: v for k, v in base.T2I_MIX.items() if k != "action"}                 # the place meaning left out
MIX = {**{k: 0.75 * v / sum(_REST.values()) for k, v in _REST.items()}, "action_size": 0.25}   # a quarter actions
PARTS = ("unet", "text")  # the base files it depends on: the UNet it adapts and the tower whose layer 0 it replaces
ACTION_GATE = 0.85  # share of "a photo of a SHAPE VERB" samples the oracle reads at the verb's size (chance 0.5)


def action_prompts(n: int, seed: int) -> tuple[list[str], list[dict]]:
    """n prompts "a photo of a SHAPE VERB", the four verbs in turn, and the size each asks for."""
    rng = np.random.default_rng(seed)
    verbs = list(tw.ACTION_SIZES)
    shapes = [tw.SHAPES[rng.integers(len(tw.SHAPES))] for _ in range(n)]
    cycle = [verbs[i % len(verbs)] for i in range(n)]
    return [f"a photo of a {s} {v}" for s, v in zip(shapes, cycle)], [{"size": tw.ACTION_SIZES[v]} for v in cycle]


@torch.no_grad()
def action_accuracy(model, oracle, n: int = 96, seed: int = 77) -> float:
    """Fraction of action prompts whose sample the oracle reads at the verb's size."""
    from .oracle import agreement
    prompts, wanted = action_prompts(n, seed)
    return float(agreement(oracle, model.generate(prompts, seed=seed), wanted).mean())


def _text_layer(model) -> torch.nn.Module:
    return model.text_model.encoder.layers[0]


def train(steps: int = 1500, batch_size: int = 32, seed: int = 0, lr: float = 1e-3, text_lr: float = 3e-3,
          ship: bool = True, resume: bool = True, eval_n: int = 400, oracle=None) -> dict:
    """LoRA adapters on the shipped t2i's UNet attention (lr ``lr``) and its tower's layer 0 (``text_lr``),
    trained with t2i's loss on ``MIX``. Gates: t2i's single-object fidelity, and the action drawn
    (``action_accuracy`` >= ``ACTION_GATE``)."""
    from .oracle import load as load_oracle
    oracle = oracle or load_oracle()
    model = base.load()
    model.unet.requires_grad_(False)
    model.text_model.requires_grad_(False)
    layer = _text_layer(model)
    layer.requires_grad_(True)
    torch.manual_seed(seed)
    adapters = LoRA(model.unet, RANK, seed=seed)
    opt = torch.optim.AdamW([{"params": adapters.parameters(), "lr": lr},
                             {"params": layer.parameters(), "lr": text_lr}], weight_decay=0.0)
    step = base.lora_step(model, adapters, batch_size, MIX, base.DARK, text_grad=True)
    before = action_accuracy(model, oracle, n=max(eval_n // 4, 4))
    run = loop.train(NAME, {"lora": adapters, "text_layer0": layer}, opt, step, steps, seed, resume=resume)
    layer.requires_grad_(False)
    adapters.merge(model.unet)
    after = action_accuracy(model, oracle, n=max(eval_n // 4, 4))
    fid = base.fidelity(model, oracle, n=eval_n)
    gates = {k: store.gate(v, base.GATE) for k, v in fid.items() if k.startswith("single_")}
    gates["action_accuracy"] = store.gate(after, ACTION_GATE)
    extra = {"pair_fidelity": {k: v for k, v in fid.items() if k.startswith("pair_")},
             "action_accuracy": {"t2i": before, "t2i_action": after}, "rank": RANK, "lr": lr, "text_lr": text_lr,
             "batch_size": batch_size, "mix": MIX, "base": "the zoo's t2i", "base_sha256": base.base_sha(PARTS),
             "final_loss": float(np.mean(run["losses"][-50:]))}
    if ship:
        base.ship_adapters(NAME, adapters, PARTS, {"text_layer0": layer.state_dict()}, seed=seed, steps=steps,
                           wall_time_s=run["wall_time_s"], cpu_time_s=run["cpu_time_s"], gates=gates, extra=extra)
    return {"gates": gates, **extra, **run}


def load():
    """The shipped t2i with t2i_action's adapters merged and its tower's layer 0 replaced (a ToyDiffusion)."""
    model, d = base.load_adapted(NAME, PARTS)
    _text_layer(model).load_state_dict(store.load_weights(d / "text_layer0.safetensors"))
    return model
