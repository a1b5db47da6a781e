"""Prompts that mix token-id and embeds segments: same tokens as the ids of all segments, through
chunked prefill, preemption and the prefix cache (which tells embeds positions from token ones)."""
import torch

from cluster import LLM, SamplingParams
from tests.engine_support import CHATS, chat_token_ids

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _split(llm, ids: list[int], cuts: tuple[int, int]):
    a, b = cuts
    return {"prompt_segments": [ids[:a], llm.get_input_embeddings(ids[a:b]), ids[b:]]}


def test_ids_embeds_ids_equals_the_ids(embedded_llm):
    tok = embedded_llm.get_tokenizer()
    ids = chat_token_ids(tok, CHATS[0])
    want = embedded_llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    for cuts in [(3, 20), (0, 9), (10, len(ids))]:
        got = embedded_llm.generate([_split(embedded_llm, ids, cuts)], GREEDY, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, cuts
        assert got.num_prompt_tokens == len(ids) and got.prompt_token_ids is None


def test_chunks_cut_through_segments_and_preemption_change_nothing():
    llm = LLM(model=None, max_num_batched_tokens=7, num_gpu_blocks_override=6)
    tok = llm.get_tokenizer()
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    want = [o.outputs[0].token_ids for o in
            llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
    before = llm.engine.scheduler.num_preemptions
    got = llm.generate([_split(llm, p, (5, 5 + 11 * (i + 1))) for i, p in enumerate(prompts)], GREEDY,
                       use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert llm.engine.scheduler.num_preemptions > before


def test_prefix_cache_keys_tell_embeds_positions_from_tokens():
    llm = LLM(model=None)
    ids = chat_token_ids(llm.get_tokenizer(), CHATS[1]) * 2  # several full blocks
    llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    # Embeds of the same ids: same KV values, but embeds positions never share token blocks' keys.
    mixed = _split(llm, ids, (0, 20))
    first = llm.generate([mixed], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate([_split(llm, ids, (0, 20))], GREEDY, use_tqdm=False)[0]  # equal content: hits
    assert again.num_cached_tokens >= 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_bad_segments_are_value_errors(embedded_llm):
    import pytest

    for bad in [[], [[]], [[1, 2], "text"], [torch.zeros(2, 3)], [[10**9]]]:
        with pytest.raises(ValueError):
            embedded_llm.generate([{"prompt_segments": bad}], GREEDY, use_tqdm=False)
