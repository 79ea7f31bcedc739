"""The admin HTTP of a real `sluice server` started with a bearer token and HTTPS on its admin
port (certificates from `sluice certs create`): urllib over HTTPS verified against the CA, 401
with a JSON body without the token, 415 for a non-JSON POST, and a cross-site-style body-less form
POST refused with nothing changed. Plain HTTP to the HTTPS port gets a closed connection."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import SLUICE_BIN

TOKEN = "interop-admin-token-4c1d"


def call(ctx: ssl.SSLContext, url: str, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def wait_healthy(ctx: ssl.SSLContext, base: str, auth: dict[str, str], broker) -> None:
    deadline = time.monotonic() + 30
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not broker.is_running():
            pytest.fail(f"broker exited during startup:\n{broker.log_tail()}")
        try:
            status, _, _ = call(ctx, f"{base}/v1/health", headers=auth)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    pytest.fail(f"not healthy over HTTPS after 30 s (last: {last}):\n{broker.log_tail()}")


def test_admin_needs_the_token_and_json_over_https(broker_factory, tmp_path):
    certs = tmp_path / "certs"
    r = subprocess.run([str(SLUICE_BIN), "certs", "create", "--out", str(certs), "--nodes", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    broker = broker_factory(config={
        "admin.api.token.file": str(token_file),
        "admin.tls.cert": str(certs / "node-1.pem"),
        "admin.tls.key": str(certs / "node-1.key"),
    }, start=False)
    broker.start(wait=False)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    base = f"https://{broker.admin}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    json_ct = {"Content-Type": "application/json"}
    wait_healthy(ctx, base, {}, broker)

    # Reads stay open (no require.auth.for.reads), over verified HTTPS.
    status, _, cluster = call(ctx, f"{base}/v1/cluster")
    assert status == 200 and cluster["node_id"] == 1, cluster
    # A topic to act on.
    r = subprocess.run([str(SLUICE_BIN), "topics", "create", "sec", "--partitions", "1",
                        "--bootstrap-server", broker.bootstrap], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    decommission = f"{base}/v1/brokers/1/decommission"

    # No token: 401, JSON body, Bearer challenge.
    status, headers, body = call(ctx, decommission, "POST", b"{}", json_ct)
    assert status == 401 and body["status"] == 401 and body["error"], body
    assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    # A wrong token: 401.
    status, _, body = call(ctx, decommission, "POST", b"{}", {**json_ct, "Authorization": "Bearer nope"})
    assert status == 401 and body["status"] == 401, body
    # What a page on another site can send without a preflight: a form POST, no token, no body.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = call(ctx, decommission, "POST", b"", form)
    assert status == 401 and body["status"] == 401, body
    # Even with the token, a form or text/plain POST is refused before anything changes.
    for ct in ("application/x-www-form-urlencoded", "text/plain"):
        status, _, body = call(ctx, decommission, "POST", b"", {**auth, "Content-Type": ct})
        assert status == 415 and body["status"] == 415, body
    # Nothing changed: the broker is still registered and the metadata voter.
    status, _, brokers = call(ctx, f"{base}/v1/brokers")
    assert status == 200 and [b["id"] for b in brokers] == [1], brokers
    status, _, raft = call(ctx, f"{base}/v1/raft")
    meta = next(g for g in raft["groups"] if g["group"] == "meta")
    assert 1 in [int(v) for v in meta["voters"]], meta

    # Errors are JSON: unknown route, bad JSON.
    status, _, body = call(ctx, f"{base}/v1/nope")
    assert status == 404 and body["status"] == 404, body
    transfer = f"{base}/v1/partitions/sec/0/transfer-leadership"
    status, _, body = call(ctx, transfer, "POST", b"{not json", {**auth, **json_ct})
    assert status == 400 and body["status"] == 400, body
    # With the token and JSON the request is served.
    status, _, body = call(ctx, transfer, "POST", b"{}", {**auth, **json_ct})
    assert status == 200 and body["leader"] == 1, body

    # Plain HTTP to the HTTPS port: the connection is closed without an HTTP answer (at most a
    # TLS alert, which is no HTTP status line).
    with pytest.raises((urllib.error.URLError, OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://{broker.admin}/v1/health", timeout=5).read()
    # A client that does not trust the CA refuses the server.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/v1/health", timeout=5, context=ssl.create_default_context())
    # The CLI: https with --admin-ca, the token from a file.
    r = subprocess.run([str(SLUICE_BIN), "cluster", "status", "--admin-addr", base,
                        "--admin-ca", str(certs / "ca.pem"), "--admin-token-file", str(token_file)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Controller:" in r.stdout, r.stderr
    status, _, _ = call(ctx, f"{base}/v1/health")
    assert status == 200
