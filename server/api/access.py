"""Bearer-key access: which memory policy a request runs under, and who is admin.

With `api_keys` configured, every `/v1` route needs `Authorization: Bearer KEY` with one of them
(or the admin key); each key carries its memory policy. Admin routes need the admin key and are
refused when none is configured. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from server.api.errors import APIError
from server.settings import KeyPolicy, Settings

_BEARER = {"WWW-Authenticate": "Bearer"}


class Access:
    def __init__(self, settings: Settings) -> None:
        self.keys = dict(settings.api_keys)
        self.admin = None if settings.admin_key is None else settings.admin_key.get_secret_value()

    def _is_admin(self, token: str | None) -> bool:
        return (
            token is not None
            and self.admin is not None
            and hmac.compare_digest(token.encode(), self.admin.encode())
        )

    def policy(self, token: str | None) -> KeyPolicy | None:
        """The caller's policy (None: unrestricted); 401 without a valid key when keys exist."""
        if self._is_admin(token) or not self.keys:
            return None
        if token is not None:
            for key, policy in self.keys.items():
                if hmac.compare_digest(token.encode(), key.encode()):
                    return policy
        raise APIError(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers=_BEARER,
        )

    def require_admin(self, token: str | None) -> None:
        if self.admin is None:
            raise APIError(
                403, "admin endpoints are disabled: no admin key is configured", code="no_admin"
            )
        if token is None:
            raise APIError(
                401,
                "the admin key is required: send 'Authorization: Bearer <admin key>'",
                code="invalid_api_key",
                headers=_BEARER,
            )
        if not self._is_admin(token):
            raise APIError(403, "this endpoint needs the admin key", code="admin_required")
