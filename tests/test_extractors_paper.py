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
