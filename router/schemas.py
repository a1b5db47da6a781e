"""Request schemas of the OpenAI-compatible completions API (vLLM's field names and defaults)."""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictBytes, StrictInt, StrictStr, field_validator

from replicas.sampling_params import SamplingParams

MAX_N = 128  # completions per prompt, as OpenAI caps it

# fail_fast: a list stops at its first bad item, so a huge wrong-typed list costs one error, not millions.
TokenIds = Annotated[list[StrictInt], Field(fail_fast=True)]
Texts = Annotated[list[StrictStr], Field(fail_fast=True)]
# base64 of torch.save bytes (JSON); in msgpack also raw torch.save bytes or {"dtype","shape","data"}
EmbedsEntry = Union[StrictStr, StrictBytes, dict[str, Any]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class CompletionRequest(BaseModel):
    # NaN/Infinity (which Python's JSON parser and msgpack accept) are client errors, not values.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: StrictStr | None = None
    prompt: StrictStr | Texts | TokenIds | Annotated[list[TokenIds], Field(fail_fast=True)] | None = None
    prompt_embeds: EmbedsEntry | list[EmbedsEntry] | None = None
    suffix: StrictStr | None = None
    max_tokens: StrictInt | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    best_of: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    seed: Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)] | None = None
    ignore_eos: StrictBool = False
    # vLLM's lax parsing reads true / false as 1 / 0 here; clients send `"prompt_logprobs": true`.
    logprobs: StrictInt | StrictBool | None = None
    prompt_logprobs: StrictInt | StrictBool | None = None
    echo: StrictBool = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_tokens: StrictInt = 0
    skip_special_tokens: StrictBool = True
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _bool_as_int(cls, value):
        return int(value) if isinstance(value, bool) else value

    def sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams; raises ValueError on out-of-range values."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    def text_prompts(self) -> list[str | list[int]]:
        """The text / token-id prompts, in order. `""` alone is no prompt (vLLM's embeds idiom)."""
        p = self.prompt
        if p is None or p == "" or p == []:
            return []
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def embeds_entries(self) -> list:
        e = self.prompt_embeds
        if e is None:
            return []
        return list(e) if isinstance(e, list) else [e]
