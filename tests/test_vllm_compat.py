"""A vLLM user's view of /v1/completions with prompt embeds: what vLLM's own serving tests check,
written again for raylm and run through real Ray Serve with the real `openai` client on the
embedded default model (SmolLM2-135M-Instruct).

Covered: embeds alone, batched, streamed and batch-streamed; mixed text + embeds (embeds results
first); logprobs with embeds (text offsets, top logprobs); `prompt_logprobs` (present and null
when not asked, `true` accepted, refused with embeds); sparse COO/CSR/CSC embeds in float32,
bfloat16 and float16 giving what their dense form gives; and vLLM's error wording and statuses.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import msgpack
import openai
import pytest
import requests
import torch
from openai import OpenAI

from router import errors
from serve_utils import b64_embeds, serving

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["Hello, my name is", "What is an LLM?"]


@pytest.fixture(scope="module")
def server():
    with serving("vllmcompat", {"name": "raylm", "route_prefix": "/", "router_num_cpus": 0.1,
                                "ray_actor_options": {"num_cpus": 0.5}, "engine": {"max_model_len": 512}},
                 object_store_mb=150) as base:
        yield SimpleNamespace(base=base)


@pytest.fixture(scope="module")
def oa(server) -> OpenAI:
    return OpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from replicas.loader import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def embeds(hf_embedded, tok) -> list[torch.Tensor]:
    """The embedding layer's output for each of PROMPTS, as vLLM's tests make them."""
    layer = hf_embedded.get_input_embeddings()
    with torch.no_grad():
        return [layer(torch.tensor(tok(p)["input_ids"])) for p in PROMPTS]


@pytest.fixture(scope="module")
def encoded(embeds) -> list[str]:
    return [b64_embeds(e) for e in embeds]


def complete(oa: OpenAI, **kw):
    kw.setdefault("max_tokens", 5)
    return oa.completions.create(model=MODEL, temperature=0.0, **kw)


def with_embeds(oa: OpenAI, embeds, prompt=None, **kw):
    return complete(oa, prompt=prompt, extra_body={"prompt_embeds": embeds, **kw.pop("extra", {})}, **kw)


def assert_openai_error(exc: openai.APIStatusError, status: int) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# -- embeds alone, batched, streamed ------------------------------------------------------------

def test_single_embeds_prompt(oa, encoded, tok):
    c = with_embeds(oa, encoded[0])
    assert len(c.choices) == 1 and c.choices[0].text
    assert c.choices[0].prompt_logprobs is None  # present (the client would raise AttributeError)
    assert c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == len(tok(PROMPTS[0])["input_ids"]) and c.usage.completion_tokens == 5


def test_embeds_equal_their_token_ids(oa, encoded, tok):
    ids = tok(PROMPTS[1])["input_ids"]
    assert with_embeds(oa, encoded[1]).choices[0].text == complete(oa, prompt=ids).choices[0].text


def test_batched_embeds_answer_each_in_order(oa, encoded):
    singles = [with_embeds(oa, e).choices[0].text for e in encoded]
    c = with_embeds(oa, encoded)
    assert [ch.index for ch in c.choices] == [0, 1]
    assert [ch.text for ch in c.choices] == singles
    assert all(ch.prompt_logprobs is None for ch in c.choices)


def test_streamed_embeds_join_to_the_unstreamed_text(oa, encoded):
    expected = with_embeds(oa, encoded[0]).choices[0].text
    chunks = list(complete(oa, prompt=None, stream=True, extra_body={"prompt_embeds": encoded[0]}))
    texts = [ch.text for chunk in chunks for ch in chunk.choices]
    finishes = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    assert finishes == ["length"]
    last = [ch for chunk in chunks for ch in chunk.choices][-1]
    assert last.finish_reason == "length" and last.text  # the last token comes with its finish
    assert "".join(texts) == expected


def test_batch_streamed_embeds_stream_each_prompt(oa, encoded):
    whole = with_embeds(oa, encoded).choices
    expected = [ch.text for ch in whole]
    parts: dict[int, list[str]] = {0: [], 1: []}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in complete(oa, prompt=None, stream=True, extra_body={"prompt_embeds": encoded}):
        for ch in chunk.choices:
            parts[ch.index].append(ch.text)
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    assert finishes == {i: [ch.finish_reason] for i, ch in enumerate(whole)}  # one each
    assert ["".join(parts[i]) for i in (0, 1)] == expected


def test_empty_embeds_list_beside_a_text_prompt_is_no_prompt(oa):
    c = complete(oa, prompt="Hello", extra_body={"prompt_embeds": []})
    assert len(c.choices) == 1 and c.choices[0].text == complete(oa, prompt="Hello").choices[0].text


# -- mixed text and embeds: embeds results first ------------------------------------------------

def test_mixed_text_and_embeds_answer_embeds_first(oa, encoded):
    text = "This is a prompt"
    mixed = complete(oa, prompt=text, extra_body={"prompt_embeds": encoded[0]})
    assert len(mixed.choices) == 2
    assert mixed.choices[0].text == with_embeds(oa, encoded[0]).choices[0].text
    assert mixed.choices[1].text == complete(oa, prompt=text).choices[0].text


def test_mixed_lists_keep_embeds_order_then_text_order(oa, encoded):
    texts = ["The sky is", "One, two,"]
    mixed = complete(oa, prompt=texts, extra_body={"prompt_embeds": encoded[::-1]})
    singles = [with_embeds(oa, e) for e in encoded[::-1]] + [complete(oa, prompt=t) for t in texts]
    assert [ch.index for ch in mixed.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in mixed.choices] == [c.choices[0].text for c in singles]
    assert mixed.usage.completion_tokens == sum(c.usage.completion_tokens for c in singles)
    assert mixed.usage.prompt_tokens == sum(c.usage.prompt_tokens for c in singles)


# -- logprobs with embeds -----------------------------------------------------------------------

@pytest.mark.parametrize("logprobs", [0, 1, 3])
def test_logprobs_with_embeds(oa, encoded, logprobs):
    # five tokens each, as many as max_tokens; the text keeps special tokens, as the tokens do
    five = {"ignore_eos": True, "skip_special_tokens": False}
    for c in (with_embeds(oa, encoded[0], logprobs=logprobs, echo=False, extra=five),
              with_embeds(oa, encoded, logprobs=logprobs, extra=five)):
        for ch in c.choices:
            lp = ch.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
            assert "".join(lp.tokens) == ch.text
            # no echo: offsets count from the start of the generated text
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
            for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
                assert max(logprobs, 1) <= len(top) <= logprobs + 1
                assert logprob <= 0 and top[token] == pytest.approx(logprob)
                assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely


def test_streamed_logprobs_with_embeds_match_the_unstreamed_ones(oa, encoded):
    whole = with_embeds(oa, encoded[1], logprobs=2).choices[0].logprobs
    streamed = [ch.logprobs for chunk in complete(oa, prompt=None, stream=True, logprobs=2,
                                                  extra_body={"prompt_embeds": encoded[1]})
                for ch in chunk.choices if ch.logprobs]
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset
    assert [x for lp in streamed for x in lp.token_logprobs] == pytest.approx(whole.token_logprobs)


# -- prompt_logprobs ----------------------------------------------------------------------------

def test_prompt_logprobs_true_is_one_per_prompt_token(oa, tok):
    ids = tok(PROMPTS[0])["input_ids"]
    c = complete(oa, prompt=PROMPTS[0], extra_body={"prompt_logprobs": True})
    entries = c.choices[0].prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:]):
        assert str(token_id) in entry and 1 <= len(entry) <= 2
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 for v in entry.values())
    assert complete(oa, prompt=PROMPTS[0], extra_body={"prompt_logprobs": 1}).choices[0].prompt_logprobs == entries


def test_prompt_logprobs_is_null_when_not_asked(oa):
    c = complete(oa, prompt=PROMPTS, logprobs=1)
    assert [ch.prompt_logprobs for ch in c.choices] == [None, None]
    assert c.choices[0].model_dump()["prompt_logprobs"] is None


@pytest.mark.parametrize("value", [True, 1, 0])
def test_prompt_logprobs_with_embeds_is_refused_in_vllms_words(oa, encoded, value):
    with pytest.raises(openai.BadRequestError, match="not compatible") as info:
        with_embeds(oa, encoded[0], extra={"prompt_logprobs": value})
    err = assert_openai_error(info.value, 400)
    assert err["message"] == errors.PROMPT_LOGPROBS_WITH_EMBEDS and err["param"] == "prompt_logprobs"


# -- sparse embeds: the same answer as their dense form ----------------------------------------

SPARSE = {"coo": lambda t: t.to_sparse(), "csr": lambda t: t.to_sparse_csr(),
          "csc": lambda t: t.to_sparse_csc()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_layouts_answer_as_their_dense_form(oa, embeds, dtype):
    e = embeds[0].to(dtype)
    e = e * (e.abs() > e.abs().float().median())  # half the entries zero, as a client would send
    dense = with_embeds(oa, b64_embeds(e), logprobs=1).choices[0]
    c = with_embeds(oa, [b64_embeds(make(e)) for make in SPARSE.values()], logprobs=1)
    for ch in c.choices:
        assert ch.text == dense.text
        assert ch.logprobs.tokens == dense.logprobs.tokens


def test_sparse_embeds_in_a_msgpack_body(server, oa, embeds):
    e = embeds[0]
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0.0,
            "prompt_embeds": [torch_save(e), torch_save(e.to_sparse_csr())]}
    r = requests.post(f"{server.base}/v1/completions", data=msgpack.packb(body, use_bin_type=True),
                      headers={"Content-Type": "application/msgpack"}, timeout=300)
    assert r.status_code == 200, r.text
    texts = [ch["text"] for ch in r.json()["choices"]]
    assert texts == [with_embeds(oa, b64_embeds(e)).choices[0].text] * 2 and texts[0]


def torch_save(t: torch.Tensor) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_hostile_sparse_embeds_are_400s(oa, server):
    out_of_range = torch.sparse_coo_tensor(torch.tensor([[0, 7], [0, 575]]), torch.tensor([1.0, 2.0]),
                                           (4, 576), check_invariants=False)
    with pytest.raises(openai.BadRequestError) as info:
        with_embeds(oa, b64_embeds(out_of_range))
    assert "sparse" in assert_openai_error(info.value, 400)["message"]
    huge = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (2**26, 576))
    with pytest.raises(openai.APIStatusError) as info:
        with_embeds(oa, b64_embeds(huge))
    assert "too large" in assert_openai_error(info.value, 413)["message"]
    assert requests.get(f"{server.base}/health", timeout=30).status_code == 200


# -- errors in vLLM's words, with vLLM's statuses -----------------------------------------------

def test_no_prompt_at_all_is_vllms_400(oa):
    for extra in ({"prompt_embeds": []}, {}):
        with pytest.raises(openai.BadRequestError, match=re.escape(errors.EMPTY_PROMPT)) as info:
            complete(oa, prompt=None, extra_body=extra)
        assert assert_openai_error(info.value, 400)["message"] == errors.EMPTY_PROMPT


@pytest.mark.parametrize("prompt", [[999999], [1, 2, -1], [[5, 6], [7, 10**9]]])
def test_token_ids_outside_the_vocabulary_are_vllms_400(oa, prompt):
    with pytest.raises(openai.BadRequestError, match=".*out of vocabulary.*") as info:
        complete(oa, prompt=prompt)
    assert assert_openai_error(info.value, 400)["param"] == "prompt"


@pytest.mark.parametrize("data", ["invalid_base64", "not_valid_base64!!", "QUJD", ""])
def test_invalid_base64_embeds_are_400s(oa, data):
    with pytest.raises(openai.BadRequestError) as info:
        with_embeds(oa, data)
    assert assert_openai_error(info.value, 400)["param"] == "prompt_embeds"


def test_echo_with_embeds_is_vllms_400(oa, encoded):
    with pytest.raises(openai.BadRequestError, match=re.escape(errors.ECHO_WITH_EMBEDS)):
        with_embeds(oa, encoded[0], echo=True)
