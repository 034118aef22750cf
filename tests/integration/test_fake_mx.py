"""test_fake_mx - the scriptable fake MX (tools/fake_mx.c) on its own.

Each test starts $BUILD/fake-mx on loopback with ephemeral ports (port 0;
the "ready" line on stdout tells the bound addresses), drives it with
smtplib or a raw socket, and checks replies, the JSON record file and the
SIGUSR1 stats. Every wait is bounded; processes are stopped in `finally`.

Python 3.11 standard library only. Run alone with
    python3 tests/integration/runner.py tests/integration/test_fake_mx.py
"""
import hashlib
import json
import os
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_build = os.environ.get("BUILD", "build")
BUILD = _build if os.path.isabs(_build) else os.path.join(ROOT, _build)
FAKE_MX = os.path.join(BUILD, "fake-mx")
SANITIZER = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
             "runtime error:")
SLOW = 3.0 if ("asan" in BUILD or os.environ.get("ASAN_OPTIONS")) else 1.0


class FakeMX:
    """fake-mx in a temporary directory; use as a context manager."""

    def __init__(self, *args, listeners=("mx1=127.0.0.2:0",), lifetime=60):
        self.dir = tempfile.mkdtemp(prefix="fake-mx-")
        self.record = os.path.join(self.dir, "record.json")
        self.errlog = os.path.join(self.dir, "stderr.log")
        self.args = [FAKE_MX, "-q", "-S", "--die-with-parent",
                     "-t", str(lifetime), "-r", self.record]
        for spec in listeners:
            self.args += ["-l", spec]
        self.args += list(args)
        self.proc = None
        self.addr = {}

    def __enter__(self):
        self.err = open(self.errlog, "wb")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10 * SLOW)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ready "):
            self.__exit__(None, None, None)
            raise AssertionError("no ready line: %r; stderr: %r" %
                                 (line, self.stderr()))
        for word in line.split()[1:]:
            k, v = word.split("=", 1)
            if k == "pid":
                continue
            host, port = v.rsplit(":", 1)
            self.addr[k] = (host.strip("[]"), int(port))
        return self

    def __exit__(self, exc_type, exc, tb):
        """SIGTERM; fake-mx must exit 0 with no sanitizer report (checked
        only when the test body itself passed)."""
        rc, hung = None, False
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(10 * SLOW)
            except subprocess.TimeoutExpired:
                hung = True
                self.proc.kill()
                self.proc.wait(5)
        elif self.proc:
            rc = self.proc.returncode
        if self.proc:
            self.proc.stdout.close()
        self.err.close()
        log = self.stderr()
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is None and self.proc:
            check(not hung, "fake-mx ignored SIGTERM")
            check(not any(p in log for p in SANITIZER),
                  "sanitizer report:\n" + log[-4000:])
            eq(rc, 0, "fake-mx exit status (stderr %r)" % log[-2000:])
        return False

    def host_port(self, name="mx1"):
        return self.addr[name]

    def smtp(self, name="mx1", **kw):
        h, p = self.addr[name]
        return smtplib.SMTP(h, p, local_hostname="client.test",
                            timeout=10 * SLOW, **kw)

    def raw(self, name="mx1"):
        s = socket.create_connection(self.addr[name], timeout=10 * SLOW)
        return RawClient(s)

    def stderr(self):
        try:
            with open(self.errlog, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def records(self, event=None):
        out = []
        try:
            with open(self.record, "rb") as f:
                for line in f:
                    rec = json.loads(line)
                    if event is None or rec["event"] == event:
                        out.append(rec)
        except FileNotFoundError:
            pass
        return out

    def wait_records(self, event, n, timeout=5.0):
        """Poll until at least n records of event exist; return them."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            recs = self.records(event)
            if len(recs) >= n or time.monotonic() > deadline:
                return recs
            time.sleep(0.02)

    def stats(self):
        """SIGUSR1, then the newest stats line on stderr."""
        before = self.stderr().count('"event":"stats"')
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5 * SLOW
        while time.monotonic() < deadline:
            lines = [l for l in self.stderr().splitlines()
                     if '"event":"stats"' in l]
            if len(lines) > before:
                return json.loads(lines[-1])
            time.sleep(0.02)
        raise AssertionError("no stats after SIGUSR1: %r" % self.stderr())


class RawClient:
    """Bytes-exact SMTP client: send raw, read whole replies."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.reads = 0

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed; buffered %r" % self.buf)
        self.reads += 1
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        """(code, [lines]) of one possibly multi-line reply."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), lines

    def closed(self, timeout=5.0):
        """True once the server closed the connection (nothing more)."""
        self.sock.settimeout(timeout * SLOW)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def body_bytes(n=0):
    """A body with a leading-dot line (stuffed on the wire), 8-bit UTF-8
    and a CRLF at the end, so the unstuffed bytes are exactly this."""
    return (b"From: a@example.test\r\nSubject: test %d\r\n\r\n" % n +
            b".leading dot\r\n..two dots\r\nutf-8: \xc3\xa9\r\nend\r\n")


# ---------------------------------------------------------------------------


def test_accept_message_record():
    """A message via smtplib: record carries listener, envelope, size and
    the SHA-256 of the unstuffed body; -k keeps the body by its hash."""
    keep = tempfile.mkdtemp(prefix="fake-mx-keep-")
    try:
        with FakeMX("-k", keep, listeners=("mx1=127.0.0.2:0",
                                           "mx2=127.0.0.3:0")) as mx:
            eq(mx.host_port("mx2")[0], "127.0.0.3", "mx2 address")
            body = body_bytes()
            with mx.smtp("mx2") as c:
                code, ehlo = c.ehlo()
                eq(code, 250, "EHLO")
                for kw in (b"PIPELINING", b"8BITMIME", b"SIZE 10240000",
                           b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
                    check(kw in ehlo, "EHLO lacks %r: %r" % (kw, ehlo))
                check(b"STARTTLS" not in ehlo, "STARTTLS without --tls")
                refused = c.sendmail("sender@example.test",
                                     ["r1@example.test", "r2@example.test"],
                                     body)
                eq(refused, {}, "refused recipients")
            msgs = mx.wait_records("message", 1)
            eq(len(msgs), 1, "message records")
            m = msgs[0]
            eq(m["listener"], "mx2", "listener")
            eq(m["from"], "sender@example.test", "from")
            eq(m["rcpts"], ["r1@example.test", "r2@example.test"], "rcpts")
            eq(m["size"], len(body), "size")
            eq(m["sha256"], hashlib.sha256(body).hexdigest(), "sha256")
            eq(m["tls"], False, "tls")
            eq(m["body_file"], os.path.join(keep, m["sha256"]), "body_file")
            with open(m["body_file"], "rb") as f:
                eq(f.read(), body, "kept body")
            closes = mx.wait_records("close", 1)
            eq(closes[0]["reason"], "quit", "close reason")
            events = [r["event"] for r in mx.records()
                      if r.get("conn") == m["conn"]]
            for ev in ("connect", "ehlo", "mail", "rcpt", "data", "reply",
                       "message", "quit", "close"):
                check(ev in events, "no %s record in %r" % (ev, events))
            check(os.listdir(keep) == [m["sha256"]],
                  "temporary files left: %r" % os.listdir(keep))
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def test_greeting_421():
    with FakeMX("-e", "greeting 421 4.7.0 Try again later") as mx:
        try:
            mx.smtp()
            raise AssertionError("connected despite a 421 greeting")
        except smtplib.SMTPConnectError as e:
            eq(e.smtp_code, 421, "greeting code")
            eq(e.smtp_error, b"4.7.0 Try again later", "greeting text")
        c = mx.raw()
        code, lines = c.reply()
        eq(code, 421, "raw greeting")
        check(c.closed(), "connection stays open after a 421 greeting")
        c.close()
        replies = mx.wait_records("reply", 2)
        eq([r["code"] for r in replies], [421, 421], "recorded replies")


def test_rcpt_regex_550():
    rules = ("rcpt ~bounce@ 550 5.1.1 No such user   # a comment;"
             "rcpt ~^<grey@ 450 4.2.0 Greylisted")
    with FakeMX("-e", rules) as mx:
        with mx.smtp() as c:
            refused = c.sendmail("s@example.test",
                                 ["ok@example.test", "bounce@example.test",
                                  "grey@example.test", "Bounce@Other.test"],
                                 body_bytes())
        eq(refused, {
            "bounce@example.test": (550, b"5.1.1 No such user"),
            "grey@example.test": (450, b"4.2.0 Greylisted"),
            "Bounce@Other.test": (550, b"5.1.1 No such user"),
        }, "refused (the regex is case-insensitive)")
        m = mx.wait_records("message", 1)[0]
        eq(m["rcpts"], ["ok@example.test"], "accepted recipients")


def test_dot_every_n_and_first_n():
    with FakeMX("-e", "dot every 3 451 4.3.0 Temporary failure") as mx:
        codes = []
        with mx.smtp() as c:
            for i in range(6):
                try:
                    c.sendmail("s@example.test", ["r@example.test"],
                               body_bytes(i))
                    codes.append(250)
                except smtplib.SMTPDataError as e:
                    codes.append(e.smtp_code)
        eq(codes, [250, 250, 451, 250, 250, 451], "every 3")
        eq(len(mx.wait_records("message", 4)), 4, "accepted records")
        rej = mx.wait_records("rejected", 2)
        eq([r["code"] for r in rej], [451, 451], "rejected records")
        eq(rej[0]["sha256"], hashlib.sha256(body_bytes(2)).hexdigest(),
           "rejected body hash")
    with FakeMX("-e", "dot first 2 451 4.3.0 first two fail") as mx:
        codes = []
        for i in range(4):
            with mx.smtp() as c:
                try:
                    c.sendmail("s@example.test", ["r@example.test"],
                               body_bytes(i))
                    codes.append(250)
                except smtplib.SMTPDataError as e:
                    codes.append(e.smtp_code)
        eq(codes, [451, 451, 250, 250], "first 2 across connections")


def test_max_conn_and_stats():
    with FakeMX("--max-conn", "3") as mx:
        socks = []
        for i in range(3):
            c = mx.raw()
            eq(c.reply()[0], 220, "greeting %d" % i)
            socks.append(c)
        extra = mx.raw()
        code, lines = extra.reply()
        eq(code, 421, "over the limit")
        eq(lines, [b"421 4.7.0 Too many connections"], "limit text")
        check(extra.closed(), "connection over the limit stays open")
        extra.close()
        st = mx.stats()
        l = st["listeners"]["mx1"]
        eq((l["current"], l["peak"], l["rejected"]), (3, 3, 1),
           "listener current/peak/rejected")
        eq((st["conns"]["current"], st["conns"]["peak"]), (3, 3),
           "total current/peak")
        eq(st["replies"].get("421"), 1, "421 replies")
        eq(st["replies"].get("220"), 3, "220 replies")
        for c in socks:
            c.send(b"QUIT\r\n")
            eq(c.reply()[0], 221, "QUIT")
            c.close()
        mx.wait_records("close", 4)
        c = mx.raw()
        eq(c.reply()[0], 220, "a slot is free again")
        c.close()
        st = mx.stats()
        eq(st["listeners"]["mx1"]["peak"], 3, "peak stays")
    with FakeMX("--max-conn", "1:450 4.3.2 busy") as mx:
        a = mx.raw()
        eq(a.reply()[0], 220, "first")
        b = mx.raw()
        eq(b.reply(), (450, [b"450 4.3.2 busy"]), "custom limit reply")
        a.close()
        b.close()


def test_rate_limit():
    with FakeMX("--rate", "3/60") as mx:
        with mx.smtp() as c:
            for i in range(3):
                c.sendmail("s@example.test", ["r@example.test"],
                           body_bytes(i))
            try:
                c.sendmail("s@example.test", ["r@example.test"],
                           body_bytes(3))
                raise AssertionError("4th message accepted")
            except smtplib.SMTPSenderRefused as e:
                eq(e.smtp_code, 421, "rate code")
                eq(e.smtp_error, b"4.7.0 Error: too much mail from 127.0.0.1",
                   "rate text")
        # The count is per client IP, not per connection.
        with mx.smtp() as c:
            c.ehlo()
            code, _ = c.mail("s@example.test")
            eq(code, 421, "new connection, same IP")
        eq(len(mx.records("message")), 3, "accepted")
        closes = mx.wait_records("close", 2)
        eq([r["reason"] for r in closes], ["421", "421"], "closed after 421")
    with FakeMX("--rate", "1/0.5", "--rate-phase", "rcpt",
                "--rate-reply", "450 4.7.1 Error: too much mail") as mx:
        with mx.smtp() as c:
            c.sendmail("s@example.test", ["r@example.test"], body_bytes())
            eq(c.mail("s@example.test")[0], 250, "MAIL over the rate")
            eq(c.rcpt("r@example.test"),
               (450, b"4.7.1 Error: too much mail"), "RCPT over the rate")
            c.rset()
            time.sleep(0.6)
            c.sendmail("s@example.test", ["r@example.test"], body_bytes(1))
        eq(len(mx.wait_records("message", 2)), 2, "accepted after window")


def test_greylist():
    with FakeMX("--greylist", "1") as mx:
        with mx.smtp() as c:
            for attempt in range(2):
                try:
                    c.sendmail("s@example.test", ["r@example.test"],
                               body_bytes())
                    raise AssertionError("accepted at once")
                except smtplib.SMTPRecipientsRefused as e:
                    code, text = e.recipients["r@example.test"]
                    eq(code, 450, "greylist code, attempt %d" % attempt)
                    check(text.startswith(
                        b"4.2.0 <r@example.test>: Recipient address "
                        b"rejected: Greylisted, see http://postgrey."
                        b"schweikert.ch/help/example.test.html; please "
                        b"come back in "), "greylist text %r" % text)
                    check(text.endswith(b" seconds"), "text end %r" % text)
            # Another triplet is greylisted on its own.
            eq(c.mail("other@example.test")[0], 250, "MAIL")
            eq(c.rcpt("r@example.test")[0], 450, "other sender")
            c.rset()
            time.sleep(1.1)
            eq(c.sendmail("s@example.test", ["r@example.test"],
                          body_bytes()), {}, "accepted after the delay")
        eq(len(mx.wait_records("message", 1)), 1, "one message")


def _make_cert(d):
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                    "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2",
                    "-subj", "/CN=fake-mx.test"],
                   check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    return cert, key


def test_starttls():
    d = tempfile.mkdtemp(prefix="fake-mx-cert-")
    try:
        cert, key = _make_cert(d)
        with FakeMX("--tls", "%s:%s" % (cert, key)) as mx:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            body = body_bytes()
            with mx.smtp() as c:
                c.ehlo()
                check(c.has_extn("starttls"), "STARTTLS not offered")
                eq(c.starttls(context=ctx)[0], 220, "STARTTLS")
                c.ehlo()
                check(not c.has_extn("starttls"), "STARTTLS after TLS")
                eq(c.sendmail("s@example.test", ["r@example.test"], body),
                   {}, "refused")
            m = mx.wait_records("message", 1)[0]
            eq(m["tls"], True, "tls flag")
            eq(m["sha256"], hashlib.sha256(body).hexdigest(), "sha256")
            tls = mx.records("tls")
            check(tls and tls[0]["cipher"].startswith("TLS"),
                  "tls record %r" % tls)
            # Bytes pipelined after STARTTLS are an injection: dropped.
            c = mx.raw()
            c.reply()
            c.send(b"EHLO x\r\n")
            c.reply()
            c.send(b"STARTTLS\r\nNOOP\r\n")
            eq(c.reply()[0], 220, "STARTTLS reply")
            check(c.closed(), "injected command not refused")
            c.close()
            eq(mx.wait_records("close", 2)[-1]["reason"],
               "starttls: pipelined input", "close reason")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_pipelining_one_write():
    with FakeMX("-e", "rcpt ~bounce 550 5.1.1 No such user") as mx:
        c = mx.raw()
        eq(c.reply()[0], 220, "greeting")
        c.send(b"EHLO client.test\r\nMAIL FROM:<s@example.test>\r\n"
               b"RCPT TO:<a@example.test>\r\nRCPT TO:<bounce@example.test>"
               b"\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        codes = [c.reply()[0] for _ in range(6)]
        eq(codes, [250, 250, 250, 550, 250, 354], "pipelined replies")
        body = b"Subject: p\r\n\r\n.x\r\n"
        c.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\nRSET\r\n"
               b"MAIL FROM:<>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
        eq([c.reply()[0] for _ in range(5)], [250, 250, 250, 250, 354],
           "second batch")
        c.send(b".\r\nQUIT\r\n")
        eq([c.reply()[0] for _ in range(2)], [250, 221], "empty body, QUIT")
        check(c.closed(), "open after QUIT")
        c.close()
        msgs = mx.wait_records("message", 2)
        eq(msgs[0]["rcpts"], ["a@example.test", "b@example.test"], "rcpts")
        eq(msgs[0]["sha256"], hashlib.sha256(body).hexdigest(), "sha256")
        eq((msgs[1]["from"], msgs[1]["size"]), ("", 0), "null sender")
        # Sequence errors.
        c = mx.raw()
        c.reply()
        c.send(b"MAIL FROM:<a@b>\r\nHELO x\r\nRCPT TO:<a@b>\r\n"
               b"MAIL FROM:<a@b>\r\nDATA\r\nBDAT 1\r\nFOO\r\nQUIT\r\n")
        eq([c.reply()[0] for _ in range(8)],
           [503, 250, 503, 250, 554, 502, 502, 221], "sequence errors")
        c.close()


def test_misbehaviour():
    rules = ("ehlo reply-split; rcpt ~garbage garbage;"
             "rcpt ~long longline; mail ~close close; data stall")
    with FakeMX("-T", "1", "-e", rules) as mx:
        c = mx.raw()
        eq(c.reply()[0], 220, "greeting")
        c.send(b"EHLO x\r\n")
        code, lines = c.reply()
        eq(code, 250, "split EHLO")
        eq(lines[1], b"250-PIPELINING", "split EHLO content")
        check(c.reads > 20, "EHLO came in %d reads" % c.reads)
        c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<garbage@b.test>\r\n")
        eq(c.reply()[0], 250, "MAIL")
        eq(c.line(), b"XYZ this is not an SMTP reply", "garbage line")
        c.send(b"RCPT TO:<long@b.test>\r\n")
        line = c.line()
        check(line.startswith(b"250 2.1.5 Ok xxx") and len(line) == 5000,
              "longline: %d octets" % len(line))
        c.send(b"DATA\r\n")
        t0 = time.monotonic()
        check(c.closed(5), "stalled connection not closed")
        dt = time.monotonic() - t0
        check(0.5 < dt < 4 * SLOW, "idle timeout after %.2f s" % dt)
        eq(c.buf, b"", "a reply came during the stall")
        c.close()
        c = mx.raw()
        c.reply()
        c.send(b"EHLO x\r\n")
        c.reply()
        c.send(b"MAIL FROM:<close@b.test>\r\n")
        check(c.closed(), "close rule did not close")
        c.close()
        reasons = [r["reason"] for r in mx.wait_records("close", 2)]
        eq(reasons, ["timeout", "script"], "close reasons")
    with FakeMX("--delay", "150", "-e", "noop delay 0 250 fast") as mx:
        t0 = time.monotonic()
        c = mx.raw()
        eq(c.reply()[0], 220, "delayed greeting")
        check(time.monotonic() - t0 >= 0.14, "no delay")
        t0 = time.monotonic()
        c.send(b"NOOP\r\n")
        eq(c.reply(), (250, [b"250 fast"]), "rule delay override")
        check(time.monotonic() - t0 < 0.14, "rule delay 0 ignored")
        c.close()


def test_usage_errors():
    cases = [["-l", "10.0.0.1:2525"], ["-l", "0.0.0.0:2525"],
             ["-l", "[::]:2525"], [],
             ["-l", "127.0.0.1:0", "-e", "nosuchphase 250 x"],
             ["-l", "127.0.0.1:0", "-e", "rcpt ~( 550 x"],
             ["-l", "127.0.0.1:0", "--rate", "3"]]
    for args in cases:
        p = subprocess.run([FAKE_MX] + args, capture_output=True,
                           timeout=10)
        eq(p.returncode, 64, "exit code for %r (%r)" % (args, p.stderr))
    p = subprocess.run([FAKE_MX, "-l", "127.0.0.1:0", "--check", "-e",
                        "@mx2 dot ~^Subject:.x every 2 delay 10 451 a\\nb"],
                       capture_output=True, timeout=10)
    eq(p.returncode, 0, "--check")
    check(b"ok 1 rules" in p.stdout, "--check output %r" % p.stdout)


if __name__ == "__main__":
    import sys
    failed = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            if len(sys.argv) > 1 and sys.argv[1] not in name:
                continue
            t0 = time.monotonic()
            try:
                fn()
                print("ok %s (%.2f s)" % (name, time.monotonic() - t0))
            except Exception as e:
                failed += 1
                import traceback
                traceback.print_exc()
                print("FAIL %s: %s" % (name, e))
    sys.exit(1 if failed else 0)
