import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import {
  QuotadClient,
  QuotadError,
  QuotadUnavailableError,
  QuotaExceededError,
  RateLimitError,
} from '../dist/index.js';
import { freePort, quotadBin } from '../test-support/quotad.mjs';

let baseUrl;
before(async () => {
  quotadBin(); // fail clearly when the release binary is missing, like the other files
  baseUrl = `http://127.0.0.1:${await freePort()}`; // nothing listens there
});

const options = (onUnavailable) => ({ baseUrl, retries: 1, timeoutMs: 300, deadlineMs: 1500, onUnavailable });

async function rejection(promise) {
  return promise.then(
    (v) => assert.fail(`expected a rejection, got ${JSON.stringify(v)}`),
    (e) => e,
  );
}

test("onUnavailable 'throw' (default): QuotadUnavailableError after the retries", async () => {
  const c = new QuotadClient({ baseUrl, retries: 1, timeoutMs: 300, deadlineMs: 1500 });
  for (const call of [
    () => c.consume('p'),
    () => c.checkCreatorRateLimit('c', 'tiny'),
    () => c.checkRateLimit({ key: 'k', limit: 1, window: '1s' }),
    () => c.getQuota('p'),
    () => c.refund('p'),
  ]) {
    const started = Date.now();
    const err = await rejection(call());
    assert.ok(err instanceof QuotadUnavailableError, String(err));
    assert.ok(err instanceof QuotadError);
    assert.equal(err.code, 'unavailable');
    assert.equal(err.attempts, 2);
    assert.ok(Date.now() - started < 1500 + 300, 'bounded by the deadline');
  }
});

test("onUnavailable 'allow': warns and answers as allowed", async (t) => {
  const warn = t.mock.method(console, 'warn', () => {});
  const c = new QuotadClient(options('allow'));
  assert.deepEqual(await c.consume('p', 2), { provider: 'p', allowed: true, used: -1, limit: -1, remaining: -1 });
  assert.equal(await c.checkCreatorRateLimit('c', 'tiny'), undefined);
  const d = await c.checkRateLimit({ key: 'k', limit: 1, window: '1s' });
  assert.equal(d.allowed, true);
  assert.equal(warn.mock.callCount(), 3);
  assert.match(String(warn.mock.calls[0].arguments[0]), /unavailable/);
  // Reads and refunds are not decisions: they still throw.
  assert.ok((await rejection(c.getQuota('p'))) instanceof QuotadUnavailableError);
});

test("onUnavailable 'deny': QuotaExceededError / RateLimitError with retryAfter 1", async (t) => {
  t.mock.method(console, 'warn', () => {});
  const c = new QuotadClient(options('deny'));
  const q = await rejection(c.consume('p'));
  assert.ok(q instanceof QuotaExceededError, String(q));
  assert.deepEqual([q.used, q.limit, q.remaining], [-1, -1, -1]);

  const r = await rejection(c.checkCreatorRateLimit('c', 'tiny'));
  assert.ok(r instanceof RateLimitError, String(r));
  assert.equal(r.retryAfter, 1);
  assert.equal(r.policy, 'tiny');

  const d = await c.checkRateLimit({ key: 'k', limit: 1, window: '1s' });
  assert.equal(d.allowed, false);
  assert.equal(d.retryAfter, 1);
});

test('a timeout (server accepts but never answers) counts as unavailable', async () => {
  const net = await import('node:net');
  const sockets = [];
  const server = net.createServer((s) => sockets.push(s)); // never answers
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  try {
    const c = new QuotadClient({ baseUrl: `http://127.0.0.1:${server.address().port}`, timeoutMs: 200, retries: 1, deadlineMs: 2000 });
    const started = Date.now();
    const err = await rejection(c.getQuota('p'));
    assert.ok(err instanceof QuotadUnavailableError);
    assert.match(err.detail, /timed out/);
    assert.equal(err.attempts, 2);
    assert.ok(Date.now() - started < 2000);
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
  }
});
