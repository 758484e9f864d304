"""Run ch05a.py against the in-progress t2i state (development only)."""
import sys, torch
from diffusers import UNet2DConditionModel
import interplab.models as M
from interplab.zoo import t2i, store, clip as zc
_orig = M.load
def load(name):
    if name != "t2i":
        return _orig(name)
    import numpy as np
    from diffusers import AutoencoderKL
    st, vs = store.load_state("t2i"), store.load_state(t2i.VAE_STATE)
    vae = AutoencoderKL(**t2i.vae_config()); vae.load_state_dict(vs["modules"]["vae"]); vae.eval()
    with torch.no_grad():
        z = vae.encode(t2i.render(np.random.default_rng(99), 512)[1] * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    clip_model, tok = zc.load()
    unet = UNet2DConditionModel(**t2i.unet_config()); unet.load_state_dict(st["modules"]["ema"])
    print("dev: t2i state at step", st["step"])
    text = t2i.text_encoder_of(clip_model)
    if "ema_text" in st["modules"]:
        text.load_state_dict(st["modules"]["ema_text"])
    return t2i.ToyDiffusion(unet.eval(), text, tok, vae)
M.load = load
store.read_card = lambda name, _r=store.read_card: {"gates": {}} if name == "t2i" else _r(name)
src = open("build/ch05a/ch05a.py").read()
for kv in sys.argv[1:]:
    k, v = kv.split("=")
    src = src.replace(f"\n{k} = ", f"\n{k} = {v}  # dev\n_old_{k} = ", 1)
src = src.replace("ch.claim(", "ch.claim(") 
exec(compile(src, "ch05a.py", "exec"), {"__name__": "__main__"})
