import csv

import numpy as np
import pytest
import torch
from PIL import Image

from interplab import imagenet
from interplab.errors import ResourceUnavailable


def _jpeg(path, h=30, w=40, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n")
    for wnid, n in (("n01443537", 2), ("n01440764", 3)):
        for j in range(n):
            _jpeg(tmp_path / "imagenet" / "val" / wnid / f"{j}.JPEG")
    folder = tmp_path / "waterbirds" / "uncorr"
    with open(_mk(folder) / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["img_id", "img_filename", "y", "split", "place"])
        writer.writeheader()
        for i, (y, place) in enumerate([(0, 0), (1, 1), (1, 0)]):
            writer.writerow(dict(img_id=i, img_filename=f"a/{i}.jpg", y=y, split=0, place=place))
            _jpeg(folder / "a" / f"{i}.jpg")
    return tmp_path


def _mk(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_readers_follow_the_released_layouts(root):
    assert imagenet.classes(root) == [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark")]
    paths, y = imagenet.files("val", root=root)
    assert [p.parent.name for p in paths] == ["n01440764"] * 3 + ["n01443537"] * 2 and y.tolist() == [0, 0, 0, 1, 1]
    some, ys = imagenet.files("val", n=3, seed=1, root=root)
    assert len(some) == 3 and some == imagenet.files("val", n=3, seed=1, root=root)[0]
    assert all(paths.index(p) >= 0 and y[paths.index(p)] == t for p, t in zip(some, ys))
    wb, wy, group = imagenet.waterbirds("uncorr", root)
    assert [p.name for p in wb] == ["0.jpg", "1.jpg", "2.jpg"] and wy.tolist() == [0, 1, 1] and group.tolist() == [0, 3, 2]
    with pytest.raises(ResourceUnavailable, match="corr-0.9"):
        imagenet.waterbirds("corr-0.9", root)
    with pytest.raises(ResourceUnavailable, match="imagenet"):
        imagenet.files("train", root=root)


def test_load_resizes_the_short_side_and_crops_the_centre(tmp_path):
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 20:60] = 255                                        # a white band in the middle 40 columns
    Image.fromarray(img).save(tmp_path / "x.png")
    x = imagenet.load([tmp_path / "x.png"], size=20)
    assert x.shape == (1, 3, 20, 20) and x.min() >= 0 and x.max() <= 1
    assert x[0, :, :, 2:18].mean() > 0.95                     # the centre crop is the white band
    wide = imagenet.load([tmp_path / "x.png"], size=20, crop_pct=0.5)  # short side 40: the band fills it all
    assert wide[0].mean() > 0.95


def test_load_and_normalise_equal_the_released_evaluation_transforms():
    """timm's eval transform (DeiT: short side floor(224 / 0.9) = 248, crop 224), open_clip's preprocess
    (short side 224, crop 224) and torchvision's ResNet-50 transform: the same pixels to float precision."""
    import open_clip
    from timm.data import create_transform, resolve_data_config

    from interplab.models import vit_encoders
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((30, 41, 3)) * 255).astype(np.uint8)).resize((333, 251), Image.BICUBIC)
    deit = vit_encoders.build("deit")
    ref = create_transform(**resolve_data_config({}, model=deit))(img)
    ours = imagenet.normalise(deit)(imagenet.load([np.asarray(img)], *imagenet.input_config(deit)[:2]))[0]
    assert torch.allclose(ours, ref, atol=1e-5)
    clip = vit_encoders.build("clip")
    ref = open_clip.image_transform(clip.visual.image_size, is_train=False, mean=clip.visual.preprocess_cfg["mean"],
                                    std=clip.visual.preprocess_cfg["std"])(img)
    ours = imagenet.normalise(clip)(imagenet.load([np.asarray(img)], *imagenet.input_config(clip)[:2]))[0]
    assert torch.allclose(ours, ref, atol=1e-5)
    import torchvision                                  # Chapter 3's ResNet-50: bilinear to 256, crop 224
    ref = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()(img)
    x = imagenet.load([np.asarray(img)], 224, crop_pct=0.875, interpolation="bilinear")[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert torch.allclose((x - mean) / std, ref, atol=1e-5)


def test_input_config_and_normalise_read_each_model():
    from interplab.models import vit_encoders
    deit = vit_encoders.build("deit", img_size=32)
    size, crop, mean, std = imagenet.input_config(deit)
    assert (size, crop, mean) == (32, 0.9, (0.485, 0.456, 0.406))
    x = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(imagenet.normalise(deit)(x)[0, :, 0, 0], (0.5 - torch.tensor(mean)) / torch.tensor(std))
    clip = vit_encoders.build("clip")
    assert imagenet.input_config(clip) == (224, 1.0, (0.48145466, 0.4578275, 0.40821073),
                                           (0.26862954, 0.26130258, 0.27577711))
    tok = __import__("open_clip").get_tokenizer("ViT-B-16")
    e = imagenet.text_embeddings(clip, tok, ["dog", "cat"], ("a photo of a {}.", "a {}."))
    assert e.shape == (2, 512) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    one = imagenet.text_embeddings(clip, tok, ["dog"])
    with torch.inference_mode():
        assert torch.allclose(one[0], torch.nn.functional.normalize(clip.encode_text(tok(["dog"])).float(), dim=-1)[0],
                              atol=1e-5)


def test_clip_zero_shot_names_and_templates_are_open_clips_in_label_order():
    """CLIP's zero-shot classifier reads OpenAI's curated class names (open_clip ships them, no hub) in wnid
    order, not WordNet's first lemmas (crane / crane, maillot / maillot), with the 80 OpenAI templates."""
    import re
    from collections import Counter

    from timm.data import ImageNetInfo
    names, templates = imagenet.clip_classnames(), imagenet.clip_templates()
    assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
    repeats = {n: [i for i, m in enumerate(names) if m == n] for n, k in Counter(names).items() if k > 1}
    assert repeats == {"missile": [657, 744], "sunglasses": [836, 837]}     # OpenAI's own, kept by every CLIP eval
    assert (names[134], names[517]) == ("crane bird", "construction crane") and names[638] != names[639]
    info = ImageNetInfo("imagenet-1k")              # timm's bundled synsets: sorted wnids = ImageNet's labels
    assert info.label_names() == sorted(info.label_names()) and info.label_names()[0] == "n01440764"
    words = lambda s: set(re.findall(r"[a-z]+", s.lower()))  # noqa: E731
    shares = lambda shift: np.mean([bool(words(names[(i + shift) % 1000]) & words(info.index_to_description(i)))  # noqa: E731
                                    for i in range(1000)])
    assert shares(0) > 0.9 and shares(1) < 0.3       # a name shares a word with its own synset, not the next one's
    assert len(templates) == 80 == len(set(templates)) and all(t.count("{}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {}." and "itap of a {}." in templates
    import open_clip
    assert [t.format("x") for t in templates] == [f("x") for f in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
