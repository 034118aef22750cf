#!/usr/bin/env python3
"""runner.py - a tiny test runner for the relayd integration tests.

    python3 tests/integration/runner.py FILE_OR_DIR[::test_name] ...

Discovers the module-level functions called test_* (taking no arguments)
in each file, in definition order, and runs each one with a time limit
(60 s, or the function's `timeout` attribute). Prints one line per test,
"ok <name>" or "FAIL <name>: <reason>", details of a failure (traceback,
relayd log tail) on following lines starting with "#", and as the last
line "N passed, N failed". Exits 1 if anything failed.

A directory argument means every tests/integration/test_*.py below it (or
its own test_*.py files). RELAY_IT_FILTER=substring runs matching tests
only. Python 3.11 standard library only; no pytest.
"""
import glob
import importlib.util
import inspect
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TIMEOUT = 60


class TestTimeout(BaseException):
    """Raised in the main thread by SIGALRM (BaseException: not swallowed
    by a test's `except Exception`)."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def _on_term(signum, frame):
    # tests/run's timeout(1): stop, but clean up the daemons first.
    raise KeyboardInterrupt()


def expand(args):
    """[(path, name-or-None)] from the command line."""
    out = []
    for a in args:
        name = None
        if "::" in a:
            a, name = a.split("::", 1)
        if os.path.isdir(a):
            sub = os.path.join(a, "tests", "integration")
            base = sub if os.path.isdir(sub) else a
            files = sorted(glob.glob(os.path.join(base, "test_*.py")))
            out.extend((f, name) for f in files)
        else:
            out.append((a, name))
    seen, uniq = set(), []
    for f, n in out:
        key = (os.path.abspath(f), n)
        if key not in seen:
            seen.add(key)
            uniq.append((f, n))
    return uniq


def load(path):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    d = os.path.dirname(os.path.abspath(path))
    if d not in sys.path:
        sys.path.insert(0, d)
    modname = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def tests_of(mod):
    found = []
    for name, fn in vars(mod).items():
        if not name.startswith("test_") or not inspect.isfunction(fn):
            continue
        if fn.__module__ != mod.__name__:
            continue
        if inspect.signature(fn).parameters:
            continue
        found.append((fn.__code__.co_firstlineno, name, fn))
    found.sort()
    return [(n, f) for _, n, f in found]


def one_line(text):
    text = " ".join(str(text).split())
    return text if len(text) <= 400 else text[:400] + "..."


def detail(lines):
    sys.stdout.flush()
    for line in lines:
        print("#   " + line)
    sys.stdout.flush()


def cleanup():
    lib = sys.modules.get("relaylib")
    if lib is not None:
        try:
            return lib.cleanup_all()
        except Exception:
            return 0
    return 0


def run_one(label, fn):
    """Run fn with a time limit; returns None or a failure reason."""
    limit = int(getattr(fn, "timeout", DEFAULT_TIMEOUT))
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(limit)
    reason, extra = None, []
    t0 = time.monotonic()
    try:
        try:
            fn()
        finally:
            signal.alarm(0)
    except TestTimeout:
        reason = "timed out after %d s" % limit
        extra = traceback.format_exc().splitlines()[-12:]
    except KeyboardInterrupt:
        raise
    except BaseException as e:   # AssertionError, OSError, anything
        msg = str(e) or type(e).__name__
        first = msg.splitlines()[0] if msg.splitlines() else msg
        reason = "%s: %s" % (type(e).__name__, first) \
            if not isinstance(e, AssertionError) else first
        extra = traceback.format_exc().splitlines()[-25:]
        if len(msg.splitlines()) > 1:
            extra += ["message:"] + msg.splitlines()[1:60]
        log = getattr(e, "relayd_log", None)
        if log and len(msg.splitlines()) <= 1:
            extra += ["relayd log (tail):"] + log.splitlines()[-30:]
    finally:
        signal.signal(signal.SIGALRM, old)
        signal.alarm(0)
    left = cleanup()
    if left and reason is None:
        reason = "left %d relayd process(es) running" % left
    return reason, extra, time.monotonic() - t0


def main(argv):
    if not argv:
        argv = [HERE]
    flt = os.environ.get("RELAY_IT_FILTER", "")
    counts = [0, 0]
    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, _on_term)
    try:
        run_files(argv, flt, counts)
    except KeyboardInterrupt:
        print("FAIL runner: interrupted")
        counts[1] += 1
    passed, failed = counts
    if os.environ.get("RELAY_IT_TIMES"):
        print("# total %.1f s" % (time.monotonic() - t_start))
    print("%d passed, %d failed" % (passed, failed))
    sys.stdout.flush()
    return 1 if failed else 0


def run_files(argv, flt, counts):
    """Run everything; counts = [passed, failed], kept current."""
    for path, only in expand(argv):
        label_mod = os.path.splitext(os.path.basename(path))[0]
        try:
            mod = load(path)
        except Exception as e:
            print("FAIL %s: cannot load: %s" % (label_mod, one_line(
                "%s: %s" % (type(e).__name__, e))))
            detail(traceback.format_exc().splitlines()[-15:])
            counts[1] += 1
            continue
        tests = tests_of(mod)
        if only:
            tests = [(n, f) for n, f in tests if n == only]
            if not tests:
                print("FAIL %s::%s: no such test" % (label_mod, only))
                counts[1] += 1
        for name, fn in tests:
            label = "%s.%s" % (label_mod, name)
            if flt and flt not in label:
                continue
            reason, extra, dt = run_one(label, fn)
            if reason is None:
                print("ok %s" % label)
                counts[0] += 1
            else:
                print("FAIL %s: %s" % (label, one_line(reason)))
                detail(extra)
                counts[1] += 1
            if os.environ.get("RELAY_IT_TIMES"):
                print("#   %.2f s" % dt)
            sys.stdout.flush()


if __name__ == "__main__":
    try:
        rc = main(sys.argv[1:])
    finally:
        cleanup()
    sys.exit(rc)
