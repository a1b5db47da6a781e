"""The engine on CUDA: greedy parity with transformers on the GPU (float32), bfloat16 by default."""
import pytest
import torch

from cluster import LLM, SamplingParams
from tests.engine_support import CHATS, chat_token_ids, embedded_tokenizer, make_tiny_model

pytestmark = pytest.mark.gpu


def test_cuda_greedy_matches_transformers(tmp_path):
    tok = embedded_tokenizer()
    hf = make_tiny_model(tmp_path, "llama", tok).to("cuda")
    llm = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=128)
    assert llm.engine.device.type == "cuda"
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref


def test_cuda_defaults_to_bfloat16_and_mixes_embeds(tmp_path):
    tok = embedded_tokenizer()
    make_tiny_model(tmp_path, "qwen2", tok)
    llm = LLM(model=str(tmp_path), num_gpu_blocks_override=128)
    assert llm.engine.dtype == torch.bfloat16
    ids = chat_token_ids(tok, CHATS[0])
    embeds = llm.get_input_embeddings(ids)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    a, b = llm.generate([{"prompt_embeds": embeds}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
