"""test_delivery.py - relayd delivers its queue: DNS, MX choice, retries,
bounces, caps, TLS, crash recovery, hostile receivers.

Every test runs its own dnsmasq (relaylib.Dnsmasq: names under .test on a
free port of 127.0.0.1; relayd's dns.servers always points at it, never at
the system resolver), its own fake MX (relaylib.FakeMX: build/fake-mx with
named listeners on 127.0.0.2.. that share one port, which is relayd's
delivery.port) and its own relayd. Mail is submitted with swaks or smtplib
and followed through relayd's log ("dlv result", "dsn queued"), `relayctl
queue --json` and fake-mx's record file.

The sender domain src.test has its own MX on listener mx2 (127.0.0.3), so
bounces (DSNs) can be seen arriving there with an empty MAIL FROM.

Python 3.11 standard library only. Run alone with
    BUILD=build tests/run integration tests/integration/test_delivery.py
"""
import email
import email.policy
import os
import re
import shutil
import smtplib
import signal
import socket
import subprocess
import tempfile
import threading
import time

import relaylib as L
from relaylib import Dnsmasq, FakeMX, RelayD, check, eq, fail

SENDER = "sender@src.test"

# Records every test's dnsmasq serves (more are added per test).
BASE_ZONE = [
    Dnsmasq.mx("example.test", "mx1.example.test", 10),
    Dnsmasq.host("mx1.example.test", "127.0.0.2"),
    Dnsmasq.mx("src.test", "mx.src.test", 10),
    Dnsmasq.host("mx.src.test", "127.0.0.3"),
]


def dns_conf(dns):
    return {"servers": [dns.server], "timeout": 1, "tries": 2}


def delivery_conf(mx, **over):
    """Fast retries, no jitter, fake-mx's port."""
    d = {"port": mx.port if isinstance(mx, FakeMX) else mx,
         "retry_schedule": [1], "min_retry": 1, "retry_jitter": 0.0}
    d.update(over)
    return d


def relayd(dns, mx, listeners=None, **over):
    return RelayD(listeners=listeners, dns=dns_conf(dns),
                  delivery=delivery_conf(mx, **over))


def submit(d, sender, rcpts, body, listener="plain", mail_options=()):
    """One message over smtplib (plaintext listener, relay network);
    returns relayd's queue id."""
    c = smtplib.SMTP(L.HOST, d.port(listener), local_hostname="client.test",
                     timeout=20 * L.SLOW)
    try:
        c.ehlo()
        code, resp = c.mail(sender, list(mail_options))
        check(code == 250, "MAIL: %d %r" % (code, resp))
        for r in rcpts:
            code, resp = c.rcpt(r)
            check(code == 250, "RCPT %s: %d %r" % (r, code, resp))
        code, resp = c.data(body)
        check(code == 250, "DATA: %d %r" % (code, resp))
        return L.queued_id("250 " + resp.decode())
    finally:
        try:
            c.quit()
        except (smtplib.SMTPException, OSError):
            c.close()


def body_for(tag, extra=b""):
    """A unique message: a leading-dot line (dot-stuffed on the wire both
    ways) and a CRLF at the end."""
    return (b"From: Sender <sender@src.test>\r\nTo: r@example.test\r\n"
            b"Subject: " + tag.encode() + b"\r\n"
            b"Date: Mon, 24 Nov 2025 05:00:00 +0000\r\n"
            b"Message-ID: <" + tag.encode() + b"@src.test>\r\n\r\n"
            b"body of " + tag.encode() + b"\r\n.leading dot\r\n" + extra +
            b"end\r\n")


def wait_results(d, rcpt, status, n=1, timeout=15.0):
    """Wait for n 'dlv result' lines for rcpt with status; return them."""
    return L.wait_until(
        lambda: (lambda rs: rs if len(rs) >= n else None)(
            L.dlv_results(d.read_log(), rcpt, status)),
        timeout, 0.05, "%d dlv result rcpt=%s status=%s" % (n, rcpt, status))


def wait_queue_empty(d, timeout=15.0):
    try:
        L.wait_until(lambda: d.queue_count() == 0, timeout, 0.1,
                     "empty queue")
    except L.TestFailure:
        fail("queue not empty after %.0f s: %s" % (
            timeout * L.SLOW, d.relayctl("queue")))


def dsn_parts(raw):
    """(message, [per-recipient field blocks]) of an RFC 3464 report."""
    msg = email.message_from_string(raw.decode("utf-8", "replace"),
                                    policy=email.policy.compat32)
    eq(msg.get_content_type(), "multipart/report", "DSN content type")
    kind = msg.get_param("report-type")
    check(kind in ("delivery-status", "global-delivery-status"),
          "DSN report-type %r" % kind)
    ds = [p for p in msg.walk()
          if p.get_content_type() == "message/" + kind]
    eq(len(ds), 1, "message/%s parts" % kind)
    blocks = ds[0].get_payload()
    if kind == "global-delivery-status":
        # The email package parses message/global-delivery-status (RFC
        # 6533) as one message: split its text into field blocks.
        text = (blocks if isinstance(blocks, str) else
                "".join(b.as_string() for b in blocks))
        text = text.replace("\r\n", "\n")
        blocks = [email.message_from_string(b.strip("\n") + "\n\n")
                  for b in re.split(r"\n\s*\n", text) if b.strip()]
    check(isinstance(blocks, list) and len(blocks) >= 2,
          "delivery-status has no per-recipient fields: %r" % blocks)
    return msg, blocks[1:]


def dsn_status_of(raw, kind="delivery-status"):
    """{final recipient: (Action, Status, Diagnostic-Code)} of a DSN whose
    report-type is kind."""
    msg, blocks = dsn_parts(raw)
    eq(msg.get_param("report-type"), kind, "DSN report-type")
    out = {}
    for b in blocks:
        fr = (b.get("Final-Recipient") or "").split(";", 1)[-1].strip()
        out[fr] = (b.get("Action", "").strip(), b.get("Status", "").strip(),
                   " ".join((b.get("Diagnostic-Code") or "").split()))
    return out


def assert_alive(d):
    check(d.running(), "relayd is not running (exit %s)" % d.exit_code)
    st = d.status()
    check(isinstance(st, dict), "status: %r" % st)


def assert_no_bounce(d, mx):
    eq([m for m in mx.messages() if m["from"] == ""], [],
       "bounces at the fake MX")
    eq(L.log_events(d.read_log(), "dsn queued"), [], "dsn queued lines")


# ---------------------------------------------------------------------------
# 1. The happy path.

def test_happy_path_swaks_starttls_auth():
    """swaks (STARTTLS + AUTH PLAIN) -> relayd -> fake MX: the delivered
    body is relayd's Received: field followed by exactly the bytes swaks
    sent (dot-stuffing undone on both hops); the queue empties."""
    tmp = tempfile.mkdtemp(prefix="relay-it-data-")
    try:
        data = os.path.join(tmp, "msg.eml")
        with open(data, "wb") as f:
            f.write(b"From: S <sender@src.test>\nTo: R <rcpt@example.test>\n"
                    b"Subject: happy path\n"
                    b"Date: Mon, 24 Nov 2025 05:00:00 +0000\n"
                    b"Message-ID: <happy-1@src.test>\n\nline one\n"
                    b".leading dot\n..two dots\n.\n" + b"x" * 900 +
                    b"\nlast line\n")
        with Dnsmasq(BASE_ZONE) as dns, FakeMX(keep=True) as mx, \
                relayd(dns, mx) as d:
            args = ["--helo", "client.test", "--from", SENDER,
                    "--to", "rcpt@example.test", "--data", data,
                    "--timeout", "20"]
            # The reference: the same swaks run straight into the fake MX
            # gives the exact bytes swaks submits.
            rc, out = L.run_swaks(["--server", mx.addr("mx2"), "--port",
                                   str(mx.port)] + args)
            check(rc == 0, "swaks to fake-mx:\n" + out)
            ref = mx.body(mx.wait_messages(1)[0])
            check(b"\r\n.leading dot\r\n..two dots\r\n.\r\n" in ref,
                  "reference body not unstuffed: %r" % ref)
            rc, out = L.run_swaks(["--port", str(d.port("sub")), "--tls",
                                   "--auth", "PLAIN", "--auth-user", L.USER,
                                   "--auth-password", L.PASSWORD] + args)
            check(rc == 0, "swaks to relayd:\n" + out)
            qid = re.findall(r"250 2\.0\.0 Ok: queued as ([0-9a-f]{16})", out)
            eq(len(qid), 1, "queued replies from relayd")
            msgs = mx.wait_messages(2)
            m = msgs[1]
            eq(m["listener"], "mx1", "delivered to example.test's MX")
            eq(m["from"], SENDER, "MAIL FROM")
            eq(m["rcpts"], ["rcpt@example.test"], "RCPT TO")
            eq(m["helo"], "relay.test", "relayd's EHLO name")
            got = mx.body(m)
            check(got.startswith(b"Received: "),
                  "delivered body does not start with Received: %r" %
                  got[:80])
            received, rest = L.split_received(got)
            check(b"ESMTPSA" in received, "Received: %r" % received)
            check(rest == ref, "delivered body is not Received: + the "
                  "submitted bytes:\n%r\nvs\n%r" % (rest[:300], ref[:300]))
            eq(m["size"], len(got), "size")
            r = wait_results(d, "rcpt@example.test", "sent")[0]
            eq((r["id"], r["host"], r["addr"], r["code"], r["attempt"]),
               (qid[0], "mx1.example.test", "127.0.0.2", "250", "1"),
               "dlv result")
            wait_queue_empty(d)
            eq(len(mx.messages()), 2, "messages at the fake MX")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# 2-4. Choosing the MX host.

TWO_MX = [
    Dnsmasq.mx("two.test", "mx1.two.test", 10),
    Dnsmasq.mx("two.test", "mx2.two.test", 20),
    Dnsmasq.host("mx1.two.test", "127.0.0.2"),
    Dnsmasq.host("mx2.two.test", "127.0.0.3"),
]


def test_preferred_mx_421_falls_back():
    """The preferred MX greets with 421: delivered by the second one, and
    the first one really was tried first."""
    with Dnsmasq(BASE_ZONE + TWO_MX) as dns, \
            FakeMX(rules="@mx1 connect 421 4.7.0 busy") as mx, \
            relayd(dns, mx) as d:
        qid = submit(d, SENDER, ["a@two.test"], body_for("two-mx"))
        m = mx.wait_messages(1)[0]
        eq((m["listener"], m["rcpts"]), ("mx2", ["a@two.test"]),
           "delivered via")
        eq([c["listener"] for c in mx.records("connect")][:1], ["mx1"],
           "first connection (preference 10 first)")
        r = wait_results(d, "a@two.test", "sent")[0]
        eq((r["id"], r["host"], r["attempt"]), (qid, "mx2.two.test", "1"),
           "dlv result")
        hf = L.log_events(d.read_log(), "dlv host-failed")
        check(any(h.get("host") == "mx1.two.test" and h.get("code") == "421"
                  and h.get("action") == "next-host" for h in hf),
              "no host-failed line for mx1: %r" % hf)
        wait_queue_empty(d)
        eq(len(mx.messages()), 1, "messages")


def test_preferred_mx_not_listening():
    """The preferred MX address has nothing listening: connection refused,
    delivered by the second MX at once (no retry)."""
    zone = BASE_ZONE + [
        Dnsmasq.mx("dead.test", "mx0.dead.test", 5),
        Dnsmasq.mx("dead.test", "mx2.dead.test", 20),
        Dnsmasq.host("mx0.dead.test", "127.0.0.4"),
        Dnsmasq.host("mx2.dead.test", "127.0.0.3"),
    ]
    with Dnsmasq(zone) as dns, FakeMX() as mx, relayd(dns, mx) as d:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.4", mx.port))
            fail("something listens on 127.0.0.4:%d" % mx.port)
        except ConnectionRefusedError:
            pass
        finally:
            s.close()
        submit(d, SENDER, ["b@dead.test"], body_for("dead-mx"))
        m = mx.wait_messages(1)[0]
        eq((m["listener"], m["rcpts"]), ("mx2", ["b@dead.test"]),
           "delivered via")
        r = wait_results(d, "b@dead.test", "sent")[0]
        eq((r["host"], r["addr"], r["attempt"]),
           ("mx2.dead.test", "127.0.0.3", "1"), "dlv result")
        hf = L.log_events(d.read_log(), "dlv host-failed")
        check(any(h.get("addr", "").startswith("127.0.0.4") and
                  h.get("phase") == "connect" for h in hf),
              "no connect failure logged for 127.0.0.4: %r" % hf)
        wait_queue_empty(d)


def test_implicit_mx():
    """A domain with only an A record is its own MX (RFC 5321 5.1)."""
    zone = BASE_ZONE + [Dnsmasq.host("implicit.test", "127.0.0.2")]
    with Dnsmasq(zone) as dns, FakeMX() as mx, relayd(dns, mx) as d:
        submit(d, SENDER, ["c@implicit.test"], body_for("implicit"))
        m = mx.wait_messages(1)[0]
        eq((m["listener"], m["rcpts"]), ("mx1", ["c@implicit.test"]),
           "delivered via")
        r = wait_results(d, "c@implicit.test", "sent")[0]
        eq(r["host"], "implicit.test", "host")
        wait_queue_empty(d)


# ---------------------------------------------------------------------------
# 5-7. Bounces and retries.

def test_null_mx_and_nxdomain_bounce():
    """Null MX -> 5.1.10, NXDOMAIN -> 5.1.2: the recipients are bounced and
    DSNs (multipart/report) reach the sender's MX from <>; a recipient of
    the same message at a good domain is delivered. A message from the
    null sender to a null-MX domain is dropped without a bounce."""
    zone = BASE_ZONE + [Dnsmasq.null_mx("nullmx.test")]
    with Dnsmasq(zone) as dns, FakeMX(keep=True) as mx, \
            relayd(dns, mx) as d:
        qid = submit(d, SENDER, ["a@nullmx.test", "b@nx.test",
                                 "ok@example.test"], body_for("null-nx"))
        ra = wait_results(d, "a@nullmx.test", "bounced")[0]
        eq(ra["enh"], "5.1.10", "null MX status")
        rb = wait_results(d, "b@nx.test", "bounced")[0]
        eq(rb["enh"], "5.1.2", "NXDOMAIN status")
        wait_results(d, "ok@example.test", "sent")
        wait_queue_empty(d)
        # One report per failed destination today; one combined report
        # would be as good: each failed recipient in exactly one report.
        def reported():
            n = 0
            for m in mx.messages():
                if m["from"] == "":
                    n += len(dsn_status_of(mx.body(m)))
            return n >= 2
        L.wait_until(reported, 10.0, 0.05, "bounces for both recipients")
        time.sleep(0.5)
        dsns = [m for m in mx.messages() if m["from"] == ""]
        check(1 <= len(dsns) <= 2, "%d bounces" % len(dsns))
        seen, count = {}, {}
        for m in dsns:
            eq((m["listener"], m["rcpts"]), ("mx2", [SENDER]),
               "bounce envelope")
            st = dsn_status_of(mx.body(m))
            for k in st:
                count[k] = count.get(k, 0) + 1
            seen.update(st)
        eq(count, {"a@nullmx.test": 1, "b@nx.test": 1},
           "reports per failed recipient")
        eq(seen["a@nullmx.test"][:2], ("failed", "5.1.10"), "null MX DSN")
        eq(seen["b@nx.test"][:2], ("failed", "5.1.2"), "NXDOMAIN DSN")
        dq = L.log_events(d.read_log(), "dsn queued")
        eq({x["id"] for x in dq}, {qid}, "dsn queued lines")
        eq(len(dq), len(dsns), "dsn queued lines")
        good = [m for m in mx.messages() if m["from"] == SENDER]
        eq([m["rcpts"] for m in good], [["ok@example.test"]],
           "the good recipient")

        # The null sender: bounced, but never a bounce of a bounce.
        n_before = len(mx.messages())
        qid2 = submit(d, "", ["c@nullmx.test"], body_for("null-sender"))
        r = wait_results(d, "c@nullmx.test", "bounced")[0]
        eq((r["id"], r["enh"]), (qid2, "5.1.10"), "null-sender result")
        wait_queue_empty(d)
        time.sleep(1.0)
        eq([x for x in L.log_events(d.read_log(), "dsn queued")
            if x["id"] == qid2], [], "dsn queued for a null sender")
        eq(len(mx.messages()), n_before, "messages after a null-sender "
           "bounce")


def test_4xx_then_success():
    """451 at RCPT on the first attempt only: deferred (the queue shows
    the attempt, the reply and the retry time), delivered on the second
    attempt, once."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="rcpt ~later@ first 1 451 4.2.0 try later") as mx, \
            relayd(dns, mx, retry_schedule=[3]) as d:
        t0 = time.time()
        qid = submit(d, SENDER, ["later@example.test"], body_for("later"))
        r1 = wait_results(d, "later@example.test", "deferred")[0]
        eq((r1["id"], r1["code"], r1["enh"], r1["attempt"]),
           (qid, "451", "4.2.0", "1"), "first attempt")
        # The retry is >= 2 s away: the queue shows the deferral.
        q = L.wait_until(
            lambda: (lambda q: q if q["count"] == 1 and
                     q["messages"][0]["recipients"][0]["attempts"] == 1
                     else None)(d.queue_json()), 2.0, 0.05,
            "attempts=1 in relayctl queue --json")
        rc = q["messages"][0]["recipients"][0]
        eq((rc["state"], rc["last_reply"]),
           ("pending", "451 4.2.0 try later"), "queued recipient")
        check(rc["next_attempt"] >= int(t0) + 2,
              "next_attempt %r too early (submitted at %d)" % (
                  rc["next_attempt"], t0))
        r2 = wait_results(d, "later@example.test", "sent", timeout=15)[0]
        eq(r2["attempt"], "2", "attempt of the delivery")
        wait_queue_empty(d)
        msgs = mx.messages()
        eq([m["rcpts"] for m in msgs], [["later@example.test"]], "messages")
        eq(len([x for x in mx.records("rcpt")
                if "later@" in x.get("arg", "")]), 2, "RCPT commands")
        assert_no_bounce(d, mx)


def test_5xx_bounce_others_delivered():
    """550 for one recipient: it is bounced with one DSN (status, remote
    MTA, diagnostic), the other recipients of the message are delivered
    in the same transaction."""
    rcpts = ["ok1@example.test", "bounce@example.test", "ok2@example.test"]
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="rcpt ~bounce@ 550 5.1.1 No such user",
                   keep=True) as mx, relayd(dns, mx) as d:
        qid = submit(d, SENDER, rcpts, body_for("bounce"))
        r = wait_results(d, "bounce@example.test", "bounced")[0]
        eq((r["id"], r["code"], r["enh"]), (qid, "550", "5.1.1"), "bounce")
        for ok in ("ok1@example.test", "ok2@example.test"):
            wait_results(d, ok, "sent")
        wait_queue_empty(d)
        mx.wait_records("message", 1, pred=lambda m: m["from"] == "",
                        what="the bounce")
        time.sleep(0.5)
        orig = [m for m in mx.messages() if m["from"] == SENDER]
        eq([(m["listener"], m["rcpts"]) for m in orig],
           [("mx1", ["ok1@example.test", "ok2@example.test"])],
           "the original, delivered once")
        dsns = [m for m in mx.messages() if m["from"] == ""]
        eq(len(dsns), 1, "bounces")
        eq((dsns[0]["listener"], dsns[0]["rcpts"]), ("mx2", [SENDER]),
           "bounce envelope")
        raw = mx.body(dsns[0])
        st = dsn_status_of(raw)
        eq(list(st), ["bounce@example.test"], "DSN recipients")
        action, status, diag = st["bounce@example.test"]
        eq((action, status), ("failed", "5.1.1"), "DSN action/status")
        check("550 5.1.1 No such user" in diag, "Diagnostic-Code %r" % diag)
        check(b"Remote-MTA: dns; mx1.example.test" in raw,
              "DSN does not name the MX")


def test_undeliverable_bounce_is_dropped():
    """The sender's own domain does not exist: the bounce (from <>) to it
    fails too, and is dropped - no bounce of a bounce, no loop; the queue
    empties."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="rcpt ~bounce@ 550 5.1.1 No such user") as mx, \
            relayd(dns, mx) as d:
        qid = submit(d, "someone@nx.test", ["bounce@example.test"],
                     body_for("double-bounce"))
        wait_results(d, "bounce@example.test", "bounced")
        r = wait_results(d, "someone@nx.test", "bounced")[0]
        check(r["id"] != qid, "the second bounce is about the DSN")
        eq(r["enh"], "5.1.2", "status of the bounce's failure")
        wait_queue_empty(d)
        time.sleep(0.5)
        eq([x["id"] for x in L.log_events(d.read_log(), "dsn queued")],
           [qid], "dsn queued lines")
        eq(mx.messages(), [], "messages")
        eq(len(L.dlv_results(d.read_log())), 2, "dlv results")


# ---------------------------------------------------------------------------
# 8. Connection caps under load.

def _concurrency(mx, key):
    """Highest number of sessions open at once per group key(conn), from
    the record. A session counts from its connect record until the 221
    to QUIT was sent (relayd cannot have started a new session before it
    read that reply) or, without one, its close record. Ends sort before
    starts at equal times (the record has millisecond resolution)."""
    opened = {(r["listener"], r["conn"]): r["t"]
              for r in mx.records("connect")}
    ended = {(r["listener"], r["conn"]): r["t"]
             for r in mx.records("close")}
    for r in mx.records("reply"):
        if r.get("phase") == "quit":
            c = (r["listener"], r["conn"])
            ended[c] = min(ended.get(c, r["t"]), r["t"])
    groups = {}
    for c, t in opened.items():
        k = key(c)
        if k is None:
            continue
        groups.setdefault(k, []).append((t, 1))
        groups[k].append((ended.get(c, float("inf")), -1))
    peak = {}
    for k, ev in groups.items():
        ev.sort()
        cur = best = 0
        for _, delta in ev:
            cur += delta
            best = max(best, cur)
        peak[k] = best
    return peak


def _submit_many(d, items, nthreads=4):
    """items: [(rcpt, body)]; pipelined-ish: one connection per thread,
    many messages per connection. Returns the list of errors."""
    errors = []
    chunks = [items[i::nthreads] for i in range(nthreads)]

    def worker(chunk):
        try:
            c = smtplib.SMTP(L.HOST, d.port("plain"),
                             local_hostname="client.test",
                             timeout=30 * L.SLOW)
            for rcpt, body in chunk:
                c.sendmail(SENDER, [rcpt], body)
            c.quit()
        except Exception as e:      # reported by the main thread
            errors.append(repr(e))
    ts = [threading.Thread(target=worker, args=(ch,)) for ch in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120 * L.SLOW)
    if any(t.is_alive() for t in ts):
        errors.append("submission threads still running")
    return errors


def test_connection_caps_1000_messages():
    """1,000 messages for two domains on one MX address, receiver slowed by
    --delay 5: at most 2 sessions per domain and 3 per MX address at any
    time, and every message delivered exactly once."""
    n = 1000
    zone = BASE_ZONE + [
        Dnsmasq.mx("d1.test", "mx.shared.test", 10),
        Dnsmasq.mx("d2.test", "mx.shared.test", 10),
        Dnsmasq.host("mx.shared.test", "127.0.0.2"),
    ]
    with Dnsmasq(zone) as dns, \
            FakeMX(args=["--delay", "5"]) as mx, \
            relayd(dns, mx, max_connections_per_domain=2,
                   max_connections_per_host=3) as d:
        items = [("u%04d@d%d.test" % (i, i % 2 + 1),
                  body_for("caps-%04d" % i, b"x" * 700 + b"\r\n"))
                 for i in range(n)]
        t0 = time.monotonic()
        errors = _submit_many(d, items)
        eq(errors, [], "submission errors")
        t_sub = time.monotonic() - t0
        mx.wait_messages(n, timeout=90)
        wait_queue_empty(d, 30)
        t_all = time.monotonic() - t0
        time.sleep(0.5)
        st = mx.stats()
        msgs = mx.messages()
        per_rcpt = {}
        for m in msgs:
            for r in m["rcpts"]:
                per_rcpt[r] = per_rcpt.get(r, 0) + 1
        eq(len(per_rcpt), n, "distinct recipients delivered")
        dup = {r: c for r, c in per_rcpt.items() if c != 1}
        eq(dup, {}, "recipients delivered more than once")
        eq(len(msgs), n, "message records")
        eq(len({m["sha256"] for m in msgs}), n, "distinct bodies")
        # fake-mx's own peak counts a session until its handle is closed,
        # which can be after it accepted relayd's next connection (libuv
        # runs close callbacks after the poll phase), and several handovers
        # can overlap: it is only reported. The record-based count ends a
        # session when the 221 to QUIT was sent.
        stats_peak = st["listeners"]["mx1"]["peak"]
        dom = {}
        for m in msgs:
            dom[(m["listener"], m["conn"])] = m["rcpts"][0].split("@")[1]
        peak = _concurrency(mx, lambda c: c[0])["mx1"]
        per_dom = _concurrency(mx, lambda c: dom.get(c))
        check(peak <= 3, "max_connections_per_host=3 exceeded: %d sessions "
              "at 127.0.0.2 at once (fake-mx stats peak %d)" % (
                  peak, stats_peak))
        check(peak >= 2, "only %d session at a time with %d messages "
              "queued" % (peak, n))
        eq(st["conns"]["rejected"], 0, "rejected connections")
        for k, v in per_dom.items():
            check(v <= 2, "max_connections_per_domain=2 exceeded: %d "
                  "sessions for %s" % (v, k))
        eq(len(L.dlv_results(d.read_log(), status="sent")), n,
           "sent results in the log")
        print("#   caps: submitted %d in %.1f s, delivered in %.1f s, "
              "peak %d (stats %d), per domain %r, conns %d" % (
                  n, t_sub, t_all, peak, stats_peak, per_dom,
                  st["conns"]["total"]))


test_connection_caps_1000_messages.timeout = 300


# ---------------------------------------------------------------------------
# 9. STARTTLS to the MX.

def _mx_cert(tmp, cn):
    cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                    "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=" + cn,
                    "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    return cert, key


def test_starttls_to_mx():
    tmp = tempfile.mkdtemp(prefix="relay-it-mxcert-")
    try:
        cert, key = _mx_cert(tmp, "mx1.example.test")
        with Dnsmasq(BASE_ZONE) as dns, \
                FakeMX(args=["--tls", "%s:%s" % (cert, key)]) as mx, \
                relayd(dns, mx) as d:
            submit(d, SENDER, ["tls@example.test"], body_for("tls"))
            m = mx.wait_messages(1)[0]
            eq((m["rcpts"], m["tls"]), (["tls@example.test"], True),
               "message over TLS")
            tls = mx.records("tls")
            check(tls and tls[0]["cipher"].startswith("TLSv1."),
                  "tls record %r" % tls)
            r = wait_results(d, "tls@example.test", "sent")[0]
            eq(r["tls"], "yes", "dlv result tls=")
            wait_queue_empty(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# 10. kill -9 in the middle of delivery.

def test_kill9_during_delivery_and_restart():
    """200 messages, slow receiver, relayd killed with SIGKILL part way:
    after a restart on the same spool every message is delivered at
    least once, and duplicates stay within what could be in flight."""
    n = 200
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(args=["--delay", "20"]) as mx, \
            relayd(dns, mx, max_connections_per_domain=5,
                   max_connections_per_host=5) as d:
        items = [("k%03d@example.test" % i, body_for("kill-%03d" % i))
                 for i in range(n)]
        eq(_submit_many(d, items), [], "submission errors")
        mx.wait_messages(40, timeout=30)
        d.kill()
        at_kill = len(mx.messages())
        check(at_kill < n, "all %d delivered before the kill: make the "
              "receiver slower" % n)
        eq(d.exit_code, -9, "relayd exit")
        time.sleep(0.3)
        d.restart()
        wait_queue_empty(d, 60)
        msgs = mx.messages()
        per_rcpt = {}
        for m in msgs:
            for r in m["rcpts"]:
                per_rcpt[r] = per_rcpt.get(r, 0) + 1
        missing = sorted(set(r for r, _ in items) - set(per_rcpt))
        eq(missing, [], "messages never delivered")
        dups = len(msgs) - n
        check(dups <= 10, "%d duplicate deliveries after kill -9 (at most "
              "10 expected with 5 connections)" % dups)
        eq(d.spool_files("queue"), [], "queue/ after the restart")
        assert_no_bounce(d, mx)
        print("#   kill -9: %d delivered at the kill, %d duplicates" % (
            at_kill, dups))


test_kill9_during_delivery_and_restart.timeout = 180


# ---------------------------------------------------------------------------
# 11. Hostile receivers.

HOSTILE = {
    # domain: (listener, address, rule, why the first attempt failed, or
    #          None when it must succeed at once)
    "split.test": ("split", "127.0.0.2", "@split ehlo reply-split", None),
    "garbage.test": ("garbage", "127.0.0.3",
                     "@garbage rcpt first 1 garbage", "malformed reply"),
    # 5000 octets: over relayd's 4096-octet reply line limit.
    "long.test": ("long", "127.0.0.4",
                  "@long rcpt first 1 len 5000 longline", "malformed reply"),
    "dclose.test": ("dclose", "127.0.0.5", "@dclose data first 1 close",
                    "end of file while data"),
    "dotclose.test": ("dotclose", "127.0.0.6", "@dotclose dot first 1 close",
                      "end of file while dot"),
    "stall.test": ("stall", "127.0.0.7", "@stall dot first 1 stall",
                   "timeout while dot"),
}


def test_hostile_receivers():
    """Split replies, garbage, an overlong reply line, a close mid-DATA and
    after the dot, a stall at the dot (delivery.timeouts.dot = 1): relayd
    keeps running, retries what failed and delivers everything once."""
    zone = [Dnsmasq.mx("src.test", "mx.src.test", 10),
            Dnsmasq.host("mx.src.test", "127.0.0.2")]
    for dom, (_, addr, _, _) in HOSTILE.items():
        zone += [Dnsmasq.mx(dom, "mx." + dom, 10), Dnsmasq.host("mx." + dom,
                                                                addr)]
    listeners = {v[0]: v[1] for v in HOSTILE.values()}
    rules = [v[2] for v in HOSTILE.values()]
    with Dnsmasq(zone) as dns, \
            FakeMX(listeners, rules=rules, idle_timeout=5) as mx, \
            relayd(dns, mx, timeouts={"dot": 1}) as d:
        for dom in HOSTILE:
            submit(d, SENDER, ["h@" + dom], body_for("hostile-" + dom))
        for dom, (name, _, rule, why) in HOSTILE.items():
            rcpt = "h@" + dom
            r = wait_results(d, rcpt, "sent", timeout=20)[0]
            eq(r["attempt"], "2" if why else "1",
               "%s (%s): attempt of the delivery" % (dom, rule))
            deferred = L.dlv_results(d.read_log(), rcpt, "deferred")
            eq([(x["code"], x["reply"]) for x in deferred],
               [("0", why)] if why else [], "%s: deferrals" % dom)
        # The byte-by-byte EHLO reply was understood: PIPELINING and SIZE
        # were seen (MAIL carries SIZE=).
        check(any(x.get("action") == "reply-split"
                  for x in mx.records("reply", "split")),
              "no split reply was sent")
        mails = [x["arg"] for x in mx.records("mail", "split")]
        check(mails and all("SIZE=" in a for a in mails),
              "MAIL after a split EHLO reply: %r" % mails)
        wait_queue_empty(d)
        assert_alive(d)
        msgs = mx.messages()
        for dom, (name, _, _, _) in HOSTILE.items():
            got = [m for m in msgs if m["rcpts"] == ["h@" + dom]]
            eq([m["listener"] for m in got], [name],
               "%s: delivered exactly once" % dom)
        eq(len(msgs), len(HOSTILE), "messages")
        assert_no_bounce(d, mx)


test_hostile_receivers.timeout = 120


# ---------------------------------------------------------------------------
# 12. An MX that is ourselves.

def test_mx_loops_back_to_self():
    """loop.test's MX is 127.0.0.1 and delivery.port is relayd's own
    listener port: bounced with 5.4.6 (DSN to the sender), never a
    connection to itself."""
    zone = BASE_ZONE + [Dnsmasq.mx("loop.test", "mx.loop.test", 10),
                        Dnsmasq.host("mx.loop.test", "127.0.0.1")]
    with Dnsmasq(zone) as dns, FakeMX(keep=True, also_free=["127.0.0.1"]) \
            as mx:
        listeners = [dict(name="plain", tls="none", auth_required=False,
                          port=mx.port)]
        with relayd(dns, mx, listeners=listeners) as d:
            eq(d.port("plain"), mx.port, "listener port = delivery port")
            qid = submit(d, SENDER, ["x@loop.test"], body_for("loop"))
            r = wait_results(d, "x@loop.test", "bounced")[0]
            eq((r["id"], r["enh"]), (qid, "5.4.6"), "loop result")
            wait_queue_empty(d)
            dsn = mx.wait_records("message", 1,
                                  pred=lambda m: m["from"] == "")[0]
            eq(dsn["rcpts"], [SENDER], "bounce recipient")
            st = dsn_status_of(mx.body(dsn))
            eq(st["x@loop.test"][:2], ("failed", "5.4.6"), "DSN status")
            assert_alive(d)
            eq(len(re.findall(r" smtp connect ", d.read_log())), 1,
               "SMTP sessions relayd accepted (only the submission)")


# ---------------------------------------------------------------------------
# 13. SMTPUTF8 to a server without it.

def test_smtputf8_to_server_without_it():
    """An SMTPUTF8 message for an MX that does not offer SMTPUTF8 is
    bounced with 5.6.7 (RFC 6531 3.5) without being sent; the DSN goes to
    the sender's MX (a second fake MX on the same port that has it)."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX({"mx1": "127.0.0.2"}, args=[
                "--ehlo-ext", "PIPELINING,8BITMIME,ENHANCEDSTATUSCODES"]) \
            as mx1, \
            FakeMX({"mx2": "127.0.0.3"}, keep=True, port=mx1.port) as mx2, \
            relayd(dns, mx1) as d:
        body = ("From: Jos\u00e9 <sender@src.test>\r\nSubject: caf\u00e9"
                "\r\n\r\nna\u00efve\r\n").encode()
        qid = submit(d, SENDER, ["jos\u00e9@example.test"], body,
                     mail_options=["SMTPUTF8"])
        r = wait_results(d, "jos\u00e9@example.test", "bounced")[0]
        eq((r["id"], r["enh"]), (qid, "5.6.7"), "result")
        wait_queue_empty(d)
        dsn = mx2.wait_records("message", 1)[0]
        eq((dsn["from"], dsn["rcpts"]), ("", [SENDER]), "bounce envelope")
        # A UTF-8 recipient: an RFC 6533 report.
        st = dsn_status_of(mx2.body(dsn), "global-delivery-status")
        eq([(k,) + v[:2] for k, v in st.items()],
           [("jos\u00e9@example.test", "failed", "5.6.7")], "DSN")
        check(any("SMTPUTF8" in x.get("arg", "") for x in mx2.records("mail")),
              "the DSN (UTF-8 content) was not sent with SMTPUTF8: %r" %
              mx2.records("mail"))
        eq(mx1.messages(), [], "messages at the MX without SMTPUTF8")
        eq(mx1.records("mail"), [], "MAIL commands at that MX")


# ---------------------------------------------------------------------------
# Beyond the list: per-host cap with MX fallback, SIGTERM mid-delivery,
# a dead DNS server, delay warnings.

def test_per_host_cap_with_mx_fallback():
    """two.test: mx1 (127.0.0.2) greets 421, mx2 (127.0.0.3) takes the
    mail; max_connections_per_host = 2 must hold at mx2 too. (A session
    charged to the first address it was given, rather than the one it
    connects to, let mx2 get twice the cap: 4 sessions.)"""
    zone = BASE_ZONE + TWO_MX
    with Dnsmasq(zone) as dns, \
            FakeMX(rules="@mx1 connect 421 4.7.0 busy",
                   args=["--delay", "20"]) as mx, \
            relayd(dns, mx, max_connections_per_domain=10,
                   max_connections_per_host=2) as d:
        n = 60
        items = [("f%03d@two.test" % i, body_for("fallback-%d" % i))
                 for i in range(n)]
        eq(_submit_many(d, items), [], "submission errors")
        mx.wait_messages(n, timeout=60)
        wait_queue_empty(d, 30)
        per_host = _concurrency(mx, lambda c: c[0])
        eq(len({r for m in mx.messages() for r in m["rcpts"]}), n,
           "delivered")
        check(per_host.get("mx2", 0) <= 2,
              "DAEMON BUG: max_connections_per_host=2 exceeded at the "
              "fallback MX: %d sessions at once at 127.0.0.3 (mx1: %d); "
              "a session must be charged to the address it connects to, "
              "not the first one it was given" % (
                  per_host.get("mx2", 0), per_host.get("mx1", 0)))


test_per_host_cap_with_mx_fallback.timeout = 120


def test_shared_mx_slot_wakes_other_domain():
    """d1.test and d2.test share one MX address, max_connections_per_host
    = 1. A d1 message queued while a d2 session holds the address's only
    slot must go out once that session ends: the freed slot has to wake
    the other destination, not only the one whose session closed."""
    zone = BASE_ZONE + [
        Dnsmasq.mx("d1.test", "mx.shared.test", 10),
        Dnsmasq.mx("d2.test", "mx.shared.test", 10),
        Dnsmasq.host("mx.shared.test", "127.0.0.2"),
    ]
    with Dnsmasq(zone) as dns, FakeMX(args=["--delay", "50"]) as mx, \
            relayd(dns, mx, max_connections_per_host=1) as d:
        submit(d, SENDER, ["a@d2.test"], body_for("slot-d2"))
        mx.wait_records("connect", 1)
        submit(d, SENDER, ["b@d1.test"], body_for("slot-d1"))
        wait_results(d, "a@d2.test", "sent")
        try:
            wait_results(d, "b@d1.test", "sent", timeout=5)
        except L.TestFailure:
            fail("DAEMON BUG: the d1.test message stays queued (never "
                 "tried) after the d2.test session freed the shared MX "
                 "address's only slot: sched_on_closed() kicks only the "
                 "closing session's destination and those starved by the "
                 "global cap, so a destination that found every host at "
                 "its per-host cap (sched_kick: nh == 0) is never woken. "
                 "queue: %s" % " ".join(d.relayctl("queue").split()))
        wait_queue_empty(d)
        eq(sorted(m["rcpts"][0] for m in mx.messages()),
           ["a@d2.test", "b@d1.test"], "delivered")


def test_global_cap_serves_every_domain():
    """max_connections = 2 over three domains (three MX addresses): at
    most 2 sessions at once in all, and every domain is served (a
    destination that waited for a global slot gets one)."""
    doms = {"g1.test": ("g1", "127.0.0.2"), "g2.test": ("g2", "127.0.0.3"),
            "g3.test": ("g3", "127.0.0.4")}
    zone = BASE_ZONE[:]
    for dom, (_, addr) in doms.items():
        zone += [Dnsmasq.mx(dom, "mx." + dom, 10),
                 Dnsmasq.host("mx." + dom, addr)]
    with Dnsmasq(zone) as dns, \
            FakeMX({v[0]: v[1] for v in doms.values()},
                   args=["--delay", "10"]) as mx, \
            relayd(dns, mx, max_connections=2,
                   max_connections_per_domain=2) as d:
        items = [("x%02d@%s" % (i, dom), body_for("g-%s-%d" % (dom, i)))
                 for i in range(8) for dom in doms]
        eq(_submit_many(d, items), [], "submission errors")
        mx.wait_messages(len(items), timeout=60)
        wait_queue_empty(d, 30)
        got = sorted(r for m in mx.messages() for r in m["rcpts"])
        eq(got, sorted(r for r, _ in items), "each recipient once")
        peak = _concurrency(mx, lambda c: "all")["all"]
        check(peak <= 2, "max_connections=2 exceeded: %d sessions" % peak)


def test_reload_changes_delivery_port():
    """delivery.port points where nothing listens: the message is
    deferred. SIGHUP with the fake MX's port: the retry delivers it."""
    with Dnsmasq(BASE_ZONE) as dns, FakeMX() as mx:
        dead = L.free_ports(["127.0.0.2"])[0]
        with relayd(dns, dead) as d:
            qid = submit(d, SENDER, ["hup@example.test"], body_for("hup"))
            r = wait_results(d, "hup@example.test", "deferred")[0]
            eq(r["id"], qid, "deferral")
            d.delivery["port"] = mx.port
            start = d.log_size()
            d.write_config()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded", start=start)
            r = wait_results(d, "hup@example.test", "sent", timeout=15)[0]
            check(int(r["attempt"]) >= 2, "attempt %s" % r["attempt"])
            wait_queue_empty(d)
            eq([m["rcpts"] for m in mx.messages()], [["hup@example.test"]],
               "messages")


def test_sigterm_during_delivery():
    """SIGTERM while a session waits for the reply to the dot: relayd
    aborts the session and exits 0 within the shutdown timeout; after a
    restart the message is delivered (attempt 2), once."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="dot first 1 stall", idle_timeout=5) as mx, \
            relayd(dns, mx) as d:
        qid = submit(d, SENDER, ["term@example.test"], body_for("term"))
        mx.wait_records("data", 1)
        time.sleep(0.3)           # the body is out, the dot unanswered
        t0 = time.monotonic()
        rc = d.stop(timeout=10)
        eq(rc, 0, "exit code on SIGTERM during delivery")
        dt = time.monotonic() - t0
        check(dt < 6 * L.SLOW, "SIGTERM took %.1f s" % dt)
        d.assert_clean_log()
        eq(d.queue_ids(), [qid], "queue after the stop")
        eq(mx.messages(), [], "messages before the restart")
        d.restart()
        r = wait_results(d, "term@example.test", "sent", timeout=15)[0]
        eq((r["id"], r["attempt"]), (qid, "2"), "delivery after restart")
        wait_queue_empty(d)
        eq([m["rcpts"] for m in mx.messages()], [["term@example.test"]],
           "messages")


def test_dns_server_down_then_up():
    """No answer from the name server: a temporary failure (4.4.3,
    deferred, not cached); once the server is up, the retry delivers."""
    port = Dnsmasq.free_port()
    with FakeMX() as mx, \
            RelayD(dns={"servers": ["127.0.0.1:%d" % port], "timeout": 0.5,
                        "tries": 1},
                   delivery=delivery_conf(mx, retry_schedule=[2])) as d:
        qid = submit(d, SENDER, ["dns@example.test"], body_for("dns-down"))
        r = wait_results(d, "dns@example.test", "deferred", timeout=15)[0]
        eq((r["id"], r["enh"]), (qid, "4.4.3"), "deferral")
        with Dnsmasq(BASE_ZONE, port=port):
            r = wait_results(d, "dns@example.test", "sent", timeout=20)[0]
            check(int(r["attempt"]) >= 2, "attempt %s" % r["attempt"])
            wait_queue_empty(d)
        eq([m["rcpts"] for m in mx.messages()], [["dns@example.test"]],
           "messages")
        eq([m for m in mx.messages() if m["from"] == ""], [], "bounces")


def test_delay_warning_once():
    """delivery.delay_warning = 1: a recipient still deferred when the
    message is 1 s old gets one "delayed" DSN (Action: delayed, the 4xx
    status), not one per retry; then it is delivered, with no failure
    report."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="rcpt ~slow@ first 3 451 4.2.0 slow down",
                   keep=True) as mx, \
            relayd(dns, mx, delay_warning=1) as d:
        qid = submit(d, SENDER, ["slow@example.test"], body_for("slow"))
        r = wait_results(d, "slow@example.test", "sent", timeout=20)[0]
        eq((r["id"], r["attempt"]), (qid, "4"), "delivered on attempt 4")
        wait_queue_empty(d)
        time.sleep(0.5)
        dsns = [m for m in mx.messages() if m["from"] == ""]
        eq(len(dsns), 1, "delay reports")
        eq(dsns[0]["rcpts"], [SENDER], "report recipient")
        st = dsn_status_of(mx.body(dsns[0]))
        eq(st["slow@example.test"][:2], ("delayed", "4.2.0"), "DSN fields")
        orig = [m for m in mx.messages() if m["from"] == SENDER]
        eq([m["rcpts"] for m in orig], [["slow@example.test"]], "original")


def test_tls_required_skips_plain_mx():
    """delivery.tls = "required": the preferred MX offers no STARTTLS, so
    it is skipped; the second one (a second fake-mx with --tls on the same
    port) gets the message over TLS."""
    tmp = tempfile.mkdtemp(prefix="relay-it-mxcert-")
    try:
        cert, key = _mx_cert(tmp, "mx2.two.test")
        with Dnsmasq(BASE_ZONE + TWO_MX) as dns, \
                FakeMX({"mx1": "127.0.0.2"}) as mx1, \
                FakeMX({"mx2": "127.0.0.3"}, port=mx1.port,
                       args=["--tls", "%s:%s" % (cert, key)]) as mx2, \
                relayd(dns, mx1, tls="required") as d:
            submit(d, SENDER, ["req@two.test"], body_for("tls-required"))
            m = mx2.wait_messages(1)[0]
            eq((m["rcpts"], m["tls"]), (["req@two.test"], True), "via mx2")
            r = wait_results(d, "req@two.test", "sent")[0]
            eq((r["host"], r["tls"], r["attempt"]),
               ("mx2.two.test", "yes", "1"), "dlv result")
            eq(mx1.records("mail"), [], "MAIL at the MX without STARTTLS")
            check(mx1.records("ehlo"), "mx1 was not tried first")
            wait_queue_empty(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_mail_5xx_bounces_whole_transaction():
    """550 to MAIL FROM: every recipient of the transaction is bounced,
    in one DSN."""
    rcpts = ["m1@example.test", "m2@example.test"]
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="mail ~<sender@src 550 5.7.1 sender rejected",
                   keep=True) as mx, relayd(dns, mx) as d:
        submit(d, SENDER, rcpts, body_for("mail-550"))
        for r in rcpts:
            x = wait_results(d, r, "bounced")[0]
            eq((x["code"], x["enh"]), ("550", "5.7.1"), r)
        wait_queue_empty(d)
        dsn = mx.wait_records("message", 1,
                              pred=lambda m: m["from"] == "")
        time.sleep(0.3)
        eq(len([m for m in mx.messages() if m["from"] == ""]), 1, "DSNs")
        st = dsn_status_of(mx.body(dsn[0]))
        eq(sorted(st), rcpts, "DSN recipients")
        for r in rcpts:
            eq(st[r][:2], ("failed", "5.7.1"), r)
        eq(len(mx.records("rcpt")), 2 + 1, "RCPTs (the DSN's included)")


def test_ehlo_refused_helo_fallback():
    """A server that refuses EHLO (502) gets HELO (RFC 5321 3.2) and the
    message without ESMTP extensions (no SIZE=, no pipelining needed)."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="ehlo first 1 502 5.5.2 no EHLO here") as mx, \
            relayd(dns, mx) as d:
        submit(d, SENDER, ["helo@example.test"], body_for("helo"))
        m = mx.wait_messages(1)[0]
        eq(m["rcpts"], ["helo@example.test"], "delivered")
        eh = mx.records("ehlo")
        eq([x.get("verb", "EHLO") for x in eh], ["EHLO", "HELO"],
           "greetings")
        mails = [x["arg"] for x in mx.records("mail")]
        eq(mails, ["<%s>" % SENDER], "MAIL without parameters")
        eq(wait_results(d, "helo@example.test", "sent")[0]["attempt"], "1",
           "attempt")
        wait_queue_empty(d)


def test_size_limit_bounce():
    """The MX announces SIZE 200 and the message is bigger: bounced 5.3.4
    without a MAIL command (RFC 1870)."""
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX({"mx1": "127.0.0.2"}, args=[
                "--ehlo-ext", "PIPELINING,SIZE 200,ENHANCEDSTATUSCODES"]) \
            as mx1, \
            FakeMX({"mx2": "127.0.0.3"}, keep=True, port=mx1.port) as mx2, \
            relayd(dns, mx1) as d:
        submit(d, SENDER, ["big@example.test"],
               body_for("big", b"y" * 500 + b"\r\n"))
        r = wait_results(d, "big@example.test", "bounced")[0]
        eq((r["code"], r["enh"]), ("552", "5.3.4"), "result")
        wait_queue_empty(d)
        eq(mx1.records("mail"), [], "MAIL at the small MX")
        dsn = mx2.wait_messages(1)[0]
        st = dsn_status_of(mx2.body(dsn))
        eq(st["big@example.test"][:2], ("failed", "5.3.4"), "DSN")


def test_server_recipient_limit_452():
    """The MX takes 2 recipients per transaction (452 4.5.3 beyond): the
    rest are retried in later transactions, each delivered once."""
    rcpts = ["r%d@example.test" % i for i in range(5)]
    with Dnsmasq(BASE_ZONE) as dns, FakeMX(args=["-m", "2"]) as mx, \
            relayd(dns, mx) as d:
        submit(d, SENDER, rcpts, body_for("rcpt-limit"))
        for r in rcpts:
            wait_results(d, r, "sent", timeout=20)
        wait_queue_empty(d)
        got = [r for m in mx.messages() for r in m["rcpts"]]
        eq(sorted(got), rcpts, "recipients delivered once each")
        check(all(len(m["rcpts"]) <= 2 for m in mx.messages()),
              "more than 2 recipients accepted in one message")
        deferred = L.dlv_results(d.read_log(), status="deferred")
        check(deferred and all(x["code"] == "452" for x in deferred),
              "deferrals: %r" % deferred)
        assert_no_bounce(d, mx)


def test_transaction_and_connection_limits():
    """max_recipients_per_transaction = 2 splits 5 recipients into 3
    transactions; max_messages_per_connection = 2 ends each connection
    after 2 transactions."""
    rcpts = ["t%d@example.test" % i for i in range(5)]
    with Dnsmasq(BASE_ZONE) as dns, FakeMX() as mx, \
            relayd(dns, mx, max_recipients_per_transaction=2,
                   max_messages_per_connection=2,
                   max_connections_per_domain=1) as d:
        submit(d, SENDER, rcpts, body_for("limits"))
        for i in range(3):
            submit(d, SENDER, ["u%d@example.test" % i],
                   body_for("limits-%d" % i))
        want = rcpts + ["u%d@example.test" % i for i in range(3)]
        for r in want:
            wait_results(d, r, "sent", timeout=20)
        wait_queue_empty(d)
        msgs = mx.messages()
        eq(sorted(r for m in msgs for r in m["rcpts"]), sorted(want),
           "each recipient once")
        eq(sorted(len(m["rcpts"]) for m in msgs
                  if m["rcpts"][0].startswith("t")), [1, 2, 2],
           "recipients per transaction")
        per_conn = {}
        for m in msgs:
            k = (m["listener"], m["conn"])
            per_conn[k] = per_conn.get(k, 0) + 1
        check(max(per_conn.values()) <= 2,
              "transactions per connection: %r" % per_conn)
        check(max(per_conn.values()) == 2,
              "no connection was reused: %r" % per_conn)


def test_large_body_dot_stuffing_across_chunks():
    """A 1.8 MB body made of "." lines and dotted lines: relayd reads the
    body in 64 KiB steps, so the spool file's chunk boundaries fall
    between "\\r" and "\\n", after "\\n" and after "." in turn; the MX
    must get exactly Received: + the submitted bytes."""
    # Date and Message-ID present: relayd adds only its Received: field.
    parts = [b"Subject: dots\r\nFrom: sender@src.test\r\n"
             b"Date: Mon, 24 Nov 2025 05:00:00 +0000\r\n"
             b"Message-ID: <dots@src.test>\r\n\r\n"]
    for i in range(400000):
        parts.append(b".\r\n" if i % 5 else b"..x%d\r\n" % i)
    parts.append(b"end\r\n")
    body = b"".join(parts)
    with Dnsmasq(BASE_ZONE) as dns, FakeMX(keep=True) as mx, \
            relayd(dns, mx) as d:
        submit(d, SENDER, ["big@example.test"], body)
        m = mx.wait_messages(1, timeout=30)[0]
        got = mx.body(m)
        received, rest = L.split_received(got)
        if rest != body:
            i = next((k for k in range(min(len(rest), len(body)))
                      if rest[k] != body[k]), min(len(rest), len(body)))
            fail("body differs at offset %d of %d (delivered %d): %r vs %r"
                 % (i, len(body), len(rest), rest[i - 20:i + 20],
                    body[i - 20:i + 20]))
        wait_queue_empty(d)


def test_421_mid_transaction_retries_all():
    """421 to the second RCPT: the server is closing, so the whole
    transaction (including the recipient already accepted) is retried,
    and each recipient is delivered once. A 421 is a throttle: it moves
    the site, not the message, so the recipients' attempt counters do not
    advance (issue 4) and the first attempt that counts is the delivery."""
    rcpts = ["a1@example.test", "a2@example.test", "a3@example.test"]
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="rcpt ~a2@ first 1 421 4.3.2 shutting down") as mx, \
            relayd(dns, mx) as d:
        submit(d, SENDER, rcpts, body_for("421-rcpt"))
        for r in rcpts:
            x = wait_results(d, r, "throttled")[0]
            eq(x["code"], "421", "%s deferral" % r)
            eq(x["class"], "throttle", "%s class" % r)
            eq(wait_results(d, r, "sent")[0]["attempt"], "1", r)
        wait_queue_empty(d)
        eq([m["rcpts"] for m in mx.messages()], [rcpts], "messages")


def test_busy_mx_no_reconnect_storm():
    """The MX takes one connection at a time (--max-conn 1, greeting 421
    beyond) while relayd may open 3: the extra sessions are refused. That
    is a temporary condition to wait on, not a reason to reconnect at
    once: relayd must not hammer the host with connection attempts."""
    n = 30
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(args=["--delay", "20", "--max-conn", "1"]) as mx, \
            relayd(dns, mx, max_connections_per_domain=3) as d:
        items = [("s%03d@example.test" % i, body_for("busy-%d" % i))
                 for i in range(n)]
        eq(_submit_many(d, items), [], "submission errors")
        mx.wait_messages(n, timeout=60)
        wait_queue_empty(d, 60)
        st = mx.stats()
        eq(len({r for m in mx.messages() for r in m["rcpts"]}), n,
           "delivered")
        assert_alive(d)
        refused = st["conns"]["rejected"]
        check(refused <= 3 * n,
              "DAEMON BUG: reconnect storm: %d connections refused with "
              "421 (--max-conn 1) while delivering %d messages; %d "
              "'dlv host-failed' lines. scheduler.c sched_on_closed() "
              "re-kicks the destination at once when a session that "
              "delivered nothing closes while another session is active "
              "(delivered == 0 && d->active > 0): no back-off" % (
                  refused, n,
                  len(L.log_events(d.read_log(), "dlv host-failed"))))


test_busy_mx_no_reconnect_storm.timeout = 120


def test_mx_always_421_defers():
    """The only MX greets every connection with 421 (overloaded) and
    relayd may open 3 sessions for the domain: every recipient must be
    deferred (attempts = 1, retry in 30 s) after a handful of connection
    attempts, not retried in a loop."""
    n = 10
    with Dnsmasq(BASE_ZONE) as dns, \
            FakeMX(rules="@mx1 connect 421 4.7.0 overloaded") as mx, \
            relayd(dns, mx, max_connections_per_domain=3,
                   retry_schedule=[30], min_retry=30) as d:
        items = [("o%03d@example.test" % i, body_for("overload-%d" % i))
                 for i in range(n)]
        eq(_submit_many(d, items), [], "submission errors")

        def all_deferred():
            q = d.queue_json()
            return q["count"] == n and all(
                r["attempts"] >= 1 for m in q["messages"]
                for r in m["recipients"])
        ok = True
        try:
            L.wait_until(all_deferred, 5.0, 0.1, "every recipient deferred")
        except L.TestFailure:
            ok = False
        st = mx.stats()
        conns = st["conns"]["total"]
        deferred = L.dlv_results(d.read_log(), status="deferred")
        check(ok and conns <= 3 * n,
              "DAEMON BUG: an MX that greets 421 gets %d connections, "
              "%d of %d recipients deferred after %.0f s (all deferred: "
              "%s). scheduler.c sched_on_closed(): a session that "
              "delivered nothing re-kicks the destination while another "
              "session is still active (d->active > 0), so the items are "
              "never failed to the retry heap and sessions reconnect in a "
              "loop" % (conns, len({x["rcpt"] for x in deferred}), n,
                        5 * L.SLOW, ok))
        for x in deferred:
            eq(x["enh"], "4.7.0", "deferral status")
            check("overloaded" in x["reply"], "deferral reply %r" % x)
        eq(mx.messages(), [], "messages")
