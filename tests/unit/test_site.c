/*
 * test_site.c - the adaptive throttle with a simulated clock and
 * simulated receivers: exact AIMD steps, one cut per window, gradual
 * recovery, suspension escalation and probing, hints, MX hosts down,
 * persistence; then closed-loop runs against a receiver with a fixed rate
 * limit (two kinds), a connection limit, and one that tightens and then
 * relaxes, asserting convergence and gradual recovery. The closed-loop
 * tests print their figures on "# " lines.
 */
#include <inttypes.h>
#include <stdint.h>
#include <string.h>

#include "config/util.h"
#include "relay/site.h"
#include "tests/unit/test.h"

#define T0	1700000000000LL		/* a wall-clock ms, Nov 2023 */
#define SEC	1000LL
#define MINUTE	(60 * SEC)
#define HOUR	(60 * MINUTE)
#define TICK	100			/* simulation step, ms */

#define ASSERT_NEAR(a, b) do {						\
	double a2_ = (a), b2_ = (b);					\
	if (a2_ - b2_ > 1e-9 || b2_ - a2_ > 1e-9) {			\
		fprintf(stderr, "%s:%d: %s ~ %s failed: %.12g != %.12g\n", \
		    __FILE__, __LINE__, #a, #b, a2_, b2_);		\
		abort();						\
	}								\
} while (0)

/* The limits of the tests: 1..10 connections, 1..100 msgs/s, defaults else. */
static struct site_limits
lim_test(void)
{
	struct site_limits l;

	site_limits_default(&l);
	l.max_conn = 10;
	l.max_rate = 100;
	l.min_conn = 1;
	l.min_rate = 1;
	return l;
}

TEST(defaults_and_check)
{
	struct site_limits l;
	const char *why = NULL;

	site_limits_default(&l);
	ASSERT_EQ(site_limits_check(&l, &why), 0);
	ASSERT(why == NULL);
	l.decrease_factor = 1.0;
	ASSERT_EQ(site_limits_check(&l, &why), RELAY_ECONFIG);
	ASSERT(why != NULL);
	l = lim_test();
	l.suspend_max_ms = INT64_MAX / 2;
	ASSERT_EQ(site_limits_check(&l, NULL), RELAY_ECONFIG);
	l = lim_test();
	l.min_conn = 11;
	ASSERT_EQ(site_limits_check(&l, NULL), RELAY_ECONFIG);
	l = lim_test();
	l.min_rate = 0;
	ASSERT_EQ(site_limits_check(&l, NULL), RELAY_ECONFIG);

	/* A new site starts at the ceilings. */
	l = lim_test();
	struct site *s = site_new("example.net", &l, T0);
	ASSERT_EQ(site_conn_limit(s), 10);
	ASSERT_NEAR(site_rate(s), 100);
	ASSERT_EQ(site_mode(s), SITE_NORMAL);
	ASSERT_STR_EQ(site_mode_name(site_mode(s)), "normal");
	ASSERT_EQ(site_may_connect(s, 9, T0, NULL), 0);
	ASSERT_EQ(site_may_connect(s, 10, T0, NULL), SITE_LIMIT_CONN);
	site_free(s);
}

/* Exact values of a cut and of the steps back, binary search included. */
TEST(aimd_exact_steps)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	unsigned fx;

	fx = site_report(s, SITE_SIG_THROTTLE, T0, 0, "421 4.7.0 slow down");
	ASSERT_EQ(fx, SITE_FX_DECREASE | SITE_FX_MODE | SITE_FX_HOLD);
	ASSERT_EQ(site_mode(s), SITE_THROTTLED);
	ASSERT_EQ(site_conn_limit(s), 5);
	ASSERT_NEAR(site_rate(s), 50);

	/* Not before a whole clean interval. */
	ASSERT_EQ(site_report(s, SITE_SIG_OK, T0 + 59 * SEC, 0, NULL),
	    SITE_FX_RESUME);	/* the episode is over */
	ASSERT_EQ(site_conn_limit(s), 5);

	/* Throttled at 100: half the distance back each step, at most a
	 * full step (10), at least 1/8 of one (1.25); +1 connection. */
	static const struct { int conn; double rate; } want[] = {
		{ 6, 60 }, { 7, 70 }, { 8, 80 }, { 9, 90 }, { 10, 95 },
		{ 10, 97.5 }, { 10, 98.75 }, { 10, 100 },
	};
	int64_t t = T0;
	for (size_t i = 0; i < ARRAY_SIZE(want); i++) {
		t += 60 * SEC;
		fx = site_report(s, SITE_SIG_OK, t, 0, NULL);
		ASSERT(fx & SITE_FX_INCREASE);
		ASSERT_EQ(site_conn_limit(s), want[i].conn);
		ASSERT_NEAR(site_rate(s), want[i].rate);
		/* Only one step per interval, however many deliveries. */
		ASSERT_EQ(site_report(s, SITE_SIG_OK, t + 30 * SEC, 0, NULL), 0);
	}
	ASSERT_EQ(site_mode(s), SITE_NORMAL);
	ASSERT(fx & SITE_FX_MODE);
	site_free(s);
}

/* A cut starts from what is in use, not from an idle limit. */
TEST(cut_from_use)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t t;

	/* Three connections and 2 msgs/s in use under limits of 10 and 100. */
	ASSERT_EQ(site_may_connect(s, 0, T0, NULL), 0);
	ASSERT_EQ(site_may_connect(s, 1, T0, NULL), 0);
	ASSERT_EQ(site_may_connect(s, 2, T0, NULL), 0);
	for (t = T0; t < T0 + 30 * SEC; t += 500)
		ASSERT(site_take_token(s, t, NULL));
	site_report(s, SITE_SIG_THROTTLE, t, 0, NULL);
	ASSERT_EQ(site_conn_limit(s), 1);	/* floor(3 * 0.5) */
	ASSERT_NEAR(site_rate(s), 1.0);		/* 2/s * 0.5 */
	site_free(s);
}

/* A burst of 421s from ten connections is one cut. */
TEST(one_decrease_per_window)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int cuts = 0;

	for (int i = 0; i < 10; i++)
		if (site_report(s, SITE_SIG_THROTTLE, T0 + i * 100, 0,
		    "421 too many") & SITE_FX_DECREASE)
			cuts++;
	ASSERT_EQ(cuts, 1);
	ASSERT_EQ(site_conn_limit(s), 5);
	ASSERT_NEAR(site_rate(s), 50);
	/* Still inside the window: a hold (2 s, the second of the
	 * episode), no cut. */
	ASSERT_EQ(site_report(s, SITE_SIG_THROTTLE, T0 + 29 * SEC, 0, NULL),
	    SITE_FX_HOLD);
	/* A new window but the 2 s hold is on: the same burst. */
	ASSERT_EQ(site_report(s, SITE_SIG_THROTTLE, T0 + 30 * SEC, 0, NULL), 0);
	/* After it: a second cut. */
	ASSERT(site_report(s, SITE_SIG_THROTTLE, T0 + 31 * SEC, 0, NULL) &
	    SITE_FX_DECREASE);
	ASSERT_EQ(site_conn_limit(s), 2);
	ASSERT_NEAR(site_rate(s), 25);
	/* The throttle at +31 s restarted the clean interval too. */
	ASSERT_EQ(site_report(s, SITE_SIG_OK, T0 + 90 * SEC, 0, NULL),
	    SITE_FX_RESUME);
	site_free(s);
}

/*
 * The first throttle within an interval of a step undoes that step (the
 * limit lies between the last clean values and these); one that persists
 * after it is a multiplicative cut again.
 */
TEST(throttle_after_step_undoes_it)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);

	site_report(s, SITE_SIG_THROTTLE, T0, 0, NULL);		/* 5, 50 */
	site_report(s, SITE_SIG_OK, T0 + MINUTE, 0, NULL);	/* 6, 60 */
	ASSERT_EQ(site_conn_limit(s), 6);
	ASSERT(site_report(s, SITE_SIG_THROTTLE, T0 + MINUTE + 20 * SEC, 0, NULL) &
	    SITE_FX_DECREASE);
	ASSERT_EQ(site_conn_limit(s), 5);
	ASSERT_NEAR(site_rate(s), 50);
	/* Still throttled a window later: the receiver changed; halve. */
	site_report(s, SITE_SIG_THROTTLE, T0 + MINUTE + 50 * SEC, 0, NULL);
	ASSERT_EQ(site_conn_limit(s), 2);
	ASSERT_NEAR(site_rate(s), 25);
	/* A delivery after its 2 s hold ends that episode, and a clean
	 * interval starts; a throttle long after the next step is not
	 * blamed on it. */
	site_report(s, SITE_SIG_OK, T0 + MINUTE + 52 * SEC, 0, NULL);
	ASSERT_EQ(site_conn_limit(s), 2);
	site_report(s, SITE_SIG_OK, T0 + 3 * MINUTE, 0, NULL);	/* 3, 35 */
	ASSERT_EQ(site_conn_limit(s), 3);
	site_report(s, SITE_SIG_THROTTLE, T0 + 5 * MINUTE, 0, NULL);
	ASSERT_EQ(site_conn_limit(s), 1);
	ASSERT_NEAR(site_rate(s), 17.5);
	site_free(s);
}

/* CONN_FAIL cuts the connection knob alone. */
TEST(conn_fail_cuts_connections_only)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);

	ASSERT(site_report(s, SITE_SIG_CONN_FAIL, T0, 0, NULL) & SITE_FX_DECREASE);
	ASSERT_EQ(site_conn_limit(s), 5);
	ASSERT_NEAR(site_rate(s), 100);
	ASSERT_EQ(site_mode(s), SITE_THROTTLED);
	site_free(s);
}

/* From the floors to the ceilings: one step a minute, never a jump. */
TEST(gradual_recovery)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t t = T0, last_step = 0;
	int steps = 0, prev_conn;
	double prev_rate;

	/* Suspend, probe, deliver: THROTTLED at the floors. */
	site_report(s, SITE_SIG_SUSPEND, t, 0, "421 4.7.1 [TS03] blocked");
	t = site_suspended_until(s);
	ASSERT_EQ(site_may_connect(s, 0, t, NULL), 0);
	ASSERT_EQ(site_mode(s), SITE_PROBING);
	site_report(s, SITE_SIG_OK, t, 0, NULL);
	ASSERT_EQ(site_mode(s), SITE_THROTTLED);
	ASSERT_EQ(site_conn_limit(s), 1);
	ASSERT_NEAR(site_rate(s), 1);

	prev_conn = site_conn_limit(s);
	prev_rate = site_rate(s);
	/* A delivery every 10 s for an hour. */
	for (int i = 1; i <= 360 && site_mode(s) != SITE_NORMAL; i++) {
		int64_t now = t + i * 10 * SEC;

		if (site_report(s, SITE_SIG_OK, now, 0, NULL) & SITE_FX_INCREASE) {
			if (last_step)
				ASSERT(now - last_step >= l.increase_every_ms);
			last_step = now;
			steps++;
		}
		ASSERT(site_conn_limit(s) - prev_conn <= 1);
		ASSERT(site_conn_limit(s) >= prev_conn);
		ASSERT(site_rate(s) - prev_rate <= l.rate_step * l.max_rate + 1e-9);
		ASSERT(site_rate(s) >= prev_rate);
		prev_conn = site_conn_limit(s);
		prev_rate = site_rate(s);
	}
	/* 1 -> 100 msgs/s in steps of 10: ten steps; 1 -> 10 conns: nine. */
	ASSERT_EQ(steps, 10);
	ASSERT_EQ(site_mode(s), SITE_NORMAL);
	ASSERT_EQ(site_conn_limit(s), 10);
	ASSERT_NEAR(site_rate(s), 100);
	site_free(s);
}

/* 15, 30, 60, 120, 240, 240 min; probing; reset after a quiet time. */
TEST(suspension_escalation_and_probing)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("yahoo", &l, T0);
	static const int64_t want[] = { 15, 30, 60, 120, 240, 240 };
	int64_t t = T0, next = 0;
	unsigned fx;

	fx = site_report(s, SITE_SIG_SUSPEND, t, 0, "421 4.7.0 [TSS04] deferred");
	ASSERT_EQ(fx, SITE_FX_SUSPEND | SITE_FX_MODE);
	/* The same episode from nine more connections: no escalation. */
	for (int i = 1; i < 10; i++)
		site_report(s, SITE_SIG_SUSPEND, t + i, 0, NULL);
	site_report(s, SITE_SIG_THROTTLE, t + 20, 0, NULL);
	ASSERT_EQ(site_suspensions(s), 1);
	ASSERT_EQ(site_conn_limit(s), 1);
	ASSERT_NEAR(site_rate(s), 1);

	for (size_t i = 0; i < ARRAY_SIZE(want); i++) {
		int64_t until = site_suspended_until(s);

		ASSERT_EQ(until - t, want[i] * MINUTE);
		ASSERT_EQ(site_mode(s), SITE_SUSPENDED);
		ASSERT_EQ(site_may_connect(s, 0, until - 1, &next),
		    SITE_LIMIT_SUSPENDED);
		ASSERT_EQ(next, until);
		ASSERT(!site_take_token(s, until - 1, &next));
		ASSERT_EQ(next, until);
		/* The end: one probe connection, no second one. */
		ASSERT_EQ(site_may_connect(s, 0, until, &next), 0);
		ASSERT_EQ(site_mode(s), SITE_PROBING);
		ASSERT_EQ(site_may_connect(s, 1, until, &next), SITE_LIMIT_PROBE);
		ASSERT_EQ(next, SITE_NEVER);
		ASSERT(site_take_token(s, until, NULL));
		/* The probe is refused: longer (throttle and suspend alike). */
		t = until + 5 * SEC;
		fx = site_report(s, i % 2 ? SITE_SIG_SUSPEND : SITE_SIG_THROTTLE,
		    t, 0, NULL);
		ASSERT(fx & SITE_FX_SUSPEND);
		ASSERT_EQ(site_suspensions(s), (int)i + 2);
	}
	/* A probe that delivers: THROTTLED at the floors. */
	t = site_suspended_until(s);
	ASSERT_EQ(site_may_connect(s, 0, t, NULL), 0);
	fx = site_report(s, SITE_SIG_OK, t + SEC, 0, NULL);
	ASSERT_EQ(fx, SITE_FX_MODE);
	ASSERT_EQ(site_mode(s), SITE_THROTTLED);
	ASSERT_EQ(site_conn_limit(s), 1);

	/* Within suspend_max of the last one: escalation continues... */
	site_report(s, SITE_SIG_SUSPEND, t + HOUR, 0, NULL);
	ASSERT_EQ(site_suspended_until(s) - (t + HOUR), 240 * MINUTE);
	/* ...after a quiet suspend_max, it starts over at 15 min. */
	t = site_suspended_until(s);
	site_report(s, SITE_SIG_OK, t, 0, NULL);
	site_report(s, SITE_SIG_SUSPEND, t + 4 * HOUR, 0, NULL);
	ASSERT_EQ(site_suspensions(s), 1);
	ASSERT_EQ(site_suspended_until(s) - (t + 4 * HOUR), 15 * MINUTE);
	site_free(s);
}

/* "Come back in N": holds new connections and tokens; lengthens a suspension. */
TEST(hints_honoured)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t next = 0;
	unsigned fx;

	fx = site_report(s, SITE_SIG_THROTTLE, T0, 120, "421 come back in 2 minutes");
	ASSERT(fx & SITE_FX_HOLD);
	ASSERT_EQ(site_may_connect(s, 0, T0 + SEC, &next), SITE_LIMIT_HOLD);
	ASSERT_EQ(next, T0 + 120 * SEC);
	/* In the episode: one connection at a time. */
	ASSERT_EQ(site_may_connect(s, 5, T0 + SEC, &next),
	    SITE_LIMIT_HOLD | SITE_LIMIT_PROBE);
	ASSERT_EQ(next, T0 + 120 * SEC);
	ASSERT(!site_take_token(s, T0 + SEC, &next));
	ASSERT_EQ(next, T0 + 120 * SEC);
	/* Inside the decrease window: no cut, but the longer hint counts. */
	fx = site_report(s, SITE_SIG_THROTTLE, T0 + 2 * SEC, 300, NULL);
	ASSERT_EQ(fx, SITE_FX_HOLD);
	ASSERT_EQ(site_may_connect(s, 0, T0 + 200 * SEC, &next), SITE_LIMIT_HOLD);
	ASSERT_EQ(next, T0 + 302 * SEC);
	ASSERT_EQ(site_may_connect(s, 0, T0 + 302 * SEC, &next), 0);
	ASSERT_EQ(next, T0 + 302 * SEC);
	ASSERT(site_take_token(s, T0 + 302 * SEC, NULL));

	/* A suspension hint longer than the escalation wins... */
	site_report(s, SITE_SIG_SUSPEND, T0 + HOUR, 3600, NULL);
	ASSERT_EQ(site_suspended_until(s), T0 + 2 * HOUR);
	/* ...and extends the current suspension; capped at suspend_max. */
	site_report(s, SITE_SIG_SUSPEND, T0 + HOUR + SEC, 86400, NULL);
	ASSERT_EQ(site_suspended_until(s), T0 + HOUR + SEC + 4 * HOUR);
	ASSERT_EQ(site_suspensions(s), 1);
	site_free(s);
}

/* GCRA: a burst of one second's worth, then one per 1/rate. */
TEST(token_bucket)
{
	struct site_limits l = lim_test();
	l.max_rate = 10;
	struct site *s = site_new("a", &l, T0);
	int64_t next = 0;
	int n = 0;

	while (site_take_token(s, T0, &next))
		n++;
	ASSERT_EQ(n, 10);
	ASSERT_EQ(next, T0 + 100);
	ASSERT_EQ(site_may_connect(s, 0, T0 + 50, &next), SITE_LIMIT_RATE);
	ASSERT_EQ(next, T0 + 100);
	ASSERT(site_take_token(s, T0 + 100, NULL));
	ASSERT(!site_take_token(s, T0 + 150, &next));
	ASSERT_EQ(next, T0 + 200);
	/* A slow rate: strict spacing, no burst. */
	l.max_rate = 0.5;
	l.min_rate = 0.5;
	site_set_limits(s, &l, T0 + 10 * SEC);
	ASSERT(site_take_token(s, T0 + 10 * SEC, NULL));
	ASSERT(!site_take_token(s, T0 + 11 * SEC, &next));
	ASSERT_EQ(next, T0 + 12 * SEC);
	site_free(s);
}

/* MX hosts: down on a failure, once per cohort, doubling, forgotten on success. */
TEST(hosts_down)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t until = 0, t = T0;
	char key[32];

	site_host_down(s, "192.0.2.1", t);
	ASSERT(site_host_is_down(s, "192.0.2.1", t + 1, &until));
	ASSERT_EQ(until, t + 5 * MINUTE);
	ASSERT(!site_host_is_down(s, "192.0.2.2", t + 1, NULL));
	/* Concurrent failures while down: nothing more. */
	site_host_down(s, "192.0.2.1", t + SEC);
	ASSERT(site_host_is_down(s, "192.0.2.1", t + SEC, &until));
	ASSERT_EQ(until, t + 5 * MINUTE);
	/* Each failed retry doubles, up to 8x. */
	static const int64_t want[] = { 10, 20, 40, 40 };
	for (size_t i = 0; i < ARRAY_SIZE(want); i++) {
		t = until;
		ASSERT(!site_host_is_down(s, "192.0.2.1", t, NULL));
		site_host_down(s, "192.0.2.1", t);
		ASSERT(site_host_is_down(s, "192.0.2.1", t, &until));
		ASSERT_EQ(until - t, want[i] * MINUTE);
	}
	/* The site is not touched. */
	ASSERT_EQ(site_conn_limit(s), 10);
	ASSERT_EQ(site_mode(s), SITE_NORMAL);
	/* A success forgets it. */
	site_host_up(s, "192.0.2.1");
	ASSERT(!site_host_is_down(s, "192.0.2.1", t, NULL));
	site_host_down(s, "192.0.2.1", t);
	ASSERT(site_host_is_down(s, "192.0.2.1", t, &until));
	ASSERT_EQ(until - t, 5 * MINUTE);
	/* A full table evicts the host back up soonest, not a new one. */
	for (int i = 0; i < SITE_MAX_HOSTS + 4; i++) {
		snprintf(key, sizeof key, "198.51.100.%d", i);
		site_host_down(s, key, t + i);
	}
	ASSERT(site_host_is_down(s, "198.51.100.19", t + 30, NULL));
	ASSERT(!site_host_is_down(s, "192.0.2.1", t + 30, NULL));
	site_free(s);
}

/* Reload keeps what was learned. */
TEST(set_limits_keeps_state)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);

	site_report(s, SITE_SIG_THROTTLE, T0, 0, NULL);		/* 5, 50 */
	l.max_conn = 20;
	l.max_rate = 200;
	site_set_limits(s, &l, T0 + SEC);
	ASSERT_EQ(site_mode(s), SITE_THROTTLED);
	ASSERT_EQ(site_conn_limit(s), 5);
	ASSERT_NEAR(site_rate(s), 50);
	/* Recovery aims at the new ceilings, a step at a time. */
	site_report(s, SITE_SIG_OK, T0 + MINUTE, 0, NULL);
	ASSERT_EQ(site_conn_limit(s), 6);
	/* Lower ceilings clamp; at both ceilings the site is NORMAL. */
	l.max_conn = 4;
	l.max_rate = 30;
	site_set_limits(s, &l, T0 + MINUTE + SEC);
	ASSERT_EQ(site_conn_limit(s), 4);
	ASSERT_NEAR(site_rate(s), 30);
	ASSERT_EQ(site_mode(s), SITE_NORMAL);
	/* A NORMAL site follows raised ceilings: nothing was learned. */
	l.max_conn = 8;
	l.max_rate = 80;
	site_set_limits(s, &l, T0 + 2 * MINUTE);
	ASSERT_EQ(site_conn_limit(s), 8);
	ASSERT_NEAR(site_rate(s), 80);
	/* A suspension survives a reload; raised floors apply. */
	site_report(s, SITE_SIG_SUSPEND, T0 + 3 * MINUTE, 0, NULL);
	l.min_conn = 2;
	l.min_rate = 2;
	site_set_limits(s, &l, T0 + 4 * MINUTE);
	ASSERT_EQ(site_mode(s), SITE_SUSPENDED);
	ASSERT_EQ(site_suspended_until(s), T0 + 18 * MINUTE);
	ASSERT_EQ(site_conn_limit(s), 2);
	ASSERT_NEAR(site_rate(s), 2);
	site_free(s);
}

/* serialize -> parse -> serialize is the identity; clamps and expiry on parse. */
TEST(persist_round_trip)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("mx.example.com", &l, T0), *p = NULL;
	struct buf a, b;

	buf_init(&a);
	buf_init(&b);
	site_report(s, SITE_SIG_OK, T0, 0, NULL);
	site_report(s, SITE_SIG_THROTTLE, T0 + SEC, 600,
	    "421 4.7.0 Try again later, key=value +plus\tTab");
	site_report(s, SITE_SIG_OK, T0 + 2 * MINUTE, 0, NULL);
	site_host_down(s, "[2001:db8::1]:25 mx1", T0 + 2 * MINUTE);
	ASSERT_EQ(site_learn_msgs_per_conn(s, 20, T0 + 2 * MINUTE),
	    SITE_FX_DECREASE);
	site_serialize(s, &a);
	ASSERT(strncmp(a.data, "v=1 name=mx.example.com mode=throttled ", 39) == 0);
	ASSERT(a.data[a.len - 1] == '\n');
	ASSERT(strchr(a.data, '\t') == NULL);
	ASSERT_EQ(site_parse(a.data, &l, &p, T0 + 2 * MINUTE), 0);
	site_serialize(p, &b);
	ASSERT_STR_EQ(a.data, b.data);
	ASSERT_EQ(site_conn_limit(p), 6);
	ASSERT_NEAR(site_rate(p), 60);
	ASSERT(site_host_is_down(p, "[2001:db8::1]:25 mx1", T0 + 3 * MINUTE, NULL));
	ASSERT_EQ(site_msgs_per_conn(p, T0 + 3 * MINUTE), 20);
	buf_reset(&b);
	site_to_json(p, T0 + 2 * MINUTE, &b);
	ASSERT(strstr(b.data, "\"last_reply\":\"421 4.7.0 Try again later, "
	    "key=value +plus\\tTab\"") != NULL);
	ASSERT(strstr(b.data, "\"recent\":{\"ok\":2,\"throttle\":1,") != NULL);
	site_free(p);

	/* Lower ceilings on restart: clamped. */
	struct site_limits l2 = l;
	l2.max_conn = 3;
	l2.max_rate = 40;
	ASSERT_EQ(site_parse(a.data, &l2, &p, T0 + 3 * MINUTE), 0);
	ASSERT_EQ(site_conn_limit(p), 3);
	ASSERT_NEAR(site_rate(p), 40);
	ASSERT_EQ(site_mode(p), SITE_NORMAL);
	site_free(p);

	/* A suspension survives a restart... */
	site_report(s, SITE_SIG_SUSPEND, T0 + 10 * MINUTE, 0, "554 blocked");
	buf_reset(&a);
	site_serialize(s, &a);
	ASSERT_EQ(site_parse(a.data, &l, &p, T0 + 11 * MINUTE), 0);
	ASSERT_EQ(site_mode(p), SITE_SUSPENDED);
	ASSERT_EQ(site_suspended_until(p), T0 + 25 * MINUTE);
	ASSERT_EQ(site_may_connect(p, 0, T0 + 11 * MINUTE, NULL),
	    SITE_LIMIT_SUSPENDED);
	site_free(p);
	/* ...and one that ended while we were down is a probe. */
	ASSERT_EQ(site_parse(a.data, &l, &p, T0 + 30 * MINUTE), 0);
	ASSERT_EQ(site_mode(p), SITE_PROBING);
	ASSERT_EQ(site_conn_limit(p), 1);
	ASSERT_EQ(site_may_connect(p, 1, T0 + 30 * MINUTE, NULL), SITE_LIMIT_PROBE);
	/* The escalation is remembered too. */
	site_report(p, SITE_SIG_THROTTLE, T0 + 31 * MINUTE, 0, NULL);
	ASSERT_EQ(site_suspended_until(p), T0 + 61 * MINUTE);
	site_free(p);

	site_free(s);
	buf_free(&a);
	buf_free(&b);
}

/* Lines that are not exactly ours are refused. */
TEST(parse_rejects)
{
	struct site_limits l = lim_test();
	struct site *keep = site_new("x", &l, T0), *p = keep;	/* reset to NULL? */
	static const char *const bad[] = {
		"",
		"v=2 name=a mode=normal conn=1 rate=1",
		"name=a v=1 mode=normal conn=1 rate=1",
		"v=1 mode=normal conn=1 rate=1",
		"v=1 name=a mode=sleepy conn=1 rate=1",
		"v=1 name=a mode=normal conn=1 rate=1 color=red",
		"v=1 name=a mode=normal conn=1 conn=2 rate=1",
		"v=1 name=a mode=normal conn=x rate=1",
		"v=1 name=a mode=normal conn=1 rate=-1",
		"v=1 name=a mode=normal conn=1 rate=nan",
		"v=1 name=a+4 mode=normal conn=1 rate=1",
		"v=1 name=a mode=normal conn=1 rate=1 r_ok=5:1,2,3",
		"v=1 name=a mode=normal conn=1 rate=1 host=x,5",
		"v=1 name=a mode=normal conn=1 rate=1\nv=1",
	};

	for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
		if (site_parse(bad[i], &l, &p, T0) != RELAY_ECORRUPT) {
			fprintf(stderr, "accepted: %s\n", bad[i]);
			ASSERT(0);
		}
		ASSERT(p == NULL);
		p = keep;
	}
	site_free(keep);
	/* A site that learned nothing round-trips too (empty reply). */
	struct site *s = site_new("quiet.example", &l, T0);
	struct buf a, b;
	buf_init(&a);
	buf_init(&b);
	site_serialize(s, &a);
	ASSERT(strstr(a.data, " last_reply= ") != NULL);
	ASSERT_EQ(site_parse(a.data, &l, &p, T0 + HOUR), 0);
	site_serialize(p, &b);
	ASSERT_STR_EQ(a.data, b.data);
	site_free(p);
	site_free(s);
	buf_free(&a);
	buf_free(&b);
	/* The minimal line is fine. */
	ASSERT_EQ(site_parse("v=1 name=a mode=throttled conn=2 rate=3.5\n", &l, &p,
	    T0), 0);
	ASSERT_EQ(site_conn_limit(p), 2);
	ASSERT_NEAR(site_rate(p), 3.5);
	site_free(p);
}

/* A wall clock that steps back does not stretch a suspension. */
TEST(clock_steps_back)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t next = 0;

	site_report(s, SITE_SIG_SUSPEND, T0, 0, NULL);
	ASSERT_EQ(site_may_connect(s, 0, T0 + 5 * MINUTE, &next),
	    SITE_LIMIT_SUSPENDED);
	/* The clock goes back an hour: 10 minutes are still left. */
	ASSERT_EQ(site_may_connect(s, 0, T0 + 5 * MINUTE - HOUR, &next),
	    SITE_LIMIT_SUSPENDED);
	ASSERT_EQ(next, T0 + 15 * MINUTE - HOUR);
	site_free(s);
}

/*
 * A throttle holds the site: 1 s, then doubling with each refusal that
 * comes after a hold, up to 5 min; refusals during a hold (sent before
 * it) are one burst; a delivery during the hold does not end the episode,
 * one after it does, and the next episode starts at 1 s again.
 */
TEST(throttle_backoff_hold)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t t = T0, next = 0;

	ASSERT(site_report(s, SITE_SIG_THROTTLE, t, 0, NULL) & SITE_FX_HOLD);
	ASSERT_EQ(site_may_connect(s, 0, t + 999, &next), SITE_LIMIT_HOLD);
	ASSERT_EQ(next, t + SEC);
	ASSERT(!site_take_token(s, t + 500, &next));
	ASSERT_EQ(next, t + SEC);
	/* Nine more of the same burst: nothing. */
	for (int i = 1; i < 10; i++)
		ASSERT_EQ(site_report(s, SITE_SIG_THROTTLE, t + i * 50, 0, NULL), 0);
	/* A delivery sent before the hold: the episode goes on. */
	site_report(s, SITE_SIG_OK, t + 600, 0, NULL);
	static const int64_t hold_s[] = { 2, 4, 8, 16, 32, 64, 128, 256, 300, 300 };
	t += SEC;
	for (size_t i = 0; i < ARRAY_SIZE(hold_s); i++) {
		ASSERT_EQ(site_may_connect(s, 0, t, NULL), 0);
		ASSERT(site_report(s, SITE_SIG_THROTTLE, t, 0, NULL) & SITE_FX_HOLD);
		site_may_connect(s, 0, t, &next);
		ASSERT_EQ(next, t + hold_s[i] * SEC);
		t = next;
	}
	/* After a hold: one connection, one message, until its outcome. */
	ASSERT_EQ(site_may_connect(s, 1, t, NULL), SITE_LIMIT_PROBE);
	ASSERT(site_take_token(s, t, NULL));
	ASSERT(!site_take_token(s, t + 10, &next));
	ASSERT_EQ(next, t + 300 * SEC);		/* or a backoff without one */
	/* A hint longer than the backoff wins. */
	site_report(s, SITE_SIG_THROTTLE, t, 600, NULL);
	site_may_connect(s, 0, t, &next);
	ASSERT_EQ(next, t + 600 * SEC);
	t = next;
	/* A delivery after the hold ends the episode: the next one starts
	 * at 1 s. */
	ASSERT(site_take_token(s, t, NULL));
	site_report(s, SITE_SIG_OK, t, 0, NULL);
	site_report(s, SITE_SIG_THROTTLE, t + SEC, 0, NULL);
	site_may_connect(s, 0, t + SEC, &next);
	ASSERT_EQ(next, t + 2 * SEC);
	site_free(s);
}

/*
 * A receiver that refuses again after a hold has a quota per window: at
 * the end of the episode the rate drops to what it accepted over the
 * whole cycle. A single refusal changes nothing beyond the cut.
 */
TEST(episode_sets_accepted_rate)
{
	struct site_limits l = lim_test();

	l.min_rate = 0.1;
	struct site *s = site_new("a", &l, T0);
	int64_t t = T0, next;
	unsigned fx;

	/* 120 accepted in 1.2 s, then refusals after 1, 2, 4, 8, 16 and 32 s
	 * of hold; the 64 s hold ends at +64.2 s and that delivery ends it. */
	for (int i = 0; i < 120; i++, t += 10) {
		while (!site_take_token(s, t, &next))
			t = next;
		site_report(s, SITE_SIG_OK, t, 0, NULL);
	}
	ASSERT(site_report(s, SITE_SIG_THROTTLE, t, 0, NULL) & SITE_FX_DECREASE);
	ASSERT(site_rate(s) > 10);		/* half of a burst rate */
	for (int i = 0; i < 6; i++) {
		site_may_connect(s, 0, t, &next);
		t = next;
		ASSERT(site_take_token(s, t, NULL));
		site_report(s, SITE_SIG_THROTTLE, t, 0, NULL);
	}
	site_may_connect(s, 0, t, &next);
	t = next;
	ASSERT_EQ(t, T0 + 1200 + 127 * SEC);
	ASSERT(site_take_token(s, t, NULL));
	fx = site_report(s, SITE_SIG_OK, t, 0, NULL);
	ASSERT(fx & SITE_FX_DECREASE);
	/* 120 (+0 of this cycle) over 128.2 s. */
	ASSERT_NEAR(site_rate(s), 120.0 / 128.2);
	ASSERT_EQ(site_mode(s), SITE_THROTTLED);

	/* A single refusal: the usual cut, no more. */
	struct site *s2 = site_new("b", &l, T0);
	t = T0;
	for (int i = 0; i < 50; i++, t += 100) {
		ASSERT(site_take_token(s2, t, NULL));
		site_report(s2, SITE_SIG_OK, t, 0, NULL);
	}
	site_report(s2, SITE_SIG_THROTTLE, t, 0, NULL);
	double cut = site_rate(s2);
	ASSERT_NEAR(cut, 5);		/* 10/s in use, halved */
	t += SEC;
	ASSERT(site_take_token(s2, t, NULL));
	ASSERT_EQ(site_report(s2, SITE_SIG_OK, t, 0, NULL), SITE_FX_RESUME);
	ASSERT_NEAR(site_rate(s2), cut);
	site_free(s2);
	site_free(s);
}

/* Time held is not time the rate was in use. */
TEST(held_time_not_in_use)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	int64_t t;

	site_report(s, SITE_SIG_THROTTLE, T0, 0, NULL);	/* 50/s, held 1 s */
	ASSERT_NEAR(site_rate(s), 50);
	site_report(s, SITE_SIG_OK, T0 + 1500, 0, NULL);	/* episode over */
	/* A receiver hint holds 60 s; then 4/s for 10 s. */
	site_report(s, SITE_SIG_CONN_FAIL, T0 + 2 * SEC, 60, NULL);
	for (t = T0 + 62 * SEC; t < T0 + 72 * SEC; t += 250)
		ASSERT(site_take_token(s, t, NULL));
	/* A new episode, a window after the cut: 40 tokens over the 11 s
	 * not held since the rate changed, halved; not 40 over 72 s. */
	site_report(s, SITE_SIG_THROTTLE, t, 0, NULL);
	ASSERT_NEAR(site_rate(s), 40.0 / 11 / 2);
	site_free(s);
}

/* The connection rate: max_conn at once, then one per 1/conn_rate. */
TEST(connection_rate)
{
	struct site_limits l = lim_test();
	struct site *s;
	int64_t next;

	l.max_conn = 3;
	l.conn_rate = 0.5;		/* 30/min */
	s = site_new("a", &l, T0);
	for (int i = 0; i < 3; i++) {
		ASSERT_EQ(site_may_connect(s, 0, T0, NULL), 0);
		site_conn_open(s, T0);
	}
	ASSERT_EQ(site_may_connect(s, 0, T0, &next), SITE_LIMIT_CONN_RATE);
	ASSERT_EQ(next, T0 + 2 * SEC);
	ASSERT_EQ(site_may_connect(s, 0, T0 + 2 * SEC, NULL), 0);
	site_conn_open(s, T0 + 2 * SEC);
	/* An MX fallback opens one more anyway: the next waits longer. */
	site_conn_open(s, T0 + 2 * SEC);
	site_may_connect(s, 0, T0 + 2 * SEC, &next);
	ASSERT_EQ(next, T0 + 6 * SEC);
	/* A token is looked at, not taken, by may_connect. */
	ASSERT_EQ(site_may_connect(s, 0, T0 + 6 * SEC, NULL), 0);
	ASSERT_EQ(site_may_connect(s, 0, T0 + 6 * SEC, NULL), 0);
	site_free(s);

	/* Without one, nothing limits the pace. */
	l.conn_rate = 0;
	s = site_new("b", &l, T0);
	for (int i = 0; i < 100; i++)
		site_conn_open(s, T0);
	ASSERT_EQ(site_may_connect(s, 0, T0, NULL), 0);
	site_free(s);
}

/* "Max message per connection reached": the lowest count is kept. */
TEST(learned_messages_per_connection)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	struct buf b;

	ASSERT_EQ(site_msgs_per_conn(s, T0), 0);
	ASSERT_EQ(site_learn_msgs_per_conn(s, 0, T0), 0);	/* no count */
	ASSERT_EQ(site_learn_msgs_per_conn(s, 20, T0), SITE_FX_DECREASE);
	ASSERT_EQ(site_learn_msgs_per_conn(s, 25, T0), 0);
	ASSERT_EQ(site_learn_msgs_per_conn(s, 20, T0), 0);
	ASSERT_EQ(site_learn_msgs_per_conn(s, 19, T0 + HOUR), SITE_FX_DECREASE);
	ASSERT_EQ(site_msgs_per_conn(s, T0 + HOUR), 19);
	/* Forgotten 24 h after the last reply that taught it. */
	ASSERT_EQ(site_msgs_per_conn(s, T0 + 25 * HOUR), 19);
	ASSERT_EQ(site_msgs_per_conn(s, T0 + 25 * HOUR + 1), 0);
	ASSERT_EQ(site_learn_msgs_per_conn(s, 30, T0 + 26 * HOUR),
	    SITE_FX_DECREASE);
	ASSERT_EQ(site_msgs_per_conn(s, T0 + 26 * HOUR), 30);
	/* Not a throttle: the limits and the mode stay. */
	ASSERT_EQ(site_mode(s), SITE_NORMAL);
	ASSERT_EQ(site_conn_limit(s), 10);
	buf_init(&b);
	site_to_json(s, T0 + 26 * HOUR, &b);
	ASSERT(strstr(b.data, "\"msgs_per_conn\":30") != NULL);
	buf_free(&b);
	site_free(s);
}

/* A greylisted or deferred probe also ends an episode; nothing else. */
TEST(answer_ends_episode)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);

	site_report(s, SITE_SIG_THROTTLE, T0, 0, NULL);
	ASSERT_EQ(site_answered(s, T0 + 500), 0);	/* sent before the hold */
	ASSERT_EQ(site_may_connect(s, 1, T0 + SEC, NULL), SITE_LIMIT_PROBE);
	ASSERT_EQ(site_answered(s, T0 + SEC), SITE_FX_RESUME);
	ASSERT_EQ(site_may_connect(s, 1, T0 + SEC, NULL), 0);
	ASSERT_EQ(site_answered(s, T0 + 2 * SEC), 0);	/* no episode now */
	ASSERT_EQ(site_conn_limit(s), 5);		/* no increase */
	site_free(s);
}

/* relayctl's view. */
TEST(json)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("gmail", &l, T0);
	struct buf b;

	buf_init(&b);
	site_report(s, SITE_SIG_SUSPEND, T0, 0, "421 \"quoted\"");
	site_to_json(s, T0 + SEC, &b);
	ASSERT(strstr(b.data, "\"name\":\"gmail\",\"mode\":\"suspended\"") != NULL);
	ASSERT(strstr(b.data, "\"conn\":1,\"conn_max\":10,\"conn_min\":1") != NULL);
	ASSERT(strstr(b.data, "\"last_reply\":\"421 \\\"quoted\\\"\"") != NULL);
	ASSERT(strstr(b.data, "\"suspended_until\":1700000900000") != NULL);
	/* The mode as of now, even before any call noticed the end. */
	buf_reset(&b);
	site_to_json(s, T0 + HOUR, &b);
	ASSERT(strstr(b.data, "\"mode\":\"probing\"") != NULL);
	ASSERT(b.data[0] == '{' && b.data[b.len - 1] == '}');
	buf_reset(&b);
	site_to_text(s, &b);
	ASSERT_STR_EQ(b.data, "site=gmail mode=suspended conn=1/10 rate=1.000/100.000"
	    " until=1700000900000 suspensions=1");
	buf_free(&b);
	site_free(s);
}

/*
 * Simulated receivers. WINDOW accepts at most limit*60 messages in any
 * 60 s (a per-minute counter, bursts allowed); BUCKET is a strict token
 * bucket of limit/s with one second of burst; CONNS limits concurrent
 * sessions (checked at the greeting) and nothing else.
 */
enum rcv_kind { RCV_WINDOW, RCV_BUCKET };

struct rcv {
	enum rcv_kind kind;
	double limit;			/* msgs/s */
	uint32_t slot[600];		/* WINDOW: accepted per 100 ms */
	int64_t head;			/* WINDOW: newest slot number */
	uint64_t sum;			/* WINDOW: accepted in the window */
	double tokens;			/* BUCKET */
	int64_t last;			/* BUCKET: last refill */
};

static bool
rcv_accept(struct rcv *r, int64_t now)
{
	if (r->kind == RCV_BUCKET) {
		if (r->last == 0)
			r->tokens = r->limit;
		else
			r->tokens += (double)(now - r->last) / 1000.0 * r->limit;
		if (r->tokens > r->limit)
			r->tokens = r->limit;
		r->last = now;
		if (r->tokens < 1)
			return false;
		r->tokens -= 1;
		return true;
	}
	int64_t b = now / TICK;
	if (r->head == 0)
		r->head = b;
	while (r->head < b) {
		r->head++;
		r->sum -= r->slot[r->head % 600];
		r->slot[r->head % 600] = 0;
	}
	if ((double)r->sum >= r->limit * 60)
		return false;
	r->slot[b % 600]++;
	r->sum++;
	return true;
}

struct tally {
	uint64_t ok;			/* accepted */
	uint64_t thr;			/* answered 421 */
};

/*
 * sim_rate - from..to in 100 ms steps: the sender has an endless backlog
 * and sends what site_take_token allows (at most offered msgs/s); each
 * message is answered at once and reported.
 */
static void
sim_rate(struct site *s, struct rcv *r, int64_t from, int64_t to,
    double offered, struct tally *ty, double *rates, size_t nrates)
{
	double budget = 0;

	for (int64_t t = from; t < to; t += TICK) {
		budget += offered * TICK / 1000.0;
		if (budget > offered)
			budget = offered;
		while (budget >= 1 && site_take_token(s, t, NULL)) {
			budget -= 1;
			if (rcv_accept(r, t)) {
				ty->ok++;
				site_report(s, SITE_SIG_OK, t, 0, NULL);
			} else {
				ty->thr++;
				site_report(s, SITE_SIG_THROTTLE, t, 0,
				    "421 4.7.0 rate limited");
			}
		}
		size_t i = (size_t)((t - from) / SEC);
		if (rates && (t - from) % SEC == 0 && i < nrates)
			rates[i] = site_rate(s);
	}
}

/* check_fixed_rate - converge on a receiver limit R; accepted >= 0.8 R, 421s <= 5 % */
static void
check_fixed_rate(enum rcv_kind kind, const char *what)
{
	static struct rcv r;
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	struct tally warm = { 0, 0 }, ty = { 0, 0 };
	const double R = 20;
	const int64_t conv = 10 * MINUTE, end = 2 * HOUR;

	memset(&r, 0, sizeof r);
	r.kind = kind;
	r.limit = R;
	sim_rate(s, &r, T0, T0 + conv, 200, &warm, NULL, 0);
	sim_rate(s, &r, T0 + conv, T0 + end, 200, &ty, NULL, 0);
	double acc = (double)ty.ok / ((double)(end - conv) / 1000.0) / R;
	double thr = (double)ty.thr / (double)(ty.ok + ty.thr);
	double all = (double)(warm.thr + ty.thr) /
	    (double)(warm.ok + warm.thr + ty.ok + ty.thr);
	printf("# %s R=%.0f/s: accepted %.3f R, 421s %.2f %% after %d min "
	    "(%.2f %% over the whole 2 h, %" PRIu64 " in the first %d min)\n",
	    what, R, acc, thr * 100, (int)(conv / MINUTE), all * 100,
	    warm.thr, (int)(conv / MINUTE));
	ASSERT(acc >= 0.8);
	ASSERT(acc <= 1.0 + 1e-9);
	ASSERT(thr <= 0.05);
	site_free(s);
}

TEST(receiver_per_minute_limit)
{
	check_fixed_rate(RCV_WINDOW, "per-minute receiver");
}

TEST(receiver_strict_rate_limit)
{
	check_fixed_rate(RCV_BUCKET, "token-bucket receiver");
}

/*
 * A receiver allowing C sessions at a time (421 at the greeting beyond).
 * Sessions carry 20 messages at 5/s each, then quit; the sender opens a
 * session whenever site_may_connect allows. The connection limit must
 * settle at or under C most of the time, with few 421s.
 */
TEST(receiver_connection_limit)
{
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	enum { C = 4, MAXS = 64 };
	int left[MAXS] = { 0 };		/* messages left per open session */
	int active = 0;
	uint64_t samples = 0, under = 0, conn_sum = 0, act_sum = 0;
	uint64_t sessions = 0, refused = 0, msgs = 0;
	const int64_t conv = 10 * MINUTE, end = 2 * HOUR;

	for (int64_t t = T0; t < T0 + end; t += TICK) {
		/* Each session sends one message every 200 ms. */
		if ((t / TICK) % 2 == 0) {
			for (int i = 0; i < MAXS; i++) {
				if (left[i] == 0 || !site_take_token(s, t, NULL))
					continue;
				msgs += t >= T0 + conv;
				site_report(s, SITE_SIG_OK, t, 0, NULL);
				if (--left[i] == 0)
					active--;
			}
		}
		while (site_may_connect(s, active, t, NULL) == 0) {
			sessions += t >= T0 + conv;
			if (active >= C) {
				refused += t >= T0 + conv;
				site_report(s, SITE_SIG_THROTTLE, t, 0,
				    "421 Too many sessions opened");
				continue;
			}
			for (int i = 0; i < MAXS; i++) {
				if (left[i] == 0) {
					left[i] = 20;
					break;
				}
			}
			active++;
		}
		if (t >= T0 + conv) {
			samples++;
			under += site_conn_limit(s) <= C;
			conn_sum += (uint64_t)site_conn_limit(s);
			act_sum += (uint64_t)active;
		}
	}
	double frac = (double)under / (double)samples;
	double mean = (double)act_sum / (double)samples;
	double thr = (double)refused / (double)(msgs + refused);
	printf("# connection limit C=%d: limit <= C %.1f %% of the time, mean limit "
	    "%.2f, mean sessions %.2f (%.0f %% of C), 421s %.2f %% of transactions, "
	    "%.2f %% of sessions\n", C, frac * 100,
	    (double)conn_sum / (double)samples, mean, mean / C * 100, thr * 100,
	    (double)refused / (double)sessions * 100);
	ASSERT(frac >= 0.75);
	ASSERT(mean >= 0.6 * C);
	ASSERT(thr <= 0.05);
	site_free(s);
}

/*
 * A quota per fixed window, as Postfix's anvil and fake-mx --rate count
 * it: at most Q messages in 60 s from the first one after the previous
 * window ended, refused beyond. An endless sender of N messages (replies
 * at once, 10 ms steps) must drain within 1.2 x N / (Q/min) with at most
 * 5 % of its transactions refused: the target of make bench-throttle.
 */
static void
check_fixed_window(int n, int q, double *ratio, double *share)
{
	struct site_limits l = lim_test();
	struct site *s;
	int64_t wstart = -1, last_ok = T0;

	l.min_rate = 1.0 / 60;		/* the default floor, under every q */
	s = site_new("a", &l, T0);
	int wcount = 0, sent = 0, refused = 0;

	for (int64_t t = T0; t < T0 + 4 * HOUR && sent < n; t += 10) {
		while (sent < n && site_take_token(s, t, NULL)) {
			if (wstart < 0 || t - wstart >= MINUTE) {
				wstart = t;
				wcount = 0;
			}
			if (wcount < q) {
				wcount++;
				sent++;
				last_ok = t;
				site_report(s, SITE_SIG_OK, t, 0, NULL);
			} else {
				refused++;
				site_report(s, SITE_SIG_THROTTLE, t, 0,
				    "421 4.7.0 Error: too much mail");
			}
		}
	}
	ASSERT_EQ(sent, n);
	*ratio = (double)(last_ok - T0) / 1000.0 / (n * 60.0 / q);
	*share = (double)refused / (double)(refused + sent);
	printf("# fixed window %d/min, %d messages: drained in %.2f x ideal, "
	    "%d refused (%.2f %% of transactions)\n", q, n, *ratio, refused,
	    *share * 100);
	site_free(s);
}

TEST(fixed_window_drain)
{
	double ratio, share;

	check_fixed_window(300, 120, &ratio, &share);	/* the bench's case */
	ASSERT(ratio <= 1.2);
	ASSERT(share <= 0.05);
	check_fixed_window(3000, 120, &ratio, &share);	/* long run */
	ASSERT(ratio <= 1.2);
	ASSERT(share <= 0.05);
	check_fixed_window(2000, 30, &ratio, &share);	/* a tight quota */
	ASSERT(ratio <= 1.2);
	ASSERT(share <= 0.05);
}

/*
 * A receiver that tightens from R to R/4 for 30 min, then relaxes: the
 * site follows down within a minute and a half, then climbs back without
 * ever stepping down, to 0.8 R within a bounded time.
 */
TEST(receiver_tightens_then_relaxes)
{
	static struct rcv r;
	static double rates[3 * 3600];
	struct site_limits l = lim_test();
	struct site *s = site_new("a", &l, T0);
	struct tally ty = { 0, 0 };
	const double R = 20;
	const int64_t t1 = T0 + 30 * MINUTE, t2 = t1 + 30 * MINUTE;
	size_t down = 0, up = 0;
	int steps = 0;

	memset(&r, 0, sizeof r);
	r.kind = RCV_WINDOW;
	r.limit = R;
	sim_rate(s, &r, T0, t1, 200, &ty, NULL, 0);
	double before = site_rate(s);
	r.limit = R / 4;
	sim_rate(s, &r, t1, t2, 200, &ty, rates, 1800);
	for (down = 0; down < 1800 && rates[down] > R / 4 * 1.25; down++)
		;
	/* Settled low for the rest of the tight period. */
	for (size_t i = down; i < 1800; i++)
		ASSERT(rates[i] <= R / 4 * 1.6);
	r.limit = R;
	sim_rate(s, &r, t2, t2 + HOUR, 200, &ty, rates, 3600);
	for (up = 0; up < 3600 && rates[up] < 0.8 * R; up++) {
		ASSERT(up == 0 || rates[up] >= rates[up - 1]);
		/* Gradual: at most one full step in any minute. */
		if (up >= 59)
			ASSERT(rates[up] - rates[up - 59] <=
			    l.rate_step * l.max_rate + 1e-9);
		if (up > 0 && rates[up] > rates[up - 1])
			steps++;
	}
	printf("# tighten %.0f -> %.0f /s: rate %.2f -> <= %.2f in %zu s; relax: "
	    "0.8 R again in %zu s (%d step(s) of <= 10/s a minute), monotone\n",
	    R, R / 4, before, R / 4 * 1.25, down, up, steps);
	ASSERT(down <= 90);
	ASSERT(up <= 15 * 60);
	ASSERT(up >= 60);		/* not before a clean interval */
	site_free(s);
}

TEST_MAIN("site",
    TEST_ENTRY(defaults_and_check),
    TEST_ENTRY(aimd_exact_steps),
    TEST_ENTRY(cut_from_use),
    TEST_ENTRY(one_decrease_per_window),
    TEST_ENTRY(throttle_after_step_undoes_it),
    TEST_ENTRY(conn_fail_cuts_connections_only),
    TEST_ENTRY(gradual_recovery),
    TEST_ENTRY(suspension_escalation_and_probing),
    TEST_ENTRY(hints_honoured),
    TEST_ENTRY(throttle_backoff_hold),
    TEST_ENTRY(episode_sets_accepted_rate),
    TEST_ENTRY(held_time_not_in_use),
    TEST_ENTRY(connection_rate),
    TEST_ENTRY(answer_ends_episode),
    TEST_ENTRY(learned_messages_per_connection),
    TEST_ENTRY(token_bucket),
    TEST_ENTRY(hosts_down),
    TEST_ENTRY(set_limits_keeps_state),
    TEST_ENTRY(persist_round_trip),
    TEST_ENTRY(parse_rejects),
    TEST_ENTRY(clock_steps_back),
    TEST_ENTRY(json),
    TEST_ENTRY(receiver_per_minute_limit),
    TEST_ENTRY(receiver_strict_rate_limit),
    TEST_ENTRY(receiver_connection_limit),
    TEST_ENTRY(fixed_window_drain),
    TEST_ENTRY(receiver_tightens_then_relaxes))
