/*
 * NAME
 *	site.c - adaptive throttle of one destination site
 *
 * SUMMARY
 *	Two knobs, the connection limit and the message rate, move together:
 *	down at once and multiplicatively on a throttle reply, up slowly and
 *	additively on clean deliveries, between the operator's floors and
 *	ceilings. A suspension stops the site for a time that doubles with
 *	repeated suspensions, then one probe connection decides. MX hosts
 *	that fail to connect are marked down, not the site or the message.
 *
 * DESCRIPTION
 *	Decrease. A THROTTLE moves both knobs down at once, at most once per
 *	decrease_window_ms, so a burst of 421s on ten connections is one
 *	decrease. Which decrease depends on what the site knows:
 *	 - Within two intervals of an additive step, the first throttle
 *	   undoes that step: the values before it were clean for a whole
 *	   interval and these are not, so the receiver's limit lies in
 *	   between (against a quota per minute the refusal can come a
 *	   minute after the step). This keeps the site near a fixed limit.
 *	 - Otherwise (a throttle out of the blue, or one that persists a
 *	   window after an undo: the receiver changed) the cut is
 *	   multiplicative, by decrease_factor, from what was in use rather
 *	   than from the limit: the connection knob from the most
 *	   connections seen since the last cut, the rate knob from the rate
 *	   tokens were taken at since the rate last changed, time held left
 *	   out (when lower than the limit). Cutting an unused limit would
 *	   take several windows, and several bursts of 421s, to bite.
 *	The rate throttled at is remembered as rate_th.
 *
 *	Hold. A throttle also holds the site: no new connection or token
 *	for 1 s, doubling with each refusal that comes after a hold, up to
 *	5 min (or the receiver's hint); refusals during a hold were sent
 *	before it and count once. After a hold, one connection and one
 *	message ask whether the receiver takes mail again (make
 *	bench-throttle saw the 5 connections allowed after each hold all
 *	refused at once); a delivery after a hold ends the episode.
 *	Without the hold, requeued recipients are offered again at once and
 *	a receiver with a quota per window refuses them all until the
 *	window ends (make bench-throttle: 89.7 % of transactions answered
 *	421); with it, a window of W s costs about log2(W) refusals. Cuts
 *	later in an episode are from the limit: only probes were sent.
 *
 *	Accepted rate. An episode with refusals after a hold means a quota
 *	per window. At its end the rate drops (if higher) to what the
 *	receiver accepted over the cycle: deliveries since the previous
 *	episode ended (or since work began after an idle minute) over the
 *	time since then, refusals and holds included; rate_th becomes 1.25
 *	times that, so the search goes on from there, not back toward the
 *	burst that was refused. A single refusal (a token bucket refilled
 *	during the first hold, a passing 421) says nothing about a window.
 *
 *	Increase. One step per increase_every_ms in which no throttle signal
 *	came and a delivery did: +1 connection, and + rate_step * max_rate,
 *	except that below rate_th the step is half the remaining distance to
 *	rate_th (at least 1/8 of a full step, or rate_th / 80 if smaller): a
 *	binary search back toward the rate that was throttled, as BIC-TCP
 *	does, then full steps beyond it. A step is taken on the OK report
 *	that completes the interval; a long idle gap is still one step,
 *	never a snap back. Both knobs at their ceilings is NORMAL.
 *
 *	Why. Against a receiver that allows R msgs/s, plain AIMD (halve,
 *	+10 % of the ceiling a minute) is a sawtooth between R/2 and R: the
 *	simulation of test_site.c accepted 0.75 R (per-minute receiver) and
 *	0.61 R (strict token bucket). The binary search alone gave 0.82 R;
 *	with the undo, 0.99 R and 0.97 R, with 0.06 % of transactions
 *	answered 421 once converged. The hold costs the token bucket a
 *	little (0.89 R, each refusal idles a second); against a quota per
 *	fixed minute (Postfix's anvil), 300 messages drain in 1.02 x N/R
 *	with 2 % answered 421 (test_site.c, fixed_window_drain). Cutting to
 *	the rate accepted in the last decrease window, the other candidate,
 *	compounds downward against a strict receiver (each cut a fraction of
 *	what was accepted while already below the limit); the accepted rate
 *	is taken over a whole accept-and-refuse cycle instead.
 *
 *	Suspension. The n-th consecutive suspension lasts suspend_base_ms *
 *	2^(n-1), at most suspend_max_ms, or the receiver's hint if longer
 *	(hints too are capped at suspend_max_ms). n resets after
 *	suspend_max_ms without a suspension. Entering it sets both knobs to
 *	the floors. The end is noticed lazily by whichever call comes first
 *	at or after it (the caller's timer is armed for it from *next); the
 *	site is then PROBING: one connection at the floor rate. Its first
 *	delivery makes the site THROTTLED at the floors, recovering
 *	additively; a throttle or suspension makes it SUSPENDED again, for
 *	longer.
 *
 *	Counting. The signals are counted in rings of six 10-minute buckets
 *	(relayctl's "recent": the last 50-60 min), indexed by bucket number
 *	(time / bucket length), so they need no timer and persist as they
 *	are. The undo and the rate in use are short-lived and not persisted:
 *	after a restart the first cut is multiplicative from the limit.
 *
 * ERRORS
 *	Invalid limits are a caller bug (assert); the configuration checks
 *	them with site_limits_check(). site_parse() returns RELAY_ECORRUPT
 *	for a line it does not fully understand. Allocation aborts.
 */
#include <assert.h>
#include <inttypes.h>
#include <math.h>		/* isfinite only: no -lm */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/util.h"
#include "queue/envelope.h"
#include "relay/site.h"

#define SITE_RING_N		6	/* buckets per ring */
#define SITE_RECENT_BUCKET_MS	600000	/* recent signals: 6 x 10 min */
#define SITE_MIN_SPAN_MS	1000	/* shortest span a rate is measured on */
#define SITE_BURST_MS		1000	/* token burst: this long at the rate */
#define SITE_FINE_DIV		8	/* smallest step: full step / this, */
#define SITE_FINE_TH_DIV	80	/* or rate_th / this if smaller */
#define SITE_EST_HEADROOM	1.25	/* rate_th after an episode: its
					   accepted rate times this */
#define SITE_HOST_MAX_SHIFT	3	/* host down at most 2^3 x host_down_ms */
#define SITE_CLOCK_SLACK_MS	1000	/* a step back beyond this is a clock step */
#define SITE_DURATION_MAX_MS	(30LL * 86400 * 1000)	/* no overflow in time sums */
#define SITE_RATE_MAX		1e6	/* msgs/s: sane, and no overflow */
#define SITE_BACKOFF_BASE_MS	1000	/* first hold of a throttle episode */
#define SITE_BACKOFF_MAX_MS	300000	/* longest hold without a hint */
#define SITE_IDLE_MS		60000	/* no token this long: a new cycle */
#define SITE_MPC_FORGET_MS	(24LL * 3600 * 1000)	/* a learned messages per
					   connection lasts this long after
					   the last reply that taught it */

/* A count per time bucket, the newest at head. */
struct site_ring {
	int64_t head;			/* bucket number of the newest bucket */
	uint32_t cnt[SITE_RING_N];	/* counts, bucket b in cnt[b % N] */
};

/* An MX host that failed to connect. */
struct site_host {
	char key[SITE_HOST_KEY_MAX];	/* caller's key (address); "" = free */
	int64_t until;			/* down until this time */
	int fails;			/* failed periods in a row (>= 1) */
};

struct site {
	char *name;			/* site name (MX rollup key), heap */
	struct site_limits lim;		/* floors, ceilings, pacing (a copy) */
	enum site_mode mode;		/* see site.h; set by site_enter_mode only */
	int64_t mode_since;		/* when mode was entered */
	int conn;			/* current connection limit */
	double rate;			/* current message rate, msgs/s */
	double rate_th;			/* rate last throttled at (in use at a
					   cut, or the step undone); increases
					   slow down below it (0: none) */
	double tat;			/* GCRA theoretical arrival time, ms */
	double conn_tat;		/* the same for new connections */
	int64_t last_decrease;		/* time of the last cut (0: never) */
	int64_t step_from;		/* start of the current recovery interval:
					   the last cut, step, throttle signal or
					   probe success */
	int64_t hold_until;		/* nothing new before this: a hint, or the
					   throttle backoff (0: none) */
	int64_t hold_from;		/* start of the current or last hold */
	int64_t held_ms;		/* time held since rate_since, before the
					   hold that began at hold_from */
	int64_t backoff_ms;		/* in a throttle episode: the last hold
					   without a hint (0: no episode) */
	int refusals;			/* throttles of the episode, not counting
					   those of one burst */
	int64_t probe_at;		/* in an episode: when the one token
					   allowed after the hold was taken */
	int msgs_per_conn;		/* learned messages per connection
					   (0: none) */
	int64_t mpc_at;			/* when it was last confirmed */
	int64_t cycle_start;		/* start of the accept cycle: the first
					   token after an episode ended or after
					   an idle spell (0: none yet) */
	uint32_t cycle_ok;		/* deliveries since cycle_start */
	int64_t last_token;		/* when the last token was taken */
	int64_t suspended_until;	/* end of the current or last suspension
					   (0: never suspended) */
	int suspensions;		/* consecutive suspensions (escalation) */
	int64_t last_signal_at;		/* time of the last THROTTLE or SUSPEND */
	enum site_signal last_sig;	/* which one it was */
	char last_reply[SITE_REPLY_MAX];	/* its reply text, "" if none */
	int last_active;		/* connections at the last may_connect,
					   counting the one it allowed */
	int peak_active;		/* most of those since the last cut (-1:
					   not seen: the limit is the estimate) */
	int64_t undo_at;		/* time of the last step, 0 once a cut
					   followed it */
	int undo_conn;			/* connection limit before that step */
	double undo_rate;		/* rate before that step */
	int64_t rate_since;		/* when the rate last changed (or the
					   site was created, restored) */
	uint32_t sent_since;		/* tokens taken since rate_since */
	struct site_ring recent[SITE_SIG_LAST];	/* signals, 10 min buckets */
	int64_t seen;			/* latest time given (clock step check) */
	struct site_host hosts[SITE_MAX_HOSTS];	/* hosts with failures */
};

static const char *const site_mode_names[] = {
	[SITE_NORMAL] = "normal",
	[SITE_THROTTLED] = "throttled",
	[SITE_SUSPENDED] = "suspended",
	[SITE_PROBING] = "probing",
};
_Static_assert(ARRAY_SIZE(site_mode_names) == SITE_MODE_LAST, "mode names");

static const char *const site_sig_names[] = {
	[SITE_SIG_OK] = "ok",
	[SITE_SIG_THROTTLE] = "throttle",
	[SITE_SIG_SUSPEND] = "suspend",
	[SITE_SIG_CONN_FAIL] = "conn_fail",
};
_Static_assert(ARRAY_SIZE(site_sig_names) == SITE_SIG_LAST, "signal names");

static void site_ring_add(struct site_ring *, int64_t, int64_t, uint32_t);
static uint32_t site_ring_sum(const struct site_ring *, int64_t, int64_t);
static void site_clock(struct site *, int64_t);
static unsigned site_enter_mode(struct site *, enum site_mode, int64_t);
static void site_set_rate(struct site *, double, int64_t);
static void site_adopt(struct site *, int64_t);
static double site_rate_in_use(const struct site *, int64_t);
static unsigned site_cut(struct site *, bool, bool, int64_t);
static unsigned site_step(struct site *, int64_t);
static unsigned site_suspend(struct site *, int64_t, int64_t);
static unsigned site_hold(struct site *, int64_t, int64_t);
static int64_t site_held(const struct site *, int64_t);
static unsigned site_throttled(struct site *, int64_t, int64_t);
static unsigned site_episode_end(struct site *, int64_t);
static int64_t site_hint_ms(const struct site *, int);
static bool site_gcra(struct site *, int64_t, bool, int64_t *);
static bool site_conn_gcra(struct site *, int64_t, bool, int64_t *);
static int site_host_index(const struct site *, const char *);
static enum site_mode site_mode_at(const struct site *, int64_t);

/* site_limits_default - fill lim with the built-in defaults */
void
site_limits_default(struct site_limits *lim)
{
	/* KumoMTA's default shaping (10 connections, 100 msgs/s), its
	 * backoff floor (1 connection, 1 msg/min), Momentum's 60 s pacing
	 * and 4 h suspension, Postfix's 300 s minimal backoff for hosts. */
	lim->max_conn = 10;
	lim->max_rate = 100.0;
	lim->min_conn = 1;
	lim->min_rate = 1.0 / 60.0;
	lim->decrease_window_ms = 30 * 1000;
	lim->increase_every_ms = 60 * 1000;
	lim->rate_step = 0.1;
	lim->decrease_factor = 0.5;
	lim->suspend_base_ms = 15 * 60 * 1000;
	lim->suspend_max_ms = 4 * 3600 * 1000;
	lim->host_down_ms = 300 * 1000;
	lim->conn_rate = 0;		/* none: the configuration sets it */
}

/* site_limits_check - 0 if lim is usable, else RELAY_ECONFIG and *why */
int
site_limits_check(const struct site_limits *lim, const char **why)
{
	const char *w = NULL;

	if (lim->min_conn < 1)
		w = "min_conn must be at least 1";
	else if (lim->max_conn < lim->min_conn)
		w = "max_conn must be at least min_conn";
	else if (!(lim->min_rate > 0) || !(lim->max_rate <= SITE_RATE_MAX))
		w = "min_rate must be above 0 and max_rate at most 1e6/s";
	else if (lim->max_rate < lim->min_rate)
		w = "max_rate must be at least min_rate";
	else if (lim->decrease_window_ms < 0 || lim->increase_every_ms < 1)
		w = "decrease_window must be >= 0 and increase_every > 0";
	else if (!(lim->rate_step > 0 && lim->rate_step <= 1))
		w = "rate_step must be in (0, 1]";
	else if (!(lim->decrease_factor > 0 && lim->decrease_factor < 1))
		w = "decrease_factor must be in (0, 1)";
	else if (lim->suspend_base_ms < 1 || lim->suspend_max_ms < lim->suspend_base_ms)
		w = "suspensions need 0 < suspend_base <= suspend_max";
	else if (lim->host_down_ms < 1)
		w = "host_down must be above 0";
	else if (lim->suspend_max_ms > SITE_DURATION_MAX_MS ||
	    lim->host_down_ms > SITE_DURATION_MAX_MS ||
	    lim->decrease_window_ms > SITE_DURATION_MAX_MS ||
	    lim->increase_every_ms > SITE_DURATION_MAX_MS)
		w = "durations must be at most 30 days";
	else if (!(lim->conn_rate >= 0) || lim->conn_rate > SITE_RATE_MAX)
		w = "conn_rate must be 0 (none) or at most 1e6/s";
	if (why)
		*why = w;
	return w ? RELAY_ECONFIG : 0;
}

/* site_new - a new site at the ceilings */
struct site *
site_new(const char *name, const struct site_limits *lim, int64_t now)
{
	struct site *s = xcalloc(1, sizeof *s);

	assert(site_limits_check(lim, NULL) == 0);
	assert(name != NULL && now >= 0);
	s->name = xstrdup(name);
	s->lim = *lim;
	s->mode = SITE_NORMAL;
	s->mode_since = now;
	s->conn = lim->max_conn;
	s->rate = lim->max_rate;
	s->tat = (double)now;
	s->step_from = now;
	s->last_sig = SITE_SIG_THROTTLE;
	s->peak_active = -1;
	s->rate_since = now;
	s->seen = now;
	return s;
}

/* site_free - free a site */
void
site_free(struct site *s)
{
	if (s == NULL)
		return;
	free(s->name);
	free(s);
}

/* site_set_limits - new limits on reload, learned state kept */
void
site_set_limits(struct site *s, const struct site_limits *lim, int64_t now)
{
	assert(site_limits_check(lim, NULL) == 0);
	site_clock(s, now);
	s->lim = *lim;
	site_adopt(s, now);
}

/* site_may_connect - 0 or the SITE_LIMIT_* mask, and when to ask again */
unsigned
site_may_connect(struct site *s, int active_conns, int64_t now, int64_t *next)
{
	unsigned mask = 0;
	int64_t lift = now, t;

	site_clock(s, now);
	if (s->mode == SITE_SUSPENDED) {
		if (next)
			*next = s->suspended_until;
		return SITE_LIMIT_SUSPENDED;
	}
	if (s->hold_until > now) {
		mask |= SITE_LIMIT_HOLD;
		lift = s->hold_until;
	}
	if (s->mode == SITE_PROBING || s->backoff_ms != 0) {
		/* After a suspension, or a throttle's hold: one at a time. */
		if (active_conns >= 1)
			mask |= SITE_LIMIT_PROBE;
	} else if (active_conns >= s->conn) {
		mask |= SITE_LIMIT_CONN;
	}
	if (!site_gcra(s, now, false, &t)) {
		mask |= SITE_LIMIT_RATE;
		if (t > lift)
			lift = t;
	}
	if (!site_conn_gcra(s, now, false, &t)) {
		mask |= SITE_LIMIT_CONN_RATE;
		if (t > lift)
			lift = t;
	}

	/* What is in use is what the next cut starts from. */
	s->last_active = active_conns + (mask == 0 ? 1 : 0);
	if (s->last_active > s->peak_active)
		s->peak_active = s->last_active;

	if (next) {
		if (mask == 0)
			*next = now;
		else if (mask & (SITE_LIMIT_HOLD | SITE_LIMIT_RATE |
		    SITE_LIMIT_CONN_RATE))
			*next = lift;
		else
			*next = SITE_NEVER;
	}
	return mask;
}

/* site_conn_open - take a connection-rate token (see site.h) */
void
site_conn_open(struct site *s, int64_t now)
{
	int64_t t;

	site_clock(s, now);
	if (s->lim.conn_rate > 0 && !site_conn_gcra(s, now, true, &t))
		s->conn_tat += 1000.0 / s->lim.conn_rate;	/* in debt */
}

/* site_take_token - take one message-rate token, or say when */
bool
site_take_token(struct site *s, int64_t now, int64_t *next)
{
	int64_t t;

	site_clock(s, now);
	if (s->mode == SITE_SUSPENDED) {
		if (next)
			*next = s->suspended_until;
		return false;
	}
	if (s->hold_until > now) {
		if (next)
			*next = s->hold_until;
		return false;
	}
	/* In a throttle episode one message tells whether the receiver
	 * takes mail again: the next waits for its outcome (a new hold or
	 * the end of the episode), or a backoff if none comes. */
	if (s->backoff_ms != 0 && s->probe_at >= s->hold_until &&
	    now < s->probe_at + s->backoff_ms) {
		if (next)
			*next = s->probe_at + s->backoff_ms;
		return false;
	}
	if (!site_gcra(s, now, true, &t)) {
		if (next)
			*next = t;
		return false;
	}
	s->sent_since++;
	if (s->backoff_ms != 0)
		s->probe_at = now;
	/* A new accept cycle after an idle spell: the rate a receiver
	 * accepts is measured while we have work for it. */
	if (s->backoff_ms == 0 && (s->cycle_start == 0 ||
	    now - s->last_token > SITE_IDLE_MS)) {
		s->cycle_start = now;
		s->cycle_ok = 0;
	}
	s->last_token = now;
	if (next)
		*next = now;
	return true;
}

/* site_report - feed one signal to the controller; returns SITE_FX_* */
unsigned
site_report(struct site *s, enum site_signal sig, int64_t now, int hint_s,
    const char *reply_text)
{
	unsigned fx = 0;
	int64_t hint = site_hint_ms(s, hint_s);

	assert(sig >= 0 && sig < SITE_SIG_LAST);
	site_clock(s, now);
	site_ring_add(&s->recent[sig], SITE_RECENT_BUCKET_MS, now, 1);
	if (sig == SITE_SIG_THROTTLE || sig == SITE_SIG_SUSPEND) {
		s->last_signal_at = now;
		s->last_sig = sig;
		str_copy(s->last_reply, reply_text ? reply_text : "",
		    sizeof s->last_reply);
	}
	/* A throttle's hint is site_throttled()'s, as the hold it sets
	 * also tells a new refusal from one of the same burst. */
	if (hint > 0 && (sig == SITE_SIG_CONN_FAIL || (sig == SITE_SIG_THROTTLE &&
	    (s->mode == SITE_SUSPENDED || s->mode == SITE_PROBING))))
		fx |= site_hold(s, now + hint, now);

	switch (sig) {
	case SITE_SIG_OK:
		/* A delivery after the hold (one during it was sent before)
		 * ends the episode. */
		if (s->backoff_ms != 0 && now >= s->hold_until)
			fx |= site_episode_end(s, now);
		s->cycle_ok++;
		if (s->mode == SITE_PROBING) {
			/* The probe went through: restart at the floors. */
			s->conn = s->lim.min_conn;
			site_set_rate(s, s->lim.min_rate, now);
			s->step_from = now;
			s->peak_active = -1;
			s->undo_at = 0;
			fx |= site_enter_mode(s, s->conn >= s->lim.max_conn &&
			    s->rate >= s->lim.max_rate ? SITE_NORMAL :
			    SITE_THROTTLED, now);
		} else if (s->mode == SITE_THROTTLED &&
		    now - s->step_from >= s->lim.increase_every_ms) {
			fx |= site_step(s, now);
		}
		break;
	case SITE_SIG_THROTTLE:
	case SITE_SIG_CONN_FAIL:
		if (s->mode == SITE_SUSPENDED)
			break;		/* late replies of a suspended site */
		if (s->mode == SITE_PROBING) {
			/* The probe was refused: stop again, for longer. A
			 * connection failure of the probe is the host's. */
			if (sig == SITE_SIG_THROTTLE)
				fx |= site_suspend(s, now, hint);
			break;
		}
		s->step_from = now;	/* no increase for a whole interval */
		if (sig == SITE_SIG_THROTTLE)
			fx |= site_throttled(s, now, hint);
		else if (s->last_decrease == 0 ||
		    now - s->last_decrease >= s->lim.decrease_window_ms)
			fx |= site_cut(s, false, true, now);
		break;
	case SITE_SIG_SUSPEND:
		if (s->mode == SITE_SUSPENDED) {
			/* Same episode: only a longer hint extends it. */
			if (now + hint > s->suspended_until) {
				s->suspended_until = now + hint;
				fx |= SITE_FX_SUSPEND;
			}
			break;
		}
		fx |= site_suspend(s, now, hint);
		break;
	case SITE_SIG_LAST:
		break;
	}
	return fx;
}

/* site_answered - a transaction got past MAIL without a throttle */
unsigned
site_answered(struct site *s, int64_t now)
{
	site_clock(s, now);
	if (s->backoff_ms != 0 && now >= s->hold_until)
		return site_episode_end(s, now);
	return 0;
}

/* site_host_down - a connection to host_key failed: mark it down */
void
site_host_down(struct site *s, const char *host_key, int64_t now)
{
	int i = site_host_index(s, host_key);
	struct site_host *h = i >= 0 ? &s->hosts[i] : NULL;
	int64_t cap = s->lim.host_down_ms << SITE_HOST_MAX_SHIFT;

	site_clock(s, now);
	if (h == NULL) {
		/* A free slot, else the one back up the longest, else the
		 * one back up soonest: forgetting it costs the least. */
		h = &s->hosts[0];
		for (i = 0; i < SITE_MAX_HOSTS; i++) {
			struct site_host *c = &s->hosts[i];

			if (c->key[0] == '\0') {
				h = c;
				break;
			}
			if (c->until < h->until)
				h = c;
		}
		memset(h, 0, sizeof *h);
		str_copy(h->key, host_key, sizeof h->key);
	}
	if (h->until > now)
		return;		/* already down: one cohort, one marking */
	if (h->fails > 0 && now - h->until >= cap)
		h->fails = 0;	/* a failure long after the last one */
	if (h->fails <= SITE_HOST_MAX_SHIFT)
		h->fails++;
	h->until = now + (s->lim.host_down_ms << (h->fails - 1));
}

/* site_learn_msgs_per_conn - at most n messages per connection from now */
unsigned
site_learn_msgs_per_conn(struct site *s, int n, int64_t now)
{
	int cur = site_msgs_per_conn(s, now);

	if (n < 1)
		return 0;
	if (cur != 0 && n >= cur) {
		s->mpc_at = now;	/* still true */
		return 0;
	}
	s->msgs_per_conn = n;
	s->mpc_at = now;
	return SITE_FX_DECREASE;
}

/* site_msgs_per_conn - the learned limit, 0 if none (or forgotten) */
int
site_msgs_per_conn(const struct site *s, int64_t now)
{
	if (s->msgs_per_conn == 0 || now - s->mpc_at > SITE_MPC_FORGET_MS)
		return 0;
	return s->msgs_per_conn;
}

/* site_host_up - a connection to host_key worked */
void
site_host_up(struct site *s, const char *host_key)
{
	int i = site_host_index(s, host_key);

	if (i >= 0)
		memset(&s->hosts[i], 0, sizeof s->hosts[i]);
}

/* site_host_is_down - is host_key down at now? */
bool
site_host_is_down(const struct site *s, const char *host_key, int64_t now,
    int64_t *until)
{
	int i = site_host_index(s, host_key);

	if (i < 0 || s->hosts[i].until <= now)
		return false;
	if (until)
		*until = s->hosts[i].until;
	return true;
}

/* site_name - the site's name */
const char *
site_name(const struct site *s)
{
	return s->name;
}

/* site_conn_limit - current connection limit */
int
site_conn_limit(const struct site *s)
{
	return s->conn;
}

/* site_rate - current message rate, msgs/s */
double
site_rate(const struct site *s)
{
	return s->rate;
}

/* site_mode - mode as of the last call given a time */
enum site_mode
site_mode(const struct site *s)
{
	return s->mode;
}

/* site_suspended_until - end of the current or last suspension, 0 if never */
int64_t
site_suspended_until(const struct site *s)
{
	return s->suspended_until;
}

/* site_suspensions - consecutive suspensions so far */
int
site_suspensions(const struct site *s)
{
	return s->suspensions;
}

/* site_mode_name - "normal", "throttled", "suspended", "probing" */
const char *
site_mode_name(enum site_mode mode)
{
	if ((unsigned)mode >= SITE_MODE_LAST)
		return "?";
	return site_mode_names[mode];
}

/* site_to_json - one JSON object for relayctl */
void
site_to_json(const struct site *s, int64_t now, struct buf *out)
{
	enum site_mode mode = site_mode_at(s, now);
	bool first = true;

	buf_puts(out, "{\"name\":");
	buf_json_string(out, s->name);
	buf_puts(out, ",\"mode\":");
	buf_json_string(out, site_mode_name(mode));
	buf_printf(out, ",\"mode_since\":%" PRId64, mode == s->mode ?
	    s->mode_since : s->suspended_until);
	buf_printf(out, ",\"conn\":%d,\"conn_max\":%d,\"conn_min\":%d",
	    s->conn, s->lim.max_conn, s->lim.min_conn);
	buf_printf(out, ",\"rate\":%.3f,\"rate_max\":%.3f,\"rate_min\":%.3f",
	    s->rate, s->lim.max_rate, s->lim.min_rate);
	buf_printf(out, ",\"conn_rate\":%.3f", s->lim.conn_rate);
	if (site_msgs_per_conn(s, now))
		buf_printf(out, ",\"msgs_per_conn\":%d", s->msgs_per_conn);
	else
		buf_puts(out, ",\"msgs_per_conn\":null");
	if (mode == SITE_SUSPENDED)
		buf_printf(out, ",\"suspended_until\":%" PRId64, s->suspended_until);
	else
		buf_puts(out, ",\"suspended_until\":null");
	buf_printf(out, ",\"suspensions\":%d", s->suspensions);
	if (s->hold_until > now)
		buf_printf(out, ",\"hold_until\":%" PRId64, s->hold_until);
	else
		buf_puts(out, ",\"hold_until\":null");
	if (s->last_signal_at) {
		buf_printf(out, ",\"last_throttle_at\":%" PRId64, s->last_signal_at);
		buf_puts(out, ",\"last_signal\":");
		buf_json_string(out, site_sig_names[s->last_sig]);
		buf_puts(out, ",\"last_reply\":");
		buf_json_string(out, s->last_reply);
	} else {
		buf_puts(out, ",\"last_throttle_at\":null,\"last_signal\":null,"
		    "\"last_reply\":null");
	}
	buf_printf(out, ",\"recent_window_s\":%d,\"recent\":{",
	    SITE_RING_N * SITE_RECENT_BUCKET_MS / 1000);
	for (int i = 0; i < SITE_SIG_LAST; i++)
		buf_printf(out, "%s\"%s\":%" PRIu32, i ? "," : "", site_sig_names[i],
		    site_ring_sum(&s->recent[i], SITE_RECENT_BUCKET_MS, now));
	buf_puts(out, "},\"hosts_down\":[");
	for (size_t i = 0; i < SITE_MAX_HOSTS; i++) {
		const struct site_host *h = &s->hosts[i];

		if (h->key[0] == '\0' || h->until <= now)
			continue;
		buf_puts(out, first ? "{\"host\":" : ",{\"host\":");
		buf_json_string(out, h->key);
		buf_printf(out, ",\"until\":%" PRId64 ",\"failures\":%d}",
		    h->until, h->fails);
		first = false;
	}
	buf_puts(out, "]}");
}

/* site_to_text - one-line summary for logs */
void
site_to_text(const struct site *s, struct buf *out)
{
	buf_printf(out, "site=%s mode=%s conn=%d/%d rate=%.3f/%.3f",
	    s->name, site_mode_name(s->mode), s->conn, s->lim.max_conn,
	    s->rate, s->lim.max_rate);
	if (s->mode == SITE_SUSPENDED)
		buf_printf(out, " until=%" PRId64 " suspensions=%d",
		    s->suspended_until, s->suspensions);
	if (s->msgs_per_conn)
		buf_printf(out, " msgs_per_conn=%d", s->msgs_per_conn);
}

/* site_ring_put - append " key=HEAD:c0,c1,..." */
static void
site_ring_put(struct buf *out, const char *key, const struct site_ring *r)
{
	buf_printf(out, " %s=%" PRId64 ":", key, r->head);
	for (int i = 0; i < SITE_RING_N; i++)
		buf_printf(out, "%s%" PRIu32, i ? "," : "", r->cnt[i]);
}

/* site_serialize - the persistent state as one line */
void
site_serialize(const struct site *s, struct buf *out)
{
	buf_printf(out, "v=%d name=", SITE_STATE_VERSION);
	xtext_encode(out, s->name);
	buf_printf(out, " mode=%s since=%" PRId64 " conn=%d rate=%.17g"
	    " rate_th=%.17g", site_mode_name(s->mode), s->mode_since,
	    s->conn, s->rate, s->rate_th);
	buf_printf(out, " until=%" PRId64 " suspensions=%d hold=%" PRId64,
	    s->suspended_until, s->suspensions, s->hold_until);
	buf_printf(out, " last_decrease=%" PRId64 " step_from=%" PRId64,
	    s->last_decrease, s->step_from);
	if (s->msgs_per_conn)
		buf_printf(out, " msgs_per_conn=%d:%" PRId64, s->msgs_per_conn,
		    s->mpc_at);
	buf_printf(out, " last_throttle_at=%" PRId64 " last_sig=%s last_reply=",
	    s->last_signal_at, site_sig_names[s->last_sig]);
	xtext_encode(out, s->last_reply);
	for (int i = 0; i < SITE_SIG_LAST; i++) {
		char key[32];

		snprintf(key, sizeof key, "r_%s", site_sig_names[i]);
		site_ring_put(out, key, &s->recent[i]);
	}
	for (size_t i = 0; i < SITE_MAX_HOSTS; i++) {
		const struct site_host *h = &s->hosts[i];

		if (h->key[0] == '\0')
			continue;
		buf_puts(out, " host=");
		xtext_encode(out, h->key);
		buf_printf(out, ",%" PRId64 ",%d", h->until, h->fails);
	}
	buf_puts(out, "\n");
}

/* site_num - parse a whole decimal int64 in [lo, hi] */
static bool
site_num(const char *v, int64_t lo, int64_t hi, int64_t *out)
{
	char *end;
	long long n;

	if (*v == '\0' || *v == ' ')
		return false;
	n = strtoll(v, &end, 10);
	if (*end != '\0' || n < lo || n > hi)
		return false;
	*out = n;
	return true;
}

/* site_real - parse a whole finite double >= 0 */
static bool
site_real(const char *v, double *out)
{
	char *end;
	double d;

	if (*v == '\0')
		return false;
	d = strtod(v, &end);
	if (*end != '\0' || !isfinite(d) || d < 0)
		return false;
	*out = d;
	return true;
}

/* site_ring_get - parse "HEAD:c0,c1,..." */
static bool
site_ring_get(const char *v, struct site_ring *r)
{
	char *end;
	long long n;

	n = strtoll(v, &end, 10);
	if (end == v || *end != ':' || n < 0)
		return false;
	r->head = n;
	for (int i = 0; i < SITE_RING_N; i++) {
		const char *p = end + 1;
		unsigned long c;

		if (*p < '0' || *p > '9')
			return false;
		c = strtoul(p, &end, 10);
		if (c > UINT32_MAX || *end != (i == SITE_RING_N - 1 ? '\0' : ','))
			return false;
		r->cnt[i] = (uint32_t)c;
	}
	return true;
}

/* site_name_index - index of v in names[0..n), or -1 */
static int
site_name_index(const char *const *names, int n, const char *v)
{
	for (int i = 0; i < n; i++)
		if (strcmp(names[i], v) == 0)
			return i;
	return -1;
}

/* Keys of a v=1 line, as bits of "seen". */
enum {
	SK_V, SK_NAME, SK_MODE, SK_SINCE, SK_CONN, SK_RATE, SK_RATE_TH, SK_UNTIL,
	SK_SUSP, SK_HOLD, SK_LASTDEC, SK_STEP, SK_LASTAT, SK_LASTSIG, SK_REPLY,
	SK_MPC, SK_RING, SK_LAST = SK_RING + SITE_SIG_LAST
};

static const char *const site_keys[] = {
	"v", "name", "mode", "since", "conn", "rate", "rate_th", "until",
	"suspensions", "hold", "last_decrease", "step_from", "last_throttle_at",
	"last_sig", "last_reply", "msgs_per_conn", "r_ok", "r_throttle",
	"r_suspend", "r_conn_fail",
};
_Static_assert(ARRAY_SIZE(site_keys) == SK_LAST, "state keys");

/* site_parse - rebuild a site from one site_serialize() line */
int
site_parse(const char *line, const struct site_limits *lim, struct site **out,
    int64_t now_wall_ms)
{
	struct site tmp;
	char *copy, *tok, *save = NULL, *name = NULL;
	uint32_t seen = 0;
	size_t nhosts = 0, len = strlen(line);
	int64_t n = 0;
	bool ok = true;

	*out = NULL;
	if (len > 0 && line[len - 1] == '\n')
		len--;
	if (memchr(line, '\n', len) != NULL)
		return RELAY_ECORRUPT;
	copy = xstrndup(line, len);
	memset(&tmp, 0, sizeof tmp);
	tmp.last_sig = SITE_SIG_THROTTLE;

	for (tok = strtok_r(copy, " ", &save); tok && ok;
	    tok = strtok_r(NULL, " ", &save)) {
		char *v = strchr(tok, '=');
		int k, idx;

		if (v == NULL) {
			ok = false;
			break;
		}
		*v++ = '\0';
		if (strcmp(tok, "host") == 0) {
			/* host=<xtext key>,<until>,<fails> */
			char *c2 = strrchr(v, ','), *c1, *key;
			int64_t until, fails;

			if (nhosts >= SITE_MAX_HOSTS || c2 == NULL) {
				ok = false;
				break;
			}
			*c2 = '\0';
			c1 = strrchr(v, ',');
			if (c1 == NULL) {
				ok = false;
				break;
			}
			*c1 = '\0';
			key = xtext_decode(v, strlen(v));
			ok = key && *key && strlen(key) < SITE_HOST_KEY_MAX &&
			    site_num(c1 + 1, 0, INT64_MAX, &until) &&
			    site_num(c2 + 1, 1, SITE_HOST_MAX_SHIFT + 1, &fails);
			if (ok) {
				str_copy(tmp.hosts[nhosts].key, key, SITE_HOST_KEY_MAX);
				tmp.hosts[nhosts].until = until;
				tmp.hosts[nhosts].fails = (int)fails;
				nhosts++;
			}
			free(key);
			continue;
		}
		k = site_name_index(site_keys, SK_LAST, tok);
		if (k < 0 || (seen & (1u << k)) || (k != SK_V && !(seen & 1u))) {
			ok = false;	/* unknown, repeated, or before v= */
			break;
		}
		seen |= 1u << k;
		switch (k) {
		case SK_V:
			ok = site_num(v, 1, SITE_STATE_VERSION, &n);
			break;
		case SK_NAME:
			name = xtext_decode(v, strlen(v));
			ok = name && *name;
			break;
		case SK_MODE:
			idx = site_name_index(site_mode_names, SITE_MODE_LAST, v);
			ok = idx >= 0;
			tmp.mode = (enum site_mode)(ok ? idx : 0);
			break;
		case SK_SINCE:
			ok = site_num(v, 0, INT64_MAX, &tmp.mode_since);
			break;
		case SK_CONN:
			ok = site_num(v, 0, INT32_MAX, &n);
			tmp.conn = (int)n;
			break;
		case SK_RATE:
			ok = site_real(v, &tmp.rate);
			break;
		case SK_RATE_TH:
			ok = site_real(v, &tmp.rate_th);
			break;
		case SK_UNTIL:
			ok = site_num(v, 0, INT64_MAX, &tmp.suspended_until);
			break;
		case SK_SUSP:
			ok = site_num(v, 0, 64, &n);
			tmp.suspensions = (int)n;
			break;
		case SK_HOLD:
			ok = site_num(v, 0, INT64_MAX, &tmp.hold_until);
			break;
		case SK_LASTDEC:
			ok = site_num(v, 0, INT64_MAX, &tmp.last_decrease);
			break;
		case SK_STEP:
			ok = site_num(v, 0, INT64_MAX, &tmp.step_from);
			break;
		case SK_LASTAT:
			ok = site_num(v, 0, INT64_MAX, &tmp.last_signal_at);
			break;
		case SK_LASTSIG:
			idx = site_name_index(site_sig_names, SITE_SIG_LAST, v);
			ok = idx >= 0;
			tmp.last_sig = (enum site_signal)(ok ? idx : 0);
			break;
		case SK_MPC: {
			/* msgs_per_conn=N:WHEN */
			char *colon = strchr(v, ':');

			ok = colon != NULL;
			if (ok) {
				*colon = '\0';
				ok = site_num(v, 1, INT32_MAX, &n) &&
				    site_num(colon + 1, 0, INT64_MAX, &tmp.mpc_at);
				tmp.msgs_per_conn = (int)n;
			}
			break;
		}
		case SK_REPLY: {
			char *r = xtext_decode(v, strlen(v));

			ok = r != NULL;
			if (r)
				str_copy(tmp.last_reply, r, sizeof tmp.last_reply);
			free(r);
			break;
		}
		default:
			ok = site_ring_get(v, &tmp.recent[k - SK_RING]);
			break;
		}
	}
	free(copy);
	/* Required: version, name, mode, conn, rate. */
	if (!ok || (seen & ((1u << SK_V) | (1u << SK_NAME) | (1u << SK_MODE) |
	    (1u << SK_CONN) | (1u << SK_RATE))) != ((1u << SK_V) | (1u << SK_NAME) |
	    (1u << SK_MODE) | (1u << SK_CONN) | (1u << SK_RATE))) {
		free(name);
		return RELAY_ECORRUPT;
	}

	struct site *s = site_new(name, lim, now_wall_ms);
	free(name);
	s->mode = tmp.mode;
	s->mode_since = tmp.mode_since ? tmp.mode_since : now_wall_ms;
	s->conn = tmp.conn;
	s->rate = tmp.rate;
	s->rate_th = tmp.rate_th;
	s->suspended_until = tmp.suspended_until;
	s->suspensions = tmp.suspensions;
	s->hold_until = tmp.hold_until > now_wall_ms ? tmp.hold_until : 0;
	s->hold_from = now_wall_ms;
	s->last_decrease = tmp.last_decrease;
	s->step_from = tmp.step_from ? tmp.step_from : now_wall_ms;
	s->last_signal_at = tmp.last_signal_at;
	s->last_sig = tmp.last_sig;
	memcpy(s->last_reply, tmp.last_reply, sizeof s->last_reply);
	s->msgs_per_conn = tmp.msgs_per_conn;
	s->mpc_at = tmp.mpc_at;
	memcpy(s->recent, tmp.recent, sizeof s->recent);
	memcpy(s->hosts, tmp.hosts, sizeof s->hosts);
	/* The suspended -> probing check of site_clock, then the clamps. */
	site_clock(s, now_wall_ms);
	site_adopt(s, now_wall_ms);
	*out = s;
	return 0;
}

/* site_ring_add - add k to the bucket of now */
static void
site_ring_add(struct site_ring *r, int64_t bucket_ms, int64_t now, uint32_t k)
{
	int64_t b = now / bucket_ms;

	if (b > r->head) {
		if (b - r->head >= SITE_RING_N)
			memset(r->cnt, 0, sizeof r->cnt);
		else
			for (int64_t i = r->head + 1; i <= b; i++)
				r->cnt[i % SITE_RING_N] = 0;
		r->head = b;
	}
	/* XXX: a clock that stepped back lands in the newest bucket. */
	r->cnt[r->head % SITE_RING_N] += k;
}

/* site_ring_sum - the count over the ring's buckets still in the window at now */
static uint32_t
site_ring_sum(const struct site_ring *r, int64_t bucket_ms, int64_t now)
{
	int64_t b = now / bucket_ms;
	uint32_t sum = 0;

	for (int64_t i = r->head; i > r->head - SITE_RING_N && i >= 0; i--)
		if (i > b - SITE_RING_N)
			sum += r->cnt[i % SITE_RING_N];
	return sum;
}

/*
 * site_clock - bring the site to now: follow a clock that stepped back,
 * and notice the end of a suspension. Every call given a time starts here.
 */
static void
site_clock(struct site *s, int64_t now)
{
	assert(now >= 0);
	if (now < s->seen - SITE_CLOCK_SLACK_MS) {
		/* The wall clock stepped back: move our deadlines with it,
		 * so a suspension lasts what it should, and measure anew. */
		int64_t d = now - s->seen;
		int64_t *t[] = { &s->mode_since, &s->last_decrease, &s->step_from,
		    &s->hold_until, &s->suspended_until, &s->last_signal_at,
		    &s->hold_from, &s->cycle_start, &s->last_token,
		    &s->probe_at, &s->mpc_at };

		for (size_t i = 0; i < ARRAY_SIZE(t); i++)
			if (*t[i] != 0)
				*t[i] = *t[i] + d > 1 ? *t[i] + d : 1;
		for (size_t i = 0; i < SITE_MAX_HOSTS; i++)
			if (s->hosts[i].until != 0)
				s->hosts[i].until += d;
		s->tat += (double)d;
		s->conn_tat += (double)d;
		s->rate_since = now;
		s->sent_since = 0;
		s->held_ms = 0;
	}
	if (now > s->seen || now < s->seen - SITE_CLOCK_SLACK_MS)
		s->seen = now;
	if (s->mode == SITE_SUSPENDED && now >= s->suspended_until)
		site_enter_mode(s, SITE_PROBING, s->suspended_until);
}

/* site_enter_mode - the only assignment of s->mode; SITE_FX_MODE if it changed */
static unsigned
site_enter_mode(struct site *s, enum site_mode mode, int64_t now)
{
	assert(mode < SITE_MODE_LAST);
	if (s->mode == mode)
		return 0;
	s->mode = mode;
	s->mode_since = now;
	return SITE_FX_MODE;
}

/*
 * site_set_rate - change the rate; the token bucket's pending debt is
 * rescaled, so a slow rate's long gap does not outlive it.
 */
static void
site_set_rate(struct site *s, double rate, int64_t now)
{
	if (rate == s->rate)
		return;
	if (s->tat > (double)now)
		s->tat = (double)now + (s->tat - (double)now) * (s->rate / rate);
	s->rate = rate;
	s->rate_since = now;
	s->sent_since = 0;
	s->held_ms = 0;		/* site_held() clips the current hold */
}

/*
 * site_adopt - clamp the learned state into the current limits
 * (site_set_limits, site_parse).
 */
static void
site_adopt(struct site *s, int64_t now)
{
	const struct site_limits *l = &s->lim;
	double rate = s->rate;

	if (s->mode == SITE_NORMAL || s->mode == SITE_SUSPENDED ||
	    s->mode == SITE_PROBING) {
		/* Nothing learned against the ceilings, or at the floors
		 * by definition. */
		s->conn = s->mode == SITE_NORMAL ? l->max_conn : l->min_conn;
		rate = s->mode == SITE_NORMAL ? l->max_rate : l->min_rate;
	}
	if (s->conn < l->min_conn)
		s->conn = l->min_conn;
	if (s->conn > l->max_conn)
		s->conn = l->max_conn;
	if (rate < l->min_rate)
		rate = l->min_rate;
	if (rate > l->max_rate)
		rate = l->max_rate;
	site_set_rate(s, rate, now);
	s->undo_at = 0;		/* the step it would undo was under other limits */
	if (s->mode == SITE_THROTTLED && s->conn >= l->max_conn &&
	    s->rate >= l->max_rate)
		site_enter_mode(s, SITE_NORMAL, now);
}

/*
 * site_rate_in_use - the rate tokens were taken at since the rate last
 * changed (over at least a second), if lower than the limit; the limit
 * if no token was taken. Measuring since the change, not over
 * a fixed window, gives the rate the receiver objected to, not an average
 * with the rates before it; time held is left out, as nothing could be
 * sent then.
 */
static double
site_rate_in_use(const struct site *s, int64_t now)
{
	int64_t span = now - s->rate_since - site_held(s, now);
	double r;

	if (s->sent_since == 0)
		return s->rate;
	if (span < SITE_MIN_SPAN_MS)
		span = SITE_MIN_SPAN_MS;
	r = s->sent_since * 1000.0 / (double)span;
	return r < s->rate ? r : s->rate;
}

/*
 * site_cut - the decrease (both knobs, or connections only). The first
 * throttle within two intervals of a step undoes that step (against a
 * quota per minute the refusal comes up to a minute after the step);
 * otherwise the cut is multiplicative, from what was in use (in_use) or
 * from the limit.
 */
static unsigned
site_cut(struct site *s, bool rate_too, bool in_use, int64_t now)
{
	const struct site_limits *l = &s->lim;
	unsigned fx = 0;
	double r;

	if (s->undo_at != 0 && now - s->undo_at < 2 * l->increase_every_ms) {
		/* The limit lies between the values before the step, clean
		 * for a whole interval, and these: go back. A receiver that
		 * changed meanwhile throttles again a window later, and
		 * that is a multiplicative cut. */
		s->conn = s->undo_conn;
		r = s->undo_rate;
		if (rate_too)
			s->rate_th = s->rate;	/* throttled here: search below */
	} else {
		int used = s->conn, conn;

		if (s->peak_active >= 1 && s->peak_active < used)
			used = s->peak_active;
		conn = (int)(used * l->decrease_factor);	/* floor: >= 0 */
		s->conn = conn > l->min_conn ? conn : l->min_conn;
		r = in_use ? site_rate_in_use(s, now) : s->rate;
		if (rate_too)
			s->rate_th = r;
		r *= l->decrease_factor;
	}
	if (s->conn > l->max_conn)	/* an undo across a reload */
		s->conn = l->max_conn;
	if (r > l->max_rate)
		r = l->max_rate;
	if (rate_too)
		site_set_rate(s, r > l->min_rate ? r : l->min_rate, now);
	s->undo_at = 0;
	s->last_decrease = now;
	s->step_from = now;
	s->peak_active = s->last_active;
	fx |= SITE_FX_DECREASE;
	if (s->conn < l->max_conn || s->rate < l->max_rate)
		fx |= site_enter_mode(s, SITE_THROTTLED, now);
	return fx;
}

/* site_step - one additive increase toward the ceilings */
static unsigned
site_step(struct site *s, int64_t now)
{
	const struct site_limits *l = &s->lim;
	double full = l->rate_step * l->max_rate, step = full, r;

	s->undo_at = now;
	s->undo_conn = s->conn;
	s->undo_rate = s->rate;
	if (s->conn < l->max_conn)
		s->conn++;
	if (s->rate_th > s->rate) {
		/* Binary search back toward the throttle point. */
		double fine = full / SITE_FINE_DIV;

		/* A site far below its ceiling searches in finer steps. */
		if (fine > s->rate_th / SITE_FINE_TH_DIV)
			fine = s->rate_th / SITE_FINE_TH_DIV;
		step = (s->rate_th - s->rate) / 2;
		if (step < fine)
			step = fine;
		if (step > full)
			step = full;
	}
	r = s->rate + step;
	site_set_rate(s, r < l->max_rate ? r : l->max_rate, now);
	s->step_from = now;
	if (s->conn >= l->max_conn && s->rate >= l->max_rate)
		return SITE_FX_INCREASE | site_enter_mode(s, SITE_NORMAL, now);
	return SITE_FX_INCREASE;
}

/* site_suspend - begin a suspension, escalating; hint is in ms (0: none) */
static unsigned
site_suspend(struct site *s, int64_t now, int64_t hint)
{
	const struct site_limits *l = &s->lim;
	int64_t d = l->suspend_base_ms;

	if (s->mode != SITE_PROBING && s->suspended_until != 0 &&
	    now - s->suspended_until >= l->suspend_max_ms)
		s->suspensions = 0;	/* quiet long enough: start over */
	if (s->suspensions < 64)
		s->suspensions++;
	for (int i = 1; i < s->suspensions && d < l->suspend_max_ms; i++)
		d *= 2;
	if (d > l->suspend_max_ms)
		d = l->suspend_max_ms;
	if (hint > d)
		d = hint;
	s->suspended_until = now + d;
	s->conn = l->min_conn;
	site_set_rate(s, l->min_rate, now);
	s->peak_active = -1;
	s->backoff_ms = 0;	/* the suspension replaces the episode */
	s->refusals = 0;
	return SITE_FX_SUSPEND | site_enter_mode(s, SITE_SUSPENDED, now);
}

/*
 * site_hold - nothing new before until (if later than the hold in force).
 * The time of a hold that is over goes to held_ms, clipped to
 * rate_since, for site_rate_in_use().
 */
static unsigned
site_hold(struct site *s, int64_t until, int64_t now)
{
	if (until <= s->hold_until)
		return 0;
	if (s->hold_until <= now) {
		s->held_ms = site_held(s, now);
		s->hold_from = now;
	}
	s->hold_until = until;
	return SITE_FX_HOLD;
}

/* site_held - time held since rate_since, up to now */
static int64_t
site_held(const struct site *s, int64_t now)
{
	int64_t from = s->hold_from > s->rate_since ? s->hold_from :
	    s->rate_since;
	int64_t to = s->hold_until < now ? s->hold_until : now;

	return s->held_ms + (to > from ? to - from : 0);
}

/*
 * site_throttled - a THROTTLE of a site that is up. A refusal that comes
 * while a hold is in force was sent before it (no new work starts during
 * a hold): one burst, one event. Otherwise the first refusal of an
 * episode cuts (if the window allows) and holds the site for
 * SITE_BACKOFF_BASE_MS; each refusal after a hold doubles the hold, up to
 * SITE_BACKOFF_MAX_MS, or the receiver's hint if longer. Why: requeued
 * recipients would otherwise be offered again at once, and a receiver
 * with a quota per window refuses everything until the window ends
 * (fake-mx --rate and Postfix's anvil count a fixed minute): without the
 * hold, make bench-throttle saw 9 in 10 transactions answered 421. With
 * it, a window of W seconds costs about log2(W) refusals.
 */
static unsigned
site_throttled(struct site *s, int64_t now, int64_t hint)
{
	unsigned fx = 0;

	if (s->hold_until > now)
		return hint > 0 ? site_hold(s, now + hint, now) : 0;
	if (s->backoff_ms == 0) {
		s->backoff_ms = SITE_BACKOFF_BASE_MS;
		s->refusals = 1;
	} else {
		s->refusals++;
		s->backoff_ms = s->backoff_ms * 2 < SITE_BACKOFF_MAX_MS ?
		    s->backoff_ms * 2 : SITE_BACKOFF_MAX_MS;
	}
	/* Later in the episode only probes were sent: their rate says
	 * nothing, the cut is from the limit. */
	if (s->last_decrease == 0 ||
	    now - s->last_decrease >= s->lim.decrease_window_ms)
		fx |= site_cut(s, true, s->refusals == 1, now);
	return fx | site_hold(s, now + (hint > s->backoff_ms ? hint :
	    s->backoff_ms), now);
}

/*
 * site_episode_end - the first delivery after a throttle episode's hold.
 * If the receiver refused again after a hold, it has a quota over some
 * window, and what it accepted over the whole cycle (since the last
 * episode ended, or since work began), refusals and holds included, is
 * its rate: the message rate drops to that if lower. The cut at the
 * start of the episode only halved what was in use; against a quota per
 * minute that takes several minutes, each with its refusals, to get
 * there. A single refusal (a token bucket refilled within the first
 * hold, a passing 421) says nothing about a window and changes nothing.
 */
static unsigned
site_episode_end(struct site *s, int64_t now)
{
	unsigned fx = 0;
	int64_t span = now - s->cycle_start;

	if (s->refusals >= 2 && s->cycle_start != 0 &&
	    span >= SITE_MIN_SPAN_MS) {
		double est = s->cycle_ok * 1000.0 / (double)span;

		if (est < s->lim.min_rate)
			est = s->lim.min_rate;
		if (est < s->rate) {
			/* What it accepted is just under its limit: search
			 * from there, not back toward the burst it refused. */
			s->rate_th = est * SITE_EST_HEADROOM;
			site_set_rate(s, est, now);
			s->undo_at = 0;
			s->last_decrease = now;
			s->step_from = now;
			fx |= SITE_FX_DECREASE | site_enter_mode(s,
			    SITE_THROTTLED, now);
		}
	}
	if (s->refusals >= 2)	/* refused for a while: the clean interval */
		s->step_from = now;	/* starts now (1 s held is noise) */
	s->backoff_ms = 0;
	s->refusals = 0;
	s->cycle_start = 0;	/* the next token starts the next cycle */
	return fx | SITE_FX_RESUME;
}

/* site_hint_ms - a reply's "come back in N s" in ms, capped; 0 if none */
static int64_t
site_hint_ms(const struct site *s, int hint_s)
{
	int64_t h;

	if (hint_s <= 0)
		return 0;
	h = (int64_t)hint_s * 1000;
	return h < s->lim.suspend_max_ms ? h : s->lim.suspend_max_ms;
}

/*
 * site_gcra - the token bucket as GCRA: a message every T = 1/rate, and
 * up to B = max(1, rate * 1 s) at once after an idle spell (tolerance
 * (B - 1) * T). take: consume on success. *when: the earliest time a
 * token is available (now if one is).
 */
static bool
site_gcra(struct site *s, int64_t now, bool take, int64_t *when)
{
	double t_ms = 1000.0 / s->rate;
	double burst = (double)(int64_t)(s->rate * SITE_BURST_MS / 1000.0);
	double tau = (burst > 1 ? burst - 1 : 0) * t_ms;
	double tat = s->tat > (double)now ? s->tat : (double)now;

	if (tat - (double)now > tau) {
		int64_t w = (int64_t)(tat - tau);

		*when = (double)w < tat - tau ? w + 1 : w;	/* ceil */
		return false;
	}
	if (take)
		s->tat = tat + t_ms;
	*when = now;
	return true;
}

/*
 * site_conn_gcra - site_gcra for new connections: one every 1/conn_rate,
 * up to max_conn at once; always true without a connection rate.
 */
static bool
site_conn_gcra(struct site *s, int64_t now, bool take, int64_t *when)
{
	double t_ms, tau, tat;

	*when = now;
	if (s->lim.conn_rate <= 0)
		return true;
	t_ms = 1000.0 / s->lim.conn_rate;
	tau = (s->lim.max_conn > 1 ? s->lim.max_conn - 1 : 0) * t_ms;
	tat = s->conn_tat > (double)now ? s->conn_tat : (double)now;
	if (tat - (double)now > tau) {
		int64_t w = (int64_t)(tat - tau);

		*when = (double)w < tat - tau ? w + 1 : w;	/* ceil */
		return false;
	}
	if (take)
		s->conn_tat = tat + t_ms;
	return true;
}

/* site_host_index - the slot of host_key (compared as stored: truncated), or -1 */
static int
site_host_index(const struct site *s, const char *host_key)
{
	char key[SITE_HOST_KEY_MAX];

	str_copy(key, host_key, sizeof key);
	for (int i = 0; i < SITE_MAX_HOSTS; i++)
		if (s->hosts[i].key[0] && strcmp(s->hosts[i].key, key) == 0)
			return i;
	return -1;
}

/* site_mode_at - the mode at now, without changing the site (for display) */
static enum site_mode
site_mode_at(const struct site *s, int64_t now)
{
	if (s->mode == SITE_SUSPENDED && now >= s->suspended_until)
		return SITE_PROBING;
	return s->mode;
}
