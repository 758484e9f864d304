"""Run ch05a.py's paper profile end to end offline on a random reduced SD v1.4 (development check, not a result):
the hub loaders replaced by `smoke` stand-ins.

    OMP_NUM_THREADS=1 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch05a_paper_smoke.py
"""
from interplab.models import diffusion
from smoke import fake_clip_score, fake_sd, run_draft


def main():
    diffusion.StableDiffusion.from_pretrained = classmethod(lambda *a, **k: fake_sd(latent=16, text_layers=2))  # layer 0 vs deeper
    diffusion.ClipScore.from_pretrained = classmethod(fake_clip_score)
    run_draft("ch05a", dict(profile="paper", n_prompts_per_attribute=1, n_validation=1, n_preserve_prompts=4,
                            n_edit_prompts=2, n_edit_seeds=1, baseline_steps=2, device="cpu", num_inference_steps=2))


if __name__ == "__main__":
    main()
