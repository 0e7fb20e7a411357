"""``/v1/tenants``: the tenants' quotas, for the operator.

Each route is one ``tenants.*`` request to the control plane, as the operator (no tenant),
with the same rule as ``/v1/pools``: a gateway without API keys serves only loopback,
where every caller is the operator; with keys, only the tenants named in
``MNEMOS_GATEWAY_OPERATOR_TENANTS`` may call these.
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
from mnemos.messages import TenantList, TenantQuota, TenantView
from mnemos.names import TENANT_RE

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["tenants"])

TenantPath = Annotated[str, Path(pattern=TENANT_RE.pattern, description="The tenant")]
_VIEW = json_response_doc(TenantView, "The tenant's quota and its use now")


@router.get("/tenants", summary="List tenants' quotas",
            responses={200: json_response_doc(TenantList, "Every tenant with a quota")}, operation_id="listTenants")
async def list_tenants(client: Client = Depends(operator_client)) -> Response:
    return MsgspecResponse(TenantList(tenants=await client.tenant_quotas()))


@router.get("/tenants/{tenant}", summary="Get a tenant's quota", responses={200: _VIEW}, operation_id="getTenant")
async def get_tenant(tenant: TenantPath, client: Client = Depends(operator_client)) -> Response:
    return MsgspecResponse(await client.tenant_quota(tenant))


@router.put(
    "/tenants/{tenant}", summary="Set a tenant's quota", responses={200: _VIEW}, operation_id="setTenant",
    description="The body is the quota; its `tenant` must be the one in the path. Every control plane "
    "applies it to the tenant's next submission.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema_ref(TenantQuota)}}}},
    dependencies=[Depends(require_json)],
)
async def set_tenant(tenant: TenantPath, request: Request, client: Client = Depends(operator_client)) -> Response:
    quota: TenantQuota = await read_body(request, TenantQuota)
    if quota.tenant != tenant:
        raise ValidationFailed(f"the body names tenant {quota.tenant!r}, the path {tenant!r}",
                               details={"path": "$.tenant"})
    return MsgspecResponse(await client.set_tenant_quota(quota))


@router.delete("/tenants/{tenant}", summary="Remove a tenant's quota", responses={200: _VIEW},
               operation_id="deleteTenant")
async def delete_tenant(tenant: TenantPath, client: Client = Depends(operator_client)) -> Response:
    return MsgspecResponse(await client.delete_tenant_quota(tenant))
