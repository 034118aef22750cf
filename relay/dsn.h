/*
 * dsn.h - delivery status notifications (RFC 3464 bounces, RFC 3461 rules
 * for when to send them, RFC 6533 for internationalised addresses).
 *
 * dsn_build() writes one complete multipart/report message: a text/plain
 * explanation for a human, the machine-readable message/delivery-status,
 * and the original's header section (text/rfc822-headers) or, for a failure
 * with RET=FULL and a body up to DSN_FULL_MAX, the whole original
 * (message/rfc822). CRLF line endings, no line over 998 octets.
 *
 * The caller sends the result from the null reverse path (MAIL FROM:<>),
 * so a DSN is never answered with another DSN, to orig->sender, adding
 * BODY=8BITMIME and SMTPUTF8 as dsn_build's needs say. The bytes are the
 * message itself: dot-stuffing is the SMTP client's job.
 */
#ifndef RELAY_DSN_H
#define RELAY_DSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/util.h"
#include "queue/envelope.h"

#define DSN_FULL_MAX	(1024 * 1024)	/* largest original returned whole */
#define DSN_HEADERS_MAX	(256 * 1024)	/* header section returned at most */

/* dsn_build's needs: what the bounce asks of the next hop */
#define DSN_NEED_8BITMIME	0x01	/* some part is 8bit: BODY=8BITMIME */
#define DSN_NEED_SMTPUTF8	0x02	/* RFC 6533 global types: SMTPUTF8 */

/* One recipient to report on. Every pointer is borrowed for the call. */
struct dsn_rcpt {
	const struct env_rcpt *rcpt;	/* addr, orcpt, updated */
	const char *action;	/* "failed", "delayed", "delivered",
				   "relayed" or "expanded" (RFC 3464 2.3.3) */
	const char *status;	/* enhanced status code, "5.1.1" */
	const char *remote_mta;	/* "dns; mx.example.net" or NULL */
	const char *diagnostic;	/* "smtp; 550 5.1.1 No such user" or NULL */
	int64_t last_attempt;	/* wall-clock seconds; 0: rcpt->updated,
				   and no Last-Attempt-Date if that is 0 */
	int64_t retry_until;	/* "delayed": Will-Retry-Until, 0 = omit */
};

/*
 * dsn_build - append the complete notification (header and body) for the
 * n recipients (n >= 1, all of one message) to out. reporting_mta is our
 * host name (From: MAILER-DAEMON@it, Reporting-MTA, Message-ID), now is
 * the wall clock for Date:. boundary_seed (letters, digits, ".-_" are
 * kept) with now makes the Message-ID unique: the queue id will do, plus a
 * counter if one message can get two notices within a second. The MIME
 * boundary is built from it too, and is checked against the content.
 *
 * What is returned of the original (RFC 3461 4.3), read from orig_fd with
 * pread() from offset 0 (the fd's offset is left alone):
 *   - its whole text (message/rfc822) only when some recipient "failed",
 *     orig->ret is ENV_RET_FULL and it is at most DSN_FULL_MAX bytes with
 *     CRLF-only lines of at most 998 octets;
 *   - its header section otherwise (text/rfc822-headers, at most
 *     DSN_HEADERS_MAX bytes, cut at a line end). So RET unspecified means
 *     headers: a bulk relay's senders are programs that need the headers
 *     to match the bounce, and the body would double the traffic.
 *     Delayed and success notices never carry the body.
 * If orig->smtputf8 and an address or the returned header section is not
 * ASCII, the RFC 6533 types are used (message/global-delivery-status,
 * message/global-headers or message/global) and *needs gets SMTPUTF8.
 *
 * Pure: no I/O but reading orig_fd, no clock. needs may be NULL. Returns
 * 0, -EINVAL (n == 0, a null sender, an unknown action or a malformed
 * status: a bug in the caller), or -errno from reading; out is unchanged
 * on failure.
 */
int dsn_build(struct buf *out, const char *reporting_mta,
    const struct envelope *orig, const struct dsn_rcpt *rcpts, size_t n,
    int orig_fd, int64_t now, const char *boundary_seed, unsigned *needs);

/*
 * dsn_wanted - whether to send a DSN with this action ("failed",
 * "delayed", "delivered", "relayed", "expanded") about recipient rc of
 * orig (RFC 3461 4.1). Never for a null sender (no bounce of a bounce) or
 * NOTIFY=NEVER. "failed": NOTIFY unset, or it has FAILURE. "delayed":
 * NOTIFY has DELAY, or NOTIFY is unset and delay_by_default (the
 * configuration's choice). Success actions: NOTIFY has SUCCESS.
 */
bool dsn_wanted(const struct envelope *orig, const struct env_rcpt *rc,
    const char *action, bool delay_by_default);

#endif
