"""What the tensor-parallel tests share: a Ray instance per module, and prompts of every kind."""
from __future__ import annotations

import shutil

from tests.engine_support import CHATS, chat_token_ids
from tests.serve_utils import start_ray


def ray_for_module(tag: str, object_store_mb: int = 100):
    """A fixture body: Ray for one test module. Logical CPUs: each rank's bundle asks for one, and
    a module's offline engines may coexist."""
    import ray

    tmp = start_ray(tag, num_cpus=16, object_store_mb=object_store_mb)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def mixed_prompts(llm, tok) -> list:
    """Text, token ids, embeds (rows of `llm`'s input layer) and a segmented prompt."""
    ids = [chat_token_ids(tok, c) for c in CHATS]
    return ["The three primary colors are", {"prompt_token_ids": ids[0]},
            {"prompt_embeds": llm.get_input_embeddings(ids[1])},
            {"prompt_segments": [ids[2][:4], llm.get_input_embeddings(ids[2][4:12]), ids[2][12:]]}]
