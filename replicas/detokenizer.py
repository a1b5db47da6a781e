"""Incremental detokenization: text grows token by token without splitting multi-byte characters."""
from __future__ import annotations

# How many earlier tokens give the decoder context (leading spaces of word pieces, byte merges).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_context = len(self.ids)
        self.text = ""
        self._vocab_limit = len(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self._vocab_limit]  # random-weight models may exceed the tokenizer
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.text += delta
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._trim()
            return delta
        return ""

    def _trim(self) -> None:
        """Forget ids before the decode window so long generations stay cheap."""
        if self.prefix_offset > 64:
            cut = self.prefix_offset
            self.ids = self.ids[cut:]
            self.prefix_offset -= cut
            self.read_offset -= cut
