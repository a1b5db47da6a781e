"""Helpers the engine tests share: chat prompts, transformers references, tiny random models,
the KV accounting check run after every test."""
from __future__ import annotations

import os
import time

import torch

CHATS = [
    "Please tell me about the capital of France.",
    "When is the day longest during the year?",
    "Where is bigger, the moon or the sun?",
]


def embedded_tokenizer():
    """The embedded default's tokenizer (RAYLM_TOKENIZER_DIR points elsewhere on machines without the model)."""
    from transformers import AutoTokenizer

    from replicas.loader import embedded_model_dir

    return AutoTokenizer.from_pretrained(os.environ.get("RAYLM_TOKENIZER_DIR") or embedded_model_dir())


def chat_token_ids(tokenizer, text: str) -> list[int]:
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(enc["input_ids"])


def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                             else model.config.pad_token_id)
    return out[0, len(token_ids):].tolist()


def make_tiny_model(folder, model_type: str, tokenizer, seed: int = 0, **overrides):
    """A small random-weight Hugging Face model saved as safetensors with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.eos_token_id)
    shape.update(overrides)
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy picks are not near-ties
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _snapshot(engine):
    """The engine's live sequences and how far each got (retried if its loop thread is mid-change)."""
    for _ in range(100):
        try:
            seqs = [*engine.scheduler.running, *engine.scheduler.waiting]
            return seqs, [(s.seq_id, s.num_computed_tokens, s.num_tokens, len(s.block_table)) for s in seqs]
        except RuntimeError:  # deque mutated during iteration
            time.sleep(0.01)
    raise AssertionError("could not read the engine's scheduler queues")


def check_engine_kv(engine, timeout_s: float = 60.0, stall_s: float = 1.0) -> None:
    """Check an engine's KV accounting (kv.check_integrity) once it is idle, or once it has made no
    progress for stall_s (a dead or abandoned loop: its live sequences are checked as they stand).
    Raises AssertionError if it is still busy after timeout_s."""
    deadline = time.monotonic() + timeout_s
    seqs, last = _snapshot(engine)
    still_since = time.monotonic()
    while seqs:
        time.sleep(0.02)
        seqs, now = _snapshot(engine)
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= stall_s:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy after {timeout_s} s: {len(seqs)} live sequences")
    engine.kv.check_integrity(seqs)
