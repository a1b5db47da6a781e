"""The request schema of OpenAI's chat completions API (vLLM's extra sampling fields included).

It extends the completions schema: the same sampling fields and defaults, with chat's own
`messages`, `max_completion_tokens`, boolean `logprobs` + `top_logprobs`, and the template options.
Messages are checked part by part in `replicas.chat_template` (errors name message and part).
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt

from replicas.sampling_params import SamplingParams
from router.errors import bad_request
from router.schemas import CompletionRequest

MAX_TOP_LOGPROBS = 20  # as OpenAI caps it
# Completions fields chat has no use for: refused when set, not silently ignored.
_COMPLETIONS_ONLY = ("prompt", "prompt_embeds", "suffix", "echo", "prompt_logprobs", "best_of")


class ChatCompletionRequest(CompletionRequest):
    messages: Annotated[list[Any], Field(min_length=1, fail_fast=True)]
    max_tokens: StrictInt | None = None  # None: up to max_model_len
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        for name in _COMPLETIONS_ONLY:
            if getattr(self, name) not in (None, False):
                raise bad_request(f"{name} is not a chat completions field", name)
        if self.tools or self.tool_choice not in (None, "none"):
            raise bad_request("tools are not supported", "tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")

    def sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams; raises ValueError on out-of-range values."""
        as_completion = self.model_copy(update={
            "max_tokens": self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
        })
        return CompletionRequest.sampling_params(as_completion)
