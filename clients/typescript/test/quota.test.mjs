import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { QuotadClient, QuotaExceededError, QuotadError } from '../dist/index.js';
import { startQuotad, startProxy, setQuota } from '../test-support/quotad.mjs';

let quotad;
before(async () => {
  quotad = await startQuotad();
});
after(async () => {
  await quotad?.stop();
});

test('consume up to the limit, then QuotaExceededError with used/limit/remaining', async () => {
  const client = new QuotadClient({ baseUrl: quotad.url });
  await setQuota(quotad.url, 'prov-consume', { limit: 3, used: 0 });
  const a = await client.consume('prov-consume');
  assert.deepEqual(a, { provider: 'prov-consume', allowed: true, used: 1, limit: 3, remaining: 2 });
  const b = await client.consume('prov-consume', 2);
  assert.deepEqual(b, { provider: 'prov-consume', allowed: true, used: 3, limit: 3, remaining: 0 });
  const err = await client.consume('prov-consume').then(
    () => assert.fail('consume past the limit should throw'),
    (e) => e,
  );
  assert.ok(err instanceof QuotaExceededError, `expected QuotaExceededError, got ${err}`);
  assert.ok(err instanceof QuotadError);
  assert.equal(err.code, 'quota_exceeded');
  assert.equal(err.status, 429);
  assert.equal(err.used, 3);
  assert.equal(err.limit, 3);
  assert.equal(err.remaining, 0);
});

test('a consume retried after a client timeout is charged once (same Idempotency-Key)', async () => {
  await setQuota(quotad.url, 'prov-retry', { limit: 10, used: 0 });
  const proxy = await startProxy(quotad.url, { delayFirstMs: 1000 });
  try {
    const client = new QuotadClient({ baseUrl: proxy.url, timeoutMs: 300, retries: 2, deadlineMs: 5000 });
    const result = await client.consume('prov-retry');
    assert.equal(result.allowed, true);
    assert.equal(result.used, 1);
    const consumes = proxy.requests.filter((r) => r.url === '/quota/prov-retry/consume');
    assert.ok(consumes.length >= 2, `expected a retry, proxy saw ${consumes.length} request(s)`);
    assert.ok(consumes[0].idempotencyKey, 'an Idempotency-Key is sent');
    for (const r of consumes) assert.equal(r.idempotencyKey, consumes[0].idempotencyKey);

    const quota = await client.getQuota('prov-retry');
    assert.equal(quota.used, 1, 'charged once, not twice');

    // A new logical call gets a new key.
    await client.consume('prov-retry');
    const keys = new Set(proxy.requests.filter((r) => r.idempotencyKey).map((r) => r.idempotencyKey));
    assert.equal(keys.size, 2);
    assert.equal((await client.getQuota('prov-retry')).used, 2);
  } finally {
    await proxy.close();
  }
});

test('refund gives usage back and getQuota reports it', async () => {
  const client = new QuotadClient({ baseUrl: quotad.url });
  await setQuota(quotad.url, 'prov-refund', { limit: 5, used: 0 });
  await client.consume('prov-refund', 3);
  const r = await client.refund('prov-refund', 2);
  assert.deepEqual(r, { provider: 'prov-refund', allowed: true, used: 1, limit: 5, remaining: 4 });
  const r2 = await client.refund('prov-refund');
  assert.equal(r2.used, 0);
  const floor = await client.refund('prov-refund');
  assert.equal(floor.used, 0, 'used never goes below 0');

  const q = await client.getQuota('prov-refund');
  assert.equal(q.provider, 'prov-refund');
  assert.equal(q.used, 0);
  assert.equal(q.limit, 5);
  assert.equal(q.remaining, 5);
  assert.equal(q.hasQuota, true);
  assert.ok(q.source === 'cache' || q.source === 'store');

  const unknown = await client.getQuota('never-seen-provider');
  assert.deepEqual(
    { used: unknown.used, limit: unknown.limit, remaining: unknown.remaining, hasQuota: unknown.hasQuota },
    { used: 0, limit: 100, remaining: 100, hasQuota: true },
  );
});
