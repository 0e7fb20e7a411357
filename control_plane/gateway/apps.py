"""``/v1/apps`` and ``/v1/actors``: the deployed apps and the live actor activations.

Reading only (deploying is ``mnemos deploy``, which pushes source through the registry).
Each route is one request to the control plane for the caller's tenant.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from control_plane.gateway.deps import tenant_client
from control_plane.gateway.http import ERROR_RESPONSES, MsgspecResponse, json_response_doc
from mnemos.client import Client
from mnemos.messages import ActorList, AppList, AppRecord

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["apps"])

AppName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="The app's name")]


@router.get("/apps", summary="List deployed apps", responses={200: json_response_doc(AppList, "Every app")},
            operation_id="listApps")
async def list_apps(client: Client = Depends(tenant_client)) -> Response:
    return MsgspecResponse(AppList(apps=await client.apps()))


@router.get("/apps/{name}", summary="Get a deployed app (live version, definitions)",
            responses={200: json_response_doc(AppRecord, "The app")}, operation_id="getApp")
async def get_app(name: AppName, client: Client = Depends(tenant_client)) -> Response:
    return MsgspecResponse(await client.app(name))


@router.get("/actors", summary="List live actor activations (key, host, calls, last call)",
            responses={200: json_response_doc(ActorList, "The live activations")}, operation_id="listActors")
async def list_actors(
    app: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="Only this app's")] = None,
    client: Client = Depends(tenant_client),
) -> Response:
    return MsgspecResponse(ActorList(actors=await client.actors(app)))
