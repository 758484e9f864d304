"""Chapter 8's paper QA readers on hand-written rows: gold sentences index split_sentences(context)."""
import json

import pytest

from interplab import qa_sets
from interplab.errors import ResourceUnavailable


def write(tmp_path, name, rows):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_nq_swap_reads_both_contexts_and_finds_the_answer_sentence(tmp_path):
    write(tmp_path, "nq_swap", [dict(question="who wrote hamlet ?", org_answer="Shakespeare", sub_answer="Marlowe",
                                     org_context="Hamlet is a tragedy. It was written by Shakespeare around 1600.",
                                     sub_context="Hamlet is a tragedy. It was written by Marlowe around 1600."),
                                dict(question="no answer ?", org_answer="x", sub_answer="y",
                                     org_context="Nothing here.", sub_context="Nothing here either.")])
    org, sub = qa_sets.nq_swap(root=tmp_path), qa_sets.nq_swap(substituted=True, root=tmp_path)
    assert len(org) == len(sub) == 1  # an example whose answer is in no sentence has no gold attribution
    assert org[0].gold == (1,) and org[0].sentences[1].endswith("around 1600.") and sub[0].answer == "Marlowe"


def test_nq_swap_reads_the_hubs_list_valued_answers(tmp_path):
    """pminervini/NQ-Swap stores org_answer / sub_answer as lists of strings; every one is a gold answer."""
    write(tmp_path, "nq_swap", [dict(question="who wrote hamlet ?", org_answer=["William Shakespeare", "Shakespeare"],
                                     sub_answer=["Marlowe"],
                                     org_context="Hamlet is a tragedy. It was written by Shakespeare around 1600.",
                                     sub_context="Hamlet is a tragedy. It was written by Marlowe around 1600.")])
    (org,), (sub,) = qa_sets.nq_swap(root=tmp_path), qa_sets.nq_swap(substituted=True, root=tmp_path)
    assert org.answers == ("William Shakespeare", "Shakespeare") and org.gold == (1,)
    assert sub.answers == ("Marlowe",) and sub.answer == "Marlowe" and sub.gold == (1,)


def test_hotpotqa_keeps_gold_paragraphs_and_every_supporting_sentence(tmp_path):
    row = dict(question="where was the author born ?", answer="Paris",
               context={"title": ["A", "B", "C"], "sentences": [["A wrote books.", "A was born in Paris."],
                                                                ["B is a city.", "Paris is big."],
                                                                ["C is unrelated."]]},
               supporting_facts={"title": ["A", "B"], "sent_id": [1, 0]})
    single_list = dict(row, context=[[t, s] for t, s in zip(row["context"]["title"], row["context"]["sentences"])],
                       supporting_facts=[["A", 1], ["B", 0]])
    write(tmp_path, "hotpotqa", [row, single_list, dict(row, answer="London")])
    ex = qa_sets.hotpotqa(root=tmp_path)
    assert len(ex) == 2 and (ex[0].context, ex[0].gold) == (ex[1].context, ex[1].gold)
    assert ex[0].context == "A wrote books. A was born in Paris. B is a city. Paris is big."
    # gold = all supporting facts (spec 2.7), the bridge sentence "B is a city." too; "Paris is big." holds the
    # answer but is not a supporting fact
    assert ex[0].gold == (1, 2)


def test_truncated_keeps_the_gold_sentences_that_survive_whole():
    e = qa_sets.QAExample("q ?", "One is here. Two is here. Three holds x.", ("x",), (0, 2))
    assert qa_sets.truncated(e, "One is here. Two is here.").gold == (0,)
    assert qa_sets.truncated(e, "One is here. Two is here. Three").gold == (0,)   # cut short: no longer gold
    assert qa_sets.truncated(e, e.context) == e


def test_subsets_are_seeded_and_a_missing_file_says_what_to_export(tmp_path):
    write(tmp_path, "natural_questions", [dict(question=f"q{i} ?", context=f"The answer is a{i}.", answers=[f"a{i}"])
                                          for i in range(10)])
    a, b = qa_sets.natural_questions(4, seed=1, root=tmp_path), qa_sets.natural_questions(4, seed=1, root=tmp_path)
    assert a == b and len(a) == 4 and all(e.gold == (0,) for e in a)
    with pytest.raises(ResourceUnavailable, match="NQ-Swap"):
        qa_sets.nq_swap(root=tmp_path)
    write(tmp_path, "cnn_dailymail", [dict(article="Rain fell. The match was cancelled. Fans went home.",
                                           highlights="Match cancelled by rain")])
    (ex,) = qa_sets.long_answers("cnn_dailymail", root=tmp_path)
    assert ex.gold == (1,) and ex.question == qa_sets.SUMMARY_QUESTION
