"""Chapter 7's tiny ViTs: ToyNet / ToyBirds data, a few training steps of each model, shipped checkpoints."""
import numpy as np
import pytest
import torch

from interplab import toyworld as tw
from interplab.zoo import MODELS, store, vits


def test_toynet_labels_match_scenes_and_are_deterministic():
    x, y, scenes = tw.toynet(64, seed=3)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.long and len(tw.TOYNET_CLASSES) == 36
    for label, scene in zip(y.tolist(), scenes):
        obj = scene.objects[0]
        assert tw.TOYNET_CLASSES[label] == f"{obj.colour} {obj.shape}"
        assert obj.texture in tw.TEXTURES[:3] and len(scene.distractors) <= 2
    x2, y2, _ = tw.toynet(64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, tw.toynet(64, seed=3, split="val")[0])
    xm, ym, _, masks = tw.toynet(64, seed=3, masks=True)                     # same images, plus the object masks
    assert torch.equal(xm, x) and masks.shape == (64, 32, 32) and masks.dtype == torch.bool
    assert (masks.flatten(1).sum(1) > 0).all()
    inside = xm.permute(0, 2, 3, 1)[masks]                                   # object pixels: one of 6 colours
    assert inside.shape[1] == 3 and (inside.max(1).values > 0.2).float().mean() > 0.9


def test_toybirds_groups_follow_the_aligned_fraction():
    x, y, g = tw.toybirds(200, seed=0, aligned=0.95)
    assert x.shape == (200, 3, 32, 32) and torch.equal(y, g // 2)
    assert torch.bincount(g, minlength=4).tolist() == [95, 5, 5, 95]
    assert torch.bincount(tw.toybirds(100, seed=0, aligned=0.5)[2]).tolist() == [25] * 4


def test_toybirds_background_family_is_the_group_parity():
    x, _, g = tw.toybirds(60, seed=1, aligned=0.5)
    water = x[:, 2].flatten(1).median(1).values > 0.3  # water and lake are blue, grass and forest are not
    assert torch.equal(water.long(), g % 2)


def test_toybirds_swapped_pairs_differ_only_in_the_background_family():
    on_water, on_land, y = tw.toybirds_swapped(40, seed=2)
    assert on_water.shape == on_land.shape == (40, 3, 32, 32) and y.tolist().count(1) == 20
    blue = lambda x: x[:, 2].flatten(1).median(1).values > 0.3  # noqa: E731  (as the test above)
    assert blue(on_water).all() and not blue(on_land).any()
    same = (on_water == on_land).all(1)                    # (n, 32, 32): the bird's pixels, nowhere else
    assert (same.flatten(1).float().mean(1) > 0.02).all() and (same.flatten(1).float().mean(1) < 0.3).all()
    assert torch.equal(on_water, tw.toybirds_swapped(40, seed=2)[0])


def test_registered_and_no_single_name():
    assert all(MODELS[n] == "vits" for n in vits.NAMES)
    assert getattr(vits, "NAME", None) not in vits.NAMES  # the CLI then calls train(name)


@pytest.mark.parametrize("name", vits.NAMES)
def test_trains_a_few_steps_and_outputs_shapes(name):
    out = vits.train(name, steps=3, batch_size=8, ship=False, resume=False, n_probe=64, n_heldout=32)
    assert len(out["losses"]) == 3 and all(np.isfinite(out["losses"]))
    key, threshold = vits.GATES[name]
    assert out["gates"][key]["threshold"] == threshold
    model = vits.create(name).eval()
    x = tw.toynet(4, seed=0)[0]
    with torch.no_grad():
        assert model(x).shape == (4, 36)
        assert vits.features(model, x).shape == (4, 64)


def test_sibling_groups_differ_in_one_attribute_and_views_only_move_quadrants():
    k, n_groups = vits.SIBLINGS, len(vits.GROUP_ATTRIBUTES)
    items = vits.sibling_groups(np.random.default_rng(0), n_groups * k)
    assert len(items) == n_groups * k
    for g, varied in enumerate(vits.GROUP_ATTRIBUTES):
        group = items[k * g:k * g + k]
        def value(scene, field):
            return scene.background if field == "background" else getattr(scene.objects[0], field)
        assert len({value(scene, varied) for scene, _ in group}) == k and len({seed for _, seed in group}) == 1
        for field in ("shape", "colour", "texture", "size", "slot", "background"):
            assert field == varied or len({value(scene, field) for scene, _ in group}) == 1
        assert len({scene.distractors for scene, _ in group}) == 1
    images = vits.mirrored_render(items, np.random.default_rng(1))
    assert images.shape == (n_groups * k, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(vits.noisy(images, gen, sigma=0.0), images)
    noisy = vits.noisy(images, gen)
    assert 0 <= noisy.min() and noisy.max() <= 1 and (noisy - images).abs().max() > 0


@pytest.mark.parametrize("name", vits.NAMES)
def test_shipped_checkpoint_meets_its_gate(name):
    if not (store.zoo_dir(name) / "card.json").exists():
        pytest.skip(f"no shipped checkpoint; `{store.train_command(name)}` builds it")
    model = vits.load(name)
    assert not model.training
    x, y, _ = tw.toynet(300, seed=90_001, split="test")  # fresh: neither training nor the card's held-out set
    acc = float((vits.predict(model, x) == y).float().mean())
    key, threshold = vits.GATES[name]
    assert acc >= threshold - 0.05, (name, key, acc)
    assert (store.zoo_dir(name) / "model.safetensors").stat().st_size < 2_000_000


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_folding_the_input_scaling_is_exact(name):
    model = vits.create(name).eval()
    x = tw.toynet(4, seed=1)[0]
    with torch.no_grad():
        before = model(vits.scaled(x))
        assert torch.allclose(vits.fold_input_scaling(model)(x), before, atol=1e-4)
