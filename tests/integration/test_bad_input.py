"""test_bad_input.py - every kind of bad input gets its exact reply, and
nothing of it reaches the queue.

Each test takes a snapshot of the queue (relayctl queue --json count and
the files in queue/) before the bad input and asserts afterwards that it
is unchanged and that incoming/ holds nothing. Where the daemon promises
that the session stays usable, a following good command or message is
checked too.
"""
import base64
import resource
import socket
import ssl
import time

import relaylib as L
from relaylib import RelayD, check, eq, fail


def _b64(s):
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()


def _plain_session(d):
    """A plaintext session on the relay-network listener, after EHLO."""
    c = d.client("plain")
    c.ehlo()
    return c


def _start_txn(c, rcpts=1):
    c.expect("MAIL FROM:<a@example.com>", "250 2.1.0")
    for i in range(rcpts):
        c.expect("RCPT TO:<r%d@example.net>" % i, "250 2.1.5")


def _small(c, subject="small"):
    """A complete good transaction on an open session; the queue id."""
    return L.queued_id(c.send_message("ok@example.com", ["ok@example.net"],
                                      L.make_message(subject)))


def test_command_line_too_long():
    with RelayD(limits=dict(max_line_length=512)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            # 512 octets including CRLF is the limit itself: accepted.
            line = "NOOP " + "x" * (512 - 2 - 5)
            eq(c.cmd(line), "250 2.0.0 Ok", "512-octet line")
            eq(c.cmd(line + "x"),
               "500 5.5.2 Line too long (limit 512 octets)", "513-octet line")
            # Much longer than the read buffer, sent in pieces.
            c.send("NOOP " + "y" * 5000)
            time.sleep(0.05)
            c.send("z" * 70000 + "\r\n")
            eq(c.reply_text(), "500 5.5.2 Line too long (limit 512 octets)",
               "70 kB line")
            # Inside a transaction: the state survives.
            c.expect("MAIL FROM:<a@example.com>", "250")
            check(c.cmd("RCPT TO:<" + "b" * 600 + "@example.net>")
                  .startswith("500 5.5.2"), "long RCPT")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("RSET", "250")
            d.assert_unchanged(snap, "long lines")
            _small(c)
        eq(d.queue_count(), snap[0] + 1, "good message after long lines")


def test_unknown_command():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            for bad in ("FOO", "MAILFROM:<a@example.com>", "EHLOX a",
                        "", " ", "TURN", "ETRN example.com", "X-PWN"):
                eq(c.cmd(bad), "500 5.5.1 Command unrecognized",
                   "reply to %r" % bad)
                c.expect("RSET", "250")   # errors: keep under max_errors
            d.assert_unchanged(snap, "unknown commands")


def test_out_of_sequence():
    with RelayD() as d:
        snap = d.snapshot()
        with d.client("plain") as c:
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "503 5.5.1 Error: send EHLO first", "MAIL before EHLO")
            check(c.cmd("RCPT TO:<b@example.net>").startswith("503 5.5.1"),
                  "RCPT before EHLO")
            check(c.cmd("DATA").startswith("503 5.5.1"), "DATA before EHLO")
            c.ehlo()
            eq(c.cmd("RCPT TO:<b@example.net>"),
               "503 5.5.1 Error: need MAIL command", "RCPT before MAIL")
            eq(c.cmd("DATA"), "503 5.5.1 Error: bad sequence of commands",
               "DATA before MAIL")
            c.expect("MAIL FROM:<a@example.com>", "250")
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "503 5.5.1 Error: nested MAIL command", "nested MAIL")
            eq(c.cmd("DATA"), "554 5.5.1 Error: no valid recipients",
               "DATA before RCPT")
            c.expect("RCPT TO:<b@example.net>", "250")
            check(c.cmd("STARTTLS").startswith("503 5.5.1"),
                  "STARTTLS in a transaction")
            check(c.cmd("AUTH PLAIN").startswith("503 5.5.1"),
                  "AUTH in a transaction")
            # The transaction survived the errors.
            c.expect("DATA", "354")
            c.send(L.make_message("after errors") + b".\r\n")
            L.queued_id(c.reply_text())
        eq(d.queue_count(), snap[0] + 1, "one message")
        snap = d.snapshot()
        with d.client("plain") as c:
            c.ehlo()
            eq(c.cmd("DATA"), "503 5.5.1 Error: bad sequence of commands",
               "DATA after EHLO")
            d.assert_unchanged(snap, "out of sequence")


def test_data_with_all_recipients_refused():
    lis = [dict(name="open", tls="none", auth_required=False)]
    with RelayD(listeners=lis, relay_networks=[]) as d:
        snap = d.snapshot()
        with d.client("open") as c:
            c.ehlo()
            c.expect("MAIL FROM:<a@example.com>", "250 2.1.0")
            eq(c.cmd("RCPT TO:<b@example.net>"),
               "554 5.7.1 Relay access denied", "RCPT outside relay nets")
            eq(c.cmd("RCPT TO:<c@example.net>"),
               "554 5.7.1 Relay access denied", "second RCPT")
            eq(c.cmd("DATA"), "554 5.5.1 Error: no valid recipients", "DATA")
            eq(c.cmd("AUTH PLAIN"), "503 5.5.1 Error: AUTH only after EHLO "
               "and outside a transaction", "AUTH inside MAIL")
            c.expect("RSET", "250")
            check(c.cmd("AUTH PLAIN").startswith("538 5.7.11"),
                  "AUTH on plaintext")
        d.assert_unchanged(snap, "refused recipients")
        d.wait_log(r"smtp reject peer=127\.0\.0\.1 rcpt=b@example\.net "
                   r"reason=relay")


def test_auth_required_and_tls_required():
    with RelayD(relay_networks=[]) as d:
        snap = d.snapshot()
        with d.client("sub") as c:
            c.ehlo()
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "530 5.7.0 Authentication required", "MAIL without AUTH")
            eq(c.cmd("AUTH PLAIN " + _b64("\0%s\0%s" % (L.USER, L.PASSWORD))),
               "538 5.7.11 Encryption required for requested authentication "
               "mechanism", "AUTH before STARTTLS")
            c.starttls()
            c.ehlo()
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "530 5.7.0 Authentication required", "MAIL under TLS, no AUTH")
            check(c.cmd("RCPT TO:<b@example.net>").startswith("503"),
                  "RCPT without MAIL")
        with d.client("smtps") as c:
            c.ehlo()
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "530 5.7.0 Authentication required", "implicit, no AUTH")
        with d.client("plain") as c:
            c.ehlo()
            check(c.cmd("AUTH LOGIN").startswith("538 5.7.11"),
                  "AUTH on a plaintext listener")
            c.expect("MAIL FROM:<a@example.com>", "250")
            eq(c.cmd("RCPT TO:<b@example.net>"),
               "554 5.7.1 Relay access denied", "relay denied")
        d.assert_unchanged(snap, "unauthenticated")


def test_auth_required_listener_from_relay_network():
    """relay.conf.example: auth_required = true refuses MAIL until the
    client has authenticated, "even from relay_networks"."""
    with RelayD(relay_networks=["127.0.0.0/8"]) as d:
        snap = d.snapshot()
        with d.client("sub") as c:
            c.ehlo()
            r = c.cmd("MAIL FROM:<a@example.com>")
            if not r.startswith("530 5.7.0"):
                c.cmd("RSET")
                fail("DAEMON BUG: auth_required=true listener accepted "
                     "MAIL without AUTH from a relay network (reply %r); "
                     "relay.conf.example says it is refused \"even from "
                     "relay_networks\"" % r)
        d.assert_unchanged(snap, "auth_required from relay network")


def test_message_too_big():
    with RelayD(limits=dict(max_message_size=4096)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            eq(c.cmd("MAIL FROM:<a@example.com> SIZE=4097"),
               "552 5.3.4 Message size exceeds fixed maximum message size",
               "SIZE over the limit")
            # SIZE= exactly at the limit is fine.
            c.expect("MAIL FROM:<a@example.com> SIZE=4096", "250")
            c.expect("RSET", "250")
            _start_txn(c)
            c.expect("DATA", "354")
            big = L.make_message("big") + b"x" * 70 + b"\r\n"
            big += (b"y" * 70 + b"\r\n") * 200
            c.send(big + b".\r\n")
            eq(c.reply_text(),
               "552 5.3.4 Message size exceeds fixed maximum message size",
               "end of DATA")
            d.assert_unchanged(snap, "too big DATA")
            # BDAT: refused at LAST.
            _start_txn(c)
            c.send(b"BDAT 3000\r\n" + big[:3000])
            check(c.reply_text().startswith("250 2.0.0 Ok: 3000 octets"),
                  "first chunk")
            c.send(b"BDAT 3000 LAST\r\n" + big[3000:6000])
            check(c.reply_text().startswith("552 5.3.4"), "BDAT too big")
            d.assert_unchanged(snap, "too big BDAT")
            # The session stays usable.
            _small(c)
        eq(d.queue_count(), snap[0] + 1, "small message after big ones")


def test_too_many_recipients():
    with RelayD(limits=dict(max_recipients=3)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            _start_txn(c, 3)
            eq(c.cmd("RCPT TO:<r3@example.net>"),
               "452 4.5.3 Too many recipients", "4th RCPT")
            eq(c.cmd("RCPT TO:<r4@example.net>"),
               "452 4.5.3 Too many recipients", "5th RCPT")
            c.expect("RSET", "250")
            d.assert_unchanged(snap, "too many recipients")
            # The 452 is temporary: the first three can still be sent.
            _start_txn(c, 3)
            check(c.cmd("RCPT TO:<r3@example.net>").startswith("452"), "452")
            c.expect("DATA", "354")
            c.send(L.make_message("three") + b".\r\n")
            qid = L.queued_id(c.reply_text())
        m = [x for x in d.queue_json()["messages"] if x["id"] == qid][0]
        eq([r["address"] for r in m["recipients"]],
           ["r0@example.net", "r1@example.net", "r2@example.net"],
           "recipients kept")


def _data_reject(c, body, want, what):
    _start_txn(c)
    c.expect("DATA", "354")
    c.send(body + b"\r\n.\r\n")
    r = c.reply_text()
    check(r.startswith(want), "%s: expected %r, got %r" % (what, want, r))


def test_long_text_line_in_data():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            _data_reject(c, b"Subject: x\r\n\r\n" + b"a" * 999,
                         "554 5.6.0 Message has a line over 998 octets",
                         "999-octet body line")
            _data_reject(c, b"Subject: " + b"h" * 1000, "554 5.6.0",
                         "long header line")
            d.assert_unchanged(snap, "long DATA lines")
            # 998 octets is allowed.
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            c.send(b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n.\r\n")
            L.queued_id(c.reply_text())


def test_bare_lf_and_bare_cr_in_data():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            want = "554 5.6.2 Message contains bare CR or LF"
            _data_reject(c, b"Subject: x\n\nbody", want, "bare LF")
            _data_reject(c, b"Subject: x\r\n\r\nbody\nmore", want,
                         "bare LF in body")
            _data_reject(c, b"Subject: x\r\n\r\nbody\rmore", want,
                         "bare CR in body")
            _data_reject(c, b"Subject: x\r\n\r\nbody\r", want,
                         "bare CR at the end")
            # SMTP smuggling: <LF>.<LF> and <LF>.<CR><LF> do not end DATA;
            # the text after them is body, and the message is refused.
            _start_txn(c)
            c.expect("DATA", "354")
            c.send(b"Subject: s\r\n\r\nx\n.\nMAIL FROM:<evil@example.com>\r\n"
                   b"RCPT TO:<v@example.net>\r\nDATA\r\nsmuggled\n.\r\n"
                   b"more\r\n.\r\n")
            check(c.reply_text().startswith(want), "smuggling attempt")
            eq(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP after smuggling")
            d.assert_unchanged(snap, "bare CR/LF")
            _small(c)


def test_nul_in_data_and_in_command():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            _data_reject(c, b"Subject: x\r\n\r\nbo\0dy",
                         "554 5.6.0 Message contains NUL octets", "NUL body")
            _data_reject(c, b"Subj\0ect: x\r\n\r\nbody", "554 5.6.0",
                         "NUL header")
            eq(c.cmd(b"NOOP\0"), "500 5.5.2 NUL octet in command",
               "NUL in NOOP")
            eq(c.cmd(b"MAIL FROM:<a@exa\0mple.com>"),
               "500 5.5.2 NUL octet in command", "NUL in MAIL")
            d.assert_unchanged(snap, "NUL octets")
            _small(c)


def test_starttls_with_pipelined_commands():
    with RelayD() as d:
        snap = d.snapshot()
        with d.client("sub") as c:
            c.ehlo()
            c.send(b"STARTTLS\r\nNOOP\r\n")
            eq(c.reply_text(),
               "421 5.5.1 Error: command pipelined after STARTTLS", "reply")
            check(c.closed(), "connection closed after 421")
            eq(c.buf, b"", "nothing after the 421 (NOOP not answered)")
        # A TLS ClientHello glued to STARTTLS is refused the same way.
        with d.client("sub") as c:
            c.ehlo()
            c.send(b"STARTTLS\r\n\x16\x03\x01\x00\x05hello")
            check(c.reply_text().startswith("421 5.5.1"), "ClientHello glued")
            check(c.closed(), "closed")
        d.wait_log(r"reason=\"data pipelined after STARTTLS\"")
        with d.client("sub") as c:
            c.ehlo()
            check(c.cmd("STARTTLS now").startswith("501 5.5.4"),
                  "STARTTLS with an argument")
            c.starttls()
            c.ehlo()
            eq(c.cmd("STARTTLS"), "503 5.5.1 Error: TLS already active",
               "STARTTLS twice")
        with d.client("plain") as c:
            c.ehlo()
            eq(c.cmd("STARTTLS"), "454 4.7.0 TLS not available",
               "STARTTLS on a plaintext listener")
        d.assert_unchanged(snap, "STARTTLS")


def test_bad_tls_handshakes():
    with RelayD(timeouts=dict(tls_handshake=1)) as d:
        snap = d.snapshot()
        # Plaintext to the implicit TLS listener: dropped, nothing sent.
        s = socket.create_connection((L.HOST, d.port("smtps")), timeout=10)
        s.sendall(b"EHLO client.test\r\n")
        s.settimeout(5 * L.SLOW)
        got = b""
        try:
            for _ in range(100):
                b = s.recv(4096)
                if not b:
                    break
                got += b
        except ConnectionResetError:
            pass
        s.close()
        check(b"250" not in got, "plaintext EHLO answered on smtps: %r" % got)
        # Garbage after STARTTLS.
        with d.client("sub") as c:
            c.ehlo()
            c.expect("STARTTLS", "220")
            c.send(b"this is not TLS\r\n" * 10)
            check(c.closed(), "garbage handshake closed")
        # Silent client on the implicit listener: cut at tls_handshake.
        t0 = time.monotonic()
        s = socket.create_connection((L.HOST, d.port("smtps")), timeout=10)
        s.settimeout(10 * L.SLOW)
        try:
            eq(s.recv(100), b"", "silent TLS client")
        except ConnectionResetError:
            pass
        s.close()
        dt = time.monotonic() - t0
        check(0.8 <= dt <= 5 * L.SLOW,
              "TLS handshake timeout took %.2f s" % dt)
        d.assert_unchanged(snap, "bad TLS handshakes")
        # Still serving.
        with d.client("smtps") as c:
            c.login()
            _small(c)


def test_auth_bad_input():
    with RelayD() as d:
        snap = d.snapshot()
        with d.client("smtps") as c:
            c.ehlo()
            eq(c.cmd("AUTH PLAIN !!!notbase64"),
               "501 5.5.2 Invalid base64 data", "bad base64 initial")
            eq(c.cmd("AUTH PLAIN"), "334 ", "challenge")
            eq(c.cmd("%%%%"), "501 5.5.2 Invalid base64 data",
               "bad base64 response")
            eq(c.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6", "LOGIN")
            eq(c.cmd("abc"), "501 5.5.2 Invalid base64 data",
               "bad base64 user")
            eq(c.cmd("AUTH PLAIN " + _b64("no-nuls-here")),
               "501 5.5.2 Invalid PLAIN response", "PLAIN without NULs")
            eq(c.cmd("AUTH PLAIN " + _b64("bob\0%s\0%s" % (L.USER,
                                                           L.PASSWORD))),
               "535 5.7.8 Authorization identity must match the login",
               "authzid differs")
            eq(c.cmd("AUTH PLAIN"), "334 ", "challenge")
            eq(c.cmd("*"), "501 5.0.0 Authentication cancelled", "cancel")
            eq(c.cmd("AUTH CRAM-MD5"),
               "504 5.5.4 Unrecognized authentication type", "CRAM-MD5")
            c.expect("RSET", "250")
        with d.client("smtps") as c:
            c.ehlo()
            check(c.cmd("AUTH").startswith("501 5.5.4"), "AUTH alone")
            eq(c.cmd("AUTH LOGIN " + _b64("")), "501 5.5.2 Invalid user name",
               "empty LOGIN user")
            # After the errors a good AUTH still works.
            check(c.auth_plain().startswith("235"), "good AUTH")
        eq(d.status()["auth_failures"], 0, "syntax errors are not failures")
        d.assert_unchanged(snap, "bad AUTH input")


def test_wrong_credentials():
    delay = 0.5
    with RelayD(auth=dict(failure_delay=delay, max_failures=10),
                users={L.USER: L.PASSWORD, "bob": "bobs-password"},
                relay_networks=[]) as d:
        snap = d.snapshot()
        with d.client("smtps") as c:
            c.ehlo()
            for what, tok in (
                    ("wrong password", "\0%s\0wrong" % L.USER),
                    ("unknown user", "\0mallory\0%s" % L.PASSWORD),
                    ("other user's password", "\0bob\0%s" % L.PASSWORD),
                    ("case of login", "\0ALICE\0%s" % L.PASSWORD)):
                t0 = time.monotonic()
                eq(c.cmd("AUTH PLAIN " + _b64(tok)),
                   "535 5.7.8 Authentication credentials invalid", what)
                dt = time.monotonic() - t0
                check(dt >= delay - 0.02, "%s: 535 after %.3f s, want >= %.1f"
                      % (what, dt, delay))
            eq(c.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6", "LOGIN")
            eq(c.cmd(_b64(L.USER)), "334 UGFzc3dvcmQ6", "LOGIN")
            eq(c.cmd(_b64("nope")),
               "535 5.7.8 Authentication credentials invalid", "LOGIN wrong")
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "530 5.7.0 Authentication required", "MAIL after failures")
            check(c.auth_plain("bob", "bobs-password").startswith("235"),
                  "bob")
        d.assert_unchanged(snap, "wrong credentials")
        eq(d.status()["auth_failures"], 5, "auth_failures counter")
        d.wait_log(r"smtp auth peer=127\.0\.0\.1 user=mallory result=failed")


def test_auth_failure_limit():
    with RelayD(auth=dict(failure_delay=0.05, max_failures=3,
                          failure_window=300)) as d:
        snap = d.snapshot()
        bad = "AUTH PLAIN " + _b64("\0%s\0wrong" % L.USER)
        with d.client("smtps") as c:
            c.ehlo()
            for i in range(2):
                eq(c.cmd(bad), "535 5.7.8 Authentication credentials invalid",
                   "failure %d" % (i + 1))
        with d.client("smtps") as c:
            c.ehlo()
            # The failure that reaches the limit: 535, then 421 and close.
            eq(c.cmd(bad), "535 5.7.8 Authentication credentials invalid",
               "third failure")
            eq(c.reply_text(), "421 4.7.0 Too many authentication failures, "
               "try again later", "421 after the limit")
            check(c.closed(), "closed")
        # Any AUTH from this address now: 421 4.7.0 and the close, even
        # with the right password.
        for tok in (bad, "AUTH PLAIN " + _b64("\0%s\0%s" % (L.USER,
                                                            L.PASSWORD))):
            with d.client("smtps") as c:
                c.ehlo()
                eq(c.cmd(tok), "421 4.7.0 Too many authentication failures, "
                   "try again later", "blocked AUTH")
                check(c.closed(), "closed after 421")
        d.assert_unchanged(snap, "AUTH failure limit")
        # Relay-network plaintext still works: the block is on AUTH only.
        with _plain_session(d) as c:
            _small(c)


def test_auth_failure_window_expires():
    with RelayD(auth=dict(failure_delay=0.01, max_failures=1,
                          failure_window=2)) as d:
        bad = "AUTH PLAIN " + _b64("\0%s\0wrong" % L.USER)
        with d.client("smtps") as c:
            c.ehlo()
            check(c.cmd(bad).startswith("535"), "failure")
            check(c.reply_text().startswith("421 4.7.0"), "limit")
        with d.client("smtps") as c:
            c.ehlo()
            check(c.auth_plain().startswith("421 4.7.0"),
                  "blocked right after the failure")
        t0 = time.monotonic()
        ok = False
        for _ in range(60):
            time.sleep(0.1)
            with d.client("smtps") as c:
                c.ehlo()
                r = c.auth_plain()
                if r.startswith("235"):
                    ok = True
                    break
                check(r.startswith("421 4.7.0"), "blocked: %r" % r)
        check(ok, "AUTH still blocked %.1f s after a 2 s failure window" %
              (time.monotonic() - t0))


def test_idle_timeout():
    with RelayD(timeouts=dict(command=1, data=1)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            t0 = time.monotonic()
            eq(c.reply_text(timeout=10), "421 4.4.2 Error: timeout exceeded",
               "idle")
            dt = time.monotonic() - t0
            check(0.8 <= dt <= 4 * L.SLOW, "timeout after %.2f s" % dt)
            check(c.closed(), "closed after timeout")
        # In the middle of DATA (timeouts.data).
        with _plain_session(d) as c:
            _start_txn(c)
            c.expect("DATA", "354")
            c.send(b"Subject: x\r\n\r\npartial body")
            eq(c.reply_text(timeout=10), "421 4.4.2 Error: timeout exceeded",
               "idle in DATA")
            check(c.closed(), "closed after DATA timeout")
        # Inside a BDAT chunk.
        with _plain_session(d) as c:
            _start_txn(c)
            c.send(b"BDAT 100\r\nonly a part")
            check(c.reply_text(timeout=10).startswith("421 4.4.2"),
                  "idle in BDAT")
        d.assert_unchanged(snap, "timeouts")
        d.wait_log(r"smtp timeout peer=127\.0\.0\.1 state=DATA")


def test_max_connections():
    with RelayD(limits=dict(max_connections=3, max_connections_per_ip=3)) \
            as d:
        snap = d.snapshot()
        held = [d.client("plain") for _ in range(3)]
        try:
            for c in held:
                eq(c.banner[0], 220, "held connection")
            c4 = d.client("plain", greet=False)
            eq(c4.reply_text(),
               "421 4.3.2 Too many connections, try again later", "4th")
            check(c4.closed(), "4th closed")
            c4.close()
            # Implicit TLS listener: closed without a plaintext reply.
            s = socket.create_connection((L.HOST, d.port("smtps")),
                                         timeout=10)
            try:
                L.tls_client_context().wrap_socket(s)
                fail("TLS handshake succeeded over the connection limit")
            except (ssl.SSLError, ConnectionResetError, OSError):
                pass
            finally:
                s.close()
            d.assert_unchanged(snap, "connections over the limit")
            # Held sessions work; freeing one makes room.
            held[0].ehlo()
            _small(held[0])
            held[0].cmd("QUIT")
            held[0].close()
            ok = False
            for _ in range(50):
                c = d.client("plain", greet=False)
                code, _ = c.reply()
                c.close()
                if code == 220:
                    ok = True
                    break
                time.sleep(0.05)
            check(ok, "no room after one connection closed")
        finally:
            for c in held:
                c.close()
        eq(d.status()["refused"] >= 2, True, "refused counter")


def test_max_connections_per_ip():
    with RelayD(limits=dict(max_connections=10, max_connections_per_ip=2)) \
            as d:
        snap = d.snapshot()
        held = [d.client("plain") for _ in range(2)]
        try:
            c3 = d.client("plain", greet=False)
            eq(c3.reply_text(),
               "421 4.7.0 Too many connections from your address", "3rd")
            check(c3.closed(), "3rd closed")
            c3.close()
            d.assert_unchanged(snap, "per-address limit")
            held[1].ehlo()
            _small(held[1])
        finally:
            for c in held:
                c.close()


def test_max_errors():
    with RelayD(limits=dict(max_errors=3)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            eq(c.cmd("FOO"), "500 5.5.1 Command unrecognized", "1st")
            eq(c.cmd("RCPT TO:<a@example.net>"),
               "503 5.5.1 Error: need MAIL command", "2nd")
            eq(c.cmd("BAR"), "500 5.5.1 Command unrecognized", "3rd")
            eq(c.reply_text(), "421 4.7.0 Too many errors", "421")
            check(c.closed(), "closed")
        # Pipelined errors: commands after the 421 are not answered.
        with _plain_session(d) as c:
            c.send(b"X1\r\nX2\r\nX3\r\nNOOP\r\nNOOP\r\n")
            for i in range(3):
                check(c.reply_text().startswith("500"), "error %d" % i)
            eq(c.reply_text(), "421 4.7.0 Too many errors", "421")
            check(c.closed(), "closed")
            eq(c.buf, b"", "no replies after the 421")
        d.assert_unchanged(snap, "max_errors")


def test_write_error_file_size_limit():
    limit = 200000

    def lim():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with RelayD(preexec_fn=lim) as d:
        snap = d.snapshot()
        big = L.make_message("too big for the disk") + \
            (b"z" * 98 + b"\r\n") * 3000
        with _plain_session(d) as c:
            _start_txn(c)
            c.expect("DATA", "354")
            c.send(big + b".\r\n")
            eq(c.reply_text(), "452 4.3.1 Insufficient system storage",
               "300 kB message over RLIMIT_FSIZE")
            d.assert_unchanged(snap, "write error")
            eq(d.spool_files("incoming"), [], "incoming/ after write error")
            # BDAT too.
            _start_txn(c)
            c.send(b"BDAT %d LAST\r\n" % len(big) + big)
            eq(c.reply_text(), "452 4.3.1 Insufficient system storage",
               "BDAT over RLIMIT_FSIZE")
            d.assert_unchanged(snap, "BDAT write error")
            # The same session still takes a small message.
            qid = _small(c, "after the write error")
        eq(d.queue_ids(), [qid], "only the small message is queued")
        d.wait_log(r"spool-error")


def test_bdat_out_of_sequence_and_syntax():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            # Before MAIL: the chunk is read and dropped, then 503. The
            # chunk's content (QUIT) must not run as a command.
            chunk = b"QUIT\r\n" + b"x" * 100
            c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
            eq(c.reply_text(), "503 5.5.1 Error: BDAT needs MAIL and RCPT "
               "first", "BDAT before MAIL")
            eq(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP after the dropped chunk")
            # After MAIL, before RCPT.
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.send(b"BDAT 6 LAST\r\nQUIT\r\n")
            check(c.reply_text().startswith("503 5.5.1"), "BDAT before RCPT")
            eq(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP")
            c.expect("RSET", "250")
            # DATA in the middle of a BDAT transfer.
            _start_txn(c)
            c.send(b"BDAT 5\r\nabcde")
            check(c.reply_text().startswith("250 2.0.0 Ok: 5 octets"),
                  "chunk")
            check(c.cmd("DATA").startswith("503 5.5.1 Error: "),
                  "DATA during BDAT")
            eq(c.cmd("MAIL FROM:<x@example.com>"),
               "503 5.5.1 Error: nested MAIL command", "MAIL during BDAT")
            c.expect("RSET", "250")
            d.assert_unchanged(snap, "BDAT out of sequence")
        with _plain_session(d) as c:
            _start_txn(c)
            eq(c.cmd("BDAT abc"), "421 5.5.4 Syntax: BDAT size [LAST]; "
               "closing", "BDAT without a size")
            check(c.closed(), "closed")
        with _plain_session(d) as c:
            _start_txn(c)
            check(c.cmd("BDAT 10 NOTLAST").startswith("421 5.5.4"),
                  "BDAT bad keyword")
        with _plain_session(d) as c:
            _start_txn(c)
            check(c.cmd("BDAT -5").startswith("421 5.5.4"), "BDAT negative")
        d.assert_unchanged(snap, "BDAT syntax")


def test_bad_parameters():
    with RelayD(limits=dict(max_errors=100)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            eq(c.cmd("MAIL FROM:<a@example.com> FOO=bar"),
               "555 5.5.4 Unsupported MAIL parameter FOO", "unknown MAIL")
            eq(c.cmd("MAIL FROM:<a@example.com> XYZ"),
               "555 5.5.4 Unsupported MAIL parameter XYZ", "unknown flag")
            for bad in ("RET=BOGUS", "BODY=9BIT", "SIZE=abc", "SIZE=-1",
                        "ENVID=a+ZZ", "RET", "SMTPUTF8=yes"):
                r = c.cmd("MAIL FROM:<a@example.com> " + bad)
                check(r.startswith("501 5.5.4") or r.startswith("555 5.5.4"),
                      "MAIL %s: %r" % (bad, r))
                c.expect("RSET", "250")
            c.expect("MAIL FROM:<a@example.com>", "250")
            eq(c.cmd("RCPT TO:<b@example.net> FOO=1"),
               "555 5.5.4 Unsupported RCPT parameter FOO", "unknown RCPT")
            for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES",
                        "ORCPT=no-semicolon", "NOTIFY="):
                r = c.cmd("RCPT TO:<b@example.net> " + bad)
                check(r.startswith("501 5.5.4"), "RCPT %s: %r" % (bad, r))
            c.expect("RSET", "250")
        d.assert_unchanged(snap, "bad parameters")


def test_bad_addresses():
    with RelayD(limits=dict(max_errors=100)) as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            # UTF-8 needs SMTPUTF8.
            r = c.cmd("MAIL FROM:<\u00fc@ex\u00e4mple.com>")
            check(r.startswith("501 5.1.7"), "UTF-8 without SMTPUTF8: %r" % r)
            c.expect("MAIL FROM:<a@example.com>", "250")
            r = c.cmd("RCPT TO:<j\u00f6rg@example.net>")
            check(r.startswith("501 5.1.3"), "UTF-8 RCPT without SMTPUTF8")
            c.expect("RSET", "250")
            # Invalid UTF-8 even with SMTPUTF8.
            r = c.cmd(b"MAIL FROM:<\xff\xfe@example.com> SMTPUTF8")
            check(r.startswith("501"), "invalid UTF-8: %r" % r)
            for bad in ("<a b@example.com>", "<a@@example.com>",
                        "<@example.com>", "<a@example.com", "<a@-bad-.com>",
                        "<a@example..com>", "<" + "l" * 65 + "@example.com>",
                        "<a@" + "d" * 64 + ".com>"):
                r = c.cmd("MAIL FROM:" + bad)
                check(r.startswith("501"), "MAIL FROM:%s: %r" % (bad, r))
            check(c.cmd("MAIL FROM").startswith("501 5.5.4 Syntax"),
                  "MAIL without FROM:")
            c.expect("MAIL FROM:<a@example.com>", "250")
            for bad in ("<>", "<b@>", "b", "<b@example.net> <c@example.net>"):
                r = c.cmd("RCPT TO:" + bad)
                check(r.startswith("501"), "RCPT TO:%s: %r" % (bad, r))
            check(c.cmd("RCPT").startswith("501 5.5.4 Syntax"),
                  "RCPT without TO:")
            eq(c.cmd("DATA"), "554 5.5.1 Error: no valid recipients", "DATA")
            check(c.cmd("EHLO").startswith("501 5.5.4"), "EHLO without name")
            check(c.cmd("HELO a b").startswith("501 5.5.4"), "HELO two words")
        d.assert_unchanged(snap, "bad addresses")


def test_client_disconnects_mid_data():
    """A client that vanishes inside DATA or BDAT leaves nothing behind."""
    with RelayD() as d:
        snap = d.snapshot()
        for mode in ("data", "bdat"):
            c = _plain_session(d)
            _start_txn(c)
            if mode == "data":
                c.expect("DATA", "354")
                c.send(L.make_message("vanish") + b"x" * 100000)
            else:
                c.send(b"BDAT 200000 LAST\r\n" + b"y" * 100000)
            time.sleep(0.1)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                              b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.close()   # RST
        L.wait_until(lambda: d.status()["sessions"] == 0, what="sessions gone")
        d.assert_unchanged(snap, "client gone mid-DATA")
        with _plain_session(d) as c:
            _small(c)


def _well_formed(msg):
    """Problems of a stored message: bare CR/LF, lines over 998 octets,
    control characters in our Received: field."""
    problems = []
    stripped = msg.replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped:
        problems.append("bare CR or LF")
    long_lines = [len(x) for x in msg.split(b"\r\n") if len(x) > 998]
    if long_lines:
        problems.append("line(s) over 998 octets: %s" % long_lines[:3])
    recv, _ = L.split_received(msg) if msg.startswith(b"Received: ") \
        else (b"", b"")
    ctl = sorted({ch for ch in recv if (ch < 32 and ch not in (9, 10, 13))
                  or ch == 127})
    if ctl:
        problems.append("control octets %s in Received:" % ctl)
    return problems


def test_hostile_helo_does_not_corrupt_the_message():
    """EHLO with a bare CR or control octets must be refused or cleaned:
    the stored message may not carry them (the relay refuses the same
    bytes in DATA with 554 5.6.2)."""
    with RelayD() as d:
        bad = []
        for helo in ("foo\rX-Injected: yes", "a\x01b\x7fc", "x\x1by"):
            with d.client("plain") as c:
                r = c.cmd("EHLO " + helo)
                if r.startswith("501"):
                    continue
                check(r.startswith("250"), "EHLO %r: %r" % (helo, r))
                qid = L.queued_id(c.send_message(
                    "a@example.com", ["b@example.net"],
                    L.make_message("helo")))
                p = _well_formed(d.msg_bytes(qid))
                if p:
                    bad.append("EHLO %r -> %s" % (helo, ", ".join(p)))
        if bad:
            fail("DAEMON BUG: EHLO argument copied unchecked into the "
                 "stored Received: header: %s" % "; ".join(bad))


def test_long_helo_keeps_lines_under_998():
    """A long (but within max_line_length) EHLO name must not produce a
    Received: line over 998 octets (RFC 5322 2.1.1)."""
    with RelayD() as d:
        with d.client("plain") as c:
            r = c.cmd("EHLO " + "h" * 1500)
            if r.startswith("501"):
                return
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"],
                                             L.make_message("long helo")))
        p = _well_formed(d.msg_bytes(qid))
        if p:
            fail("DAEMON BUG: a 1500-octet EHLO name was accepted and the "
                 "stored message has %s" % p)


def test_auth_plain_long_initial_response():
    """AUTH PLAIN with an initial response over 1023 characters (long
    credentials, max_line_length raised for them as relay.conf.example
    suggests) must work like the same response after a 334."""
    user, pw = "u" * 520, "p" * 250
    tok = _b64("\0%s\0%s" % (user, pw))
    check(len(tok) > 1024, "token length")
    with RelayD(limits=dict(max_line_length=4096), users={user: pw}) as d:
        with d.client("smtps") as c:
            c.ehlo()
            eq(c.cmd("AUTH PLAIN"), "334 ", "challenge")
            r334 = c.cmd(tok)
        check(r334.startswith("235"), "after 334: %r" % r334)
        with d.client("smtps") as c:
            c.ehlo()
            r = c.cmd("AUTH PLAIN " + tok)
        if not r.startswith("235"):
            fail("DAEMON BUG: AUTH PLAIN initial response of %d chars got %r "
                 "(the same credentials after a 334 got 235): cmd_auth "
                 "copies it into a 1024-byte buffer with str_copy, which "
                 "truncates" % (len(tok), r))


def test_rset_and_quit_during_bdat_leave_no_body():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            _start_txn(c)
            c.send(b"BDAT 5\r\nabcde")
            check(c.reply_text().startswith("250 2.0.0 Ok: 5 octets"), "chunk")
            check(d.spool_files("incoming"), "body file while in BDAT")
            eq(c.cmd("RSET"), "250 2.0.0 Ok", "RSET")
            eq(d.spool_files("incoming"), [], "incoming/ after RSET")
            _start_txn(c)
            c.send(b"BDAT 5\r\nabcde")
            check(c.reply_text().startswith("250 2.0.0 Ok: 5 octets"), "chunk")
            check(c.cmd("EHLO again.test").startswith("503 5.5.1"),
                  "EHLO during BDAT")
            eq(c.cmd("RSET"), "250 2.0.0 Ok", "RSET")
            eq(d.spool_files("incoming"), [], "incoming/ after RSET")
            _start_txn(c)
            c.send(b"BDAT 5\r\nabcde")
            check(c.reply_text().startswith("250"), "chunk")
            eq(c.cmd("QUIT"), "221 2.0.0 Bye", "QUIT")
        d.assert_unchanged(snap, "RSET/EHLO/QUIT during BDAT")


def test_ehlo_and_starttls_reset_state():
    with RelayD() as d:
        snap = d.snapshot()
        with d.client("sub") as c:
            c.ehlo()
            c.starttls()
            # RFC 3207: after TLS the client must say EHLO again.
            eq(c.cmd("MAIL FROM:<a@example.com>"),
               "503 5.5.1 Error: send EHLO first", "MAIL right after TLS")
            c.ehlo()
            check(c.auth_plain().startswith("235"), "AUTH")
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.ehlo()      # resets the transaction, keeps the login
            eq(c.cmd("DATA"), "503 5.5.1 Error: bad sequence of commands",
               "DATA after EHLO reset")
            qid = _small(c)
        eq(d.queue_json()["messages"][0]["user"], L.USER, "still logged in")
        eq(d.queue_ids(), [qid], "queue")


def test_too_many_parameters():
    with RelayD() as d:
        snap = d.snapshot()
        with _plain_session(d) as c:
            params = " ".join("SIZE=%d" % i for i in range(20))
            check(c.cmd("MAIL FROM:<a@example.com> " + params)
                  .startswith("501 5.5.4"), "20 MAIL params")
            c.expect("MAIL FROM:<a@example.com>", "250")
            params = " ".join("NOTIFY=SUCCESS" for _ in range(20))
            check(c.cmd("RCPT TO:<b@example.net> " + params)
                  .startswith("501 5.5.4"), "20 RCPT params")
            check(c.cmd("MAIL FROM:<a@example.com> ENVID=" + "e" * 101)
                  .startswith("503"), "nested MAIL is still refused")
            c.expect("RSET", "250")
            check(c.cmd("MAIL FROM:<a@example.com> ENVID=" + "e" * 101)
                  .startswith("501 5.5.4"), "ENVID over 100")
        d.assert_unchanged(snap, "too many parameters")


def test_disconnect_during_auth():
    """Clients that vanish while the password is checked or during the
    failure delay: the daemon carries on (ASan build: no use after free)."""
    with RelayD(auth=dict(failure_delay=0.3, max_failures=50)) as d:
        snap = d.snapshot()
        for tok in ("\0%s\0wrong" % L.USER, "\0%s\0%s" % (L.USER, L.PASSWORD)):
            for wait in (0, 0.05, 0.4):
                c = d.client("smtps")
                c.ehlo()
                c.send("AUTH PLAIN " + _b64(tok) + "\r\n")
                if wait:
                    time.sleep(wait)
                c.close()
        L.wait_until(lambda: d.status()["sessions"] == 0, what="sessions")
        d.assert_unchanged(snap, "clients gone during AUTH")
        with d.client("smtps") as c:
            c.login()
            _small(c)
