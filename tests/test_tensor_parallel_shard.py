"""How a tensor-parallel rank's share is cut: head groups, uneven splits, KV heads shared when there
are fewer than ranks, and every fused parameter rebuilt exactly from its shards. No processes."""
import pytest
import torch

from replicas.config import EngineConfig, ModelConfig
from replicas.models.llama import LlamaForCausalLM
from replicas.parallel.shard import Span, TensorShard, even_span, head_spans
from replicas.parallel.placement import serve_options


def config(heads=4, kv=2, head_dim=8, hidden=32, inter=48, vocab=101, tie=False, bias=True) -> ModelConfig:
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                     intermediate_size=inter, vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=64,
                     tie_word_embeddings=tie, attention_bias=bias)
    return ModelConfig.from_hf(hf, "tiny", None)


def test_even_spans_cover_the_range_in_order():
    for n, k in [(10, 3), (9, 4), (4, 4), (49155, 2)]:
        spans = [even_span(n, k, r) for r in range(k)]
        assert spans[0].start == 0 and sum(s.size for s in spans) == n
        assert all(a.start + a.size == b.start for a, b in zip(spans, spans[1:]))
        assert max(s.size for s in spans) - min(s.size for s in spans) <= 1


@pytest.mark.parametrize("heads,kv,k,expected", [
    (32, 8, 2, [(Span(0, 16), Span(0, 4)), (Span(16, 16), Span(4, 4))]),
    (9, 3, 2, [(Span(0, 6), Span(0, 2)), (Span(6, 3), Span(2, 1))]),  # SmolLM2-135M: uneven KV groups
    (4, 2, 4, [(Span(0, 1), Span(0, 1)), (Span(1, 1), Span(0, 1)), (Span(2, 1), Span(1, 1)),
               (Span(3, 1), Span(1, 1))]),  # fewer KV heads than ranks: each shared by two ranks
    (9, 3, 4, [(Span(0, 2), Span(0, 1)), (Span(2, 1), Span(0, 1)), (Span(3, 3), Span(1, 1)),
               (Span(6, 3), Span(2, 1))]),
])
def test_head_spans(heads, kv, k, expected):
    assert [head_spans(heads, kv, k, r) for r in range(k)] == expected


def test_sizes_the_heads_cannot_take_are_refused():
    with pytest.raises(ValueError, match="attention heads"):
        TensorShard(config(heads=4, kv=2), 0, 8)
    with pytest.raises(ValueError, match="share"):
        head_spans(4, 1, 8, 0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_shards_rebuild_every_full_parameter(k):
    cfg = config(heads=4, kv=2, vocab=101)  # 101 rows: padded vocabulary shards
    torch.manual_seed(0)
    full = LlamaForCausalLM(cfg)
    shards = [TensorShard(cfg, r, k) for r in range(k)]
    for name, param in full.named_parameters():
        pieces = [s.take(name, param.detach()) for s in shards]
        part = shards[0].partition(name)
        if part is None:
            assert all(torch.equal(p, param) for p in pieces)
            continue
        rebuilt = torch.zeros_like(param)
        for s, piece in zip(shards, pieces):
            at = 0
            for span in s.partition(name).spans:  # KV heads may repeat on several ranks: same values
                rebuilt.narrow(part.dim, span.start, span.size).copy_(piece.narrow(part.dim, at, span.size))
                at += span.size
            assert s.full_shape(name, piece.shape) == tuple(param.shape)
        assert torch.equal(rebuilt, param), name
        local = LlamaForCausalLM(shards[1].local_config(), shards[1])
        assert dict(local.named_parameters())[name].shape == pieces[1].shape, name


def test_engine_options():
    assert EngineConfig.from_kwargs(tensor_parallel_size=2).tensor_parallel_size == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            EngineConfig.from_kwargs(tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="placement_group_strategy"):
        EngineConfig.from_kwargs(tensor_parallel_size=2, placement_group_strategy="ANYWHERE")


def test_serve_options_give_each_rank_a_bundle():
    assert serve_options({}, {"num_gpus": 1}) == {}
    gpu = serve_options({"tensor_parallel_size": 2}, {"num_gpus": 1, "num_cpus": 2})
    assert gpu["placement_group_bundles"] == [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert gpu["placement_group_strategy"] == "STRICT_PACK"
    assert gpu["ray_actor_options"]["runtime_env"]["env_vars"]["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    cpu = serve_options({"tensor_parallel_size": 3, "placement_group_strategy": "PACK"}, {"num_cpus": 0.5})
    assert cpu == {"placement_group_bundles": [{"CPU": 0.5}] * 3, "placement_group_strategy": "PACK"}
