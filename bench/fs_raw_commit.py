#!/usr/bin/env python3
"""Raw batch-write rate of the Firestore emulator, for bench/sync.sh (stdlib only).

  fs_raw_commit.py write HOST:PORT PROJECT COLLECTION N [BATCH]
      commits N documents <COLLECTION>/<id> ({"aiCallsUsed": 1}) in :commit requests of
      BATCH writes (default 500, Firestore's limit), one after the other on one keep-alive
      connection, and prints one JSON line {"docs", "commits", "seconds", "docs_per_s"}.
  fs_raw_commit.py count HOST:PORT PROJECT COLLECTION
      prints the number of documents in COLLECTION (runAggregationQuery count).

The emulator ignores `Connection: close`, so responses are read by Content-Length
(http.client does), never to EOF. Exits 1 on any non-200 answer or short writeResults.
"""
import http.client
import json
import sys
import time

AUTH = {"Authorization": "Bearer owner", "Content-Type": "application/json"}


def post(conn, path, payload):
    data = json.dumps(payload).encode()
    conn.request("POST", path, body=data, headers=AUTH)
    resp = conn.getresponse()
    body = resp.read()  # Content-Length bounded
    if resp.status != 200:
        sys.exit(f"POST {path}: HTTP {resp.status}: {body[:300]!r}")
    return json.loads(body)


def write(host, project, collection, n, batch):
    conn = http.client.HTTPConnection(host, timeout=120)
    base = f"projects/{project}/databases/(default)/documents"
    path = f"/v1/{base}:commit"
    commits = 0
    start = time.perf_counter()
    for lo in range(0, n, batch):
        writes = [
            {"update": {"name": f"{base}/{collection}/d{i}",
                        "fields": {"aiCallsUsed": {"integerValue": "1"}}}}
            for i in range(lo, min(n, lo + batch))
        ]
        answer = post(conn, path, {"writes": writes})
        if len(answer.get("writeResults", [])) != len(writes):
            sys.exit(f"commit {commits}: {len(answer.get('writeResults', []))} results for {len(writes)} writes")
        commits += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"docs": n, "commits": commits, "batch": batch, "seconds": round(seconds, 3),
                      "docs_per_s": round(n / seconds, 1)}))


def count(host, project, collection):
    conn = http.client.HTTPConnection(host, timeout=120)
    path = f"/v1/projects/{project}/databases/(default)/documents:runAggregationQuery"
    answer = post(conn, path, {"structuredAggregationQuery": {
        "structuredQuery": {"from": [{"collectionId": collection}]},
        "aggregations": [{"alias": "n", "count": {}}]}})
    rows = answer if isinstance(answer, list) else [answer]
    for row in rows:
        result = row.get("result")
        if result:
            print(int(result["aggregateFields"]["n"]["integerValue"]))
            return
    sys.exit(f"no count in {answer!r:.300}")


def main(argv):
    if len(argv) >= 6 and argv[1] == "write":
        write(argv[2], argv[3], argv[4], int(argv[5]), int(argv[6]) if len(argv) > 6 else 500)
    elif len(argv) == 5 and argv[1] == "count":
        count(argv[2], argv[3], argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
