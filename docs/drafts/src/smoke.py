"""Shared by the paper-profile smoke runs: execute a draft with its parameters overridden (papermill's way),
and small random stand-ins for the hub's Stable Diffusion and CLIP-Score (development checks, not results)."""
import re
from pathlib import Path

import torch

from interplab.models import clip_students, diffusion

HERE = Path(__file__).parent


def run_draft(name: str, overrides: dict) -> None:
    """Execute docs/drafts/src/NAME.py with each ``key = value`` parameter line replaced."""
    _run((HERE / f"{name}.py").read_text(), overrides, HERE / f"{name}.py")


def run_notebook(path, overrides: dict, cells=None) -> None:
    """Execute the code cells of a notebook (e.g. notebooks/ch07_rep_decompose.ipynb) the same way;
    ``cells``: only these cell indices (the parameters cell must be among them)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    _run("\n\n".join(c.source for i, c in enumerate(nb.cells) if c.cell_type == "code"
                      and (cells is None or i in cells)), overrides, path)


def _run(src: str, overrides: dict, where) -> None:
    for k, v in overrides.items():
        src, n = re.subn(rf"^{k} = .*$", f"{k} = {v!r}", src, count=1, flags=re.M)
        assert n == 1, k
    exec(compile(src, str(where), "exec"), {"__name__": "__main__"})


def fake_sd(*a, latent: int = 64, text_layers: int = 1, **k):
    """SD v1's topology at width 32 with a 4-level VAE (8x down, 8 channels): 8 * latent px <-> latent^2 latents."""
    from diffusers import AutoencoderKL
    unet, text = diffusion.random_sd("v1", width=32, text_layers=text_layers)
    unet.config.sample_size = latent
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8).eval()
    pipe = diffusion.StableDiffusion(unet, text, diffusion.clip_bpe_tokenizer(77), vae)
    pipe.sampler = dict(steps=2, guidance=7.5, eta=0.0)   # 50 steps in the real pipeline
    return pipe


def fake_clip_score(*a, **k):
    """CLIP-Score from a 1-layer random CLIP ViT-B/32."""
    model, tokenize = clip_students.build("ViT-B/32", layers=1), clip_students.tokenizer("ViT-B/32")
    return diffusion.ClipScore(lambda x: clip_students.embed_images(model, x.float()),
                               lambda t: clip_students.embed_texts(model, tokenize, t))
