"""Shared pytest set-up: GPU tests skip cleanly without CUDA; every in-process engine a test
built has its KV accounting checked after each test."""
import functools
import weakref

import pytest
import torch

from tests.engine_support import check_engine_kv

_ENGINES: "weakref.WeakSet" = weakref.WeakSet()  # every engine still alive
_BUILT_IN_TEST: list = []  # engines the running test built: kept until its check, even if it dropped them


def pytest_configure(config):
    """Record every LLMEngine built in this process (a weak set: nothing is kept alive)."""
    try:
        from replicas.engine import LLMEngine
    except Exception:  # noqa: BLE001 - a broken engine module fails the engine tests, not collection
        return
    if getattr(LLMEngine.__init__, "_records_engines", False):
        return
    build = LLMEngine.__init__

    @functools.wraps(build)
    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        _ENGINES.add(self)
        _BUILT_IN_TEST.append(self)

    init._records_engines = True
    LLMEngine.__init__ = init


@pytest.fixture(autouse=True)
def kv_accounting_checked():
    """After each test: free + in use + cached-free blocks == total, ref counts == holders."""
    yield
    engines = list({id(e): e for e in [*_BUILT_IN_TEST, *_ENGINES]}.values())
    _BUILT_IN_TEST.clear()
    for engine in engines:
        try:
            check_engine_kv(engine)
        except AssertionError:
            _ENGINES.discard(engine)  # report it once, not again after every later test
            raise


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_llm():
    """The offline engine on the embedded default model (SmolLM2-135M-Instruct)."""
    from cluster import LLM

    return LLM(model=None, enable_prompt_embeds=True)


@pytest.fixture(scope="session")
def hf_embedded():
    """transformers' own model on the same weights, for parity checks."""
    from transformers import AutoModelForCausalLM

    from replicas.loader import embedded_model_dir

    return AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
