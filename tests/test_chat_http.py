"""`POST /v1/chat/completions` through real Ray Serve, with the real `openai` client: text and
`prompt_embeds` parts, checked against transformers' greedy `generate` on the same chat-templated
ids; streaming, n, seed, stop, logprobs, msgpack; every bad part a 400 naming message and part;
and `connect().submit_chat` on the same cluster."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import msgpack
import numpy as np
import openai
import pytest
import ray
import requests
import torch
from openai import OpenAI

from serve_utils import b64_embeds, serving, sse_events
from tests.engine_support import CHATS, embedded_tokenizer, hf_greedy

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def server():
    with serving("chat", {"name": "raylm", "route_prefix": "/", "engine": {"max_model_len": MAX_MODEL_LEN}}) as base:
        from ray import serve

        yield SimpleNamespace(base=base, replica=serve.get_deployment_handle("Replica", app_name="raylm"))


@pytest.fixture(scope="module")
def oa(server) -> OpenAI:
    return OpenAI(api_key="EMPTY", base_url=f"{server.base}/v1", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def rows_of(hf, tok, text: str) -> torch.Tensor:
    """The model's own input embeddings of `text` (what a prompt_embeds part of it holds)."""
    with torch.no_grad():
        return hf.get_input_embeddings()(torch.tensor(tok(text, add_special_tokens=False).input_ids))


def embeds_part(hf, tok, text: str) -> dict:
    return {"type": "prompt_embeds", "data": b64_embeds(rows_of(hf, tok, text))}


def template_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def hf_reference(hf, tok, messages, max_new_tokens: int) -> list[int]:
    out = hf_greedy(hf, template_ids(tok, messages), max_new_tokens)
    return out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def chat(oa: OpenAI, messages, **kw):
    return oa.chat.completions.create(model=MODEL, messages=messages, temperature=0.0, **kw)


def post(server, body: dict, **kw) -> requests.Response:
    return requests.post(f"{server.base}/v1/chat/completions", json=body, timeout=300, **kw)


SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
REPLY = "Paris is the capital of France."
FOLLOW_UP = "And what river runs through it?"


def conversations(hf, tok, part=None):
    """(text messages, the same with embeds parts of the text): one part alone; and several
    messages with text and embeds parts mixed (a message's parts join with "\\n").
    part(text): the embeds part of a text (base64 by default)."""
    part = part or (lambda text: embeds_part(hf, tok, text))
    single = ([{"role": "user", "content": CHATS[0]}], [{"role": "user", "content": [part(CHATS[0])]}])
    multi_text = [SYSTEM, {"role": "user", "content": "Question:\n" + CHATS[1]},
                  {"role": "assistant", "content": REPLY}, {"role": "user", "content": FOLLOW_UP}]
    multi_embeds = [
        {"role": "system", "content": [part(SYSTEM["content"])]},
        {"role": "user", "content": [{"type": "text", "text": "Question:"}, part(CHATS[1])]},
        {"role": "assistant", "content": [{"type": "text", "text": REPLY}]},
        {"role": "user", "content": [part(FOLLOW_UP)]},
    ]
    return [single, (multi_text, multi_embeds)]


# -- parity with transformers -------------------------------------------------------------------
def test_text_and_embeds_chats_equal_transformers_token_for_token(oa, hf_embedded, tok):
    for text_messages, embeds_messages in conversations(hf_embedded, tok):
        want = hf_reference(hf_embedded, tok, text_messages, 16)
        want_text = tok.decode(want, skip_special_tokens=True)
        for messages in (text_messages, embeds_messages):
            r = chat(oa, messages, max_tokens=16, logprobs=True)
            assert [e.token for e in r.choices[0].logprobs.content] == [tok.decode([t]) for t in want]
            assert r.choices[0].message.content == want_text
            assert r.choices[0].message.role == "assistant"
            assert r.usage.prompt_tokens == len(template_ids(tok, text_messages))
            assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_embeds_parts_reach_the_replica_as_one_numpy_array(server, oa, hf_embedded, tok):
    multi = conversations(hf_embedded, tok)[1][1]
    r = chat(oa, multi, max_tokens=2)
    seen = dict(server.replica.embeds_types_seen.remote().result(timeout_s=60))
    assert seen[f"{r.id}-0"] == "numpy.ndarray"


# -- streaming, n, seed, stop, logprobs, lengths ------------------------------------------------
def test_streaming_with_usage_equals_non_streaming(oa, hf_embedded, tok):
    messages = conversations(hf_embedded, tok)[1][1]
    kw = dict(max_tokens=10, n=2, seed=11, temperature=0.9)
    whole = oa.chat.completions.create(model=MODEL, messages=messages, **kw)
    stream = oa.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                        stream_options={"include_usage": True}, **kw)
    texts, finishes, roles, chunks = {0: "", 1: ""}, {}, {}, list(stream)
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles.setdefault(c.index, c.delta.role)
            if c.finish_reason is not None:
                assert c.index not in finishes
                finishes[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_sse_ends_with_done(server):
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                      "stream": True}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_logprobs_and_top_logprobs_have_chat_shape(oa):
    r = chat(oa, [{"role": "user", "content": CHATS[2]}], max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy
        assert entry.bytes == list(entry.token.encode("utf-8"))
    plain = chat(oa, [{"role": "user", "content": CHATS[2]}], max_tokens=5)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_max_completion_tokens_stop_and_seed(oa):
    messages = [{"role": "user", "content": CHATS[1]}]
    r = chat(oa, messages, max_completion_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    text = r.choices[0].message.content
    word = text.split()[2]
    stopped = chat(oa, messages, max_tokens=7, stop=[word], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index(word)]
    seeded = [oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=5)
              for _ in range(2)]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content


# -- msgpack -------------------------------------------------------------------------------------
def test_msgpack_body_with_raw_bytes_parts(server, oa, hf_embedded, tok):
    rows = rows_of(hf_embedded, tok, CHATS[0])
    buf = io.BytesIO()
    torch.save(rows, buf)
    raw = rows.numpy().astype(np.float32)
    via_json = chat(oa, [{"role": "user", "content": [embeds_part(hf_embedded, tok, CHATS[0])]}], max_tokens=6)
    for data in (buf.getvalue(), {"dtype": "float32", "shape": list(raw.shape), "data": raw.tobytes()}):
        body = {"model": MODEL, "max_tokens": 6, "temperature": 0.0,
                "messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": data}]}]}
        r = requests.post(f"{server.base}/v1/chat/completions", data=msgpack.packb(body, use_bin_type=True),
                          headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
                          timeout=300)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/msgpack")
        out = msgpack.unpackb(r.content, raw=False)
        assert out["choices"][0]["message"]["content"] == via_json.choices[0].message.content
        assert out["usage"]["prompt_tokens"] == via_json.usage.prompt_tokens


# -- errors --------------------------------------------------------------------------------------
BAD_PARTS = {
    "missing data": ({"type": "prompt_embeds"}, "requires a non-empty `data` field"),
    "invalid base64": ({"type": "prompt_embeds", "data": "not_valid_base64!!"}, "base64"),
    "unknown part type": ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "unknown content part type"),
    "wrong hidden size": ({"type": "prompt_embeds", "data": b64_embeds(torch.zeros(4, 100))}, "576"),
    "placeholder text": ({"type": "text", "text": "see <|raylm_prompt_embeds_0|> here"}, "reserves"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTS))
def test_every_bad_part_is_a_400_naming_message_and_part(oa, case):
    part, words = BAD_PARTS[case]
    messages = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(oa, messages, max_tokens=3)
    err = info.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"].startswith("messages[1].content[1]: ") and words in err["message"], err
    assert err["param"] == "messages"


@pytest.mark.parametrize("body, words", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]: role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0]: content must be a string or a list"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]: a content part must be"),
    ({"messages": [{"role": "user", "content": "<|raylm_prompt_embeds_0|>"}]}, "messages[0]: content contains"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "prompt is not a chat completions field"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": True}}, "may not set"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}, "max_model_len"),
])
def test_bad_requests_are_400s(server, body, words):
    r = post(server, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"], r.json()


def test_embeds_rows_beyond_max_model_len_are_refused_at_the_part_that_passes_it(server):
    part = {"type": "prompt_embeds", "data": b64_embeds(torch.zeros(1100, 576))}
    r = post(server, {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [part, part]}]})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("messages[0].content[1]: the prompt_embeds parts up to here")


# -- the cluster client ------------------------------------------------------------------------
def test_client_submit_chat_with_tensor_parts(server, hf_embedded, tok):
    from cluster import SamplingParams, connect

    client = connect("raylm")
    tensor_part = lambda text: {"type": "prompt_embeds", "data": rows_of(hf_embedded, tok, text)}  # noqa: E731
    text_messages, tensor_messages = conversations(hf_embedded, tok, tensor_part)[1]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = hf_reference(hf_embedded, tok, text_messages, 10)
    out = ray.get(client.submit_chat(tensor_messages, params), timeout=300)
    assert out.outputs[0].token_ids == want
    ids = template_ids(tok, text_messages)
    with torch.no_grad():
        middle = hf_embedded.get_input_embeddings()(torch.tensor(ids[9:20]))
    seg = ray.get(client.submit({"prompt_segments": [ids[:9], middle, ids[20:]]}, params), timeout=300)
    assert seg.outputs[0].token_ids == want
