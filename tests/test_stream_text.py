"""StreamText: a stream's text decoded by its consumer, one decode per batch of delta outputs,
adds up to the text of its tokens however the batches fall (multi-byte characters split across
tokens and batches included)."""
from __future__ import annotations

import random

import pytest

from replicas.detokenizer import StreamText
from replicas.outputs import CompletionOutput, RequestOutput
from tests.engine_support import embedded_tokenizer

TEXTS = ["Plain words, then a café in Zürich: 日本語のテキスト 🙂🚀 and back.",
         " leading space and\nnew lines\n\n  indented ✓"]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def _deltas(ids: list[int], cuts: list[int], index: int = 0) -> list[RequestOutput]:
    outs, start = [], 0
    for end in [*cuts, len(ids)]:
        outs.append(RequestOutput(request_id="r", prompt=None, prompt_token_ids=None, finished=end == len(ids),
                                  outputs=[CompletionOutput(index, "", ids[start:end], None, None)]))
        start = end
    return outs


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", range(4))
def test_batches_add_up_to_the_decoded_tokens(tok, text, seed):
    ids = tok(text, add_special_tokens=False).input_ids
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(ids)), k=min(len(ids) - 1, rng.randint(1, 12))))
    outs = _deltas(ids, cuts)
    decoder = StreamText(tok, context_ids=[])
    pieces = []
    at = 0
    while at < len(outs):  # the consumer takes 1..3 steps' outputs at a time
        batch = outs[at:at + rng.randint(1, 3)]
        decoder.fill(batch)
        assert all(o.outputs[0].text == "" for o in batch[:-1])
        pieces.append(batch[-1].outputs[0].text)
        at += len(batch)
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # a partial character waits for its next bytes


def test_each_completion_has_its_own_text(tok):
    a, b = (tok(t, add_special_tokens=False).input_ids for t in ("first answer", " second, другой"))
    outs = [RequestOutput(request_id="r", prompt=None, prompt_token_ids=None, finished=False,
                          outputs=[CompletionOutput(0, "", a, None, None), CompletionOutput(1, "", b, None, None)])]
    StreamText(tok, context_ids=[]).fill(outs)
    assert [c.text for c in outs[0].outputs] == ["first answer", " second, другой"]
