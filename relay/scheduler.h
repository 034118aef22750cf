/*
 * scheduler.h - what is delivered when, over how many connections.
 *
 * Queued recipients are grouped per message and destination domain into
 * work items. An item is either waiting for its time (in a min-heap driven
 * by one uv_timer_t: nothing scans the queue) or ready in its
 * destination's queue. A destination resolves its MX hosts once per TTL
 * and opens delivery sessions while its caps allow: a global cap, a cap
 * per destination, a cap per MX address. Sessions pull ready items one
 * transaction at a time, so one connection carries many messages.
 *
 * Outcomes are made durable with spool_env_update before anything is
 * forgotten; a message leaves the spool when every recipient is final.
 * Permanent failures and expiry produce an RFC 3464 bounce to the sender
 * (never for a null sender), queued like any other message.
 */
#ifndef RELAY_SCHEDULER_H
#define RELAY_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>

#include "config/config.h"
#include "queue/envelope.h"

struct relay;
struct sched;

/*
 * sched_new - start delivery: resolver, client TLS context, and every
 * pending recipient of the spool's index scheduled. 0 or error in err.
 */
int sched_new(struct relay *r, struct sched **out, char *err, size_t errlen);

/* sched_msg_queued - a message entered the spool (submission, bounce) */
void sched_msg_queued(struct sched *s, const char *id);

/* sched_reload - adopt new caps and timeouts; learned state stays */
void sched_reload(struct sched *s, const struct relay_config *cfg);

/* sched_stop - stop starting work, abort sessions (their txns are retried) */
void sched_stop(struct sched *s);

/*
 * sched_sites_report - the sites for relayctl: limits against ceilings,
 * mode, suspension, last throttle reply, sessions and messages waiting.
 */
void sched_sites_report(struct sched *s, struct buf *out, bool json);

/*
 * sched_explain - for relayctl queue show: each recipient of message id,
 * and for a pending one why it is not being delivered now and when it
 * will be tried. Returns false if the id is not queued.
 */
bool sched_explain(struct sched *s, const char *id, struct buf *out);

/* sched_busy - sessions or spool updates still outstanding */
bool sched_busy(const struct sched *s);

/* sched_free - after sched_stop and once !sched_busy; closes handles */
void sched_free(struct sched *s);

#endif
