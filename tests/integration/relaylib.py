"""relaylib - helpers for the relayd integration tests.

RelayD writes a configuration into a fresh temporary directory (listeners
on 127.0.0.1 with free ports, a spool, a control socket, a self-signed
certificate, users with `openssl passwd -6` hashes), starts
`$BUILD/relayd -f -c FILE` with stderr captured to a log file, waits until
the control socket answers, and stops it (SIGTERM, then SIGKILL) on exit.

    with RelayD(listeners=[dict(name="sub", tls="starttls")]) as d:
        c = Client(d.port("sub"))
        ...
        assert d.queue_json()["count"] == 1

Client is a small raw SMTP client (plain socket, optional TLS) that
returns (code, text) replies, for tests that need exact control over the
bytes on the wire. Every loop here is bounded in time and count; only
127.0.0.1 is used and no name is ever resolved.

Python 3.11 standard library only.
"""
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_build = os.environ.get("BUILD", "build")
BUILD = _build if os.path.isabs(_build) else os.path.join(ROOT, _build)
RELAYD = os.path.join(BUILD, "relayd")
RELAYCTL = os.path.join(BUILD, "relayctl")
HOST = "127.0.0.1"

# Sanitizer builds are several times slower: stretch waits (never sleeps
# that are part of an assertion).
SLOW = 3.0 if ("asan" in BUILD or os.environ.get("ASAN_OPTIONS")) else 1.0

PASSWORD = "s3cret-passw0rd"
USER = "alice"

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                      "runtime error:")


class TestFailure(AssertionError):
    pass


def fail(msg):
    raise TestFailure(msg)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def eq(got, want, what=""):
    if got != want:
        raise TestFailure("%s: got %r, want %r" % (what or "value", got, want))


# ---------------------------------------------------------------------------
# Shared fixtures: one certificate and one hash per password per process.

_cache_dir = None
_hash_cache = {}
_cache_lock = threading.Lock()


def _cache():
    global _cache_dir
    with _cache_lock:
        if _cache_dir is None:
            _cache_dir = tempfile.mkdtemp(prefix="relay-it-shared-")
            import atexit
            atexit.register(shutil.rmtree, _cache_dir, True)
        return _cache_dir


def certificate():
    """(cert_path, key_path) of a self-signed P-256 pair for relay.test."""
    d = _cache()
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    with _cache_lock:
        if not os.path.exists(cert):
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                 "-subj", "/CN=relay.test", "-keyout", key + ".tmp",
                 "-out", cert + ".tmp"],
                check=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=30)
            os.rename(key + ".tmp", key)
            os.rename(cert + ".tmp", cert)
    return cert, key


def password_hash(password):
    with _cache_lock:
        h = _hash_cache.get(password)
        if h is None:
            out = subprocess.run(["openssl", "passwd", "-6", "-stdin"],
                                 input=password.encode(), check=True,
                                 capture_output=True, timeout=30).stdout
            h = _hash_cache[password] = out.decode().strip()
    return h


def free_ports(addresses):
    """Distinct TCP ports, one per address (127.0.0.1 or ::1), that were
    free a moment ago: all sockets stay bound until every port is picked,
    so the kernel cannot hand out the same port twice."""
    socks, ports = [], []
    try:
        for address in addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((address, 0))
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port(address=HOST):
    """A TCP port on address that was free a moment ago."""
    return free_ports([address])[0]


def tls_client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------------------
# Configuration writing (libconfig syntax)

def _cstr(s):
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _cval(v, indent="  "):
    if isinstance(v, dict):
        return _group(v, indent + "  ", indent)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) + ("L" if v > 2147483647 else "")
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[ " + ", ".join(_cval(x) for x in v) + " ]"
    return _cstr(v)


def _group(d, indent="  ", close=""):
    """A libconfig group; nested dicts become nested groups."""
    return "{\n" + "".join("%s%s = %s;\n" % (indent, k, _cval(v, indent))
                           for k, v in d.items()) + close + "}"


DEFAULT_LIMITS = dict(max_message_size=10 * 1024 * 1024, max_recipients=100,
                      max_connections=100, max_connections_per_ip=50,
                      max_line_length=2048, max_errors=10)
DEFAULT_TIMEOUTS = dict(command=30, data=30, tls_handshake=10, shutdown=5)
DEFAULT_AUTH = dict(failure_delay=0.2, max_failures=5, failure_window=300)

# The usual listener set: STARTTLS+AUTH, implicit TLS+AUTH, plaintext for
# relay networks.
STD_LISTENERS = [
    dict(name="sub", tls="starttls", auth_required=True),
    dict(name="smtps", tls="implicit", auth_required=True),
    dict(name="plain", tls="none", auth_required=False),
]


# ---------------------------------------------------------------------------
# The daemon

_live = set()          # RelayD objects with a process, for cleanup_all()
_live_lock = threading.Lock()


def cleanup_all():
    """Kill every relayd a test left running and remove its directory."""
    with _live_lock:
        left = list(_live)
    for d in left:
        try:
            d.close()
        except Exception:
            pass
    return len(left)


class RelayD:
    """One relayd in its own temporary directory.

    listeners: list of dicts with name, tls ("none"/"starttls"/
    "implicit"), auth_required, and optionally port (else picked free).
    limits / timeouts / auth: overrides merged into the defaults.
    users: {name: password}; relay_networks: list of CIDRs.
    tls_generate: let relayd create the certificate itself.
    delivery: dict for the delivery group; None = delivery disabled, so a
    submission test never sends anything anywhere.
    dns: dict for the dns group; the default points at a dead loopback
    port so relayd never falls back to the system resolver.
    extra: raw text appended to the configuration.
    """

    def __init__(self, listeners=None, users=None, relay_networks=None,
                 limits=None, timeouts=None, auth=None, tls_generate=False,
                 hostname="relay.test", trace=None, preexec_fn=None,
                 extra="", start=True, delivery=None, dns=None):
        self.dir = tempfile.mkdtemp(prefix="relay-it-")
        self.spool = os.path.join(self.dir, "spool")
        self.sock = os.path.join(self.dir, "relayd.sock")
        self.conf = os.path.join(self.dir, "relay.conf")
        self.logpath = os.path.join(self.dir, "relayd.log")
        self.proc = None
        self.preexec_fn = preexec_fn
        self.hostname = hostname
        self.listeners = [dict(x) for x in
                          (listeners if listeners is not None
                           else STD_LISTENERS)]
        for lis in self.listeners:
            lis["fixed_port"] = bool(lis.get("port"))
            lis.setdefault("tls", "starttls")
            lis.setdefault("auth_required", True)
            lis.setdefault("address", HOST)
        self.users = dict(users) if users is not None else {USER: PASSWORD}
        self.relay_networks = (list(relay_networks)
                               if relay_networks is not None
                               else ["127.0.0.0/8"])
        self.limits = dict(DEFAULT_LIMITS, **(limits or {}))
        self.timeouts = dict(DEFAULT_TIMEOUTS, **(timeouts or {}))
        self.auth = dict(DEFAULT_AUTH, **(auth or {}))
        self.tls_generate = tls_generate
        self.trace = trace or []
        self.extra = extra
        self.delivery = (dict(delivery) if delivery is not None
                         else {"enabled": False})
        self.dns = dict(dns) if dns is not None else {
            "servers": ["127.0.0.1:9"], "timeout": 1, "tries": 1}
        self._log_fh = None
        self.exit_code = None
        if tls_generate:
            self.cert = os.path.join(self.dir, "tls", "cert.pem")
            self.key = os.path.join(self.dir, "tls", "key.pem")
        else:
            self.cert, self.key = certificate()
        with _live_lock:
            _live.add(self)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- configuration ----------------------------------------------------
    def config_text(self, listeners=None, limits=None, **over):
        """The configuration as text (optionally with changed values)."""
        lims = dict(self.limits, **(limits or {}))
        lines = ["# written by tests/integration/relaylib.py",
                 "hostname = %s;" % _cstr(self.hostname),
                 "spool_dir = %s;" % _cstr(self.spool),
                 "control = { socket = %s; mode = \"0600\"; };" %
                 _cstr(self.sock),
                 "tls = { certificate = %s; key = %s; generate = %s; };" % (
                     _cstr(self.cert), _cstr(self.key),
                     _cval(self.tls_generate))]
        lines.append("listeners = (")
        ls = listeners if listeners is not None else self.listeners
        items = []
        for lis in ls:
            items.append(
                "  { name = %s; address = %s; port = %d; tls = %s; "
                "auth_required = %s; }" % (
                    _cstr(lis["name"]), _cstr(lis.get("address", HOST)),
                    lis["port"], _cstr(lis.get("tls", "starttls")),
                    _cval(lis.get("auth_required", True))))
        lines.append(",\n".join(items))
        lines.append(");")
        if self.users:
            lines.append("users = (")
            lines.append(",\n".join(
                "  { name = %s; password_hash = %s; }" % (
                    _cstr(u), _cstr(password_hash(p)))
                for u, p in self.users.items()))
            lines.append(");")
        lines.append("relay_networks = %s;" % _cval(
            over.get("relay_networks", self.relay_networks)))
        lines.append("limits = %s;" % _group(lims))
        lines.append("timeouts = %s;" % _group(
            dict(self.timeouts, **over.get("timeouts", {}))))
        lines.append("auth = %s;" % _group(
            dict(self.auth, **over.get("auth", {}))))
        lines.append("log = { syslog = false; trace = %s; };" %
                     _cval(list(self.trace)))
        lines.append("dns = %s;" % _group(over.get("dns", self.dns)))
        lines.append("delivery = %s;" % _group(
            over.get("delivery", self.delivery)))
        lines.append(self.extra)
        return "\n".join(lines) + "\n"

    def write_config(self, text=None):
        if text is None:
            text = self.config_text()
        tmp = self.conf + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, self.conf)

    def _pick_ports(self, force=False):
        todo = [lis for lis in self.listeners
                if (force or not lis.get("port")) and
                not lis.get("fixed_port")]
        taken = {lis.get("port") for lis in self.listeners} - {None}
        for _ in range(20):
            ports = free_ports([lis.get("address", HOST) for lis in todo])
            if not taken & set(ports):
                break
        for lis, port in zip(todo, ports):
            lis["port"] = port

    def port(self, name=None):
        if name is None:
            return self.listeners[0]["port"]
        for lis in self.listeners:
            if lis["name"] == name:
                return lis["port"]
        raise KeyError(name)

    # -- process ----------------------------------------------------------
    def start(self, timeout=10.0):
        """Start relayd; retry with new ports if one was taken meanwhile."""
        for attempt in range(3):
            self._pick_ports(force=attempt > 0)
            self.write_config()
            if self._spawn(timeout):
                return self
            log = self.read_log()
            if "address already in use" in log.lower() and attempt < 2:
                continue
            fail("relayd did not start (rc=%s); log:\n%s" %
                 (self.exit_code, tail(log)))
        return self

    def restart(self, timeout=10.0):
        """Start again on the same configuration, spool and ports."""
        if self.running():
            fail("restart while relayd is running")
        self.write_config()
        if not self._spawn(timeout):
            fail("relayd did not restart (rc=%s); log:\n%s" %
                 (self.exit_code, tail(self.read_log())))
        return self

    def _spawn(self, timeout):
        if not (os.path.isfile(RELAYD) and os.access(RELAYD, os.X_OK) and
                os.path.getsize(RELAYD) > 0):
            fail("no relayd binary at %s (run make, or set BUILD)" % RELAYD)
        self._log_fh = open(self.logpath, "ab")
        self.exit_code = None
        self.proc = subprocess.Popen(
            [RELAYD, "-f", "-c", self.conf], cwd=self.dir,
            stdin=subprocess.DEVNULL, stdout=self._log_fh,
            stderr=self._log_fh, preexec_fn=self.preexec_fn)
        with _live_lock:
            _live.add(self)
        deadline = time.monotonic() + timeout * SLOW
        for _ in range(int(timeout * SLOW * 50) + 1):
            rc = self.proc.poll()
            if rc is not None:
                self.exit_code = rc
                self._close_log()
                return False
            if self._control_answers():
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.kill()
        fail("relayd control socket did not answer within %.0f s; log:\n%s"
             % (timeout * SLOW, tail(self.read_log())))

    def _control_answers(self):
        if not os.path.exists(self.sock):
            return False
        try:
            return self.control("status json").startswith("{")
        except OSError:
            return False

    def control(self, request, timeout=5.0):
        """One raw control-protocol request; the whole answer."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout * SLOW)
        try:
            s.connect(self.sock)
            s.sendall(request.encode() + b"\n")
            out = b""
            for _ in range(100000):
                b = s.recv(65536)
                if not b:
                    break
                out += b
            return out.decode("utf-8", "replace")
        finally:
            s.close()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def signal(self, sig):
        check(self.running(), "relayd is not running (signal %s)" % sig)
        os.kill(self.proc.pid, sig)

    def wait(self, timeout=10.0):
        """Wait for the process to exit; its exit code, or None on timeout."""
        if self.proc is None:
            return self.exit_code
        try:
            rc = self.proc.wait(timeout * SLOW)
        except subprocess.TimeoutExpired:
            return None
        self.exit_code = rc
        self._close_log()
        return rc

    def stop(self, timeout=10.0):
        """SIGTERM and wait (bounded); SIGKILL if it does not exit.

        Returns the exit code of a clean exit, raises if it had to be
        killed."""
        if not self.running():
            if self.proc is not None:
                return self.wait(1)
            return self.exit_code
        os.kill(self.proc.pid, signal.SIGTERM)
        rc = self.wait(timeout)
        if rc is None:
            self.kill()
            fail("relayd did not exit within %.0f s of SIGTERM" %
                 (timeout * SLOW))
        return rc

    def kill(self):
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            self.exit_code = self.proc.returncode
        self._close_log()

    def _close_log(self):
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def close(self):
        """Stop (kill if needed) and remove the directory."""
        try:
            if self.running():
                try:
                    self.stop(timeout=5)
                except TestFailure:
                    pass
            self.kill()
        finally:
            with _live_lock:
                _live.discard(self)
            if os.environ.get("RELAY_IT_KEEP"):
                print("# kept %s" % self.dir)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        try:
            if et is None:
                rc = self.stop()
                self.assert_clean_log()
                if rc not in (0, None) and self.exit_code not in (
                        -signal.SIGKILL,):
                    fail("relayd exited with %s on SIGTERM; log:\n%s" %
                         (rc, tail(self.read_log())))
            elif isinstance(ev, BaseException):
                # Attach the log to the failure that is already on its way.
                self.kill()
                ev.relayd_log = self.read_log()
        finally:
            self.close()
        return False

    # -- observation ------------------------------------------------------
    def read_log(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def assert_clean_log(self):
        log = self.read_log()
        for p in SANITIZER_PATTERNS:
            if p in log:
                fail("relayd log has %r:\n%s" % (p, tail(log, 60)))

    def wait_log(self, pattern, timeout=5.0, start=0):
        """Wait until the log (from offset start) matches the regex."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout * SLOW
        for _ in range(int(timeout * SLOW * 50) + 1):
            log = self.read_log()
            m = rx.search(log, start)
            if m:
                return m
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        fail("log never matched %r within %.1f s; log tail:\n%s" %
             (pattern, timeout * SLOW, tail(self.read_log()[start:])))

    def log_size(self):
        try:
            return os.path.getsize(self.logpath)
        except FileNotFoundError:
            return 0

    def relayctl(self, *args, check_rc=True, timeout=10.0, sock=True):
        argv = [RELAYCTL] + (["-s", self.sock] if sock else []) + list(args)
        p = subprocess.run(argv, capture_output=True, timeout=timeout * SLOW)
        if check_rc and p.returncode != 0:
            fail("relayctl %s: rc=%d stderr=%r" %
                 (" ".join(args), p.returncode, p.stderr.decode()))
        return p.stdout.decode("utf-8", "replace")

    def queue_json(self):
        out = self.relayctl("queue", "--json")
        try:
            return json.loads(out)
        except ValueError as e:
            fail("relayctl queue --json is not JSON (%s): %r" % (e, out))

    def queue_count(self):
        return self.queue_json()["count"]

    def sites(self):
        """{site name: its state + "sessions" + "waiting"} from
        relayctl sites --json."""
        out = self.relayctl("sites", "--json")
        try:
            js = json.loads(out)
        except ValueError as e:
            fail("relayctl sites --json is not JSON (%s): %r" % (e, out))
        res = {}
        for s in js["sites"]:
            st = dict(s["state"])
            st["sessions"], st["waiting"] = s["sessions"], s["waiting"]
            res[st["name"]] = st
        return res

    def status(self):
        return json.loads(self.relayctl("status"))

    def spool_files(self, sub):
        try:
            return sorted(os.listdir(os.path.join(self.spool, sub)))
        except FileNotFoundError:
            return []

    def queue_ids(self):
        return sorted({f[:-4] for f in self.spool_files("queue")
                       if f.endswith(".env")})

    def msg_bytes(self, qid):
        with open(os.path.join(self.spool, "queue", qid + ".msg"), "rb") as f:
            return f.read()

    def env_text(self, qid):
        with open(os.path.join(self.spool, "queue", qid + ".env"),
                  encoding="utf-8", errors="replace") as f:
            return f.read()

    def snapshot(self):
        """State of the queue, to assert later that nothing was added."""
        return (self.queue_count(), self.spool_files("queue"))

    def assert_unchanged(self, snap, what="rejected input"):
        """Nothing was queued since snapshot() (and incoming/ is empty)."""
        count, files = self.snapshot()
        check(count == snap[0], "%s: queue count went from %d to %d" %
              (what, snap[0], count))
        check(files == snap[1], "%s: new files in queue/: %s" %
              (what, sorted(set(files) - set(snap[1]))))
        # incoming/ may hold a body only while a session is inside DATA.
        inc = self.wait_incoming_empty(2.0)
        check(not inc, "%s: leftover files in incoming/: %s" % (what, inc))

    def wait_incoming_empty(self, timeout=2.0):
        deadline = time.monotonic() + timeout * SLOW
        inc = self.spool_files("incoming")
        for _ in range(int(timeout * SLOW * 50) + 1):
            inc = self.spool_files("incoming")
            if not inc or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return inc

    def client(self, name=None, **kw):
        lis = self.listeners[0] if name is None else next(
            x for x in self.listeners if x["name"] == name)
        kw.setdefault("host", lis.get("address", HOST))
        return Client(lis["port"], implicit_tls=lis["tls"] == "implicit",
                      **kw)


def tail(text, n=40):
    lines = text.splitlines()
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------
# A raw SMTP client

class SMTPError(TestFailure):
    pass


class Client:
    """Raw SMTP over a socket: exact bytes out, parsed replies in."""

    def __init__(self, port, implicit_tls=False, timeout=10.0,
                 greet=True, host=HOST):
        self.timeout = timeout * SLOW
        self.sock = socket.create_connection((host, port),
                                             timeout=self.timeout)
        self.buf = b""
        self.tls = False
        if implicit_tls:
            self.sock = tls_client_context().wrap_socket(self.sock)
            self.tls = True
        self.banner = None
        if greet:
            self.banner = self.reply()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
        return False

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self):
        b = self.sock.recv(65536)
        if not b:
            raise EOFError("connection closed by relayd")
        self.buf += b

    def reply(self, timeout=None):
        """One (possibly multi-line) reply: (code, [lines]) ."""
        if timeout is not None:
            self.sock.settimeout(timeout * SLOW)
        try:
            lines = []
            for _ in range(10000):
                while b"\r\n" not in self.buf:
                    if len(self.buf) > 100000:
                        fail("reply line too long: %r" % self.buf[:200])
                    self._fill()
                line, self.buf = self.buf.split(b"\r\n", 1)
                line = line.decode("utf-8", "replace")
                if len(line) < 3 or not line[:3].isdigit():
                    fail("malformed reply line %r" % line)
                lines.append(line)
                if len(line) == 3 or line[3] == " ":
                    return int(line[:3]), lines
            fail("reply with too many lines")
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)

    def reply_text(self, **kw):
        code, lines = self.reply(**kw)
        return "\n".join(lines)

    def cmd(self, line):
        """Send one command line, return the reply text (all lines)."""
        self.send(line.encode() + b"\r\n" if isinstance(line, str)
                  else line + b"\r\n")
        return self.reply_text()

    def expect(self, line, prefix):
        r = self.cmd(line)
        if not r.startswith(prefix):
            fail("%s: expected %r, got %r" % (
                line if len(line) < 80 else line[:80] + "...", prefix, r))
        return r

    def expect_reply(self, prefix, what="reply"):
        r = self.reply_text()
        if not r.startswith(prefix):
            fail("%s: expected %r, got %r" % (what, prefix, r))
        return r

    def ehlo(self, name="client.test"):
        return self.expect("EHLO " + name, "250")

    def starttls(self):
        self.expect("STARTTLS", "220 2.0.0")
        check(self.buf == b"", "bytes after 220 to STARTTLS")
        self.sock = tls_client_context().wrap_socket(self.sock)
        self.tls = True

    def auth_plain(self, user=USER, password=PASSWORD):
        tok = base64.b64encode(b"\0" + user.encode() + b"\0" +
                               password.encode()).decode()
        return self.cmd("AUTH PLAIN " + tok)

    def login(self, user=USER, password=PASSWORD):
        """EHLO, STARTTLS (unless already TLS), EHLO, AUTH PLAIN."""
        self.ehlo()
        if not self.tls:
            self.starttls()
            self.ehlo()
        r = self.auth_plain(user, password)
        check(r.startswith("235 2.7.0"), "AUTH PLAIN: %r" % r)

    def closed(self, timeout=5.0):
        """True if the server closes the connection (EOF or reset) soon."""
        self.sock.settimeout(timeout * SLOW)
        try:
            for _ in range(1000):
                b = self.sock.recv(65536)
                if not b:
                    return True
                self.buf += b
        except (ConnectionResetError, BrokenPipeError):
            return True
        except ssl.SSLError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return False

    def send_message(self, sender, rcpts, body, data_prefix="250 2.0.0 Ok"):
        """MAIL, RCPTs, DATA with body (CRLF lines, unstuffed), final reply.

        Returns the final reply text; dot-stuffing is done here."""
        self.expect("MAIL FROM:<%s>" % sender, "250")
        for r in rcpts:
            self.expect("RCPT TO:<%s>" % r, "250")
        self.expect("DATA", "354")
        self.send(dot_stuff(body) + b".\r\n")
        r = self.reply_text()
        if data_prefix and not r.startswith(data_prefix):
            fail("end of DATA: expected %r, got %r" % (data_prefix, r))
        return r


def dot_stuff(body):
    if isinstance(body, str):
        body = body.encode()
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    out = re.sub(rb"(?m)^\.", b"..", body)
    return out


QUEUED_RX = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9a-f]{16})$")


def queued_id(reply):
    """The queue id from a final '250 2.0.0 Ok: queued as <id>' reply."""
    m = QUEUED_RX.match(reply.strip().splitlines()[-1])
    if not m:
        fail("not a queued reply: %r" % reply)
    return m.group(1)


def make_message(subject, body_lines=3, date=True, msgid=True, extra=b""):
    """A CRLF message with unique content (bytes, not dot-stuffed)."""
    h = [b"From: Sender <sender@example.com>",
         b"To: Rcpt <rcpt@example.net>",
         b"Subject: " + subject.encode()]
    if date:
        h.append(b"Date: Mon, 24 Nov 2025 05:00:00 +0000")
    if msgid:
        h.append(b"Message-ID: <" +
                 hashlib.sha1(subject.encode()).hexdigest().encode() +
                 b"@example.com>")
    body = [("line %d of %s" % (i, subject)).encode()
            for i in range(body_lines)]
    return b"\r\n".join(h) + b"\r\n\r\n" + b"\r\n".join(body) + b"\r\n" + extra


def split_received(msg):
    """(received_header, rest) of a stored .msg: our Received: field is the
    first line plus its whitespace continuation lines."""
    check(msg.startswith(b"Received: "),
          "stored message does not begin with Received: %r" % msg[:80])
    pos = msg.index(b"\r\n") + 2
    for _ in range(100):
        if msg[pos:pos + 1] in (b" ", b"\t"):
            pos = msg.index(b"\r\n", pos) + 2
        else:
            break
    return msg[:pos], msg[pos:]


def header_section(msg):
    i = msg.find(b"\r\n\r\n")
    return msg if i < 0 else msg[:i + 2]


def count_headers(msg, name):
    """Fields called name (case-insensitive) in the header section."""
    rx = re.compile(rb"(?im)^" + re.escape(name.encode()) + rb":")
    return len(rx.findall(header_section(msg)))


def run_swaks(args, timeout=30):
    p = subprocess.run(["swaks", "--server", HOST] + list(args),
                       capture_output=True, timeout=timeout * SLOW,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode("utf-8", "replace") + \
        p.stderr.decode("utf-8", "replace")


def wait_until(fn, timeout=5.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout * SLOW
    for _ in range(int(timeout * SLOW / interval) + 2):
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    fail("timed out waiting for %s" % what)


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def expect_exit(p, want, what):
    """Check a finished relayd/relayctl run's exit code; name a sanitizer
    report (which changes the exit code) as such."""
    if p.returncode == want:
        return
    err = p.stderr.decode("utf-8", "replace") if isinstance(
        p.stderr, bytes) else (p.stderr or "")
    for pat in SANITIZER_PATTERNS:
        if pat in err:
            where = [x.strip() for x in err.splitlines()
                     if x.strip().startswith("#") and " in " in x][:4]
            fail("DAEMON BUG: %s: exit code %s instead of %s because of a "
                 "sanitizer report (%s; the exit path does not free what "
                 "it allocated) at %s" % (
                     what, p.returncode, want, pat, where))
    fail("%s: exit code %s, want %s; stderr: %s" % (
        what, p.returncode, want, tail(err, 10)))


# ---------------------------------------------------------------------------
# Delivery fixtures: a private DNS server (dnsmasq) and the scriptable fake
# MX (build/fake-mx). Both are context managers that never outlive the
# test: they are stopped on exit, registered for cleanup_all(), and get
# SIGTERM/SIGKILL when the test runner dies.

DNSMASQ = "/usr/sbin/dnsmasq"
FAKE_MX = os.path.join(BUILD, "fake-mx")

_helpers = set()        # running Dnsmasq / FakeMX objects
_helpers_lock = threading.Lock()


def _kill_helpers():
    with _helpers_lock:
        left = list(_helpers)
    for h in left:
        try:
            h.close(check_exit=False)
            h.cleanup()
        except Exception:
            pass


def _pdeathsig(sig):
    """A preexec_fn: the child gets sig when the runner dies (Linux)."""
    def fn():
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)
        except Exception:
            pass
    return fn


_cleanup_relayd = cleanup_all


def cleanup_all():    # noqa: F811 - extends the relayd-only version above
    """Kill every relayd, dnsmasq and fake-mx a test left running; the
    count is of relayd processes only (what the runner reports)."""
    n = _cleanup_relayd()
    _kill_helpers()
    return n


def _dns_query(name, qtype=1, qid=0x1234):
    q = bytes([qid >> 8, qid & 255, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + bytes([0, qtype, 0, 1])


class _Fixture:
    """What the tests' private processes (Dnsmasq, FakeMX, PrivatePostfix,
    Postgrey) share: a with-block runs start(), then close() and removes
    the scratch directory self.dir (kept with RELAY_IT_KEEP=1); the close
    checks the exit status only when the block ended without an
    exception. Subclasses give start() and close(check_exit)."""

    dir = None

    def cleanup(self):
        if self.dir is None:
            return
        if os.environ.get("RELAY_IT_KEEP"):
            print("# kept %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close(check_exit=False)
            self.cleanup()
            raise

    def __exit__(self, et, ev, tb):
        try:
            self.close(check_exit=et is None)
        finally:
            self.cleanup()
        return False


class Dnsmasq(_Fixture):
    """dnsmasq answering for *.test on 127.0.0.1:<free port>.

    records: dnsmasq options, e.g. "--mx-host=a.test,mx1.a.test,10",
    "--host-record=mx1.a.test,127.0.0.2", "--dns-rr=n.test,15,000000"
    (helpers mx(), host(), null_mx() build them). Names under .test that
    are not given are NXDOMAIN (--local=/test/). --local-ttl gives the
    records a real TTL so relayd's cache works as in production.

        with Dnsmasq([...]) as dns:
            RelayD(dns={"servers": [dns.server]}, ...)
    """

    def __init__(self, records=(), ttl=60, port=None):
        self.records = list(records)
        self.ttl = ttl
        self.proc = None
        self.port = None
        self.fixed_port = port      # e.g. a port relayd already points at
        self.dir = tempfile.mkdtemp(prefix="relay-dns-")
        self.logpath = os.path.join(self.dir, "dnsmasq.log")

    @property
    def server(self):
        return "%s:%d" % (HOST, self.port)

    @staticmethod
    def mx(domain, host, pref=10):
        return "--mx-host=%s,%s,%d" % (domain, host, pref)

    @staticmethod
    def host(name, addr):
        return "--host-record=%s,%s" % (name, addr)

    @staticmethod
    def null_mx(domain):
        # RFC 7505: "0 ." as raw rdata (preference 0, root name).
        return "--dns-rr=%s,15,000000" % domain

    @staticmethod
    def free_port():
        """A port free for both UDP and TCP on 127.0.0.1."""
        for _ in range(50):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                u.bind((HOST, 0))
                port = u.getsockname()[1]
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
                return port
            finally:
                u.close()
                t.close()
        fail("no free UDP+TCP port for dnsmasq")

    def start(self):
        if not os.access(DNSMASQ, os.X_OK):
            fail("no %s" % DNSMASQ)
        for attempt in range(5):
            self.port = self.fixed_port or self.free_port()
            argv = [DNSMASQ, "--no-resolv", "--no-hosts", "--no-daemon",
                    "--conf-file=/dev/null", "--pid-file=",
                    "--listen-address=127.0.0.1", "--bind-interfaces",
                    "--local=/test/", "--local-ttl=%d" % self.ttl,
                    "--port=%d" % self.port] + self.records
            with open(self.logpath, "ab") as log:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    preexec_fn=_pdeathsig(signal.SIGKILL))
            with _helpers_lock:
                _helpers.add(self)
            if self._wait_ready(10.0):
                return self
            self.close(check_exit=False)
            if self.fixed_port:
                break
        fail("dnsmasq did not start: %s" % tail(self._log()))

    def _wait_ready(self, timeout):
        """A query on UDP answered: dnsmasq is serving."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.1)
        deadline = time.monotonic() + timeout * SLOW
        try:
            for _ in range(int(timeout * SLOW * 10) + 1):
                if self.proc.poll() is not None:
                    return False
                try:
                    s.sendto(_dns_query("ready.test"), (HOST, self.port))
                    data = s.recv(4096)
                    if data[:2] == b"\x12\x34":
                        return True
                except OSError:
                    time.sleep(0.05)
                if time.monotonic() > deadline:
                    break
            return False
        finally:
            s.close()

    def _log(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self, check_exit=True):
        """Stop dnsmasq (SIGTERM, then SIGKILL); its exit is not judged."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            with _helpers_lock:
                _helpers.discard(self)



class FakeMX(_Fixture):
    """build/fake-mx with named listeners that all share ONE port (relayd's
    delivery.port is a single number), e.g.

        with FakeMX({"mx1": "127.0.0.2", "mx2": "127.0.0.3"},
                    rules="rcpt ~bounce@ 550 5.1.1 No such user",
                    keep=True) as mx:
            ... relayd with delivery.port = mx.port ...
            m = mx.wait_messages(1)[0]      # the "message" records
            body = mx.body(m)               # with keep=True (-k DIR)

    rules: a string or a list of strings, each passed with -e. args: more
    fake-mx options (e.g. ["--delay", "5"], ["--tls", "c:k"]). port: use
    this port (e.g. a second FakeMX next to a first one) instead of one
    picked free; also_free: addresses where the picked port must be free
    too (so relayd can listen there on the same port). The record
    file (-r) is read incrementally; stats() sends SIGUSR1 and returns the
    stats record from stderr (-S). On a clean exit of the with-block the
    process must exit 0 on SIGTERM with no sanitizer report.
    """

    def __init__(self, listeners=None, rules=None, args=(), keep=False,
                 lifetime=600, idle_timeout=None, port=None,
                 also_free=()):
        self.listeners = dict(listeners or {"mx1": "127.0.0.2",
                                            "mx2": "127.0.0.3"})
        for a in self.listeners.values():
            check(a.startswith("127.") and a != "127.0.0.1",
                  "fake-mx listener address %r: use 127.0.0.2.." % a)
        if isinstance(rules, str):
            rules = [rules]
        self.rules = list(rules or [])
        self.args = list(args)
        self.lifetime = lifetime
        self.idle_timeout = idle_timeout
        self.dir = tempfile.mkdtemp(prefix="relay-fakemx-")
        self.record = os.path.join(self.dir, "record.jsonl")
        self.errlog = os.path.join(self.dir, "stderr.log")
        self.keepdir = os.path.join(self.dir, "bodies") if keep else None
        self.proc = None
        self.port = None
        self.fixed_port = port
        self.also_free = list(also_free)
        self._recs = []
        self._off = 0
        self._partial = b""
        self._err = None

    def _pick_port(self):
        """A port free on every listener address at once."""
        if self.fixed_port:
            return self.fixed_port
        addrs = list(self.listeners.values()) + self.also_free
        for _ in range(50):
            socks = []
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((addrs[0], 0))
                port = s.getsockname()[1]
                ok = True
                for a in addrs[1:]:
                    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(t)
                    try:
                        t.bind((a, port))
                    except OSError:
                        ok = False
                        break
                if ok:
                    return port
            finally:
                for s in socks:
                    s.close()
        fail("no port free on all of %r" % addrs)

    def start(self):
        if not os.access(FAKE_MX, os.X_OK):
            fail("no fake-mx binary at %s (run make)" % FAKE_MX)
        if self.keepdir:
            os.makedirs(self.keepdir, exist_ok=True)
        for attempt in range(5):
            self.port = self._pick_port()
            argv = [FAKE_MX, "-q", "-S", "--die-with-parent",
                    "-t", str(self.lifetime), "-r", self.record]
            if self.idle_timeout:
                argv += ["-T", str(self.idle_timeout)]
            for name, addr in self.listeners.items():
                argv += ["-l", "%s=%s:%d" % (name, addr, self.port)]
            for r in self.rules:
                argv += ["-e", r]
            if self.keepdir:
                argv += ["-k", self.keepdir]
            argv += self.args
            self._err = open(self.errlog, "ab")
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                         stderr=self._err,
                                         stdin=subprocess.DEVNULL)
            with _helpers_lock:
                _helpers.add(self)
            import select
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        10 * SLOW)
            line = self.proc.stdout.readline().decode() if ready else ""
            if line.startswith("ready "):
                return self
            rc = self.proc.wait(10)
            self._err.close()
            self.proc.stdout.close()
            with _helpers_lock:
                _helpers.discard(self)
            if (rc == 1 and "ddress already in use" in self.stderr() and
                    not self.fixed_port):
                continue
            fail("fake-mx did not start (rc=%s): %r; stderr: %s" % (
                rc, line, tail(self.stderr())))
        fail("fake-mx: no usable port; stderr: %s" % tail(self.stderr()))

    def addr(self, name):
        return self.listeners[name]

    def stderr(self):
        try:
            with open(self.errlog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- the record ---------------------------------------------------
    def records(self, event=None, listener=None):
        """Every complete record so far (optionally of one event)."""
        try:
            with open(self.record, "rb") as f:
                f.seek(self._off)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self._off += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._recs.append(json.loads(line))
        return [r for r in self._recs
                if (event is None or r.get("event") == event) and
                (listener is None or r.get("listener") == listener)]

    def messages(self, listener=None):
        return self.records("message", listener)

    def wait_records(self, event, n, timeout=10.0, pred=None,
                     what=None):
        """At least n records of event (matching pred); fail on timeout."""
        def got():
            rs = [r for r in self.records(event) if pred is None or pred(r)]
            return rs if len(rs) >= n else None
        return wait_until(got, timeout, 0.05,
                          what or "%d fake-mx %s record(s)" % (n, event))

    def wait_messages(self, n, timeout=10.0, pred=None):
        return self.wait_records("message", n, timeout, pred)

    def body(self, rec):
        """The kept body of a message record (needs keep=True)."""
        check(self.keepdir, "FakeMX without keep=True")
        with open(rec["body_file"], "rb") as f:
            return f.read()

    def stats(self):
        """SIGUSR1, then the newest stats record written to stderr."""
        before = self.stderr().count('"event":"stats"')
        self.proc.send_signal(signal.SIGUSR1)

        def newest():
            lines = [x for x in self.stderr().splitlines()
                     if '"event":"stats"' in x]
            return json.loads(lines[-1]) if len(lines) > before else None
        return wait_until(newest, 5.0, 0.02, "fake-mx stats after SIGUSR1")

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # -- life cycle ---------------------------------------------------
    def close(self, check_exit=True):
        rc, hung = None, False
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(10 * SLOW)
                except subprocess.TimeoutExpired:
                    hung = True
                    self.proc.kill()
                    self.proc.wait(5)
            elif self.proc is not None:
                rc = self.proc.returncode
            if self.proc is not None and self.proc.stdout:
                self.proc.stdout.close()
            if self._err:
                self._err.close()
                self._err = None
        finally:
            with _helpers_lock:
                _helpers.discard(self)
        if check_exit and self.proc is not None:
            log = self.stderr()
            check(not hung, "fake-mx ignored SIGTERM")
            for p in SANITIZER_PATTERNS:
                check(p not in log, "fake-mx sanitizer report:\n" +
                      tail(log, 40))
            eq(rc, 0, "fake-mx exit status (stderr %r)" % log[-500:])



# ---------------------------------------------------------------------------
# relayd's delivery log lines

_KV_RX = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _unquote(v):
    if v.startswith('"') and v.endswith('"') and len(v) >= 2:
        v = v[1:-1]
        v = re.sub(r"\\x([0-9a-fA-F]{2})",
                   lambda m: chr(int(m.group(1), 16)), v)
        v = re.sub(r"\\(.)", r"\1", v)
    return v


def log_events(log, what):
    """Parsed log lines '<id> <what> k=v ...' (what = "dlv result",
    "dsn queued", "dlv host-failed", ...): dicts with "id" and the keys."""
    out = []
    rx = re.compile(r"(\S+) " + re.escape(what) + r" (.*)$")
    for line in log.splitlines():
        m = rx.search(line)
        if not m:
            continue
        d = {k: _unquote(v) for k, v in _KV_RX.findall(m.group(2))}
        d["id"] = m.group(1)
        out.append(d)
    return out


def site_lines(log, name):
    """relayd's 'site NAME ...' lines (decrease, increase, suspension,
    hold, resume, mode change), without the prefix."""
    rx = re.compile(r"\]: site " + re.escape(name) + r" (.*)$")
    return [m.group(1) for m in map(rx.search, log.splitlines()) if m]


def dlv_results(log, rcpt=None, status=None):
    """The 'dlv result' lines, optionally for one recipient / status."""
    return [r for r in log_events(log, "dlv result")
            if (rcpt is None or r.get("rcpt") == rcpt) and
            (status is None or r.get("status") == status)]


# ---------------------------------------------------------------------------
# Real receivers: a private Postfix instance and postgrey (Debian's
# packages, installed by `make test` through tools/install-deps --test).
# Like Dnsmasq and FakeMX they are context managers registered for
# cleanup_all(), and never outlive the test.

POSTFIX = "/usr/sbin/postfix"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
POSTGREY = "/usr/sbin/postgrey"


def need_program(path, package):
    """Fail (never skip) when a program the test needs is missing."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        fail("%s is missing: install the Debian package %s (make test "
             "does, through tools/install-deps --test)" % (path, package))


def _system_ids(user):
    """(uid, gid) of a system user, from /etc/passwd."""
    import pwd
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        fail("no system user %r (is its Debian package installed?)" % user)
    return pw.pw_uid, pw.pw_gid


def _listening(address, port):
    """True if some socket listens on address:port (IPv4, from
    /proc/net/tcp: no connection is made, so a receiver's per-client
    counters do not see it)."""
    want = "%08X:%04X" % (int.from_bytes(socket.inet_aton(address),
                                          "little"), port)
    try:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[1] == want and \
                        fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _procs_with_env(var, value):
    """Pids of the processes whose environment has var=value."""
    want = ("%s=%s" % (var, value)).encode()
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % p, "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(p))
        except OSError:
            pass
    return pids


class PrivatePostfix(_Fixture):
    """A private Postfix (Debian's postfix package) in its own temporary
    directory: etc/ (main.cf, master.cf), queue/, data/, mail/ and the
    log file maillog. smtpd listens on address:port (127.0.0.2.., a free
    port) and delivers the given domains with virtual(8) into one Maildir,
    mail/inbox/new/ (one file per message and recipient, with its
    Delivered-To:), as user nobody. Nothing else is delivered
    (default_transport = error) and Postfix makes no DNS query (no peer
    name lookup, no MX lookup).

        with PrivatePostfix(domains=["pf.test"],
                            main={"smtpd_client_message_rate_limit": 3})
                as pf:
            ... relayd with delivery.port = pf.port ...
            pf.wait_messages(n)     # [{"rcpt", "subject", "message_id",
                                    #   "box", "path", "headers"}]

    main: more main.cf settings (they override the defaults below).
    The master runs with -e lifetime, so even a runner killed with
    SIGKILL leaves no Postfix behind for long. close() sends SIGTERM to
    the master, then SIGKILL to any process still carrying this
    instance's MAIL_CONFIG.
    """

    def __init__(self, domains=("pf.test",), address="127.0.0.3", main=None,
                 lifetime=300, hostname="mx.pf.test"):
        check(address.startswith("127.") and address != "127.0.0.1",
              "Postfix address %r: use 127.0.0.2.." % address)
        self.domains = list(domains)
        self.address = address
        self.main = dict(main or {})
        self.lifetime = lifetime
        self.hostname = hostname
        self.dir = None
        self.port = None
        self.master_pid = None

    # -- paths ------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    @property
    def etc(self):
        return self.path("etc")

    @property
    def maillog(self):
        return self.path("maillog")

    # -- configuration ----------------------------------------------------
    def main_cf(self):
        d = self.dir
        conf = [
            ("compatibility_level", "3.6"),
            ("queue_directory", self.path("queue")),
            ("data_directory", self.path("data")),
            ("mail_owner", "postfix"),
            ("setgid_group", "postdrop"),
            ("myhostname", self.hostname),
            ("mydomain", self.hostname.split(".", 1)[-1]),
            ("myorigin", "$myhostname"),
            ("mydestination", ""),
            ("local_recipient_maps", ""),
            ("alias_maps", ""),
            ("alias_database", ""),
            ("biff", "no"),
            # The address must be a local interface's: master.cf binds
            # smtpd to self.address (any of 127/8 works on Linux).
            ("inet_interfaces", "loopback-only"),
            ("inet_protocols", "ipv4"),
            ("mynetworks", "127.0.0.0/8"),
            ("smtpd_peername_lookup", "no"),
            ("smtp_dns_support_level", "disabled"),
            ("default_transport", "error:this test instance sends nothing"),
            ("relay_transport", "error:this test instance relays nothing"),
            ("relay_domains", ""),
            ("virtual_mailbox_domains", ", ".join(self.domains)),
            ("virtual_mailbox_base", self.path("mail")),
            # virtual(8) refuses regexp substitutions here: one Maildir
            # for every recipient; Delivered-To: tells them apart.
            ("virtual_mailbox_maps", "static:inbox/"),
            ("virtual_uid_maps", "static:%d" % self.mail_ids[0]),
            ("virtual_gid_maps", "static:%d" % self.mail_ids[1]),
            ("maillog_file", self.maillog),
            ("maillog_file_prefixes", d),
            ("smtpd_tls_security_level", "none"),
        ]
        keys = {k for k, _ in conf}
        out = ["# written by tests/integration/relaylib.py PrivatePostfix"]
        out += ["%s = %s" % (k, self.main.get(k, v)) for k, v in conf]
        out += ["%s = %s" % (k, v) for k, v in self.main.items()
                if k not in keys]
        return "\n".join(out) + "\n"

    def master_cf(self):
        # Debian's services, none chrooted, smtpd on our address:port.
        return """\
%s:%d inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
virtual    unix  - n n -     - virtual
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
""" % (self.address, self.port)

    def _write(self, name, text):
        with open(self.path("etc", name), "w") as f:
            f.write(text)

    # -- process ----------------------------------------------------------
    def start(self):
        need_program(POSTFIX, "postfix")
        need_program(POSTFIX_MASTER, "postfix")
        pf_uid, _ = _system_ids("postfix")
        self.mail_ids = _system_ids("nobody")
        self.dir = tempfile.mkdtemp(prefix="relay-pf-")
        # Postfix's daemons (user postfix) and virtual(8) (user nobody)
        # open data/ and mail/ by absolute path.
        os.chmod(self.dir, 0o755)
        for sub in ("etc", "queue", "data", "mail"):
            os.makedirs(self.path(sub))
        os.chown(self.path("data"), pf_uid, -1)
        os.chown(self.path("mail"), *self.mail_ids)
        with _helpers_lock:
            _helpers.add(self)
        for attempt in range(5):
            self.port = free_port(self.address)
            self._write("main.cf", self.main_cf())
            self._write("master.cf", self.master_cf())
            if attempt == 0:
                # Creates the queue's subdirectories with the owners
                # Postfix expects (as "postfix start" does).
                p = subprocess.run([POSTFIX, "-c", self.etc, "check"],
                                   capture_output=True, timeout=60 * SLOW,
                                   stdin=subprocess.DEVNULL)
                if p.returncode != 0:
                    fail("postfix check failed (rc=%d): %s" % (
                        p.returncode, self._why(p, ["check"])))
            if self._spawn():
                return self
            self.close(check_exit=False, keep_helper=True)
            if "in use" not in self.log():
                break
        fail("Postfix did not start on %s:%s; maillog:\n%s" % (
            self.address, self.port, tail(self.log())))

    def _why(self, p, args):
        """What a failed postfix command said: it writes its fatal
        message to stderr only on a terminal (else to syslog), so run it
        again under script(1) to see it."""
        text = (p.stdout + p.stderr).decode("utf-8", "replace").strip()
        if not text and shutil.which("script"):
            q = subprocess.run(["script", "-qec", " ".join(
                [POSTFIX, "-c", self.etc] + args), "/dev/null"],
                capture_output=True, timeout=60 * SLOW,
                stdin=subprocess.DEVNULL)
            text = q.stdout.decode("utf-8", "replace").strip()
        return tail(text + "\n" + self.log(), 20)

    def _spawn(self):
        # master -w: a dummy foreground process exits 0 once the master
        # (a daemon of its own) is ready; -e: it exits after lifetime s.
        p = subprocess.run([POSTFIX_MASTER, "-c", self.etc, "-w",
                            "-e", str(int(self.lifetime))],
                           capture_output=True, timeout=60 * SLOW,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            return False
        try:
            with open(self.path("queue", "pid", "master.pid")) as f:
                self.master_pid = int(f.read().strip())
        except (OSError, ValueError):
            return False
        deadline = time.monotonic() + 10 * SLOW
        for _ in range(int(10 * SLOW / 0.05) + 1):
            if _listening(self.address, self.port):
                return True
            if not self.running() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return False

    def _is_master(self, pid):
        """pid is this instance's master: "master -c <etc> ..." (its
        MAIL_CONFIG is set with setenv(), which /proc does not show)."""
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
            with open("/proc/%d/stat" % pid, "rb") as f:
                zombie = f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        except (OSError, IndexError):
            return False
        return not zombie and self.etc.encode() in argv and \
            os.path.basename(argv[0]) == b"master"

    def running(self):
        return bool(self.master_pid) and self._is_master(self.master_pid)

    def procs(self):
        """Pids of this instance: the master and its children (which
        carry MAIL_CONFIG=<etc> in their environment)."""
        if self.dir is None:
            return []
        pids = _procs_with_env("MAIL_CONFIG", self.etc)
        if self.master_pid and self.running():
            pids.append(self.master_pid)
        return sorted(set(pids))

    def close(self, check_exit=True, keep_helper=False):
        """SIGTERM to the master (it passes it on to its children), then
        SIGKILL to whatever of this instance is left."""
        try:
            if self.dir is None:
                return
            left = self.procs()
            if self.master_pid in left:
                try:
                    os.kill(self.master_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10 * SLOW
            for _ in range(int(10 * SLOW / 0.05) + 1):
                left = self.procs()
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.master_pid = None
            if left and check_exit:
                fail("Postfix processes %s ignored SIGTERM to the master"
                     % left)
        finally:
            if not keep_helper:
                with _helpers_lock:
                    _helpers.discard(self)


    # -- observation ------------------------------------------------------
    def log(self):
        try:
            with open(self.maillog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def messages(self):
        """Every message virtual(8) delivered, as dicts: rcpt (its
        Delivered-To), subject, message_id, path, headers (bytes)."""
        out = []
        base = self.path("mail")
        for box in sorted(os.listdir(base)):
            new = os.path.join(base, box, "new")
            try:
                names = sorted(os.listdir(new))
            except OSError:
                continue
            for name in names:
                p = os.path.join(new, name)
                with open(p, "rb") as f:
                    data = f.read()
                head = re.split(rb"\r?\n\r?\n", data, 1)[0]

                def field(fname):
                    m = re.search(rb"(?im)^" + fname + rb":[ \t]*(.*)$",
                                  head)
                    return m.group(1).strip().decode("utf-8", "replace") \
                        if m else None
                out.append(dict(rcpt=field(b"Delivered-To"),
                                subject=field(b"Subject"),
                                message_id=field(b"Message-ID"),
                                box=box, path=p, headers=head))
        return out

    def wait_messages(self, n, timeout=10.0):
        return wait_until(lambda: (lambda m: m if len(m) >= n else None)(
            self.messages()), timeout, 0.1,
            "%d message(s) delivered by Postfix" % n)

    def queued(self):
        """Queue files Postfix has not delivered yet."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.path("queue", sub)):
                n += len(files)
        return n


class Postgrey(_Fixture):
    """postgrey (Debian's package) on 127.0.0.1:<free port>, its database
    in its own directory (writable by user postgrey, to which it drops
    privileges), greylisting for delay seconds, with empty whitelists
    and no auto-whitelisting of clients, logging to <dir>/postgrey.log.

        with Postgrey(delay=5) as pg:
            ... smtpd_recipient_restrictions =
                    check_policy_service inet:127.0.0.1:%d % pg.port
    """

    def __init__(self, delay=5, args=()):
        self.delay = delay
        self.args = list(args)
        self.dir = None
        self.proc = None
        self.port = None
        self._log = None

    @property
    def policy_service(self):
        return "inet:%s:%d" % (HOST, self.port)

    @property
    def logpath(self):
        return os.path.join(self.dir, "postgrey.log")

    def start(self):
        need_program(POSTGREY, "postgrey")
        uid, gid = _system_ids("postgrey")
        self.dir = tempfile.mkdtemp(prefix="relay-pg-")
        os.chmod(self.dir, 0o755)
        db = os.path.join(self.dir, "db")
        os.makedirs(db)
        os.chown(db, uid, gid)
        os.chmod(db, 0o700)
        empty = os.path.join(self.dir, "empty-whitelist")
        open(empty, "w").close()
        for attempt in range(5):
            self.port = free_port(HOST)
            argv = [POSTGREY, "--inet=%s:%d" % (HOST, self.port),
                    "--dbdir=" + db, "--delay=%d" % self.delay,
                    "--auto-whitelist-clients=0",
                    "--whitelist-clients=" + empty,
                    "--whitelist-recipients=" + empty,
                    "--hostname=postgrey.test"] + self.args
            self._log = open(self.logpath, "ab")
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=self._log, preexec_fn=_pdeathsig(signal.SIGKILL))
            with _helpers_lock:
                _helpers.add(self)
            if self._wait_ready(20.0):
                return self
            self.close(check_exit=False)
            if "in use" not in self.log():
                break
        fail("postgrey did not start; its log:\n%s" % tail(self.log()))

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout * SLOW
        for _ in range(int(timeout * SLOW / 0.05) + 1):
            if self.proc.poll() is not None:
                return False
            if _listening(HOST, self.port):
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return False

    def log(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def close(self, check_exit=True):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10 * SLOW)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            if self._log is not None:
                self._log.close()
                self._log = None
        finally:
            with _helpers_lock:
                _helpers.discard(self)

