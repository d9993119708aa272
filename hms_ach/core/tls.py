"""TLS for every listener and for ``hms-ach send``: contexts, certificate subjects, source allow-lists.

* :func:`server_context` / :func:`client_context` build ``ssl.SSLContext`` objects with TLS 1.2 as
  the floor and forward-secret AEAD cipher suites only (TLS 1.3 suites are OpenSSL's defaults, all
  AEAD). With a client CA the server context requires a client certificate (mutual TLS).
* :class:`CertSubject` is a peer certificate's subject as an RFC 4514 string and its common name;
  :func:`subject_allowed` matches it against an allow-list (an entry is a CN or a full RFC 4514 string).
* :class:`SourceAllowList` is a CIDR allow-list of source addresses (IPv4 and IPv6).

Errors about certificate and key files are :class:`TlsConfigError`: one line naming the setting and
the file, never the key material nor Python's exception text.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hms_ach.core.errors import ConfigError

#: The lowest protocol version any context of the engine accepts or offers.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
#: TLS 1.2 cipher suites: ephemeral key exchange (forward secrecy) and AEAD only, no anonymous,
#: null, RC4, 3DES, CBC or SHA-1 MAC suites. TLS 1.3 suites are set by OpenSSL (all AEAD).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"

#: The shipped default of every ``allow_from`` list: loopback only (IPv4 and IPv6).
LOOPBACK_ONLY = ("127.0.0.0/8", "::1/128")


class TlsConfigError(ConfigError):
    """A TLS setting cannot be used (a missing or unreadable file, a key that does not match)."""


def _readable(setting: str, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise TlsConfigError(f"{setting}: {path} does not exist or is not a file")
    try:
        with file.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise TlsConfigError(f"{setting}: {path} cannot be read ({exc.strerror})") from exc


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_TLS_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None, what: str) -> None:
    _readable(f"{what}.cert", cert)
    if key:
        _readable(f"{what}.key", key)
    try:
        context.load_cert_chain(cert, key or None)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{what}: cannot load certificate {cert} with key {key or '(in the certificate file)'}: "
            f"{exc.reason or 'not PEM, or the key does not match the certificate'}"
        ) from exc


def _load_ca(context: ssl.SSLContext, cafile: str, setting: str) -> None:
    _readable(setting, cafile)
    try:
        context.load_verify_locations(cafile=cafile)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{setting}: {cafile} holds no PEM CA certificate ({exc.reason})") from exc


def server_context(
    cert: str, key: str | None, client_ca: str | None = None, *, what: str = "tls"
) -> ssl.SSLContext:
    """A server context with our certificate; with ``client_ca``, client certificates signed by it
    are required (mutual TLS). ``what`` names the setting in errors (``http.tls``, ``channels[0].tls``)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, cert, key, what)
    if client_ca:
        _load_ca(context, client_ca, f"{what}.client_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    cafile: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name (against ``cafile``,
    or the system's CAs without it), optionally presenting a client certificate."""
    context = _harden(ssl.create_default_context())
    if cafile:
        _load_ca(context, cafile, "cacert")
    if cert:
        _load_chain(context, cert, key, "client certificate")
    return context


@dataclass(frozen=True, slots=True)
class CertSubject:
    """A certificate's subject: ``rfc4514`` (most specific first, ``CN=lab,O=Hospital,C=US``) and
    the common name (``lab``; None without one)."""

    rfc4514: str
    common_name: str | None

    def __str__(self) -> str:
        return self.rfc4514


def subject_of(der: bytes | None) -> CertSubject | None:
    """The subject of a DER certificate (what ``SSLObject.getpeercert(binary_form=True)`` returns);
    None without a certificate or when it cannot be parsed."""
    if not der:
        return None
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        name = x509.load_der_x509_certificate(der).subject
    except ValueError:
        return None
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return CertSubject(name.rfc4514_string(), cn if isinstance(cn, str) else None)


def _normalise_dn(text: str) -> str:
    return ",".join(part.strip() for part in text.split(",")).casefold()


def subject_allowed(subject: CertSubject | None, allowed: list[str]) -> bool:
    """True when ``allowed`` is empty, or when one entry equals the subject's CN (exactly) or its
    whole RFC 4514 string (attribute names and values compared without case, spaces around commas
    ignored). An entry holding ``=`` is a full subject, otherwise a CN."""
    if not allowed:
        return True
    if subject is None:
        return False
    full = _normalise_dn(subject.rfc4514)
    for entry in allowed:
        if "=" in entry:
            if _normalise_dn(entry) == full:
                return True
        elif subject.common_name is not None and entry == subject.common_name:
            return True
    return False


class SourceAllowList:
    """The source addresses a listener accepts, from CIDR strings (``10.1.0.0/16``, ``::1``,
    ``192.0.2.7``). An IPv4-mapped IPv6 source (``::ffff:10.1.2.3``) is matched as its IPv4 address."""

    def __init__(self, cidrs: list[str] | tuple[str, ...]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks)


def check_cidrs(values: list[str]) -> list[str]:
    """Validate a list of CIDR strings (for a pydantic validator): raises ValueError naming the bad one."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP network (expected CIDR like 10.0.0.0/8, 192.0.2.7 or fd00::/8)"
            ) from None
    return values


class MllpTlsSettings(BaseModel):
    """TLS on an MLLP listener (``tls:`` of an mllp channel)."""

    model_config = ConfigDict(extra="forbid")

    cert: str = Field(
        "",
        description="PEM certificate (chain) the listener presents, relative to channels.yaml; "
        "HMS_ACH_MLLP_TLS_CERT wins over it",
    )
    key: str = Field(
        "",
        description="PEM private key of cert (empty: inside the cert file); HMS_ACH_MLLP_TLS_KEY wins over it",
    )
    client_ca: str = Field(
        "",
        description="PEM CA certificate(s); when set, senders must present a certificate signed by one "
        "(mutual TLS); HMS_ACH_MLLP_TLS_CLIENT_CA wins over it",
    )
    allowed_subjects: list[str] = Field(
        default_factory=list,
        description="With client_ca: client certificate subjects allowed, each a CN (lab-analyzer) or a "
        "full RFC 4514 subject (CN=lab-analyzer,O=Hospital,C=US); empty: any certificate of client_ca",
    )
    handshake_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="A TLS handshake not finished within this long is closed"
    )

    @field_validator("allowed_subjects")
    @classmethod
    def _no_blank_subject(cls, value: list[str]) -> list[str]:
        if any(not s.strip() for s in value):
            raise ValueError("an allowed subject is empty")
        return value

    def context(self, what: str) -> ssl.SSLContext:
        """The server context of these settings; TlsConfigError when unusable."""
        if not self.cert:
            raise TlsConfigError(f"{what}.cert: a certificate file is required for TLS")
        if self.allowed_subjects and not self.client_ca:
            raise TlsConfigError(f"{what}.allowed_subjects needs {what}.client_ca (client certificates)")
        return server_context(self.cert, self.key or None, self.client_ca or None, what=what)


#: Environment variables that override the ``tls:`` of every mllp channel (field by field).
MLLP_TLS_ENVIRONMENT = {
    "cert": "HMS_ACH_MLLP_TLS_CERT",
    "key": "HMS_ACH_MLLP_TLS_KEY",
    "client_ca": "HMS_ACH_MLLP_TLS_CLIENT_CA",
}


def mllp_tls_with_environment(
    settings: MllpTlsSettings | None, environ: dict[str, str] | None = None
) -> MllpTlsSettings | None:
    """``settings`` with the HMS_ACH_MLLP_TLS_* variables applied: a set variable wins over the
    channel's value; HMS_ACH_MLLP_TLS_CERT alone turns TLS on for a channel without ``tls:``."""
    import os

    env = os.environ if environ is None else environ
    overrides = {field: env[var] for field, var in MLLP_TLS_ENVIRONMENT.items() if env.get(var)}
    if not overrides:
        return settings
    if settings is None and "cert" not in overrides:
        return None
    base = settings or MllpTlsSettings()
    return base.model_copy(update=overrides)
