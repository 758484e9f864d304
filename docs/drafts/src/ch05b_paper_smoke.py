"""Run ch05b.py's paper profile end to end offline on random reduced builds of SD v1.4, SD-XL and DeepFloyd IF
(development check, not a result): every hub loader replaced by `smoke` / `tiny_random` stand-ins.

    OMP_NUM_THREADS=1 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch05b_paper_smoke.py
"""
from interplab.models import diffusion, tiny_random
from smoke import fake_clip_score, fake_sd, run_draft


def fast(pipe):
    pipe.sampler = dict(pipe.sampler, steps=2)
    return pipe


def main():
    diffusion.StableDiffusion.from_pretrained = classmethod(lambda *a, **k: fake_sd(latent=16))
    diffusion.StableDiffusionXL.from_pretrained = classmethod(lambda *a, **k: fast(tiny_random.stable_diffusion_xl()))
    diffusion.DeepFloydIF.from_pretrained = classmethod(lambda *a, **k: fast(tiny_random.deepfloyd_if(max_length=77)))
    diffusion.DeepFloydIFStageII.from_pretrained = classmethod(lambda cls, stage_1, **k: fast(
        tiny_random.deepfloyd_if_stage_2(stage_1)))
    diffusion.ClipScore.from_pretrained = classmethod(fake_clip_score)
    run_draft("ch05b", dict(profile="paper", models=["sd14", "openjourney", "sdxl", "deepfloyd"], n_prompts=2, n_verification=3,
                            sdxl_m_values=[3],
                            n_trace=1, n_preserve_prompts=4, device="cpu", num_inference_steps=2))


if __name__ == "__main__":
    main()
