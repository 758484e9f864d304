"""t2i_t5: the zoo's t2i read through a bidirectional T5 encoder, the DeepFloyd IF analogue of Chapter 5 part II.

DeepFloyd IF conditions its UNet on T5-XXL, a bidirectional encoder: a subject's information also sits at the
positions before it, which is the dissertation's reason LocoEdit's last-subject-token keys miss it (§5.9). t2i_t5
gives the toy the same contrast with t2i: a transformers ``T5EncoderModel`` (6 layers, d_model = the UNet's
cross-attention width, gated-GELU feed-forward as T5 v1.1; the toy world's word-level tokenizer, no padding mask)
trained from scratch, jointly with rank-8 LoRA adapters on every attention projection of the shipped t2i's UNet,
by t2i's own denoising loss on t2i's caption mix. The spec's recipe (a T5 pretrained contrastively, then a UNet
trained on it) would train a UNet from scratch, about 100 CPU-minutes; the adapted UNet reaches t2i's gates in
1000 steps (4 wall-minutes with 2 threads). Weights are stored in float16 (the zoo's 40 MB) and the gates are
measured on the stored values. ``load`` merges the adapters and puts the T5 in place of the CLIP tower.
"""
import json

import numpy as np
import torch
from transformers import T5Config, T5EncoderModel

from ..lora import LoRA
from . import loop, store
from . import t2i as base

NAME = "t2i_t5"
RANK = 8
PARTS = ("unet",)  # the base files it depends on: the UNet it adapts (the CLIP tower is replaced)


def t5_config(width: int, vocab_size: int) -> T5Config:
    """The toy T5: 6 layers of width ``width`` (4 heads of 16), feed-forward 4 x width, gated GELU."""
    return T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // 4, num_heads=4, d_ff=4 * width, num_layers=6,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0,
                    is_encoder_decoder=False, use_cache=False)


@torch.no_grad()
def _round_to_half(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.copy_(p.half().float())


def train(steps: int = 1000, batch_size: int = 32, seed: int = 0, lr: float = 1e-3, text_lr: float = 1e-3,
          ship: bool = True, resume: bool = True, eval_n: int = 400, oracle=None) -> dict:
    """A fresh T5 (lr ``text_lr``) and LoRA adapters on the shipped t2i's UNet attention (lr ``lr``), trained
    with t2i's loss on t2i's mix. Gates: t2i's single-object fidelity."""
    from .oracle import load as load_oracle
    oracle = oracle or load_oracle()
    model = base.load()
    config = t5_config(model.text_model.config.hidden_size, model.text_model.config.vocab_size)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(config).train()
    model.text_model = t5
    model.unet.requires_grad_(False)
    adapters = LoRA(model.unet, RANK, seed=seed)
    opt = torch.optim.AdamW([{"params": adapters.parameters(), "lr": lr},
                             {"params": t5.parameters(), "lr": text_lr}], weight_decay=0.0)
    step = base.lora_step(model, adapters, batch_size, base.T2I_MIX, base.DARK, text_grad=True)
    run = loop.train(NAME, {"lora": adapters, "t5": t5}, opt, step, steps, seed, resume=resume)
    t5.eval().requires_grad_(False)
    _round_to_half(t5)
    _round_to_half(adapters)
    adapters.merge(model.unet)
    fid = base.fidelity(model, oracle, n=eval_n)
    gates = {k: store.gate(v, base.GATE) for k, v in fid.items() if k.startswith("single_")}
    extra = {"pair_fidelity": {k: v for k, v in fid.items() if k.startswith("pair_")}, "rank": RANK, "lr": lr,
             "text_lr": text_lr, "batch_size": batch_size, "base": "the zoo's t2i", "base_sha256": base.base_sha(PARTS),
             "text_encoder": "T5EncoderModel from scratch (t5_config.json), float16",
             "final_loss": float(np.mean(run["losses"][-50:]))}
    if ship:
        d = store.zoo_dir(NAME)
        d.mkdir(parents=True, exist_ok=True)
        store.provenance.write_json(d / "t5_config.json", config.to_dict())
        base.ship_adapters(NAME, adapters, PARTS, {"t5": t5.state_dict()}, half=True, seed=seed, steps=steps,
                           wall_time_s=run["wall_time_s"], cpu_time_s=run["cpu_time_s"], gates=gates, extra=extra)
    return {"gates": gates, **extra, **run}


def load():
    """The shipped t2i with t2i_t5's adapters merged into its UNet and its T5 as the text tower (a ToyDiffusion)."""
    model, d = base.load_adapted(NAME, PARTS)
    t5 = T5EncoderModel(T5Config(**json.loads((d / "t5_config.json").read_text()))).eval()
    t5.load_state_dict({k: v.float() for k, v in store.load_weights(d / "t5.safetensors").items()})
    model.text_model = t5
    return model
