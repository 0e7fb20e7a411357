"""``/v1/pools``: the autoscaler's pools, for the operator.

Each route is one ``pools.*`` request to the control plane, as the operator (no tenant):
a gateway without API keys serves only loopback, where every caller is the operator; with
keys, only the tenants named in ``MNEMOS_GATEWAY_OPERATOR_TENANTS`` may call these.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from control_plane.gateway.deps import operator_client
from control_plane.gateway.http import (
    ERROR_RESPONSES,
    MsgspecResponse,
    json_response_doc,
    read_body,
    require_json,
    schema_ref,
)
from mnemos.client import Client
from mnemos.errors import ValidationFailed
from mnemos.messages import PoolList, PoolSpec, PoolView

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["pools"])

PoolName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,47}$", description="The pool's name")]
_VIEW = json_response_doc(PoolView, "The pool: settings, status, latest scaling decisions")


@router.get("/pools", summary="List pools", responses={200: json_response_doc(PoolList, "Every pool")},
            operation_id="listPools")
async def list_pools(client: Client = Depends(operator_client)) -> Response:
    return MsgspecResponse(PoolList(pools=await client.pools()))


@router.get("/pools/{name}", summary="Get a pool", responses={200: _VIEW}, operation_id="getPool")
async def get_pool(name: PoolName, client: Client = Depends(operator_client)) -> Response:
    return MsgspecResponse(await client.pool(name))


@router.put(
    "/pools/{name}", summary="Create or replace a pool", responses={200: _VIEW}, operation_id="setPool",
    description="The body is the pool's settings; its `name` must be the one in the path. The acting "
    "autoscaler follows within a tick.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema_ref(PoolSpec)}}}},
    dependencies=[Depends(require_json)],
)
async def set_pool(name: PoolName, request: Request, client: Client = Depends(operator_client)) -> Response:
    spec: PoolSpec = await read_body(request, PoolSpec)
    if spec.name != name:
        raise ValidationFailed(f"the body names pool {spec.name!r}, the path {name!r}", details={"path": "$.name"})
    return MsgspecResponse(await client.set_pool(spec))


@router.delete("/pools/{name}", summary="Remove a pool (its workers drain)", responses={200: _VIEW},
               operation_id="deletePool")
async def delete_pool(name: PoolName, client: Client = Depends(operator_client)) -> Response:
    return MsgspecResponse(await client.delete_pool(name))
