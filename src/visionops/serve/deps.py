"""FastAPI dependencies: the app's service object and the admin bearer-token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from visionops.serve.inputs import ApiError
from visionops.serve.service import PredictionService

_bearer = HTTPBearer(auto_error=False, description="VISIONOPS_ADMIN_TOKEN")


def get_service(request: Request) -> PredictionService:
    """The :class:`PredictionService` that :func:`create_app` attached to this app."""
    service: PredictionService = request.app.state.service
    return service


ServiceDep = Annotated[PredictionService, Depends(get_service)]


def require_admin(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin routes need ``Authorization: Bearer <VISIONOPS_ADMIN_TOKEN>``.

    Without a configured token the admin routes are disabled (403) rather than open.
    """
    expected = service.settings.admin_token
    if not expected:
        raise ApiError(
            403, "admin_disabled", "admin endpoints are disabled: set VISIONOPS_ADMIN_TOKEN"
        )
    given = credentials.credentials if credentials is not None else ""
    # Constant-time comparison: response timing must not leak the token prefix.
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
