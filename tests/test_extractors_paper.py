"""Architecture-faithful checks of the 13 Fig 4.4 backbones (random weights, nothing downloaded)
and of the two tiny extractors trained by the repository."""
import numpy as np
import pytest
import torch

from interplab.models import extractors as E

# name -> (expected blocks, the attribute that holds them); ViT-style models run at 64 px (timm
# resizes the position embedding), which keeps the test fast without changing any layer's width.
STRUCTURE = {
    "dino_small": (12, "blocks"), "dino_base": (12, "blocks"), "vit_base_21k": (12, "blocks"),
    "vit_small_1k": (12, "blocks"), "vit_base_1k": (12, "blocks"), "beit_base_1k": (12, "blocks"),
    "resnet18": ([2, 2, 2, 2], "layers"), "resnet34": ([3, 4, 6, 3], "layers"), "resnet50": ([3, 4, 6, 3], "layers"),
    "resnet101": ([3, 4, 23, 3], "layers"), "dino_resnet50": ([3, 4, 6, 3], "layers"),
}


def _timm_kw(name):
    return {"img_size": 64} if STRUCTURE[name][1] == "blocks" else {}


@pytest.mark.parametrize("name", list(STRUCTURE))
def test_timm_backbone_structure_and_feature_dim(name):
    torch.manual_seed(0)
    model = E.build_backbone(name, pretrained=False, **_timm_kw(name))
    want, kind = STRUCTURE[name]
    if kind == "blocks":
        assert len(model.blocks) == want and model.patch_embed.patch_size == (16, 16)
    else:
        assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == want
    with torch.no_grad():
        feats = E.embed(model, torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, E.BACKBONES[name].dim) == (2, model.num_features)


@pytest.mark.parametrize("name,width,layers", [("clip_vit_base", 768, 12), ("clip_resnet50", None, None)])
def test_open_clip_image_towers(name, width, layers):
    torch.manual_seed(0)
    model = E.build_backbone(name, pretrained=False)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    assert size == 224
    if width:
        assert model.visual.transformer.width == width and len(model.visual.transformer.resblocks) == layers
    with torch.no_grad():
        feats = E.embed(model, torch.zeros(1, 3, 224, 224))
    assert feats.shape == (1, E.BACKBONES[name].dim)


def test_backbone_table_lists_fig_4_4_columns():
    table = E.backbone_table()
    assert list(table["name"]) == ["dino_small", "dino_base", "resnet18", "resnet34", "resnet50", "resnet101",
                                   "vit_base_21k", "vit_small_1k", "vit_base_1k", "beit_base_1k", "clip_vit_base",
                                   "clip_resnet50", "dino_resnet50"]
    import timm
    for b in E.BACKBONES.values():
        if b.library == "timm":
            assert f"{b.model}.{b.tag}" in timm.list_pretrained(f"{b.model}.*"), b.name


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_tiny_extractors_shapes_and_training_step(kind):
    model = E.TINY[kind]["build"](n_classes=7, seed=0)
    x = torch.rand(16, 1, *E.IMAGE)
    assert E.embed(model, x).shape == (16, 64) and model(x).shape == (16, 7)
    y = np.arange(16) % 7
    before = [p.detach().clone() for p in model.parameters()]
    E.train(model, x.numpy(), y, epochs=1, batch=8, progress=False)
    E.meta_train(model, x.numpy().repeat(2, 0), np.tile(y, 2), episodes=2, way=3, shot=1, query=1, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_evaluation_transforms_follow_each_release():
    from interplab import imagenet
    dino_r50 = E.build_backbone("dino_resnet50")
    assert imagenet.input_config(dino_r50)[:2] == (224, 0.875) and E._interpolation(dino_r50) == "bicubic"
    assert E._interpolation(E.build_backbone("resnet18")) == "bilinear"          # torchvision's classifiers
    assert E._interpolation(E.build_backbone("clip_resnet50")) == "bicubic"


def test_embed_images_resizes_with_the_models_filter():
    from interplab import imagenet
    torch.manual_seed(0)
    model = E.build_backbone("resnet18")
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32))
    img = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    got = E.embed_images(model, [img])
    for interpolation, same in (("bilinear", True), ("bicubic", False)):
        x = imagenet.normalise(model)(imagenet.load([img], 32, 0.875, interpolation))
        assert torch.allclose(got, E.embed(model, x), atol=1e-6) == same


def test_pmf_selector_loads_a_dino_protonet_checkpoint_at_128_px():
    import math

    import timm
    import torch.nn.functional as F
    assert "pmf" not in E.BACKBONES and E.SELECTORS["pmf"].dim == 384   # Fig 4.4 keeps its 13 columns
    torch.manual_seed(0)
    dino = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    checkpoint = {"model": {**{f"backbone.{k}": v for k, v in dino.state_dict().items()},
                            "scale_cls": torch.tensor([10.0]), "bias": torch.tensor([0.0])}, "epoch": 3}
    model = E.build_backbone("pmf")
    assert model.patch_embed.img_size == (128, 128) and model.pretrained_cfg["crop_pct"] == 0.875
    state = E.pmf_state_dict(checkpoint, model)
    model.load_state_dict(state)                                        # strict: every key maps
    assert float(model.cosine_scale) == 10.0
    checkpoint["model"]["scale_cls"] = torch.tensor([17.5])             # the learned head scale is kept
    model.load_state_dict(E.pmf_state_dict(checkpoint, model))
    assert float(model.cosine_scale) == 17.5
    grid = dino.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(8.1 / math.sqrt(196), 8.1 / math.sqrt(196)), mode="bicubic")
    assert torch.equal(state["pos_embed"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 64, -1))
    assert torch.equal(state["pos_embed"][:, :1], dino.pos_embed[:, :1])
    assert E.embed(model, torch.rand(2, 3, 128, 128)).shape == (2, 384)
    same = E.pmf_state_dict(checkpoint, dino)                           # at 224 px nothing is resampled
    assert torch.equal(same["pos_embed"], dino.pos_embed)


def test_pmf_selector_offline_names_its_checkpoint(monkeypatch, tmp_path):
    from interplab.errors import ResourceUnavailable

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ResourceUnavailable, match="pmf_metadataset_dino.*data/backbones/pmf.pt"):
        E.load_backbone("pmf")
