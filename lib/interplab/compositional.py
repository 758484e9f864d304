"""The compositional benchmarks of Chapter 9's paper profile, read from data/paper/ch09/ in their
released formats, and T2I-CompBench's disentangled BLIP-VQA score.

    winoground()                    400 items (examples.jsonl + images/)          Table 9.1, Fig 9.1
    winoground_columns(S, items)    Table 9.1's six Winoground columns from similarities S (n, 2, 2)
    aro(kind)                       VG-Relation / VG-Attribution (true vs swapped caption, bbox crops)
    aro_order(kind)                 COCO-Order / Flickr30k-Order: a caption vs its 4 word-order perturbations
    clevr_pairs()                   CLEVR binary caption choice (§11.8.8)
    compbench_prompts(category, split)   T2I-CompBench prompts (colour / texture / shape; train / val)
    coco_captions(split)            MS-COCO (image, caption) pairs: SDS-CLIP's fine-tuning stream
    cc3m_pairs()                    Conceptual Captions 3M pairs: the stream of §11.8.6
    BlipVqa, disentangled_vqa       P("yes") per noun phrase, multiplied over the phrases (§9.2.6)
    compbench_training_sets         the best-rated own samples per prompt (CLP / WiCLP) and those above a
                                    threshold (GORS), encoded by the pipeline
    compbench_best_images, encode_at   the best-rated samples of other generators kept as images and
                                    encoded by any family's VAE (WiCLP*)

Every loader raises ResourceUnavailable naming what to put where when its files are absent.
Layout under ``root`` (default data/paper/ch09):

    winoground/examples.jsonl, winoground/images/<image_0>.png     (facebook/winoground, gated)
    aro/visual_genome_{relation,attribution}.json, aro/images/      (the ARO release)
    aro/coco_karpathy_test.json + coco/val2014/                     (COCO-Order: BLIP's Karpathy split, COCO 2014)
    aro/flickr30k_test.json + flickr30k/flickr30k-images/           (Flickr30k-Order)
    clevr/pairs.jsonl, clevr/images/                                 (CLEVR caption pairs; format below)
    cc3m/<shard>/<key>.jpg + <key>.txt                              (img2dataset's "files" output of CC-3M)
    t2i_compbench/<category>_<split>.txt                            (T2I-CompBench examples/dataset)
    coco/annotations/captions_<split>.json, coco/<split>/           (MS-COCO 2017)
"""
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import paths, word_order
from .errors import check_choice, resource_unavailable
from .models.clip_students import embed_images, embed_texts, pixels, read_image

ROOT = paths.DATA / "paper" / "ch09"
DOWNLOAD = {
    "winoground": "accept the licence of the gated hub dataset facebook/winoground and copy data/examples.jsonl "
                  "and the unzipped data/images.zip there",
    "aro": "copy visual_genome_relation.json, visual_genome_attribution.json and the vgr_vga images of the ARO "
           "release (mertyg/vision-language-models-are-bows) there",
    "t2i_compbench": "copy examples/dataset/*.txt of T2I-CompBench (Karine-Huang/T2I-CompBench) there",
    "coco": "copy the MS-COCO 2017 captions annotations and images (cocodataset.org) there",
    "aro_order": "copy BLIP's coco_karpathy_test.json / flickr30k_test.json (the files ARO's COCO_Order / "
                 "Flickr30k_Order read) into aro/ and the COCO 2014 val images / Flickr30k images beside them",
    "clevr": "write CLEVR image-text pairs as JSON lines {image, true, false, kind} (e.g. from GDBench's CLEVR "
             "subset, Krojer et al. 2023) with the images under clevr/images/",
    "cc3m": "download Conceptual Captions 3M with img2dataset (output_format files) there",
}
ORDER_SETS = {"coco": ("coco_karpathy_test.json", "coco"), "flickr30k": ("flickr30k_test.json", "flickr30k")}
WINOGROUND_TAGS = ("Object", "Relation", "Both")
COMPBENCH_CATEGORIES = ("color", "texture", "shape")


def _folder(name: str, root) -> Path:
    folder = Path(root or ROOT) / name
    if not folder.is_dir():
        raise resource_unavailable(f"{name} (looked for {folder})", DOWNLOAD[name])
    return folder


def _file(name: str, path: Path) -> Path:
    if not path.exists():
        raise resource_unavailable(f"{name} file {path}", DOWNLOAD[name])
    return path


# ---------------------------------------------------------------- image-text matching (Part A)


def winoground(root=None) -> list:
    """Winoground items: dicts with caption_0, caption_1, image_0, image_1 (paths), collapsed_tag, num_main_preds."""
    folder = _folder("winoground", root)
    lines = _file("winoground", folder / "examples.jsonl").read_text().splitlines()
    items = []
    for line in filter(str.strip, lines):
        r = json.loads(line)
        items.append(dict(id=r["id"], caption_0=r["caption_0"], caption_1=r["caption_1"],
                          image_0=folder / "images" / f"{r['image_0']}.png",
                          image_1=folder / "images" / f"{r['image_1']}.png",
                          collapsed_tag=r["collapsed_tag"], num_main_preds=int(r["num_main_preds"])))
    return items


def winoground_columns(S: torch.Tensor, items: list) -> dict:
    """Table 9.1's Winoground columns (the text score) plus the overall image and group scores.

    S (n, 2 images, 2 captions): similarity, higher = better (for a diffusion score pass -d)."""
    from .toyworld.binding import winoground_scores
    if len(S) != len(items):
        raise ValueError(f"{len(S)} similarity matrices for {len(items)} items")
    overall = winoground_scores(S)
    out = {"overall": overall["text"], "image": overall["image"], "group": overall["group"]}
    subsets = {tag: [i for i, it in enumerate(items) if it["collapsed_tag"] == tag] for tag in WINOGROUND_TAGS}
    subsets |= {f"{k} main pred": [i for i, it in enumerate(items) if it["num_main_preds"] == k] for k in (1, 2)}
    for name, idx in subsets.items():
        out[name] = winoground_scores(S[idx])["text"] if idx else float("nan")
    return out


def aro(kind: str, root=None) -> list:
    """VG-Relation (kind "relation") or VG-Attribution ("attribution") items: dicts with image (path),
    bbox (x, y, w, h), true, false (captions) and label (the relation, or the two attributes)."""
    check_choice("kind", kind, ("relation", "attribution"))
    folder = _folder("aro", root)
    records = json.loads(_file("aro", folder / f"visual_genome_{kind}.json").read_text())
    return [dict(image=folder / "images" / r["image_path"], bbox=(r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"]),
                 true=r["true_caption"], false=r["false_caption"],
                 label=r["relation_name"] if kind == "relation" else " ".join(r["attributes"]))
            for r in records]


def aro_caption(caption: str, max_words: int = 30) -> str:
    """The ARO / BLIP caption cleaning: lower case, the marks .!"()*#:;~ become spaces, one space between
    words, at most ``max_words`` words."""
    caption = re.sub(r"\s{2,}", " ", re.sub(r'([.!"()*#:;~])', " ", caption.lower())).strip()
    return " ".join(caption.split()[:max_words])


def spacy_tagger(model: str = "en_core_web_sm"):
    """caption -> [(word, "NOUN" | "ADJ" | other)] by spaCy's fine tags (NN* nouns, JJ* adjectives), as
    ARO perturbs its captions."""
    nlp = _spacy(model, "the part-of-speech tags of ARO's word-order perturbations")
    coarse = {"NN": "NOUN", "NNS": "NOUN", "NNP": "NOUN", "NNPS": "NOUN", "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ"}
    return lambda caption: [(t.text, coarse.get(t.tag_, t.tag_)) for t in nlp(caption)]


def aro_order(kind: str, n: int | None = None, seed: int = 0, tagger=None, root=None) -> list:
    """COCO-Order (kind "coco") or Flickr30k-Order ("flickr30k") items: dicts with image (path) and
    options (the cleaned caption first, then its four ``word_order`` perturbations), one per caption of
    the test split's images; ``n`` keeps the first n captions. tagger: default spaCy's en_core_web_sm."""
    check_choice("kind", kind, tuple(ORDER_SETS))
    name, images = ORDER_SETS[kind]
    records = json.loads(_file("aro_order", _folder("aro", root) / name).read_text())
    image_root = Path(root or ROOT) / images
    pairs = [(image_root / r["image"], aro_caption(c)) for r in records for c in r["caption"]][:n]
    options = word_order.order_items([c for _, c in pairs], tagger or spacy_tagger(), seed)
    return [dict(image=path, options=opts) for (path, _), opts in zip(pairs, options)]


def clevr_pairs(root=None) -> list:
    """CLEVR binary caption-choice items: dicts with image (path), true, false, kind."""
    folder = _folder("clevr", root)
    lines = _file("clevr", folder / "pairs.jsonl").read_text().splitlines()
    return [dict(r, image=folder / "images" / r["image"]) for r in map(json.loads, filter(str.strip, lines))]


def aro_accuracy(s_true: torch.Tensor, s_false: torch.Tensor, labels=None) -> dict:
    """Micro accuracy (true caption scored higher) and, given labels, the macro mean over them."""
    right = (torch.as_tensor(s_true) > torch.as_tensor(s_false)).float().numpy()
    out = {"micro": float(right.mean())}
    if labels is not None:
        labels = np.asarray(labels)
        out["macro"] = float(np.mean([right[labels == lab].mean() for lab in np.unique(labels)]))
    return out


def load_image(path, size: int, bbox=None) -> torch.Tensor:
    """An RGB image file -> (3, size, size) in [0, 1]: optional bbox crop (x, y, w, h), then the students'
    evaluation transform (``clip_students.read_image``: short side to ``size`` by PIL's bicubic, centre crop)."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    if bbox is not None:
        x, y, w, h = bbox
        img = img.crop((x, y, x + w, y + h))
    return read_image(img, size)


def coco_captions(split: str = "train2017", root=None) -> list:
    """(image path, caption) pairs of MS-COCO ``split``, every caption of every image."""
    folder = _folder("coco", root)
    ann = json.loads(_file("coco", folder / "annotations" / f"captions_{split}.json").read_text())
    files = {im["id"]: folder / split / im["file_name"] for im in ann["images"]}
    return [(files[a["image_id"]], a["caption"].strip()) for a in ann["annotations"]]


def cc3m_pairs(root=None, n: int | None = None) -> list:
    """(image path, caption) pairs of Conceptual Captions 3M as img2dataset's "files" output lays them out
    (every <key>.jpg beside its <key>.txt), sorted by path; ``n`` keeps the first n."""
    folder = _folder("cc3m", root)
    images = sorted(folder.glob("*/*.jpg"))[:n]
    if not images:
        raise resource_unavailable(f"cc3m images (no <shard>/<key>.jpg under {folder})", DOWNLOAD["cc3m"])
    return [(path, path.with_suffix(".txt").read_text().strip()) for path in images]


# ---------------------------------------------------------------- T2I-CompBench (Part B)


def compbench_prompts(category: str, split: str = "val", root=None) -> list:
    """T2I-CompBench prompts of ``category`` (color, texture, shape) and ``split`` (train, val)."""
    check_choice("category", category, COMPBENCH_CATEGORIES)
    check_choice("split", split, ("train", "val"))
    path = _file("t2i_compbench", _folder("t2i_compbench", root) / f"{category}_{split}.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


_NLP = {}


def _spacy(model: str, why: str):
    """spaCy pipeline ``model``, loaded once."""
    if model not in _NLP:
        try:
            import spacy
            _NLP[model] = spacy.load(model)
        except (ImportError, OSError):
            raise resource_unavailable(f"spaCy's {model} ({why})",
                                       f"run `pip install spacy && python -m spacy download {model}`") from None
    return _NLP[model]


def noun_phrases(prompt: str) -> list:
    """spaCy en_core_web_sm noun chunks of ``prompt``, T2I-CompBench's way of disentangling it."""
    return [chunk.text for chunk in _spacy("en_core_web_sm", "noun chunks of T2I-CompBench prompts")(prompt).noun_chunks]


_CONJUNCTION = re.compile(r"^(?:an? |the )?(\S+) (\S+) and (?:an? |the )?(\S+) (\S+)$", re.IGNORECASE)


def conjunction_positions(tokenizer, prompt: str):
    """Token positions (a1, o1, a2, o2) of "a <a1> <o1> and a <a2> <o2>" (each word's last sub-token), or
    None when the prompt has another form; Fig 9.5 counts only such prompts. ``tokenizer``: a
    transformers tokenizer that ends every sequence with one EOS (CLIP's BPE, T5's SentencePiece)."""
    match = _CONJUNCTION.match(prompt.strip().rstrip("."))
    if match is None:
        return None
    words = prompt.strip().rstrip(".").split()
    ends, picked = word_order.word_ends(tokenizer, words), []
    for word in match.groups():
        picked.append(words.index(word, picked[-1] + 1 if picked else 0))
    return tuple(ends[k] for k in picked)


class BlipVqa:
    """P("yes" | image, question) of a BLIP VQA model: the decoder's first answer token, softmax over
    {"yes", "no"} (a one-token answer ranked as T2I-CompBench ranks its two candidates).

    model: transformers ``BlipForQuestionAnswering``; tokenizer: its (BERT) tokenizer, which must
    hold "yes" and "no" as single tokens.
    """

    def __init__(self, model, tokenizer, image_size: int = 384):
        self.model, self.tokenizer, self.image_size = model.eval(), tokenizer, image_size
        self.answers = tokenizer.convert_tokens_to_ids(["yes", "no"])

    def yes_probability(self, images: torch.Tensor, questions, batch_size: int = 64) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1], N questions -> (N,) P(yes)."""
        questions = list(questions)
        return torch.cat([self._yes(images[i:i + batch_size], questions[i:i + batch_size])
                          for i in range(0, len(questions), batch_size)])

    @torch.inference_mode()
    def _yes(self, images, questions):
        m = self.model
        asked, mask = self._asked(self._seen(images), questions)
        start = torch.full((len(asked), 1), m.decoder_start_token_id, device=asked.device)
        logits = m.text_decoder(input_ids=start, encoder_hidden_states=asked,
                                encoder_attention_mask=mask).logits[:, 0]    # (N, vocab)
        return logits[:, self.answers].float().softmax(-1)[:, 0].cpu()

    def _seen(self, images):
        """The vision tower's states (N, P, d) of images (N, 3, H, W) in [0, 1]."""
        device = next(self.model.parameters()).device
        x = pixels(images.float(), self.image_size).to(device)  # BLIP normalises with CLIP's mean / std
        return self.model.vision_model(pixel_values=x).last_hidden_state

    def _asked(self, seen, questions):
        """(question states (N, L, d) read against the images' states seen (N, P, d), question mask (N, L))."""
        m = self.model
        q = self.tokenizer(list(questions), padding=True, return_tensors="pt").to(seen.device)
        asked = m.text_encoder(input_ids=q.input_ids, attention_mask=q.attention_mask, encoder_hidden_states=seen,
                               encoder_attention_mask=torch.ones(seen.shape[:-1], dtype=torch.long, device=seen.device))[0]
        return asked, q.attention_mask

    @torch.inference_mode()
    def choice_logprob(self, images: torch.Tensor, questions, choices, image_index=None, batch_size: int = 64) -> list:
        """log P(choice | image, question) of every candidate answer, teacher-forced through the decoder
        (BLIP's "rank" inference: each choice's tokens and the closing [SEP]). images (N, 3, H, W) in
        [0, 1]; M questions, choices[i] a list of strings; image_index (M,): the image each question is
        about (default: question i about image i), so that each image passes the vision tower once.
        Returns M tensors (len(choices[i]),)."""
        questions = list(questions)
        index = torch.arange(len(questions)) if image_index is None else torch.as_tensor(image_index)
        seen = torch.cat([self._seen(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        out = []
        for i in range(0, len(questions), batch_size):
            out += self._rank(seen[index[i:i + batch_size].to(seen.device)], questions[i:i + batch_size],
                              choices[i:i + batch_size])
        return out

    def _rank(self, seen, questions, choices):
        m = self.model
        asked, mask = self._asked(seen, questions)
        device = asked.device
        row = torch.tensor([i for i, cs in enumerate(choices) for _ in cs], device=device)
        end = m.config.text_config.sep_token_id   # BLIP's decoder closes an answer with [SEP]
        answers = [self.tokenizer(c, add_special_tokens=False).input_ids + [end] for cs in choices for c in cs]
        width = max(map(len, answers))
        target = torch.full((len(answers), width), -100, dtype=torch.long, device=device)
        for j, a in enumerate(answers):
            target[j, :len(a)] = torch.tensor(a)
        start = torch.full((len(answers), 1), m.decoder_start_token_id, device=device)
        inputs = torch.cat([start, target[:, :-1].clamp(min=0)], 1)   # padding positions are never scored
        logits = m.text_decoder(input_ids=inputs, encoder_hidden_states=asked[row],
                                encoder_attention_mask=mask[row]).logits.float().log_softmax(-1)
        scored = logits.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target >= 0)
        return list(scored.sum(1).cpu().split([len(cs) for cs in choices]))

    @classmethod
    def from_pretrained(cls, model_id: str = "Salesforce/blip-vqa-base", device="cuda"):
        from transformers import AutoTokenizer, BlipForQuestionAnswering
        try:
            model = BlipForQuestionAnswering.from_pretrained(model_id).to(device)
            tok = AutoTokenizer.from_pretrained(model_id)
        except (OSError, ValueError) as err:
            raise resource_unavailable(f"BLIP-VQA `{model_id}` ({type(err).__name__})",
                                       f"run `hf download {model_id}` on a machine with hub access") from None
        return cls(model, tok)


def disentangled_vqa(vqa: BlipVqa, images: torch.Tensor, prompts, chunker=noun_phrases) -> torch.Tensor:
    """T2I-CompBench's disentangled BLIP-VQA: per image, the product over the prompt's noun phrases
    of P(yes | "<phrase>?"). images (N, 3, H, W) in [0, 1], N prompts -> (N,)."""
    phrases = [chunker(p) for p in prompts]
    rows = [i for i, ph in enumerate(phrases) for _ in ph]
    p_yes = vqa.yes_probability(images[rows], [f"{c}?" for ph in phrases for c in ph])
    rows = torch.tensor(rows)
    return torch.stack([p_yes[rows == i].prod() for i in range(len(prompts))])


# ---------------------------------------------------------------- image quality (Fig 9.7)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, d) and b (M, d):
    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)). The trace of the root is the sum of the
    square roots of C_a C_b's eigenvalues (real and >= 0 for a product of covariances), which stays
    defined when fewer images than feature dimensions make the covariances singular."""
    a, b = (torch.as_tensor(x).double().numpy() for x in (a, b))
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_root = np.sqrt(np.clip(np.linalg.eigvals(c_a @ c_b).real, 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c_a) + np.trace(c_b) - 2 * tr_root)


class InceptionFeatures:
    """FID's features: torchvision's Inception-v3 (ImageNet weights) pool features (N, 2048) of [0, 1]
    images resized to 299 (torchvision's port, not the TF graph clean-fid uses: numbers differ slightly)."""

    def __init__(self, model):
        self.model = model.eval()
        self.model.fc = torch.nn.Identity()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        from torchvision.transforms.functional import normalize
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = F.interpolate(images[i:i + batch_size].float().to(device), size=(299, 299), mode="bilinear",
                              antialias=True)
            out.append(self.model(normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])).float().cpu())
        return torch.cat(out)

    @classmethod
    def from_pretrained(cls, device="cuda"):
        from torchvision.models import Inception_V3_Weights, inception_v3
        try:
            return cls(inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1).to(device))
        except Exception as err:  # no network: torchvision words it as a URLError
            raise resource_unavailable(f"Inception-v3 ImageNet weights ({type(err).__name__})",
                                       "fetch them once with torchvision on a machine with internet (TORCH_HOME)") from None


# ---------------------------------------------------------------- training streams


def coco_stream(pairs: list, batch_size: int = 32, size: int = 224):
    """SDS-CLIP's fine-tuning stream over (image path, caption) pairs: a function rng -> (images
    (B, 3, size, size) in [0, 1], B captions), one random caption-image pair per row."""
    def draw(rng):
        rows = rng.choice(len(pairs), batch_size, replace=len(pairs) < batch_size)
        return torch.stack([load_image(pairs[i][0], size) for i in rows]), [pairs[i][1] for i in rows]
    return draw


def _generated_and_scored(generators: dict, prompt: str, per_generator: int, vqa: BlipVqa, chunker, seed: int,
                          size: int, batch_size: int | None = None):
    """``per_generator`` images of one prompt from each generator (name -> pipeline with ``generate``), resized to
    one side (generators differ: SD v1.4 512 px, IF 256 px), (G per_generator, 3, size, size) on the CPU, and their
    disentangled VQA scores (G per_generator,). ``batch_size``: rows per sampling loop (None: each generator's
    default, 256 rows for a pipeline; give a few, e.g. 8, at 512-1024 px)."""
    kw = {} if batch_size is None else {"batch_size": batch_size}
    images = torch.cat([_resized(g.generate([prompt] * per_generator, seed=seed, **kw).cpu(), size)
                        for g in generators.values()])
    return images, disentangled_vqa(vqa, images, [prompt] * len(images), chunker).cpu()


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """images (N, 3, H, W), uint8 or floats in [0, 1] -> floats (N, 3, size, size) in [0, 1]."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def encode_at(pipe, images: torch.Tensor, image_size: int | None = None, batch_size: int = 16) -> torch.Tensor:
    """Latents (N, *pipe.latent_shape) on the CPU, in the VAE's dtype, of images (N, 3, H, W) (uint8 or
    [0, 1]) resized to the pipeline's side (``image_size``; default ``pipe.image_size``): one image set,
    any family's VAE."""
    size = pipe.image_size if image_size is None else image_size
    if not len(images):
        return torch.empty(0, *pipe.latent_shape)
    return torch.cat([pipe.encode_images(_resized(images[i:i + batch_size], size).to(pipe.device)).cpu()
                      for i in range(0, len(images), batch_size)])


def compbench_best_images(generators: dict, prompts, per_generator: int, keep: int, vqa: BlipVqa, size: int = 512,
                          chunker=noun_phrases, seed: int = 0, progress: bool = True, batch_size: int | None = None) -> tuple:
    """§9.2.6's selection kept as images, for any family to encode with its own VAE (WiCLP*'s data): per
    prompt the best ``keep`` of the ``per_generator`` images of every generator by the disentangled VQA.
    ``generators``: name -> pipeline, or a zero-argument loader, called in turn and released after its
    images, so one generator is in memory at a time. Returns images (P, keep, 3, size, size) uint8 on the
    CPU and their scores (P, keep), best first. ``batch_size``: sampling rows per loop (``_generated_and_scored``)."""
    from tqdm.auto import tqdm
    images, scores = None, None
    for name, generator in generators.items():
        pipe = generator if hasattr(generator, "generate") else generator()
        drawn, rated = [], []
        for i, prompt in enumerate(tqdm(prompts, desc=f"generate and score ({name})", disable=not progress)):
            x, s = _generated_and_scored({name: pipe}, prompt, per_generator, vqa, chunker, seed + 7919 * i, size,
                                         batch_size)
            top = s.topk(min(keep, per_generator)).indices
            drawn.append((x[top] * 255).round().to(torch.uint8))
            rated.append(s[top])
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        drawn, rated = torch.stack(drawn), torch.stack(rated)
        if images is not None:
            drawn, rated = torch.cat([images, drawn], 1), torch.cat([scores, rated], 1)
        best = rated.topk(min(keep, rated.shape[1]), dim=1).indices
        images, scores = drawn[torch.arange(len(prompts))[:, None], best], rated.gather(1, best)
    return images, scores


def compbench_training_sets(pipe, generators: dict, prompts, per_generator: int, keep: int, vqa: BlipVqa,
                            threshold: float | None = None, image_size: int | None = None, chunker=noun_phrases, seed: int = 0,
                            progress: bool = True, rewarded_from=None, batch_size: int | None = None) -> tuple:
    """§9.2.6's and GORS's training sets from one pass of generation: per prompt, ``per_generator`` images
    from each generator (name -> pipeline with ``generate``) scored by the disentangled VQA; the best ``keep``
    of each prompt, and (``threshold`` given) every image of the generators named in ``rewarded_from`` (None:
    all; GORS: the fine-tuned model's own) scoring above it with its score as the reward, are encoded by
    ``pipe`` at ``image_size`` (default: its own). Returns (latents (P, keep, *pipe.latent_shape), rewarded):
    rewarded is (prompts of the kept images (N,), latents (N, *latent_shape), rewards (N,)), or None.
    ``batch_size``: sampling rows per loop (None: the generators' default; ``_generated_and_scored``)."""
    from tqdm.auto import tqdm
    size = pipe.image_size if image_size is None else image_size
    eligible = torch.tensor([rewarded_from is None or name in rewarded_from for name in generators]
                            ).repeat_interleave(per_generator)
    best, kept, latents, rewards = [], [], [], []
    for i, prompt in enumerate(tqdm(prompts, desc="generate and score", disable=not progress)):
        images, score = _generated_and_scored(generators, prompt, per_generator, vqa, chunker, seed + 7919 * i, size,
                                              batch_size)
        best.append(encode_at(pipe, images[score.topk(keep).indices], size) if keep else
                    torch.empty(0, *pipe.latent_shape))
        good = torch.nonzero((score > threshold) & eligible).flatten() if threshold is not None else []
        if len(good):
            kept += [prompt] * len(good)
            latents.append(encode_at(pipe, images[good], size))
            rewards.append(score[good])
    if threshold is None:
        return torch.stack(best), None
    if not kept:
        return torch.stack(best), ([], torch.empty(0, *pipe.latent_shape), torch.empty(0))
    return torch.stack(best), (kept, torch.cat(latents), torch.cat(rewards))


def compbench_training_latents(pipe, generators: dict, prompts, per_generator: int, keep: int, vqa: BlipVqa,
                               image_size: int | None = None, chunker=noun_phrases, seed: int = 0,
                               progress: bool = True, batch_size: int | None = None) -> torch.Tensor:
    """§9.2.6's training set alone: the best ``keep`` of each prompt's images, (P, keep, *pipe.latent_shape)."""
    return compbench_training_sets(pipe, generators, prompts, per_generator, keep, vqa, None, image_size, chunker,
                                   seed, progress, batch_size=batch_size)[0]


def compbench_rewarded_samples(pipe, prompts, per_prompt: int, vqa: BlipVqa, threshold: float,
                               image_size: int | None = None, chunker=noun_phrases, seed: int = 0,
                               progress: bool = True, batch_size: int | None = None) -> tuple:
    """GORS's training set alone (T2I-CompBench): ``per_prompt`` images of each prompt from ``pipe`` itself,
    those scoring above ``threshold`` with their score. Returns (prompts (N,), latents (N, ...), rewards (N,))."""
    return compbench_training_sets(pipe, {"self": pipe}, prompts, per_prompt, 0, vqa, threshold, image_size, chunker,
                                   seed, progress, batch_size=batch_size)[1]


def embed_files(model, files, size: int, bboxes=None, batch_size: int = 64) -> torch.Tensor:
    """Unit image embeddings (N, d) of image files read in batches (never all in memory); ``bboxes``
    (N of (x, y, w, h) or None) crops first, as ARO does."""
    files = list(files)
    bboxes = list(bboxes) if bboxes is not None else [None] * len(files)
    return torch.cat([embed_images(model, torch.stack([load_image(f, size, b) for f, b in
                                                       zip(files[i:i + batch_size], bboxes[i:i + batch_size])]), size)
                      for i in range(0, len(files), batch_size)])


# ---------------------------------------------------------------- zero-shot classification (Fig 9.2)

ZERO_SHOT = ("cifar10", "cifar100", "mnist")


def zero_shot(model, tokenize, dataset: str, size: int = 224, n: int | None = None, root=None,
              template: str = "a photo of a {}.") -> float:
    """Zero-shot top-1 accuracy of a CLIP student on a torchvision test split under data/torchvision
    (one prompt template per class; CLIP's 80-template ensembles are not reproduced)."""
    import torchvision
    check_choice("dataset", dataset, ZERO_SHOT)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "mnist": torchvision.datasets.MNIST}[dataset]
    folder = Path(root or paths.DATA / "torchvision")
    try:
        data = cls(str(folder), train=False, download=False)
    except RuntimeError:
        raise resource_unavailable(f"{dataset} test split (looked in {folder})",
                                   f"download it once with torchvision.datasets.{cls.__name__}(root, download=True) "
                                   "on a machine with internet and copy the folder there") from None
    x = torch.as_tensor(np.asarray(data.data[:n]), dtype=torch.float32) / 255
    x = x[..., None].expand(*x.shape, 3) if x.dim() == 3 else x                    # MNIST is grey
    img = embed_images(model, x.permute(0, 3, 1, 2), size)
    txt = embed_texts(model, tokenize, [template.format(c.split(" - ")[0]) for c in data.classes])  # MNIST: "3 - three"
    return float(((img @ txt.T).argmax(1) == torch.as_tensor(data.targets[:n])).float().mean())
