"""Memory of one SDS-CLIP step at the paper's shapes (Chapter 9), measured on the CPU and extrapolated to batch 32.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mem_sds_clip.py [--student ViT-B/32] [--batches 1 2] [--chunk 1]

One ``distillation.finetune`` step (LayerNorms + h_w trained, lam = 1) of a CLIP student (random weights,
the released config) against SD-v1's UNet and text encoder at full width in float32 (as
``conditioning.float32_modules`` runs the frozen UNet for a fit), 64 x 64 latents. Each batch size runs in
a fresh process; its peak resident memory (``ru_maxrss``) minus the resident memory once the models are
built is the step's working memory, which grows linearly with the batch (activations kept for the backward
pass through the UNet). The fit through the measured batch sizes, plus the models, estimates what a GPU
needs at the dissertation's batch 32; CUDA's caching allocator and kernels' workspaces add to it, so read
the result as a lower bound. ``--chunk c`` also measures each batch with L_SDS back-propagated c rows at a
time (``finetune(sds_chunk=c)``), whose working memory should follow c, not the batch.
Writes benchmarks/results/mem_sds_clip.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")


def rss_gb() -> float:
    """Current resident memory of this process in GB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def one_step(student_name: str, batch: int, chunk: int | None = None) -> dict:
    """Build the models, then run one SDS-CLIP step; resident memory before and at peak (GB)."""
    import torch
    from diffusers import AutoencoderKL

    from interplab import distillation
    from interplab.models import clip_students
    from interplab.models.diffusion import StableDiffusion, clip_bpe_tokenizer, random_sd
    torch.manual_seed(0)
    unet, text = random_sd("v1", width=None)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).eval()   # unused by SDS: it reads z only
    pipe = StableDiffusion(unet.float(), text.float(), clip_bpe_tokenizer(77), vae)
    spec = clip_students.STUDENTS[student_name]
    student = distillation.SdsClip(clip_students.build(student_name), pipe.latent_shape)
    tokenize = clip_students.tokenizer(student_name)
    images = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    captions = ["a red book and a yellow vase"] * batch
    params = {"unet": sum(p.numel() for p in unet.parameters()), "text_encoder": sum(p.numel() for p in text.parameters()),
              "student": sum(p.numel() for p in student.parameters())}
    before = rss_gb()
    distillation.finetune(student, tokenize, pipe, lambda rng: (images, captions), lam=1.0, steps=1, progress=False,
                          pixel_values=lambda x: clip_students.pixels(x, spec.image_size), sds_chunk=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # kB -> GB
    return {"batch": batch, "chunk": chunk, "models_gb": before, "peak_gb": peak, "step_gb": peak - before, "params": params}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="ViT-B/32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk", type=int, help="also measure with L_SDS back-propagated this many rows at a time")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-chunk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one_step(args.student, args.child, args.child_chunk)))
        return
    import numpy as np
    from timing import machine, results_path
    def measure(b, chunk=None):
        cmd = [sys.executable, __file__, "--student", args.student, "--child", str(b)]
        out = subprocess.run(cmd + (["--child-chunk", str(chunk)] if chunk else []), capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"batch {b}{f', chunk {chunk}' if chunk else ''}: models {row['models_gb']:.2f} GB, "
              f"step working memory {row['step_gb']:.2f} GB")
        return row

    rows = [measure(b) for b in args.batches]
    chunked = [measure(b, args.chunk) for b in args.batches if args.chunk and args.chunk < b]
    b = np.array([r["batch"] for r in rows], float)
    step = np.array([r["step_gb"] for r in rows])
    slope, intercept = np.polyfit(b, step, 1) if len(b) > 1 else (step[0] / b[0], 0.0)
    models = float(np.mean([r["models_gb"] for r in rows]))
    at32 = models + intercept + 32 * slope
    print(f"per image {slope:.2f} GB; estimated at batch 32: {at32:.1f} GB ({args.student} + SD-v1 UNet in float32)")
    result = {"machine": machine(), "student": args.student, "rows": rows, "chunked": chunked, "per_image_gb": slope,
              "fixed_step_gb": intercept, "estimated_batch32_gb": at32,
              "note": "CPU peak RSS; a GPU's caching allocator and kernel workspaces add to it (a lower bound)"}
    results_path("mem_sds_clip.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
