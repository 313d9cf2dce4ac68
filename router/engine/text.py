"""Generated token ids to text, one delta at a time, with stop strings that never leak.

Decoding is incremental (the usual prefix/read offsets): a delta is released only when the tokens decode to
complete characters. Text that could still be the beginning of a stop string is held back until it either
completes one (the text ends right before it, the stop string itself is never emitted) or cannot any more.
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""                  # decoded so far (complete characters)
        self.emitted = 0                # characters of ``text`` handed out
        self.offsets: list[int] = []    # per token: where its text starts in the completion (text_offset)
        self._prefix, self._read = 0, 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that may be shown now ('' while held back). Sets ``stopped`` when a stop
        string completed (the text then ends right before it)."""
        self.ids.append(token_id)
        self.offsets.append(len(self.text))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
                return self._release(cut)
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def finish(self) -> str:
        """The sequence ended (length or end of sequence): release what was held back."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix:])
            done = self._decode(self.ids[self._prefix:self._read])
            if len(tail) > len(done):      # bytes of an incomplete character at the very end
                self.text += tail[len(done):]
                cut = self._find_stop() if self.stop else None
                if cut is not None:
                    self.text, self.stopped = self.text[:cut], True
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted:upto], upto
        return out

    def _decode(self, ids) -> str:
        if not ids or self.tokenizer is None:       # a store without a tokenizer: token ids only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _find_stop(self) -> int | None:
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper beginning of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
