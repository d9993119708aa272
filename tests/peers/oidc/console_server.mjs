// An OpenID provider for the console's sign-in test (tests/integration/test_console_oidc.py).
//
// Like server.mjs it listens on 127.0.0.1 on an ephemeral port, prints {"issuer": ...} once ready and
// exits when its stdin closes. It has one public client, OIDC_CONSOLE_CLIENT_ID, allowed the
// authorization code flow with PKCE to OIDC_CONSOLE_REDIRECT_URI, and oidc-provider's own development
// sign-in and consent pages (any login name and password are accepted). Access tokens are JWTs for the
// audience OIDC_TEST_AUDIENCE carrying the roles claim: "auditor" for a login starting with "aud",
// "operator" otherwise.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const audience = process.env.OIDC_TEST_AUDIENCE || 'urn:hms-ach:test';
const clientId = process.env.OIDC_CONSOLE_CLIENT_ID || 'hms-ach-console';
const redirectUri = process.env.OIDC_CONSOLE_REDIRECT_URI;

const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const key = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'ES256', use: 'sig' };

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: clientId,
        token_endpoint_auth_method: 'none',
        grant_types: ['authorization_code'],
        response_types: ['code'],
        redirect_uris: [redirectUri],
        id_token_signed_response_alg: 'ES256',
      },
    ],
    jwks: { keys: [key] },
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        getResourceServerInfo: () => ({
          scope: 'console',
          audience,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          jwt: { sign: { alg: 'ES256' } },
        }),
      },
    },
    extraTokenClaims: (_ctx, token) => ({
      roles: String(token.accountId || '').startsWith('aud') ? ['auditor'] : ['operator'],
    }),
  });
  provider.proxy = false;
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
