"""The engine on CUDA (Triton attention, decode CUDA graphs, device sampling): greedy parity with
transformers in float32, bf16 agreement, graphs == eager, embeds == token ids, preemption."""
import pytest
import torch

from cluster import LLM, SamplingParams
from replicas.attention.backend import AttentionMetadata
from tests.engine_support import CHATS, chat_token_ids, embedded_tokenizer, hf_greedy, make_tiny_model
from tests.paged_cache import paged_batch

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# head_dim 64 (Llama-3.2-1B's) and 128 (Llama-3.1-8B's), GQA 2:1 and 4:1.
SHAPES = {"d64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
          "d128": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1)}


def _prompts(tok):
    return [chat_token_ids(tok, c) for c in CHATS] + [list(range(5, 400, 3))]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_float32_greedy_matches_transformers(tmp_path, model_type, shape):
    tok = embedded_tokenizer()
    window = {"sliding_window": 48} if model_type == "mistral" else {}  # the long prompt outgrows it
    hf = make_tiny_model(tmp_path, model_type, tok, **SHAPES[shape], **window)  # the reference runs on the CPU
    llm = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=256, max_num_seqs=32)
    assert llm.engine.runner.backend.name == "triton" and llm.engine.runner.graphs is not None
    prompts = _prompts(tok)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref = hf_greedy(hf, p, 24)
        assert out.outputs[0].token_ids == ref


def test_bfloat16_top1_and_logprobs_close_to_transformers(tmp_path):
    tok = embedded_tokenizer()
    hf = make_tiny_model(tmp_path, "llama", tok, **SHAPES["d64"]).to("cuda", torch.bfloat16)
    llm = LLM(model=str(tmp_path), num_gpu_blocks_override=256, max_num_seqs=32)
    assert llm.engine.dtype == torch.bfloat16
    prompts = _prompts(tok)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1), use_tqdm=False)
    agree = total = 0
    for p, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        with torch.inference_mode():  # transformers scores our continuation (teacher forcing)
            logits = hf(torch.tensor([p + gen], device="cuda")).logits[0, len(p) - 1:-1].float()
        ref_lp = torch.log_softmax(logits, -1)
        agree += sum(int(a == b) for a, b in zip(ref_lp.argmax(-1).tolist(), gen))
        total += len(gen)
        ours = torch.tensor([out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(gen)])
        theirs = ref_lp.gather(1, torch.tensor(gen, device="cuda")[:, None]).squeeze(1).cpu()
        assert (ours - theirs).abs().max() < 0.15
    assert agree / total >= 0.9


def test_cuda_graphs_give_the_same_tokens_as_eager(tmp_path):
    tok = embedded_tokenizer()
    make_tiny_model(tmp_path, "llama", tok, **SHAPES["d64"])
    prompts = [{"prompt_token_ids": p} for p in _prompts(tok)]
    graphs = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=256, max_num_seqs=32)
    eager = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=256, max_num_seqs=32, enforce_eager=True)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    a = graphs.generate(prompts, GREEDY, use_tqdm=False)
    b = eager.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_embeds_equal_token_ids_on_the_graph_path(tmp_path):
    tok = embedded_tokenizer()
    make_tiny_model(tmp_path, "qwen2", tok, **SHAPES["d64"])
    llm = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=256, max_num_seqs=32)
    assert llm.engine.runner.graphs is not None
    ids = [chat_token_ids(tok, c) for c in CHATS]
    mixed = [{"prompt_embeds": llm.get_input_embeddings(ids[0])}, {"prompt_token_ids": ids[1]},
             {"prompt_embeds": llm.get_input_embeddings(ids[2])}]
    a = llm.generate(mixed, GREEDY, use_tqdm=False)
    b = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_preemption_under_a_small_pool_changes_nothing(tmp_path):
    tok = embedded_tokenizer()
    make_tiny_model(tmp_path, "llama", tok, **SHAPES["d64"])
    prompts = [{"prompt_token_ids": chat_token_ids(tok, c) + [100 + i]} for i, c in enumerate(CHATS * 2)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    roomy = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=512, max_num_seqs=32)
    small = LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=14, max_num_seqs=32)
    a = roomy.generate(prompts, params, use_tqdm=False)
    b = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert small.engine.kv.num_free_blocks == 14


def test_seeded_sampling_repeats_on_the_device(tmp_path):
    tok = embedded_tokenizer()
    make_tiny_model(tmp_path, "llama", tok, **SHAPES["d64"])
    llm = LLM(model=str(tmp_path), num_gpu_blocks_override=256, max_num_seqs=32)
    ids = chat_token_ids(tok, CHATS[0])
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, seed=7,
                            repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2, min_tokens=4)
    alone = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate([{"prompt_token_ids": ids}] + [{"prompt_token_ids": ids[:-1]}] * 5,
                         [params] + [SamplingParams(max_tokens=16, temperature=1.0)] * 5, use_tqdm=False)
    assert crowd[0].outputs[0].token_ids == alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(32, 8, 64), (32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("window", [0, 37])
def test_triton_kernels_match_the_torch_reference(dtype, heads, window):
    """Mixed batch (prefill chunks with context, decodes, a long decode) and a split decode batch,
    with full and sliding-window attention."""
    from replicas.attention.torch_backend import TorchAttentionBackend
    from replicas.attention.triton_backend import TritonAttentionBackend

    H, Hkv, D = heads
    g = torch.Generator(device="cuda").manual_seed(0)
    for cases, split in [([(0, 70), (33, 1), (100, 300), (0, 1), (1500, 1)], None), ([(2000, 1), (40, 1)], 2)]:
        cache, meta_args = paged_batch(cases, Hkv, D, dtype, "cuda", 512, g)
        T = int(meta_args[1][-1])
        q = torch.randn((T, H, D), generator=g, device="cuda").to(dtype)
        k, v = torch.randn((2, T, Hkv, D), generator=g, device="cuda").to(dtype)
        outs = []
        for backend in (TorchAttentionBackend(), TritonAttentionBackend(H, Hkv, D, torch.device("cuda"), 8)):
            c = cache.clone()
            meta = AttentionMetadata(*meta_args)
            if split and backend.name == "triton":
                meta.backend_state["plan"] = backend.plan(T, len(cases), 1, meta.max_seq_len, split_batch=split)
                assert meta.backend_state["plan"].num_splits > 1
            backend.prepare(meta)
            outs.append((backend.forward(q, k, v, c, meta, D ** -0.5, window).float(), c))
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        assert torch.equal(outs[0][1], outs[1][1])
        assert (outs[0][0] - outs[1][0]).abs().max() < tol


@pytest.mark.parametrize("hidden", [576, 2048, 4096])
def test_fused_add_rmsnorm_matches_the_torch_path(hidden):
    from replicas.models.fused_norm import add_rmsnorm
    from replicas.models.llama import RMSNorm

    norm = RMSNorm(hidden, 1e-5).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x, r = torch.randn((2, 37, hidden), device="cuda").to(torch.bfloat16)
    expected_sum = x + r
    out, summed = add_rmsnorm(x, norm.weight, 1e-5, r.clone())
    assert torch.equal(summed, expected_sum)
    assert (out.float() - norm(expected_sum).float()).abs().max() < 0.05
