// Test support: starts the real quotad binary and a small forwarding proxy.
// Lives outside test/ so `node --test test/` does not run it as a test file.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const packageDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export const TINY_PLAN = '[plans.tiny]\nlimit = 2\nwindow = "2s"\nalgorithm = "sliding-window"\n';
export const ADMIN_TOKEN = 't';

/** Path of the quotad binary: $QUOTAD_BIN or ../../target/debug/quotad relative to the package. */
export function quotadBin() {
  const bin = process.env.QUOTAD_BIN
    ? path.resolve(process.env.QUOTAD_BIN)
    : path.resolve(packageDir, '../../target/debug/quotad');
  if (!existsSync(bin)) {
    throw new Error(
      `quotad binary not found at ${bin}. ` +
        'Build it first with `cargo build` (in the repository root) or set QUOTAD_BIN to its path.',
    );
  }
  return bin;
}

/** A TCP port that nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let projects = 0;

/**
 * With QUOTAD_CLIENT_BACKENDS=real (set by test.sh when scripts/test.sh has started Redis and
 * the Firestore emulator), each quotad runs on that Redis and the emulator, with a project of
 * its own; otherwise on the embedded backends.
 */
function realBackends() {
  if (process.env.QUOTAD_CLIENT_BACKENDS !== 'real') return {};
  const redis = process.env.QUOTAD_TEST_REDIS_URL;
  const emulator = process.env.FIRESTORE_EMULATOR_HOST;
  if (!redis || !emulator) {
    throw new Error('QUOTAD_CLIENT_BACKENDS=real needs QUOTAD_TEST_REDIS_URL and FIRESTORE_EMULATOR_HOST (scripts/test.sh sets both)');
  }
  projects += 1;
  return {
    REDIS_URL: redis,
    FIRESTORE_PROJECT_ID: `client-${process.pid}-${projects}-${Date.now()}`,
    FIRESTORE_EMULATOR_HOST: emulator,
  };
}

/**
 * Starts quotad with embedded backends on a free port, with the `tiny` plan and admin token `t`.
 * `env` adds variables (e.g. QUOTAD_API_KEYS). Returns { url, port, stop() }.
 */
export async function startQuotad(env = {}) {
  const bin = quotadBin();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'quotad-client-test-'));
  const configPath = path.join(dir, 'quotad.toml');
  writeFileSync(configPath, TINY_PLAN);
  const port = await freePort();
  const childEnv = { ...process.env };
  const backends = realBackends();
  for (const name of Object.keys(childEnv)) {
    if (name.startsWith('QUOTAD_') || name.startsWith('REDIS_') || name.startsWith('FIRESTORE_')) delete childEnv[name];
  }
  Object.assign(childEnv, {
    QUOTAD_ADDR: `127.0.0.1:${port}`,
    QUOTAD_ADMIN_TOKEN: ADMIN_TOKEN,
    QUOTAD_CONFIG: configPath,
    ...backends,
    ...env,
  });
  const child = spawn(bin, [], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  let exited = null;
  child.on('exit', (code, signal) => (exited = { code, signal }));

  const url = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (exited === null) {
      const done = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 3000);
      await done;
      clearTimeout(t);
    }
    rmSync(dir, { recursive: true, force: true });
  };

  const until = Date.now() + 15000;
  for (;;) {
    if (exited !== null) {
      await stop();
      throw new Error(`quotad exited early (${JSON.stringify(exited)}):\n${output}`);
    }
    try {
      const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(500) });
      await res.arrayBuffer();
      if (res.status === 200) break;
    } catch {
      // not up yet
    }
    if (Date.now() > until) {
      await stop();
      throw new Error(`quotad did not answer GET /healthz 200 within 15 s:\n${output}`);
    }
    await sleep(50);
  }
  return { url, port, stop, output: () => output };
}

/** Admin helper: PUT /admin/quota/<provider>. */
export async function setQuota(url, provider, body) {
  const res = await fetch(`${url}/admin/quota/${provider}`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  if (res.status !== 200) throw new Error(`PUT /admin/quota/${provider}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

/**
 * A forwarding HTTP proxy in front of quotad. `delayFirstMs` holds back the answer of the first
 * request (quotad still processes it at once); `fail503` answers the first N requests 503 itself
 * without forwarding. `requests` records { method, url, idempotencyKey } of every request seen.
 */
export async function startProxy(targetUrl, { delayFirstMs = 0, fail503 = 0 } = {}) {
  const target = new URL(targetUrl);
  const requests = [];
  const server = http.createServer((req, res) => {
    const index = requests.length;
    requests.push({ method: req.method, url: req.url, idempotencyKey: req.headers['idempotency-key'] });
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      if (index < fail503) {
        res.writeHead(503, { 'content-type': 'application/problem+json' });
        res.end(
          JSON.stringify({ type: 'about:blank', title: 'Service Unavailable', status: 503, detail: 'proxy says no', code: 'unavailable' }),
        );
        return;
      }
      const upstream = http.request(
        { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
        (up) => {
          const body = [];
          up.on('data', (c) => body.push(c));
          up.on('end', () => {
            const send = () => {
              if (res.destroyed || res.writableEnded) return;
              res.writeHead(up.statusCode ?? 502, up.headers);
              res.end(Buffer.concat(body));
            };
            if (index === 0 && delayFirstMs > 0) setTimeout(send, delayFirstMs);
            else send();
          });
        },
      );
      upstream.on('error', (err) => {
        if (!res.headersSent) res.writeHead(502);
        res.end(String(err));
      });
      upstream.end(Buffer.concat(chunks));
    });
    res.on('error', () => {});
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise((r) => {
        server.closeAllConnections?.();
        server.close(() => r());
      }),
  };
}
