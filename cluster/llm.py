"""The offline, vLLM-compatible API: `LLM(...).generate(...)` on the engine in this process."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

import torch
from tqdm.auto import tqdm

from replicas.chat_template import chat_prompt
from replicas.engine import LLMEngine
from replicas.outputs import RequestOutput
from replicas.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, enable_prompt_embeds: bool = True, dtype="auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 num_gpu_blocks_override: int | None = None, enable_prefix_caching: bool = True,
                 load_format: str = "auto", seed: int = 0, **kwargs):
        self.engine = LLMEngine.from_kwargs(
            model=model, enable_prompt_embeds=enable_prompt_embeds, dtype=dtype, max_model_len=max_model_len,
            block_size=block_size, num_gpu_blocks_override=num_gpu_blocks_override,
            enable_prefix_caching=enable_prefix_caching, load_format=load_format, seed=seed, **kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_input_embeddings(self, token_ids) -> torch.Tensor:
        """What the model's input embedding layer gives for these ids: a (seq_len, hidden_size) tensor
        ready to pass back as {"prompt_embeds": ...}."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        return self.engine.input_embeddings(list(token_ids))

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a list of conversations, as
        vLLM's `LLM.chat`. A message's content is a string or a list of parts: `{"type": "text", ...}`
        and `{"type": "prompt_embeds", "data": tensor}` (rows of the model's input embeddings)."""
        many = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if many else [messages]
        prompts = [chat_prompt(self.engine.tokenizer, c, hidden_size=self.engine.model_config.hidden_size,
                               chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                               template_kwargs=chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, SequenceABC) and len(sampling_params) == len(prompts):
            params_list = list(sampling_params)
        else:
            raise ValueError("sampling_params must be one SamplingParams or a list with one per prompt")

        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        prepared = [self.engine.prepare(prompt, params) for prompt, params in zip(prompts, params_list)]
        order: dict[str, int] = {}
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm)
        try:  # from the first add on: whatever fails aborts what this call queued
            for i, (prompt, params) in enumerate(zip(prepared, params_list)):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, params, final_only=True)
                order[request_id] = i
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        finally:
            bar.close()
        return results
