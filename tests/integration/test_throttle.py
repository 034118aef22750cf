"""test_throttle.py - adaptive throttling end to end (docs/THROTTLING.md):
relayd against receivers that rate-limit, greylist and block, watched
through the delivery log, `relayctl sites --json`, `relayctl queue --json`,
<spool>/sites.state and fake-mx's record.

Every test runs its own dnsmasq, fake MX(es) on 127.0.0.2.. and relayd
(relaylib), as test_delivery.py does. Sites are named after their MX
hosts (MX rollup): domain thr.test has the site "mx.thr.test".

What the daemon is expected to do (docs/THROTTLING.md, relay/site.c):
- a 421 is a throttle: the site's connection limit and message rate go
  down (one multiplicative cut per 30 s window), the recipient goes back
  to the ready queue without counting an attempt (so does one whose
  transaction was cut off before it was named: status=requeued);
- greylisting defers that recipient only (first retry after
  max(hint, delivery.greylist_retry = 300 s) + jitter), the site is not
  slowed;
- a block ([TS03]) suspends the site: no connection until the end;
- what a site learned survives a restart and a SIGHUP.

Tests whose failure message starts with "DAEMON BUG:" found a defect in
relayd, described there precisely.

Python 3.11 standard library only. Run alone with
    BUILD=build tests/run integration tests/integration/test_throttle.py
"""
import collections
import os
import shutil
import signal
import smtplib
import tempfile
import time

import relaylib as L
from relaylib import Dnsmasq, FakeMX, RelayD, check, eq, fail

SENDER = "sender@src.test"

ZONE = [
    Dnsmasq.mx("thr.test", "mx.thr.test", 10),      # rate-limited
    Dnsmasq.host("mx.thr.test", "127.0.0.2"),
    Dnsmasq.mx("grey.test", "mx.grey.test", 10),    # greylisting
    Dnsmasq.host("mx.grey.test", "127.0.0.2"),
    Dnsmasq.mx("ok.test", "mx.ok.test", 10),        # plain, another MX
    Dnsmasq.host("mx.ok.test", "127.0.0.4"),
    Dnsmasq.mx("sus.test", "mx.sus.test", 10),      # blocks ([TS03])
    Dnsmasq.host("mx.sus.test", "127.0.0.2"),
    Dnsmasq.mx("idle.test", "mx.idle.test", 10),    # slow greeting
    Dnsmasq.host("mx.idle.test", "127.0.0.2"),
    Dnsmasq.mx("src.test", "mx.src.test", 10),      # the sender's domain
    Dnsmasq.host("mx.src.test", "127.0.0.3"),
]

TS03 = ("421 4.7.1 [TS03] All messages from 127.0.0.1 will be permanently "
        "deferred; Retrying will NOT succeed.")


def dns_conf(dns):
    return {"servers": [dns.server], "timeout": 1, "tries": 2}


def relayd(dns, mx, **over):
    """relayd delivering to fake-mx's port; quick ordinary retries, no
    jitter (throttles do not use the retry schedule at all)."""
    dl = {"port": mx.port, "retry_schedule": [1], "min_retry": 1,
          "retry_jitter": 0.0}
    dl.update(over)
    return RelayD(listeners=[dict(name="plain", tls="none",
                                  auth_required=False)],
                  dns=dns_conf(dns), delivery=dl)


def body_for(tag):
    return (b"From: Sender <sender@src.test>\r\nTo: r@thr.test\r\n"
            b"Subject: " + tag.encode() + b"\r\n"
            b"Date: Mon, 24 Nov 2025 05:00:00 +0000\r\n"
            b"Message-ID: <" + tag.encode() + b"@src.test>\r\n\r\n"
            b"body of " + tag.encode() + b"\r\n")


def submit(d, items):
    """items: [(rcpts, body)], all over one SMTP connection."""
    c = smtplib.SMTP(L.HOST, d.port("plain"), local_hostname="client.test",
                     timeout=30 * L.SLOW)
    try:
        for rcpts, body in items:
            refused = c.sendmail(SENDER, rcpts, body)
            eq(refused, {}, "refused recipients")
    finally:
        try:
            c.quit()
        except (smtplib.SMTPException, OSError):
            c.close()


def site(d, name):
    return d.sites().get(name)


def wait_site(d, name, pred, timeout, what):
    return L.wait_until(lambda: (lambda s: s if s and pred(s) else None)(
        site(d, name)), timeout, 0.1, what)


def wait_results(d, rcpt, status, n=1, timeout=15.0):
    return L.wait_until(
        lambda: (lambda rs: rs if len(rs) >= n else None)(
            L.dlv_results(d.read_log(), rcpt, status)),
        timeout, 0.05, "%d dlv result rcpt=%s status=%s" % (n, rcpt, status))


def short(state):
    keys = ("mode", "conn", "conn_max", "rate", "rate_max",
            "suspended_until", "hold_until", "last_signal", "recent",
            "sessions", "waiting")
    return {k: state.get(k) for k in keys}


def throttle_site(d, n, tag):
    """Submit n messages for thr.test to a rate-limited fake MX and wait
    until its site has been cut by a 421. Returns the site's state."""
    submit(d, [(["%s%03d@thr.test" % (tag, i)], body_for("%s-%d" % (tag, i)))
               for i in range(n)])
    return wait_site(d, "mx.thr.test",
                     lambda s: s["mode"] == "throttled" and
                     s["conn"] < s["conn_max"] and
                     s["last_signal"] == "throttle", 20,
                     "site mx.thr.test throttled by a 421")


# ---------------------------------------------------------------------------
# 1. A receiver that allows 2.5 messages/s.

def test_rate_limited_receiver_delivers_all_once():
    """fake-mx --rate 5/2 (5 MAIL per 2 s window, 421 at MAIL beyond):
    40 messages are all delivered, each exactly once; the 421s are logged
    as status=throttled class=throttle; throttles never count as attempts
    (a recipient's delivery is attempt 1 + its non-throttle failures);
    relayctl sites shows the site throttled below its connection ceiling
    while it drains. The receiver only ever says 421 at MAIL, so every
    failure must be a throttle."""
    n = 40
    rcpts = ["t%03d@thr.test" % i for i in range(n)]
    with Dnsmasq(ZONE) as dns, FakeMX(args=["--rate", "5/2"]) as mx, \
            relayd(dns, mx) as d:
        t0 = time.monotonic()
        submit(d, [([r], body_for("thr-%d" % i))
                   for i, r in enumerate(rcpts)])
        snaps = []
        deadline = time.monotonic() + 60 * L.SLOW
        for _ in range(int(60 * L.SLOW / 0.25) + 1):
            s = site(d, "mx.thr.test")
            if s:
                snaps.append(s)
            if len(mx.messages()) >= n and d.queue_count() == 0:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        drain = time.monotonic() - t0
        log = d.read_log()
        msgs = mx.messages()
        st = mx.stats()
        results = L.dlv_results(log)

        # Every message once: no loss, no duplicate.
        got = collections.Counter(r for m in msgs for r in m["rcpts"])
        check(sorted(got) == rcpts,
              "delivered recipients after %.0f s: %d of %d (missing %s); "
              "queue: %d" % (drain, len(got), n,
                             sorted(set(rcpts) - set(got))[:5],
                             d.queue_count()))
        eq([r for r, k in got.items() if k != 1], [], "duplicates")
        eq(len(msgs), n, "messages at the fake MX")
        eq(len({m["sha256"] for m in msgs}), n, "distinct bodies")
        eq(d.queue_count(), 0, "queue at the end")

        # The 421s are throttles.
        thr = [r for r in results if r["status"] == "throttled"]
        check(thr, "no status=throttled line although the fake MX sent %s "
              "421s" % st["replies"].get("421", 0))
        for r in thr:
            eq((r["code"], r["class"]), ("421", "throttle"),
               "throttled line %r" % r)

        # Throttles do not count as attempts.
        by_rcpt = collections.defaultdict(list)
        for r in results:
            by_rcpt[r["rcpt"]].append(r)
        for rcpt in rcpts:
            seq = by_rcpt[rcpt]
            sent = [r for r in seq if r["status"] == "sent"]
            eq(len(sent), 1, "%s: sent lines" % rcpt)
            counted = 0
            for r in seq:
                if r["status"] in ("throttled", "requeued"):
                    eq(int(r["attempt"]), counted,
                       "%s: attempt on a %s line (must not count)" % (
                           rcpt, r["status"]))
                else:
                    counted += 1
                    eq(int(r["attempt"]), counted,
                       "%s: attempt on a %s line" % (rcpt, r["status"]))

        # The site was cut below its ceiling while draining.
        check(snaps, "relayctl sites never showed mx.thr.test")
        low = [s for s in snaps if s["mode"] == "throttled" and
               s["conn"] < s["conn_max"]]
        check(low, "relayctl sites never showed mx.thr.test throttled "
              "below its connection ceiling; snapshots: %s" %
              [short(s) for s in snaps[::4]])
        check(snaps[-1]["mode"] in ("throttled", "normal"),
              "final mode %r" % snaps[-1]["mode"])
        eq(snaps[-1]["last_signal"], "throttle", "last signal")

        # The receiver never refuses a connection, never fails a session
        # and only ever answers 421 at MAIL: every failure is a throttle,
        # or a requeue (status=requeued class=conn-fail, no attempt) when
        # relayd's pipelined RCPT/DATA hit the closed socket (EPIPE)
        # before it read the 421. Anything else is relayd's own doing.
        for r in results:
            if r["status"] == "requeued":
                eq(r["class"], "conn-fail", "class of a requeue %r" % r)
        other = [r for r in results
                 if r["status"] not in ("sent", "throttled", "requeued")]
        if other:
            fail("DAEMON BUG: %d of %d recipient outcomes were ordinary "
                 "deferrals, e.g. %r, which advanced attempt counters and "
                 "used the retry schedule although the receiver only ever "
                 "answered '421 at MAIL' (before 7c49bb9: the EPIPE after "
                 "the 421 went through dlv_on_closed() as an unclassified "
                 "'connection closed' deferral)" % (
                     len(other), len(results),
                     {k: other[0].get(k) for k in ("status", "code",
                                                   "reply", "class",
                                                   "rule")}))
        decs = [x for x in L.site_lines(log, "mx.thr.test")
                if " decrease" in x]
        bad = [x for x in decs if x.endswith('reply=""')]
        check(not bad,
              "DAEMON BUG: site decrease without a 421: %r (see "
              "test_idle_session_is_not_a_connection_failure)" % bad)
        n421 = st["replies"].get("421", 0)
        check(n421 <= 4 * n,
              "%d transactions answered 421 for %d messages in %.0f s "
              "(site lines: %s)" % (n421, n, drain, decs))


test_rate_limited_receiver_delivers_all_once.timeout = 90


# ---------------------------------------------------------------------------
# 2. Greylisting.

def _grey_fixtures():
    """dnsmasq and the greylisting fake MX (grey.test, 127.0.0.2, its
    port also free on 127.0.0.4 for the plain one of ok.test)."""
    dns = Dnsmasq(ZONE)
    grey = FakeMX({"grey": "127.0.0.2"}, args=["--greylist", "2"],
                  also_free=["127.0.0.4"])
    return dns, grey


def _queued_rcpts(d, n):
    """{address: recipient} of the one queued message once every one of
    them has n attempts in the envelope (the log line comes first)."""
    q = L.wait_until(lambda: (lambda q: q if q["count"] == 1 and all(
        x["attempts"] == n for x in q["messages"][0]["recipients"])
        else None)(d.queue_json()), 5, 0.05,
        "the outcomes in the queued envelope")
    return {x["address"]: x for x in q["messages"][0]["recipients"]}


def _assert_site_not_slowed(d, name):
    s = site(d, name)
    check(s is not None, "no site %s in relayctl sites" % name)
    eq((s["mode"], s["conn"], s["rate"]),
       ("normal", s["conn_max"], s["rate_max"]),
       "greylisting site %s: mode, connection limit, rate" % name)
    eq((s["hold_until"], s["last_signal"], s["recent"]["throttle"],
        s["recent"]["conn_fail"]), (None, None, 0, 0),
       "greylisting site %s: hold, last signal, throttles, failures" % name)
    eq(L.site_lines(d.read_log(), name), [], "site lines for %s" % name)
    return s


def test_greylist_first_retry_default_300s():
    """With the default delivery.greylist_retry (300 s) the first retry
    of a greylisted recipient is at least 300 s away although the
    receiver asks for 2 s and delivery.min_retry is 1 s (min_retry only
    raises delays); the site is not slowed and the other recipient of
    the message, at a domain that does not greylist, is delivered at
    once."""
    dns, grey = _grey_fixtures()
    with dns, grey as mx, FakeMX({"ok": "127.0.0.4"}, port=mx.port) as ok, \
            relayd(dns, mx) as d:
        t_sub = int(time.time())
        submit(d, [(["g1@grey.test", "o1@ok.test"], body_for("grey-1"))])
        r = wait_results(d, "o1@ok.test", "sent", timeout=10)[0]
        eq(r["attempt"], "1", "ok.test delivery attempt")
        g = wait_results(d, "g1@grey.test", "greylisted", timeout=10)[0]
        eq((g["code"], g["class"], g["attempt"]), ("450", "greylist", "1"),
           "greylisted line (code, class, attempt)")
        eq([m["rcpts"] for m in ok.messages()], [["o1@ok.test"]],
           "delivered to ok.test")
        rc = _queued_rcpts(d, 1)
        eq(rc["g1@grey.test"]["state"], "pending", "greylisted recipient")
        eq(rc["o1@ok.test"]["state"], "sent", "ok.test recipient")
        na = rc["g1@grey.test"]["next_attempt"]
        check(t_sub + 300 <= na <= time.time() + 361,
              "next_attempt %d is %d s after submission, want 300..361" %
              (na, na - t_sub))
        s = _assert_site_not_slowed(d, "mx.grey.test")
        eq(s["recent"]["ok"], 0, "recent.ok of mx.grey.test, which "
           "delivered nothing (a greylisted transaction is no good news)")
        eq(mx.messages(), [], "messages accepted by the greylisting MX")


def test_greylisting_defers_one_recipient_not_the_site():
    """delivery.greylist_retry = 3, fake-mx --greylist 2 (it asks to come
    back in 2 s): the greylisted recipient is status=greylisted
    class=greylist attempt 1 with its next attempt 3 s later, the other
    recipient is delivered at once, the retry is delivered (attempt 2,
    the greylisting counts as an attempt), and all along the greylisting
    site is not slowed: no decrease, limits at their ceilings."""
    dns, grey = _grey_fixtures()
    with dns, grey as mx, FakeMX({"ok": "127.0.0.4"}, port=mx.port) as ok, \
            relayd(dns, mx, greylist_retry=3) as d:
        submit(d, [(["g2@grey.test", "o2@ok.test"], body_for("grey-2"))])
        r = wait_results(d, "o2@ok.test", "sent", timeout=10)[0]
        eq(r["attempt"], "1", "ok.test delivery attempt")
        g = wait_results(d, "g2@grey.test", "greylisted", timeout=10)[0]
        t_grey = time.time()
        eq((g["code"], g["class"], g["rule"], g["attempt"]),
           ("450", "greylist", "greylist", "1"),
           "greylisted line (code, class, rule, attempt)")
        eq([m["rcpts"] for m in ok.messages()], [["o2@ok.test"]],
           "delivered to ok.test before the greylist retry")
        rc = _queued_rcpts(d, 1)
        na = rc["g2@grey.test"]["next_attempt"]
        check(t_grey - 2 <= na - 3 <= t_grey + 1,
              "next_attempt %d is %.1f s after the greylisting, want 3" % (
                  na, na - t_grey))
        s = _assert_site_not_slowed(d, "mx.grey.test")
        eq(s["recent"]["ok"], 0, "recent.ok of mx.grey.test before the "
           "retry (a greylisted transaction is no good news)")
        x = wait_results(d, "g2@grey.test", "sent", timeout=10)[0]
        eq(x["attempt"], "2", "attempt of the delivery after greylisting")
        check(time.time() - t_grey >= 2.5,
              "retried %.1f s after the greylisting" % (time.time() - t_grey))
        eq([m["rcpts"] for m in mx.messages()], [["g2@grey.test"]],
           "delivered by the greylisting MX")
        L.wait_until(lambda: d.queue_count() == 0, 5, 0.05, "empty queue")
        s = _assert_site_not_slowed(d, "mx.grey.test")
        eq(s["recent"]["ok"], 1, "recent.ok of mx.grey.test after the "
           "delivery")
        eq(len(ok.messages()), 1, "messages at ok.test")


def test_refused_transactions_in_a_row_on_one_connection():
    """Four messages, each to its own greylisted recipient, go over one
    delivery connection (max_connections_per_domain = 1): every
    transaction ends 450 at RCPT, 554 at DATA, then RSET and the next.
    Each must get its own status=greylisted line and a retry, and all
    four arrive once. (relayd once handed a transaction back only when
    the next one ended: after an RSET the one before was forgotten, its
    recipient pending with no attempt until a restart.)"""
    n = 4
    # A slow greeting: all four are queued before the session asks.
    grey = FakeMX({"grey": "127.0.0.2"}, args=[
        "--greylist", "2", "-e", "greeting delay 1500 220 fake-mx.test ESMTP"])
    with Dnsmasq(ZONE) as dns, grey as mx, relayd(
            dns, mx, greylist_retry=3, max_connections_per_domain=1) as d:
        rcpts = ["row%d@grey.test" % i for i in range(n)]
        submit(d, [([r], body_for("row-%d" % i))
                   for i, r in enumerate(rcpts)])
        for r in rcpts:
            g = wait_results(d, r, "greylisted", timeout=10)[0]
            eq((g["code"], g["class"], g["attempt"]), ("450", "greylist", "1"),
               "greylisted line of %s (code, class, attempt)" % r)
        for r in rcpts:
            x = wait_results(d, r, "sent", timeout=15)[0]
            eq(x["attempt"], "2", "attempt of the delivery of %s" % r)
        L.wait_until(lambda: d.queue_count() == 0, 5, 0.05, "empty queue")
        got = sorted(m["rcpts"][0] for m in mx.messages())
        eq(got, sorted(rcpts), "recipients delivered by the greylisting MX")
        _assert_site_not_slowed(d, "mx.grey.test")


class ResettingMX:
    """A lock-step MX (no PIPELINING) on 127.0.0.5. In its first session,
    once 64 KiB of the body are in, it answers "421 4.7.0 Error: too much
    mail from ..." and resets the connection (SO_LINGER 0) without reading
    on. Later sessions accept and keep what they get. One thread per
    session."""

    TEXT = "421 4.7.0 Error: too much mail from 127.0.0.1"

    def __init__(self):
        import socket
        import threading
        self.port = L.free_port("127.0.0.5")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.5", self.port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.sessions = 0
        self.messages = []
        self.stop = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join(5)
        self.sock.close()

    def _accept(self):
        import socket
        import threading
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.sessions += 1
                first = self.sessions == 1
            threading.Thread(target=self._session, args=(c, first),
                             daemon=True).start()

    def _session(self, c, first):
        import socket
        import struct
        c.settimeout(10)
        f = c.makefile("rb")
        try:
            c.sendall(b"220 reset.test ESMTP\r\n")
            body, rcpts, data = [], [], False
            for _ in range(1000000):        # bounded: a message or two
                line = f.readline()
                if not line:
                    return
                if data:
                    if first and sum(map(len, body)) >= 65536:
                        c.sendall(self.TEXT.encode() + b"\r\n")
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                        return               # close: a reset
                    if line == b".\r\n":
                        with self.lock:
                            self.messages.append((rcpts, b"".join(body)))
                        body, rcpts, data = [], [], False
                        c.sendall(b"250 2.0.0 Ok: queued\r\n")
                    else:
                        body.append(line)
                    continue
                cmd = line[:4].upper()
                if cmd == b"EHLO":
                    c.sendall(b"250-reset.test\r\n250 8BITMIME\r\n")
                elif cmd == b"RCPT":
                    rcpts.append(line[8:].strip(b"<>\r\n").decode())
                    c.sendall(b"250 2.1.5 Ok\r\n")
                elif cmd == b"DATA":
                    data = True
                    c.sendall(b"354 go ahead\r\n")
                elif cmd == b"QUIT":
                    c.sendall(b"221 bye\r\n")
                    return
                else:
                    c.sendall(b"250 Ok\r\n")
        except OSError:
            return
        finally:
            f.close()
            c.close()


def test_421_before_a_reset_is_read():
    """An 8 MB message; the receiver stops reading 64 KiB into the body,
    answers 421 and resets the connection. relayd, its writes blocked (it
    stops reading while the peer does not take its bytes), gets the
    reset as a write error (EPIPE or ECONNRESET) with the 421 unread. It
    must read it all the same: the recipient
    is status=throttled with the 421 (class throttle, no attempt
    counted), the site records the throttle, and the retry on a new
    connection delivers the message once. (relayd once closed on the
    write error and lost the 421: the site never heard of it.)"""
    zone = [Dnsmasq.mx("reset.test", "mx.reset.test", 10),
            Dnsmasq.host("mx.reset.test", "127.0.0.5")]
    with Dnsmasq(zone) as dns, ResettingMX() as mx, \
            RelayD(listeners=[dict(name="plain", tls="none",
                                   auth_required=False)],
                   dns=dns_conf(dns),
                   delivery={"port": mx.port, "retry_schedule": [1],
                             "min_retry": 1, "retry_jitter": 0.0}) as d:
        big = body_for("reset-1") + (b"x" * 998 + b"\r\n") * 8000
        submit(d, [(["r1@reset.test"], big)])
        t = wait_results(d, "r1@reset.test", "throttled", timeout=10)[0]
        eq((t["code"], t["class"]), ("421", "throttle"),
           "result after the reset (code, class)")
        check(ResettingMX.TEXT[10:] in t["reply"],
              "the 421's text in the result line: %r" % t["reply"])
        s = wait_site(d, "mx.reset.test",
                      lambda x: x["last_signal"] == "throttle", 5,
                      "site mx.reset.test told of the throttle")
        eq(s["last_reply"], ResettingMX.TEXT, "site's last reply")
        x = wait_results(d, "r1@reset.test", "sent", timeout=15)[0]
        eq(x["attempt"], "1", "attempt of the delivery (the throttle did "
           "not count)")
        L.wait_until(lambda: d.queue_count() == 0, 5, 0.05, "empty queue")
        eq([r for r, _ in mx.messages], [["r1@reset.test"]],
           "messages the MX accepted")
        got = mx.messages[0][1]
        check(got.endswith(big[-50000:]) and len(got) > len(big),
              "body received: %d octets for %d submitted (Received: "
              "added)" % (len(got), len(big)))


def test_site_recipients_per_transaction():
    """shaping.domains sets max_recipients_per_transaction = 2 for
    ok.test while delivery's default is 100: a message with 5 recipients
    there goes out in transactions of 2, 2 and 1, each recipient once."""
    rcpts = ["m%d@ok.test" % i for i in range(5)]
    extra = ('shaping = { domains = ( { domain = "ok.test"; '
             'max_recipients_per_transaction = 2; } ); };')
    with Dnsmasq(ZONE) as dns, FakeMX({"ok": "127.0.0.4"}) as mx, \
            RelayD(listeners=[dict(name="plain", tls="none",
                                   auth_required=False)],
                   dns=dns_conf(dns), extra=extra,
                   delivery={"port": mx.port}) as d:
        submit(d, [(rcpts, body_for("split"))])
        for r in rcpts:
            x = wait_results(d, r, "sent", timeout=10)[0]
            eq(x["attempt"], "1", "attempt of %s" % r)
        L.wait_until(lambda: d.queue_count() == 0, 5, 0.05, "empty queue")
        got = [m["rcpts"] for m in mx.messages()]
        eq(sorted(len(g) for g in got), [1, 2, 2],
           "recipients per transaction at ok.test")
        eq(sorted(r for g in got for r in g), sorted(rcpts),
           "recipients delivered")


def test_site_connection_rate():
    """shaping.domains: ok.test gets connection_rate = "30/min" (one
    every 2 s after a burst of max_connections = 2) and
    max_messages_per_connection = 1, so each of 5 messages needs its own
    connection: the MX sees 2 at once, then one every 2 s (the 5th at
    least 6 s after the first); each message once."""
    n = 5
    extra = ('shaping = { domains = ( { domain = "ok.test"; '
             'max_connections = 2; max_messages_per_connection = 1; '
             'connection_rate = "30/min"; } ); };')
    with Dnsmasq(ZONE) as dns, FakeMX({"ok": "127.0.0.4"}) as mx, \
            RelayD(listeners=[dict(name="plain", tls="none",
                                   auth_required=False)],
                   dns=dns_conf(dns), extra=extra,
                   delivery={"port": mx.port}) as d:
        rcpts = ["c%d@ok.test" % i for i in range(n)]
        submit(d, [([r], body_for("crate-%d" % i))
                   for i, r in enumerate(rcpts)])
        mx.wait_messages(n, timeout=20)
        L.wait_until(lambda: d.queue_count() == 0, 5, 0.05, "empty queue")
        t = sorted(r["t"] for r in mx.records("reply")
                   if r.get("phase") == "connect")
        eq(len(t), n, "connections the MX saw")
        check(t[1] - t[0] < 1.0, "the first two connections together: "
              "%.2f s apart" % (t[1] - t[0]))
        for i in range(2, n):
            check(t[i] - t[i - 1] >= 1.8,
                  "connection %d came %.2f s after the one before, want "
                  ">= 2 s (30/min)" % (i + 1, t[i] - t[i - 1]))
        check(t[-1] - t[0] >= 5.8, "5 connections in %.2f s" % (
            t[-1] - t[0]))
        eq(sorted(m["rcpts"][0] for m in mx.messages()), sorted(rcpts),
           "recipients delivered")


def test_max_messages_per_connection_is_learned():
    """fake-mx --max-msgs-per-conn 3 answers the 4th MAIL of a connection
    "421 Max message per connection reached" (Yahoo) and closes. With one
    connection at a time and 10 messages: that recipient is requeued
    (class msgs-per-conn, no attempt counted, no throttle), the site
    learns 3, and every later connection carries at most 3: one such
    421 in the whole run, each message delivered once at attempt 1."""
    n = 10
    extra = ('shaping = { domains = ( { domain = "ok.test"; '
             'max_connections = 1; } ); };')
    with Dnsmasq(ZONE) as dns, FakeMX({"ok": "127.0.0.4"},
                                      args=["--max-msgs-per-conn", "3"]) \
            as mx, RelayD(listeners=[dict(name="plain", tls="none",
                                          auth_required=False)],
                          dns=dns_conf(dns), extra=extra,
                          delivery={"port": mx.port}) as d:
        rcpts = ["p%02d@ok.test" % i for i in range(n)]
        # One submission connection: all queued before the MX answers.
        submit(d, [([r], body_for("mpc-%d" % i))
                   for i, r in enumerate(rcpts)])
        mx.wait_messages(n, timeout=20)
        L.wait_until(lambda: d.queue_count() == 0, 5, 0.05, "empty queue")
        log = d.read_log()
        for r in rcpts:
            x = L.dlv_results(log, r, "sent")
            eq(len(x), 1, "sent lines for %s" % r)
            eq(x[0]["attempt"], "1", "attempt of %s" % r)
        req = [x for x in L.dlv_results(log) if x["status"] == "requeued"]
        eq(len(req), 1, "requeued results")
        eq((req[0]["code"], req[0]["class"], req[0]["rule"]),
           ("421", "msgs-per-conn", "max-messages-per-connection"),
           "the 421's result (code, class, rule)")
        refused = [r for r in mx.records("reply")
                   if r.get("phase") == "mail" and r.get("code") == 421]
        eq(len(refused), 1, "MAILs answered 421 by the MX")
        st = site(d, "mx.ok.test")
        eq((st["msgs_per_conn"], st["mode"], st["recent"]["throttle"]),
           (3, "normal", 0), "site: learned messages per connection, "
           "mode, throttles")
        per = collections.Counter(m["conn"] for m in mx.messages())
        check(max(per.values()) <= 3, "messages per connection: %r" % per)


def test_max_messages_on_the_first_message_is_a_throttle():
    """A receiver that says "Max message per connection reached" to the
    first MAIL of a connection (three times) gives no count to learn:
    relayd takes it as a throttle (hold 1, 2, 4 s) instead of
    reconnecting at once, again and again, and learns nothing. The
    message arrives once, at attempt 1, after 4 connections."""
    rule = ("mail first 3 421 Max message per connection reached, "
            "closing transmission channel")
    with Dnsmasq(ZONE) as dns, FakeMX({"ok": "127.0.0.4"},
                                      args=["-e", rule]) as mx, \
            RelayD(listeners=[dict(name="plain", tls="none",
                                   auth_required=False)],
                   dns=dns_conf(dns), delivery={"port": mx.port}) as d:
        t0 = time.time()
        submit(d, [(["first@ok.test"], body_for("mpc-first"))])
        x = wait_results(d, "first@ok.test", "sent", timeout=20)[0]
        eq(x["attempt"], "1", "attempt of the delivery")
        took = time.time() - t0
        check(took >= 6.0, "delivered %.1f s after submission, want the "
              "1 + 2 + 4 s of holds" % took)
        conns = [r for r in mx.records("reply") if r.get("phase") == "connect"]
        eq(len(conns), 4, "connections the MX saw")
        st = site(d, "mx.ok.test")
        eq((st["msgs_per_conn"], st["last_signal"]), (None, "throttle"),
           "site: nothing learned, a throttle recorded")


# ---------------------------------------------------------------------------
# 3. A block: Yahoo's [TS03].

def test_ts03_suspends_site():
    """Every MAIL is answered with Yahoo's [TS03] block. relayctl sites
    shows the site suspended, with suspended_until the rule's 4 h after
    the reply (built-in rule yahoo-ts03, as Momentum does; the 15 min
    base applies to suspend rules without a duration); no further
    connection reaches the MX for the next seconds; the messages stay
    queued with no attempt counted."""
    n = 5
    tmp = tempfile.mkdtemp(prefix="relay-it-ts03-")
    script = os.path.join(tmp, "ts03.rules")
    with open(script, "w") as f:     # the text has ';': not for -e
        f.write("mail " + TS03 + "\n")
    try:
        with Dnsmasq(ZONE) as dns, FakeMX(args=["-s", script]) as mx, \
                relayd(dns, mx) as d:
            rcpts = ["s%03d@sus.test" % i for i in range(n)]
            submit(d, [([r], body_for("sus-%d" % i))
                       for i, r in enumerate(rcpts)])
            s = wait_site(d, "mx.sus.test",
                          lambda x: x["mode"] == "suspended", 10,
                          "site mx.sus.test suspended")
            now_ms = time.time() * 1000
            eq(s["last_signal"], "suspend", "last signal")
            eq(s["last_reply"], TS03, "last reply")
            until = s["suspended_until"]
            check(isinstance(until, int), "suspended_until %r" % until)
            left = (until - now_ms) / 1000.0
            check(4 * 3600 - 60 <= left <= 4 * 3600 + 1,
                  "suspended for %.0f s from now, want the rule's 4 h" %
                  left)
            eq(until - s["last_throttle_at"], 4 * 3600 * 1000,
               "suspension length from the reply")
            eq((s["conn"], s["conn_min"]), (1, 1), "connection limit")
            eq(s["rate"], s["rate_min"], "rate")
            for x in L.dlv_results(d.read_log()):
                eq((x["status"], x["class"], x["rule"], x["attempt"]),
                   ("throttled", "suspend", "yahoo-ts03", "0"),
                   "outcome of %s" % x["rcpt"])
            # In-flight sessions finish; then nothing new for 3 s.
            L.wait_until(lambda: site(d, "mx.sus.test")["sessions"] == 0,
                         5, 0.1, "no session open to mx.sus.test")
            time.sleep(0.3)
            conns = len(mx.records("connect"))
            mails = len(mx.records("mail"))
            check(conns <= n, "%d connections before the suspension "
                  "took effect" % conns)
            time.sleep(3)
            eq((len(mx.records("connect")), len(mx.records("mail"))),
               (conns, mails), "connections and MAILs while suspended")
            s = site(d, "mx.sus.test")
            eq((s["mode"], s["suspended_until"], s["waiting"]),
               ("suspended", until, n), "site after 3 s")
            q = d.queue_json()
            eq(q["count"], n, "messages queued")
            for m in q["messages"]:
                for r in m["recipients"]:
                    eq((r["state"], r["attempts"]), ("pending", 0),
                       "queued recipient %s" % r["address"])
            eq(mx.messages(), [], "messages accepted")
            check(d.read_log().count("dsn queued") == 0, "a DSN was queued")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# 4. What a site learned survives a restart.

def test_site_state_survives_restart():
    """A rate-limited receiver cuts the site; SIGTERM; <spool>/sites.state
    holds the site; after a restart on the same spool relayctl sites shows
    the same site with the same reduced limits, mode and last throttle
    before any new delivery (dnsmasq is stopped first, so the restarted
    relayd cannot reach the MX yet: the site can only come from the
    state file)."""
    with Dnsmasq(ZONE) as dns, FakeMX(args=["--rate", "5/2"]) as mx, \
            relayd(dns, mx) as d:
        throttle_site(d, 20, "p")
        before = site(d, "mx.thr.test")
        eq(d.stop(), 0, "exit code on SIGTERM")
        path = os.path.join(d.spool, "sites.state")
        check(os.path.exists(path), "no %s after the stop" % path)
        with open(path) as f:
            lines = [x for x in f.read().splitlines()
                     if " name=mx.thr.test " in x]
        eq(len(lines), 1, "lines for mx.thr.test in sites.state")
        saved = dict(kv.split("=", 1) for kv in lines[0].split(" "))
        eq((saved["mode"], int(saved["conn"])),
           ("throttled", before["conn"]), "saved mode and conn")
        dns.close()
        start = d.log_size()
        d.restart()
        after = site(d, "mx.thr.test")
        check(after is not None, "no site mx.thr.test after the restart: %s"
              % d.relayctl("sites"))
        log = d.read_log()[start:]
        eq([r for r in L.dlv_results(log) if r["host"] != "-"], [],
           "transactions after the restart (only DNS failures expected)")
        check("sched sites loaded=1 " in log, "no 'sched sites loaded=1'")
        for k in ("mode", "conn", "conn_max", "rate", "rate_max",
                  "mode_since", "last_signal"):
            eq(after[k], before[k], "%s after the restart (before %s)" %
               (k, short(before)))
        eq(after["last_throttle_at"], int(saved["last_throttle_at"]),
           "last_throttle_at after the restart")
        check(after["last_throttle_at"] >= before["last_throttle_at"],
              "last_throttle_at went back")
        eq(after["rate"], round(float(saved["rate"]), 3),
           "rate after the restart")
        eq(after["last_reply"], "421 4.7.0 Error: too much mail from "
           "127.0.0.1", "last reply after the restart")


# ---------------------------------------------------------------------------
# 5. SIGHUP adopts new ceilings and keeps what was learned.

def test_sighup_keeps_learned_limits():
    """After a cut, SIGHUP with max_connections_per_domain 20 -> 30: the
    site keeps its reduced connection limit and rate (no snap back to a
    ceiling), ceiling 30. Then 30 -> 1: the limit is clamped to 1."""
    with Dnsmasq(ZONE) as dns, FakeMX(args=["--rate", "5/2"]) as mx, \
            relayd(dns, mx, max_connections_per_domain=20) as d:
        before = throttle_site(d, 20, "h")
        check(before["conn"] < 20, "conn %d" % before["conn"])
        for ceiling, want in ((30, before["conn"]), (1, 1)):
            d.delivery["max_connections_per_domain"] = ceiling
            start = d.log_size()
            d.write_config()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded", start=start)
            s = site(d, "mx.thr.test")
            eq((s["conn_max"], s["conn"], s["mode"]),
               (ceiling, want, "throttled"),
               "conn_max, conn, mode after SIGHUP to %d (before: %s)" % (
                   ceiling, short(before)))
            eq(s["rate"], before["rate"], "rate after SIGHUP")
            check(s["sessions"] <= max(want, before["conn"]),
                  "%d sessions with a limit of %d" % (s["sessions"], want))


# ---------------------------------------------------------------------------
# 6. A session with nothing to do is not a failure.

def test_idle_session_is_not_a_connection_failure():
    """Two messages arrive together: relayd opens two sessions; the first
    greets slowly (2 s) and the second delivers both. The slow session
    then finds no work and quits. Nothing failed, so the site must stay
    at its ceilings with no decrease (before 7c49bb9 this was a
    connection failure that cut the site)."""
    with Dnsmasq(ZONE) as dns, \
            FakeMX(rules="connect first 1 delay 2000 220 fake-mx.test "
                   "ESMTP slow") as mx, \
            relayd(dns, mx) as d:
        submit(d, [(["i%d@idle.test" % i], body_for("idle-%d" % i))
                   for i in range(2)])
        mx.wait_messages(2, timeout=10)
        L.wait_until(lambda: len(mx.records("close")) >= 2 and
                     site(d, "mx.idle.test")["sessions"] == 0, 10, 0.1,
                     "both sessions closed")
        eq(len(mx.records("connect")), 2, "sessions opened")
        s = site(d, "mx.idle.test")
        lines = L.site_lines(d.read_log(), "mx.idle.test")
        check(not lines and s["mode"] == "normal" and
              s["conn"] == s["conn_max"],
              "DAEMON BUG: a session that connected, was greeted and "
              "found no work (another session took both messages) cut the "
              "site: %s; site now %s. scheduler.c sched_on_closed() must "
              "not report SITE_SIG_CONN_FAIL for a session that asked for "
              "work (a clean QUIT with no transaction): site_cut() halves "
              "the connection limit and starts the 30 s decrease window, "
              "so a real 421 burst right after is not acted on (one run "
              "of test_rate_limited_receiver_delivers_all_once saw 1,291 "
              "421s for 40 messages that way)" % (
                  lines, short(s)))
