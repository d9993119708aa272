"""``console:`` in channels.yaml: the web console's OpenID Connect client (docs/console.md).

Only ``auth.mode: oidc`` reads it: the console signs users in with the authorization code flow and
PKCE (S256) at the provider of ``auth.issuer``, as the client ``oidc_client_id``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ConsoleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    oidc_client_id: str | None = Field(
        None,
        description="oidc mode: the console's client id at the provider (a client allowed the "
        "authorization_code grant, with <engine>/console/callback as a redirect URI); unset: no console sign-in",
    )
    oidc_client_secret: SecretStr | None = Field(
        None,
        description="oidc mode: the client's secret (client_secret_basic), or unset for a public client "
        "(PKCE alone); ${HMS_ACH_CONSOLE_OIDC_CLIENT_SECRET} keeps it out of the file",
    )
    oidc_scope: str = Field(
        "openid",
        description="oidc mode: the scope the console asks for; the access token must carry the console "
        "roles at auth.roles_claim",
    )
