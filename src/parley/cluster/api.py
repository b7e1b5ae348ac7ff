"""Endpoints of the cluster: hang up or transfer a call wherever it runs, and the cluster's figures.

| route | does |
|---|---|
| `POST /api/calls/{call_id}/hangup` | the call's instance ends it (closing line, then the hang-up) |
| `POST /api/calls/{call_id}/transfer` `{"target": ...}` | the call's instance asks ACS to transfer it |
| `GET /api/cluster` | this instance, the live instances and calls, Redis failures |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, params
from pydantic import BaseModel, ConfigDict

from parley.cluster.commands import CallNotOwned, CommandFailed
from parley.cluster.link import ClusterUnavailable
from parley.cluster.node import Cluster


class TransferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str


def cluster_router(cluster: Cluster, dependencies: Sequence[params.Depends] = ()) -> APIRouter:
    router = APIRouter(dependencies=list(dependencies))

    @router.post("/api/calls/{call_id}/hangup")
    async def hang_up(call_id: str) -> dict[str, Any]:
        instance = await _command(cluster.hang_up(call_id))
        return {"call_id": call_id, "instance": instance, "done": "hang_up"}

    @router.post("/api/calls/{call_id}/transfer")
    async def transfer(call_id: str, order: TransferRequest) -> dict[str, Any]:
        instance = await _command(cluster.transfer(call_id, order.target))
        return {"call_id": call_id, "instance": instance, "done": "transfer"}

    @router.get("/api/cluster")
    async def describe() -> dict[str, object]:
        return await cluster.describe()

    return router


async def _command(request: Any) -> str:
    """Await a routed command; its failures as HTTP statuses the caller can act on."""
    try:
        return str(await request)
    except CallNotOwned as exc:
        raise HTTPException(404, f"call_not_live: {exc}") from None
    except CommandFailed as exc:
        raise HTTPException(502, f"command_failed: {exc}") from None
    except ClusterUnavailable as exc:
        raise HTTPException(503, f"redis_unavailable: {exc}") from None
