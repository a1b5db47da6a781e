"""Incremental detokenization: text grows token by token without splitting multi-byte characters.

Each emitted token costs one decode: the text of the window up to the last emitted token is kept
from the previous decode instead of being decoded again. Tokens may also be pushed without
decoding and flushed later in one decode (offline requests decode once, at the end; a stream's
consumer once per message it sends: StreamText).
"""
from __future__ import annotations

# Earlier tokens kept as decoding context (leading spaces of word pieces, byte merges).
_CONTEXT_TOKENS = 5
# Window length (tokens) after which the window start moves up to the context.
_MAX_WINDOW = 32


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # the decode window starts here
        self.read_offset = len(self.ids)  # tokens before this are in `text`
        self._read_text: str | None = None  # decode of ids[prefix_offset:read_offset] (None: not known)
        self.text = ""
        self._vocab_limit = len(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self._vocab_limit]  # random-weight models may exceed the tokenizer
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> None:
        """Append a token without decoding it yet."""
        self.ids.append(token_id)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        return self.flush()

    def flush(self) -> str:
        """Decode the pending tokens; return the new text."""
        pending = len(self.ids) - self.read_offset
        if pending == 0:
            return ""
        delta = self._emit()
        if self.read_offset < len(self.ids) and pending > 1:  # ends in a partial character: emit what precedes it
            tail = self.ids[self.read_offset:]
            del self.ids[self.read_offset:]
            parts = []
            for token in tail:
                self.ids.append(token)
                parts.append(self._emit())
            delta = "".join(parts)
        return delta

    def _emit(self) -> str:
        if self._read_text is None:
            self._read_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        # A partial character waits for its next byte; tokens that add no text (skipped specials) move on.
        if len(after) < len(self._read_text) or after.endswith("\ufffd"):
            return ""
        delta = after[len(self._read_text):]
        self.text += delta
        self.read_offset = len(self.ids)
        self._read_text = after
        if self.read_offset - self.prefix_offset > _MAX_WINDOW:
            self._slide()
        return delta

    def _slide(self) -> None:
        """Start the window a few tokens before the read offset; forget ids before it."""
        cut = self.read_offset - _CONTEXT_TOKENS
        self.ids = self.ids[cut:]
        self.prefix_offset = 0
        self.read_offset -= cut
        self._read_text = None


class StreamText:
    """The text of a stream's delta outputs, decoded by its consumer when it takes them.

    The engine then only collects token ids for the stream (LLMEngine.add_request with
    detokenize=False), and a message that folds k engine steps costs one decode instead of k
    decodes on the engine's thread. Streams with stop strings cannot use it: the engine needs
    their text every step."""

    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool = True):
        self._new = lambda: IncrementalDetokenizer(tokenizer, context_ids, skip_special_tokens)  # noqa: E731
        self._by_index: dict[int, IncrementalDetokenizer] = {}

    def fill(self, outputs: list) -> None:
        """Set the text of a batch of delta RequestOutputs (oldest first): each completion's new text
        goes on its last output in the batch, the earlier ones carry ''."""
        last = {}
        for out in outputs:
            for c in out.outputs:
                decoder = self._by_index.get(c.index)
                if decoder is None:
                    decoder = self._by_index[c.index] = self._new()
                for token in c.token_ids:
                    decoder.push(token)
                c.text = ""
                last[c.index] = c
        for index, c in last.items():
            c.text = self._by_index[index].flush()
