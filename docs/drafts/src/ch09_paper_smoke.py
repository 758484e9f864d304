"""Run ch09.py's paper profile end to end offline: the real code path on random reduced models and on
tiny files written in the benchmarks' released formats (development check, not a result).

    OMP_NUM_THREADS=1 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch09_paper_smoke.py

Replaced: every hub loader (SD v1.4 -> its topology at width 32 with a small 4-level VAE, 16 x 16 latents
and 2 sampling steps, also standing in for SD v2; SD-XL, PixArt-alpha 512 / 1024, SD3, FLUX and DeepFloyd IF (stages I and II) -> models.tiny_random's
builds at their pipelines' default steps, the CLIP students -> clip_students.build(layers=1), BLIP-VQA and IF's T5 -> 1-layer
random builds with word-level tokenizers, Inception -> random weights), spaCy -> " and "-split noun chunks and
tags from a word list, and the
torchvision zero-shot splits (CIFAR's md5-checked pickles cannot be faked) -> a constant.

Every parameter the draft resolves with ``interplab.by_profile`` (left at None it takes the paper value: all 400
Winoground items, 3700 fine-tuning steps, five students, 70 images per train prompt, ...) is overridden below, so
this stays a smoke-size run; a new by_profile parameter needs an override here too.
"""
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
from PIL import Image

from interplab import compositional as cb
from interplab import tifa
from interplab.models import clip_students, diffusion, tiny_random
from smoke import fake_sd, run_draft

WORDS = "a an the red blue green yellow brown book vase bear boat car bench and on of is in cat dog sofa".split()


def word_tokenizer(eos_only: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "</s>", "yes", "no", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if eos_only:   # T5: "... </s>"
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 5)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def fake_blip(*a, **k):
    from transformers import BlipConfig, BlipForQuestionAnswering
    tok = word_tokenizer(False)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                encoder_hidden_size=32, bos_token_id=4, pad_token_id=0, sep_token_id=3, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    return cb.BlipVqa(BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision)), tok, image_size=32)


def fake_t5(*a, **k):
    from transformers import T5Config, T5EncoderModel
    tok = word_tokenizer(True)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval(), tok


def fake_inception(*a, **k):
    from torchvision.models import inception_v3
    return cb.InceptionFeatures(inception_v3(weights=None, aux_logits=False, init_weights=False))


class FakeDoc:
    """spaCy's Doc as the draft reads it: noun chunks split at " and ", tokens tagged from WORDS' roles."""
    NOUNS, ADJECTIVES = set("book vase bear boat car bench cat dog sofa".split()), set("red blue green yellow brown".split())

    def __init__(self, text):
        self.noun_chunks = [types.SimpleNamespace(text=t) for t in text.split(" and ")]
        self.tokens = [types.SimpleNamespace(text=w, tag_="NN" if w in self.NOUNS else "JJ" if w in self.ADJECTIVES else "DT")
                       for w in text.split()]

    def __iter__(self):
        return iter(self.tokens)


def write_data(root: Path):
    rng = np.random.default_rng(0)

    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    (root / "winoground").mkdir(parents=True)
    rows = [dict(id=i, image_0=f"ex_{i}_img_0", image_1=f"ex_{i}_img_1", caption_0="a dog on a sofa",
                 caption_1="a sofa on a dog", num_main_preds=1, collapsed_tag="Relation") for i in range(2)]
    (root / "winoground" / "examples.jsonl").write_text("\n".join(map(json.dumps, rows)))
    for r in rows:
        for k in (0, 1):
            image(root / "winoground" / "images" / f"{r[f'image_{k}']}.png")
    for kind, extra in (("relation", dict(relation_name="on")), ("attribution", dict(attributes=["red", "blue"]))):
        recs = [dict(image_path=f"{i}.jpg", bbox_x=2, bbox_y=2, bbox_w=20, bbox_h=16, true_caption="the red cat",
                     false_caption="the blue cat", **extra) for i in range(2)]
        (root / "aro").mkdir(exist_ok=True)
        (root / "aro" / f"visual_genome_{kind}.json").write_text(json.dumps(recs))
        for i in range(2):
            image(root / "aro" / "images" / f"{i}.jpg")
    (root / "t2i_compbench").mkdir()
    for cat in cb.COMPBENCH_CATEGORIES:
        for split in ("train", "val"):
            (root / "t2i_compbench" / f"{cat}_{split}.txt").write_text(
                "a red book and a yellow vase\na blue bear and a brown boat\nthe green car is on the bench\n")
    for split in ("train2017", "val2017"):
        ann = dict(images=[dict(id=i, file_name=f"{i}.jpg") for i in range(6)],
                   annotations=[dict(image_id=i, caption=f"a red cat on a sofa {i}") for i in range(6)])
        (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "coco" / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
        for i in range(6):
            image(root / "coco" / split / f"{i}.jpg")
    for kind, folder in (("coco_karpathy_test", "coco/val2014"), ("flickr30k_test", "flickr30k/flickr30k-images")):
        recs = [dict(image=f"{folder.split('/')[-1]}/{i}.jpg", caption=["A red cat is on the sofa.", "the dog on a blue boat"])
                for i in range(2)]
        (root / "aro" / f"{kind}.json").write_text(json.dumps(recs))
        for i in range(2):
            image(root / folder / f"{i}.jpg")
    (root / "clevr").mkdir()
    (root / "clevr" / "pairs.jsonl").write_text("\n".join(json.dumps(dict(image=f"{i}.png", true="a red cat on a sofa",
                                                                       false="a sofa on a red cat", kind="spatial"))
                                                        for i in range(2)))
    for i in range(2):
        image(root / "clevr" / "images" / f"{i}.png")
    for i in range(3):
        image(root / "cc3m" / "00000" / f"{i:09d}.jpg")
        (root / "cc3m" / "00000" / f"{i:09d}.txt").write_text("a red cat on a sofa")
    (root / "tifa").mkdir()
    rows = [dict(id=f"coco_{i}", caption=cap, question=q, choices=ch, answer=a, answer_type=t, element=e)
            for i, cap in enumerate(["a red book and a yellow vase", "a blue bear on a boat"])
            for q, ch, a, t, e in (("is there a book?", ["yes", "no"], "yes", "object", "book"),
                                   ("what color is the vase?", ["red", "yellow", "blue"], "yellow", "color", "yellow"))]
    (root / "tifa" / tifa.FILE).write_text(json.dumps(rows))
    for rater, votes in (("r1", ["left", "tie", "right"]), ("r2", ["right", "right", "left"])):  # 3 pairs: one per category
        rows = "".join(f"{i},pair_{i:03d}.png,,p,q,{v}\n" for i, v in enumerate(votes))
        (root / f"human_{rater}.csv").write_text("pair_id,image,attribute,prompt,question,verdict\n" + rows)


def main():
    spacy = types.ModuleType("spacy")
    spacy.load = lambda name: FakeDoc
    sys.modules["spacy"] = spacy
    diffusion.StableDiffusion.from_pretrained = classmethod(lambda *a, **k: fake_sd(latent=16))
    families = {"sd-v2": lambda: fake_sd(latent=16), "sdxl": tiny_random.stable_diffusion_xl,
                "pixart-512": tiny_random.pixart_alpha, "pixart-1024": lambda: tiny_random.pixart_alpha(use_additional_conditions=True),
                "sd3": tiny_random.stable_diffusion_3, "flux": tiny_random.flux, "deepfloyd-if": tiny_random.deepfloyd_if}
    diffusion.load_t2i = lambda name, device="cpu", dtype=None: families[name]()
    diffusion.DeepFloydIFStageII.from_pretrained = classmethod(lambda cls, stage_1, **k: tiny_random.deepfloyd_if_stage_2(stage_1))
    diffusion.DeepFloydIF.text_encoder = staticmethod(fake_t5)
    cb.BlipVqa.from_pretrained = classmethod(fake_blip)
    cb.InceptionFeatures.from_pretrained = classmethod(fake_inception)
    clip_students.load = lambda name, device="cpu": clip_students.build(name, layers=1)
    cb.zero_shot = lambda *a, **k: 0.5
    tmp = Path(tempfile.mkdtemp())
    write_data(tmp)
    cb.ROOT, tifa.ROOT = tmp, tmp / "tifa"
    run_draft("ch09", dict(profile="paper", n_winoground=2, n_aro=2, diffusion_samples=2, ft_steps=1, n_ft_seeds=1,
                           n_test_prompts=2, samples_per_prompt=1, train_prompts=2, train_steps=1, cstar_prompts=2,
                           cstar_steps=1, switch_taus=[1000, 800, 0], fid_images=4,
                           students=["ViT-B/32", "RN50", "ViT-B/16 LAION-400M"], finetune_data="cc3m", n_order=2, n_clevr=2,
                           n_human=3, human_study_csvs=[str(tmp / "human_r1.csv"), str(tmp / "human_r2.csv")],
                           per_generator=2, keep_best=2, gors_steps=2, gors_threshold=0.0, star_size=16, device="cpu"))


if __name__ == "__main__":
    main()
