"""A word-level tokenizer over the world's grammar, built offline with the tokenizers library.

Ids: <pad> 0, <unk> 1, <bos> 2, then extra specials, then the words, and <eos> LAST, so that
the largest id is EOS as in CLIP (transformers pools CLIP's text tower at the first EOS when
``config.eos_token_id`` is set). CLIP-style callers pad with EOS as Stable Diffusion does.
"""
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<unk>", "<bos>")


def build_tokenizer(words, extra_specials=(), max_length: int = 24, add_eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: "a red circle" -> [<bos>, a, red, circle, <eos>] (no <eos> with
    ``add_eos=False``: a language model's prompt must end where the model continues)."""
    tokens = list(SPECIALS) + list(extra_specials) + [w for w in dict.fromkeys(words)] + ["<eos>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A" + (" <eos>" if add_eos else ""),
                                                      special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length,
                                   additional_special_tokens=list(extra_specials) or None)


def clip_tokenizer(max_length: int = 24) -> PreTrainedTokenizerFast:
    """The tokenizer of the zoo's CLIP text tower (and the text-to-image model on top of it)."""
    from .captions import words
    return build_tokenizer(words(), max_length=max_length)


def encode(tok: PreTrainedTokenizerFast, captions, pad_with_eos: bool = True):
    """Token ids (N, max_length) long and attention mask; padded with EOS (CLIP/SD) or <pad>.

    Raises ValueError naming the word when a caption has a word outside the vocabulary.
    """
    import torch
    out = tok(list(captions), padding="max_length", truncation=False, max_length=tok.model_max_length,
              return_tensors="pt")
    ids = out["input_ids"]
    if ids.shape[1] > tok.model_max_length:
        raise ValueError(f"a caption is longer than {tok.model_max_length} tokens")
    if (ids == tok.unk_token_id).any():
        row = int((ids == tok.unk_token_id).any(1).nonzero()[0])
        unknown = [w for w in list(captions)[row].split() if w not in tok.get_vocab()]
        raise ValueError(f"words outside the toy world's vocabulary: {unknown} in {list(captions)[row]!r}")
    if pad_with_eos:
        ids = torch.where(out["attention_mask"].bool(), ids, torch.full_like(ids, tok.eos_token_id))
    return ids, out["attention_mask"]
