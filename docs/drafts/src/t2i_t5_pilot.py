"""Pilot for issue 5's `t5_locoedit_weaker`: a DeepFloyd analogue made from the zoo's t2i (not shipped).

A bidirectional T5 encoder (transformers' T5EncoderModel, 6 layers, d_model = the t2i's cross-attention width,
gated-GELU feed-forward as T5 v1.1, no padding mask), trained from scratch together with rank-8 LoRA on every
attention projection of the shipped t2i's UNet, by t2i's own denoising loss on t2i's caption mix.

    python docs/drafts/src/t2i_t5_pilot.py train 1000    # ~4 min wall with 2 threads; build/exp/t2i_t5_pilot_1000.pt
    python docs/drafts/src/t2i_t5_pilot.py check 1000    # gates, and style / mascot / emblem fidelity vs t2i
"""
import sys

import numpy as np
import torch
from transformers import T5Config, T5EncoderModel

from interplab import paths
from interplab import toyworld as tw
from interplab.lora import LoRA
from interplab.models import load
from interplab.zoo import loop
from interplab.zoo import t2i as base
from interplab.zoo.oracle import agreement

NAME = "t2i_t5_pilot"


def t5_config(model) -> T5Config:
    width = model.text_model.config.hidden_size
    return T5Config(vocab_size=model.text_model.config.vocab_size, d_model=width, d_kv=16, num_heads=4,
                    d_ff=4 * width, num_layers=6, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
                    decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)


def checkpoint(steps: int):
    return paths.BUILD / "exp" / f"{NAME}_{steps}.pt"


def train(steps: int, lr: float = 1e-3, text_lr: float = 1e-3, seed: int = 0) -> None:
    model = base.load()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(t5_config(model)).train()
    model.text_model = t5
    model.unet.requires_grad_(False)
    adapters = LoRA(model.unet, 8, seed=seed)
    opt = torch.optim.AdamW([{"params": adapters.parameters(), "lr": lr},
                             {"params": t5.parameters(), "lr": text_lr}], weight_decay=0.0)
    step = base.lora_step(model, adapters, 32, base.T2I_MIX, base.DARK, text_grad=True)
    run = loop.train(NAME, {"lora": adapters, "t5": t5}, opt, step, steps, seed, resume=True)
    print(f"wall {run['wall_time_s']:.0f} s, cpu {run['cpu_time_s']:.0f} s, loss {np.mean(run['losses'][-50:]):.4f}")
    checkpoint(steps).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"lora": adapters.state_dict(), "t5": t5.state_dict()}, checkpoint(steps))


def load_pilot(steps: int):
    model = base.load()
    state = torch.load(checkpoint(steps), weights_only=True)
    t5 = T5EncoderModel(t5_config(model)).eval()
    t5.load_state_dict(state["t5"])
    model.text_model = t5
    adapters = LoRA(model.unet, 8)
    adapters.load_state_dict(state["lora"])
    adapters.merge(model.unet)
    return model


@torch.no_grad()
def check(steps: int) -> None:
    oracle, t2i, t5m = load("oracle"), load("t2i"), load_pilot(steps)
    print({k: round(v, 3) for k, v in base.fidelity(t5m, oracle, n=200).items()})
    rng = np.random.default_rng(5)
    for family, keys in [("style", ("texture",)), ("mascot", ("shape", "colour", "texture")), ("emblem", ("shape", "colour"))]:
        ex = [tw.captions.sample(rng, family, base.DARK) for _ in range(64)]
        wanted = [{k: getattr(e.scene.objects[0], k) for k in keys} for e in ex]
        scores = {name: float(agreement(oracle, m.generate([e.caption for e in ex], seed=3), wanted).mean())
                  for name, m in (("t2i", t2i), ("t2i_t5", t5m))}
        print(family, {k: round(v, 3) for k, v in scores.items()})


if __name__ == "__main__":
    {"train": train, "check": check}[sys.argv[1]](int(sys.argv[2]))
