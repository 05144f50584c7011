#!/usr/bin/env python3
"""Reads the processor's output through the S3 API (standard library only, SigV4 signed) and
prints one JSON object saying what is there, for tests/stack/run.sh to assert on:

    s3check.py ENDPOINT BUCKET [PREFIX]      (credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)

  objects      number of objects under tickets_with_team/
  tickets      lines under tickets_with_team/ (one ticket each)
  unique       distinct ticket_id among them (== tickets: nothing written twice)
  runs         {producer run id: [count, lowest seq, highest seq]} (ticket ids are
               TICKET-<run>-<seq>, seq from 1: count == highest == N means all N of the run)
  wrong_team   tickets whose support_team is not the default routing of their request_type
  counts_ok    counts_by_request_type/latest.jsonl equals the counts over the tickets
  hours        the date=…/hour=… folders the ticket objects are in
  report_tickets  the tickets total on reports/index.html (its data-total="tickets"), or null
"""

import datetime
import hashlib
import hmac
import json
import os
import re
import sys
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

TEAMS = {"technical": "Tech Support", "billing": "Billing Team", "support": "Customer Service"}
DEFAULT_TEAM = "General Support"
REGION = os.environ.get("AWS_REGION", "us-east-1")


def sign(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def get(endpoint, path, query=None):
    """GET endpoint/path?query with AWS Signature V4; returns (status, body)."""
    access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    url = urllib.parse.urlsplit(endpoint)
    host = url.netloc
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    canonical_path = urllib.parse.quote(path, safe="/-_.~")
    q = sorted((query or {}).items())
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in q
    )
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        ["GET", canonical_path, canonical_query]
        + [f"{k}:{headers[k]}" for k in sorted(headers)]
        + ["", signed, payload_hash]
    )
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    k = sign(("AWS4" + secret).encode(), day)
    for part in (REGION, "s3", "aws4_request"):
        k = sign(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        f"{url.scheme}://{host}{canonical_path}" + (f"?{canonical_query}" if q else ""),
        headers={
            "x-amz-content-sha256": payload_hash,
            "x-amz-date": amz_date,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def list_keys(endpoint, bucket, prefix):
    keys, token = [], None
    while True:
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        status, body = get(endpoint, f"/{bucket}", query)
        if status != 200:
            raise SystemExit(f"ListObjectsV2 {bucket}/{prefix}: HTTP {status}: {body[:300]!r}")
        root = ET.fromstring(body)
        ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        keys += [c.find(f"{ns}Key").text for c in root.findall(f"{ns}Contents")]
        if root.findtext(f"{ns}IsTruncated") != "true":
            return keys
        token = root.findtext(f"{ns}NextContinuationToken")


def main():
    endpoint, bucket = sys.argv[1], sys.argv[2]
    prefix = sys.argv[3] if len(sys.argv) > 3 else ""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    keys = [k for k in list_keys(endpoint, bucket, prefix + "tickets_with_team/") if k.endswith(".jsonl")]
    ids, runs, wrong_team = set(), {}, 0
    tickets = 0
    expected = {}
    for key in keys:
        status, body = get(endpoint, f"/{bucket}/{key}")
        if status != 200:
            raise SystemExit(f"GetObject {key}: HTTP {status}")
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            t = json.loads(line)
            tickets += 1
            ids.add(t["ticket_id"])
            _, run, seq = t["ticket_id"].rsplit("-", 2)
            seq = int(seq)
            c = runs.setdefault(run, [0, seq, seq])
            c[0] += 1
            c[1], c[2] = min(c[1], seq), max(c[2], seq)
            if t.get("support_team") != TEAMS.get(t["request_type"], DEFAULT_TEAM):
                wrong_team += 1
            e = expected.setdefault(t["request_type"], {"count": 0, "by_priority": {}})
            e["count"] += 1
            e["by_priority"][t["priority"]] = e["by_priority"].get(t["priority"], 0) + 1
    hours = sorted({m.group(0) for k in keys for m in [re.search(r"date=[^/]+/hour=[^/]+", k)] if m})
    status, page = get(endpoint, f"/{bucket}/{prefix}reports/index.html")
    shown = re.search(rb'data-total="tickets" data-value="(\d+)"', page) if status == 200 else None
    status, body = get(endpoint, f"/{bucket}/{prefix}counts_by_request_type/latest.jsonl")
    counts = {}
    if status == 200:
        for line in body.decode().splitlines():
            if line.strip():
                c = json.loads(line)
                counts[c["request_type"]] = {"count": c["count"], "by_priority": c["by_priority"]}
    print(
        json.dumps(
            {
                "objects": len(keys),
                "tickets": tickets,
                "unique": len(ids),
                "runs": runs,
                "wrong_team": wrong_team,
                "counts_ok": counts == expected,
                "counts_total": sum(c["count"] for c in counts.values()),
                "hours": hours,
                "report_tickets": int(shown.group(1)) if shown else None,
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
