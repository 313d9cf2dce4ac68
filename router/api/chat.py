"""Chat messages to prompt tokens: the tokenizer's own chat template when it has one; otherwise the plain
template below (documented in the README), one ``role: content`` line per message, then ``assistant:``.

    system: You are a careful Python programmer.
    user: Write a function that reverses a list.
    assistant:
"""

from __future__ import annotations

from typing import Sequence

from faasmoe.proto.errors import BadRequest


def plain_template(messages: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def render_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation is the caller's error
            raise BadRequest(f"the model's chat template rejected these messages: {exc}", "messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(plain_template(messages))["input_ids"]
