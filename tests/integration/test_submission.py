"""test_submission.py - the happy paths of message submission.

Clients: swaks (STARTTLS + AUTH PLAIN/LOGIN, implicit TLS, pipelining),
smtplib (STARTTLS + login, SMTP_SSL, plaintext from a relay network) and a
raw socket client for exact bytes (pipelined groups, BDAT, dot-stuffing).
Each test checks the reply and what landed in the spool.
"""
import base64
import os
import random
import re
import smtplib
import socket
import threading
import time

import relaylib as L
from relaylib import RelayD, check, eq, fail


def _queued_from_swaks(out):
    ids = re.findall(r"<[~-]* *250 2\.0\.0 Ok: queued as ([0-9a-f]{16})", out)
    check(len(ids) == 1, "swaks: expected one queued reply, output:\n" + out)
    return ids[0]


def _swaks(d, listener, *extra, subject="swaks test"):
    rc, out = L.run_swaks(
        ["--port", str(d.port(listener)), "--helo", "client.test",
         "--from", "sender@example.com", "--to", "rcpt@example.net",
         "--header", "Subject: " + subject,
         "--body", "Body of " + subject, "--timeout", "20"] + list(extra))
    check(rc == 0, "swaks exited %d:\n%s" % (rc, out))
    qid = _queued_from_swaks(out)
    eq(d.queue_ids().count(qid), 1, "id %s in queue/" % qid)
    q = d.queue_json()
    m = [x for x in q["messages"] if x["id"] == qid]
    check(m, "queued id %s missing from relayctl queue --json" % qid)
    return qid, m[0], out


def _auth_args():
    return ["--auth-user", L.USER, "--auth-password", L.PASSWORD]


def test_ehlo_capabilities():
    """EHLO lists the extensions; STARTTLS only before TLS, AUTH only in it."""
    with RelayD(limits=dict(max_message_size=1234567)) as d:
        base = ["PIPELINING", "SIZE 1234567", "8BITMIME", "SMTPUTF8",
                "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]

        def caps(text):
            lines = text.splitlines()
            check(lines[0].startswith("250-relay.test"),
                  "EHLO first line: %r" % lines[0])
            return [x[4:] for x in lines[1:]]

        with d.client("sub") as c:
            eq(c.banner, (220, ["220 relay.test ESMTP relay ready"]),
               "banner")
            cp = caps(c.ehlo())
            for k in base + ["STARTTLS"]:
                check(k in cp, "%s missing before TLS: %s" % (k, cp))
            check(not any(x.startswith("AUTH") for x in cp),
                  "AUTH offered before TLS: %s" % cp)
            c.starttls()
            cp = caps(c.ehlo())
            for k in base + ["AUTH PLAIN LOGIN"]:
                check(k in cp, "%s missing under TLS: %s" % (k, cp))
            check("STARTTLS" not in cp, "STARTTLS offered under TLS")
        with d.client("smtps") as c:
            eq(c.banner[0], 220, "implicit TLS banner")
            cp = caps(c.ehlo())
            check("AUTH PLAIN LOGIN" in cp and "STARTTLS" not in cp,
                  "implicit TLS caps: %s" % cp)
        with d.client("plain") as c:
            cp = caps(c.ehlo())
            for k in base:
                check(k in cp, "%s missing on plaintext: %s" % (k, cp))
            check("STARTTLS" not in cp and
                  not any(x.startswith("AUTH") for x in cp),
                  "plaintext listener offers TLS/AUTH: %s" % cp)
        with d.client("sub") as c:
            r = c.expect("HELO client.test", "250 relay.test")
            check("\n" not in r, "HELO reply is one line: %r" % r)


def test_swaks_starttls_auth_plain():
    with RelayD() as d:
        qid, m, _ = _swaks(d, "sub", "--tls", "--auth", "PLAIN",
                           *_auth_args())
        eq(m["user"], L.USER, "user")
        eq(m["sender"], "sender@example.com", "sender")
        eq([r["address"] for r in m["recipients"]], ["rcpt@example.net"],
           "recipients")
        check(b"with ESMTPSA" in d.msg_bytes(qid), "Received: ESMTPSA")


def test_swaks_starttls_auth_login():
    with RelayD() as d:
        qid, m, _ = _swaks(d, "sub", "--tls", "--auth", "LOGIN",
                           *_auth_args())
        eq(m["user"], L.USER, "user")


def test_swaks_implicit_tls():
    with RelayD() as d:
        qid, m, _ = _swaks(d, "smtps", "--tlsc", "--auth", "PLAIN",
                           *_auth_args())
        eq(m["user"], L.USER, "user")
        check(b"(TLSv1." in d.msg_bytes(qid), "Received: names TLS")


def test_swaks_pipeline():
    with RelayD() as d:
        qid, m, out = _swaks(d, "sub", "--tls", "--auth", "PLAIN",
                             "--pipeline", *_auth_args())
        eq(m["user"], L.USER, "user")


def test_smtplib_starttls_login():
    with RelayD() as d:
        s = smtplib.SMTP(L.HOST, d.port("sub"), local_hostname="client.test",
                         timeout=20 * L.SLOW)
        try:
            s.ehlo()
            s.starttls(context=L.tls_client_context())
            s.ehlo()
            check(s.has_extn("auth"), "AUTH after STARTTLS")
            s.login(L.USER, L.PASSWORD)
            msg = L.make_message("smtplib starttls")
            refused = s.sendmail("sender@example.com",
                                 ["a@example.net", "b@example.net"], msg)
            eq(refused, {}, "refused recipients")
            s.quit()
        finally:
            s.close()
        q = d.queue_json()
        eq(q["count"], 1, "queued")
        eq(sorted(r["address"] for r in q["messages"][0]["recipients"]),
           ["a@example.net", "b@example.net"], "recipients")
        eq(q["messages"][0]["user"], L.USER, "user")
        qid = q["messages"][0]["id"]
        _, rest = L.split_received(d.msg_bytes(qid))
        eq(rest, msg, "stored message after Received:")


def test_smtplib_smtp_ssl():
    with RelayD() as d:
        s = smtplib.SMTP_SSL(L.HOST, d.port("smtps"),
                             local_hostname="client.test",
                             context=L.tls_client_context(),
                             timeout=20 * L.SLOW)
        try:
            s.login(L.USER, L.PASSWORD)
            msg = L.make_message("smtplib ssl")
            s.mail("sender@example.com")
            s.rcpt("rcpt@example.net")
            code, text = s.data(msg)
            eq(code, 250, "DATA reply")
            qid = L.queued_id("%d %s" % (code, text.decode()))
            s.quit()
        finally:
            s.close()
        eq(d.queue_ids(), [qid], "queue/")
        _, rest = L.split_received(d.msg_bytes(qid))
        eq(rest, msg, "stored message")


def test_plaintext_relay_network():
    """A 'none' listener with auth_required=false relays for 127.0.0.0/8."""
    with RelayD() as d:
        s = smtplib.SMTP(L.HOST, d.port("plain"), local_hostname="client.test",
                         timeout=20 * L.SLOW)
        try:
            msg = L.make_message("plaintext")
            eq(s.sendmail("sender@example.com", ["rcpt@example.net"], msg),
               {}, "refused")
            s.quit()
        finally:
            s.close()
        q = d.queue_json()
        eq(q["count"], 1, "count")
        m = q["messages"][0]
        eq(m["user"], None, "user of an unauthenticated message")
        eq(m["client"], "127.0.0.1", "client")
        eq(m["recipients"][0]["state"], "pending", "recipient state")
        eq(q["bytes"], m["size"], "bytes")
        stored = d.msg_bytes(m["id"])
        eq(m["size"], len(stored), "size is the stored size")
        recv, _ = L.split_received(stored)
        check(b" with ESMTP id " in recv, "Received: with ESMTP: %r" % recv)
        check(b"TLS" not in recv, "no TLS in plaintext Received: %r" % recv)


def test_raw_pipelined_transaction():
    """MAIL, RCPT x N, DATA in one write: every reply, in order."""
    n = 7
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            group = "MAIL FROM:<p@example.com>\r\n" + "".join(
                "RCPT TO:<r%d@example.net>\r\n" % i for i in range(n)) + \
                "DATA\r\n"
            c.send(group)
            eq(c.reply_text(), "250 2.1.0 Ok", "MAIL")
            for i in range(n):
                eq(c.reply_text(), "250 2.1.5 Ok", "RCPT %d" % i)
            check(c.reply_text().startswith("354 "), "DATA")
            body = L.make_message("pipelined")
            # The body, the next transaction and QUIT in one write too.
            c.send(body + b".\r\nMAIL FROM:<p2@example.com>\r\n"
                   b"RCPT TO:<x@example.net>\r\nRSET\r\nNOOP\r\nQUIT\r\n")
            qid = L.queued_id(c.reply_text())
            eq(c.reply_text(), "250 2.1.0 Ok", "second MAIL")
            eq(c.reply_text(), "250 2.1.5 Ok", "second RCPT")
            eq(c.reply_text(), "250 2.0.0 Ok", "RSET")
            eq(c.reply_text(), "250 2.0.0 Ok", "NOOP")
            eq(c.reply_text(), "221 2.0.0 Bye", "QUIT")
            check(c.closed(), "connection closed after QUIT")
        q = d.queue_json()
        eq(q["count"], 1, "count")
        eq([r["address"] for r in q["messages"][0]["recipients"]],
           ["r%d@example.net" % i for i in range(n)], "recipients in order")
        _, rest = L.split_received(d.msg_bytes(qid))
        eq(rest, body, "stored body")


def test_pipelined_plaintext_whole_session():
    """EHLO..QUIT with the body, all in a single write on a plain socket."""
    with RelayD() as d:
        with d.client("plain") as c:
            body = L.make_message("one write")
            c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n"
                   b"RCPT TO:<b@example.net>\r\nDATA\r\n" + body +
                   b".\r\nQUIT\r\n")
            check(c.reply_text().startswith("250-relay.test"), "EHLO")
            eq(c.reply_text(), "250 2.1.0 Ok", "MAIL")
            eq(c.reply_text(), "250 2.1.5 Ok", "RCPT")
            check(c.reply_text().startswith("354"), "DATA")
            qid = L.queued_id(c.reply_text())
            eq(c.reply_text(), "221 2.0.0 Bye", "QUIT")
        _, rest = L.split_received(d.msg_bytes(qid))
        eq(rest, body, "stored")


def test_several_messages_one_session():
    with RelayD() as d:
        ids, bodies = [], []
        with d.client("sub") as c:
            c.login()
            for i in range(5):
                body = L.make_message("msg %d" % i, body_lines=i + 1)
                ids.append(L.queued_id(c.send_message(
                    "s%d@example.com" % i, ["r%d@example.net" % i], body)))
                bodies.append(body)
            eq(c.cmd("QUIT"), "221 2.0.0 Bye", "QUIT")
        eq(len(set(ids)), 5, "distinct ids")
        q = d.queue_json()
        eq(q["count"], 5, "count")
        eq(sorted(m["id"] for m in q["messages"]), sorted(ids), "ids")
        by_id = {m["id"]: m for m in q["messages"]}
        for i, qid in enumerate(ids):
            eq(by_id[qid]["sender"], "s%d@example.com" % i, "sender %d" % i)
            _, rest = L.split_received(d.msg_bytes(qid))
            eq(rest, bodies[i], "body %d" % i)
        st = d.status()
        eq(st["messages"], 5, "status messages")
        eq(st["queued"], 5, "status queued")


def test_date_and_message_id_added():
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            body = L.make_message("no date", date=False, msgid=False)
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"], body))
        msg = d.msg_bytes(qid)
        eq(L.count_headers(msg, "Date"), 1, "Date: fields")
        eq(L.count_headers(msg, "Message-ID"), 1, "Message-ID: fields")
        hdr = L.header_section(msg)
        check(re.search(rb"\r\nMessage-ID: <" + qid.encode() +
                        rb"\.\d+@relay\.test>\r\n", hdr),
              "Message-ID format: %r" % hdr)
        check(re.search(rb"\r\nDate: \w{3}, \d{2} \w{3} \d{4} "
                        rb"\d{2}:\d{2}:\d{2} [+-]\d{4}\r\n", hdr),
              "Date format: %r" % hdr)
        # Appended at the end of the header section, before the body.
        _, rest = L.split_received(msg)
        hdrs, sep, tail = rest.partition(b"\r\n\r\n")
        lines = hdrs.split(b"\r\n")
        check(lines[-2].startswith(b"Date: ") and
              lines[-1].startswith(b"Message-ID: "),
              "added fields not at the end of the header: %r" % lines)
        eq(tail, body.partition(b"\r\n\r\n")[2], "body after the header")


def test_date_and_message_id_kept():
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            body = L.make_message("has date").replace(
                b"Date:", b"DATE:").replace(b"Message-ID:", b"message-id:")
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"], body))
        msg = d.msg_bytes(qid)
        eq(L.count_headers(msg, "Date"), 1, "Date: fields")
        eq(L.count_headers(msg, "Message-ID"), 1, "Message-ID: fields")
        _, rest = L.split_received(msg)
        eq(rest, body, "message unchanged after Received:")


def test_headers_only_and_empty_message():
    """A message with no body (no empty line), and an empty message."""
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            qid1 = L.queued_id(c.send_message(
                "a@example.com", ["b@example.net"], b"Subject: only\r\n"))
            qid2 = L.queued_id(c.send_message(
                "a@example.com", ["b@example.net"], b""))
        _, rest = L.split_received(d.msg_bytes(qid1))
        check(rest.startswith(b"Subject: only\r\nDate: "),
              "headers-only message: %r" % rest)
        eq(L.count_headers(rest, "Message-ID"), 1, "Message-ID added")
        _, rest = L.split_received(d.msg_bytes(qid2))
        check(rest.startswith(b"Date: ") and b"Message-ID: " in rest,
              "empty message gets Date/Message-ID: %r" % rest)


def test_received_header():
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"],
                                             L.make_message("rcvd")))
        recv, _ = L.split_received(d.msg_bytes(qid))
        text = recv.decode()
        check(text.startswith("Received: from client.test ([127.0.0.1])\r\n"
                              "\tby relay.test (relay) with ESMTPSA id " +
                              qid + "\r\n"), "Received: %r" % text)
        check("\tfor <b@example.net>;" in text, "for <rcpt>: %r" % text)
        check(re.search(r"\(TLSv1\.[23] [A-Z0-9_-]+\)", text),
              "TLS details: %r" % text)
        # Two recipients: no "for" clause.
        with d.client("plain") as c:
            c.expect("HELO old.client", "250")
            qid = L.queued_id(c.send_message(
                "a@example.com", ["b@example.net", "c@example.net"],
                L.make_message("two")))
        recv, _ = L.split_received(d.msg_bytes(qid))
        check(b"from old.client ([127.0.0.1])" in recv and
              b" with SMTP id " in recv and b"for <" not in recv,
              "HELO / 2 rcpts Received: %r" % recv)


def test_dot_stuffing():
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            body = (b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n"
                    b".\t.tab\r\nmiddle . dot\r\n.\r\n..\r\nend\r\n")
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            stuffed = L.dot_stuff(body)
            check(b"\r\n..leading dot\r\n" in stuffed, "stuffing helper")
            c.send(stuffed + b".\r\n")
            qid = L.queued_id(c.reply_text())
        _, rest = L.split_received(d.msg_bytes(qid))
        hdr, _, tail = rest.partition(b"\r\n\r\n")
        eq(tail, body.partition(b"\r\n\r\n")[2], "unstuffed body")


def test_end_of_data_split_across_writes():
    """CRLF.CRLF arriving one byte at a time still ends the message."""
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            body = L.make_message("split")
            c.send(body[:-2])
            for ch in (b"\r", b"\n", b".", b"\r", b"\n"):
                time.sleep(0.01)
                c.send(ch)
            qid = L.queued_id(c.reply_text())
        _, rest = L.split_received(d.msg_bytes(qid))
        eq(rest, body, "stored")


def test_large_message_5mb():
    with RelayD(limits=dict(max_message_size=8 * 1024 * 1024)) as d:
        line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
        body = L.make_message("big") + line * (5 * 1024 * 1024 // len(line))
        check(len(body) > 5 * 1024 * 1024 - 100, "body size")
        with d.client("sub", timeout=60) as c:
            c.login()
            c.expect("MAIL FROM:<a@example.com> SIZE=%d" % len(body), "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.expect("DATA", "354")
            c.send(body + b".\r\n")
            qid = L.queued_id(c.reply_text(timeout=60))
        _, rest = L.split_received(d.msg_bytes(qid))
        check(rest == body, "5 MB body differs (got %d bytes, want %d)" %
              (len(rest), len(body)))
        eq(d.wait_incoming_empty(), [], "incoming/")


def test_rset_mid_transaction():
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            c.expect("MAIL FROM:<first@example.com>", "250")
            c.expect("RCPT TO:<gone@example.net>", "250")
            eq(c.cmd("RSET"), "250 2.0.0 Ok", "RSET")
            # After RSET: RCPT needs a new MAIL; the old recipient is gone.
            check(c.cmd("RCPT TO:<x@example.net>").startswith("503 5.5.1"),
                  "RCPT after RSET")
            qid = L.queued_id(c.send_message(
                "second@example.com", ["kept@example.net"],
                L.make_message("after rset")))
            # RSET inside DATA is just a body line.
            c.expect("MAIL FROM:<third@example.com>", "250")
            c.expect("RCPT TO:<t@example.net>", "250")
            c.expect("DATA", "354")
            c.send(b"Subject: r\r\n\r\nRSET\r\n.\r\n")
            qid2 = L.queued_id(c.reply_text())
            eq(c.cmd("RSET"), "250 2.0.0 Ok", "RSET outside a transaction")
        q = d.queue_json()
        eq(q["count"], 2, "count")
        m = {x["id"]: x for x in q["messages"]}
        eq(m[qid]["sender"], "second@example.com", "sender")
        eq([r["address"] for r in m[qid]["recipients"]],
           ["kept@example.net"], "recipients after RSET")
        check(d.msg_bytes(qid2).endswith(b"\r\n\r\nRSET\r\n"),
              "RSET as body line")


def test_help_noop_vrfy_expn_quit():
    with RelayD() as d:
        with d.client("sub") as c:
            # Allowed before EHLO too.
            eq(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP before EHLO")
            h = c.cmd("HELP")
            lines = h.splitlines()
            check(len(lines) == 3 and lines[0].startswith("214-2.0.0") and
                  lines[-1].startswith("214 2.0.0"), "HELP: %r" % h)
            check("EHLO" in h and "BDAT" in h, "HELP lists commands")
            c.ehlo()
            eq(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP")
            eq(c.cmd("noop"), "250 2.0.0 Ok", "lower-case noop")
            check(c.cmd("VRFY alice").startswith("252 2.5.0"), "VRFY")
            check(c.cmd("EXPN list").startswith("502 5.5.1"), "EXPN")
            eq(c.cmd("QUIT"), "221 2.0.0 Bye", "QUIT")
            check(c.closed(), "closed after QUIT")


def test_auth_login_and_plain_variants():
    """AUTH PLAIN with a 334 round trip, AUTH LOGIN step by step and with
    an initial response, and an authorization identity equal to the user."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    with RelayD() as d:
        with d.client("smtps") as c:
            c.ehlo()
            eq(c.cmd("AUTH PLAIN"), "334 ", "AUTH PLAIN challenge")
            r = c.cmd(b64("%s\0%s\0%s" % (L.USER, L.USER, L.PASSWORD)))
            check(r.startswith("235 2.7.0"), "PLAIN with authzid: %r" % r)
            check(c.cmd("AUTH PLAIN x").startswith("503 5.5.1"),
                  "second AUTH")
        with d.client("smtps") as c:
            c.ehlo()
            eq(c.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6", "LOGIN user prompt")
            eq(c.cmd(b64(L.USER)), "334 UGFzc3dvcmQ6", "LOGIN pass prompt")
            check(c.cmd(b64(L.PASSWORD)).startswith("235"), "LOGIN")
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"],
                                             L.make_message("login")))
        with d.client("smtps") as c:
            c.ehlo()
            eq(c.cmd("auth login " + b64(L.USER)), "334 UGFzc3dvcmQ6",
               "LOGIN with initial response")
            check(c.cmd(b64(L.PASSWORD)).startswith("235"), "LOGIN")
        eq(d.queue_json()["messages"][0]["id"], qid, "queued")


def test_bdat_chunks():
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            body = L.make_message("bdat", body_lines=20)
            parts = [body[:50], body[50:51], body[51:300], body[300:]]
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            total = 0
            for p in parts[:-1]:
                total += len(p)
                c.send(b"BDAT %d\r\n" % len(p) + p)
                eq(c.reply_text(), "250 2.0.0 Ok: %d octets received" % total,
                   "BDAT chunk")
            c.send(b"BDAT %d LAST\r\n" % len(parts[-1]) + parts[-1])
            qid = L.queued_id(c.reply_text())
            # Lines starting with a dot are not unstuffed in BDAT; a chunk
            # may contain CRLF.CRLF; BDAT 0 LAST ends a message.
            raw = b"Subject: b2\r\n\r\n..dots stay\r\n.\r\nafter\r\n"
            c.expect("MAIL FROM:<a@example.com>", "250")
            c.expect("RCPT TO:<b@example.net>", "250")
            c.send(b"BDAT %d\r\n" % len(raw) + raw + b"BDAT 0 LAST\r\n")
            check(c.reply_text().startswith("250 2.0.0 Ok: %d octets" %
                                            len(raw)), "BDAT chunk 2")
            qid2 = L.queued_id(c.reply_text())
            # Pipelined: MAIL RCPT BDAT LAST in one write.
            c.send(b"MAIL FROM:<p@example.com>\r\nRCPT TO:<q@example.net>\r\n"
                   b"BDAT %d LAST\r\n" % len(body) + body + b"NOOP\r\n")
            eq(c.reply_text(), "250 2.1.0 Ok", "MAIL")
            eq(c.reply_text(), "250 2.1.5 Ok", "RCPT")
            qid3 = L.queued_id(c.reply_text())
            eq(c.reply_text(), "250 2.0.0 Ok", "NOOP after BDAT")
        _, rest = L.split_received(d.msg_bytes(qid))
        eq(rest, body, "BDAT body")
        _, rest = L.split_received(d.msg_bytes(qid2))
        check(rest.startswith(b"Subject: b2\r\nDate: ") and
              rest.endswith(b"\r\n\r\n..dots stay\r\n.\r\nafter\r\n"),
              "BDAT body 2 (no unstuffing): %r" % rest)
        _, rest = L.split_received(d.msg_bytes(qid3))
        eq(rest, body, "pipelined BDAT body")
        eq(d.queue_count(), 3, "count")


def test_dsn_parameters():
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            c.expect("MAIL FROM:<a@example.com> RET=HDRS ENVID=abc "
                     "BODY=8BITMIME SIZE=100 AUTH=<>", "250 2.1.0")
            c.expect("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE "
                     "ORCPT=rfc822;bob@example.net", "250 2.1.5")
            c.expect("RCPT TO:<carol@example.net> NOTIFY=NEVER", "250 2.1.5")
            c.expect("RCPT TO:<dave@example.net>", "250 2.1.5")
            c.expect("DATA", "354")
            c.send(L.make_message("dsn") + b".\r\n")
            qid = L.queued_id(c.reply_text())
        env = d.env_text(qid)
        lines = env.splitlines()
        check("envid: abc" in lines, ".env lacks envid: %r" % env)
        check("ret: hdrs" in lines, ".env lacks ret: %r" % env)
        check("body: 8bitmime" in lines, ".env lacks body: %r" % env)
        bob = [x for x in lines if x.startswith("rcpt: <bob@example.net>")]
        check(bob and " notify=success,failure" in bob[0] and
              " orcpt=rfc822;bob@example.net" in bob[0],
              ".env bob line: %r" % env)
        carol = [x for x in lines if x.startswith("rcpt: <carol@")]
        check(carol and " notify=never" in carol[0], "carol: %r" % env)
        dave = [x for x in lines if x.startswith("rcpt: <dave@")]
        check(dave and "notify=" not in dave[0] and "orcpt=" not in dave[0],
              "dave: %r" % env)
        eq(lines[-1], "end: 3", "last line")


def test_smtputf8():
    addr = "\u00fc@ex\u00e4mple.com"
    with RelayD() as d:
        with d.client("sub") as c:
            c.login()
            c.expect("MAIL FROM:<%s> SMTPUTF8" % addr, "250 2.1.0")
            c.expect("RCPT TO:<j\u00f6rg@b\u00fccher.example>", "250 2.1.5")
            c.expect("DATA", "354")
            body = ("Subject: gr\u00fc\u00dfe\r\n\r\n\u00e4\u00f6\u00fc\r\n"
                    ).encode()
            c.send(body + b".\r\n")
            qid = L.queued_id(c.reply_text())
        m = d.queue_json()["messages"][0]
        eq(m["sender"], addr, "UTF-8 sender in JSON")
        eq(m["recipients"][0]["address"], "j\u00f6rg@b\u00fccher.example",
           "UTF-8 recipient")
        check("smtputf8: 1" in d.env_text(qid).splitlines(), "smtputf8: 1")
        msg = d.msg_bytes(qid)
        check(b" with UTF8SMTPSA id " in msg, "Received: UTF8SMTPSA")
        check(msg.endswith("\r\n\r\n\u00e4\u00f6\u00fc\r\n".encode()),
              "8-bit body kept")


def test_null_sender_and_quoted_local_part():
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            c.expect("MAIL FROM:<>", "250")
            c.expect('RCPT TO:<"john doe"@example.net>', "250")
            c.expect("RCPT TO:<postmaster@[127.0.0.1]>", "250")
            c.expect("DATA", "354")
            c.send(L.make_message("null") + b".\r\n")
            L.queued_id(c.reply_text())
        m = d.queue_json()["messages"][0]
        eq(m["sender"], "", "null sender")
        eq([r["address"] for r in m["recipients"]],
           ['"john doe"@example.net', "postmaster@[127.0.0.1]"],
           "recipients")


def test_tls_generate():
    """tls.generate = true creates the certificate pair on first start."""
    with RelayD(tls_generate=True) as d:
        check(os.path.exists(d.cert) and os.path.exists(d.key),
              "generated certificate files")
        with d.client("smtps") as c:
            c.login()
            L.queued_id(c.send_message("a@example.com", ["b@example.net"],
                                       L.make_message("gen")))
        d.wait_log(r"tls generated cert=")


def test_data_in_random_small_pieces():
    """The DATA stream cut at arbitrary points (dot-stuffing, CRLF, the
    end of the header section and CRLF.CRLF split across reads)."""
    rng = random.Random(1234)
    with RelayD() as d:
        with d.client("plain") as c:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.ehlo()
            for n in range(3):
                body = L.make_message("pieces %d" % n, date=(n != 1),
                                      msgid=(n != 1)) + \
                    b".dot line\r\n..two\r\n\r\n.\r\nlast\r\n"
                c.expect("MAIL FROM:<a@example.com>", "250")
                c.expect("RCPT TO:<b@example.net>", "250")
                c.expect("DATA", "354")
                wire = L.dot_stuff(body) + b".\r\n"
                i = 0
                for _ in range(len(wire)):
                    if i >= len(wire):
                        break
                    k = rng.randint(1, 4)
                    c.send(wire[i:i + k])
                    i += k
                    if rng.random() < 0.3:
                        time.sleep(0.001)
                qid = L.queued_id(c.reply_text())
                _, rest = L.split_received(d.msg_bytes(qid))
                if n == 1:
                    eq(L.count_headers(rest, "Date"), 1, "Date added")
                    eq(rest.partition(b"\r\n\r\n")[2],
                       body.partition(b"\r\n\r\n")[2], "body %d" % n)
                else:
                    eq(rest, body, "message %d" % n)


def test_header_section_over_256k_passes_through():
    """A header section too big to hold back is stored unchanged (only
    Received: is added)."""
    with RelayD() as d:
        hdr = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(3000))
        msg = hdr + b"\r\nbody\r\n"
        with d.client("plain") as c:
            c.ehlo()
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"], msg))
        _, rest = L.split_received(d.msg_bytes(qid))
        check(rest == msg, "big header section changed")


def test_message_without_header_section():
    """A message that starts with the empty line: Date and Message-ID go
    before it."""
    with RelayD() as d:
        with d.client("plain") as c:
            c.ehlo()
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"],
                                             b"\r\njust a body\r\n"))
        _, rest = L.split_received(d.msg_bytes(qid))
        lines = rest.split(b"\r\n")
        check(lines[0].startswith(b"Date: ") and
              lines[1].startswith(b"Message-ID: ") and lines[2] == b"" and
              lines[3] == b"just a body", "stored: %r" % rest)


def test_client_gone_after_final_dot_message_still_queued():
    """The client closes right after <CRLF>.<CRLF> without reading the
    reply: the commit completes (it may resend; nothing is lost)."""
    with RelayD() as d:
        c = d.client("plain")
        c.ehlo()
        c.expect("MAIL FROM:<a@example.com>", "250")
        c.expect("RCPT TO:<b@example.net>", "250")
        c.expect("DATA", "354")
        msg = L.make_message("gone")
        c.send(msg + b".\r\nQUIT\r\n")
        c.close()
        L.wait_until(lambda: d.queue_count() == 1, what="message queued")
        L.wait_until(lambda: d.status()["sessions"] == 0, what="session gone")
        qid = d.queue_ids()[0]
        eq(L.split_received(d.msg_bytes(qid))[1], msg, "stored")
        eq(d.spool_files("incoming"), [], "incoming/")


def test_many_concurrent_sessions():
    """40 clients at once, STARTTLS+AUTH and plaintext mixed."""
    with RelayD() as d:
        results, errors = {}, []

        def worker(i):
            try:
                with d.client("sub" if i % 2 else "plain") as c:
                    if i % 2:
                        c.login()
                    else:
                        c.ehlo()
                    msg = L.make_message("concurrent %d" % i, body_lines=i)
                    results[L.queued_id(c.send_message(
                        "a%d@example.com" % i, ["b@example.net"], msg))] = msg
                    c.cmd("QUIT")
            except Exception as e:   # reported below
                errors.append((i, repr(e)))

        ts = [threading.Thread(target=worker, args=(i,), daemon=True)
              for i in range(40)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30 * L.SLOW)
        check(not any(t.is_alive() for t in ts), "workers hung")
        check(not errors, "errors: %s" % errors[:5])
        eq(len(results), 40, "acknowledged")
        eq(sorted(d.queue_ids()), sorted(results), "queue")
        for qid, msg in results.items():
            eq(L.split_received(d.msg_bytes(qid))[1], msg, "body %s" % qid)


def test_ipv6_loopback_listener():
    """A listener on ::1; relay_networks matching by family."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        print("#   ::1 not available here; IPv6 part not run")
        return
    lis = [dict(name="v6", tls="none", auth_required=False, address="::1"),
           dict(name="v4", tls="none", auth_required=False)]
    with RelayD(listeners=lis, relay_networks=["::1/128"]) as d:
        c = L.Client(d.port("v6"), host="::1")
        with c:
            c.ehlo()
            qid = L.queued_id(c.send_message("a@example.com",
                                             ["b@example.net"],
                                             L.make_message("v6")))
        m = d.queue_json()["messages"][0]
        eq((m["id"], m["client"]), (qid, "::1"), "IPv6 client")
        recv, _ = L.split_received(d.msg_bytes(qid))
        check(b"([::1])" in recv, "Received: %r" % recv)
        # 127.0.0.1 is not in ::1/128.
        with d.client("v4") as c:
            c.ehlo()
            c.expect("MAIL FROM:<a@example.com>", "250")
            eq(c.cmd("RCPT TO:<b@example.net>"),
               "554 5.7.1 Relay access denied", "IPv4 outside ::1/128")


def test_pipelined_flood_with_backpressure():
    """200,000 pipelined commands written before any reply is read: the
    daemon stops reading while its replies back up, and every reply still
    arrives, in order."""
    n = 200000
    with RelayD() as d:
        for name in ("plain", "smtps"):
            with d.client(name, timeout=60) as c:
                c.ehlo()
                err = []

                def writer():
                    try:
                        chunk = b"NOOP\r\nRSET\r\n" * 1000
                        for _ in range(n // 2000):
                            c.send(chunk)
                    except Exception as e:
                        err.append(e)

                t = threading.Thread(target=writer, daemon=True)
                t.start()
                t.join(0.5)          # let the replies pile up first
                for i in range(n):
                    r = c.reply_text()
                    if r != "250 2.0.0 Ok":
                        fail("%s: reply %d: %r" % (name, i, r))
                t.join(30 * L.SLOW)
                check(not t.is_alive(), "writer hung")
                check(not err, "writer: %s" % err)
                eq(c.cmd("QUIT"), "221 2.0.0 Bye", "QUIT after the flood")
