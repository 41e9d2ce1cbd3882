"""Bearer API-key check shared by the HTTP middleware and the gRPC interceptor."""

from __future__ import annotations

import hmac

from services.common.errors import ErrorCode, ServiceError

# Paths and gRPC services that stay open without a key (probes and scrapers carry none).
OPEN_HTTP_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Raise UNAUTHENTICATED / PERMISSION_DENIED unless ``authorization`` carries ``api_key``."""
    if api_key is None:
        return
    if not authorization:
        raise ServiceError(ErrorCode.UNAUTHENTICATED, "missing 'Authorization: Bearer <key>' header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ServiceError(ErrorCode.UNAUTHENTICATED, "expected 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ServiceError(ErrorCode.PERMISSION_DENIED, "API key not accepted")
