import itertools

import numpy as np
import pytest
import torch

from interplab import toyworld as tw
from interplab.toyworld.attributes import LAND_BACKGROUNDS, RGB, WATER_BACKGROUNDS, WATER_SHAPES


def test_render_is_deterministic_and_masks_are_exact():
    scene = tw.Scene((tw.Obj("star", "red", "plain", "large", "top left"),
                      tw.Obj("heart", "blue", "striped", "small", "bottom right")), "grass")
    a, ma = tw.render(scene, seed=3)
    b, mb = tw.render(scene, seed=3)
    assert a.shape == (32, 32, 3) and ma.shape == (2, 32, 32)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, tw.render(scene, seed=4)[0])
    clean, masks = tw.render(scene, seed=3, noise=0)
    assert np.allclose(clean[masks[0]], RGB["red"])  # a plain object is exactly its colour under its mask
    striped = clean[masks[1]]
    assert np.isclose(striped, RGB["blue"]).all(1).mean() > 0.5 and not np.isclose(striped, RGB["blue"]).all()
    assert masks[0][:16, :16].sum() == masks[0].sum()  # the top-left object stays in its quadrant


@pytest.mark.parametrize("size", tw.SIZES)
def test_shapes_are_distinct_at_every_size(size):
    masks = {s: tw.render(tw.Scene((tw.Obj(s, "red", "plain", size, "top left"),)), seed=0, jitter=0, noise=0)[1][0]
             for s in tw.SHAPES}
    for a, b in itertools.combinations(tw.SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (a, b, iou)


def test_textures_are_distinct_patterns():
    pats = {t: tw.render(tw.Scene((tw.Obj("square", "white", t, "large", "top left"),)), seed=0, jitter=0, noise=0)[0]
            for t in tw.TEXTURES}
    for a, b in itertools.combinations(tw.TEXTURES, 2):
        assert np.abs(pats[a] - pats[b]).sum() > 10, (a, b)


def test_bad_scenes_name_the_fix():
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        tw.Obj("blob", "red")
    with pytest.raises(ValueError, match="share a slot"):
        tw.Scene((tw.Obj("star", "red"), tw.Obj("circle", "blue")))


@pytest.mark.parametrize("family", tw.FAMILIES)
def test_every_family_tokenizes_and_mentions_what_the_image_shows(family):
    tok = tw.clip_tokenizer()
    rng = np.random.default_rng(0)
    examples = [tw.sample(rng, family) for _ in range(200)]
    ids, mask = tw.encode(tok, [e.caption for e in examples])
    assert ids.shape == (200, 24) and (ids != tok.unk_token_id).all()
    for e in examples:
        words = e.caption.split()  # every mentioned colour and shape belongs to an object of the scene
        mentioned_colours = [w for w in words if w in tw.COLOURS]
        assert set(mentioned_colours) <= {o.colour for o in e.scene.objects}, e
        mentioned_shapes = [w for w in words if w in tw.SHAPES]
        assert set(mentioned_shapes) <= {o.shape for o in e.scene.objects}, e


def test_entities_carry_their_signatures():
    rng = np.random.default_rng(1)
    for _ in range(50):
        e = tw.sample(rng, "mascot")
        assert (e.scene.objects[0].shape, e.scene.objects[0].colour, e.scene.objects[0].texture) == tw.MASCOTS[e.caption.split()[-1]]
        e = tw.sample(rng, "style")
        artist = next(a for a in tw.ARTISTS if a in e.caption)
        assert e.scene.objects[0].texture == tw.ARTISTS[artist]
        e = tw.sample(rng, "action")
        half = tw.ACTIONS[e.caption.split()[-1]]
        assert half in e.scene.objects[0].slot


def test_planted_prior_ties_shape_family_to_background_family():
    rng = np.random.default_rng(2)
    ex = [tw.sample(rng, "single", spurious=0.7) for _ in range(3000)]
    water = [e for e in ex if e.scene.objects[0].shape in WATER_SHAPES]
    on_water = np.mean([e.scene.background in WATER_BACKGROUNDS for e in water])
    on_land = np.mean([e.scene.background in LAND_BACKGROUNDS for e in water])
    expected = 0.7 + 0.3 * 2 / 7
    assert abs(on_water - expected) < 0.04 and on_land < 0.15
    off = [tw.sample(rng, "single", spurious=0.0) for _ in range(2000)]
    assert abs(np.mean([e.scene.background in WATER_BACKGROUNDS for e in off]) - 2 / 7) < 0.04


def test_tokenizer_is_clip_like():
    tok = tw.clip_tokenizer()
    assert tok.eos_token_id == len(tok) - 1  # EOS is the largest id, as CLIP pools at it
    ids, mask = tw.encode(tok, ["a red circle", "the emblem of zubria"])
    assert ids[0, 0] == tok.bos_token_id and ids[0, 4] == tok.eos_token_id
    assert (ids[0, 4:] == tok.eos_token_id).all() and mask[0].sum() == 5  # padded with EOS (SD's way)
    with pytest.raises(ValueError, match="'banana'"):
        tw.encode(tok, ["a banana"])


def test_landmarks_need_a_conjunction_to_identify():
    marks = tw.landmarks()
    assert [m.split for m in marks].count("head") == 36 and [m.split for m in marks].count("novel") == 24
    assert len({m.name for m in marks}) == len(marks)
    sigs = [(m.background, m.shape, m.colour, m.texture) for m in marks]
    assert min(sum(x != y for x, y in zip(a, b)) for a, b in itertools.combinations(sigs, 2)) >= 2
    assert marks == tw.landmarks()  # fixed for the seed


def test_render_batch_shapes():
    rng = np.random.default_rng(0)
    images, masks = tw.render_batch([tw.sample(rng, "pair").scene for _ in range(5)], seed=0)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32 and len(masks[0]) == 2
    assert torch.from_numpy(images).min() >= 0 and images.max() <= 1


def test_binding_benchmarks_pair_each_caption_with_the_one_image_it_is_true_of():
    from interplab.toyworld import binding
    w = binding.winoground(6, seed=3)
    assert w["images"].shape == (6, 2, 3, 32, 32) and w["kind"][:3] == ["object", "relation", "both"]
    for (c0, c1), k in zip(w["captions"], w["kind"]):
        assert c0 != c1 and sorted(c0.split()) == sorted(c1.split())        # same words, bound differently
    assert torch.equal(w["images"], binding.winoground(6, seed=3)["images"])  # deterministic
    a = binding.aro(4, seed=1, kind="attribution")
    assert a["images"].shape == (4, 3, 32, 32) and all(t != f and sorted(t.split()) == sorted(f.split())
                                                       for t, f in zip(a["true"], a["false"]))
    S = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 3.0], [0.0, 4.0]]])   # item 0 right, item 1 text-wrong
    assert binding.winoground_scores(S) == {"text": 0.5, "image": 1.0, "group": 0.5}


def test_composition_prompts_keep_train_and_test_combinations_apart():
    from interplab.toyworld import captions
    train = set(captions.composition_combos("colour", "train"))
    test = set(captions.composition_combos("colour", "test"))
    assert not train & test and len(train | test) == len(tw.COLOURS) * len(tw.SHAPES)
    for caption, scene, phrases in tw.composition_prompts("colour", "test", 10, seed=0):
        assert {(p["colour"], p["shape"]) for p in phrases} <= test
        assert caption == f"a {phrases[0]['colour']} {phrases[0]['shape']} and a {phrases[1]['colour']} {phrases[1]['shape']}"
        assert {(o.colour, o.shape) for o in scene.objects} == {(p["colour"], p["shape"]) for p in phrases}
