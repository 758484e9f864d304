"""Answer scoring of visual question answering (Chapter 6's specificity and correctness labels).

    normalize("Two Dogs!")          -> "2 dogs"
    vqa_accuracy("two", ten_answers) VQA accuracy (Agrawal et al.): mean over the 10 leave-one-out
                                     subsets of 9 annotators of min(1, #matches / 3)
    contains_answer(text, golds)    Movies / Known style: the normalised generation contains a gold answer
"""
import re
from itertools import combinations

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize(answer: str) -> str:
    """Lower case, punctuation removed (a decimal point kept), articles dropped, number words as digits."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]", " ", answer.lower())
    return " ".join(_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 in VQA / OK-VQA).

    With n answers: the mean over the n subsets of n - 1 annotators of min(1, matches / 3); with
    fewer than 2 answers it is min(1, matches / 3) over them.
    """
    pred = normalize(prediction)
    gold = [normalize(a) for a in answers]
    if len(gold) < 2:
        return min(1.0, sum(g == pred for g in gold) / 3)
    subsets = list(combinations(range(len(gold)), len(gold) - 1))
    return sum(min(1.0, sum(gold[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


def contains_answer(generation: str, answers) -> bool:
    """True when the normalised generation contains any normalised gold answer as whole words."""
    text = f" {normalize(generation)} "
    return any(f" {normalize(a)} " in text for a in answers if normalize(a))
