// A real OpenID provider for the hms-ach tests (tests/integration/test_oidc_provider.py).
//
// It listens on 127.0.0.1 on an ephemeral port, prints one JSON line {"issuer": ..., "kid": ...} on stdout
// once it is ready, and issues client-credentials access tokens as JWTs (RFC 9068) for one resource
// server (the audience given in OIDC_TEST_AUDIENCE). It exits when its stdin closes, so a test that dies
// never leaves it behind.
//
// POST /test/rotate (test control, loopback only) puts a new EC P-256 signing key in front of the key set
// (the old key stays published) and prints {"kid": ...} of the new key: tokens issued afterwards carry it.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const audience = process.env.OIDC_TEST_AUDIENCE || 'urn:hms-ach:test';
const clientId = process.env.OIDC_TEST_CLIENT_ID || 'engine-test';
const clientSecret = process.env.OIDC_TEST_CLIENT_SECRET || 'engine-test-secret';
const scopes = 'system/*.rs system/Patient.read user/Practitioner.read patient/*.read';

function newKey() {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'ES256', use: 'sig' };
}

function buildProvider(issuer, keys) {
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: clientId,
        client_secret: clientSecret,
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
        scope: scopes,
        // the provider's keys are EC only; ID tokens (unused here) would default to RS256
        id_token_signed_response_alg: 'ES256',
      },
    ],
    jwks: { keys },
    scopes: scopes.split(' '),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        getResourceServerInfo: () => ({
          scope: scopes,
          audience,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          jwt: { sign: { alg: 'ES256' } },
        }),
      },
    },
    extraTokenClaims: () => ({ roles: ['integration'] }),
  });
  return provider;
}

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  let keys = [newKey()];
  let handler = buildProvider(issuer, keys).callback();
  server.on('request', (req, res) => {
    if (req.method === 'POST' && req.url === '/test/rotate') {
      keys = [newKey(), ...keys];
      handler = buildProvider(issuer, keys).callback();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ kid: keys[0].kid }));
      return;
    }
    handler(req, res);
  });
  process.stdout.write(`${JSON.stringify({ issuer, kid: keys[0].kid })}\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
