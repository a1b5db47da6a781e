"""Generation parameters, named and defaulted as vLLM's SamplingParams."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
_OPTIONAL = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_FLOAT32_MAX = 3.4028234663852886e38
_INT64_END = 2 ** 63
_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed takes


def _short(value) -> str:
    """A value for an error message, cut short: it may come from a client."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top-k per prompt token (the first has none), as vLLM returns them
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        self._check_types()
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self._validate()

    def _check_types(self) -> None:
        """Integers are ints (numpy's too, converted), numbers finite in float32 (the sampler's
        dtype): what torch would refuse, or turn into inf/NaN, mid-step is refused here."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {_short(value)}")
            setattr(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or abs(value) > _FLOAT32_MAX:
                raise ValueError(f"{name} must be a finite number, got {_short(value)}")
            setattr(self, name, float(value))
        stop = self.stop if isinstance(self.stop, (list, tuple)) else [] if self.stop is None else [self.stop]
        if not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {_short(self.stop)}")
        ids = self.stop_token_ids or []
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < _INT64_END for t in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative token ids, got {_short(ids)}")
        self.stop_token_ids = [int(t) for t in ids]

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n}")
        if self.temperature < 0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < _INT64_END:
            fail(f"top_k must be -1 or 0 (all tokens) or a positive integer, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            fail(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            fail(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            fail(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if not -2 <= self.presence_penalty <= 2:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop_list):
            fail("stop strings must be non-empty")
        # Sequence i of a request draws from torch.Generator().manual_seed(seed + i).
        if self.seed is not None and not (_SEED_MIN <= self.seed and self.seed + self.n - 1 <= _SEED_MAX):
            fail(f"seed must be in [{_SEED_MIN}, {_SEED_MAX - self.n + 1}] (64-bit, n={self.n}), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
