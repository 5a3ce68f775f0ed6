"""Token ids -> streamed text, with stop sequences.

Each push decodes the whole generated id list (decoding one chunk at a time would
split multi-byte characters and lose the tokenizer's spacing rules) and hands out
the new suffix, minus what must wait:

* trailing U+FFFD: a character whose UTF-8 bytes span tokens decodes as the
  replacement character until its last byte arrives;
* a tail that could be the start of a stop sequence ("Hel" while "Hello" stops):
  it is released as soon as the next text rules the stop out.

A stop sequence found in the text ends it there: the stop and whatever follows it
are never sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the output text so far; once stopped, the final text (cut before the stop)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop sequence was found

    def push(self, ids: Sequence[int]) -> str:
        """Add generated tokens; return the text that is now safe to send (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._release(cut)
        self.text = text
        return self._release(len(text) - self._held(text))

    def finish(self) -> str:
        """Generation is over: release everything held back (no stop sequence completed)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out

    def _find_stop(self, text: str) -> int | None:
        # Nothing before `sent` can begin a stop: such a tail would have been held back.
        found = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """How many trailing characters must wait."""
        unknown = len(text) - len(text.rstrip(REPLACEMENT))  # characters still missing bytes
        known = text[: len(text) - unknown]
        unsent = len(known) - self.sent
        prefix = 0  # the longest proper prefix of a stop that ends the known text (the unknown may go on with it)
        for s in self.stop:
            for k in range(min(len(s) - 1, unsent), prefix, -1):
                if known.endswith(s[:k]):
                    prefix = k
                    break
        return unknown + prefix
