/*
 * site.h - the adaptive throttle of one destination site (DESIGN.md
 * "Adaptive throttling"): how many connections it may have open, how many
 * messages per second it may be sent, whether it is suspended, and which
 * of its MX hosts are down.
 *
 * A pure module: no libuv, no I/O, no logging. Every call is given the
 * time, so the unit tests drive it with a simulated clock, and it never
 * polls: site_may_connect() and site_take_token() say when to ask again,
 * site_report() says what changed (SITE_FX_*), and the caller logs and
 * arms its one timer from that (STYLE.md 12). This header is the whole
 * interface the scheduler uses (take a connection slot, take a rate token,
 * report a signal, read the state), so a shared Redis-backed site for
 * several nodes can replace the in-process one (DESIGN.md "Scale-out").
 *
 * TIME. Every "now" and every absolute time here is wall-clock
 * milliseconds (time_wall()-based, like the scheduler's due times),
 * because the state is persisted and must mean the same after a reboot;
 * a monotonic clock restarts at boot. A clock that steps back by more than
 * a second is detected and the site's own deadlines are moved with it.
 *
 * MODES AND THE ALLOWED TRANSITIONS (the only ones site.c makes):
 *
 *	NORMAL    -> THROTTLED	a throttle signal cut the limits
 *	THROTTLED -> THROTTLED	another cut (at most one per decrease window)
 *	THROTTLED -> NORMAL	additive recovery reached both ceilings, or
 *				a reload lowered them to the current values
 *	NORMAL    -> SUSPENDED	a suspend signal (reputation block)
 *	THROTTLED -> SUSPENDED	a suspend signal
 *	SUSPENDED -> PROBING	the suspension ended (noticed by any call)
 *	PROBING   -> THROTTLED	the probe delivered: limits restart at the
 *				floors and recover additively
 *	PROBING   -> NORMAL	the same when the floors are the ceilings
 *	PROBING   -> SUSPENDED	the probe was throttled or suspended again:
 *				a longer suspension
 *
 * A throttle signal while SUSPENDED, and a suspend signal while SUSPENDED
 * (replies from connections opened before the suspension), do not escalate:
 * a burst from N connections is one event. A suspend hint may lengthen the
 * current suspension.
 *
 * Errors follow STYLE.md 9: 0 or a negative code (RELAY_ECORRUPT,
 * RELAY_ECONFIG); predicates return bool. Allocation aborts (xmalloc).
 */
#ifndef RELAY_SITE_H
#define RELAY_SITE_H

#include <stdbool.h>
#include <stdint.h>

#include "config/util.h"

#define SITE_STATE_VERSION	1	/* v= of site_serialize() lines */
#define SITE_NEVER		INT64_MAX	/* "no time: wait for an event" */
#define SITE_REPLY_MAX		512	/* bytes of a reply text remembered */
#define SITE_HOST_KEY_MAX	128	/* bytes of a host key, NUL included */
#define SITE_MAX_HOSTS		16	/* hosts with failures remembered */

/* The operator's limits of a site (from the configuration). */
struct site_limits {
	int max_conn;			/* connection ceiling (>= min_conn) */
	double max_rate;		/* message rate ceiling, msgs/s */
	int min_conn;			/* connection floor (>= 1) */
	double min_rate;		/* message rate floor, msgs/s (> 0) */
	int64_t decrease_window_ms;	/* at most one decrease per window */
	int64_t increase_every_ms;	/* one additive step per clean interval */
	double rate_step;		/* full additive step, fraction of
					   max_rate (0 < step <= 1) */
	double decrease_factor;		/* multiplicative cut, 0 < f < 1 */
	int64_t suspend_base_ms;	/* first suspension */
	int64_t suspend_max_ms;		/* longest suspension; also the quiet
					   time that resets the escalation */
	int64_t host_down_ms;		/* an MX host's first down period */
	double conn_rate;		/* new connections per second, with a
					   burst of max_conn (0: no limit) */
};

enum site_mode {
	SITE_NORMAL,		/* at the ceilings */
	SITE_THROTTLED,		/* below a ceiling, recovering additively */
	SITE_SUSPENDED,		/* no connections until suspended_until */
	SITE_PROBING,		/* suspension over: one connection, to see */
	SITE_MODE_LAST
};

enum site_signal {
	SITE_SIG_OK,		/* a transaction was delivered (one per
				   message, whatever its recipient count) */
	SITE_SIG_THROTTLE,	/* 421 / rate or connection limit replies */
	SITE_SIG_SUSPEND,	/* reputation block: stop for a while */
	SITE_SIG_CONN_FAIL,	/* connections refused or timing out while
				   the site is up (see site_report) */
	SITE_SIG_LAST
};

/* site_may_connect() mask: which limits are hit */
#define SITE_LIMIT_CONN		0x01	/* connection limit reached */
#define SITE_LIMIT_RATE		0x02	/* no rate token available now */
#define SITE_LIMIT_SUSPENDED	0x04	/* suspended until *next */
#define SITE_LIMIT_PROBE	0x08	/* one connection at a time: probing
					   after a suspension, or in a throttle
					   episode, and one is open */
#define SITE_LIMIT_HOLD		0x10	/* held: a throttle's backoff, or the
					   receiver's "come back later" */
#define SITE_LIMIT_CONN_RATE	0x20	/* over the connection rate */

/* site_report() result: what the signal changed */
#define SITE_FX_DECREASE	0x01	/* limits were cut */
#define SITE_FX_INCREASE	0x02	/* limits went up one step: more may
					   be allowed now, dispatch again */
#define SITE_FX_SUSPEND		0x04	/* a suspension began or was extended */
#define SITE_FX_MODE		0x08	/* the mode changed */
#define SITE_FX_HOLD		0x10	/* a hint set or extended the hold */
#define SITE_FX_RESUME		0x20	/* a throttle episode ended: more
					   than one connection again */

struct site;

/* site_limits_default - fill lim with the built-in defaults */
void site_limits_default(struct site_limits *lim);

/*
 * site_limits_check - 0 if lim is usable, else RELAY_ECONFIG with *why set
 * to a static reason. site_new() and friends assert this.
 */
int site_limits_check(const struct site_limits *lim, const char **why);

/*
 * site_new - a site that has learned nothing yet. It starts at the
 * ceilings: the configured values are the operator's intent and decreases
 * are immediate (KumoMTA does the same; Postfix starts at 5 and grows).
 * The limits are copied. Never NULL.
 */
struct site *site_new(const char *name, const struct site_limits *lim,
    int64_t now);

/* site_free - free a site; NULL is fine */
void site_free(struct site *s);

/*
 * site_set_limits - adopt new limits on reload without forgetting what was
 * learned: current values are clamped into the new [floor, ceiling]. A
 * NORMAL site (nothing learned against it) moves to the new ceilings; a
 * THROTTLED one keeps its values and recovers toward the new ceilings.
 * Suspensions and holds stay as they are.
 */
void site_set_limits(struct site *s, const struct site_limits *lim,
    int64_t now);

/*
 * site_may_connect - may the caller open one more connection now, with
 * active_conns already open (or being opened) to this site? Returns 0 if
 * so, else a mask of SITE_LIMIT_*. *next (if not NULL) is when the
 * time-based limits in the mask lift (the latest of them, as the answer
 * cannot be 0 before), SITE_NEVER if only CONN/PROBE are hit (ask again
 * when a connection closes), or now when the mask is 0. A rate token is
 * only looked at, not taken.
 */
unsigned site_may_connect(struct site *s, int active_conns, int64_t now,
    int64_t *next);

/*
 * site_conn_open - a connection to the site is being opened: take one
 * connection-rate token (GCRA, a burst of max_conn), even if none is due
 * (an MX fallback within a session): the next ones wait longer.
 */
void site_conn_open(struct site *s, int64_t now);

/*
 * site_take_token - take one message-rate token (GCRA: one message every
 * 1/rate s, with a burst of one second's worth, at least one message).
 * false if none is available now (or the site is suspended or held), with
 * *next the earliest time one will be.
 */
bool site_take_token(struct site *s, int64_t now, int64_t *next);

/*
 * site_report - the controller. Feed it what happened; it returns the
 * SITE_FX_* it caused.
 *  OK: counted; after increase_every_ms without a throttle signal, one
 *	additive step (+1 connection, + a rate step); in PROBING, the end of
 *	the probe.
 *  THROTTLE: both knobs down, at most once per decrease_window_ms: the
 *	first throttle within an interval of a step undoes the step, any
 *	other is a multiplicative cut from what was in use (site.c says
 *	why); in PROBING, a new (longer) suspension.
 *  SUSPEND: a suspension, doubling with consecutive ones.
 *  CONN_FAIL: the connection knob alone goes down (as for THROTTLE,
 *	windowed). Report it for a refusal or timeout while other
 *	connections to the site work (a receiver over its connection
 *	limit); a dead MX host is site_host_down()'s business and moves
 *	nothing here.
 * hint_s > 0 is the receiver's "come back in N seconds": a THROTTLE or
 * CONN_FAIL holds new connections and tokens until now + hint, a SUSPEND
 * lasts at least that long (hints are capped at suspend_max_ms).
 * reply_text (may be NULL) of a THROTTLE or SUSPEND is remembered, cut
 * at SITE_REPLY_MAX bytes, with its time.
 */
unsigned site_report(struct site *s, enum site_signal sig, int64_t now,
    int hint_s, const char *reply_text);

/*
 * site_answered - the receiver answered a transaction without a throttle
 * but delivered nothing (greylisted, deferred, bounced): like a delivery
 * it ends a throttle episode whose hold is over (the probe got through),
 * but it counts for nothing else (no increase). Returns SITE_FX_*.
 */
unsigned site_answered(struct site *s, int64_t now);

/*
 * site_host_down - a connection to the MX host host_key (e.g. its address)
 * failed: mark that host down. The first failure takes it down for
 * host_down_ms, each failure after the host came back doubles that, up to
 * 8 times host_down_ms. Failures while it is down change nothing, so a
 * burst of failures of concurrent connections is one (Postfix's cohort
 * idea, per host). The site's limits and the messages are not touched.
 */
void site_host_down(struct site *s, const char *host_key, int64_t now);

/*
 * site_learn_msgs_per_conn - the receiver refused the (n+1)-th message of
 * a connection as one too many for a connection ("Max message per
 * connection reached"): from now on at most n per connection (the lowest
 * seen; persisted), until 24 h pass without another such reply (limits
 * change; a misread reply must not pin the site for good). Returns
 * SITE_FX_DECREASE if that lowered it, else 0; n < 1 is ignored (the
 * caller treats that reply as a throttle).
 */
unsigned site_learn_msgs_per_conn(struct site *s, int n, int64_t now);

/* site_msgs_per_conn - the learned limit at now, 0 if none */
int site_msgs_per_conn(const struct site *s, int64_t now);

/* site_host_up - a connection to host_key worked: forget its failures */
void site_host_up(struct site *s, const char *host_key);

/* site_host_is_down - is host_key down at now? *until (if not NULL) is when it is back */
bool site_host_is_down(const struct site *s, const char *host_key,
    int64_t now, int64_t *until);

/* Accessors: the state as of the last call that was given a time. */
const char *site_name(const struct site *s);
int site_conn_limit(const struct site *s);
double site_rate(const struct site *s);
enum site_mode site_mode(const struct site *s);
int64_t site_suspended_until(const struct site *s);	/* 0 if never */
int site_suspensions(const struct site *s);	/* consecutive, escalation */
const char *site_mode_name(enum site_mode mode);

/*
 * site_to_json - append a JSON object for relayctl: limits against their
 * ceilings, mode (as of now), suspension end, hold, last throttle reply
 * and time, recent signal counts, hosts down. Times are wall-clock ms.
 * The caller adds what the site does not know (messages waiting).
 */
void site_to_json(const struct site *s, int64_t now, struct buf *out);

/* site_to_text - append a one-line key=value summary for logs */
void site_to_text(const struct site *s, struct buf *out);

/*
 * site_serialize - append the persistent state as one line of
 * space-separated key=value text, newline included, starting with
 * "v=1 name=...". Strings are xtext; times are wall-clock ms.
 */
void site_serialize(const struct site *s, struct buf *out);

/*
 * site_parse - rebuild a site from one site_serialize() line (with or
 * without its newline) under the limits lim, which may differ from those
 * it was saved with: values are clamped as site_set_limits() does, an
 * expired suspension becomes PROBING, an expired hold is dropped.
 * Returns 0 and a new *out, or RELAY_ECORRUPT (unknown or repeated key,
 * bad value, newer version) and *out = NULL.
 */
int site_parse(const char *line, const struct site_limits *lim,
    struct site **out, int64_t now_wall_ms);

#endif
