"""Qwen3 (per-head q/k RMSNorm) and sliding-window attention (Mistral, Qwen2's windowed layers):
greedy parity with transformers on random weights."""
import pytest
import torch

from cluster import LLM, SamplingParams
from replicas.config import ModelConfig
from tests.engine_support import CHATS, chat_token_ids, embedded_tokenizer, hf_greedy, make_tiny_model


def test_qwen3_greedy_matches_transformers(tmp_path):
    tok = embedded_tokenizer()
    hf = make_tiny_model(tmp_path, "qwen3", tok, head_dim=32)
    with torch.no_grad():  # q/k norm weights away from ones, so loading them matters
        for name, p in hf.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=64)
    assert llm.engine.model_config.qk_norm
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 16)
    embeds = llm.get_input_embeddings(prompts[0])
    again = llm.generate([{"prompt_embeds": embeds}], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_sliding_window_per_layer_from_the_config():
    from transformers import AutoConfig

    mistral = AutoConfig.for_model("mistral", sliding_window=256, max_position_embeddings=1024, num_hidden_layers=3)
    cfg = ModelConfig.from_hf(mistral, "m", None)
    assert cfg.max_model_len == 1024 and cfg.layer_windows == (256, 256, 256)
    qwen = AutoConfig.for_model("qwen2", sliding_window=256, use_sliding_window=True, max_window_layers=2,
                                num_hidden_layers=4)
    assert ModelConfig.from_hf(qwen, "q", None).layer_windows == (0, 0, 256, 256)
    off = AutoConfig.for_model("qwen2", sliding_window=256, max_position_embeddings=1024, use_sliding_window=False)
    assert ModelConfig.from_hf(off, "q", None).layer_windows == ()


@pytest.mark.parametrize("model_type, window", [("mistral", dict(sliding_window=12)),
                                                ("qwen2", dict(sliding_window=12, use_sliding_window=True,
                                                               max_window_layers=1))])
def test_sliding_window_greedy_matches_transformers_past_the_window(tmp_path, model_type, window):
    """Prompts and outputs longer than the window, prefilled in chunks that cut through it."""
    tok = embedded_tokenizer()
    hf = make_tiny_model(tmp_path, model_type, tok, **window)
    llm = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=64, block_size=4,
              max_num_batched_tokens=16)
    assert any(llm.engine.model_config.layer_windows)
    prompts = [chat_token_ids(tok, c) for c in CHATS]
    assert min(len(p) for p in prompts) > 12
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 20)


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-8b"])
def test_qwen3_presets_load_as_dummy_models(preset):
    from replicas.loader import load_model_source

    source = load_model_source(preset, "dummy", None)
    cfg = ModelConfig.from_hf(source.hf_config, preset, 512)
    assert cfg.qk_norm and cfg.head_dim == 128 and not cfg.qkv_bias
