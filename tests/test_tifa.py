"""TIFA: the v1.0 file's reader, toy questions answered by the oracle, BLIP's ranking of choices, the score."""
import json
from dataclasses import replace

import pytest
import torch

from interplab import tifa
from interplab import compositional as cb
from interplab import toyworld as tw
from interplab.errors import ResourceUnavailable
from test_compositional import _tiny_blip


def test_read_groups_the_questions_of_each_text_in_file_order(tmp_path):
    rows = [dict(id="coco_2", caption="a red book", question="is there a book?", choices=["yes", "no"], answer="yes",
                 answer_type="object", element="book"),
            dict(id="coco_1", caption="a blue vase", question="is this a vase?", choices=["yes", "no"], answer="yes",
                 answer_type="object", element="vase"),
            dict(id="coco_2", caption="a red book", question="what color is the book?", choices=["red", "blue"],
                 answer="red", answer_type="color", element="red")]
    (tmp_path / tifa.FILE).write_text(json.dumps(rows))
    texts = tifa.read(tmp_path)
    assert [t["id"] for t in texts] == ["coco_2", "coco_1"] and [len(t["questions"]) for t in texts] == [2, 1]
    assert texts[0]["questions"][1] == {"question": "what color is the book?", "choices": ["red", "blue"],
                                        "answer": "red", "element_type": "color"}
    assert len(tifa.read(tmp_path, n=1)) == 1
    with pytest.raises(ResourceUnavailable, match="Yushi-Hu/tifa"):
        tifa.read(tmp_path / "absent")


def test_score_is_each_images_fraction_of_right_answers():
    texts = [{"questions": [{"question": "q1", "choices": ["yes", "no"], "answer": "yes"},
                            {"question": "q2", "choices": ["red", "blue"], "answer": "Red"}]},
             {"questions": [{"question": "q3", "choices": ["yes", "no"], "answer": "no"}]}]
    given = {"q1": "yes", "q2": "blue", "q3": "no"}

    def answer(images, index, questions):
        assert len(index) == len(questions) and int(index.max()) < len(images)
        return [given[q["question"]] for q in questions]
    assert tifa.score(torch.zeros(2, 3, 4, 4), texts, answer).tolist() == [0.5, 1.0]
    got = tifa.score(torch.zeros(4, 3, 4, 4), texts, answer, per_text=2)        # two images per text
    assert got.tolist() == [0.5, 0.5, 1.0, 1.0]


def test_the_oracle_answers_toy_questions_from_what_is_drawn():
    from interplab.models import load
    oracle = load("oracle")
    items = tw.composition_prompts("colour", "test", 12, seed=5)
    texts = [{"questions": tifa.toy_questions(p)} for _, _, p in items]
    assert [q["question"] for q in texts[0]["questions"]][:2] == [f"is there a {items[0][2][0]['shape']}?",
                                                                  f"what colour is the {items[0][2][0]['shape']}?"]
    answer = lambda im, idx, qs: tifa.answer_toy(oracle, im, idx, qs)          # noqa: E731
    true = torch.from_numpy(tw.render_batch([s for _, s, _ in items], seed=0, noise=0.0)[0])
    # the same scenes with the two objects' colours swapped: every "what colour" question is now wrong
    swapped = [replace(s, objects=(replace(s.objects[0], colour=s.objects[1].colour),
                                   replace(s.objects[1], colour=s.objects[0].colour))) for _, s, _ in items]
    wrong = torch.from_numpy(tw.render_batch(swapped, seed=0, noise=0.0)[0])
    assert tifa.score(true, texts, answer).mean() >= 0.95
    assert tifa.score(wrong, texts, answer).mean() <= 0.6     # the "is there" half stays right


def test_blip_ranks_choices_as_one_at_a_time_teacher_forcing():
    model, tok = _tiny_blip()
    vqa = cb.BlipVqa(model, tok, image_size=32)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    qs = ["a red book?", "a blue vase?", "a red vase?"]
    choices = [["yes", "no"], ["red", "blue", "red book"], ["a blue vase", "no"]]   # answers of 1-3 tokens
    got = vqa.choice_logprob(images, qs, choices)
    assert [g.shape for g in got] == [(2,), (3,), (2,)]
    for i in range(3):
        for j, c in enumerate(choices[i]):
            alone = vqa.choice_logprob(images[i:i + 1], qs[i:i + 1], [[c]])[0]
            assert torch.allclose(got[i][j], alone[0], atol=1e-4)
    assert all((g < 0).all() for g in got)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(vqa.choice_logprob(images, qs, choices, batch_size=2), got))
    bias = model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        bias[tok.convert_tokens_to_ids("blue")] += 30
    qas = [{"question": q, "choices": c} for q, c in zip(qs, [["red", "blue"], ["blue", "no"], ["yes", "no"]])]
    answers = tifa.answer_vqa(vqa, images, torch.arange(3), qas)
    assert answers[:2] == ["blue", "blue"] and answers[2] in ("yes", "no")
    # questions pointing at shared images: the same log-probabilities as each image repeated per question
    index = torch.tensor([2, 0, 2])
    shared = vqa.choice_logprob(images, qs, choices, image_index=index)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared, vqa.choice_logprob(images[index], qs, choices)))
