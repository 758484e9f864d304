"""Pilot (docs/drafts/STATUS.md, ch09, twelfth session): Chapter 9 spec's CLIP-compo-tiny (§5.2: text 3 x 64, vision 3 x 64, projection 16, AdamW 5e-4, wd 0.05,
batch 128) on the toy pre-training mix; every 100 steps: premise gate (colour-swap text score, bag control,
zero-shot colour / shape) and linear probes of its token states (noun 1 -> C1, noun 2 -> C2 / C1).

    OMP_NUM_THREADS=2 python docs/drafts/src/ch09_compo_clip.py
"""
import time
import torch
from transformers import CLIPConfig, CLIPModel
from interplab import toyworld as tw
from interplab.zoo import clip as zc, loop

import t2i_binding   # docs/drafts/src, beside this script

tok = tw.clip_tokenizer(zc.MAX_LENGTH)
text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=zc.MAX_LENGTH, hidden_act="quick_gelu", pad_token_id=tok.eos_token_id, bos_token_id=2,
            eos_token_id=tok.eos_token_id)
vision = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, hidden_act="quick_gelu")
torch.manual_seed(0)
model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)


@torch.no_grad()
def probe():
    """t2i_binding's token-state probes (same captions, seed 123) on this tower."""
    model.eval()
    return t2i_binding.probe(lambda caps: model.text_model(input_ids=tw.encode(tok, caps)[0]).last_hidden_state, seed=123)


t0 = time.time()
for step in range(1, 801):
    model.train()
    r, _ = loop.step_rngs(0, step)
    images, captions = zc.batch(r, 128)
    loss = zc.contrastive_loss(model, images, tw.encode(tok, captions)[0], captions)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        model.eval()
        b = zc.binding_scores(model, tok, n=300)
        acc = zc.attribute_accuracy(model, tok, n=300)
        print(step, f"loss {loss.item():.3f}", "swap-text", round(b["text"], 3), "bag", round(b["bag"], 3),
              "colour", round(acc["colour"], 3), "shape", round(acc["shape"], 3), probe(), f"{time.time() - t0:.0f}s", flush=True)
