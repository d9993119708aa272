"""The ``notify`` sink: messages to people (e-mail, or an SMS/push gateway over HTTP) for the events
that have a notification template (``kind: notification`` in mappings/notifications/).

For each outbox row the sink

1. looks up the template of the row's event (an event without one is delivered as "nothing to
   send", so ``events: ['*']`` is harmless); an ``alert.*`` payload that names ``sinks`` is sent only
   by the sinks it names;
2. resolves the template's ``recipients`` from the store (:mod:`hms_ach.store.recipient_queries`):
   the employee the payload names (``practitioner``), the managers of her department, qualified peers,
   the holders of a role (``role:<code>``, or ``notify_role``: the role the payload names in
   ``notifyRole``, e.g. a late case's supervisor), the case's ``requester`` (a complainant, on the
   channel they prefer), the sink's ``operators`` (for alerts) or fixed addresses. A recipient that
   cannot be resolved (no such Practitioner, no e-mail, no
   manager) is counted (``hms_ach_notify_unresolved_recipients_total``), logged without any address
   and written into the row's stored response, which ``hms-ach outbox`` shows; it never fails the row;
3. renders the template per recipient and sends it: ``channel: email`` over SMTP (STARTTLS or
   implicit TLS, AUTH with a password read from the environment) with aiosmtplib; ``channel: http``
   as a JSON POST built from ``body_template``.

A failed send is a failed attempt: the outbox retries it with backoff and dead-letters it after
``max_age_hours`` like every sink's rows. Delivery is at least once: a retry after a partial send
sends to every recipient again, with the same ``Message-ID`` / ``Idempotency-Key`` per recipient so
that receivers can drop the copy. Logs and stored responses carry counts and rule names, never an
address or a name.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal

import aiosmtplib
import httpx
import orjson
from pydantic import Field, SecretStr, model_validator

from hms_ach.core import metrics
from hms_ach.core.addresses import is_loopback_url
from hms_ach.mapping.spec import NotificationMapping
from hms_ach.outbound.notify_templates import (
    Notification,
    Rendered,
    RenderError,
    context,
    load_notifications,
    render,
)
from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings
from hms_ach.outbound.webhook import retry_after_seconds
from hms_ach.store import recipient_queries as rq
from hms_ach.store.db import Store
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.outbound.notify")

#: The JSON body of an ``http`` notification unless ``body_template`` says otherwise.
DEFAULT_BODY_TEMPLATE = (
    '{"to": {{ to | tojson }}, "subject": {{ subject | tojson }}, "text": {{ text | tojson }}}'
)
#: Payload keys that name the employee an event is about, first found wins.
EMPLOYEE_KEYS = ("practitioner", "employee")


@dataclass(frozen=True)
class Target:
    """One recipient: the address to use, the rule that found it, and the person (None: a fixed address)."""

    address: str
    rule: str
    person: rq.Person | None


class NotifySink:
    class Config(SinkSettings):
        channel: Literal["email", "http"] = Field(
            description="email: SMTP; http: a JSON POST to an SMS/push gateway"
        )
        templates_dir: str = Field(
            "mappings/notifications",
            description="Folder of the kind: notification templates (relative to channels.yaml's folder)",
        )
        manager_role_codes: list[str] = Field(
            default_factory=lambda: ["manager"],
            description="PractitionerRole.code codes that make a practitioner a manager of its Organization",
        )
        smtp_host: str = Field("127.0.0.1", description="email: the SMTP server")
        smtp_port: int = Field(587, ge=1, le=65535, description="email: its port (587 STARTTLS, 465 TLS)")
        smtp_security: Literal["starttls", "tls", "none"] = Field(
            "starttls",
            description="email: starttls (upgrade after EHLO), tls (implicit, port 465) or none (loopback only)",
        )
        smtp_username: str | None = Field(None, description="email: AUTH user name (none: no AUTH)")
        smtp_password: SecretStr | None = Field(
            None, description="email: AUTH password; use ${VAR} to read it from the environment"
        )
        smtp_ca_file: str | None = Field(
            None, description="email: a PEM CA bundle to trust for the server (default: the system's)"
        )
        from_address: str = Field("hms-ach@localhost", description="email: the From: address")
        url: str | None = Field(None, description="http: where each message is POSTed")
        headers: dict[str, str] = Field(default_factory=dict, description="http: extra request headers")
        body_template: str = Field(
            DEFAULT_BODY_TEMPLATE,
            description="http: Jinja2 template of the JSON body over to, subject, text, event and key",
        )
        operators: list[str] = Field(
            default_factory=list,
            description="Addresses of the `operators` recipient rule (alerts): e-mail addresses, or "
            "numbers for http; ${VAR} reads one from the environment",
        )
        contact_system: str = Field(
            "sms", description="http: the Practitioner.telecom system used as the address (sms, phone...)"
        )

        @model_validator(mode="after")
        def _channel_settings(self) -> NotifySink.Config:
            if self.channel == "http" and not self.url:
                raise ValueError("a notify sink with channel: http needs `url:`")
            if self.channel == "email" and self.smtp_security == "none" and self.smtp_username:
                if not is_loopback_url(f"smtp://{self.smtp_host}"):
                    raise ValueError(
                        "smtp_security: none would send the SMTP password in clear to a host that is not "
                        "this machine; use starttls or tls"
                    )
            if (self.smtp_username is None) != (self.smtp_password is None):
                raise ValueError("smtp_username and smtp_password go together (both or neither)")
            return self

    def __init__(self, settings: Config, store: Store):
        self.settings = settings
        self.store = store
        # a disabled sink (the shipped channels.yaml's) never reads its folder, which may not exist here
        self.templates: dict[str, Notification] = (
            load_notifications(Path(settings.templates_dir)) if settings.enabled else {}
        )
        self._client = (
            httpx.AsyncClient(timeout=settings.timeout_seconds, follow_redirects=False)
            if settings.channel == "http"
            else None
        )
        self._tls: ssl.SSLContext | None = None
        if settings.channel == "email" and settings.smtp_security != "none":
            self._tls = ssl.create_default_context(cafile=settings.smtp_ca_file)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ recipients (a store read, in a thread)
    def resolve(
        self, note: NotificationMapping, payload: dict[str, Any]
    ) -> tuple[rq.Person | None, list[Target], list[str]]:
        """(the employee, the recipients found, the rules that found nobody) for one event."""
        ref = next((str(payload[k]) for k in EMPLOYEE_KEYS if isinstance(payload.get(k), str)), None)
        system = "email" if self.settings.channel == "email" else self.settings.contact_system
        targets: list[Target] = []
        unresolved: list[str] = []
        with self.store.read() as conn:
            employee = rq.practitioner(conn, ref)
            for rule in note.recipients:
                if rule == "operators":
                    if not self.settings.operators:
                        unresolved.append("operators (the sink has no operators:)")
                    targets += [Target(a, rule, None) for a in self.settings.operators]
                    continue
                if rule == "requester":
                    found, missing = requester_target(conn, payload, system)
                    targets += found
                    unresolved += missing
                    continue
                if rule == "notify_role" or rule.startswith("role:"):
                    code = rule.removeprefix("role:") if rule != "notify_role" else payload.get("notifyRole")
                    people = rq.role_holders(conn, str(code)) if code else []
                elif rule not in ("employee", "managers", "peers"):
                    targets.append(Target(rule, "address", None))
                    continue
                elif employee is None:
                    unresolved.append(f"{rule} (no stored Practitioner in the event)")
                    continue
                elif rule == "employee":
                    people = [employee]
                elif rule == "managers":
                    people = rq.managers(conn, employee.reference, self.settings.manager_role_codes)
                else:
                    people = rq.peers(conn, employee.reference)
                if not people:
                    unresolved.append(f"{rule} (none found)")
                found = [Target(a, rule, p) for p in people if (a := p.contact(system))]
                if people and not found:
                    unresolved.append(f"{rule} (no {system} contact)")
                targets += [t for t in found if t.address not in {x.address for x in targets}]
        return employee, targets, unresolved

    # ------------------------------------------------------------------ delivery
    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        found = self.templates.get(delivery.event)
        if found is None:
            return DeliveryResult(response=f"no notification template for {delivery.event}")
        named = delivery.payload.get("sinks")
        if isinstance(named, list) and named and self.settings.name not in named:
            return DeliveryResult(response="not addressed to this sink (the alert rule names others)")
        employee, targets, unresolved = await asyncio.to_thread(self.resolve, found.model, delivery.payload)
        for what in unresolved:
            metrics.NOTIFY_UNRESOLVED.labels(self.settings.name, what.split(" ")[0]).inc()
            log.warning(
                "notify.recipient_unresolved",
                extra={"sink": self.settings.name, "event": delivery.event, "recipient": what},
            )
        messages: list[tuple[Target, Rendered]] = []
        for target in targets:
            recipient = {"name": target.person.name if target.person else "", "rule": target.rule}
            facts = context(
                delivery.event, delivery.payload, employee.facts() if employee else None, recipient
            )
            try:
                messages.append((target, render(found.model, facts)))
            except RenderError as exc:
                raise DeliveryError(f"template {found.path.name}: {exc}", permanent=True) from exc
        if messages:
            if self.settings.channel == "email":
                await self._send_mail(delivery, messages)
            else:
                await self._post(delivery, messages)
        rules = sorted({t.rule for t, _ in messages})
        summary = f"sent {len(messages)} ({', '.join(rules) or 'nobody'})"
        if unresolved:
            summary += "; unresolved: " + "; ".join(unresolved)
        log.info(
            "notify.sent",
            extra={"sink": self.settings.name, "event": delivery.event, "messages": len(messages)},
        )
        return DeliveryResult(response=summary)

    def _email(self, delivery: Delivery, index: int, target: Target, out: Rendered) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.settings.from_address
        msg["To"] = target.address
        msg["Subject"] = out.subject
        msg["Message-ID"] = f"<{delivery.idempotency_key}.{index}@hms-ach>"
        msg["Date"] = formatdate(usegmt=True)
        msg["X-HMS-ACH-Event"] = delivery.event
        msg.set_content(out.text)
        if out.html is not None:
            msg.add_alternative(out.html, subtype="html")
        return msg

    async def _send_mail(self, delivery: Delivery, messages: list[tuple[Target, Rendered]]) -> None:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            use_tls=s.smtp_security == "tls",
            start_tls=s.smtp_security == "starttls",
            tls_context=self._tls,
            timeout=s.timeout_seconds,
        )
        try:
            async with smtp:
                if s.smtp_username is not None and s.smtp_password is not None:
                    await smtp.login(s.smtp_username, s.smtp_password.get_secret_value())
                for i, (target, out) in enumerate(messages):
                    await smtp.send_message(self._email(delivery, i, target, out))
        except aiosmtplib.SMTPResponseException as exc:
            # the server's text may quote an address: only its code is kept
            what = f"SMTP {exc.code} from {s.smtp_host}:{s.smtp_port} ({type(exc).__name__})"
            raise DeliveryError(what, permanent=exc.code in (550, 551, 553, 554)) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"SMTP {s.smtp_host}:{s.smtp_port}: {type(exc).__name__}") from exc

    async def _post(self, delivery: Delivery, messages: list[tuple[Target, Rendered]]) -> None:
        assert self._client is not None and self.settings.url is not None  # checked by Config
        for i, (target, out) in enumerate(messages):
            key = f"{delivery.idempotency_key}.{i}"
            facts = {"to": target.address, "subject": out.subject, "text": out.text, "event": delivery.event}
            try:
                body = render_body(self.settings.body_template, {**facts, "key": key})
            except (RenderError, orjson.JSONDecodeError) as exc:
                raise DeliveryError(f"body_template: {type(exc).__name__}", permanent=True) from exc
            headers = {**self.settings.headers, "Content-Type": "application/json", "Idempotency-Key": key}
            try:
                response = await self._client.post(self.settings.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise DeliveryError(f"{type(exc).__name__} posting to the gateway") from exc
            if not 200 <= response.status_code < 300:
                raise DeliveryError(
                    f"HTTP {response.status_code} from the gateway",
                    retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                )


def requester_target(tx: Tx, payload: dict[str, Any], system: str) -> tuple[list[Target], list[str]]:
    """The ``requester`` rule: the case's requester the payload names (a complainant's RelatedPerson
    or Patient), at their contact of ``system``, unless they prefer another channel."""
    person = rq.requester(tx, payload.get("requester") if isinstance(payload.get("requester"), str) else None)
    if person is None:
        return [], ["requester (no stored RelatedPerson or Patient in the event)"]
    preferred = rq.preferred_system(person)
    address = person.contact(system)
    if address is None:
        return [], [f"requester (no {system} contact)"]
    if preferred is not None and preferred != system:
        return [], [f"requester (prefers {preferred})"]
    return [Target(address, "requester", person)], []


def render_body(template: str, facts: dict[str, Any]) -> bytes:
    """The JSON body of one http notification; raises if the template does not make JSON."""
    note = NotificationMapping(kind="notification", event="-", subject="-", text=template)
    text = render(note, facts).text
    return orjson.dumps(orjson.loads(text))
