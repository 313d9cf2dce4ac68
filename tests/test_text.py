"""Incremental text with stop strings, on a byte-level tokenizer (one token per byte, so accented letters and
emoji span several tokens): the deltas add up to the full decode, a stop string never shows, also when it spans
tokens or characters, and offsets say where each token's text starts."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from faasmoe.router.engine.text import TextStream
from faasmoe.router.store.tiny_model import write_tokenizer

TEXT = "héllo wörld 🙂 done\nnext line"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory, 258)                    # every byte is a token
    return AutoTokenizer.from_pretrained(str(directory))


def run(tok, text, stop=()):
    stream, deltas = TextStream(tok, stop), []
    for token_id in tok(text)["input_ids"]:
        deltas.append(stream.push(token_id))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return stream, deltas


def test_multibyte_deltas_add_up_to_the_decode(tok):
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > len(TEXT)                        # multi-byte characters span tokens
    stream, deltas = run(tok, TEXT)
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in d for d in deltas)      # never half a character


@pytest.mark.parametrize("stop, expected", [
    (["wör"], "héllo "),                               # spans tokens and a 2-byte character
    (["🙂"], "héllo wörld "),                          # a 4-byte character
    (["never", "\nnext"], "héllo wörld 🙂 done"),
    (["lo w", "o"], "héll"),                           # the earliest stop wins
    (["line"], "héllo wörld 🙂 done\nnext "),
])
def test_stop_strings_cut_before_and_never_leak(tok, stop, expected):
    stream, deltas = run(tok, TEXT, stop)
    assert "".join(deltas) == expected and stream.stopped
    for s in stop:
        assert all(s not in d for d in deltas)
    shown = ""
    for d in deltas:                                   # no prefix of the output ever holds a stop string
        shown += d
        assert not any(s in shown for s in stop)


def test_text_offsets_follow_held_back_text(tok):
    stream, _ = run(tok, "a\nb", stop=["\n\n"])
    assert stream.offsets == [0, 1, 2] and not stream.stopped and stream.text == "a\nb"


def test_held_back_text_is_released_at_the_end(tok):
    stream, deltas = run(tok, "ab\n", stop=["\n\n"])
    assert deltas[-1] == "\n" and "".join(deltas) == "ab\n"
