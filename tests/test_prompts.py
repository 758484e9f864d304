"""interplab.prompts: the paper profile's Chapter 5 probe set, counted and tokenized offline."""
import pytest

from interplab import editing, prompts, tracing
from interplab.models.diffusion import clip_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return clip_bpe_tokenizer()


def test_probe_counts_match_table_11_2():
    counts = {a: len(prompts.ch5_probes(a)) for a in prompts.ATTRIBUTES}
    assert counts == {"objects": 161, "style": 560, "color": 560, "action": 56, "viewpoint": 92, "count": 92}
    assert len(prompts.ch5_probes("objects", keep_duplicate_tv=True)) == 168  # the text's count, tv twice
    assert prompts.ch5_probes("action")[0].caption == "A bear eating"
    assert prompts.ch5_probes("objects")[0].caption == "A photo of dog in beach."  # the exact template, no article


def test_validation_split_is_fixed_and_disjoint():
    probes = prompts.ch5_probes("style")
    val, rest = prompts.ch5_validation(probes)
    assert len(val) == 10 and len(rest) == 550 and not {p.caption for p in val} & {p.caption for p in rest}
    assert val == prompts.ch5_validation(probes)[0]


def test_every_subject_span_is_found_with_sd_tokenizer(tok):
    for attribute in prompts.ATTRIBUTES:
        for p in prompts.ch5_probes(attribute):
            ids = tok(p.caption)["input_ids"]
            assert tracing.subject_positions(tok, ids, p.subject)
    ids = tok(["van gogh"])["input_ids"][0]
    assert ids[1:3] == [2451, 19697] and ids[-1] == tok.eos_token_id == 49407  # two BPE tokens, as in SD


def test_edit_prompts_and_the_releases_key_rows(tok):
    for kind, pairs in prompts.EDIT_CONCEPTS.items():
        for concept, _ in pairs:
            assert len(prompts.edit_eval_prompts(concept, kind)) == 10
    x = "van gogh"
    ids = tok([t.format(x=x) for t in prompts.EDIT_TEMPLATES], padding="max_length", return_tensors="pt").input_ids
    assert sum(map(len, editing.positions_from_last_token(ids, tok.eos_token_id))) == 291
