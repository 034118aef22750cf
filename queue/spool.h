/*
 * spool.h - the durable message queue on disk and its in-memory index.
 *
 * Layout under the spool directory:
 *   incoming/<id>.msg   body being received (streamed while DATA arrives)
 *   incoming/<id>.env   envelope written at commit time
 *   queue/<id>.msg      committed body (immutable)
 *   queue/<id>.env      committed envelope; its presence IS the commit
 *   queue/<id>.env.tmp  an envelope rewrite in progress (recovery drops it)
 *   quarantine/         entries that failed to parse at recovery
 *   lock                flock()ed while a process has the spool open
 *
 * Commit: fsync body and envelope on the libuv thread pool, rename the body
 * then the envelope into queue/, then fsync queue/. Directory fsyncs are
 * batched across concurrent commits (group commit). The commit callback
 * fires only after all of that, so a 250 sent from it survives a crash.
 *
 * Update: write queue/<id>.env.tmp, fsync it, rename it over <id>.env, and
 * ride the same batched fsync of queue/; only then does the index change
 * and the callback run, so a recipient recorded as delivered stays
 * delivered across a crash. Remove: unlink <id>.env, then <id>.msg; a
 * removal lost in a crash leaves an envelope whose recipients are all
 * final, and recovery finishes the job.
 */
#ifndef RELAY_SPOOL_H
#define RELAY_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "queue/envelope.h"

struct spool;
struct spool_msg;

/* spool_commit_cb - status 0 (durable) or -errno; the spool_msg is gone */
typedef void (*spool_commit_cb)(void *arg, int status, const char *id);

/* spool_done_cb - status 0 (durable) or -errno */
typedef void (*spool_done_cb)(void *arg, int status);

/*
 * spool_open - create the directories if needed and run the recovery scan:
 * incoming/ is emptied (unfinished sessions), queue/ entries are parsed
 * into the index, a corrupt or truncated one is moved to quarantine/ with
 * a log line, a body without an envelope is removed. Returns 0 or -errno /
 * RELAY_E*, with err filled for a human; -EBUSY if the spool is already
 * open (in this or another process).
 */
int spool_open(uv_loop_t *loop, const char *dir, struct spool **out,
    char *err, size_t errlen);

/*
 * spool_close - free the index. Commits, updates and removals still in
 * flight must have finished (run the loop until spool_busy() is false).
 */
void spool_close(struct spool *sp);
bool spool_busy(const struct spool *sp);

/* spool_msg_new - open incoming/<id>.msg for a new message; 0 or -errno */
int spool_msg_new(struct spool *sp, struct spool_msg **out);
const char *spool_msg_id(const struct spool_msg *m);
uint64_t spool_msg_size(const struct spool_msg *m);

/*
 * spool_msg_write - append body bytes (buffered; a full buffer is written
 * with write(2)). An error is sticky: later writes and the commit return it,
 * so a session can keep reading DATA and answer 452 at the end.
 */
int spool_msg_write(struct spool_msg *m, const void *data, size_t len);

/*
 * spool_msg_commit - make the message durable. Takes ownership of env,
 * which must be heap-allocated (the spool envelope_free()s and free()s it;
 * the caller forgets the pointer); its id and size are filled in here.
 * m, too, belongs to the spool from this call on. cb runs later from the
 * loop, never inside this call, with 0 once the message is durably queued
 * and indexed (id valid during the call), or -errno and a NULL id if it
 * could not be (then nothing of it remains on disk).
 */
void spool_msg_commit(struct spool_msg *m, struct envelope *env,
    spool_commit_cb cb, void *arg);

/*
 * spool_msg_abort - forget a message. Before commit: close and unlink its
 * files and free it. After spool_msg_commit: only detach the callback (the
 * commit completes; the client never saw 250, so at worst it resends).
 */
void spool_msg_abort(struct spool_msg *m);

/* spool_count - committed messages in the index */
size_t spool_count(const struct spool *sp);

/* spool_foreach - visit committed envelopes in queue-id (arrival) order */
void spool_foreach(const struct spool *sp,
    void (*fn)(void *arg, const struct envelope *env), void *arg);

/*
 * spool_find - the indexed envelope for an id, or NULL. The pointer is
 * valid until the next spool_env_update() of that id completes or
 * spool_msg_remove() is called for it; copy what must outlive that.
 */
const struct envelope *spool_find(const struct spool *sp, const char *id);

/*
 * spool_env_update - durably replace the envelope of a committed message
 * with a deep copy of env (matched by env->id; the caller keeps env). The
 * body is immutable, so the copy's size is taken from the index, not from
 * env. cb runs later from the loop, never inside this call: with 0 once
 * the new record is durable (<id>.env.tmp written and fsync'd, renamed
 * over <id>.env, queue/ fsync'd in a group-commit batch), and by then the
 * index holds the new envelope; or with -errno, and then the old envelope
 * stays on disk and in the index (-ENOENT: no such id, or its removal was
 * already requested). Updates of one id run one at a time in call order,
 * so the last call wins; updates of different ids run in parallel. cb may
 * be NULL; it may call back into the spool.
 */
void spool_env_update(struct spool *sp, const struct envelope *env,
    spool_done_cb cb, void *arg);

/*
 * spool_msg_remove - forget a message whose recipients are all final. It
 * leaves the index at once (spool_find returns NULL, later updates get
 * -ENOENT); the files go on the thread pool after any update of the id
 * still queued: <id>.env first, then <id>.msg, without a directory fsync.
 * If a crash loses the unlinks, recovery sees the final envelope again and
 * removes it then, so no recipient is delivered twice. (A message that
 * still has pending recipients comes back after such a crash: mark them
 * final with spool_env_update first.) An unknown id is logged and ignored.
 */
void spool_msg_remove(struct spool *sp, const char *id);

/*
 * spool_body_open - open the committed body of an indexed message
 * read-only (O_CLOEXEC) into *fd, for delivery and for DSNs; the caller
 * closes it. The file never changes, and an open fd stays readable even
 * after spool_msg_remove. Returns 0, -ENOENT if the id is not indexed,
 * or -errno from open(2).
 */
int spool_body_open(struct spool *sp, const char *id, int *fd);

#endif
