"""Chapter 9's paper profile: the CLIP students, the benchmarks' loaders and the disentangled BLIP-VQA,
on the real architectures with random weights and on files written in the released formats."""
import itertools
import json

import numpy as np
import pytest
import torch

from interplab import compositional as cb
from interplab import conditioning, distillation
from interplab.errors import ResourceUnavailable
from interplab.models import clip_students, tiny_random


# ---------------------------------------------------------------- loaders


def _write_image(path, size=(40, 30)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def test_loaders_read_the_released_formats_and_name_the_fix_when_files_are_missing(tmp_path):
    for loader in (cb.winoground, lambda root: cb.aro("relation", root), lambda root: cb.coco_captions(root=root),
                   lambda root: cb.compbench_prompts("color", "val", root)):
        with pytest.raises(ResourceUnavailable, match="looked for"):
            loader(tmp_path)
    wino = tmp_path / "winoground"
    wino.mkdir()
    rows = [dict(id=i, image_0=f"ex_{i}_img_0", image_1=f"ex_{i}_img_1", caption_0="a mug in grass",
                 caption_1="grass in a mug", tag="Noun", secondary_tag="", num_main_preds=1 + i % 2,
                 collapsed_tag=("Object", "Relation")[i % 2]) for i in range(2)]
    (wino / "examples.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    items = cb.winoground(tmp_path)
    assert [it["collapsed_tag"] for it in items] == ["Object", "Relation"]
    assert items[1]["image_1"] == wino / "images" / "ex_1_img_1.png" and items[1]["num_main_preds"] == 2

    (tmp_path / "aro").mkdir()
    record = dict(image_path="1.jpg", bbox_x=5, bbox_y=4, bbox_w=20, bbox_h=10, true_caption="the dog is on the sofa",
                  false_caption="the sofa is on the dog", relation_name="on")
    (tmp_path / "aro" / "visual_genome_relation.json").write_text(json.dumps([record]))
    _write_image(tmp_path / "aro" / "images" / "1.jpg")
    (r,) = cb.aro("relation", tmp_path)
    assert (r["true"], r["false"], r["label"], r["bbox"]) == (record["true_caption"], record["false_caption"], "on",
                                                              (5, 4, 20, 10))
    crop = cb.load_image(r["image"], 16, bbox=r["bbox"])
    assert crop.shape == (3, 16, 16) and 0 <= crop.min() and crop.max() <= 1

    (tmp_path / "t2i_compbench").mkdir()
    (tmp_path / "t2i_compbench" / "color_val.txt").write_text("a red book and a yellow vase\n\na blue bear and a brown boat\n")
    assert cb.compbench_prompts("color", "val", tmp_path) == ["a red book and a yellow vase", "a blue bear and a brown boat"]

    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    ann = dict(images=[dict(id=7, file_name="7.jpg")], annotations=[dict(image_id=7, caption="A cat. "),
                                                                    dict(image_id=7, caption="A kitten")])
    (tmp_path / "coco" / "annotations" / "captions_train2017.json").write_text(json.dumps(ann))
    assert cb.coco_captions(root=tmp_path) == [(tmp_path / "coco" / "train2017" / "7.jpg", "A cat."),
                                               (tmp_path / "coco" / "train2017" / "7.jpg", "A kitten")]


def test_winoground_columns_split_the_text_score_by_tag_and_main_predicates():
    right = torch.tensor([[2.0, 1.0], [1.0, 2.0]])     # text and image score both right
    wrong = torch.tensor([[1.0, 2.0], [1.0, 2.0]])     # text wrong (image 1 prefers caption 1 for both)
    items = [dict(collapsed_tag=t, num_main_preds=k) for t, k in
             (("Object", 1), ("Object", 1), ("Relation", 2), ("Both", 1))]
    out = cb.winoground_columns(torch.stack([right, wrong, right, right]), items)
    assert out["overall"] == 0.75 and out["Object"] == 0.5 and out["Relation"] == 1.0 and out["Both"] == 1.0
    assert out["1 main pred"] == pytest.approx(2 / 3) and out["2 main pred"] == 1.0
    acc = cb.aro_accuracy([1.0, 0.0, 3.0], [0.5, 1.0, 1.0], labels=["on", "on", "in"])
    assert acc == pytest.approx({"micro": 2 / 3, "macro": 0.75})


# ---------------------------------------------------------------- BLIP-VQA


def _tiny_blip():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BlipConfig, BlipForQuestionAnswering, PreTrainedTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "yes", "no", "a", "red", "blue", "book", "vase", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                encoder_hidden_size=32, bos_token_id=4, pad_token_id=0, sep_token_id=3, max_position_embeddings=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # BLIP's initialisation (std 0.02) leaves the answer nearly blind to the image
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model, tokenizer


def test_blip_vqa_reads_the_yes_and_no_logits_of_the_first_answer_token():
    model, tok = _tiny_blip()
    vqa = cb.BlipVqa(model, tok, image_size=32)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    qs = ["a red book?", "a blue vase?", "a red vase?"]
    p = vqa.yes_probability(images, qs)
    assert p.shape == (3,) and ((0 < p) & (p < 1)).all()
    assert torch.allclose(vqa.yes_probability(images, qs, batch_size=2), p)
    assert not torch.allclose(vqa.yes_probability(images.flip(0), qs), p)      # the answer depends on the image
    bias = model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        bias[vqa.answers[0]] += 30
    assert (vqa.yes_probability(images, qs) > 0.999).all()
    with torch.no_grad():
        bias[vqa.answers[1]] += 60
    assert (vqa.yes_probability(images, qs) < 1e-3).all()


def test_blip_vqa_yes_probability_is_the_first_answer_step_of_blips_own_generate():
    from interplab.models.clip_students import pixels
    model, tok = _tiny_blip()
    vqa = cb.BlipVqa(model, tok, image_size=32)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    qs = ["a red book?", "a blue vase?", "a red vase?"]
    q = tok(qs, padding=True, return_tensors="pt")
    out = model.generate(pixel_values=pixels(images, 32), input_ids=q.input_ids, attention_mask=q.attention_mask,
                         output_scores=True, return_dict_in_generate=True, max_new_tokens=1, do_sample=False)
    expected = out.scores[0][:, vqa.answers].softmax(-1)[:, 0]
    assert torch.allclose(vqa.yes_probability(images, qs), expected, atol=1e-5)


def test_disentangled_vqa_multiplies_each_images_phrase_probabilities():
    class Fixed:   # P(yes) per question, whatever the image
        table = {"a red book?": 0.5, "a yellow vase?": 0.8, "a blue bear?": 0.25}

        def yes_probability(self, images, questions):
            assert len(images) == len(questions)
            return torch.tensor([self.table[q] for q in questions])
    prompts = ["a red book and a yellow vase", "a blue bear"]
    got = cb.disentangled_vqa(Fixed(), torch.zeros(2, 3, 4, 4), prompts, chunker=lambda p: p.split(" and "))
    assert torch.allclose(got, torch.tensor([0.4, 0.25]))


# ---------------------------------------------------------------- SDS-CLIP on the real students


@pytest.mark.parametrize("name, norms", [
    ("ViT-B/32", {"vision_model.pre_layrnorm.weight", "vision_model.post_layernorm.bias",
                  "vision_model.encoder.layers.0.layer_norm2.weight", "text_model.final_layer_norm.weight",
                  "text_model.encoder.layers.0.layer_norm1.bias"}),
    ("RN50", {"model.ln_final.weight", "model.transformer.resblocks.0.ln_1.weight", "model.visual.attnpool.c_proj.weight"}),
    ("CoCa ViT-B/32 LAION-2B", {"model.visual.ln_pre.weight", "model.visual.ln_post.bias", "model.text.ln_final.weight",
                                "model.visual.transformer.resblocks.0.ln_2.weight"}),
])
def test_sds_clip_trains_the_layer_norms_of_the_real_students_and_its_gradient_reaches_the_image_tower(name, norms):
    pipe = tiny_random.stable_diffusion()
    spec = clip_students.STUDENTS[name]
    student = distillation.SdsClip(clip_students.build(name, layers=1), pipe.latent_shape, also_train=spec.also_train)
    trainable = {n for n, p in student.clip.named_parameters() if p.requires_grad}
    assert norms <= trainable
    assert all("norm" in n or "ln_" in n or "attnpool" in n for n in trainable)
    assert not any(n.startswith("model.visual.layer") for n in trainable)          # RN50's BatchNorm trunk stays
    assert student.h_w.out_features == int(np.prod(pipe.latent_shape))

    tokenize = clip_students.tokenizer(name)

    def batches(rng):
        return torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))), \
            ["a red star", "a blue ring"]
    unet_before = [p.detach().clone() for p in pipe.unet.parameters()]
    losses = distillation.finetune(student, tokenize, pipe, batches, lam=1.0, steps=2, progress=False,
                                   pixel_values=lambda x: clip_students.pixels(x, spec.image_size))
    assert len(losses) == 2 and losses[1][1] > 0
    assert all(torch.equal(a, b) for a, b in zip(unet_before, pipe.unet.parameters()))

    # L_SDS alone (h_w made non-zero) reaches the image tower's trainable parameters through z
    student.zero_grad()
    with torch.no_grad():
        student.h_w.weight.normal_(0, 1e-2)
    img = clip_students.features(student.clip.get_image_features(
        pixel_values=clip_students.pixels(torch.rand(2, 3, 40, 40), spec.image_size)))
    with conditioning.frozen(pipe.unet):
        conditioning.sds_loss(pipe, student.latent(img), pipe.encode(["a red star", "a blue ring"]),
                              torch.Generator().manual_seed(0)).backward()
    visual = [p for n, p in student.clip.named_parameters() if p.requires_grad and n.startswith(("vision", "model.visual"))]
    assert visual and any(p.grad is not None and p.grad.abs().sum() > 0 for p in visual)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_sds_clip_keeps_rn50s_batch_norms_frozen_and_trains_through_a_half_precision_teacher():
    pipe = tiny_random.stable_diffusion()
    pipe.unet.half()                                     # the paper profile's fp16 SD teacher
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    spec = clip_students.STUDENTS["RN50"]
    student = distillation.SdsClip(clip_students.build("RN50", layers=1), pipe.latent_shape, also_train=spec.also_train)
    norms = [m for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    stats = {k: v.clone() for k, v in student.clip.state_dict().items() if "running_" in k or "num_batches" in k}

    def batches(rng):
        return torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))), \
            ["a red star", "a blue ring"]
    losses = distillation.finetune(student, clip_students.tokenizer("RN50"), pipe, batches, lam=1e-3, steps=1,
                                   lr_ln=5e-5, lr_h=5e-5, progress=False,
                                   pixel_values=lambda x: clip_students.pixels(x, spec.image_size))
    assert all(torch.equal(v, stats[k]) for k, v in student.clip.state_dict().items() if k in stats)   # BatchNorm stats
    g = student.h_w.weight.grad          # L_SDS at lambda 1e-3 through the fp16 UNet, computed in float32
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 and np.isfinite(losses[0]).all()
    assert all(v.dtype == torch.float16 and torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    # the helper alone: train mode everywhere but the BatchNorms
    distillation.train_keeping_batch_norms(student)
    assert student.training and not any(m.training for m in norms)


def test_clip_pixels_resize_crop_and_normalise():
    x = torch.tensor(clip_students.CLIP_MEAN).view(1, 3, 1, 1).expand(2, 3, 30, 50)
    out = clip_students.pixels(x, 24)
    assert out.shape == (2, 3, 24, 24) and out.abs().max() < 1e-5


# ---------------------------------------------------------------- word order (§11.8.4), CLEVR (§11.8.8), CC-3M (§11.8.6)


def test_word_order_perturbations_reorder_the_captions_own_words_and_only_the_words_they_name():
    from interplab import word_order
    tag = word_order.tagged_by(["dog", "ball", "park"], ["red", "big"])
    tagged = tag("a big dog chases the red ball in a park")
    words = [w for w, _ in tagged]
    rng = np.random.default_rng(0)
    opts = word_order.options(tagged, rng)
    assert opts[0] == " ".join(words) and len(opts) == 5
    assert all(sorted(o.split()) == sorted(words) and o != opts[0] for o in opts[1:])
    nouns = {1: "big", 2: "dog", 5: "red", 6: "ball", 9: "park"}  # and adjectives
    for _ in range(20):
        moved = word_order.perturb(tagged, "shuffle_nouns_and_adjectives", rng).split()
        assert [moved[i] for i in range(10) if i not in nouns] == [words[i] for i in range(10) if i not in nouns]
        assert {moved[i] for i in (2, 6, 9)} == {"dog", "ball", "park"} and {moved[i] for i in (1, 5)} == {"big", "red"}
        rest = word_order.perturb(tagged, "shuffle_all_but_nouns_and_adjectives", rng).split()
        assert [rest[i] for i in nouns] == list(nouns.values())
        within = word_order.perturb(tagged, "shuffle_within_trigrams", rng).split()
        assert all(sorted(within[k:k + 3]) == sorted(words[k:k + 3]) for k in range(0, 10, 3))
        units = word_order.perturb(tagged, "shuffle_trigrams", rng).split()
        tris = [" ".join(words[k:k + 3]) for k in range(0, 10, 3)]
        assert " ".join(units) in {" ".join(p) for p in itertools.permutations(tris)}
    with pytest.raises(ValueError, match="unknown perturbation"):
        word_order.perturb(tagged, "reverse", rng)
    # the true option must win outright: a tie is a miss
    assert word_order.order_accuracy([[3, 1, 1, 1, 1], [2, 2, 1, 1, 1], [0, 1, 0, 0, 0]]) == pytest.approx(1 / 3)


def test_aro_order_tiny_keeps_each_scenes_caption_first():
    from interplab.toyworld import binding
    a, b = binding.aro_order(6, 3), binding.aro_order(6, 3)
    assert a["images"].shape == (6, 3, 32, 32) and torch.equal(a["images"], b["images"]) and a["options"] == b["options"]
    assert all(len(o) == 5 and len(set(o)) == 5 for o in a["options"])
    assert "and" in a["options"][0][0] and "to the left of" in a["options"][1][0]


def test_order_clevr_and_cc3m_loaders_read_their_formats(tmp_path):
    from interplab import word_order
    for loader in (lambda root: cb.aro_order("coco", root=root), lambda root: cb.clevr_pairs(root),
                   lambda root: cb.cc3m_pairs(root)):
        with pytest.raises(ResourceUnavailable):
            loader(tmp_path)
    (tmp_path / "aro").mkdir()
    (tmp_path / "aro" / "flickr30k_test.json").write_text(json.dumps([
        {"image": "flickr30k-images/1.jpg", "caption": ["Two dogs play in the snow.", "A dog (brown) runs!"]},
        {"image": "flickr30k-images/2.jpg", "caption": ["A man rides a red bike."]}]))
    tag = word_order.tagged_by(["dogs", "dog", "snow", "man", "bike"], ["brown", "red"])
    items = cb.aro_order("flickr30k", tagger=tag, root=tmp_path)
    assert [it["options"][0] for it in items] == ["two dogs play in the snow", "a dog brown runs", "a man rides a red bike"]
    assert items[2]["image"] == tmp_path / "flickr30k" / "flickr30k-images" / "2.jpg"
    assert len(cb.aro_order("flickr30k", n=2, tagger=tag, root=tmp_path)) == 2
    assert cb.aro_caption("A  b.c " + "w " * 40).split()[:3] == ["a", "b", "c"] and len(cb.aro_caption("w " * 40).split()) == 30

    (tmp_path / "clevr").mkdir()
    (tmp_path / "clevr" / "pairs.jsonl").write_text(
        json.dumps({"image": "a.png", "true": "a red cube left of a ball", "false": "a red ball left of a cube",
                    "kind": "spatial"}) + "\n")
    [pair] = cb.clevr_pairs(tmp_path)
    assert pair["image"] == tmp_path / "clevr" / "images" / "a.png" and pair["kind"] == "spatial"

    for key, text in (("00000/000000001", "a cat"), ("00000/000000000", "a dog"), ("00001/000010000", "a hat")):
        _write_image(tmp_path / "cc3m" / f"{key}.jpg")
        (tmp_path / "cc3m" / f"{key}.txt").write_text(text + "\n")
    pairs = cb.cc3m_pairs(tmp_path)
    assert [c for _, c in pairs] == ["a dog", "a cat", "a hat"] and len(cb.cc3m_pairs(tmp_path, n=2)) == 2
    images, captions = cb.coco_stream(pairs, batch_size=2, size=16)(np.random.default_rng(0))
    assert images.shape == (2, 3, 16, 16) and set(captions) <= {"a dog", "a cat", "a hat"}


# ---------------------------------------------------------------- attention contributions: CLIP vs T5 (Figs 9.4, 9.5)


def test_t5_contributions_sum_to_each_layers_self_attention_output():
    from transformers import T5Config, T5EncoderModel
    from interplab import attention
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    conts = attention.t5_contributions_by_layer(t5, ids)               # switches to eager and back
    assert conts.shape == (2, 2, 6, 6) and t5.config._attn_implementation == "sdpa"
    t5.set_attn_implementation("eager")
    written = {}
    handles = [t5.encoder.block[i].layer[0].SelfAttention.register_forward_hook(
        lambda m, a, out, i=i: written.__setitem__(i, out[0])) for i in range(2)]
    with torch.no_grad():
        out = t5(input_ids=ids, output_hidden_states=True, output_attentions=True)
    for h in handles:
        h.remove()
    for i in range(2):
        sub = t5.encoder.block[i].layer[0]
        v = sub.SelfAttention.v(sub.layer_norm(out.hidden_states[i])).view(2, 6, 4, 8)
        terms = attention.weighted_contributions(out.attentions[i], v, sub.SelfAttention.o.weight)
        assert torch.allclose(terms.sum(2), written[i], atol=1e-5)         # no bias: the writes are the output
        assert torch.allclose(terms.norm(dim=-1), conts[:, i], atol=1e-6)
    assert (conts.triu(1) > 0).any()                                       # bidirectional: later tokens write too


def test_unintended_layers_and_conjunction_positions():
    from interplab import attention
    from interplab.models.diffusion import clip_bpe_tokenizer
    conts = torch.zeros(2, 3, 8, 8)
    conts[0, :2, 7, 2] = 1.0        # prompt 0: layers 0, 1 send attribute 1 into object 2
    conts[1, :, 3, 6] = 1.0         # prompt 1: every layer sends attribute 2 into object 1 (seen only bidirectionally)
    assert attention.unintended_layers(conts, 2, 3, 6, 7).tolist() == [2, 0]
    assert attention.unintended_layers(conts, 2, 3, 6, 7, bidirectional=True).tolist() == [2, 3]
    tok = clip_bpe_tokenizer(77)
    assert cb.conjunction_positions(tok, "a green bench and a red car") == (2, 3, 6, 7)
    assert cb.conjunction_positions(tok, "A bathroom has brown wall and gold counters") is None
    pos = cb.conjunction_positions(tok, "a turquoise skateboard and an ochre teapot")
    ids = tok("a turquoise skateboard and an ochre teapot").input_ids
    assert tok.decode(ids[pos[1]]).strip() == tok.decode(tok("skateboard").input_ids[-2]).strip()
    assert pos[3] == len(ids) - 2


def test_compbench_training_latents_keep_each_prompts_best_scored_images():
    pipe = tiny_random.stable_diffusion()

    class Bright:   # P(yes) = mean brightness: the filter must keep the brightest images
        def yes_probability(self, images, questions):
            return images.mean(dim=(1, 2, 3))

    class Fake:
        def __init__(self, level, side):
            self.level, self.side = level, side

        def generate(self, prompts, seed=0):
            g = torch.Generator().manual_seed(seed)
            return (self.level + 0.1 * torch.rand(len(prompts), 3, self.side, self.side, generator=g)).clamp(0, 1)
    gens = {"dark": Fake(0.1, 16), "bright": Fake(0.8, 12)}   # generators of different sizes (SD 512 px, IF 256 px)
    lat = cb.compbench_training_latents(pipe, gens, ["a red star", "a blue ring"], per_generator=3, keep=2,
                                        vqa=Bright(), image_size=8, chunker=lambda p: [p], progress=False)
    assert lat.shape == (2, 2, *pipe.latent_shape)
    bright = pipe.encode_images(torch.full((1, 3, 8, 8), 0.85))
    dark = pipe.encode_images(torch.full((1, 3, 8, 8), 0.15))
    assert ((lat - bright).flatten(2).norm(dim=-1) < (lat - dark).flatten(2).norm(dim=-1)).all()


def test_compbench_rewarded_samples_keep_the_pipelines_own_images_above_the_threshold_with_their_scores():
    pipe = tiny_random.stable_diffusion()

    class Bright:
        def yes_probability(self, images, questions):
            return images.mean(dim=(1, 2, 3))
    # image k of a prompt has brightness (k + 0.5) / 4: 0.125, 0.375, 0.625, 0.875
    pipe.generate = lambda prompts, seed=0: ((torch.arange(len(prompts)) + 0.5) / 4).view(-1, 1, 1, 1).expand(
        -1, 3, 16, 16).clone()
    kept, lat, reward = cb.compbench_rewarded_samples(pipe, ["a red star", "a blue ring"], per_prompt=4, vqa=Bright(),
                                                      threshold=0.5, image_size=8, chunker=lambda p: [p],
                                                      progress=False)
    assert kept == ["a red star"] * 2 + ["a blue ring"] * 2
    assert lat.shape == (4, *pipe.latent_shape) and torch.allclose(reward, torch.tensor([0.625, 0.875] * 2))
    assert torch.allclose(lat[1], pipe.encode_images(torch.full((1, 3, 8, 8), 0.875))[0], atol=1e-5)
    none = cb.compbench_rewarded_samples(pipe, ["a red star"], 4, Bright(), threshold=0.9, image_size=8,
                                         chunker=lambda p: [p], progress=False)
    assert none[0] == [] and none[1].shape == (0, *pipe.latent_shape)
    # one generation pass serves both sets: the best image of each prompt and the rewarded images
    best, both = cb.compbench_training_sets(pipe, {"self": pipe}, ["a red star", "a blue ring"], 4, 1, Bright(), 0.5,
                                            image_size=8, chunker=lambda p: [p], progress=False)
    assert best.shape == (2, 1, *pipe.latent_shape) and torch.allclose(best[:, 0], lat[1::2], atol=1e-6)
    assert both[0] == kept and torch.equal(both[1], lat) and torch.equal(both[2], reward)
    # with another generator beside it, GORS's set stays the pipeline's own images (the other's are all bright)
    other = type("Other", (), {"generate": lambda self, prompts, seed=0: torch.full((len(prompts), 3, 16, 16), 0.95)})()
    best, own = cb.compbench_training_sets(pipe, {"self": pipe, "other": other}, ["a red star", "a blue ring"], 4, 1,
                                           Bright(), 0.5, image_size=8, chunker=lambda p: [p], progress=False,
                                           rewarded_from=["self"])
    assert own[0] == kept and torch.allclose(own[2], reward)
    assert torch.allclose(best[:, 0], pipe.encode_images(torch.full((1, 3, 8, 8), 0.95)).expand(2, -1, -1, -1), atol=1e-5)



def test_compbench_best_images_merge_generators_loaded_one_at_a_time_and_encode_for_any_family():
    class Bright:
        def yes_probability(self, images, questions):
            return images.mean(dim=(1, 2, 3))

    class Levels:   # image k of a prompt has brightness levels[k]
        def __init__(self, levels):
            self.levels = torch.tensor(levels)

        def generate(self, prompts, seed=0):
            return self.levels[:len(prompts)].view(-1, 1, 1, 1).expand(-1, 3, 16, 16).clone()
    loads = []

    def load_bright():
        loads.append("bright")
        return Levels([0.9, 0.3, 0.7])
    gens = {"dark": Levels([0.2, 0.8, 0.1]), "bright": load_bright}
    images, scores = cb.compbench_best_images(gens, ["a red star", "a blue ring"], per_generator=3, keep=2,
                                              vqa=Bright(), size=8, chunker=lambda p: [p], progress=False)
    assert loads == ["bright"]                                   # a loader is called once
    assert images.shape == (2, 2, 3, 8, 8) and images.dtype == torch.uint8
    expected = torch.tensor([0.9, 0.8])                          # the best two of both generators, best first
    assert torch.allclose(scores, expected.expand(2, 2), atol=1e-6)
    assert torch.allclose(images.float().mean(dim=(2, 3, 4)) / 255, expected.expand(2, 2), atol=3e-3)
    for pipe in (tiny_random.stable_diffusion(), tiny_random.stable_diffusion_3()):
        lat = cb.encode_at(pipe, images.flatten(0, 1))
        assert lat.shape == (4, *pipe.latent_shape)
        assert torch.allclose(lat[0], pipe.encode_images(images[0, :1].float() / 255)[0].float(), atol=1e-5)


def test_frechet_distance_and_inception_features_for_fid():
    from torchvision.models import inception_v3
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g)
    assert abs(cb.frechet_distance(a, a)) < 1e-9
    assert cb.frechet_distance(a, b) == pytest.approx(cb.frechet_distance(b, a))
    assert cb.frechet_distance(a, b + 1.0) > cb.frechet_distance(a, b + 0.1) > 0
    torch.manual_seed(0)
    feats = cb.InceptionFeatures(inception_v3(weights=None, aux_logits=False, init_weights=False))
    assert feats(torch.rand(3, 3, 40, 40), batch_size=2).shape == (3, 2048)


def test_zero_shot_reads_a_torchvision_split_and_scores_class_prompts(tmp_path):
    with pytest.raises(ResourceUnavailable, match="mnist"):
        cb.zero_shot(None, None, "mnist", root=tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    images = np.repeat(labels * 25, 28 * 28).reshape(-1, 28, 28).astype(np.uint8)   # a digit's label is its grey level
    for split in ("train", "t10k"):   # torchvision checks that both splits exist
        (raw / f"{split}-images-idx3-ubyte").write_bytes(np.array([2051, 6, 28, 28], ">i4").tobytes() + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(np.array([2049, 6], ">i4").tobytes() + labels.tobytes())

    class Stub(torch.nn.Module):   # image -> one-hot of its grey level's digit; prompt -> one-hot of its digit
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def get_image_features(self, pixel_values):
            grey = pixel_values[:, 0].mean((1, 2)) * clip_students.CLIP_STD[0] + clip_students.CLIP_MEAN[0]
            return torch.nn.functional.one_hot((grey * 255 / 25).round().long(), 10).float()

        def get_text_features(self, input_ids):
            return torch.nn.functional.one_hot(input_ids[:, 0], 10).float()
    tokenize = lambda prompts: torch.tensor([[int(p.split()[-1].rstrip("."))] for p in prompts])  # noqa: E731
    assert cb.zero_shot(Stub(), tokenize, "mnist", size=28, root=tmp_path) == 1.0
