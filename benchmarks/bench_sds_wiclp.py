"""Chapter 9's two costs: one SDS-CLIP step against one plain contrastive step, and WiCLP at inference
against the unmodified pipeline.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sds_wiclp.py [--repeats 3] [--paper]

SDS-CLIP (``distillation.finetune``, LayerNorms + h_w trained, AdamW): the same student and batch
with lam = 0 (L_CLIP only: both towers forward and backward) and lam = 1 (plus the teacher's text
encoding and the frozen UNet's forward and backward into z). Per step, best of ``--repeats`` runs of
``--steps`` steps.

- tiny: the zoo's ``clip`` (student) and ``t2i`` (teacher), batch 16 as in the notebook;
- ``--paper``: the real shapes with random weights: CLIP ViT-B/32 (openai config) and SD-v1's UNet
  and text encoder at full width, 64 x 64 latents, batch 2 (the dissertation's batch is 32 on a GPU;
  the ratio, not the seconds, is the result on a CPU).

WiCLP inference: ``pipe.sample`` of 8 prompts (10 DDIM steps, guidance) with the plain conditioning
against the same with a trained-shape WiCLP (s = 1) applied first, and with SWITCH-OFF at tau = 800.
Paper shapes: the projection of a 77 x 768 conditioning against one SD-v1 UNet call at batch 2 (CFG),
and the implied 50-step overhead. Writes benchmarks/results/bench_sds_wiclp.json.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from interplab import conditioning, distillation  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402


def sds_vs_clip(student_clip, tokenize, pipe, batches, steps, repeats, pixel_values) -> dict:
    """Seconds per fine-tuning step with lam = 0 and lam = 1 (fresh student each run)."""
    out = {}
    for name, lam in (("clip_step_s", 0.0), ("sds_clip_step_s", 1.0)):
        def run():
            student = distillation.SdsClip(student_clip, pipe.latent_shape)
            return distillation.finetune(student, tokenize, pipe, batches, lam=lam, steps=steps, progress=False,
                                         pixel_values=pixel_values)
        _, wall, cpu = best_of(run, repeats)
        out[name] = wall / steps
        out[name.replace("_s", "_cpu_s")] = cpu / steps
    out["ratio"] = out["sds_clip_step_s"] / out["clip_step_s"]
    return out


def tiny(repeats: int, steps: int) -> dict:
    from interplab import toyworld as tw
    from interplab.models import load
    from interplab.zoo import clip as zc
    pipe = load("t2i")
    model, tok = load("clip")
    res = {"sds": sds_vs_clip(model, lambda caps: tw.encode(tok, caps)[0], pipe, lambda rng: zc.batch(rng, 16),
                              steps, repeats, lambda x: x * 2 - 1)}
    prompts = ["a red circle and a blue square", "a green star and a yellow cross"] * 4
    cond = pipe.encode(prompts)
    proj = conditioning.WindowProjection(cond.shape[-1], 1)
    with torch.no_grad():
        proj.linear.weight.add_(torch.randn_like(proj.linear.weight) * 0.01)   # a trained-like, non-identity map

    def plain():
        return pipe.sample(pipe.encode(prompts), seed=0, steps=10)

    def wiclp():
        with torch.no_grad():
            return pipe.sample(proj(pipe.encode(prompts)), seed=0, steps=10)

    def switch_off():
        with torch.no_grad():
            c = pipe.encode(prompts)
            return pipe.sample(proj(c), seed=0, steps=10, switch=(800, c))
    times = {name: best_of(fn, repeats)[1] for name, fn in (("plain", plain), ("wiclp", wiclp), ("switch_off", switch_off))}
    res["wiclp"] = {f"{k}_s": v for k, v in times.items()} | {"wiclp_ratio": times["wiclp"] / times["plain"],
                                                              "switch_off_ratio": times["switch_off"] / times["plain"]}
    return res


def paper(repeats: int, steps: int) -> dict:
    from interplab.models import clip_students
    from interplab.models.diffusion import StableDiffusion, clip_bpe_tokenizer, random_sd
    from diffusers import AutoencoderKL
    unet, text = random_sd("v1", width=None)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).eval()   # unused by SDS: it reads z only
    pipe = StableDiffusion(unet, text, clip_bpe_tokenizer(77), vae)
    student = clip_students.build("ViT-B/32")
    tokenize = clip_students.tokenizer("ViT-B/32")
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    captions = ["a red book and a yellow vase", "a blue bear and a brown boat"]
    res = {"sds": sds_vs_clip(student, tokenize, pipe, lambda rng: (images, captions), steps, repeats,
                              lambda x: clip_students.pixels(x, 224))}
    cond = pipe.encode(captions[:1])                                            # (1, 77, 768)
    proj = conditioning.WindowProjection(cond.shape[-1], 1)
    with torch.no_grad():
        _, t_proj, _ = best_of(lambda: proj(cond), repeats * 10)
        z = torch.randn(2, 4, 64, 64)
        c2 = torch.cat([pipe.encode([""]), cond])
        _, t_unet, _ = best_of(lambda: unet(z, torch.tensor([500, 500]), encoder_hidden_states=c2), repeats)
    res["wiclp"] = {"projection_s": t_proj, "unet_call_cfg_s": t_unet,
                    "overhead_ratio_50_steps": (50 * t_unet + t_proj) / (50 * t_unet),
                    "switch_off_note": "SWITCH-OFF swaps one tensor per step: no extra UNet call"}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--paper", action="store_true", help="also time the real shapes (random weights; minutes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"machine": machine(), "tiny": tiny(args.repeats, args.steps)}
    if args.paper:
        result["paper_shapes"] = paper(max(1, args.repeats - 1), 1)
    out = results_path("bench_sds_wiclp.json")
    out.write_text(json.dumps(result, indent=2))
    for profile in ("tiny", "paper_shapes"):
        if profile in result:
            r = result[profile]
            print(f"{profile}: SDS-CLIP step {r['sds']['sds_clip_step_s'] * 1000:.0f} ms vs L_CLIP step "
                  f"{r['sds']['clip_step_s'] * 1000:.0f} ms: ratio {r['sds']['ratio']:.2f}")
            print(f"{profile}: WiCLP {json.dumps({k: round(v, 5) for k, v in r['wiclp'].items() if isinstance(v, float)})}")
    print("wrote", out)


if __name__ == "__main__":
    main()
