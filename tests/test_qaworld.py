"""The extractive-QA world of Chapter 8: deterministic, disjoint, and its items say what they claim."""
import numpy as np
import pytest

from interplab import qaworld as qw
from interplab.zoo import qa_lm


@pytest.fixture(scope="module")
def world():
    return qw.world(0)


@pytest.fixture(scope="module")
def tok(world):
    return qw.tokenizer(world)


def test_world_is_deterministic_and_groups_are_disjoint(world):
    again = qw.world.__wrapped__(0)
    assert again.facts == world.facts and again.entities == world.entities
    names = [n for g in world.entities.values() for n in g]
    assert len(names) == len(set(names)) == sum(qw.GROUP_SIZES.values())
    values = [v for pool in world.pools.values() for v in pool]
    assert len(values) == len(set(values)) == sum(qw.POOL_SIZES.values())
    name_words = {w for n in names for w in n.split()}
    assert not name_words & set(values)
    assert len(world.facts) == 2 * qw.GROUP_SIZES["mem"]
    assert all(e in world.entities["mem"] for e, _ in world.facts)


def test_training_items_tokenize_and_never_contradict_memory(world, tok):
    rng = np.random.default_rng(0)
    items = [qw.train_item(world, rng) for _ in range(400)]
    assert {it.mode for it in items} == set(qw.TRAIN_MIX)
    b = qa_lm.encode_batch(tok, [it.prompt for it in items], [it.target for it in items])
    assert b["input_ids"].shape[1] <= 256
    for it in items:
        if it.memorised is not None and it.mode != "dash":
            assert it.answer == it.memorised
        if it.gold is not None and it.mode != "dash":
            assert it.answer in it.sentences[it.gold].split()
        if it.mode == "dash":
            assert qw.DASH in it.sentences[it.gold].split() and it.target == it.memorised
        if it.mode == "redacted":  # nothing memorised: the dash in the slot is the answer to copy
            assert it.memorised is None and it.subject in world.entities["ctx"]
            assert qw.DASH in it.sentences[it.gold].split() and it.target == it.answer == qw.DASH
        assert qw.TRAIN_MIN_SENTENCES <= len(it.sentences) <= qw.MAX_SENTENCES or it.mode == "closed"


def test_probe_items_substitute_and_hold_out_paraphrases(world):
    rng = np.random.default_rng(1)
    for _ in range(50):
        copy = qw.probe_item(world, rng, "mem", "copy", held_out=True)
        gold = copy.sentences[copy.gold]
        assert copy.answer != copy.memorised and copy.answer in gold.split() and copy.memorised not in gold.split()
        assert gold.replace(copy.subject, "{e}").replace(copy.answer, "{v}") == qw.TEMPLATES[copy.relation][-1]
        dash = qw.probe_item(world, rng, "mem", "dash")
        assert dash.answer == dash.memorised and qw.DASH in dash.sentences[dash.gold].split()


def test_only_the_gold_sentence_states_a_fact_of_the_questions_relation(world):
    # value distractors name pool values, but never as a fact of the relation; other facts use other pools
    rng = np.random.default_rng(3)
    for answer_value in (False, True):
        for _ in range(50):
            it = qw.probe_item(world, rng, "ctx", value_distractors=2, answer_value=answer_value)
            pool = set(world.pools[it.relation])
            holders = [i for i, s in enumerate(it.sentences) if pool & set(s.split())]
            forms = {t.format(e=it.subject, v="{v}") for t in qw.VALUE_DISTRACTORS[it.relation]}
            distractor = [any(s == f.format(v=v) for f in forms for v in pool & set(s.split())) for s in it.sentences]
            assert [i for i in holders if not distractor[i]] == [it.gold]
            assert sum(distractor) == 2
            if answer_value:
                assert all(it.answer in s.split() for s, d in zip(it.sentences, distractor) if d)


def test_corruption_replaces_subject_and_answer_slot(world):
    rng = np.random.default_rng(2)
    for mode in ("copy", "dash"):
        item = qw.probe_item(world, rng, "mem", mode)
        bad = qw.corrupt(world, item, rng)
        assert item.subject not in bad.prompt and bad.subject in world.entities["fresh"]
        slot = qw.DASH if mode == "dash" else item.answer
        assert slot not in bad.sentences[bad.gold].split()
        assert len(bad.sentences) == len(item.sentences)


def test_encode_batch_marks_the_predicting_position(world, tok):
    (subject, relation), value = next(iter(world.facts.items()))
    b = qa_lm.encode_batch(tok, [qw.make_prompt([], qw.QUESTIONS[relation].format(e=subject))], [value])
    ids, last = b["input_ids"][0], int(b["last"][0])
    assert tok.convert_ids_to_tokens(int(ids[last])) == ":" and tok.convert_ids_to_tokens(int(ids[last + 1])) == value
    assert (b["labels"][0, :last + 1] == -100).all() and b["labels"][0, last + 1] == ids[last + 1]
    with pytest.raises(ValueError, match="vocabulary"):
        qa_lm.encode_batch(tok, ["question : what is a zebra ? answer :"])


def test_shipped_qa_lm_gates_on_fresh_items():
    from interplab import models
    from interplab.zoo import store
    if not (store.zoo_dir("qa_lm") / "card.json").exists():
        pytest.skip("qa_lm not shipped yet")
    card = store.verify("qa_lm")
    model, tok = models.load("qa_lm")
    metrics = qa_lm.measure(model, tok, n=200, seed=424_244)
    for k, g in card["gates"].items():
        assert metrics[k] >= g["threshold"], (k, metrics[k])


def test_training_contexts_always_carry_a_value_distractor(world):
    # every context of >= 2 sentences has another word of the answer's pool besides the answer sentence
    rng = np.random.default_rng(3)
    items = [qw.train_item(world, rng) for _ in range(300)] + [qw.copy_item(world, rng) for _ in range(100)]
    for it in items:
        if len(it.sentences) < 2:
            continue
        pool = set(world.pools[it.relation])
        others = [s for i, s in enumerate(it.sentences) if i != it.gold]
        assert any(pool & set(s.split()) for s in others), it.prompt


def test_qa_lm_trains_a_few_steps_with_only_layer0_mlp():
    out = qa_lm.train(steps=3, batch_size=4, ship=False, resume=False, eval_n=8, curriculum=2, copy_first=1)
    assert np.isfinite(out["final_loss"]) and out["mlp_layers"] == list(qa_lm.MLP_LAYERS)
    model = qa_lm.build(qa_lm.config(qw.tokenizer()))
    for l, layer in enumerate(model.model.layers):
        w = layer.mlp.down_proj.weight
        assert (w.abs().sum() > 0) == (l in qa_lm.MLP_LAYERS)
        assert all(p.requires_grad == (l in qa_lm.MLP_LAYERS) for p in layer.mlp.parameters())
