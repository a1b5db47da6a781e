"""Offline `LLM.chat`: the chat template rendered around text and tensor embeds parts, greedy
output equal to transformers' `generate` on the same chat-templated ids, token for token."""
import pytest
import torch

from cluster import SamplingParams
from replicas.chat_template import PLACEHOLDER_MARK, ChatError, parse_messages, render_segments
from tests.engine_support import CHATS, hf_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _content_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _embeds_part(llm, text: str) -> dict:
    return {"type": "prompt_embeds", "data": llm.get_input_embeddings(_content_ids(llm.get_tokenizer(), text))}


def _template_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def _hf_reference(hf, tok, messages, max_new_tokens=12) -> list[int]:
    out = hf_greedy(hf, _template_ids(tok, messages), max_new_tokens)
    eos = tok.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": CHATS[0]},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And what river runs through it?"},
]


def test_text_chat_equals_transformers(embedded_llm, hf_embedded):
    tok = embedded_llm.get_tokenizer()
    for messages in ([{"role": "user", "content": CHATS[1]}], CONVERSATION):
        got = embedded_llm.chat(messages, GREEDY, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == _hf_reference(hf_embedded, tok, messages)
        assert got.prompt_token_ids == _template_ids(tok, messages)


def test_embeds_parts_of_the_text_equal_transformers_on_the_text(embedded_llm, hf_embedded):
    tok = embedded_llm.get_tokenizer()
    single = [{"role": "user", "content": [_embeds_part(embedded_llm, CHATS[2])]}]
    # system text; user [text, embeds]; assistant embeds; user embeds: the parts of a message join with "\n"
    multi = [
        CONVERSATION[0],
        {"role": "user", "content": [{"type": "text", "text": "Question:"}, _embeds_part(embedded_llm, CHATS[0])]},
        {"role": "assistant", "content": [_embeds_part(embedded_llm, CONVERSATION[2]["content"])]},
        {"role": "user", "content": [_embeds_part(embedded_llm, CONVERSATION[3]["content"])]},
    ]
    as_text = [
        [{"role": "user", "content": CHATS[2]}],
        [CONVERSATION[0], {"role": "user", "content": "Question:\n" + CHATS[0]}, *CONVERSATION[2:]],
    ]
    outs = embedded_llm.chat([single, multi], GREEDY, use_tqdm=False)
    for out, text_messages in zip(outs, as_text):
        assert out.outputs[0].token_ids == _hf_reference(hf_embedded, tok, text_messages)
        assert out.prompt_token_ids is None and out.num_prompt_tokens == len(_template_ids(tok, text_messages))
    assert _tokens(outs) == _tokens(embedded_llm.chat(as_text, GREEDY, use_tqdm=False))


def test_segments_hold_the_template_ids_with_rows_at_the_parts(embedded_llm):
    tok = embedded_llm.get_tokenizer()
    a, b = torch.zeros(3, 576), torch.ones(2, 576)
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "prompt_embeds", "data": a},
                                             {"type": "prompt_embeds", "data": b}]}]
    segments = render_segments(tok, parse_messages(messages, lambda d: d))
    assert [type(s) for s in segments] == [list, torch.Tensor, list, torch.Tensor, list]
    assert segments[1] is a and segments[3] is b
    assert tok.decode(segments[0]).endswith("user\nx\n") and tok.decode(segments[2]) == "\n"
    assert tok.decode(segments[4]).startswith("<|im_end|>")


@pytest.mark.parametrize("content, where", [
    ([{"type": "image_url", "image_url": {"url": "x"}}], "messages[0].content[0]: unknown content part type"),
    ([{"type": "text", "text": "a"}, {"type": "prompt_embeds"}], "messages[0].content[1]: prompt_embeds content "
                                                                  "part requires a non-empty `data` field"),
    ([{"type": "prompt_embeds", "data": torch.zeros(4, 100)}], "messages[0].content[0]: prompt_embeds data is"),
    ([{"type": "prompt_embeds", "data": torch.zeros(4, 576, dtype=torch.long)}], "messages[0].content[0]:"),
    ([{"type": "prompt_embeds", "data": [[0.0] * 576]}], "messages[0].content[0]: prompt_embeds data must be"),
    ([{"type": "text", "text": f"hi {PLACEHOLDER_MARK}_0|>"}], "messages[0].content[0]: text contains"),
    (f"{PLACEHOLDER_MARK}_0|>", "messages[0]: content contains"),
    (None, "messages[0]: content is required"),
])
def test_bad_parts_are_value_errors_naming_message_and_part(embedded_llm, content, where):
    with pytest.raises(ChatError, match=None) as info:
        embedded_llm.chat([{"role": "user", "content": content}], GREEDY, use_tqdm=False)
    assert str(info.value).startswith(where), str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_conversations_are_value_errors(embedded_llm):
    for bad in ([{"role": "wizard", "content": "hi"}], [{"content": "hi"}], ["hi"]):
        with pytest.raises(ValueError, match=r"messages\[0\]"):
            embedded_llm.chat(bad, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="messages: has 4097 messages; at most 4096"):
        embedded_llm.chat([{"role": "user", "content": "hi"}] * 4097, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template_kwargs may not set tokenize"):
        embedded_llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False,
                          chat_template_kwargs={"tokenize": True})
    with pytest.raises(ValueError, match="chat template cannot render"):
        embedded_llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False,
                          chat_template="{{ raise_exception('no such role') }}")
