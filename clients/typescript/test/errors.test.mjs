import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  QuotadClient,
  QuotadError,
  QuotadUnavailableError,
  RateLimitError,
  QuotaExceededError,
} from '../dist/index.js';
import { startQuotad, startProxy } from '../test-support/quotad.mjs';

let open;
let secured;
before(async () => {
  [open, secured] = await Promise.all([startQuotad(), startQuotad({ QUOTAD_API_KEYS: 'k1' })]);
});
after(async () => {
  await Promise.all([open?.stop(), secured?.stop()]);
});

async function rejection(promise) {
  return promise.then(
    (v) => assert.fail(`expected a rejection, got ${JSON.stringify(v)}`),
    (e) => e,
  );
}

test('bad arguments throw invalid_argument before any request', async () => {
  const proxy = await startProxy(open.url);
  try {
    const c = new QuotadClient({ baseUrl: proxy.url });
    const calls = [
      () => c.consume(''),
      () => c.consume('.'),
      () => c.consume('..'),
      () => c.consume('has space'),
      () => c.consume('a/b'),
      () => c.consume('x'.repeat(129)),
      () => c.consume('__reserved__'),
      () => c.consume('p', 0),
      () => c.consume('p', 1.5),
      () => c.consume('p', 1_000_001),
      () => c.consume('p', -1),
      () => c.refund('', 1),
      () => c.refund('p', 0),
      () => c.getQuota('..'),
      () => c.checkCreatorRateLimit('', 'tiny'),
      () => c.checkCreatorRateLimit('bad id', 'tiny'),
      () => c.checkCreatorRateLimit('ok', ''),
      () => c.checkRateLimit({ key: '', limit: 1, window: '1s' }),
      () => c.checkRateLimit({ key: 'k', limit: 0, window: '1s' }),
      () => c.checkRateLimit({ key: 'k', limit: 5, window: '1s', cost: 6 }),
      () => c.checkRateLimit({ key: 'k', limit: 5, window: '' }),
    ];
    for (const call of calls) {
      const err = await rejection(call());
      assert.ok(err instanceof QuotadError, String(err));
      assert.equal(err.code, 'invalid_argument', `${call}: ${err.message}`);
      assert.equal(err.status, 0);
      assert.equal(typeof err.detail, 'string');
    }
    assert.equal(proxy.requests.length, 0, 'no request reached the server');
  } finally {
    await proxy.close();
  }
});

test('401 unauthorized with a wrong API key; the right key works', async () => {
  const wrong = new QuotadClient({ baseUrl: secured.url, apiKey: 'nope' });
  for (const call of [() => wrong.getQuota('p'), () => wrong.consume('p'), () => wrong.checkCreatorRateLimit('c', 'tiny')]) {
    const err = await rejection(call());
    assert.ok(err instanceof QuotadError);
    assert.ok(!(err instanceof QuotadUnavailableError));
    assert.equal(err.code, 'unauthorized');
    assert.equal(err.status, 401);
    assert.ok(err.detail.length > 0);
    assert.equal(err.problem?.code, 'unauthorized');
  }
  const missing = new QuotadClient({ baseUrl: secured.url });
  assert.equal((await rejection(missing.getQuota('p'))).code, 'unauthorized');

  const right = new QuotadClient({ baseUrl: secured.url, apiKey: 'k1' });
  assert.equal((await right.getQuota('p')).used, 0);
});

test('400 invalid_window from checkRateLimit and 400 unknown_plan, not retried', async () => {
  const proxy = await startProxy(open.url);
  try {
    const c = new QuotadClient({ baseUrl: proxy.url, retries: 3 });
    const w = await rejection(c.checkRateLimit({ key: 'k', limit: 3, window: 'soon' }));
    assert.ok(w instanceof QuotadError);
    assert.ok(!(w instanceof RateLimitError));
    assert.equal(w.code, 'invalid_window');
    assert.equal(w.status, 400);
    assert.equal(proxy.requests.length, 1, '4xx is never retried');

    const p = await rejection(c.checkCreatorRateLimit('c1', 'no-such-plan'));
    assert.ok(p instanceof QuotadError);
    assert.ok(!(p instanceof RateLimitError));
    assert.equal(p.code, 'unknown_plan');
    assert.equal(p.status, 400);
    assert.equal(proxy.requests.length, 2);
  } finally {
    await proxy.close();
  }
});

test('503 answers are retried up to `retries` times, then QuotadUnavailableError', async () => {
  const proxy = await startProxy(open.url, { fail503: 100 });
  try {
    const c = new QuotadClient({ baseUrl: proxy.url, retries: 2 });
    const err = await rejection(c.consume('p503'));
    assert.ok(err instanceof QuotadUnavailableError, String(err));
    assert.equal(err.code, 'unavailable');
    assert.equal(err.status, 503);
    assert.equal(proxy.requests.length, 3);
    assert.equal(new Set(proxy.requests.map((r) => r.idempotencyKey)).size, 1);
  } finally {
    await proxy.close();
  }
  const recovering = await startProxy(open.url, { fail503: 1 });
  try {
    const c = new QuotadClient({ baseUrl: recovering.url, retries: 2 });
    const ok = await c.consume('p503b');
    assert.equal(ok.used, 1);
    assert.equal(recovering.requests.length, 2);
  } finally {
    await recovering.close();
  }
});

test('error classes form one hierarchy', () => {
  const rl = new RateLimitError({ retryAfter: 1, limit: 1, remaining: 0, reset: 0, policy: 'x' });
  const qe = new QuotaExceededError({ used: 1, limit: 1, remaining: 0 });
  const un = new QuotadUnavailableError('down', 1);
  for (const e of [rl, qe, un]) {
    assert.ok(e instanceof QuotadError);
    assert.ok(e instanceof Error);
  }
  assert.equal(un.code, 'unavailable');
});
