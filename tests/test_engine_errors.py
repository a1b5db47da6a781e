"""Bad prompts get a clear ValueError naming what was expected, and leave the engine clean."""
import numpy as np
import pytest
import torch

from cluster import LLM, SamplingParams
from tests.engine_support import make_tiny_model

P = SamplingParams(max_tokens=4)


@pytest.mark.parametrize("tensor,match", [
    (torch.zeros(576), r"\(seq_len, 576\)"),
    (torch.zeros(2, 3, 576), r"\(seq_len, 576\)"),
    (torch.zeros(5, 100), r"shape \(5, 100\).*\(seq_len, 576\)"),
    (torch.zeros(5, 576, dtype=torch.int64), "floating point"),
    (np.zeros((5, 576), dtype=np.int32), "floating-point"),
    (torch.zeros(0, 576), "empty"),
    ("not a tensor", "torch.Tensor or numpy"),
])
def test_bad_embeds_raise(embedded_llm, tensor, match):
    with pytest.raises(ValueError, match=match):
        embedded_llm.generate({"prompt_embeds": tensor}, P, use_tqdm=False)
    load = embedded_llm.engine.get_load()
    assert load.num_free_blocks == load.num_total_blocks and not embedded_llm.engine.has_unfinished_requests()


def test_numpy_and_half_embeds_are_accepted(embedded_llm):
    rows = embedded_llm.get_input_embeddings([1, 2, 3])
    a = embedded_llm.generate({"prompt_embeds": rows.numpy()}, P, use_tqdm=False)[0]
    b = embedded_llm.generate({"prompt_embeds": rows.to(torch.bfloat16)}, P, use_tqdm=False)[0]
    assert len(a.outputs[0].token_ids) == 4 and len(b.outputs[0].token_ids) == 4


def test_prompt_too_long(embedded_llm):
    limit = embedded_llm.engine.model_config.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        embedded_llm.generate({"prompt_token_ids": [5] * (limit - 3)}, SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        embedded_llm.generate({"prompt_embeds": torch.zeros(limit, 576)}, P, use_tqdm=False)


def test_bad_token_ids_and_empty_prompt(embedded_llm):
    with pytest.raises(ValueError, match="out of range"):
        embedded_llm.generate({"prompt_token_ids": [1, 10**9]}, P, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        embedded_llm.generate("", P, use_tqdm=False)


def test_bad_prompt_or_params_in_batch_queue_nothing_and_use_no_request_id(embedded_llm):
    before = embedded_llm.generate("first", P, use_tqdm=False)[0].request_id
    for prompts, params in [
        (["fine", {"prompt_embeds": torch.zeros(3, 7)}], P),
        (["fine", "also fine"], [P, "not SamplingParams"]),
        (["fine", "also fine"], [P, {"max_tokens": 4}]),
        (["fine", "also fine"], [P, SamplingParams(max_tokens=10 ** 6)]),  # past max_model_len
        (["fine", "also fine"], [P]),  # one params for two prompts
    ]:
        with pytest.raises(ValueError):
            embedded_llm.generate(prompts, params, use_tqdm=False)
        assert not embedded_llm.engine.has_unfinished_requests()
        load = embedded_llm.engine.get_load()
        assert load.num_free_blocks == load.num_total_blocks
    after = embedded_llm.generate("next", P, use_tqdm=False)[0].request_id
    assert int(after.rsplit("-", 1)[1]) == int(before.rsplit("-", 1)[1]) + 1  # no id taken by a failed call


def test_embeds_refused_when_disabled(tmp_path, embedded_llm):
    make_tiny_model(tmp_path, "llama", embedded_llm.get_tokenizer())
    llm = LLM(model=str(tmp_path), enable_prompt_embeds=False, num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match="enable_prompt_embeds"):
        llm.generate({"prompt_embeds": torch.zeros(3, 64)}, P, use_tqdm=False)
    assert len(llm.generate("still works", P, use_tqdm=False)[0].outputs[0].token_ids) == 4
