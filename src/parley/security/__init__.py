"""Authentication of the parties that talk to parley (today: Azure Communication Services)."""

from parley.security.acs_auth import (
    ACS_ISSUER,
    ACS_JWKS_URL,
    AcsAuthConfig,
    AcsTokenValidator,
    AuthError,
    AuthFailure,
    Claims,
    JwksError,
    acs_auth_dependency,
    authenticate_request,
    build_acs_validator,
    check_websocket,
)

__all__ = [
    "ACS_ISSUER",
    "ACS_JWKS_URL",
    "AcsAuthConfig",
    "AcsTokenValidator",
    "AuthError",
    "AuthFailure",
    "Claims",
    "JwksError",
    "acs_auth_dependency",
    "authenticate_request",
    "build_acs_validator",
    "check_websocket",
]
