"""``channels.yaml``: the engine's configuration, as typed models with file:line:col errors.

* ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment before validation.
* ``channels:`` entries pick their settings model by ``type:`` from the channel registry
  (:data:`hms_ach.channels.CHANNEL_TYPES`), so a new channel type needs no change here.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hms_ach.app.job_settings import JobsSettings
from hms_ach.auth.settings import AuthSettings
from hms_ach.channels import CHANNEL_TYPES
from hms_ach.console.settings import ConsoleSettings
from hms_ach.core.errors import ConfigError, ConfigErrors, SourcePosition
from hms_ach.core.timezones import IanaTimeZone
from hms_ach.core.tls import MllpTlsSettings, TlsConfigError, server_context
from hms_ach.fhir.export import ExportSettings
from hms_ach.mapping.loader import Positions, load_yaml, position_of
from hms_ach.store.audit_settings import AuditSettings
from hms_ach.workforce.settings import WorkforceSettings

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineSettings(_Strict):
    database_url: str | None = Field(
        None,
        description="Store URL (sqlite:///file.db or postgresql://...); HMS_ACH_DATABASE_URL wins over it; "
        "default sqlite:///hms_ach.db in the working directory",
    )
    mappings: str = Field("mappings", description="Directory of the mapping files, relative to channels.yaml")
    timezone: IanaTimeZone = Field(
        "UTC", description="IANA time zone assumed for HL7 times sent without a UTC offset"
    )
    watch: bool = Field(True, description="Reload channels.yaml and mappings when they change (hms-ach run)")
    commit_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest wait for the store to commit a message; past it the sender gets AE/CE "
        "(HTTP: 503) and may resend",
    )
    ready_probe_seconds: float = Field(
        2.0,
        gt=0,
        description="Deadline of the trivial transaction /health/ready commits through the writer",
    )
    store_unreachable_exit_seconds: float = Field(
        300.0,
        ge=0,
        description="hms-ach run exits non-zero when the store has failed every commit for this long "
        "(so that a supervisor restarts it); 0: never",
    )
    data_dir: str = Field(
        "data",
        description="Directory of the engine's own secrets and checkpoints (the local token signing key, "
        "the audit chain key, audit checkpoints), relative to channels.yaml; HMS_ACH_DATA_DIR wins over it; "
        "created on first start with mode 0700",
    )
    min_free_disk_mb: int = Field(
        64, ge=0, description="/health/ready fails when the SQLite database's disk has less free space"
    )
    wal_checkpoint_max_age_seconds: float = Field(
        300.0,
        ge=0,
        description="/health/ready fails when commits have waited this long for a SQLite WAL checkpoint "
        "that completes (a reader holding an old snapshot, checkpoints that keep failing: the WAL grows "
        "meanwhile); 0: no bound. The checkpoint thread not running fails it at once",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM or SIGINT, hms-ach run stops accepting, finishes the messages in flight and "
        "exits 0 within this time; past it it exits 1 and logs what was still running",
    )
    map_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Worker processes that parse and map inbound HL7 v2 messages (each loads the mappings); "
        "the engine process then only commits and answers. 0: parse and map in the engine process. Read at "
        "start: a change applies at the next start (a reload logs config.restart_needed)",
    )


class RateLimitSettings(_Strict):
    """``http.rate_limit``: a token bucket per client (see docs/security.md, HTTP hardening)."""

    enabled: bool = Field(
        True, description="Limit the request rate of each client; false: no limit (the benchmarks' engine)"
    )
    requests_per_second: float = Field(
        200.0,
        gt=0,
        description="Requests per second a client may make on average (its bucket refills at this rate); "
        "a client is the token's sub (its client_id when the token has one), else the source address",
    )
    burst: int = Field(
        400,
        ge=1,
        description="Requests a client may make at once after being idle (the size of its bucket); past it "
        "the answer is 429 with Retry-After",
    )
    max_clients: int = Field(
        10000,
        ge=1,
        description="Buckets kept at most; idle clients' full buckets are dropped first, then the least "
        "recently seen (a dropped client starts again with a full bucket)",
    )


class HttpTlsSettings(_Strict):
    cert: str = Field(
        "",
        description="PEM certificate (chain) served on the HTTP port, which then speaks HTTPS only "
        "(TLS 1.2 or later); relative to channels.yaml; HMS_ACH_TLS_CERT wins over it",
    )
    key: str = Field(
        "", description="PEM private key of cert (empty: inside the cert file); HMS_ACH_TLS_KEY wins over it"
    )


class HttpSettings(_Strict):
    enabled: bool = Field(True, description="Serve the HTTP API (FHIR R4 at /fhir, /health)")
    host: str = Field("0.0.0.0", description="Address the HTTP server binds to")
    port: int = Field(8080, ge=0, le=65535, description="TCP port of the HTTP server")
    access_log: bool = Field(
        True,
        description="Log one http.request event per request: method, route template (never the concrete "
        "ids), status, duration_ms, client address and the authenticated caller; never query values",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body on any route, counted while it streams in (Content-Length or "
        "chunked); larger ones are answered 413 (an OperationOutcome on /fhir, a problem on /api/v1) "
        "before the rest is read. A fhir_rest channel's own max_body_bytes may be lower, not higher",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values the server answers (names or addresses, port ignored; '*.example.org' "
        "for its subdomains; '*' for any); other requests get 400, against DNS rebinding. /health* is "
        "exempt (probes use the pod IP). Default (null): localhost, 127.0.0.1, ::1 and the bind host when "
        "it is a concrete address; add the public name the clients use",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins (scheme://host[:port]) allowed to call the API cross-origin, with "
        "preflight answered; empty: no Access-Control-* header is ever sent (cross-origin calls fail)",
    )
    rate_limit: RateLimitSettings = Field(
        default_factory=RateLimitSettings,
        description="Per-client token bucket: requests_per_second, burst; 429 with Retry-After past it",
    )
    hsts_max_age_seconds: int = Field(
        31536000,
        ge=0,
        description="Strict-Transport-Security max-age sent on answers served over HTTPS (never over plain "
        "HTTP); 0: no HSTS header",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(
                    f"{origin!r} is not an origin: expected scheme://host[:port] (no path, no trailing /), or *"
                )
        return origins

    def effective_allowed_hosts(self) -> list[str]:
        """``allowed_hosts``, or the default: the loopback names and addresses and the bind host when it
        is a concrete address (not 0.0.0.0 or ::)."""
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        hosts = ["localhost", "127.0.0.1", "::1"]
        bind = self.host.strip("[]").lower()
        if bind and bind not in ("0.0.0.0", "::", "*") and bind not in hosts:
            hosts.append(bind)
        return hosts

    tls: HttpTlsSettings = Field(
        default_factory=HttpTlsSettings,
        description="HTTPS: with a cert the HTTP port serves TLS 1.2+ only (docs/security.md, TLS)",
    )

    def tls_files(self) -> tuple[str, str] | None:
        """(cert, key) of HTTPS after the HMS_ACH_TLS_CERT / HMS_ACH_TLS_KEY overrides; None: plain HTTP."""
        cert = os.environ.get("HMS_ACH_TLS_CERT") or self.tls.cert
        key = os.environ.get("HMS_ACH_TLS_KEY") or self.tls.key
        return (cert, key) if cert else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTPS server context, or None for plain HTTP; TlsConfigError (one line naming the
        setting and the file) when a file is missing, unreadable or the key does not match."""
        files = self.tls_files()
        if files is None:
            if os.environ.get("HMS_ACH_TLS_KEY") or self.tls.key:
                raise TlsConfigError("http.tls.key is set without http.tls.cert (or HMS_ACH_TLS_CERT)")
            return None
        from_env = bool(os.environ.get("HMS_ACH_TLS_CERT") or os.environ.get("HMS_ACH_TLS_KEY"))
        try:
            return server_context(files[0], files[1] or None, what="http.tls")
        except TlsConfigError as exc:
            if not from_env:
                raise
            raise TlsConfigError(f"{exc.message} (HMS_ACH_TLS_CERT / HMS_ACH_TLS_KEY are set)") from exc


class LoggingSettings(_Strict):
    rate_limit_enabled: bool = Field(
        True,
        description="Rate-limit repeated identical warnings and errors (same logger, event and exception "
        "kind): the first rate_limit_burst lines per rate_limit_interval_seconds pass, then one "
        "log.suppressed line counts the rest",
    )
    rate_limit_burst: int = Field(
        10, ge=1, description="Identical warning/error lines let through per interval before suppressing"
    )
    rate_limit_interval_seconds: float = Field(
        60.0, gt=0, description="Length of the window in which rate_limit_burst identical lines pass"
    )


class Config(_Strict):
    engine: EngineSettings = Field(default_factory=EngineSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description="Who may call the HTTP API: local (the engine's own tokens, hms-ach token), oidc or off",
    )
    logging: LoggingSettings = Field(
        default_factory=LoggingSettings, description="Log output: rate limiting of repeated errors"
    )
    channels: list[Any] = Field(default_factory=list, description="Inbound channels")
    sinks: list[Any] = Field(
        default_factory=list, description="Outbound sinks fed by the outbox (webhook, rabbitmq, x12_837)"
    )
    jobs: JobsSettings = Field(
        default_factory=JobsSettings,
        description="Scheduled jobs: credential-expiry scan, housekeeping",
    )
    workforce: WorkforceSettings = Field(
        default_factory=WorkforceSettings,
        description="Workforce rules for shifts, swaps, timecards and overtime from every source "
        "(docs/workforce-rules.md)",
    )
    audit: AuditSettings = Field(
        default_factory=AuditSettings,
        description="The audit trail: its key, its checkpoint file, the values its diffs mask (docs/audit.md)",
    )
    bulk_export: ExportSettings = Field(
        default_factory=ExportSettings,
        description="Bulk Data $export: retention of the files, batch size, worker lease (docs/fhir-api.md)",
    )
    console: ConsoleSettings = Field(
        default_factory=ConsoleSettings,
        description="The web console at /console: its OpenID Connect client in oidc mode (docs/console.md)",
    )
    source: str = Field(default="", exclude=True, description="The file this was read from")

    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    @property
    def mappings_dir(self) -> Path:
        path = Path(self.engine.mappings)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def data_dir(self) -> Path:
        """The engine's data directory (``HMS_ACH_DATA_DIR`` or ``engine.data_dir``); not created here."""
        path = Path(os.environ.get("HMS_ACH_DATA_DIR") or self.engine.data_dir)
        return path if path.is_absolute() else self.base_dir / path


def tls_errors(config: Config) -> list[str]:
    """What would stop HTTPS or MLLP over TLS from starting (``hms-ach check`` and ``run``): one line
    per problem, naming the setting and the file (environment overrides applied)."""
    from hms_ach.channels.mllp import MllpChannelConfig, effective_config

    errors: list[str] = []
    if config.http.enabled:
        try:
            config.http.ssl_context()
        except TlsConfigError as exc:
            errors.append(f"{config.source or 'channels.yaml'}: {exc.render()}")
    for channel in config.channels:
        if not isinstance(channel, MllpChannelConfig) or not channel.enabled:
            continue
        tls = effective_config(channel).tls
        if tls is None:
            continue
        try:
            tls.context(f"channel {channel.name}: tls")
        except TlsConfigError as exc:
            errors.append(f"{config.source or 'channels.yaml'}: {exc.render()}")
    return errors


def interpolate(value: Any, file: Path, positions: Positions, at: tuple[Any, ...] = ()) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, file, positions, at + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, file, positions, at + (i,)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"environment variable {name} is not set",
            position_of(file, positions, at),
            f"{name} in the environment, or a default: ${{{name}:-value}}",
        )

    return _VAR.sub(replace, value)


def load_config(path: Path | str) -> Config:
    """Read and check ``channels.yaml``; raises ConfigErrors listing every problem found."""
    file = Path(path)
    if not file.exists():
        raise ConfigErrors(
            [
                ConfigError(
                    f"{file} does not exist", SourcePosition(str(file)), "a channels.yaml (see the README)"
                )
            ]
        )
    try:
        data, positions = load_yaml(file)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from exc
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigErrors(
            [
                ConfigError(
                    "channels.yaml must be a mapping",
                    SourcePosition(str(file), 1, 1),
                    "keys engine, http, channels",
                )
            ]
        )
    errors: list[ConfigError] = []
    try:
        data = interpolate(data, file, positions)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from exc
    try:
        config = Config.model_validate({**data, "channels": [], "sinks": []})
    except ValidationError as exc:
        errors.extend(_translate(exc, file, positions, (), Config))
        config = Config()
    config.source = str(file)
    from hms_ach.outbound import SINK_TYPES

    channels = _load_typed("channel", CHANNEL_TYPES, data.get("channels") or [], file, positions, errors)
    sinks = _load_typed("sink", SINK_TYPES, data.get("sinks") or [], file, positions, errors)
    errors.extend(_alert_sink_errors(config, sinks, file, positions))
    if errors:
        raise ConfigErrors(errors)
    config.channels = [_with_tls_paths_resolved(c, config.base_dir) for c in channels]
    config.sinks = [_with_sink_paths_resolved(s, config.base_dir) for s in sinks]
    config.http.tls = _resolved(config.http.tls, config.base_dir)
    return config


_TlsFiles = TypeVar("_TlsFiles", HttpTlsSettings, MllpTlsSettings)


def _resolved(tls: _TlsFiles, base: Path) -> _TlsFiles:
    """``tls`` with its relative file paths made relative to ``base`` (channels.yaml's directory)."""
    update = {
        name: str(base / value)
        for name in ("cert", "key", "client_ca")
        if isinstance(value := getattr(tls, name, ""), str) and value and not Path(value).is_absolute()
    }
    return tls.model_copy(update=update) if update else tls


def _with_tls_paths_resolved(channel: Any, base: Path) -> Any:
    tls = getattr(channel, "tls", None)
    if not isinstance(tls, MllpTlsSettings):
        return channel
    return channel.model_copy(update={"tls": _resolved(tls, base)})


def _load_typed(
    kind: str,
    registry: Any,
    raw_entries: list[Any],
    file: Path,
    positions: Positions,
    errors: list[ConfigError],
) -> list[Any]:
    """``channels:`` or ``sinks:`` entries: each one's settings model is picked by its ``type:`` from
    ``registry`` (CHANNEL_TYPES or SINK_TYPES); names must be unique within the list."""
    section = f"{kind}s"
    entries: list[Any] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_entries):
        at = (section, i)
        if not isinstance(raw, dict) or "type" not in raw:
            errors.append(
                ConfigError(
                    f"a {kind} needs a `type:`",
                    position_of(file, positions, at),
                    f"one of {', '.join(registry.names())}",
                )
            )
            continue
        try:
            cls = registry.load(str(raw["type"]))
        except KeyError as exc:
            errors.append(ConfigError(str(exc.args[0]), position_of(file, positions, at + ("type",))))
            continue
        try:
            settings = cls.Config.model_validate(raw)
        except ValidationError as exc:
            errors.extend(_translate(exc, file, positions, at, cls.Config))
            continue
        if settings.name in names:
            errors.append(
                ConfigError(
                    f"{kind} name {settings.name!r} is used twice",
                    position_of(file, positions, at + ("name",)),
                    f"unique {kind} names",
                )
            )
        names.add(settings.name)
        entries.append(settings)
    return entries


def _translate(
    exc: ValidationError, file: Path, positions: Positions, at: tuple[Any, ...], model: type[BaseModel]
) -> list[ConfigError]:
    out = []
    for err in exc.errors():
        loc = at + tuple(err["loc"])
        pos = position_of(file, positions, loc)
        if err["type"] == "extra_forbidden":
            owner: Any = model
            for part in err["loc"][:-1]:
                field = owner.model_fields.get(part) if isinstance(part, str) else None
                owner = field.annotation if field is not None else owner
            choices = list(getattr(owner, "model_fields", {}))
            hint = difflib.get_close_matches(str(err["loc"][-1]), choices, n=1)
            out.append(
                ConfigError(
                    f"unknown key {err['loc'][-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""),
                    pos,
                    f"one of {', '.join(choices)}" if choices else None,
                )
            )
        elif err["type"] == "iana_timezone":
            ctx = err.get("ctx") or {}
            out.append(
                ConfigError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}", pos, ctx.get("expected"))
            )
        elif err["type"] == "missing":
            out.append(ConfigError(f"missing required key {'.'.join(map(str, err['loc']))!r}", pos))
        else:
            out.append(ConfigError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}", pos))
    return out


def _with_sink_paths_resolved(sink: Any, base: Path) -> Any:
    """A notify sink's ``templates_dir`` and ``smtp_ca_file``, relative to channels.yaml's folder."""
    update = {
        name: str(base / value)
        for name in ("templates_dir", "smtp_ca_file")
        if isinstance(value := getattr(sink, name, None), str) and not Path(value).is_absolute()
    }
    return sink.model_copy(update=update) if update else sink


def _alert_sink_errors(
    config: Config, sinks: list[Any], file: Path, positions: Positions
) -> list[ConfigError]:
    """Alert rules whose ``sinks:`` name no notify sink of this file."""
    notify = sorted(s.name for s in sinks if getattr(s, "type", None) == "notify")
    rules = getattr(getattr(config.jobs, "alerts", None), "rules", None) or []
    return [
        ConfigError(
            f"alert rule {rule.name!r} names sink {name!r}, which is not a notify sink of this file",
            position_of(file, positions, ("jobs", "alerts", "rules", i, "sinks")),
            f"one of {notify}" if notify else "a sinks: entry with type: notify",
        )
        for i, rule in enumerate(rules)
        for name in rule.sinks
        if name not in notify
    ]
