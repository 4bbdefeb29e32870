"""A choice's streamed text deltas (ChoiceText): through the fast tokenizer's DecodeStream, or the windowed decode of
a tokenizer without one, the deltas add up to the final text, and no delta shows what the final text drops."""

import random

import pytest

from r1kit.serve.responses import ChoiceText
from r1kit.serve.worker import Event

TEXT = "Step 1: 3 × 4 = 12 — déjà vu, naïve café. 数学很有趣 😀👍🏽 then \\boxed{12}.\n\n  Indented  line\tand tab"


class SlowTokenizer:
    """A tokenizer with decode() alone (no backend_tokenizer): ChoiceText's windowed path."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.fixture(params=["stream", "window"])
def kind(request, tokenizer):
    return tokenizer if request.param == "stream" else SlowTokenizer(tokenizer)


def streamed(choice: ChoiceText, ids: list[int], final: str) -> list[str]:
    """The deltas of each token, then of the finishing event that carries the final text."""
    deltas = [choice.add(Event(0, token, None, "")) for token in ids]
    return deltas + [choice.add(Event(0, ids[-1], "stop", final))]


def test_deltas_add_up_to_the_decoded_text(kind, tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(len(tokenizer.decode([t])) == 0 or "\ufffd" in tokenizer.decode([t]) for t in ids)  # split characters
    final = tokenizer.decode(ids, skip_special_tokens=True)
    deltas = streamed(ChoiceText(kind, ()), ids, final)
    assert "".join(deltas) == final == TEXT
    assert deltas[-1] == ""  # everything was streamed before the end
    assert all("\ufffd" not in d for d in deltas)


def test_random_tokens_never_stream_what_the_final_text_lacks(kind, tokenizer):
    rng = random.Random(3)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        final = tokenizer.decode(ids, skip_special_tokens=True)
        deltas = streamed(ChoiceText(kind, ()), ids, final)
        assert "".join(deltas) == final


def test_text_that_may_start_a_stop_string_is_held_back(kind, tokenizer):
    ids = tokenizer.encode("The answer is 42 and", add_special_tokens=False)
    choice = ChoiceText(kind, ("</answer>",))  # 9 characters: the last 8 streamed only at the end
    deltas = [choice.add(Event(0, token, None, "")) for token in ids]
    assert "".join(deltas) == "The answer is 42 and"[:-8]
    assert choice.add(Event(0, ids[-1], "stop", "The answer is 42")) == "s 42"  # the stop string cut " and"
