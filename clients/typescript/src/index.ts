/**
 * @quotad/client — a typed, dependency-free client for quotad's HTTP API
 * (see the service's API.md). Uses the global `fetch` of Node >= 18.
 */

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

/** What the client does when quotad cannot be reached after its retries. */
export type OnUnavailable = 'throw' | 'allow' | 'deny';

/** Rate-limit algorithms quotad knows. */
export type RateLimitAlgorithm = 'sliding-window' | 'sliding-window-approx' | 'fixed-window' | 'token-bucket';

/** A rate-limit window: `"10s"`, `"1 h"`, `"500ms"`, ... or a whole number of seconds. */
export type RateLimitWindow = string | number;

/** Minimal logger used for the `onUnavailable` warnings (defaults to `console`). */
export interface QuotadLogger {
  warn(message: string, ...rest: unknown[]): void;
}

export interface QuotadClientOptions {
  /** Base URL of quotad, e.g. `https://quotad.internal:8080`. */
  baseUrl: string;
  /** Caller key sent as `Authorization: Bearer <apiKey>` (needed when quotad sets `QUOTAD_API_KEYS`). */
  apiKey?: string;
  /** Timeout of one HTTP attempt, in milliseconds. Default 2000. */
  timeoutMs?: number;
  /** Retries after the first attempt (network errors, timeouts and 503 only). Default 2. */
  retries?: number;
  /** Overall budget of one logical call, all attempts and backoff included, in ms. Default 10000. */
  deadlineMs?: number;
  /** Behaviour when quotad is unreachable after the retries. Default `'throw'`. */
  onUnavailable?: OnUnavailable;
  /** Logger for the `'allow'`/`'deny'` warnings. Default `console`. */
  logger?: QuotadLogger;
}

/** Explicit rate-limit check (`POST /ratelimit/check` without a plan). */
export interface RateLimitCheckRequest {
  key: string;
  /** 1..=1000000 */
  limit: number;
  window: RateLimitWindow;
  algorithm?: RateLimitAlgorithm;
  /** 0..=limit, default 1. `0` only reads. */
  cost?: number;
}

/** The answer of a rate-limit check. */
export interface RateLimitDecision {
  allowed: boolean;
  limit: number;
  remaining: number;
  /** Unix seconds when the key is back to its full limit. */
  reset: number;
  /** Seconds to wait before retrying (0 when allowed). */
  retryAfter: number;
}

/** Answer of `consume` and `refund`. */
export interface QuotaDecision {
  provider: string;
  allowed: boolean;
  used: number;
  limit: number;
  remaining: number;
}

/** Answer of `getQuota`. */
export interface QuotaStatus {
  provider: string;
  used: number;
  limit: number;
  remaining: number;
  hasQuota: boolean;
  source: 'cache' | 'store';
}

/** RFC 9457 problem details as quotad sends them. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
  [member: string]: unknown;
}

/** Stable error codes quotad answers with (others may be added; `string` stays accepted). */
export type QuotadErrorCode =
  | 'invalid_argument'
  | 'invalid_json'
  | 'invalid_id'
  | 'invalid_amount'
  | 'invalid_window'
  | 'invalid_limit'
  | 'invalid_cost'
  | 'invalid_algorithm'
  | 'invalid_query'
  | 'invalid_idempotency_key'
  | 'idempotency_key_reused'
  | 'unknown_plan'
  | 'unauthorized'
  | 'not_found'
  | 'method_not_allowed'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'rate_limited'
  | 'quota_exceeded'
  | 'unavailable'
  | 'internal'
  | 'invalid_response'
  | (string & {});

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/** Any problem answer of quotad, or a bad argument (`code: 'invalid_argument'`, `status: 0`). */
export class QuotadError extends Error {
  readonly code: QuotadErrorCode;
  /** HTTP status; 0 when no answer was involved (bad argument, network failure). */
  readonly status: number;
  readonly detail: string;
  /** The full problem body when there was one. */
  readonly problem: Problem | undefined;

  constructor(code: QuotadErrorCode, status: number, detail: string, problem?: Problem, options?: { cause?: unknown }) {
    super(`quotad: ${code}${status ? ` (${status})` : ''}: ${detail}`, options);
    this.name = 'QuotadError';
    this.code = code;
    this.status = status;
    this.detail = detail;
    this.problem = problem;
  }
}

/** quotad could not be reached (network error, timeout or 503) after all retries. */
export class QuotadUnavailableError extends QuotadError {
  /** Attempts made. */
  readonly attempts: number;

  constructor(detail: string, attempts: number, status = 0, problem?: Problem, options?: { cause?: unknown }) {
    super('unavailable', status, detail, problem, options);
    this.name = 'QuotadUnavailableError';
    this.attempts = attempts;
  }
}

/** A rate limit is exhausted (`429 rate_limited`). */
export class RateLimitError extends QuotadError {
  /** Seconds to wait (>= 1). */
  readonly retryAfter: number;
  readonly limit: number;
  readonly remaining: number;
  /** Unix seconds. */
  readonly reset: number;
  /** The violated policy (plan name, or `custom`). */
  readonly policy: string;

  constructor(
    fields: { retryAfter: number; limit: number; remaining: number; reset: number; policy: string },
    detail = 'rate limited',
    problem?: Problem,
  ) {
    super('rate_limited', 429, detail, problem);
    this.name = 'RateLimitError';
    this.retryAfter = fields.retryAfter;
    this.limit = fields.limit;
    this.remaining = fields.remaining;
    this.reset = fields.reset;
    this.policy = fields.policy;
  }
}

/** Not enough quota left (`429 quota_exceeded`); nothing was consumed. */
export class QuotaExceededError extends QuotadError {
  readonly used: number;
  readonly limit: number;
  readonly remaining: number;

  constructor(fields: { used: number; limit: number; remaining: number }, detail = 'quota exceeded', problem?: Problem) {
    super('quota_exceeded', 429, detail, problem);
    this.name = 'QuotaExceededError';
    this.used = fields.used;
    this.limit = fields.limit;
    this.remaining = fields.remaining;
  }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

const ID_PATTERN = /^[A-Za-z0-9_.:@-]{1,128}$/;
const MAX_AMOUNT = 1_000_000;
const ALGORITHMS: readonly RateLimitAlgorithm[] = ['sliding-window', 'sliding-window-approx', 'fixed-window', 'token-bucket'];

function invalid(detail: string): QuotadError {
  return new QuotadError('invalid_argument', 0, detail);
}

function checkId(what: string, id: unknown): asserts id is string {
  if (typeof id !== 'string' || id.length === 0) throw invalid(`${what} must be a non-empty string`);
  if (!ID_PATTERN.test(id) || id === '.' || id === '..' || /^__.*__$/.test(id)) {
    throw invalid(`${what} ${JSON.stringify(id)} must be 1..=128 characters of [A-Za-z0-9_.:@-], not "." or ".." or "__*__"`);
  }
}

function checkAmount(amount: unknown): asserts amount is number {
  if (typeof amount !== 'number' || !Number.isInteger(amount) || amount < 1 || amount > MAX_AMOUNT) {
    throw invalid(`amount must be an integer 1..=${MAX_AMOUNT}, got ${String(amount)}`);
  }
}

function checkInt(what: string, value: unknown, min: number, max: number): asserts value is number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalid(`${what} must be an integer ${min}..=${max}, got ${String(value)}`);
  }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

interface RawAnswer {
  status: number;
  headers: Headers;
  body: unknown;
}

type JsonBody = Record<string, unknown>;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function num(v: unknown, fallback: number): number {
  return typeof v === 'number' && Number.isFinite(v) ? v : fallback;
}

function asProblem(status: number, body: unknown): Problem {
  const b = isObject(body) ? body : {};
  return {
    ...b,
    type: typeof b.type === 'string' ? b.type : 'about:blank',
    title: typeof b.title === 'string' ? b.title : `HTTP ${status}`,
    status: num(b.status, status),
    detail: typeof b.detail === 'string' ? b.detail : typeof body === 'string' && body ? body : `HTTP ${status}`,
    code: typeof b.code === 'string' ? b.code : `http_${status}`,
  };
}

function problemError(answer: RawAnswer): QuotadError {
  const p = asProblem(answer.status, answer.body);
  return new QuotadError(p.code, answer.status, p.detail, p);
}

export class QuotadClient {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  readonly retries: number;
  readonly deadlineMs: number;
  readonly onUnavailable: OnUnavailable;
  readonly #apiKey: string | undefined;
  readonly #logger: QuotadLogger;

  constructor(options: QuotadClientOptions) {
    if (!options || typeof options.baseUrl !== 'string' || options.baseUrl.length === 0) {
      throw invalid('baseUrl is required');
    }
    try {
      new URL(options.baseUrl);
    } catch {
      throw invalid(`baseUrl ${JSON.stringify(options.baseUrl)} is not a URL`);
    }
    this.baseUrl = options.baseUrl.replace(/\/+$/, '');
    this.#apiKey = options.apiKey || undefined;
    this.timeoutMs = options.timeoutMs ?? 2000;
    this.retries = options.retries ?? 2;
    this.deadlineMs = options.deadlineMs ?? 10000;
    this.onUnavailable = options.onUnavailable ?? 'throw';
    this.#logger = options.logger ?? console;
    checkInt('timeoutMs', this.timeoutMs, 1, Number.MAX_SAFE_INTEGER);
    checkInt('retries', this.retries, 0, 100);
    checkInt('deadlineMs', this.deadlineMs, 1, Number.MAX_SAFE_INTEGER);
    if (!['throw', 'allow', 'deny'].includes(this.onUnavailable)) {
      throw invalid(`onUnavailable must be 'throw', 'allow' or 'deny'`);
    }
  }

  /**
   * Plan-based rate limit of a creator (`key = "creator:" + creatorId`).
   * Resolves when allowed; throws {@link RateLimitError} when limited.
   * When quotad is unreachable: `'allow'` resolves, `'deny'` throws a RateLimitError
   * with `retryAfter: 1`, `'throw'` throws {@link QuotadUnavailableError}.
   */
  async checkCreatorRateLimit(creatorId: string, plan: string): Promise<void> {
    checkId('creatorId', creatorId);
    const key = `creator:${creatorId}`;
    checkId('key', key);
    if (typeof plan !== 'string' || plan.length === 0) throw invalid('plan must be a non-empty string');

    let answer: RawAnswer;
    try {
      answer = await this.#request('POST', '/ratelimit/check', { key, plan });
    } catch (err) {
      if (err instanceof QuotadUnavailableError && this.onUnavailable !== 'throw') {
        this.#warnUnavailable('checkCreatorRateLimit', err);
        if (this.onUnavailable === 'allow') return;
        throw new RateLimitError(
          { retryAfter: 1, limit: -1, remaining: -1, reset: Math.ceil(Date.now() / 1000) + 1, policy: plan },
          `quotad unavailable (onUnavailable: 'deny'): ${err.detail}`,
        );
      }
      throw err;
    }
    if (answer.status === 200) return;
    throw this.#rateLimitOrProblem(answer, plan);
  }

  /**
   * Explicit rate-limit check. **Does not throw when limited**: a `429 rate_limited`
   * answer is returned as a decision with `allowed: false` (and `retryAfter >= 1`).
   * Other problems throw {@link QuotadError}. When quotad is unreachable: `'allow'`
   * returns `allowed: true` (limit/remaining -1), `'deny'` returns `allowed: false`
   * with `retryAfter: 1` (limit/remaining -1), `'throw'` throws {@link QuotadUnavailableError}.
   */
  async checkRateLimit(request: RateLimitCheckRequest): Promise<RateLimitDecision> {
    if (!isObject(request)) throw invalid('request must be an object');
    const { key, limit, window, algorithm, cost } = request;
    checkId('key', key);
    checkInt('limit', limit, 1, MAX_AMOUNT);
    if (typeof window === 'string') {
      if (window.trim().length === 0) throw invalid('window must be a non-empty string or a number of seconds');
    } else if (typeof window !== 'number' || !Number.isInteger(window)) {
      throw invalid('window must be a string such as "10s" or an integer number of seconds');
    }
    if (algorithm !== undefined && !ALGORITHMS.includes(algorithm)) {
      throw invalid(`algorithm must be one of ${ALGORITHMS.join(', ')}`);
    }
    if (cost !== undefined) checkInt('cost', cost, 0, limit);

    const body: JsonBody = { key, limit, window };
    if (algorithm !== undefined) body.algorithm = algorithm;
    if (cost !== undefined) body.cost = cost;

    let answer: RawAnswer;
    try {
      answer = await this.#request('POST', '/ratelimit/check', body);
    } catch (err) {
      if (err instanceof QuotadUnavailableError && this.onUnavailable !== 'throw') {
        this.#warnUnavailable('checkRateLimit', err);
        const now = Math.ceil(Date.now() / 1000);
        return this.onUnavailable === 'allow'
          ? { allowed: true, limit: -1, remaining: -1, reset: now, retryAfter: 0 }
          : { allowed: false, limit: -1, remaining: -1, reset: now + 1, retryAfter: 1 };
      }
      throw err;
    }
    if (answer.status === 200) return this.#decision(answer.body, true);
    const err = this.#rateLimitOrProblem(answer, 'custom');
    if (err instanceof RateLimitError) {
      return { allowed: false, limit: err.limit, remaining: err.remaining, reset: err.reset, retryAfter: err.retryAfter };
    }
    throw err;
  }

  /**
   * Consumes `amount` (default 1) of the provider's quota. Throws {@link QuotaExceededError}
   * when not enough is left (nothing consumed). One `Idempotency-Key` per call, reused on
   * retries, so a retried call is charged once. When quotad is unreachable: `'allow'`
   * returns `allowed: true` with used/limit/remaining -1, `'deny'` throws a
   * QuotaExceededError with -1 values, `'throw'` throws {@link QuotadUnavailableError}.
   */
  async consume(provider: string, amount = 1): Promise<QuotaDecision> {
    checkId('provider', provider);
    checkAmount(amount);
    let answer: RawAnswer;
    try {
      answer = await this.#request('POST', `/quota/${encodeURIComponent(provider)}/consume`, { amount }, true);
    } catch (err) {
      if (err instanceof QuotadUnavailableError && this.onUnavailable !== 'throw') {
        this.#warnUnavailable('consume', err);
        if (this.onUnavailable === 'allow') {
          return { provider, allowed: true, used: -1, limit: -1, remaining: -1 };
        }
        throw new QuotaExceededError(
          { used: -1, limit: -1, remaining: -1 },
          `quotad unavailable (onUnavailable: 'deny'): ${err.detail}`,
        );
      }
      throw err;
    }
    if (answer.status === 200) return this.#quotaDecision(answer.body, provider);
    if (answer.status === 429) {
      const p = asProblem(answer.status, answer.body);
      if (p.code === 'quota_exceeded') {
        throw new QuotaExceededError(
          { used: num(p.used, -1), limit: num(p.limit, -1), remaining: num(p.remaining, -1) },
          p.detail,
          p,
        );
      }
    }
    throw problemError(answer);
  }

  /**
   * Gives back `amount` (default 1) of usage (`used` never goes below 0). Idempotent across
   * retries like {@link consume}. Always throws {@link QuotadUnavailableError} when quotad is
   * unreachable (`onUnavailable` only applies to decisions).
   */
  async refund(provider: string, amount = 1): Promise<QuotaDecision> {
    checkId('provider', provider);
    checkAmount(amount);
    const answer = await this.#request('POST', `/quota/${encodeURIComponent(provider)}/refund`, { amount }, true);
    if (answer.status === 200) return this.#quotaDecision(answer.body, provider);
    throw problemError(answer);
  }

  /**
   * The provider's usage. Always throws {@link QuotadUnavailableError} when quotad is
   * unreachable (`onUnavailable` only applies to decisions).
   */
  async getQuota(provider: string): Promise<QuotaStatus> {
    checkId('provider', provider);
    const answer = await this.#request('GET', `/quota/${encodeURIComponent(provider)}`);
    if (answer.status !== 200) throw problemError(answer);
    const b = this.#object(answer.body);
    const used = num(b.used, 0);
    const limit = num(b.limit, 0);
    return {
      provider: typeof b.provider === 'string' ? b.provider : provider,
      used,
      limit,
      remaining: num(b.remaining, Math.max(0, limit - used)),
      hasQuota: typeof b.hasQuota === 'boolean' ? b.hasQuota : used < limit,
      source: b.source === 'cache' ? 'cache' : 'store',
    };
  }

  // -------------------------------------------------------------------------

  #object(body: unknown): Record<string, unknown> {
    if (!isObject(body)) throw new QuotadError('invalid_response', 0, 'quotad answered with a body that is not a JSON object');
    return body;
  }

  #decision(body: unknown, allowed: boolean): RateLimitDecision {
    const b = this.#object(body);
    return {
      allowed: typeof b.allowed === 'boolean' ? b.allowed : allowed,
      limit: num(b.limit, -1),
      remaining: num(b.remaining, -1),
      reset: num(b.reset, 0),
      retryAfter: num(b.retryAfter, 0),
    };
  }

  #quotaDecision(body: unknown, provider: string): QuotaDecision {
    const b = this.#object(body);
    return {
      provider: typeof b.provider === 'string' ? b.provider : provider,
      allowed: typeof b.allowed === 'boolean' ? b.allowed : true,
      used: num(b.used, -1),
      limit: num(b.limit, -1),
      remaining: num(b.remaining, -1),
    };
  }

  #rateLimitOrProblem(answer: RawAnswer, fallbackPolicy: string): QuotadError {
    if (answer.status !== 429) return problemError(answer);
    const p = asProblem(answer.status, answer.body);
    if (p.code !== 'rate_limited') return problemError(answer);
    const header = Number(answer.headers.get('retry-after'));
    const policies = p['violated-policies'];
    const first = Array.isArray(policies) && typeof policies[0] === 'string' ? policies[0] : fallbackPolicy;
    return new RateLimitError(
      {
        retryAfter: Math.max(1, num(p.retryAfter, Number.isFinite(header) ? header : 1)),
        limit: num(p.limit, -1),
        remaining: num(p.remaining, 0),
        reset: num(p.reset, 0),
        policy: first,
      },
      p.detail,
      p,
    );
  }

  #warnUnavailable(operation: string, err: QuotadUnavailableError): void {
    this.#logger.warn(
      `[@quotad/client] quotad at ${this.baseUrl} unavailable after ${err.attempts} attempt(s) (${err.detail}); ` +
        `${operation} answers as ${this.onUnavailable === 'allow' ? 'allowed' : 'denied'} (onUnavailable: '${this.onUnavailable}')`,
    );
  }

  /**
   * One logical call: retries network errors, timeouts and 503 with exponential backoff and
   * full jitter, bounded by `retries` and `deadlineMs`. Any other answer is returned as is.
   */
  async #request(method: 'GET' | 'POST', path: string, body?: JsonBody, idempotent = false): Promise<RawAnswer> {
    const headers: Record<string, string> = { accept: 'application/json, application/problem+json' };
    if (this.#apiKey) headers.authorization = `Bearer ${this.#apiKey}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    // One key per logical call, sent unchanged on every retry.
    if (idempotent) headers['idempotency-key'] = crypto.randomUUID();
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const url = this.baseUrl + path;
    const deadline = Date.now() + this.deadlineMs;

    let attempts = 0;
    let lastDetail = 'no attempt made';
    let lastCause: unknown;
    let last503: RawAnswer | undefined;

    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      attempts++;
      const controller = new AbortController();
      const timeout = Math.min(this.timeoutMs, left);
      const timer = setTimeout(() => controller.abort(), timeout);
      try {
        const res = await fetch(url, { method, headers, body: payload, signal: controller.signal });
        const text = await res.text();
        let parsed: unknown = text;
        if (text.length > 0) {
          try {
            parsed = JSON.parse(text);
          } catch {
            parsed = text;
          }
        }
        const answer: RawAnswer = { status: res.status, headers: res.headers, body: parsed };
        if (res.status !== 503) return answer;
        last503 = answer;
        lastCause = undefined;
        lastDetail = `503 ${asProblem(503, parsed).detail}`;
      } catch (err) {
        last503 = undefined;
        lastCause = err;
        lastDetail = controller.signal.aborted
          ? `timed out after ${timeout} ms`
          : `network error: ${err instanceof Error ? ((err.cause as Error | undefined)?.message ?? err.message) : String(err)}`;
      } finally {
        clearTimeout(timer);
      }
      if (attempts > this.retries) break;
      // Exponential backoff with full jitter: base 100 ms, capped at 2 s, bounded by the deadline.
      const backoff = Math.random() * Math.min(2000, 100 * 2 ** (attempts - 1));
      const remaining = deadline - Date.now();
      if (remaining <= backoff) break;
      await sleep(backoff);
    }

    const problem = last503 ? asProblem(503, last503.body) : undefined;
    throw new QuotadUnavailableError(
      `quotad unavailable after ${attempts} attempt(s): ${lastDetail}`,
      attempts,
      last503 ? 503 : 0,
      problem,
      lastCause === undefined ? undefined : { cause: lastCause },
    );
  }
}

// ---------------------------------------------------------------------------
// Configuration from the environment (drop-in for the legacy helper)
// ---------------------------------------------------------------------------

/**
 * A client configured from the environment: `QUOTAD_URL` (required), `QUOTAD_API_KEY`
 * (optional) and `QUOTAD_ON_UNAVAILABLE` (`throw` | `allow` | `deny`, optional).
 * `overrides` win over the environment.
 */
export function clientFromEnv(
  overrides: Partial<QuotadClientOptions> = {},
  env: Record<string, string | undefined> = globalThis.process?.env ?? {},
): QuotadClient {
  const baseUrl = overrides.baseUrl ?? env.QUOTAD_URL;
  if (!baseUrl) throw invalid('QUOTAD_URL is not set (the base URL of quotad, e.g. http://quotad:8080)');
  const onUnavailable = overrides.onUnavailable ?? env.QUOTAD_ON_UNAVAILABLE;
  if (onUnavailable !== undefined && onUnavailable !== 'throw' && onUnavailable !== 'allow' && onUnavailable !== 'deny') {
    throw invalid(`QUOTAD_ON_UNAVAILABLE must be throw, allow or deny, got ${JSON.stringify(onUnavailable)}`);
  }
  const options: QuotadClientOptions = { ...overrides, baseUrl };
  const apiKey = overrides.apiKey ?? env.QUOTAD_API_KEY;
  if (apiKey !== undefined) options.apiKey = apiKey;
  if (onUnavailable !== undefined) options.onUnavailable = onUnavailable;
  return new QuotadClient(options);
}

let shared: QuotadClient | undefined;

/** The shared client used by the top-level functions, created from the environment on first use. */
export function defaultClient(): QuotadClient {
  shared ??= clientFromEnv();
  return shared;
}

/**
 * Drop-in replacement of the legacy `checkCreatorRateLimit(creatorId, plan)` helper, using
 * {@link defaultClient} (configured from `QUOTAD_URL` / `QUOTAD_API_KEY`). Resolves when
 * allowed; throws {@link RateLimitError} (with `retryAfter`) when limited.
 */
export function checkCreatorRateLimit(creatorId: string, plan: string): Promise<void> {
  return defaultClient().checkCreatorRateLimit(creatorId, plan);
}

export default QuotadClient;
