/**
 * Before/after sketch of a legacy Cloud Function (or Next.js route handler).
 *
 * BEFORE (legacy helper: Redis INCR + EXPIRE inside the function):
 *
 *   import { checkCreatorRateLimit, RateLimitError } from '../lib/rateLimit';
 *   ...
 *   await checkCreatorRateLimit(creatorId, 'pro');
 *
 * AFTER (quotad): the same call on a client configured from QUOTAD_URL / QUOTAD_API_KEY.
 * (The shortest migration changes only the import:
 *   import { checkCreatorRateLimit, RateLimitError } from '@quotad/client';
 * which uses a shared client configured from the same variables.)
 */
import { QuotadClient, RateLimitError } from '@quotad/client';

// Configured once per instance, from the environment.
const quotad = new QuotadClient({
  baseUrl: process.env.QUOTAD_URL ?? 'http://127.0.0.1:8080',
  apiKey: process.env.QUOTAD_API_KEY,
  timeoutMs: 2000,
  retries: 2,
  deadlineMs: 5000,
  onUnavailable: 'allow', // fail open: a quotad outage must not take the product down
});

export interface HttpResult {
  status: number;
  headers: Record<string, string>;
  body: unknown;
}

/** A handler that enforces the creator's `pro` plan before doing its work. */
export async function generateForCreator(creatorId: string, prompt: string): Promise<HttpResult> {
  try {
    await quotad.checkCreatorRateLimit(creatorId, 'pro');
  } catch (err) {
    if (err instanceof RateLimitError) {
      return {
        status: 429,
        headers: { 'Retry-After': String(err.retryAfter) },
        body: { error: 'rate_limited', retryAfter: err.retryAfter, limit: err.limit, policy: err.policy },
      };
    }
    throw err;
  }

  // Usage-based quota for the AI provider, refunded when the downstream call fails.
  const decision = await quotad.consume(`creator:${creatorId}`);
  try {
    const text = await callModel(prompt);
    return { status: 200, headers: {}, body: { text, remaining: decision.remaining } };
  } catch (err) {
    await quotad.refund(`creator:${creatorId}`);
    throw err;
  }
}

async function callModel(prompt: string): Promise<string> {
  return `echo: ${prompt}`;
}
