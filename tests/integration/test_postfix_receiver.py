"""test_postfix_receiver.py - adaptive throttling against a REAL receiving
MTA: Postfix 3.7 from Debian's package as a private instance, plus postgrey
as its policy server (docs/THROTTLING.md).

Each test runs its own dnsmasq (mx.pf.test -> 127.0.0.3), its own Postfix
(relaylib.PrivatePostfix: own config, queue, data and Maildir under a
temporary directory, smtpd on 127.0.0.3:<free port>, which is relayd's
delivery.port; virtual(8) delivers pf.test into one Maildir as user nobody)
and its own relayd; the greylisting test adds a postgrey
(relaylib.Postgrey, 127.0.0.1:<free port>). Nothing is sent or bound
outside 127.0.0.0/8, relayd resolves only through the test's dnsmasq, and
Postfix makes no DNS query at all.

The receivers and what relayd must make of them:
1. smtpd_client_message_rate_limit (anvil): "450 4.7.1 Error: too much mail
   from 127.0.0.1" at MAIL: class throttle, rule rate-from-ip (a rate
   signal, not greylisting), the recipient requeued without an attempt.
2. smtpd_client_connection_count_limit (anvil): "421 4.7.0 mx.pf.test
   Error: too many connections from 127.0.0.1" at the greeting: a throttle
   of the site, not a connection failure.
3. postgrey --delay 5: "450 4.2.0 <rcpt>: Recipient address rejected:
   Greylisted, see ...": class greylist, rule greylist, that recipient
   retried after delivery.greylist_retry, the site not slowed.
Anvil exempts $mynetworks by default: smtpd_client_event_limit_exceptions
is set empty; anvil_rate_time_unit is 5 s so a window passes quickly.

In every test each submitted message (unique Subject and Message-ID) must
arrive in Postfix's Maildir exactly once per recipient, relayd's queue
must end empty, and neither relayd nor Postfix may have generated a bounce.

postfix and postgrey are installed by `make test` (tools/install-deps
--test); if they are missing the tests FAIL, they do not skip.

Python 3.11 standard library only. Run alone with
    tests/run integration tests/integration/test_postfix_receiver.py
"""
import collections
import re
import smtplib
import time

import relaylib as L
from relaylib import Dnsmasq, Postgrey, PrivatePostfix, RelayD, check, eq, fail

SENDER = "sender@src.test"
DOMAIN = "pf.test"
SITE = "mx.pf.test"
PF_ADDR = "127.0.0.3"

ZONE = [
    Dnsmasq.mx(DOMAIN, SITE, 10),
    Dnsmasq.host(SITE, PF_ADDR),
]

# Anvil limits apply to 127.0.0.1 too, over 5 s windows.
ANVIL = {"smtpd_client_event_limit_exceptions": "",
         "anvil_rate_time_unit": "5s"}

RATE_LIMIT = 3          # smtpd_client_message_rate_limit per 5 s
GREY_DELAY = 5          # postgrey --delay
GREY_RETRY = 6          # relayd delivery.greylist_retry (> GREY_DELAY)
# The first retry after a greylisting comes greylist_retry + a margin +
# jitter (up to a fifth) later; this bound only catches a much later one.
GREY_LATEST = 2 * GREY_RETRY + 3


def relayd(dns, pf, **over):
    """relayd delivering through dnsmasq to Postfix's port; quick
    ordinary retries without jitter."""
    dl = {"port": pf.port, "retry_schedule": [1], "min_retry": 1,
          "retry_jitter": 0.0}
    dl.update(over)
    return RelayD(listeners=[dict(name="plain", tls="none",
                                  auth_required=False)],
                  dns={"servers": [dns.server], "timeout": 1, "tries": 2},
                  delivery=dl)


def body_for(tag, rcpts):
    return ("From: Sender <sender@src.test>\r\nTo: %s\r\n"
            "Subject: %s\r\n"
            "Date: Mon, 24 Nov 2025 05:00:00 +0000\r\n"
            "Message-ID: <%s@src.test>\r\n\r\n"
            "body of %s\r\n" % (", ".join(rcpts), tag, tag, tag)).encode()


def submit(d, items):
    """items: [(tag, rcpts)], all over one SMTP connection to relayd."""
    c = smtplib.SMTP(L.HOST, d.port("plain"), local_hostname="client.test",
                     timeout=30 * L.SLOW)
    try:
        for tag, rcpts in items:
            refused = c.sendmail(SENDER, rcpts, body_for(tag, rcpts))
            eq(refused, {}, "refused recipients")
    finally:
        try:
            c.quit()
        except (smtplib.SMTPException, OSError):
            c.close()


STUCK = "its outcome is being written to the spool"


def unscheduled(d):
    """{queue id: [recipient, ...]} of pending recipients relayd's
    scheduler has lost track of: `relayctl queue show` finds them in no
    session, no retry heap and no ready queue, and says STUCK."""
    out = {}
    for m in d.queue_json()["messages"]:
        text = d.relayctl("queue", "show", m["id"], check_rc=False)
        rx = re.compile(r"<([^>]+)> pending[^\n]*\n\s+" + re.escape(STUCK))
        lost = rx.findall(text)
        if lost:
            out[m["id"]] = lost
    return out


def wait_drained(d, pf, n, timeout):
    """Until Postfix has delivered n copies and relayd's queue is empty,
    or relayd has lost track of a recipient for 4 s with no session open
    to the site (then it fails, with what relayd logged for it); bounded
    in time and count. Returns the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    lost, lost_since = {}, None
    for i in range(int(timeout / 0.2) + 1):
        if len(pf.messages()) >= n and d.queue_count() == 0 and \
                pf.queued() == 0:
            break
        if time.monotonic() > deadline:
            break
        if i % 5 == 4:
            s = d.sites().get(SITE)
            now = unscheduled(d) if s and s["sessions"] == 0 else {}
            if now and now == lost:
                if time.monotonic() - lost_since >= 4:
                    fail_lost(d, now)
            else:
                lost, lost_since = now, time.monotonic()
        time.sleep(0.2)
    return time.monotonic() - t0


def fail_lost(d, lost):
    log = d.read_log()
    rcpts = sorted(r for rs in lost.values() for r in rs)
    seen = {r: [(x["status"], x["code"]) for x in L.dlv_results(log, r)]
            for r in rcpts}
    fail("DAEMON BUG: %d pending recipient(s) %s are in no session, retry "
         "heap or ready queue (relayctl queue show: %r) with no session "
         "open to %s; their dlv results so far: %s. They wait, "
         "unscheduled, until relayd restarts (before 9083e98: a "
         "transaction refused without a delivery - 450 at MAIL, or every "
         "RCPT refused - followed by RSET and another transaction on the "
         "same connection never reached ops->done, as DLV_ST_RSET went "
         "to dlv_ready() without dlv_txn_finish())" % (
             len(rcpts), rcpts, STUCK, SITE, seen))


def assert_exactly_once(d, pf, items, took):
    """Every (recipient, message) of items in the Maildir exactly once,
    relayd's queue empty, no bounce from relayd nor from Postfix, one
    status=sent line per recipient and no failure that is not temporary."""
    want = collections.Counter((r, tag) for tag, rcpts in items
                               for r in rcpts)
    msgs = pf.messages()
    got = collections.Counter((m["rcpt"], m["subject"]) for m in msgs)
    missing = sorted(set(want) - set(got))
    check(not missing, "after %.1f s, %d of %d copies not delivered by "
          "Postfix, e.g. %s; relayd queue: %d; relayd results: %s" % (
              took, len(missing), len(want), missing[:4], d.queue_count(),
              [(r["rcpt"], r["status"], r["code"], r["class"])
               for r in L.dlv_results(d.read_log())][-6:]))
    eq(sorted(k for k, v in got.items() if v > 1), [],
       "copies delivered more than once")
    eq(sorted(set(got) - set(want)), [], "unexpected copies")
    for m in msgs:
        eq(m["message_id"], "<%s@src.test>" % m["subject"],
           "Message-ID of %s" % m["subject"])
    eq(d.queue_count(), 0, "relayd's queue at the end")
    eq(d.queue_ids(), [], "relayd's queue/ directory at the end")
    eq(pf.queued(), 0, "Postfix queue files left")
    log = d.read_log()
    eq(L.log_events(log, "dsn queued"), [], "relayd 'dsn queued' lines")
    pflog = pf.log()
    bad = [x for x in pflog.splitlines()
           if "status=bounced" in x or "status=deferred" in x or
           "sender non-delivery" in x]
    eq(bad, [], "Postfix bounces or deferrals")
    results = L.dlv_results(log)
    for (rcpt, _tag) in want:
        sent = [r for r in results if r["rcpt"] == rcpt and
                r["status"] == "sent"]
        eq(len(sent), 1, "status=sent lines for %s" % rcpt)
    eq([r for r in results if r["status"] in ("bounced", "expired")], [],
       "bounced or expired recipients")
    return results


def pf_lines(pf, needle):
    return [x for x in pf.log().splitlines() if needle in x]


# ---------------------------------------------------------------------------
# 1. Postfix anvil: message rate limit.

def test_anvil_message_rate_limit():
    """smtpd_client_message_rate_limit = 3 per 5 s: 9 messages take at
    least three windows. Postfix answers the MAILs beyond the limit "450
    4.7.1 Error: too much mail from 127.0.0.1"; relayd logs each of them
    as status=throttled class=throttle rule=rate-from-ip (never as
    greylisting), without counting an attempt (every delivery is
    attempt 1), cuts the site (a 'site mx.pf.test ... decrease' line with
    that reply; relayctl sites: last signal throttle) and delivers every
    message exactly once."""
    n = 9
    items = [("rate-%d" % i, ["r%02d@%s" % (i, DOMAIN)]) for i in range(n)]
    main = dict(ANVIL, smtpd_client_message_rate_limit=RATE_LIMIT)
    with Dnsmasq(ZONE) as dns, PrivatePostfix([DOMAIN], PF_ADDR,
                                              main) as pf, \
            relayd(dns, pf) as d:
        submit(d, items)
        took = wait_drained(d, pf, n, 45)
        results = assert_exactly_once(d, pf, items, took)
        log = d.read_log()

        # Postfix really limited the rate.
        # (smtpd logs each "450 4.7.1 Error: too much mail from" it
        # sends as this warning.)
        rejects = pf_lines(pf, "warning: Message delivery request rate "
                           "limit exceeded")
        check(rejects, "Postfix never answered 450 4.7.1 too much mail "
              "(anvil limit not reached?); maillog:\n" + L.tail(pf.log()))

        # relayd classified them as throttles, not greylisting.
        thr = [r for r in results if r["code"] == "450"]
        check(thr, "no relayd result line with code=450 although Postfix "
              "rejected %d MAILs" % len(rejects))
        for r in thr:
            eq((r["status"], r["enh"], r["class"], r["rule"], r["attempt"]),
               ("throttled", "4.7.1", "throttle", "rate-from-ip", "0"),
               "result line for %s (reply %r)" % (r["rcpt"], r["reply"]))
        eq([r for r in results if r["class"] == "greylist"], [],
           "results classified greylist")
        for r in results:
            if r["status"] == "sent":
                eq(r["attempt"], "1", "attempt of %s's delivery (throttles "
                   "do not count)" % r["rcpt"])
        other = [r for r in results if r["status"] not in
                 ("sent", "throttled", "requeued")]
        eq(other, [], "outcomes other than sent/throttled/requeued")

        # The site was cut by the reply and says so.
        decs = [x for x in L.site_lines(log, SITE) if " decrease" in x]
        check(any("too much mail from 127.0.0.1" in x for x in decs),
              "no 'site %s ... decrease' line with the 450 reply; site "
              "lines: %s" % (SITE, L.site_lines(log, SITE)))
        s = d.sites().get(SITE)
        check(s is not None, "no site %s in relayctl sites" % SITE)
        eq(s["last_signal"], "throttle", "last signal of %s" % SITE)
        check(s["recent"]["throttle"] >= 1, "recent.throttle %r" %
              s["recent"])
        check("too much mail from" in (s["last_reply"] or ""),
              "last reply %r" % s["last_reply"])
        # A bound on the waste: relayd must not hammer the receiver.
        check(len(rejects) <= 4 * n,
              "%d MAILs answered 450 for %d messages in %.1f s" % (
                  len(rejects), n, took))


test_anvil_message_rate_limit.timeout = 60


# ---------------------------------------------------------------------------
# 2. Postfix anvil: connection count limit.

def test_anvil_connection_count_limit():
    """smtpd_client_connection_count_limit = 1: relayd opens several
    sessions for a burst of messages; Postfix greets all but one with
    "421 4.7.0 mx.pf.test Error: too many connections from 127.0.0.1".
    relayd takes that as a throttle of the site (a 'site ... decrease'
    line with the reply, last signal throttle, no connection failure), not
    as a failed delivery: no recipient is deferred and every delivery is
    attempt 1; every message arrives exactly once."""
    n = 6
    items = [("conn-%d" % i, ["c%02d@%s" % (i, DOMAIN)]) for i in range(n)]
    main = dict(ANVIL, smtpd_client_connection_count_limit=1)
    with Dnsmasq(ZONE) as dns, PrivatePostfix([DOMAIN], PF_ADDR,
                                              main) as pf, \
            relayd(dns, pf) as d:
        submit(d, items)
        took = wait_drained(d, pf, n, 30)
        results = assert_exactly_once(d, pf, items, took)
        log = d.read_log()

        over = pf_lines(pf, "Connection concurrency limit exceeded")
        check(over, "Postfix never refused a connection (relayd opened "
              "one session at a time?); maillog:\n" + L.tail(pf.log()))
        failed = L.log_events(log, "dlv host-failed")
        banner = [x for x in failed if x["phase"] == "banner"]
        check(banner, "no 'dlv host-failed phase=banner' line although "
              "Postfix refused %d connections" % len(over))
        for x in banner:
            eq(x["code"], "421", "code of %r" % x)
            check("Error: too many connections from 127.0.0.1" in
                  x["reply"], "reply of %r" % x)
        eq([x for x in failed if x["phase"] != "banner"], [],
           "host failures after the greeting")

        # A 421 result line, if one was written, is a throttle.
        for r in results:
            if r["code"] == "421":
                eq((r["class"], r["rule"]), ("throttle",
                                             "too-many-connections"),
                   "result line %r" % r)
        deferred = [r for r in results if r["status"] == "deferred"]
        eq(deferred, [], "recipients deferred (an attempt counted) for a "
           "421 too many connections")
        for r in results:
            if r["status"] == "sent":
                eq(r["attempt"], "1", "attempt of %s's delivery" %
                   r["rcpt"])

        decs = [x for x in L.site_lines(log, SITE) if " decrease" in x]
        check(any("too many connections from 127.0.0.1" in x
                  for x in decs),
              "no 'site %s ... decrease' line with the 421 reply; site "
              "lines: %s" % (SITE, L.site_lines(log, SITE)))
        s = d.sites().get(SITE)
        check(s is not None, "no site %s in relayctl sites" % SITE)
        eq(s["last_signal"], "throttle", "last signal of %s" % SITE)
        eq(s["recent"]["conn_fail"], 0,
           "connection failures counted for 421 greetings")
        check(len(over) <= 4 * n, "%d connections refused for %d messages"
              % (len(over), n))


test_anvil_connection_count_limit.timeout = 50


# ---------------------------------------------------------------------------
# 3. postgrey greylisting.

def test_postgrey_greylisting():
    """postgrey --delay 5 as Postfix's policy service, relayd with
    delivery.greylist_retry = 6: every recipient is first answered "450
    4.2.0 ... Greylisted" (status=greylisted class=greylist rule=greylist,
    attempt 1), retried once 6 to 15 s later (postgrey logs no early
    retry) and delivered at attempt 2 with postgrey's X-Greylist header;
    the site is never slowed (no site line, last signal none); every
    message arrives exactly once per recipient."""
    items = [("grey-0", ["g00@" + DOMAIN]),
             ("grey-1", ["g01@" + DOMAIN, "g02@" + DOMAIN]),
             ("grey-2", ["g03@" + DOMAIN])]
    rcpts = [r for _, rs in items for r in rs]
    with Postgrey(delay=GREY_DELAY) as pg, Dnsmasq(ZONE) as dns, \
            PrivatePostfix([DOMAIN], PF_ADDR, {
                "smtpd_recipient_restrictions":
                    "check_policy_service " + pg.policy_service}) as pf, \
            relayd(dns, pf, greylist_retry=GREY_RETRY) as d:
        submit(d, items)
        took = wait_drained(d, pf, len(rcpts), 30)
        results = assert_exactly_once(d, pf, items, took)
        log = d.read_log()

        for rcpt in rcpts:
            seq = [r for r in results if r["rcpt"] == rcpt]
            eq([r["status"] for r in seq], ["greylisted", "sent"],
               "outcomes of %s" % rcpt)
            g, s = seq
            eq((g["code"], g["enh"], g["class"], g["rule"], g["attempt"]),
               ("450", "4.2.0", "greylist", "greylist", "1"),
               "greylisted line of %s" % rcpt)
            check("Greylisted" in g["reply"], "reply %r" % g["reply"])
            eq(s["attempt"], "2", "attempt of %s's delivery" % rcpt)
            # (delay= is whole seconds since submission)
            after = int(s["delay"][:-1]) - int(g["delay"][:-1])
            check(GREY_DELAY <= after <= GREY_LATEST,
                  "%s delivered %d s after the greylisting; want %d..%d "
                  "(greylist_retry %d s, a margin and jitter)" % (
                      rcpt, after, GREY_DELAY, GREY_LATEST, GREY_RETRY))

        # postgrey saw one new triplet per recipient, then one pass each,
        # and no retry before its delay.
        pglog = pg.log()
        check(pg.running(), "postgrey exited; its log:\n" + L.tail(pglog))
        for rcpt in rcpts:
            acts = re.findall(r"action=(\w+), reason=([^,]+),.*"
                              r"recipient=" + re.escape(rcpt) + r"\b",
                              pglog)
            eq(acts, [("greylist", "new"), ("pass", "triplet found")],
               "postgrey's decisions for %s" % rcpt)
        for m in pf.messages():
            xg = re.search(rb"(?im)^X-Greylist: delayed (\d+) seconds by "
                           rb"postgrey", m["headers"])
            check(xg and int(xg.group(1)) >= GREY_DELAY,
                  "X-Greylist header of %s for %s: %r" % (
                      m["subject"], m["rcpt"], xg and xg.group(0)))

        # Greylisting is not a rate signal.
        eq(L.site_lines(log, SITE), [], "site lines for %s" % SITE)
        s = d.sites().get(SITE)
        check(s is not None, "no site %s in relayctl sites" % SITE)
        eq((s["mode"], s["conn"], s["last_signal"], s["recent"]["throttle"],
            s["recent"]["conn_fail"]),
           ("normal", s["conn_max"], None, 0, 0),
           "greylisting site %s: mode, conn, last signal, throttles, "
           "failures" % SITE)
        eq(pf_lines(pf, "too much mail") + pf_lines(pf, "too many conn"),
           [], "anvil rejections in the greylisting test")


test_postgrey_greylisting.timeout = 50
