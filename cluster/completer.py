"""`ray.get(client.submit(...))` that survives a replica's death.

A submitted request is not sent to a replica directly (the ObjectRef it returned would then die
with that replica) but to this process's Completer, a small async actor that sends it to a replica
and, when that replica is lost before the result is back, sends it again to another one. Nothing
was handed to the caller yet, so the request starts over: greedy and seeded results equal an
uninterrupted run's. Only a client error (a bad prompt: ValueError) or the loss of every replica
(or of `max_attempts` of them) reaches `ray.get`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from replicas.async_engine import EngineDeadError
from replicas.protocol import GenerateRequest
from router.routing import forget_request, live_replicas, note_replica_loss, replica_lost, retry_delay_s

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class Completer:
    def __init__(self, app_name: str, deployment: str) -> None:
        from ray import serve

        self.handle = serve.get_deployment_handle(deployment, app_name=app_name)

    async def complete(self, request: GenerateRequest, embeds: list, max_attempts: int = 4):
        """The finished RequestOutput. `embeds`: [] or [ObjectRef] (nested, so it stays a ref here
        and is resolved on the replica's node)."""
        arg = embeds[0] if embeds else None
        for attempt in range(1, max_attempts + 1):
            if attempt > 1 and live_replicas(self.handle) == 0:  # (a new process's router starts empty)
                raise RuntimeError("no live replica left to run the request")
            try:
                return await self.handle.complete.remote(request, arg)
            except (RayServeException, RayError, EngineDeadError) as e:
                if not replica_lost(e) or attempt == max_attempts:
                    raise
                note_replica_loss(self.handle, request.request_id, e)
                logger.warning("replica lost (%s); request %s sent again", type(e).__name__, request.request_id)
                await asyncio.sleep(retry_delay_s(attempt))
            finally:
                forget_request(self.handle, request.request_id)
        raise AssertionError("unreachable")


def start_completer(app_name: str, deployment: str) -> Any:
    return Completer.options(max_concurrency=100_000).remote(app_name, deployment)
