import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { QuotadClient, RateLimitError, QuotadError } from '../dist/index.js';
import { startQuotad } from '../test-support/quotad.mjs';

let quotad;
before(async () => {
  quotad = await startQuotad();
});
after(async () => {
  await quotad?.stop();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test('checkCreatorRateLimit: allow, allow, deny with RateLimitError, allowed again after retryAfter', async () => {
  const client = new QuotadClient({ baseUrl: quotad.url });
  const creator = `c-${Date.now()}`;
  await client.checkCreatorRateLimit(creator, 'tiny');
  await client.checkCreatorRateLimit(creator, 'tiny');
  const err = await client.checkCreatorRateLimit(creator, 'tiny').then(
    () => assert.fail('third call within the window should be rate limited'),
    (e) => e,
  );
  assert.ok(err instanceof RateLimitError, `expected RateLimitError, got ${err}`);
  assert.ok(err instanceof QuotadError);
  assert.equal(err.code, 'rate_limited');
  assert.equal(err.status, 429);
  assert.ok(err.retryAfter >= 1, `retryAfter ${err.retryAfter}`);
  assert.equal(err.limit, 2);
  assert.equal(err.remaining, 0);
  assert.equal(err.policy, 'tiny');
  assert.ok(err.reset > Date.now() / 1000 - 1, `reset ${err.reset}`);

  await sleep(err.retryAfter * 1000 + 100);
  await client.checkCreatorRateLimit(creator, 'tiny');
});

test('checkRateLimit: returns decisions, allowed false on 429 instead of throwing', async () => {
  const client = new QuotadClient({ baseUrl: quotad.url });
  const key = `ip:1.2.3.${Date.now() % 250}`;
  const first = await client.checkRateLimit({ key, limit: 1, window: '10s', algorithm: 'fixed-window' });
  assert.equal(first.allowed, true);
  assert.equal(first.limit, 1);
  assert.equal(first.remaining, 0);
  assert.equal(first.retryAfter, 0);
  assert.equal(typeof first.reset, 'number');

  const second = await client.checkRateLimit({ key, limit: 1, window: '10s', algorithm: 'fixed-window' });
  assert.equal(second.allowed, false);
  assert.equal(second.limit, 1);
  assert.equal(second.remaining, 0);
  assert.ok(second.retryAfter >= 1);

  const peek = await client.checkRateLimit({ key, limit: 1, window: 10, algorithm: 'fixed-window', cost: 0 });
  assert.equal(peek.allowed, false);
});
