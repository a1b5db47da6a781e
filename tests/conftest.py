"""Shared pytest set-up: GPU tests skip cleanly without CUDA."""
import pytest
import torch


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
