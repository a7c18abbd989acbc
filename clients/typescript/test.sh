#!/usr/bin/env bash
# Installs the locked dev dependencies, typechecks the examples and runs the tests of
# @quotad/client against the real quotad binary (QUOTAD_BIN, default the debug build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bin="${QUOTAD_BIN:-../../target/debug/quotad}"
if [[ ! -x "$bin" ]]; then
  echo "test.sh: quotad binary not found (or not executable) at: $bin" >&2
  echo "test.sh: build it first with 'cargo build' in the repository root, or set QUOTAD_BIN." >&2
  exit 1
fi
export QUOTAD_BIN="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

npm ci --no-audit --no-fund
npm run typecheck:examples
echo "== @quotad/client against quotad on its embedded backends"
npm test
# scripts/test.sh exports where its Redis and Firestore emulator are: run again on them.
if [[ -n "${QUOTAD_TEST_REDIS_URL:-}" && -n "${FIRESTORE_EMULATOR_HOST:-}" ]]; then
  echo "== @quotad/client against quotad on Redis ($QUOTAD_TEST_REDIS_URL) and the Firestore emulator"
  QUOTAD_CLIENT_BACKENDS=real npm test
fi
