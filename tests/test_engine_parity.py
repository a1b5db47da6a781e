"""Greedy outputs equal Hugging Face transformers', token for token, and embeds equal their tokens."""
import pytest
import torch

from cluster import LLM, SamplingParams
from tests.engine_support import CHATS, chat_token_ids, hf_greedy, make_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def test_embedded_default_matches_transformers(embedded_llm, hf_embedded):
    tok = embedded_llm.get_tokenizer()
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    outs = embedded_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_embedded, prompt, 24)
        assert out.prompt_token_ids == prompt


def test_text_prompt_matches_transformers(embedded_llm, hf_embedded):
    tok = embedded_llm.get_tokenizer()
    text = "The three primary colors are"
    out = embedded_llm.generate(text, GREEDY, use_tqdm=False)[0]
    ids = tok(text).input_ids
    expected = hf_greedy(hf_embedded, ids, 24)
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == tok.decode(expected, skip_special_tokens=True)


def test_prompt_embeds_equal_their_tokens(embedded_llm, hf_embedded):
    """The spec's flow: embeddings from transformers' input layer give the tokens' outputs."""
    tok = embedded_llm.get_tokenizer()
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    layer = hf_embedded.get_input_embeddings()
    embeds = [layer(torch.tensor([p])).squeeze(0).detach() for p in prompts]
    by_embeds = embedded_llm.generate([{"prompt_embeds": e} for e in embeds], GREEDY, use_tqdm=False)
    by_tokens = embedded_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for e, t, p in zip(by_embeds, by_tokens, prompts):
        assert e.outputs[0].token_ids == t.outputs[0].token_ids
        assert e.outputs[0].text == t.outputs[0].text
        assert e.prompt_token_ids is None and e.num_prompt_tokens == len(p)
    # (1, seq, hidden) is squeezed; our own helper gives the same rows as transformers' layer.
    ours = embedded_llm.get_input_embeddings(prompts[0])
    assert torch.equal(ours, embeds[0])
    three_d = embedded_llm.generate({"prompt_embeds": ours.unsqueeze(0)}, GREEDY, use_tqdm=False)[0]
    assert three_d.outputs[0].token_ids == by_tokens[0].outputs[0].token_ids


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("mistral", dict(tie_word_embeddings=False)),
])
def test_tiny_random_models_match_transformers(tmp_path, embedded_llm, model_type, overrides):
    tok = embedded_llm.get_tokenizer()
    hf = make_tiny_model(tmp_path, model_type, tok, **overrides)
    llm = LLM(model=str(tmp_path), num_gpu_blocks_override=64)
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
