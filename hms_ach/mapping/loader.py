"""Load ``mappings/**/*.yaml`` into a checked :class:`MappingSet`, or say exactly what is wrong.

Every problem becomes a ConfigError ``file:line:col: what (expected ...)``: YAML syntax, unknown
keys (with "did you mean"), wrong types, bad HL7 paths, unknown functions, tables and mappings,
unknown parameters, and loops in the ``use:``/``record:`` layering. All errors of all files are
collected, so one ``hms-ach check`` run lists them all.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from hms_ach.core.errors import ConfigError, ConfigErrors, SourcePosition
from hms_ach.core.records import RECORD_TYPES
from hms_ach.mapping import spec
from hms_ach.mapping.functions import FUNCTIONS
from hms_ach.mapping.paths import PathSyntaxError, compile_source

Positions = dict[tuple[Any, ...], tuple[int, int]]


#: Parsed files by the SHA-256 of their text: a reload, ``hms-ach check`` after ``run`` in one
#: process, or the next engine of a test run parses only the files that changed (ruamel's round-trip
#: parser takes about 10 ms a mapping file, most of a reload). Bounded; the oldest go first.
_PARSED: OrderedDict[bytes, tuple[Any, Positions]] = OrderedDict()
_PARSED_MAX = 1024
_parsed_lock = threading.Lock()


def load_yaml(path: Path, text: str | None = None) -> tuple[Any, Positions]:
    """Parse one YAML file; return plain data and the 1-based (line, col) of every key and item.
    The same text is parsed once per process (the result is copied for each caller)."""
    try:
        content = text if text is not None else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", SourcePosition(str(path))) from exc
    key = hashlib.sha256(content.encode("utf-8")).digest()
    with _parsed_lock:
        hit = _PARSED.get(key)
        if hit is not None:
            _PARSED.move_to_end(key)
    if hit is not None:
        return copy.deepcopy(hit[0]), dict(hit[1])
    data, positions = _parse_yaml(path, content)
    with _parsed_lock:
        _PARSED[key] = (copy.deepcopy(data), dict(positions))
        while len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    return data, positions


def _parse_yaml(path: Path, content: str) -> tuple[Any, Positions]:
    yaml = YAML(typ="rt")
    try:
        data = yaml.load(content)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = SourcePosition(str(path), mark.line + 1, mark.column + 1) if mark else SourcePosition(str(path))
        raise ConfigError(
            f"YAML syntax error: {exc.problem or exc.context}",
            pos,
            "valid YAML (check indentation, colons and quotes)",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", SourcePosition(str(path))) from exc
    positions: Positions = {}
    return _plain(data, (), positions), positions


def _plain(node: Any, at: tuple[Any, ...], positions: Positions) -> Any:
    if isinstance(node, CommentedMap):
        out = {}
        for key in node:
            line, col = node.lc.key(key)
            positions[at + (key,)] = (line + 1, col + 1)
            out[str(key)] = _plain(node[key], at + (str(key),), positions)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, item in enumerate(node):
            line, col = node.lc.item(i)
            positions[at + (i,)] = (line + 1, col + 1)
            items.append(_plain(item, at + (i,), positions))
        return items
    return node


def position_of(file: Path, positions: Positions, loc: tuple[Any, ...]) -> SourcePosition:
    """The position of the deepest known node on ``loc``."""
    loc = tuple(loc)
    while loc:
        if loc in positions:
            line, col = positions[loc]
            return SourcePosition(str(file), line, col)
        loc = loc[:-1]
    return SourcePosition(str(file), 1, 1)


def _fields_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """Walk the schema along ``loc`` to find which model an unknown key was found in."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if part not in fields:
            return model
        ann = fields[part].annotation
        model = _first_model(ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def validate_file(path: Path, data: Any, positions: Positions) -> BaseModel:
    if not isinstance(data, dict):
        raise ConfigErrors(
            [
                ConfigError(
                    "a mapping file must be a YAML mapping with a `kind:` key",
                    SourcePosition(str(path), 1, 1),
                    f"kind: one of {sorted(spec.KINDS)}",
                )
            ]
        )
    kind = data.get("kind")
    model = spec.KINDS.get(str(kind))
    if model is None:
        hint = difflib.get_close_matches(str(kind), spec.KINDS, n=1)
        raise ConfigErrors(
            [
                ConfigError(
                    f"unknown kind {kind!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""),
                    position_of(path, positions, ("kind",)),
                    f"one of {sorted(spec.KINDS)}",
                )
            ]
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        raw_errors = exc.errors()
        for err in raw_errors:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            pos = position_of(path, positions, loc)
            where = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                owner = _model_at(loc[:-1], model)
                choices = _fields_of(owner) if owner else []
                hint = difflib.get_close_matches(str(loc[-1]), choices, n=1)
                errors.append(
                    ConfigError(
                        f"unknown key {loc[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""),
                        pos,
                        f"one of {', '.join(choices)}" if choices else None,
                    )
                )
            elif err["type"] == "missing":
                if _misspelt(loc, raw_errors):
                    continue  # reported once, as the unknown key with "did you mean"
                errors.append(ConfigError(f"missing required key {where!r}", pos))
            else:
                errors.append(ConfigError(f"{where}: {err['msg']}", pos))
        raise ConfigErrors(errors) from exc


def _misspelt(loc: tuple[Any, ...], errors: list[Any]) -> bool:
    """Whether the missing key at ``loc`` was given under a misspelt name beside it."""
    return any(
        e["type"] == "extra_forbidden"
        and tuple(e["loc"][:-1]) == loc[:-1]
        and difflib.get_close_matches(str(e["loc"][-1]), [str(loc[-1])], n=1)
        for e in errors
    )


@dataclass
class LoadedFile:
    path: Path
    model: Any
    positions: Positions

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", None) or self.path.stem)


@dataclass
class MappingSet:
    """All mapping files of one directory, checked and linked."""

    root: Path
    messages: dict[str, LoadedFile] = field(default_factory=dict)
    resources: dict[str, LoadedFile] = field(default_factory=dict)
    datatypes: dict[str, LoadedFile] = field(default_factory=dict)
    tables: dict[str, LoadedFile] = field(default_factory=dict)
    events: dict[str, LoadedFile] = field(default_factory=dict)
    transforms: dict[str, LoadedFile] = field(default_factory=dict)
    notifications: dict[str, LoadedFile] = field(default_factory=dict)
    workflows: dict[str, LoadedFile] = field(default_factory=dict)
    #: The forms the workflows name (forms/<id>.json; hms_ach/mapping/form_files.py), by id.
    forms: dict[str, LoadedFile] = field(default_factory=dict)
    _by_event: dict[str, LoadedFile] = field(default_factory=dict)
    _by_type: dict[tuple[str, str], LoadedFile] = field(default_factory=dict)
    _by_input: dict[tuple[str, str], LoadedFile] = field(default_factory=dict)

    def message_mapping(self, message_code: str, event: str) -> LoadedFile | None:
        return self._by_type.get((message_code, event)) or self._by_type.get((message_code, "*"))

    def input_mapping(self, kind: str, name: str) -> LoadedFile | None:
        """The message mapping for a CSV dataset (kind csv) or a FHIR resourceType (kind fhir)."""
        return self._by_input.get((kind, name))

    def event_mapping(self, event: str) -> LoadedFile | None:
        """The payload mapping of an outbound event (``encounter.admitted``), if there is one."""
        return self._by_event.get(event)

    def supported_message_codes(self) -> set[str]:
        return {code for code, _ in self._by_type}

    def inputs(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._by_input if k == kind)

    def files(self) -> list[LoadedFile]:
        return [
            *self.messages.values(),
            *self.resources.values(),
            *self.datatypes.values(),
            *self.tables.values(),
            *self.events.values(),
            *self.transforms.values(),
            *self.notifications.values(),
            *self.workflows.values(),
        ]


def _input_of(f: LoadedFile) -> str:
    model = f.model
    if isinstance(model, spec.MessageMapping):
        return model.match.input
    return str(getattr(model, "input", "hl7v2"))


def load_mappings(root: Path | str) -> MappingSet:
    """Load and check every ``*.yaml`` under ``root`` (``*_test.yaml`` golden files excluded)."""
    root = Path(root)
    mset = MappingSet(root)
    errors: list[ConfigError] = []
    if not root.is_dir():
        raise ConfigErrors(
            [ConfigError(f"mapping directory {str(root)!r} does not exist", SourcePosition(str(root)))]
        )
    buckets = {
        "message": mset.messages,
        "resource": mset.resources,
        "datatype": mset.datatypes,
        "table": mset.tables,
        "event": mset.events,
        "hl7": mset.transforms,
        "notification": mset.notifications,
        "workflow": mset.workflows,
    }
    for path in sorted(root.rglob("*.yaml")):
        if path.name.endswith("_test.yaml"):
            continue
        try:
            data, positions = load_yaml(path)
            model = validate_file(path, data, positions)
        except ConfigError as exc:
            errors.append(exc)
            continue
        except ConfigErrors as exc:
            errors.extend(exc.errors)
            continue
        loaded = LoadedFile(path, model, positions)
        bucket = buckets[model.kind]  # type: ignore[attr-defined]
        if loaded.name in bucket:
            errors.append(
                ConfigError(
                    f"{model.kind} mapping name {loaded.name!r} is already used by "  # type: ignore[attr-defined]
                    f"{bucket[loaded.name].path}",
                    position_of(path, positions, ("kind",)),
                    "a unique name (set `name:` or rename the file)",
                )
            )
            continue
        bucket[loaded.name] = loaded
    from hms_ach.mapping.form_files import form_paths, load_form

    for path in form_paths(root):
        form, problems = load_form(path)
        errors.extend(problems)
        if form is not None and not problems:
            mset.forms[path.stem] = form
    if not errors:
        errors.extend(_Linker(mset).link())
    if not errors:  # the R4 / HL7 v2.5 structure check (mapping/structure_check.py)
        from hms_ach.mapping.structure_check import check_mapping_set

        errors.extend(check_mapping_set(mset))
    if errors:
        raise ConfigErrors(errors)
    return mset


class _Linker:
    """Cross-file checks: names exist, paths compile, parameters are declared, no layering loops."""

    def __init__(self, mset: MappingSet):
        self.mset = mset
        self.errors: list[ConfigError] = []

    def link(self) -> list[ConfigError]:
        for f in self.mset.messages.values():
            self._message(f)
        for f in self.mset.resources.values():
            if f.model.resource not in RECORD_TYPES:
                self._err(
                    f,
                    ("resource",),
                    f"unknown record type {f.model.resource!r}",
                    f"one of {', '.join(RECORD_TYPES)}",
                    f.model.resource,
                    list(RECORD_TYPES),
                )
            key, kloc = f.model.key, tuple[Any, ...](("key",))
            while key is not None:
                for part in ("system", "value"):
                    self._value(f, getattr(key, part), kloc + (part,), f.model.context, set(f.model.params))
                key, kloc = key.fallback, kloc + ("fallback",)
            self._rules(f, f.model.rules, ("rules",), f.model.context, set(f.model.params))
        for f in self.mset.datatypes.values():
            self._rules(f, f.model.rules, ("rules",), f.model.datatype, set())
        for f in self.mset.events.values():
            self._event(f)
        for f in self.mset.workflows.values():
            self._workflow(f)
        generated: dict[str, str] = {}
        for f in self.mset.transforms.values():
            from hms_ach.mapping.hl7_transform import problems

            for loc, msg, expected in problems(f.model, set(self.mset.tables)):
                self._err(f, loc, msg, expected)
            for j, event in enumerate(f.model.generate.events if f.model.generate else []):
                if event in generated:
                    msg = f"event {event!r} is also generated by {generated[event]!r}"
                    self._err(f, ("generate", "events", j), msg, "one generate file per event")
                generated.setdefault(event, f.name)
        self._loops()
        return self.errors

    def _err(
        self,
        f: LoadedFile,
        loc: tuple[Any, ...],
        msg: str,
        expected: str | None = None,
        found: str | None = None,
        choices: list[str] | None = None,
    ) -> None:
        if found is not None and choices:
            hint = difflib.get_close_matches(found, choices, n=1)
            if hint:
                msg += f"; did you mean {hint[0]!r}?"
        self.errors.append(ConfigError(msg, position_of(f.path, f.positions, loc), expected))

    def _path(self, f: LoadedFile, text: str, loc: tuple[Any, ...], datatype: str | None) -> None:
        try:
            compile_source(text, _input_of(f), datatype)
        except PathSyntaxError as exc:
            self._err(f, loc, str(exc))

    def _message(self, f: LoadedFile) -> None:
        m = f.model
        given = [k for k in ("message", "csv", "resource") if getattr(m.match, k)]
        if len(given) != 1:
            self._err(
                f,
                ("match",),
                f"match needs exactly one of message, csv or resource (found {given or 'none'})",
                "message: ADT (HL7 v2), csv: staff_roster (CSV rows) or resource: Practitioner (FHIR)",
            )
            return
        if m.match.input != "hl7v2":
            name = m.match.csv or m.match.resource
            other = self.mset._by_input.get((m.match.input, name))
            if other is not None:
                self._err(f, ("match",), f"{m.match.input} {name} is already handled by {other.path}")
            self.mset._by_input[(m.match.input, name)] = f
        for i, entry in enumerate(m.records):
            target = self.mset.resources.get(entry.record)
            if target is not None and target.model.input != m.match.input:
                self._err(
                    f,
                    ("records", i, "record"),
                    f"{entry.record} reads {target.model.input} input, "
                    f"but this mapping handles {m.match.input}",
                    f"a resource mapping with input: {m.match.input}",
                )
        events = m.match.events or ["*"]
        for ev in events if m.match.input == "hl7v2" else []:
            other = self.mset._by_type.get((m.match.message, ev))
            if other is not None:
                self._err(
                    f,
                    ("match",),
                    f"{m.match.message}^{ev} is already handled by {other.path}",
                    "each message type and event in one message mapping",
                )
            self.mset._by_type[(m.match.message, ev)] = f
        for i, entry in enumerate(m.records):
            loc = ("records", i)
            target = self.mset.resources.get(entry.record)
            if target is None:
                self._err(
                    f,
                    loc + ("record",),
                    f"unknown resource mapping {entry.record!r}",
                    "a name from mappings/resources",
                    entry.record,
                    list(self.mset.resources),
                )
            else:
                self._with(f, entry.with_, target, loc + ("with",))
            for key in ("context", "for_each"):
                if getattr(entry, key):
                    self._path(f, getattr(entry, key), loc + (key,), None)
            self._conditions(f, entry.when, loc + ("when",), None, set())
        aliases = {e.as_ for e in m.records if e.as_}
        for i, action in enumerate(m.actions):
            for k, alias in action.args.items():
                if alias.lstrip("@") not in aliases:
                    self._err(
                        f,
                        ("actions", i, "args", k),
                        f"unknown alias {alias!r}",
                        "an `as:` name of this mapping's records",
                        alias,
                        sorted(aliases),
                    )

    def _workflow(self, f: LoadedFile) -> None:
        """A workflow's states are unique, and its initial state, transitions and escalation targets
        name declared states; no transition leaves a final state."""
        m = f.model
        names: dict[str, int] = {}
        for i, state in enumerate(m.states):
            if state.name in names:
                self._err(f, ("states", i, "name"), f"state {state.name!r} is declared twice", "unique names")
            names.setdefault(state.name, i)
        choices = list(names)
        expected = f"one of the states {', '.join(choices)}"
        if m.initial not in names:
            self._err(f, ("initial",), f"unknown state {m.initial!r}", expected, m.initial, choices)
        for i, state in enumerate(m.states):
            if state.sla is not None and state.sla.escalate_to not in names:
                self._err(
                    f,
                    ("states", i, "sla", "escalate_to"),
                    f"unknown state {state.sla.escalate_to!r}",
                    expected,
                    state.sla.escalate_to,
                    choices,
                )
        if m.form not in self.mset.forms:
            forms = sorted(self.mset.forms)
            self._err(
                f,
                ("form",),
                f"unknown form {m.form!r}",
                f"the id of a form file in {f.path.parent / 'forms'}: {', '.join(forms) or 'none'}",
                m.form,
                forms,
            )
        seen: set[tuple[str, str]] = set()
        for i, move in enumerate(m.transitions):
            for part, value in (("from", move.from_state), ("to", move.to)):
                if value not in names:
                    self._err(
                        f, ("transitions", i, part), f"unknown state {value!r}", expected, value, choices
                    )
            if move.from_state in names and m.states[names[move.from_state]].final:
                self._err(
                    f,
                    ("transitions", i, "from"),
                    f"state {move.from_state!r} is final: no transition may leave it",
                    "a state without final: true",
                )
            if (move.from_state, move.to) in seen:
                self._err(
                    f, ("transitions", i), f"transition {move.from_state} -> {move.to} is declared twice"
                )
            seen.add((move.from_state, move.to))
        for i, state in enumerate(m.states):  # a late case must be able to make its escalation move
            target = state.sla.escalate_to if state.sla is not None else None
            if target in names and (state.name, target) not in seen:
                self._err(
                    f,
                    ("states", i, "sla", "escalate_to"),
                    f"a late {state.name!r} case escalates to {target!r}, but no transition"
                    f" {state.name} -> {target} is declared",
                    f"a transition {{from: {state.name}, to: {target}, roles: [...]}}",
                )
        for part in ("on_findings", "on_violation"):
            value = getattr(m, part)
            if value is not None and value not in names:
                self._err(f, (part,), f"unknown state {value!r}", expected, value, choices)
        from hms_ach.mapping.hl7_transform import compile_fhirpath  # it imports the loader's spec

        ids: set[str] = set()
        for i, policy in enumerate(m.policies):
            if policy.id in ids:
                self._err(f, ("policies", i, "id"), f"policy {policy.id!r} is declared twice", "unique ids")
            ids.add(policy.id)
            try:
                compile_fhirpath(policy.expression)
            except ValueError as exc:
                self._err(
                    f,
                    ("policies", i, "expression"),
                    f"the FHIRPath does not compile: {exc}",
                    "a FHIRPath expression over the QuestionnaireResponse",
                )
        if m.policies and (m.on_findings is None or m.on_violation is None):
            self._err(
                f,
                ("policies",),
                "policies need on_findings and on_violation",
                "the states a case moves to when its findings pass and when they break an error rule",
            )

    def _event(self, f: LoadedFile) -> None:
        m: spec.EventMapping = f.model
        other = self.mset._by_event.get(m.event)
        if other is not None:
            self._err(
                f, ("event",), f"event {m.event} is already mapped by {other.path}", "one mapping per event"
            )
        self.mset._by_event[m.event] = f
        for i, rule in enumerate(m.rules):
            for key in ("use", "record", "ref"):
                if getattr(rule, key) is not None:
                    self._err(
                        f,
                        ("rules", i, key),
                        f"`{key}:` makes or reads records; an event payload cannot",
                        "source, sources, value, function, table or nested rules",
                    )
        self._rules(f, m.rules, ("rules",), None, set())

    def _with(self, f: LoadedFile, given: dict[str, Any], target: LoadedFile, loc: tuple[Any, ...]) -> None:
        for name in given:
            if name not in target.model.params:
                self._err(
                    f,
                    loc + (name,),
                    f"{target.name} has no parameter {name!r}",
                    f"one of {sorted(target.model.params) or 'none'}",
                    name,
                    list(target.model.params),
                )

    def _conditions(
        self, f: LoadedFile, when: Any, loc: tuple[Any, ...], datatype: str | None, params: set[str]
    ) -> None:
        if when is None:
            return
        items = when if isinstance(when, list) else [when]
        for i, cond in enumerate(items):
            cloc = loc + ((i,) if isinstance(when, list) else ())
            if (cond.source is None) == (cond.param is None):
                self._err(f, cloc, "a condition needs exactly one of `source` or `param`")
            if cond.source:
                self._path(f, cond.source, cloc + ("source",), datatype)
            if cond.param and cond.param not in params:
                self._err(
                    f,
                    cloc + ("param",),
                    f"unknown parameter {cond.param!r}",
                    f"one of {sorted(params) or 'none (declare it under params:)'}",
                    cond.param,
                    sorted(params),
                )

    def _value(
        self,
        f: LoadedFile,
        v: spec.ValueSpec,
        loc: tuple[Any, ...],
        datatype: str | None,
        params: set[str],
        extra_given: int = 0,
    ) -> None:
        given = [k for k in ("source", "sources", "param") if getattr(v, k) is not None]
        if "value" in v.model_fields_set:
            given.append("value")
        if len(given) + extra_given > 1:
            self._err(
                f,
                loc,
                f"give only one of {', '.join(given)}" + (" and use/record/ref/rules" if extra_given else ""),
            )
        sources = v.source if isinstance(v.source, list) else ([v.source] if v.source else [])
        for i, s in enumerate(sources + list(v.sources or [])):
            self._path(f, s, loc + ("source" if i < len(sources) else "sources",), datatype)
        if v.param and v.param not in params:
            self._err(
                f,
                loc + ("param",),
                f"unknown parameter {v.param!r}",
                f"one of {sorted(params) or 'none (declare it under params:)'}",
                v.param,
                sorted(params),
            )
        if v.function and v.function not in FUNCTIONS:
            self._err(
                f,
                loc + ("function",),
                f"unknown function {v.function!r}",
                f"one of {', '.join(sorted(FUNCTIONS))}",
                v.function,
                list(FUNCTIONS),
            )
        elif v.function:
            allowed = set(FUNCTIONS[v.function].args)
            for arg in v.args:
                if arg not in allowed:
                    self._err(
                        f,
                        loc + ("args", arg),
                        f"function {v.function} has no argument {arg!r}",
                        f"one of {sorted(allowed) or 'none'}",
                        arg,
                        sorted(allowed),
                    )
        if v.table and v.table not in self.mset.tables:
            self._err(
                f,
                loc + ("table",),
                f"unknown table {v.table!r}",
                "a name from mappings/tables",
                v.table,
                list(self.mset.tables),
            )

    def _rules(
        self,
        f: LoadedFile,
        rules: list[spec.Rule],
        loc: tuple[Any, ...],
        datatype: str | None,
        params: set[str],
    ) -> None:
        for i, rule in enumerate(rules):
            rloc = loc + (i,)
            builders = [k for k in ("use", "record", "ref", "rules") if getattr(rule, k) is not None]
            if len(builders) > 1:
                self._err(f, rloc, f"give only one of {', '.join(builders)}")
            producers = [k for k in ("value", "param", "ref") if k in rule.model_fields_set]
            if builders and producers and "ref" not in producers:
                self._err(f, rloc, f"{builders[0]} builds the value itself: remove {producers[0]}")
            self._value(f, rule, rloc, "*" if rule.for_each else datatype, params)
            if rule.for_each:
                self._path(f, rule.for_each, rloc + ("for_each",), datatype)
                if not rule.target.endswith("[]"):
                    self._err(
                        f,
                        rloc + ("target",),
                        f"target {rule.target!r} gets one value per repetition",
                        f"a list target ending in [] such as {rule.target}[]",
                    )
            self._conditions(f, rule.when, rloc + ("when",), datatype, params)
            inner = datatype
            if rule.use is not None:
                dt = self.mset.datatypes.get(rule.use)
                if dt is None:
                    self._err(
                        f,
                        rloc + ("use",),
                        f"unknown datatype mapping {rule.use!r}",
                        "a name from mappings/datatypes",
                        rule.use,
                        list(self.mset.datatypes),
                    )
            if rule.record is not None:
                res = self.mset.resources.get(rule.record)
                if res is None:
                    self._err(
                        f,
                        rloc + ("record",),
                        f"unknown resource mapping {rule.record!r}",
                        "a name from mappings/resources",
                        rule.record,
                        list(self.mset.resources),
                    )
                else:
                    self._with(f, rule.with_, res, rloc + ("with",))
                    for k, v in rule.with_.items():
                        if isinstance(v, dict) and set(v) == {"param"} and v["param"] not in params:
                            self._err(
                                f,
                                rloc + ("with", k),
                                f"unknown parameter {v['param']!r}",
                                f"one of {sorted(params) or 'none'}",
                                str(v["param"]),
                                sorted(params),
                            )
            if rule.rules is not None:
                if rule.for_each or rule.source:
                    inner = "*"
                self._rules(f, rule.rules, rloc + ("rules",), inner, params)

    def _loops(self) -> None:
        graph: dict[str, set[str]] = {}
        owners: dict[str, LoadedFile] = {}

        def walk(rules: list[spec.Rule], out: set[str]) -> None:
            for r in rules:
                if r.use:
                    out.add(f"datatype:{r.use}")
                if r.record:
                    out.add(f"resource:{r.record}")
                if r.rules:
                    walk(r.rules, out)

        for kind, bucket in (("resource", self.mset.resources), ("datatype", self.mset.datatypes)):
            for name, f in bucket.items():
                node = f"{kind}:{name}"
                owners[node] = f
                graph[node] = set()
                walk(f.model.rules, graph[node])
        state: dict[str, int] = {}

        def visit(node: str, trail: list[str]) -> None:
            state[node] = 1
            for nxt in sorted(graph.get(node, ())):
                if state.get(nxt) == 1:
                    cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                    f = owners[node]
                    self._err(
                        f,
                        ("rules",),
                        "use:/record: layering loops: " + " -> ".join(cycle),
                        "mappings that do not (indirectly) use themselves",
                    )
                elif state.get(nxt) is None:
                    visit(nxt, trail + [nxt])
            state[node] = 2

        for node in sorted(graph):
            if state.get(node) is None:
                visit(node, [node])
