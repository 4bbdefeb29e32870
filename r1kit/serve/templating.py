"""Chat prompts whose message content stays text: `<|im_end|><|im_start|>system` typed by a user is those
characters, never the special tokens that would end their turn and open a system one.

The template is rendered with a placeholder for each message's content; the template's own text is
tokenized with special tokens parsed, each content with them split (HF's `split_special_tokens`), and any
other added-token string in it (`<think>`, say) broken so that it is read as characters too.
"""

from __future__ import annotations

import re
import uuid
from functools import lru_cache

from r1kit.rollout.types import encode_prompt

# assistant turns are passed through: templates rework them (R1's drops the reasoning before `</think>`), which a
# placeholder would defeat, and they are the model's words rather than a user's
PROTECTED_ROLES = frozenset({"system", "developer", "user", "tool"})
# a placeholder's shape: only this request's own (its nonce) stand for content, any other is the template's text
_MARK = re.compile(r"(<r1kit-[0-9a-f]{32}-[0-9]+>)")


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """Prompt ids of a conversation with its content encoded as text, and the rendered template."""
    nonce = uuid.uuid4().hex  # unguessable, so no content can pose as another's placeholder
    marks: dict[str, str] = {}
    templated = []
    for i, message in enumerate(messages):
        if message["role"] in PROTECTED_ROLES and message["content"]:
            mark = f"<r1kit-{nonce}-{i}>"
            marks[mark] = message["content"]
            message = {**message, "content": mark}
        templated.append(message)
    text = tokenizer.apply_chat_template(templated, tokenize=False, add_generation_prompt=True)
    if not marks:
        return encode_prompt(tokenizer, text), text
    ids: list[int] = []
    run = ""  # the template's text since the last placeholder
    for piece in [*_MARK.split(text), None]:
        if piece is not None and piece not in marks:  # a mark-shaped string of another nonce is text too
            run += piece
            continue
        if run:
            ids += _template_ids(tokenizer, run, not ids)
        if piece is not None:
            ids += literal_ids(tokenizer, marks[piece])
        run = ""
    return ids, text


@lru_cache(maxsize=1024)
def _template_ids(tokenizer, piece: str, first: bool) -> tuple[int, ...]:
    """Token ids of a piece of the template's own text, special tokens parsed (`first`: the prompt's start, where a
    BOS may be due). Requests of one conversation shape share their pieces, and a tokenizer call costs the server's
    event loop ~0.2 ms (on a 2-core CPU): a chat request took ~0.7 ms to tokenize, ~0.2-0.4 ms now."""
    return tuple(encode_prompt(tokenizer, piece) if first else tokenizer.encode(piece, add_special_tokens=False))


def literal_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` read as characters: no special or added token comes out of it."""
    ids: list[int] = []
    for piece in _broken(tokenizer, text):
        ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def _broken(tokenizer, text: str) -> list[str]:
    """`text` cut after the first character of each added (non-special) token string in it, which
    `split_special_tokens` would still match whole."""
    pattern = _added_tokens(tokenizer)
    if pattern is None:
        return [text]
    cuts = [m.start() + 1 for m in pattern.finditer(text)]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@lru_cache(maxsize=16)
def _added_tokens(tokenizer) -> re.Pattern | None:
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if not t.special and t.content]
    return re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
