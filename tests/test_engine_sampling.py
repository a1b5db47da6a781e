"""Sampling parameters behave as vLLM's do."""
import math

import pytest

from cluster import SamplingParams
from tests.engine_support import CHATS, chat_token_ids


def _gen(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def test_seeded_sampling_repeats_whatever_the_batch(embedded_llm):
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=1234, ignore_eos=True)
    a = _gen(embedded_llm, "Write a poem about the sea.", **kw)
    batch = embedded_llm.generate(["Another prompt entirely", "Write a poem about the sea."],
                                  SamplingParams(**kw), use_tqdm=False)
    assert a.outputs[0].token_ids == batch[1].outputs[0].token_ids
    other = _gen(embedded_llm, "Write a poem about the sea.", **{**kw, "seed": 99})
    assert other.outputs[0].token_ids != a.outputs[0].token_ids


def test_n_choices_with_seed_differ_and_repeat(embedded_llm):
    kw = dict(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    a = _gen(embedded_llm, "My favourite animal is", **kw)
    b = _gen(embedded_llm, "My favourite animal is", **kw)
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_max_and_min_tokens_and_ignore_eos(embedded_llm):
    out = _gen(embedded_llm, "Hi", temperature=0.0, max_tokens=7, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    eos = embedded_llm.get_tokenizer().eos_token_id
    tok = embedded_llm.get_tokenizer()
    ids = chat_token_ids(tok, CHATS[1])
    natural = _gen(embedded_llm, {"prompt_token_ids": ids}, temperature=0.0, max_tokens=200).outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == eos
    n = len(natural.token_ids)
    longer = _gen(embedded_llm, {"prompt_token_ids": ids}, temperature=0.0, max_tokens=200, min_tokens=n + 5).outputs[0]
    assert len(longer.token_ids) >= n + 5 and eos not in longer.token_ids[: n + 4]


def test_stop_strings_are_cut_and_stop_token_ids_end(embedded_llm):
    base = _gen(embedded_llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=20, ignore_eos=True).outputs[0]
    assert " 5" in base.text
    cut = _gen(embedded_llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=20, stop=[" 5"]).outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == " 5"
    assert cut.text == base.text[: base.text.index(" 5")]
    keep = _gen(embedded_llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=20, stop=" 5",
                include_stop_str_in_output=True).outputs[0]
    assert keep.text == base.text[: base.text.index(" 5") + 2]
    stop_id = base.token_ids[3]
    by_id = _gen(embedded_llm, "Count: 1, 2, 3,", temperature=0.0, max_tokens=20, stop_token_ids=[stop_id]).outputs[0]
    first = base.token_ids.index(stop_id)
    assert by_id.token_ids == base.token_ids[: first + 1] and by_id.stop_reason == stop_id


def test_logprobs_shape_and_values(embedded_llm):
    out = _gen(embedded_llm, "The sky is", temperature=0.0, max_tokens=5, logprobs=3).outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert entry[token].rank == 1  # greedy picks the top token
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks[:3] == [1, 2, 3]
        assert all(lp.logprob <= 0 and isinstance(lp.decoded_token, str) for lp in entry.values())
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-5)


def test_penalties_change_repetitive_output(embedded_llm):
    prompt = "apple apple apple apple apple apple"
    plain = _gen(embedded_llm, prompt, temperature=0.0, max_tokens=12, ignore_eos=True).outputs[0]
    penalised = _gen(embedded_llm, prompt, temperature=0.0, max_tokens=12, ignore_eos=True,
                     repetition_penalty=1.8, frequency_penalty=1.0, presence_penalty=1.0).outputs[0]
    apple = embedded_llm.get_tokenizer()(" apple").input_ids[-1]
    assert penalised.token_ids.count(apple) < max(plain.token_ids.count(apple), 1)


def test_multibyte_characters_are_never_split(embedded_llm):
    out = _gen(embedded_llm, "Translate to Japanese: good morning =>", temperature=0.8, seed=3, max_tokens=30)
    text = out.outputs[0].text
    assert "\ufffd" not in text
    tok = embedded_llm.get_tokenizer()
    assert text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=-1), dict(top_p=0), dict(max_tokens=0),
                                 dict(logprobs=50), dict(min_tokens=5, max_tokens=2),
                                 dict(temperature=float("nan")), dict(top_p=float("nan")),
                                 dict(repetition_penalty=float("inf")),
                                 # what torch would refuse (or turn into inf) only mid-step
                                 dict(seed=2 ** 64), dict(seed=-(2 ** 63) - 1), dict(seed=2 ** 64 - 1, n=2),
                                 dict(seed=1.5), dict(seed="7"), dict(top_k=2 ** 63), dict(top_k=-2),
                                 dict(top_k=2.0), dict(logprobs=2.5), dict(max_tokens=3.0), dict(n=True),
                                 dict(stop=[1]), dict(stop_token_ids=[-1]), dict(stop_token_ids=["a"]),
                                 dict(stop_token_ids=5), dict(repetition_penalty=1e39), dict(temperature="1")])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sampling_params_edges_torch_takes():
    import numpy as np

    assert SamplingParams(seed=2 ** 64 - 1).seed == 2 ** 64 - 1 and SamplingParams(seed=-(2 ** 63)).seed == -(2 ** 63)
    p = SamplingParams(seed=np.int64(3), n=np.int32(2), temperature=np.float32(0.5), stop_token_ids=(np.int64(4),))
    assert (p.seed, p.n, p.stop_token_ids) == (3, 2, [4]) and type(p.seed) is int and type(p.temperature) is float
    assert SamplingParams(top_k=-1).top_k == 0 and SamplingParams(top_k=None).top_k == 0
    with pytest.raises(ValueError, match=r"\.\.\.$"):  # a client's long value is quoted short
        SamplingParams(stop_token_ids=["x" * 10_000])


def test_prompt_logprobs_match_transformers_across_prefill_chunks(embedded_llm, hf_embedded):
    """Chunked prefill (8-token chunks) and a warm prefix cache still score every prompt token."""
    import torch

    from cluster import LLM

    tok = embedded_llm.get_tokenizer()
    ids = chat_token_ids(tok, CHATS[0])
    embedded_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)  # warm cache
    chunked = LLM(model=None, max_num_batched_tokens=8, num_gpu_blocks_override=32)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_embedded(torch.tensor([ids])).logits[0].float(), dim=-1)
    for llm in (embedded_llm, chunked):
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2, prompt_logprobs=3),
                           use_tqdm=False)[0]
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for i in range(1, len(ids)):
            entry = out.prompt_logprobs[i]
            assert ids[i] in entry and 3 <= len(entry) <= 4
            assert math.isclose(entry[ids[i]].logprob, float(ref[i - 1, ids[i]]), abs_tol=1e-3)
            assert sorted(lp.rank for lp in entry.values())[:3] == [1, 2, 3]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        embedded_llm.generate({"prompt_embeds": embedded_llm.get_input_embeddings(ids)},
                              SamplingParams(prompt_logprobs=1), use_tqdm=False)
