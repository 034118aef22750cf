"""test_lifecycle.py - the daemon's life: kill -9 in the middle of a load
(nothing acknowledged is lost), spool recovery, SIGHUP reloads (good and
bad), SIGTERM/SIGINT shutdown, relayd -t, and relayctl.
"""
import json
import os
import random
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time

import relaylib as L
from relaylib import RelayD, check, eq, fail


def _small(c, subject="small"):
    return L.queued_id(c.send_message("ok@example.com", ["ok@example.net"],
                                      L.make_message(subject)))


def _body_of(d, qid):
    return L.split_received(d.msg_bytes(qid))[1]


# ---------------------------------------------------------------------------
# kill -9 under load

class _Sender(threading.Thread):
    """Sends messages in a loop until told to stop or the daemon dies.

    acked: {queue id: message bytes} for every 250; inflight: the message
    whose end-of-data was (being) sent without a reply yet, if any."""

    def __init__(self, d, tid, stop, deadline, use_tls):
        super().__init__(daemon=True)
        self.d, self.tid, self.stop_ev = d, tid, stop
        self.deadline, self.use_tls = deadline, use_tls
        self.acked = {}
        self.inflight = None
        self.error = None          # unexpected error before the kill
        self.end_error = None      # how it ended
        self.rng = random.Random(tid * 7919 + int(time.time()))
        self.killed_at = None      # set by the main thread

    def message(self, n):
        subject = "crash t%d n%d r%08x" % (self.tid, n,
                                          self.rng.getrandbits(32))
        size = self.rng.choice([0, 1, 3, 10, 40, 200, 2000])
        lines = [("%s line %d " % (subject, i)).encode() +
                 bytes(self.rng.choice(b"abcdefgh.-") for _ in range(40))
                 for i in range(size)]
        lines.insert(len(lines) // 2, b".starts with a dot " +
                     subject.encode())
        return L.make_message(subject, body_lines=0) + \
            b"\r\n".join(lines) + b"\r\n"

    def connect(self):
        if self.use_tls:
            s = smtplib.SMTP(L.HOST, self.d.port("sub"),
                             local_hostname="client.test",
                             timeout=15 * L.SLOW)
            s.starttls(context=L.tls_client_context())
            s.login(L.USER, L.PASSWORD)
        else:
            s = smtplib.SMTP(L.HOST, self.d.port("plain"),
                             local_hostname="client.test",
                             timeout=15 * L.SLOW)
            s.ehlo()
        return s

    def run(self):
        n = 0
        s = None
        try:
            for _ in range(2000):
                if self.stop_ev.is_set() or time.monotonic() > self.deadline:
                    break
                if s is None:
                    s = self.connect()
                msg = self.message(n)
                n += 1
                code, _ = s.mail("t%d@example.com" % self.tid)
                if code != 250:
                    raise RuntimeError("MAIL %d" % code)
                code, _ = s.rcpt("r%d@example.net" % n)
                if code != 250:
                    raise RuntimeError("RCPT %d" % code)
                self.inflight = msg
                code, text = s.data(msg)
                if code != 250:
                    raise RuntimeError("DATA %d %r" % (code, text))
                qid = L.queued_id("250 " + text.decode())
                self.acked[qid] = msg
                self.inflight = None
                if n % 5 == 0:      # mix new sessions and long sessions
                    s.quit()
                    s.close()
                    s = None
        except BaseException as e:  # the daemon was killed, or a bug
            self.end_error = e
            if self.killed_at is None and not self.stop_ev.is_set():
                self.error = e
        finally:
            if s is not None:
                try:
                    s.close()
                except Exception:
                    pass


def _kill9_round(d, rnd, run_for, nthreads=8):
    """Load the daemon from nthreads senders, kill -9 it after run_for
    seconds, restart it. Returns (acked {id: msg}, in-flight [msg])."""
    stop = threading.Event()
    deadline = time.monotonic() + 20 * L.SLOW
    threads = [_Sender(d, rnd * 100 + i, stop, deadline,
                       use_tls=(i % 4 == 3)) for i in range(nthreads)]
    for t in threads:
        t.start()
    time.sleep(run_for)
    alive = [t.is_alive() for t in threads]
    for t in threads:
        t.killed_at = time.monotonic()
    d.kill()                    # in the middle of the stream
    eq(d.exit_code, -signal.SIGKILL, "relayd killed")
    stop.set()
    for t in threads:
        t.join(30 * L.SLOW)
    check(not any(t.is_alive() for t in threads), "sender threads hung")
    errors = [(t.tid, repr(t.error)) for t in threads if t.error]
    check(not errors, "round %d: errors before the kill: %s" % (rnd, errors))
    check(all(alive), "round %d: a sender had stopped before the kill: %s"
          % (rnd, [(t.tid, repr(t.end_error)) for t in threads]))
    acked = {}
    for t in threads:
        acked.update(t.acked)
    inflight = [t.inflight for t in threads if t.inflight is not None]
    check(len(acked) >= 10 / L.SLOW,
          "round %d: only %d messages acknowledged" % (rnd, len(acked)))
    d.restart()
    return acked, inflight


def test_kill9_under_load_loses_nothing_acknowledged():
    """8 concurrent senders; kill -9 mid-stream, three times. Every
    message that got 250 is in the queue after each restart with exactly
    the bytes sent; anything else queued was in flight at a kill."""
    with RelayD() as d:
        acked, inflight, stats = {}, [], []
        for rnd, run_for in enumerate((1.5, 0.8, 0.8)):
            a, f = _kill9_round(d, rnd, run_for)
            acked.update(a)
            inflight.extend(f)
            d.wait_log(r"spool recovered messages=\d+",
                       start=d.read_log().rfind("spool recovered"))
            q = d.queue_json()
            ids = [m["id"] for m in q["messages"]]
            eq(q["count"], len(ids), "count")
            missing = sorted(set(acked) - set(ids))
            check(not missing, "round %d: %d acknowledged message(s) lost "
                  "after kill -9: %s" % (rnd, len(missing), missing[:10]))
            for qid, msg in acked.items():
                body = _body_of(d, qid)
                check(body == msg, "message %s differs after the crash (%d "
                      "bytes stored, %d sent)" % (qid, len(body), len(msg)))
            extra = sorted(set(ids) - set(acked))
            check(len(extra) <= len(inflight),
                  "round %d: %d unacknowledged messages queued, but only %d "
                  "were in flight" % (rnd, len(extra), len(inflight)))
            for qid in extra:
                check(_body_of(d, qid) in inflight,
                      "queued message %s is neither acknowledged nor one "
                      "that was in flight" % qid)
            eq(d.spool_files("incoming"), [], "incoming/ after restart")
            eq(d.spool_files("quarantine"), [], "quarantine/ after restart")
            eq(d.status()["queued"], len(ids), "status queued")
            stats.append("round %d: acked=%d in-flight=%d queued=%d" % (
                rnd, len(a), len(f), len(ids)))
        if os.environ.get("RELAY_IT_VERBOSE"):
            print("#   " + "; ".join(stats))
        # Still works after recovery, and ids do not collide.
        with d.client("plain") as c:
            c.ehlo()
            qid = _small(c, "after the crash")
        check(qid not in ids, "new id %s reuses a recovered one" % qid)
        eq(d.queue_count(), len(ids) + 1, "count after a new message")


test_kill9_under_load_loses_nothing_acknowledged.timeout = 150


def test_kill9_mid_data_leaves_no_trace():
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            qid = _small(c, "before")
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            c.send(L.make_message("unfinished") + b"x" * 200000)
            L.wait_until(lambda: d.spool_files("incoming"),
                         what="a body in incoming/")
            d.kill()
        check(d.spool_files("incoming"), "incoming/ kept the partial body")
        d.restart()
        eq(d.spool_files("incoming"), [], "incoming/ after recovery")
        eq([m["id"] for m in d.queue_json()["messages"]], [qid], "queue")
        d.wait_log(r"spool recovered messages=1 quarantined=0 removed=1")


def test_restart_keeps_queue():
    """Stop and start: the queue (with odd addresses and DSN values that
    the envelope must encode) is read back exactly."""
    with RelayD() as d:
        sent = {}
        with d.client("sub") as c:
            c.login()
            for i in range(3):
                msg = L.make_message("keep %d" % i)
                sent[L.queued_id(c.send_message(
                    "a@example.com", ["b%d@example.net" % i], msg))] = msg
            c.expect(r'MAIL FROM:<"q\"uo\\te"@example.com> '
                     r"ENVID=x+2By+3Dz RET=FULL", "250")
            c.expect("RCPT TO:<a+tag=x@example.net> NOTIFY=DELAY "
                     "ORCPT=rfc822;a+2Btag+3Dx@example.net", "250")
            c.expect('RCPT TO:<"sp ace"@example.net>', "250")
            c.expect("RCPT TO:<postmaster@[IPv6:::1]>", "250")
            c.expect("DATA", "354")
            msg = L.make_message("odd")
            c.send(msg + b".\r\n")
            odd = L.queued_id(c.reply_text())
            sent[odd] = msg
        before = d.queue_json()
        env_before = d.env_text(odd)
        m = [x for x in before["messages"] if x["id"] == odd][0]
        eq(m["sender"], r'"q\"uo\\te"@example.com', "quoted sender")
        eq([r["address"] for r in m["recipients"]],
           ["a+tag=x@example.net", '"sp ace"@example.net',
            "postmaster@[IPv6:::1]"], "odd recipients")
        eq(d.stop(), 0, "exit code")
        check(not os.path.exists(d.sock), "control socket removed on exit")
        d.restart()
        after = d.queue_json()
        eq(after, before, "queue after a restart")
        eq(d.env_text(odd), env_before, "envelope file")
        for qid, msg in sent.items():
            eq(_body_of(d, qid), msg, "body of %s" % qid)
        d.wait_log(r"relayd started .* queued=4")
        with d.client("plain") as c:
            c.ehlo()
            check(_small(c) not in sent, "new id differs")


def test_spool_recovery_quarantine():
    with RelayD() as d:
        ids = []
        with d.client("plain") as c:
            c.ehlo()
            for i in range(5):
                ids.append(_small(c, "rec %d" % i))
        eq(d.stop(), 0, "exit")
        q = os.path.join(d.spool, "queue")
        inc = os.path.join(d.spool, "incoming")
        good, trunc, grown, wrongid, lone_env = ids
        # A truncated envelope (no "end:" line).
        with open(os.path.join(q, trunc + ".env"), "r+") as f:
            text = f.read()
            f.seek(0)
            f.truncate()
            f.write(text[:text.index("end:")])
        # A body that does not match the envelope size.
        with open(os.path.join(q, grown + ".msg"), "ab") as f:
            f.write(b"extra\r\n")
        # An envelope whose id is not its name.
        other = "%016x" % (int(wrongid, 16) + 0x100000)
        os.rename(os.path.join(q, wrongid + ".env"),
                  os.path.join(q, other + ".env"))
        os.rename(os.path.join(q, wrongid + ".msg"),
                  os.path.join(q, other + ".msg"))
        # An envelope without a body.
        os.unlink(os.path.join(q, lone_env + ".msg"))
        # A body without an envelope (commit never finished): removed.
        lone_msg = "%016x" % (int(good, 16) + 1000)
        with open(os.path.join(q, lone_msg + ".msg"), "wb") as f:
            f.write(b"never committed\r\n")
        # Junk, an unfinished rewrite, and leftovers in incoming/.
        with open(os.path.join(q, "junk.txt"), "w") as f:
            f.write("junk")
        with open(os.path.join(q, good + ".env.tmp"), "w") as f:
            f.write("half")
        with open(os.path.join(inc, "0123456789abcdef.msg"), "w") as f:
            f.write("partial")
        d.restart()
        qj = d.queue_json()
        eq([m["id"] for m in qj["messages"]], [good], "only the intact one")
        eq(d.spool_files("incoming"), [], "incoming/")
        eq(sorted(d.spool_files("queue")), [good + ".env", good + ".msg"],
           "queue/")
        quar = d.spool_files("quarantine")
        for name in (trunc + ".env", trunc + ".msg", grown + ".env",
                     grown + ".msg", other + ".env", other + ".msg",
                     lone_env + ".env", "junk.txt"):
            check(name in quar, "%s not quarantined: %s" % (name, quar))
        m = d.wait_log(r"spool recovered messages=(\d+) quarantined=(\d+) "
                       r"removed=(\d+)", start=d.read_log().rfind(
                           "spool recovered"))
        eq(m.groups(), ("1", "8", "3"), "recovery counts")
        d.wait_log(r"spool recover quarantined=queue/junk\.txt "
                   r"reason=\"bad name\"")
        # Restart again: stable, nothing more to do.
        eq(d.stop(), 0, "exit")
        d.restart()
        eq([m["id"] for m in d.queue_json()["messages"]], [good], "stable")
        with d.client("plain") as c:
            c.ehlo()
            _small(c)


def test_second_instance_refused():
    """A second relayd on the same spool (other ports and socket), or on
    the same control socket (other spool), refuses to start."""
    with RelayD() as d:
        variants = []
        other_ports = [dict(x, port=p) for x, p in zip(
            d.listeners, L.free_ports([L.HOST] * len(d.listeners)))]
        text = d.config_text(listeners=other_ports).replace(
            d.sock, os.path.join(d.dir, "other.sock"))
        variants.append(("same spool", text))
        other_ports = [dict(x, port=p) for x, p in zip(
            d.listeners, L.free_ports([L.HOST] * len(d.listeners)))]
        text = d.config_text(listeners=other_ports).replace(
            'spool_dir = "%s"' % d.spool,
            'spool_dir = "%s"' % os.path.join(d.dir, "spool2"))
        variants.append(("same control socket", text))
        for what, text in variants:
            conf = os.path.join(d.dir, "second.conf")
            with open(conf, "w") as f:
                f.write(text)
            p = subprocess.run([L.RELAYD, "-f", "-c", conf], cwd=d.dir,
                               capture_output=True, timeout=10 * L.SLOW)
            L.expect_exit(p, 1, "second relayd, %s" % what)
            err = p.stderr.decode()
            check("start-failed" in err, "%s: start-failed logged: %r" %
                  (what, err))
        check("another relayd is running" in err, "socket error: %r" % err)
        check(not os.path.exists(os.path.join(d.dir, "other.sock")),
              "the refused instance left its socket")
        # The first one is unharmed.
        with d.client("plain") as c:
            c.ehlo()
            _small(c)
        eq(d.status()["pid"], d.pid, "control socket still the first one's")


def test_listen_port_in_use():
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((L.HOST, 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        d = RelayD(listeners=[dict(name="x", tls="none", port=port,
                                   auth_required=False)], start=False)
        try:
            d.write_config()
            p = subprocess.run([L.RELAYD, "-f", "-c", d.conf], cwd=d.dir,
                               capture_output=True, timeout=10 * L.SLOW)
            L.expect_exit(p, 1, "relayd with its port taken")
            check("cannot listen on 127.0.0.1 port %d" % port in
                  p.stderr.decode(), "error names the port: %r" % p.stderr)
            check(not os.path.exists(d.sock), "no control socket left")
        finally:
            d.close()
    finally:
        blocker.close()


# ---------------------------------------------------------------------------
# SIGHUP

def test_sighup_invalid_config_keeps_running():
    with RelayD(limits=dict(max_recipients=5)) as d:
        with d.client("plain") as old:
            old.ehlo()
            old.expect("MAIL FROM:<a@example.com>", "250")
            for bad_text, what in (
                    (d.config_text() + "bogus_key = 1;\n", "unknown key"),
                    (d.config_text().replace("max_recipients = 5;",
                                             "max_recipients = 0;"),
                     "out of range"),
                    ("listeners = ( { address = ", "syntax error")):
                d.write_config(bad_text)
                pos = d.log_size()
                d.signal(signal.SIGHUP)
                d.wait_log(r"config reload-failed error=\".*relay\.conf:\d+"
                           r".*action=keep-old", start=pos)
                check(d.running(), "relayd died on a bad reload (%s)" % what)
                p = subprocess.run([L.RELAYD, "-t", "-c", d.conf],
                                   capture_output=True, timeout=10 * L.SLOW)
                L.expect_exit(p, 78, "relayd -t on the bad file (%s)" % what)
                # A new session works, with the old configuration.
                with d.client("plain") as c:
                    c.ehlo()
                    _small(c, "after bad reload " + what)
                eq(old.cmd("NOOP"), "250 2.0.0 Ok", "old session alive")
            # The existing session finishes its transaction; the old limit
            # (5 recipients) is still in force.
            for i in range(5):
                old.expect("RCPT TO:<r%d@example.net>" % i, "250")
            eq(old.cmd("RCPT TO:<r5@example.net>"),
               "452 4.5.3 Too many recipients", "old limit")
            old.expect("DATA", "354")
            old.send(L.make_message("old session") + b".\r\n")
            L.queued_id(old.reply_text())
        check("config reloaded" not in d.read_log(), "a bad file was loaded")
        # A listener whose port is taken: the whole reload is refused and
        # the running listeners stay.
        blocker = socket.socket()
        blocker.bind((L.HOST, 0))
        blocker.listen(1)
        try:
            lis = d.listeners + [dict(name="taken", tls="none",
                                      port=blocker.getsockname()[1],
                                      auth_required=False)]
            d.write_config(d.config_text(listeners=lis,
                                         limits=dict(max_recipients=1)))
            pos = d.log_size()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reload-failed error=\"listener taken: "
                       r"cannot listen", start=pos)
        finally:
            blocker.close()
        with d.client("plain") as c:
            c.ehlo()
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<r1@example.net>", "250")
            c.expect("RCPT TO:<r2@example.net>", "250")  # old limit still
        d.write_config()   # leave a good file for the clean stop


def test_sighup_valid_config_applies_to_new_sessions():
    with RelayD(limits=dict(max_recipients=5)) as d:
        with d.client("plain") as old, d.client("sub") as old_tls:
            old.ehlo()
            old_tls.login()
            new_port = L.free_port()
            lis = d.listeners + [dict(name="added", tls="none",
                                      port=new_port, auth_required=False)]
            d.write_config(d.config_text(listeners=lis,
                                         limits=dict(max_recipients=2)))
            pos = d.log_size()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded path=.* listeners=4 users=1",
                       start=pos)
            d.wait_log(r"listener start name=added address=127\.0\.0\.1 "
                       r"port=%d" % new_port, start=pos)
            # The new listener works.
            with L.Client(new_port) as c:
                c.ehlo()
                _small(c, "on the added listener")
            # New sessions get the new limit.
            with d.client("plain") as c:
                c.ehlo()
                c.expect("MAIL FROM:<a@example.com>", "250")
                c.expect("RCPT TO:<r1@example.net>", "250")
                c.expect("RCPT TO:<r2@example.net>", "250")
                eq(c.cmd("RCPT TO:<r3@example.net>"),
                   "452 4.5.3 Too many recipients", "new limit")
            # Existing sessions keep working (with the snapshot they
            # started with: daemon.c "Sessions keep the snapshot").
            old.expect("MAIL FROM:<a@example.com>", "250")
            for i in range(3):
                old.expect("RCPT TO:<r%d@example.net>" % i, "250")
            old.expect("DATA", "354")
            old.send(L.make_message("old plain") + b".\r\n")
            L.queued_id(old.reply_text())
            L.queued_id(old_tls.send_message("a@example.com",
                                             ["b@example.net"],
                                             L.make_message("old tls")))
            # Remove the added listener again: its port closes.
            d.write_config()
            pos = d.log_size()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded path=.* listeners=3", start=pos)
            d.wait_log(r"listener stop name=added", start=pos)
            try:
                s = socket.create_connection((L.HOST, new_port), timeout=5)
                s.close()
                fail("removed listener still accepts connections")
            except ConnectionRefusedError:
                pass
            # The second reload restored max_recipients = 5.
            with d.client("plain") as c:
                c.ehlo()
                c.expect("MAIL FROM:<a@example.com>", "250")
                for i in range(5):
                    c.expect("RCPT TO:<r%d@example.net>" % i, "250")
                check(c.cmd("RCPT TO:<r5@example.net>").startswith("452"),
                      "6th recipient")
        eq(d.queue_count(), 3, "queued")


def test_sighup_enables_tls():
    """A daemon started without any TLS listener gets one on reload: the
    certificate is loaded then, and STARTTLS works on new sessions."""
    lis = [dict(name="p", tls="none", auth_required=False)]
    with RelayD(listeners=lis) as d:
        with d.client("p") as old:
            check("STARTTLS" not in old.ehlo(), "no STARTTLS at first")
            d.listeners[0]["tls"] = "starttls"
            d.write_config()
            pos = d.log_size()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded", start=pos)
            with d.client("p") as c:
                check("STARTTLS" in c.ehlo(), "STARTTLS after reload")
                c.starttls()
                c.ehlo()
                check(c.auth_plain().startswith("235"), "AUTH")
                _small(c, "over the new TLS")
            # The old session keeps its listener options.
            eq(old.cmd("STARTTLS"), "454 4.7.0 TLS not available",
               "old session")
            _small(old, "old plaintext session")
        eq(d.queue_count(), 2, "queued")


def test_sighup_new_certificate_and_users():
    """A reload picks up a new certificate and new users for new sessions;
    a TLS session opened before keeps working."""
    with RelayD() as d:
        def peer_cert(port):
            s = socket.create_connection((L.HOST, port), timeout=10)
            t = L.tls_client_context().wrap_socket(s)
            try:
                return t.getpeercert(binary_form=True)
            finally:
                t.close()

        first = peer_cert(d.port("smtps"))
        with d.client("smtps") as old:
            old.login()
            cert = os.path.join(d.dir, "new-cert.pem")
            key = os.path.join(d.dir, "new-key.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                 "/CN=relay2.test", "-keyout", key, "-out", cert],
                check=True, capture_output=True, timeout=30)
            d.cert, d.key = cert, key
            d.users = {"carol": "carols-password"}
            d.write_config()
            pos = d.log_size()
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded", start=pos)
            second = peer_cert(d.port("smtps"))
            check(second != first, "certificate unchanged after reload")
            with open(cert) as f:
                pem = f.read()
            eq(ssl.DER_cert_to_PEM_cert(second).strip(), pem.strip(),
               "served certificate")
            with d.client("smtps") as c:
                c.ehlo()
                check(c.auth_plain().startswith("535"), "removed user")
            with d.client("sub") as c:
                c.login("carol", "carols-password")
                _small(c, "carol")
            L.queued_id(old.send_message("a@example.com", ["b@example.net"],
                                         L.make_message("old tls session")))
        users = sorted(m["user"] for m in d.queue_json()["messages"])
        eq(users, ["alice", "carol"], "users of the queued messages")


# ---------------------------------------------------------------------------
# SIGTERM / SIGINT

def test_sigterm_idle_clients_get_421():
    with RelayD() as d:
        c1 = d.client("plain")
        c2 = d.client("sub")
        c2.ehlo()
        c3 = d.client("smtps")
        c3.login()
        try:
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            for c, what in ((c1, "greeted"), (c2, "after EHLO"),
                            (c3, "authenticated, TLS")):
                check(c.reply_text().startswith("421 4.3.2"),
                      "%s client" % what)
                check(c.closed(), "%s closed" % what)
            rc = d.wait(5)
            check(rc is not None, "relayd still running 5 s after SIGTERM")
            eq(rc, 0, "exit code")
            check(time.monotonic() - t0 < 3 * L.SLOW,
                  "exit took %.1f s" % (time.monotonic() - t0))
        finally:
            for c in (c1, c2, c3):
                c.close()
        log = d.read_log()
        check("relayd stopping reason=SIGTERM sessions=3" in log,
              "stopping line")
        check("relayd stopped queued=0" in log, "stopped line")
        check(not os.path.exists(d.sock), "control socket removed")
        d.assert_clean_log()


def test_sigint_stops_cleanly():
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            _small(c)
        d.signal(signal.SIGINT)
        eq(d.wait(5), 0, "exit code after SIGINT")
        d.wait_log(r"relayd stopping reason=SIGINT")
        d.wait_log(r"relayd stopped queued=1")


def test_sigterm_lets_data_finish():
    with RelayD(timeouts=dict(shutdown=10)) as d:
        idle = d.client("plain")
        busy = d.client("sub")
        try:
            busy.login()
            busy.expect("MAIL FROM:<a@example.com>", "250")
            busy.expect("RCPT TO:<b@example.net>", "250")
            busy.expect("DATA", "354")
            msg = L.make_message("finishing during shutdown", body_lines=50)
            busy.send(msg[:300])
            time.sleep(0.05)
            d.signal(signal.SIGTERM)
            check(idle.reply_text().startswith("421 4.3.2"), "idle client")
            check(idle.closed(), "idle client closed")
            # The listeners are closed: new connections are refused.
            try:
                for name in ("plain", "sub"):
                    s = socket.create_connection((L.HOST, d.port(name)),
                                                 timeout=5)
                    s.close()
                    fail("listener %s still accepts after SIGTERM" % name)
            except ConnectionRefusedError:
                pass
            time.sleep(0.3)
            check(d.running(), "relayd exited while a client was in DATA")
            busy.send(msg[300:] + b".\r\n")
            qid = L.queued_id(busy.reply_text())
            # After its reply, the session is closed with 421.
            check(busy.reply_text().startswith("421 4.3.2"),
                  "421 after the last message")
            check(busy.closed(), "busy client closed")
            eq(d.wait(5), 0, "exit code")
        finally:
            idle.close()
            busy.close()
        d.wait_log(r"relayd stopped queued=1")
        d.restart()
        eq([m["id"] for m in d.queue_json()["messages"]], [qid],
           "message after restart")
        eq(_body_of(d, qid), msg, "stored body")


def test_sigterm_shutdown_timeout_cuts_off():
    with RelayD(timeouts=dict(shutdown=1, data=30)) as d:
        with d.client("plain") as c:
            c.ehlo()
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            c.send(b"Subject: never finished\r\n\r\npartial")
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            check(c.closed(timeout=10), "client in DATA not cut off")
            dt = time.monotonic() - t0
            check(0.8 <= dt <= 5 * L.SLOW, "cut off after %.2f s" % dt)
            check(b"250" not in c.buf, "no 250: %r" % c.buf)
        eq(d.wait(5), 0, "exit code")
        d.restart()
        eq(d.queue_count(), 0, "nothing queued")
        eq(d.spool_files("incoming"), [], "incoming/")


def test_sigterm_mid_mail_transaction():
    """A session between MAIL and DATA may finish its transaction."""
    with RelayD(timeouts=dict(shutdown=5)) as d:
        with d.client("plain") as c:
            c.ehlo()
            c.expect("MAIL FROM:<a@example.com>", "250")
            d.signal(signal.SIGTERM)
            time.sleep(0.1)
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            c.send(L.make_message("mid mail") + b".\r\n")
            L.queued_id(c.reply_text())
            check(c.reply_text().startswith("421 4.3.2"), "421 afterwards")
        eq(d.wait(5), 0, "exit code")


# ---------------------------------------------------------------------------
# relayd -t, daemon mode

CONFIG_ERRORS = [
    ("bogus = 1;", "unknown setting 'bogus'"),
    ("limits = { max_recipients = \"x\"; };", "must be an integer"),
    ("limits = { max_recipients = 0; };", "max_recipients"),
    ("limits = { max_line_length = 100; };", "max_line_length"),
    ("timeouts = { command = 0; };", "command"),
    ("relay_networks = [ \"10.0.0.1/8\" ];", ""),
    ("relay_networks = [ \"example.com\" ];", ""),
    ("hostname = \"bad host!\";", "hostname"),
    ("log = { trace = [ \"nosuch\" ]; };", "nosuch"),
    ("control = { mode = \"999\"; };", "mode"),
    ("users = ( { name = \"x\"; password_hash = \"plain\"; } );",
     "password_hash"),
]


def test_config_check():
    d = RelayD(start=False)
    try:
        d._pick_ports()
        d.write_config()
        p = subprocess.run([L.RELAYD, "-t", "-c", d.conf],
                           capture_output=True, timeout=10 * L.SLOW)
        L.expect_exit(p, 0, "relayd -t on a good file")
        check(b"OK" in p.stdout, "OK printed: %r" % p.stdout)
        base = ("listeners = ( { address = \"127.0.0.1\"; port = %d; "
                "tls = \"none\"; } );\n" % L.free_port())
        for extra, want in CONFIG_ERRORS:
            bad = os.path.join(d.dir, "bad.conf")
            with open(bad, "w") as f:
                f.write("# a bad file\n" + base + extra + "\n")
            p = subprocess.run([L.RELAYD, "-t", "-c", bad],
                               capture_output=True, timeout=10 * L.SLOW)
            err = p.stderr.decode()
            L.expect_exit(p, 78, "relayd -t on %r" % extra)
            check("bad.conf:3" in err,
                  "%r: error does not name bad.conf:3: %r" % (extra, err))
            check(want in err, "%r: error lacks %r: %r" % (extra, want, err))
        # Syntax error and missing listeners.
        bad = os.path.join(d.dir, "bad.conf")
        with open(bad, "w") as f:
            f.write("hostname = \"a.test\";\nlisteners = ( { port = ;\n")
        p = subprocess.run([L.RELAYD, "-t", "-c", bad], capture_output=True,
                           timeout=10 * L.SLOW)
        L.expect_exit(p, 78, "syntax error")
        check("bad.conf:2" in p.stderr.decode(), "file:line: %r" % p.stderr)
        with open(bad, "w") as f:
            f.write("hostname = \"a.test\";\n")
        p = subprocess.run([L.RELAYD, "-t", "-c", bad], capture_output=True,
                           timeout=10 * L.SLOW)
        L.expect_exit(p, 78, "no listeners")
        p = subprocess.run([L.RELAYD, "-t", "-c",
                            os.path.join(d.dir, "missing.conf")],
                           capture_output=True, timeout=10 * L.SLOW)
        L.expect_exit(p, 78, "missing file")
        p = subprocess.run([L.RELAYD, "-x"], capture_output=True,
                           timeout=10 * L.SLOW)
        L.expect_exit(p, 64, "bad option")
        # A bad file refuses to start, too.
        p = subprocess.run([L.RELAYD, "-f", "-c", bad], capture_output=True,
                           timeout=10 * L.SLOW)
        L.expect_exit(p, 78, "start with a bad file")
    finally:
        d.close()


def _pids_running_config(conf):
    """Pids of processes whose command line has exactly this (unique,
    per-test) configuration path as an argument."""
    pids = []
    for ent in os.listdir("/proc"):
        if not ent.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % ent, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if conf.encode() in args and os.path.basename(args[0]) == b"relayd":
            pids.append(int(ent))
    return pids


def test_daemon_mode():
    """Without -f relayd forks; the child serves and stops on SIGTERM."""
    d = RelayD(start=False)
    try:
        d._pick_ports()
        d.write_config()
        p = subprocess.run([L.RELAYD, "-c", d.conf], cwd=d.dir,
                           capture_output=True, timeout=10 * L.SLOW)
        L.expect_exit(p, 0, "relayd (daemon mode) parent")
        L.wait_until(d._control_answers, what="daemon control socket")
        pid = d.status()["pid"]
        eq(_pids_running_config(d.conf), [pid], "daemon process")
        with d.client("plain") as c:
            c.ehlo()
            _small(c)
            c.cmd("QUIT")
        os.kill(pid, signal.SIGTERM)
        L.wait_until(lambda: not _pids_running_config(d.conf), timeout=10,
                     what="daemon exit")
        check(not os.path.exists(d.sock), "control socket removed")
    finally:
        for pid in _pids_running_config(d.conf):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d.close()


# ---------------------------------------------------------------------------
# relayctl and the control socket

def test_relayctl_without_daemon():
    d = RelayD(start=False)
    try:
        d._pick_ports()
        d.write_config()
        for args in (["-s", d.sock, "queue"], ["-s", d.sock, "status"],
                     ["-c", d.conf, "queue", "--json"]):
            p = subprocess.run([L.RELAYCTL] + args, capture_output=True,
                               timeout=10 * L.SLOW)
            L.expect_exit(p, 69, "relayctl %s" % " ".join(args))
            check(b"is relayd running" in p.stderr,
                  "hint in stderr: %r" % p.stderr)
            eq(p.stdout, b"", "stdout")
    finally:
        d.close()


def test_relayctl_usage_and_config_errors():
    with RelayD() as d:
        for args in ([], ["frobnicate"], ["queue", "--xml"],
                     ["status", "extra"], ["-z", "queue"]):
            p = subprocess.run([L.RELAYCTL, "-s", d.sock] + args,
                               capture_output=True, timeout=10 * L.SLOW)
            L.expect_exit(p, 64, "relayctl %s" % " ".join(args))
            check(b"usage:" in p.stderr, "usage text")
        bad = os.path.join(d.dir, "bad.conf")
        with open(bad, "w") as f:
            f.write("nonsense = ;\n")
        p = subprocess.run([L.RELAYCTL, "-c", bad, "queue"],
                           capture_output=True, timeout=10 * L.SLOW)
        L.expect_exit(p, 78, "relayctl -c bad.conf")
        # -c with the daemon's own file finds its socket.
        out = subprocess.run([L.RELAYCTL, "-c", d.conf, "queue", "--json"],
                             capture_output=True, timeout=10 * L.SLOW)
        eq(out.returncode, 0, "relayctl -c")
        eq(json.loads(out.stdout)["count"], 0, "count via -c")


def test_relayctl_queue_and_status():
    with RelayD() as d:
        eq(d.queue_json(), {"messages": [], "count": 0, "bytes": 0},
           "empty queue")
        text = d.relayctl("queue")
        check(text.splitlines()[0].split()[:3] == ["ID", "SIZE", "ARRIVAL"],
              "header: %r" % text)
        check(text.rstrip().endswith("-- 0 messages, 0 bytes"),
              "empty footer: %r" % text)
        t0 = int(time.time())
        with d.client("sub") as c:
            c.login()
            q1 = L.queued_id(c.send_message(
                "a@example.com", ["x@example.net", "y@example.net"],
                L.make_message("one")))
        with d.client("plain") as c:
            c.ehlo()
            q2 = L.queued_id(c.send_message("", ["z@example.net"],
                                            L.make_message("two")))
        j = d.queue_json()
        eq(j["count"], 2, "count")
        eq([m["id"] for m in j["messages"]], [q1, q2], "arrival order")
        sizes = {q: len(d.msg_bytes(q)) for q in (q1, q2)}
        eq(j["bytes"], sum(sizes.values()), "bytes")
        m1, m2 = j["messages"]
        eq(set(m1), {"id", "size", "arrival", "sender", "client", "user",
                     "recipients"}, "message keys")
        eq(m1["size"], sizes[q1], "size")
        check(abs(m1["arrival"] - t0) <= 5, "arrival %r" % m1["arrival"])
        eq((m1["sender"], m1["client"], m1["user"]),
           ("a@example.com", "127.0.0.1", L.USER), "m1")
        eq((m2["sender"], m2["user"]), ("", None), "m2")
        eq(m1["recipients"], [
            {"address": "x@example.net", "state": "pending", "attempts": 0,
             "next_attempt": 0, "last_reply": None},
            {"address": "y@example.net", "state": "pending", "attempts": 0,
             "next_attempt": 0, "last_reply": None}], "recipients")
        text = d.relayctl("queue")
        lines = text.splitlines()
        check(lines[1].startswith(q1) and "<a@example.com>" in lines[1],
              "text line: %r" % text)
        check("<x@example.net>  pending attempts=0" in text, "rcpt line")
        check(lines[-1] == "-- 2 messages, %d bytes" % j["bytes"],
              "footer: %r" % lines[-1])
        st = d.status()
        eq(st["pid"], d.pid, "pid")
        eq(st["queued"], 2, "queued")
        eq(st["messages"], 2, "messages")
        eq(st["connections"], 2, "connections")
        eq(st["config"], d.conf, "config path")
        check(0 <= st["uptime"] < 60, "uptime")
        for k in ("sessions", "refused", "bytes", "rejected",
                  "auth_failures"):
            check(isinstance(st[k], int), "status %s" % k)


def test_control_socket_protocol():
    with RelayD() as d:
        eq(d.control("bogus"), "error: unknown request (try: queue, "
           "queue json, sites, sites json, status json)\n",
           "unknown request")
        check(json.loads(d.control("queue json\r"))["count"] == 0, "CRLF")
        # Oversized request without a newline: dropped, daemon fine.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5 * L.SLOW)
        s.connect(d.sock)
        try:
            s.sendall(b"x" * 5000)
            eq(s.recv(100), b"", "oversized request answered")
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            s.close()
        # A client that connects and says nothing does not block others.
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(d.sock)
        try:
            eq(d.queue_count(), 0, "queue while a control client idles")
        finally:
            idle.close()
        mode = os.stat(d.sock).st_mode & 0o777
        eq(oct(mode), oct(0o600), "socket mode")


def test_sighup_storm_under_load():
    """Reloads while clients submit: nothing fails, nothing is lost."""
    with RelayD(limits=dict(max_recipients=50)) as d:
        stop = threading.Event()
        deadline = time.monotonic() + 20 * L.SLOW
        threads = [_Sender(d, i, stop, deadline, use_tls=(i % 2 == 1))
                   for i in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(15):
                d.write_config(d.config_text(
                    limits=dict(max_recipients=50 + i)))
                d.signal(signal.SIGHUP)
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30 * L.SLOW)
        check(not any(t.is_alive() for t in threads), "senders hung")
        errors = [(t.tid, repr(t.end_error)) for t in threads if t.end_error]
        check(not errors, "sender errors during reloads: %s" % errors)
        d.wait_log(r"config reloaded")
        check("reload-failed" not in d.read_log(), "a reload failed")
        acked = {}
        for t in threads:
            acked.update(t.acked)
        check(len(acked) >= 4, "only %d messages" % len(acked))
        eq(sorted(d.queue_ids()), sorted(acked), "queue")
        d.write_config()
