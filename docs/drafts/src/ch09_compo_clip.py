"""Pilot (docs/drafts/STATUS.md, ch09, twelfth session): Chapter 9 spec's CLIP-compo-tiny (§5.2: text 3 x 64, vision 3 x 64, projection 16, AdamW 5e-4, wd 0.05,
batch 128) on the toy pre-training mix; every 100 steps: premise gate (colour-swap text score, bag control,
zero-shot colour / shape) and linear probes of its token states (noun 1 -> C1, noun 2 -> C2 / C1).

    OMP_NUM_THREADS=2 python docs/drafts/src/ch09_compo_clip.py
"""
import time
import numpy as np, torch
from sklearn.linear_model import LogisticRegression
from transformers import CLIPConfig, CLIPModel
from interplab import toyworld as tw
from interplab.zoo import clip as zc, loop
from interplab.zoo import t2i as base

tok = tw.clip_tokenizer(zc.MAX_LENGTH)
text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=zc.MAX_LENGTH, hidden_act="quick_gelu", pad_token_id=tok.eos_token_id, bos_token_id=2,
            eos_token_id=tok.eos_token_id)
vision = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, hidden_act="quick_gelu")
torch.manual_seed(0)
model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)

rng = np.random.default_rng(123)
caps, c1, c2 = [], [], []
for _ in range(3000):
    a = tw.captions.random_object(rng, base.DARK, "top left")
    b = tw.captions.random_object(rng, base.DARK, "top right")
    caps.append(f"{tw.phrase(a, ('colour', 'texture', 'shape'))} and {tw.phrase(b, ('colour', 'texture', 'shape'))}")
    c1.append(a.colour); c2.append(b.colour)
ids = tw.encode(tok, caps)[0]

@torch.no_grad()
def probe():
    model.eval()
    st = model.text_model(input_ids=ids).last_hidden_state.numpy()
    out = {}
    for name, (pos, y) in {"n1>C1": (4, c1), "n2>C2": (9, c2), "n2>C1": (9, c1), "eos>C1": (10, c1), "eos>C2": (10, c2)}.items():
        out[name] = round(float(LogisticRegression(max_iter=2000).fit(st[:2000, pos], y[:2000]).score(st[2000:, pos], y[2000:])), 3)
    return out

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
