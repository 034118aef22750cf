/*
 * envelope.h - the envelope record: who sent a message to whom, and what has
 * happened to each recipient so far.
 *
 * On disk it is versioned, human-readable "key: value" text, one recipient
 * per "rcpt:" line with its delivery state as space-separated key=value
 * fields. Values that may hold spaces or odd bytes are xtext-encoded
 * (RFC 3461: '+' followed by two upper-case hex digits), so every line
 * splits on spaces without a quoting language. Pure functions, no I/O.
 *
 *   version: 1
 *   id: 6743a1f0000a3c7e
 *   created: 1732425600
 *   size: 2048
 *   from: <alice@example.com>
 *   ...
 *   rcpt: <bob@example.net> state=pending attempts=0 next=0 notify=failure
 */
#ifndef RELAY_ENVELOPE_H
#define RELAY_ENVELOPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/util.h"

#define ENVELOPE_VERSION 1
#define ENVELOPE_ID_LEN 16	/* hex digits in a queue id */

enum env_body {
	ENV_BODY_7BIT,		/* no BODY= or BODY=7BIT */
	ENV_BODY_8BITMIME,	/* BODY=8BITMIME */
	ENV_BODY_BINARYMIME,	/* BODY=BINARYMIME (BDAT only) */
};

enum env_rcpt_state {
	ENV_RCPT_PENDING,	/* not yet delivered, will be tried */
	ENV_RCPT_SENT,		/* a receiver accepted it: final */
	ENV_RCPT_BOUNCED,	/* failed permanently or expired: final */
	ENV_RCPT_STATE_LAST
};

/* RFC 3461 NOTIFY= flags; 0 means "not given" (default: failure) */
#define ENV_NOTIFY_NEVER	0x01
#define ENV_NOTIFY_SUCCESS	0x02
#define ENV_NOTIFY_FAILURE	0x04
#define ENV_NOTIFY_DELAY	0x08

enum env_ret {
	ENV_RET_UNSPEC,		/* RET= not given */
	ENV_RET_FULL,		/* RET=FULL */
	ENV_RET_HDRS,		/* RET=HDRS */
};

struct env_rcpt {
	char *addr;		/* mailbox without angle brackets, UTF-8 allowed */
	char *orcpt;		/* RFC 3461 ORCPT= value or NULL */
	int notify;		/* ENV_NOTIFY_* mask, 0 if not given */
	enum env_rcpt_state state;	/* see enum env_rcpt_state */
	int attempts;		/* delivery attempts made (throttles excluded) */
	int64_t next_attempt;	/* wall-clock seconds; 0 = as soon as possible */
	int64_t updated;	/* wall-clock seconds of the last state change */
	char *last_reply;	/* last receiver reply or error text, or NULL */
	bool warned;		/* a "delayed" DSN was sent for it */
	int greylists;		/* greylisting deferrals so far */
};

struct envelope {
	int version;		/* record format version read or written */
	char id[ENVELOPE_ID_LEN + 1];	/* queue id, lower-case hex */
	int64_t created;	/* wall-clock seconds when it was queued */
	uint64_t size;		/* body bytes on disk */
	char *sender;		/* reverse path without brackets; "" = null */
	char *helo;		/* client's EHLO/HELO argument */
	char *client_addr;	/* client IP address as text */
	char *auth_user;	/* authenticated login or NULL */
	enum env_body body;	/* BODY= parameter */
	bool smtputf8;		/* SMTPUTF8 was given */
	char *envid;		/* RFC 3461 ENVID= or NULL */
	enum env_ret ret;	/* RFC 3461 RET= */
	struct env_rcpt *rcpts;	/* array of nrcpts */
	size_t nrcpts;
};

/* envelope_init - zero a struct; envelope_free releases what it owns */
void envelope_init(struct envelope *env);
void envelope_free(struct envelope *env);

/*
 * envelope_copy - make dst a deep copy of src: every string and the
 * recipient array are fresh heap blocks, so either may be freed or
 * changed without touching the other. dst is overwritten, not freed:
 * envelope_free() it first if it owned anything. Aborts on OOM.
 */
void envelope_copy(struct envelope *dst, const struct envelope *src);

/* envelope_add_rcpt - append a pending recipient; returns it */
struct env_rcpt *envelope_add_rcpt(struct envelope *env, const char *addr);

/* envelope_format - append the record to out */
void envelope_format(const struct envelope *env, struct buf *out);

/*
 * envelope_parse - parse a record. Returns 0, or RELAY_ECORRUPT with err
 * naming the line and the problem. Unknown keys in a record of a known
 * version are corruption; a newer version is refused.
 */
int envelope_parse(const char *text, size_t len, struct envelope *env,
    char *err, size_t errlen);

/* envelope_is_done - true when every recipient is in a final state */
bool envelope_is_done(const struct envelope *env);

const char *env_rcpt_state_name(enum env_rcpt_state st);

/* xtext - RFC 3461 encoding used for values; decode returns NULL if invalid */
void xtext_encode(struct buf *out, const char *s);
char *xtext_decode(const char *s, size_t len);

#endif
