import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { checkCreatorRateLimit, clientFromEnv, defaultClient, QuotadError, RateLimitError } from '../dist/index.js';
import { startQuotad } from '../test-support/quotad.mjs';

let quotad;
before(async () => {
  quotad = await startQuotad({ QUOTAD_API_KEYS: 'k1' });
});
after(async () => {
  await quotad?.stop();
});

test('clientFromEnv reads QUOTAD_URL, QUOTAD_API_KEY and QUOTAD_ON_UNAVAILABLE', () => {
  const c = clientFromEnv({}, { QUOTAD_URL: 'http://q:1/', QUOTAD_API_KEY: 'k', QUOTAD_ON_UNAVAILABLE: 'deny' });
  assert.equal(c.baseUrl, 'http://q:1');
  assert.equal(c.onUnavailable, 'deny');
  assert.equal(clientFromEnv({ onUnavailable: 'allow' }, { QUOTAD_URL: 'http://q:1' }).onUnavailable, 'allow');
  assert.throws(() => clientFromEnv({}, {}), (e) => e instanceof QuotadError && e.code === 'invalid_argument');
  assert.throws(
    () => clientFromEnv({}, { QUOTAD_URL: 'http://q:1', QUOTAD_ON_UNAVAILABLE: 'maybe' }),
    (e) => e instanceof QuotadError && e.code === 'invalid_argument',
  );
});

test('top-level checkCreatorRateLimit (legacy drop-in) uses the environment', async () => {
  process.env.QUOTAD_URL = quotad.url;
  process.env.QUOTAD_API_KEY = 'k1';
  const creator = `env-${Date.now()}`;
  await checkCreatorRateLimit(creator, 'tiny');
  await checkCreatorRateLimit(creator, 'tiny');
  await assert.rejects(checkCreatorRateLimit(creator, 'tiny'), (e) => e instanceof RateLimitError && e.policy === 'tiny');
  assert.equal(defaultClient(), defaultClient());
});
