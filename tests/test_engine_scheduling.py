"""Continuous batching keeps order and per-prompt outputs; preemption and prefix caching change nothing."""
import torch

from cluster import LLM, SamplingParams
from tests.engine_support import CHATS, chat_token_ids


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_mixed_batch_in_input_order_equals_alone(embedded_llm):
    tok = embedded_llm.get_tokenizer()
    ids = chat_token_ids(tok, CHATS[0])
    embeds = embedded_llm.get_input_embeddings(chat_token_ids(tok, CHATS[1]))
    prompts = [{"prompt_embeds": embeds}, "Once upon a time", {"prompt_token_ids": ids}, {"prompt": "Hello,"}]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 5, 20, 9)]
    together = embedded_llm.generate(prompts, params, use_tqdm=False)
    alone = [embedded_llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    assert [len(t) for t in _tokens(together)] == [12, 5, 20, 9]
    assert _tokens(together) == _tokens(alone)
    assert together[1].prompt == "Once upon a time" and together[2].prompt_token_ids == ids


def test_chunked_prefill_and_preemption_change_nothing(embedded_llm):
    tok = embedded_llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_token_ids(tok, c)} for c in CHATS * 2]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    reference = _tokens(embedded_llm.generate(prompts, params, use_tqdm=False))

    # 12 blocks of 16 tokens cannot hold six ~80-token sequences at once: the scheduler must preempt.
    small = LLM(model=None, num_gpu_blocks_override=12, max_num_batched_tokens=32, enable_prefix_caching=False)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert _tokens(outs) == reference
    load = small.engine.get_load()
    assert load.num_free_blocks == load.num_total_blocks == 12
    assert load.num_running == load.num_waiting == 0


def test_prefix_cache_hits_change_nothing(embedded_llm):
    tok = embedded_llm.get_tokenizer()
    ids = chat_token_ids(tok, CHATS[2]) * 2  # > 2 blocks
    embeds = embedded_llm.get_input_embeddings(ids)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    for prompt in ({"prompt_token_ids": ids}, {"prompt_embeds": embeds}):
        first = embedded_llm.generate(prompt, params, use_tqdm=False)[0]
        second = embedded_llm.generate(prompt, params, use_tqdm=False)[0]
        assert second.num_cached_tokens >= 16 * ((len(ids) - 1) // 16)
        assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # an embeds prompt differing in its last row still shares the leading blocks
    changed = embeds.clone()
    changed[-1] += 1.0
    third = embedded_llm.generate({"prompt_embeds": changed}, params, use_tqdm=False)[0]
    assert third.num_cached_tokens == 16 * ((len(ids) - 1) // 16)
    load = embedded_llm.engine.get_load()
    assert load.num_free_blocks == load.num_total_blocks


def test_abort_returns_blocks(embedded_llm):
    engine = embedded_llm.engine
    engine.add_request("to-abort", "Tell me a long story.", SamplingParams(max_tokens=200, ignore_eos=True))
    outs = []
    for _ in range(3):
        outs += engine.step()
    assert outs and not any(o.finished for o in outs)  # running, far from its 200 tokens
    assert engine.get_load().num_free_blocks < engine.get_load().num_total_blocks
    engine.abort_request("to-abort")
    final = [o for o in engine.step() if o.request_id == "to-abort"]
    assert [(o.finished, o.outputs[0].finish_reason) for o in final] == [(True, "abort")]
    assert final[0].outputs[0].token_ids == outs[-1].outputs[0].token_ids  # stopped where it was
    assert not engine.has_unfinished_requests()
    assert engine.get_load().num_free_blocks == engine.get_load().num_total_blocks


def test_streamed_text_only_grows_and_the_stop_string_fires(embedded_llm):
    prompt = "List three fruits:"
    base = embedded_llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].text
    stop = base[len(base) // 2:len(base) // 2 + 3]  # from the middle: text before it must be held back
    assert len(stop) == 3
    engine = embedded_llm.engine
    engine.add_request("grow", prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))
    outs = []
    for _ in range(40):  # a deadline: 30 tokens take 30 steps
        if not engine.has_unfinished_requests():
            break
        outs += [o for o in engine.step() if o.request_id == "grow"]
    texts = [o.outputs[0].text for o in outs]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)
    final = outs[-1].outputs[0]
    assert outs[-1].finished and final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == base[:base.index(stop)]
    assert len(final.token_ids) < 30


def test_input_embeddings_helper_matches_layer(embedded_llm):
    ids = [1, 2, 3, 400]
    rows = embedded_llm.get_input_embeddings(torch.tensor([ids]))
    assert rows.shape == (4, 576)
    assert torch.equal(rows, embedded_llm.engine.runner.model.embed_tokens.weight[ids].detach())
