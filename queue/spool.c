/*
 * NAME
 *	spool.c - the durable message queue on disk and its in-memory index
 *
 * SUMMARY
 *	Owns the spool directory (incoming/, queue/, quarantine/ and a lock
 *	file), the commit pipeline that makes a received message durable
 *	before the session answers 250, the recovery scan at start-up, and
 *	the index of committed envelopes, and the later life of a message:
 *	durable envelope updates and removal.
 *
 * DESCRIPTION
 *	A body is streamed into incoming/<id>.msg through a 64 KiB buffer
 *	with plain write(2): that only reaches the page cache, so it is
 *	cheap, and it is the one blocking call made on the loop thread (a
 *	documented decision: a thread-pool round trip per chunk would cost
 *	more than it saves). Everything that waits for the disk runs on the
 *	libuv thread pool:
 *
 *	  commit job (one per message, many in parallel):
 *	    flush the buffer, fsync the body, write and fsync
 *	    incoming/<id>.env, rename the body into queue/, then the
 *	    envelope (last: the presence of queue/<id>.env IS the commit).
 *	  dir-sync job (at most one in flight):
 *	    fsync(queue/) for every rename that finished before it began.
 *
 *	Group commit: renames that complete while a dir fsync is running
 *	wait in sp->wait_* and ride on the next one, so N concurrent commits
 *	cost N file fsyncs (which scale with threads) but far fewer
 *	directory fsyncs. Only after the dir fsync does a commit enter the
 *	index and its callback run.
 *
 *	The dir-sync batch holds struct spool_waiter, not messages, so an
 *	envelope update rides the same batches:
 *
 *	  update job (struct spool_op, one id at a time):
 *	    write queue/<id>.env.tmp, fsync it, rename it over <id>.env;
 *	    then wait for the next fsync(queue/), swap the new envelope into
 *	    the index, and call back.
 *	  remove job (queued behind the id's updates):
 *	    unlink <id>.env, then <id>.msg. No fsync: a crash that loses
 *	    the unlinks leaves an envelope whose recipients are all final,
 *	    which recovery removes; a crash between them leaves a body
 *	    without envelope, which recovery removes too.
 *
 *	Each index entry queues its own ops and runs the head only, so the
 *	updates of one id are serialised in call order (one tmp name per id
 *	suffices, and the last call wins), while different ids proceed in
 *	parallel and share directory fsyncs. A removal takes the entry out
 *	of the hash and the list at once; the detached entry lives on until
 *	its queue drains.
 *
 *	Queue ids are 16 lower-case hex digits: wall-clock seconds in the
 *	top 32 bits, a counter seeded from getrandom() in the bottom 32.
 *	They never decrease within a process and start above every id
 *	recovered, so they are unique in queue/ and sort by arrival.
 *
 * INVARIANTS
 *	The index (hash by id plus a list in id order) and every field of
 *	struct spool except the immutable directory fds are touched only on
 *	the loop thread. A worker touches only its own job struct and the
 *	directory fds, with one exception: an update's undo (below) reads
 *	the entry's current envelope, which is safe because only the
 *	completion of an op of that same id writes it, and that op is the
 *	one being undone. No callback runs inside the call that scheduled
 *	it. A callback with status 0 means body, envelope and the renames
 *	are on stable storage.
 *
 * ERRORS
 *	Functions return 0 or -errno. A failed commit removes every file it
 *	made, in incoming/ and queue/, before its callback reports -errno.
 *	A failed update leaves the old <id>.env in place (the tmp file is
 *	unlinked); if the rename happened but the fsync of queue/ failed,
 *	the old record is written back over it before the callback reports
 *	-errno (XXX best effort: the disk is failing by then).
 *	Recovery never fails on a bad entry: it logs and quarantines it; it
 *	fails only when a directory cannot be created, opened or read.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "queue/envelope.h"
#include "queue/spool.h"

#define SPOOL_WBUF	(64 * 1024)	/* body bytes buffered before write(2) */
#define SPOOL_ENV_MAX	(64 * 1024 * 1024)	/* largest envelope read back */
#define SPOOL_NBUCKETS	1024	/* initial hash size; doubles at load 1 */
#define SPOOL_NAME_MAX	(ENVELOPE_ID_LEN + sizeof ".env.tmp")

/* What a valid name in queue/ is, after its 16 hex digits. */
enum spool_kind {
	SPOOL_KIND_MSG,		/* <id>.msg, the body */
	SPOOL_KIND_ENV,		/* <id>.env, the envelope */
	SPOOL_KIND_TMP,		/* <id>.env.tmp, an unfinished rewrite */
};

/* Where a spool_msg is in its life. */
enum spool_msg_state {
	SPOOL_MSG_OPEN,		/* receiving body bytes */
	SPOOL_MSG_COMMITTING,	/* commit job on the thread pool */
	SPOOL_MSG_SYNCING,	/* renamed; waiting for a queue/ fsync */
};

/* What a spool_op does to a committed message. */
enum spool_op_kind {
	SPOOL_OP_UPDATE,	/* replace <id>.env durably */
	SPOOL_OP_REMOVE,	/* unlink <id>.env, then <id>.msg */
};

/*
 * A rename into queue/ that becomes durable with the next fsync of queue/.
 * undo runs on a worker thread if that fsync fails; done runs on the loop
 * thread after it, with its status.
 */
struct spool_waiter {
	struct spool_waiter *next;	/* next in sp->wait_* or the batch */
	void (*undo)(struct spool *, struct spool_waiter *);
	void (*done)(struct spool *, struct spool_waiter *, int);
};

/* A committed message in the index. */
struct spool_entry {
	struct envelope env;		/* owned; what spool_find returns */
	uint64_t key;			/* the id as a number: hash and order */
	struct spool_entry *hnext;	/* next in the hash chain */
	struct spool_entry *prev;	/* id order, towards older */
	struct spool_entry *next;	/* id order, towards newer */
	struct spool_op *ops;		/* queued ops; the head is running */
	struct spool_op **ops_tail;	/* append point of ops */
	bool detached;			/* removal requested: not indexed */
};

/*
 * An update or a removal of one committed message. It sits in its entry's
 * queue from the call until its completion; only the head runs.
 */
struct spool_op {
	struct spool *sp;		/* owner */
	struct spool_entry *e;		/* target, or NULL for an unknown id */
	struct spool_op *next;		/* next op queued on e */
	enum spool_op_kind kind;	/* see enum spool_op_kind */
	char id[ENVELOPE_ID_LEN + 1];	/* queue id, for paths and logs */
	struct envelope env;		/* update: the new envelope (owned) */
	struct buf text;		/* update: its record, for the worker */
	int err;			/* 0 or -errno, set by the worker */
	const char *step;		/* what failed, for the log */
	spool_done_cb cb;		/* update: NULL or the caller's callback */
	void *arg;			/* for cb */
	uint64_t t_start;		/* time_now_ms() when it started */
	uv_work_t work;			/* the job on the thread pool */
	struct spool_waiter waiter;	/* membership in a dir-sync batch */
};

struct spool {
	uv_loop_t *loop;		/* whose thread pool runs our jobs */
	char *dir;			/* spool root, for paths and logs */
	int lock_fd;			/* <dir>/lock, flock()ed while open */
	int incoming_fd;		/* incoming/, for *at() calls */
	int queue_fd;			/* queue/: the group-commit fsync target */
	int quarantine_fd;		/* quarantine/, used by recovery */
	uint32_t id_counter;		/* low 32 bits of the next id */
	uint64_t last_id;		/* largest id issued or recovered */

	struct spool_entry **buckets;	/* hash chains by key */
	size_t nbuckets;		/* a power of two */
	size_t count;			/* entries in the index */
	struct spool_entry *head;	/* oldest id */
	struct spool_entry *tail;	/* newest id: commits insert near it */

	unsigned jobs;			/* commit jobs on the thread pool */
	unsigned ops;			/* spool_ops queued, running or syncing */
	struct spool_waiter *wait_head;	/* renamed, need the next dir fsync */
	struct spool_waiter **wait_tail;	/* append point of that list */
	bool syncing;			/* the dir-sync job is in flight */
	uv_work_t sync_work;		/* that job; never two at once */
	struct spool_waiter *sync_batch;	/* what the in-flight fsync covers */
	int sync_status;		/* its result, 0 or -errno */
	unsigned sync_size;		/* waiters in the batch, for logs */
	unsigned done_size;		/* size of the batch being completed */
};

struct spool_msg {
	struct spool *sp;		/* owner */
	char id[ENVELOPE_ID_LEN + 1];	/* queue id, lower-case hex */
	enum spool_msg_state state;	/* see enum spool_msg_state */
	int fd;				/* incoming/<id>.msg or -1 */
	int err;			/* sticky first error, 0 or -errno */
	const char *step;		/* what failed, for the log */
	uint64_t size;			/* body bytes accepted */
	char *wbuf;			/* SPOOL_WBUF bytes, allocated lazily */
	size_t wlen;			/* bytes waiting in wbuf */
	struct envelope *env;		/* owned from spool_msg_commit on */
	struct buf envtext;		/* formatted env for the worker */
	spool_commit_cb cb;		/* NULL once aborted after commit */
	void *arg;			/* for cb */
	uint64_t t_commit;		/* time_now_ms() at commit, for logs */
	uv_work_t work;			/* the commit job */
	struct spool_waiter waiter;	/* membership in a dir-sync batch */
};

/* A name seen in queue/ during recovery. */
struct spool_found {
	uint64_t key;			/* its id */
	enum spool_kind kind;		/* .msg or .env (.tmp never kept) */
};

/* Counters reported by the recovery summary. */
struct spool_recovery {
	size_t messages;		/* indexed */
	size_t quarantined;		/* files moved to quarantine/ */
	size_t removed;			/* files deleted */
	size_t done;			/* final messages removed */
};

static int spool_mkdirs(struct spool *, char *, size_t);
static uint64_t spool_id_next(struct spool *);
static void spool_id_text(uint64_t, char *);
static bool spool_id_parse(const char *, size_t, uint64_t *);
static bool spool_name_parse(const char *, uint64_t *, enum spool_kind *);
static size_t spool_hash(const struct spool *, uint64_t);
static struct spool_entry *spool_lookup(const struct spool *, uint64_t);
static void spool_index_add(struct spool *, struct spool_entry *);
static void spool_index_grow(struct spool *);
static void spool_index_del(struct spool *, struct spool_entry *);
static struct spool_entry *spool_entry_find(const struct spool *,
    const char *);
static int spool_flush(struct spool_msg *);
static void spool_msg_free(struct spool_msg *);
static void spool_unlink_quiet(int, const char *, const char *);
static void spool_sync_kick(struct spool *);
static void spool_on_commit_work(uv_work_t *);
static void spool_on_commit_done(uv_work_t *, int);
static void spool_on_sync_work(uv_work_t *);
static void spool_on_sync_done(uv_work_t *, int);
static void spool_commit_undo(struct spool *, struct spool_waiter *);
static void spool_commit_synced(struct spool *, struct spool_waiter *, int);
static void spool_op_enqueue(struct spool_entry *, struct spool_op *);
static void spool_op_start(struct spool_op *);
static int spool_env_write(struct spool *, const char *, const struct buf *,
    const char **);
static void spool_on_op_work(uv_work_t *);
static void spool_on_op_done(uv_work_t *, int);
static void spool_remove_undo(struct spool *, struct spool_waiter *);
static void spool_remove_synced(struct spool *, struct spool_waiter *, int);
static void spool_op_undo(struct spool *, struct spool_waiter *);
static void spool_op_synced(struct spool *, struct spool_waiter *, int);
static void spool_op_finish(struct spool_op *, int);
static void spool_recover_done(struct spool *, struct spool_recovery *,
    const char *);
static int spool_recover(struct spool *, char *, size_t);
static int spool_recover_dir(struct spool *, struct spool_recovery *,
    struct spool_found **, size_t *, char *, size_t);
static const char *spool_recover_check(struct spool *, const char *,
    struct envelope *, char *, size_t);
static void spool_recover_one(struct spool *, struct spool_recovery *,
    uint64_t, bool, bool);
static void spool_remove(struct spool_recovery *, int, const char *,
    const char *, const char *);
static void spool_quarantine(struct spool *, struct spool_recovery *, int,
    const char *, const char *, const char *);
static int spool_found_cmp(const void *, const void *);

/* spool_open - create directories, lock, recover, index; see spool.h */
int
spool_open(uv_loop_t *loop, const char *dir, struct spool **out,
    char *err, size_t errlen)
{
	struct spool *sp;
	char *path;
	uint32_t seed;
	int rc;

	*out = NULL;
	if (err && errlen)
		err[0] = '\0';
	sp = xcalloc(1, sizeof *sp);
	sp->loop = loop;
	sp->dir = xstrdup(dir);
	sp->lock_fd = sp->incoming_fd = sp->queue_fd = sp->quarantine_fd = -1;
	sp->wait_tail = &sp->wait_head;
	sp->nbuckets = SPOOL_NBUCKETS;
	sp->buckets = xcalloc(sp->nbuckets, sizeof *sp->buckets);

	if ((rc = spool_mkdirs(sp, err, errlen)) != 0)
		goto fail;
	/*
	 * One process per spool: recovery empties incoming/, which would
	 * destroy a running daemon's messages in flight.
	 */
	path = xasprintf("%s/lock", dir);
	sp->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	rc = sp->lock_fd < 0 ? -errno : 0;
	if (rc == 0 && flock(sp->lock_fd, LOCK_EX | LOCK_NB) < 0)
		rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
	if (rc != 0)
		snprintf(err, errlen, "%s: %s", path, rc == -EBUSY ?
		    "spool in use by another process" : relay_strerror(rc));
	free(path);
	if (rc != 0)
		goto fail;
	/* Random low bits keep ids unique across restarts within a second. */
	if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
		seed = (uint32_t)time_now_ms() ^ ((uint32_t)getpid() << 16);
	sp->id_counter = seed;
	if ((rc = spool_recover(sp, err, errlen)) != 0)
		goto fail;
	*out = sp;
	return 0;
fail:
	spool_close(sp);
	return rc;
}

/* spool_close - free the index and close the fds; panics if still busy */
void
spool_close(struct spool *sp)
{
	struct spool_entry *e, *next;

	if (sp == NULL)
		return;
	if (spool_busy(sp))
		relay_panic("spool close while commits or updates are in "
		    "flight");
	for (e = sp->head; e != NULL; e = next) {
		next = e->next;
		envelope_free(&e->env);
		free(e);
	}
	if (sp->incoming_fd >= 0)
		close(sp->incoming_fd);
	if (sp->queue_fd >= 0)
		close(sp->queue_fd);
	if (sp->quarantine_fd >= 0)
		close(sp->quarantine_fd);
	if (sp->lock_fd >= 0)
		close(sp->lock_fd);	/* releases the flock */
	free(sp->buckets);
	free(sp->dir);
	free(sp);
}

/* spool_busy - a commit, an op, a dir fsync or a waiter is outstanding */
bool
spool_busy(const struct spool *sp)
{
	return sp->jobs > 0 || sp->ops > 0 || sp->syncing ||
	    sp->wait_head != NULL;
}

/*
 * spool_mkdirs - mkdir -p the root (mode 0700), then create and open
 * incoming/, queue/ and quarantine/ as directory fds.
 */
static int
spool_mkdirs(struct spool *sp, char *err, size_t errlen)
{
	static const char *const subs[] = { "incoming", "queue",
	    "quarantine" };
	int *fds[] = { &sp->incoming_fd, &sp->queue_fd, &sp->quarantine_fd };
	char *path = xstrdup(sp->dir);
	const char *what = "mkdir";
	int rc = path[0] == '\0' ? -EINVAL : 0;

	for (char *s = path + 1; rc == 0; s++) {
		if (*s != '/' && *s != '\0')
			continue;
		char c = *s;
		*s = '\0';
		if (mkdir(path, 0700) < 0 && errno != EEXIST)
			rc = -errno;
		*s = c;
		if (c == '\0')
			break;
	}
	for (size_t i = 0; i < ARRAY_SIZE(subs) && rc == 0; i++) {
		free(path);
		path = xasprintf("%s/%s", sp->dir, subs[i]);
		if (mkdir(path, 0700) < 0 && errno != EEXIST)
			rc = -errno;
		else if ((*fds[i] = open(path, O_RDONLY | O_DIRECTORY |
		    O_CLOEXEC)) < 0) {
			rc = -errno;
			what = "open";
		}
	}
	if (rc != 0)
		snprintf(err, errlen, "%s %s: %s", what, path,
		    relay_strerror(rc));
	free(path);
	return rc;
}

/* spool_id_next - a fresh id, larger than every id issued or recovered */
static uint64_t
spool_id_next(struct spool *sp)
{
	uint64_t id;

	id = (uint64_t)(uint32_t)time_wall() << 32 | sp->id_counter++;
	/* Counter wrap, a clock step back, or a queue from the future. */
	if (id <= sp->last_id)
		id = sp->last_id + 1;
	sp->last_id = id;
	return id;
}

/* spool_id_text - the 16-digit lower-case hex form of an id */
static void
spool_id_text(uint64_t key, char *out)
{
	snprintf(out, ENVELOPE_ID_LEN + 1, "%016" PRIx64, key);
}

/* spool_id_parse - exactly 16 lower-case hex digits to a number */
static bool
spool_id_parse(const char *s, size_t len, uint64_t *key)
{
	uint64_t v = 0;

	if (len != ENVELOPE_ID_LEN)
		return false;
	for (size_t i = 0; i < len; i++) {
		if (s[i] >= '0' && s[i] <= '9')
			v = v << 4 | (uint64_t)(s[i] - '0');
		else if (s[i] >= 'a' && s[i] <= 'f')
			v = v << 4 | (uint64_t)(s[i] - 'a' + 10);
		else
			return false;
	}
	*key = v;
	return true;
}

/* spool_name_parse - is name "<id>.msg", "<id>.env" or "<id>.env.tmp"? */
static bool
spool_name_parse(const char *name, uint64_t *key, enum spool_kind *kind)
{
	const char *suffix = name + ENVELOPE_ID_LEN;

	if (strnlen(name, ENVELOPE_ID_LEN) != ENVELOPE_ID_LEN ||
	    !spool_id_parse(name, ENVELOPE_ID_LEN, key))
		return false;
	if (strcmp(suffix, ".msg") == 0)
		*kind = SPOOL_KIND_MSG;
	else if (strcmp(suffix, ".env") == 0)
		*kind = SPOOL_KIND_ENV;
	else if (strcmp(suffix, ".env.tmp") == 0)
		*kind = SPOOL_KIND_TMP;
	else
		return false;
	return true;
}

/* spool_hash - bucket of a key (ids are sequential: mix the bits) */
static size_t
spool_hash(const struct spool *sp, uint64_t key)
{
	key ^= key >> 33;
	key *= UINT64_C(0xff51afd7ed558ccd);
	key ^= key >> 33;
	return (size_t)key & (sp->nbuckets - 1);
}

/* spool_lookup - the entry for key, or NULL */
static struct spool_entry *
spool_lookup(const struct spool *sp, uint64_t key)
{
	struct spool_entry *e;

	for (e = sp->buckets[spool_hash(sp, key)]; e != NULL; e = e->hnext)
		if (e->key == key)
			return e;
	return NULL;
}

/* spool_index_grow - double the bucket array and rehash */
static void
spool_index_grow(struct spool *sp)
{
	struct spool_entry *e;

	free(sp->buckets);
	sp->nbuckets *= 2;
	sp->buckets = xcalloc(sp->nbuckets, sizeof *sp->buckets);
	for (e = sp->head; e != NULL; e = e->next) {
		size_t h = spool_hash(sp, e->key);

		e->hnext = sp->buckets[h];
		sp->buckets[h] = e;
	}
}

/*
 * spool_index_add - insert into the hash and the id-ordered list. Commits
 * finish nearly in id order, so the walk back from the tail is short;
 * recovery inserts in sorted order, so it is O(1) there.
 */
static void
spool_index_add(struct spool *sp, struct spool_entry *e)
{
	struct spool_entry *after;
	size_t h;

	if (spool_lookup(sp, e->key) != NULL)
		relay_panic("%s spool index duplicate id", e->env.id);
	if (sp->count >= sp->nbuckets)
		spool_index_grow(sp);
	h = spool_hash(sp, e->key);
	e->hnext = sp->buckets[h];
	sp->buckets[h] = e;

	for (after = sp->tail; after != NULL && after->key > e->key;
	    after = after->prev)
		;
	e->prev = after;
	e->next = after ? after->next : sp->head;
	if (e->next)
		e->next->prev = e;
	else
		sp->tail = e;
	if (after)
		after->next = e;
	else
		sp->head = e;
	sp->count++;
}

/* spool_index_del - take an entry out of the hash and the list */
static void
spool_index_del(struct spool *sp, struct spool_entry *e)
{
	struct spool_entry **pp;

	for (pp = &sp->buckets[spool_hash(sp, e->key)]; *pp != e;
	    pp = &(*pp)->hnext)
		if (*pp == NULL)
			relay_panic("%s spool index entry missing", e->env.id);
	*pp = e->hnext;
	if (e->prev)
		e->prev->next = e->next;
	else
		sp->head = e->next;
	if (e->next)
		e->next->prev = e->prev;
	else
		sp->tail = e->prev;
	e->hnext = e->prev = e->next = NULL;
	sp->count--;
}

/* spool_entry_find - the indexed entry for an id in text form, or NULL */
static struct spool_entry *
spool_entry_find(const struct spool *sp, const char *id)
{
	uint64_t key;

	if (id == NULL || !spool_id_parse(id, strlen(id), &key))
		return NULL;
	return spool_lookup(sp, key);
}

/* spool_count - committed messages in the index */
size_t
spool_count(const struct spool *sp)
{
	return sp->count;
}

/* spool_foreach - visit in id order; fn must not change the index */
void
spool_foreach(const struct spool *sp,
    void (*fn)(void *arg, const struct envelope *env), void *arg)
{
	struct spool_entry *e, *next;

	for (e = sp->head; e != NULL; e = next) {
		next = e->next;
		fn(arg, &e->env);
	}
}

/* spool_find - the indexed envelope for an id, or NULL */
const struct envelope *
spool_find(const struct spool *sp, const char *id)
{
	struct spool_entry *e = spool_entry_find(sp, id);

	return e ? &e->env : NULL;
}

/* spool_body_open - open queue/<id>.msg of an indexed message read-only */
int
spool_body_open(struct spool *sp, const char *id, int *fd)
{
	char name[SPOOL_NAME_MAX];

	*fd = -1;
	if (spool_entry_find(sp, id) == NULL)
		return -ENOENT;
	snprintf(name, sizeof name, "%s.msg", id);
	/* A cheap syscall on the loop thread: no data is read here. */
	if ((*fd = openat(sp->queue_fd, name, O_RDONLY | O_CLOEXEC)) < 0)
		return -errno;
	return 0;
}

/* spool_env_update - queue a durable envelope rewrite; see spool.h */
void
spool_env_update(struct spool *sp, const struct envelope *env,
    spool_done_cb cb, void *arg)
{
	struct spool_op *op = xcalloc(1, sizeof *op);
	struct spool_entry *e;

	op->sp = sp;
	op->kind = SPOOL_OP_UPDATE;
	op->cb = cb;
	op->arg = arg;
	str_copy(op->id, env->id, sizeof op->id);
	envelope_copy(&op->env, env);
	buf_init(&op->text);
	sp->ops++;
	if ((e = spool_entry_find(sp, env->id)) == NULL) {
		/* Through the pool anyway: cb must not run inside this call. */
		op->err = -ENOENT;
		op->step = "lookup";
		spool_op_start(op);
		return;
	}
	/* The body never changes; recovery checks it against this size. */
	op->env.size = e->env.size;
	spool_op_enqueue(e, op);
}

/* spool_msg_remove - unindex now, unlink after queued updates; see spool.h */
void
spool_msg_remove(struct spool *sp, const char *id)
{
	struct spool_entry *e;
	struct spool_op *op;
	char lv[300];

	if ((e = spool_entry_find(sp, id)) == NULL) {
		log_warnx("spool remove unknown id=%s",
		    log_value(lv, sizeof lv, id ? id : ""));
		return;
	}
	spool_index_del(sp, e);
	e->detached = true;
	op = xcalloc(1, sizeof *op);
	op->sp = sp;
	op->kind = SPOOL_OP_REMOVE;
	str_copy(op->id, e->env.id, sizeof op->id);
	buf_init(&op->text);
	sp->ops++;
	spool_op_enqueue(e, op);
}

/* spool_op_enqueue - append op to its entry's queue; start it if first */
static void
spool_op_enqueue(struct spool_entry *e, struct spool_op *op)
{
	op->e = e;
	op->next = NULL;
	if (e->ops == NULL)
		e->ops_tail = &e->ops;
	*e->ops_tail = op;
	e->ops_tail = &op->next;
	/* Invariant: a non-empty queue has its head running. */
	if (e->ops == op)
		spool_op_start(op);
}

/* spool_op_start - format the record and hand the op to the pool */
static void
spool_op_start(struct spool_op *op)
{
	int rc;

	op->t_start = time_now_ms();
	if (op->kind == SPOOL_OP_UPDATE && op->err == 0)
		envelope_format(&op->env, &op->text);
	if ((rc = uv_queue_work(op->sp->loop, &op->work, spool_on_op_work,
	    spool_on_op_done)) != 0)
		relay_panic("%s spool uv_queue_work: %s", op->id,
		    uv_strerror(rc));
}

/*
 * spool_env_write - worker: write text to queue/<id>.env.tmp, fsync it and
 * rename it over <id>.env. On failure the tmp file is gone, <id>.env is
 * untouched, *step names what failed, and -errno is returned.
 */
static int
spool_env_write(struct spool *sp, const char *id, const struct buf *text,
    const char **step)
{
	char tmpname[SPOOL_NAME_MAX], envname[SPOOL_NAME_MAX];
	int fd, rc = 0;

	snprintf(tmpname, sizeof tmpname, "%s.env.tmp", id);
	snprintf(envname, sizeof envname, "%s.env", id);
	/* O_TRUNC: a leftover of a failed write is ours to overwrite. */
	*step = "write envelope";
	fd = openat(sp->queue_fd, tmpname, O_CREAT | O_TRUNC | O_WRONLY |
	    O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	rc = fd_write_all(fd, text->data, text->len);
	if (rc == 0 && fsync(fd) < 0) {
		rc = -errno;
		*step = "fsync envelope";
	}
	if (close(fd) < 0 && errno != EINTR && rc == 0)
		rc = -errno;
	if (rc == 0 && renameat(sp->queue_fd, tmpname, sp->queue_fd,
	    envname) < 0) {
		rc = -errno;
		*step = "rename envelope";
	}
	if (rc != 0)
		(void)unlinkat(sp->queue_fd, tmpname, 0);
	return rc;
}

/* spool_on_op_work - worker: rewrite or unlink, as the op says */
static void
spool_on_op_work(uv_work_t *req)
{
	struct spool_op *op = container_of(req, struct spool_op, work);
	struct spool *sp = op->sp;
	char name[SPOOL_NAME_MAX];

	/* No logging here: log_warn's strerror() is not thread-safe. */
	if (op->err != 0)
		return;
	if (op->kind == SPOOL_OP_UPDATE) {
		op->err = spool_env_write(sp, op->id, &op->text, &op->step);
		return;
	}
	/*
	 * Envelope first: a body left without it is an orphan recovery
	 * deletes, never a message. A missing file is already removed.
	 */
	snprintf(name, sizeof name, "%s.env", op->id);
	if (unlinkat(sp->queue_fd, name, 0) < 0 && errno != ENOENT) {
		/* Keep the body: the envelope still refers to it. */
		op->err = -errno;
		op->step = "unlink envelope";
		return;
	}
	snprintf(name, sizeof name, "%s.msg", op->id);
	if (unlinkat(sp->queue_fd, name, 0) < 0 && errno != ENOENT) {
		op->err = -errno;
		op->step = "unlink body";
	}
}

/* spool_on_op_done - loop: finish, or wait for the next queue/ fsync */
static void
spool_on_op_done(uv_work_t *req, int status)
{
	struct spool_op *op = container_of(req, struct spool_op, work);
	struct spool *sp = op->sp;

	/* We never uv_cancel() an op: the worker always ran. */
	if (status != 0)
		relay_panic("%s spool op job status=%d", op->id, status);
	if (op->err != 0) {
		spool_op_finish(op, op->err);
		return;
	}
	buf_free(&op->text);
	/* Both kinds become durable with the next (shared) queue/ fsync:
	 * a removal that a crash could undo would deliver again. */
	op->waiter.undo = op->kind == SPOOL_OP_UPDATE ? spool_op_undo :
	    spool_remove_undo;
	op->waiter.done = op->kind == SPOOL_OP_UPDATE ? spool_op_synced :
	    spool_remove_synced;
	op->waiter.next = NULL;
	*sp->wait_tail = &op->waiter;
	sp->wait_tail = &op->waiter.next;
	spool_sync_kick(sp);
}

/* spool_remove_undo - worker: an unlink cannot be taken back */
static void
spool_remove_undo(struct spool *sp, struct spool_waiter *w)
{
}

/* spool_remove_synced - loop: the unlinks are durable (or not) */
static void
spool_remove_synced(struct spool *sp, struct spool_waiter *w, int status)
{
	struct spool_op *op = container_of(w, struct spool_op, waiter);

	if (status != 0)
		op->step = "fsync queue";
	spool_op_finish(op, status);
}

/*
 * spool_op_undo - worker: the fsync of queue/ failed after our rename, so
 * put the previous record back (the index keeps it, and disk should agree).
 */
static void
spool_op_undo(struct spool *sp, struct spool_waiter *w)
{
	struct spool_op *op = container_of(w, struct spool_op, waiter);
	const char *step;
	struct buf old;

	/* Safe to read: only this op's completion would change e->env. */
	buf_init(&old);
	envelope_format(&op->e->env, &old);
	(void)spool_env_write(sp, op->id, &old, &step);
	buf_free(&old);
}

/* spool_op_synced - loop: the rename is durable (or not); index and report */
static void
spool_op_synced(struct spool *sp, struct spool_waiter *w, int status)
{
	struct spool_op *op = container_of(w, struct spool_op, waiter);

	if (status != 0) {
		op->step = "fsync queue";
	} else {
		/* Move the copy in; the old strings go now. */
		envelope_free(&op->e->env);
		op->e->env = op->env;
		envelope_init(&op->env);
	}
	spool_op_finish(op, status);
}

/*
 * spool_op_finish - loop: log, dequeue, start the id's next op, free the
 * op (and a removed entry whose queue is empty), then call back.
 */
static void
spool_op_finish(struct spool_op *op, int status)
{
	struct spool *sp = op->sp;
	struct spool_entry *e = op->e;
	spool_done_cb cb = op->cb;
	void *arg = op->arg;
	const char *what = op->kind == SPOOL_OP_UPDATE ? "update" : "remove";
	uint64_t ms = time_now_ms() - op->t_start;

	if (status != 0)
		log_warnx("%s spool %s failed step=\"%s\" error=\"%s\"",
		    op->id, what, op->step ? op->step : "?",
		    relay_strerror(status));
	else if (op->kind == SPOOL_OP_REMOVE)
		log_info("%s spool removed ms=%" PRIu64, op->id, ms);
	else
		log_trace(TRACE_SPOOL, "%s spool update batch=%u ms=%" PRIu64,
		    op->id, sp->done_size, ms);
	if (e != NULL) {
		if (e->ops != op)
			relay_panic("%s spool op finished out of order", op->id);
		e->ops = op->next;
		/* Before the callback: it may queue more on this id. */
		if (e->ops != NULL)
			spool_op_start(e->ops);
		else if (e->detached) {
			envelope_free(&e->env);
			free(e);
		}
	}
	envelope_free(&op->env);
	buf_free(&op->text);
	free(op);
	sp->ops--;
	if (cb)
		cb(arg, status);
}

/* spool_msg_new - allocate an id and create incoming/<id>.msg */
int
spool_msg_new(struct spool *sp, struct spool_msg **out)
{
	struct spool_msg *m;
	char name[SPOOL_NAME_MAX];
	int fd = -1;

	*out = NULL;
	m = xcalloc(1, sizeof *m);
	/* O_EXCL: a leftover of an id we reissue is never reused. */
	for (int tries = 0; tries < 64 && fd < 0; tries++) {
		spool_id_text(spool_id_next(sp), m->id);
		snprintf(name, sizeof name, "%s.msg", m->id);
		fd = openat(sp->incoming_fd, name,
		    O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
		if (fd < 0 && errno != EEXIST) {
			int rc = -errno;

			log_warnx("%s spool create error=%s", m->id,
			    relay_strerror(rc));
			free(m);
			return rc;
		}
	}
	if (fd < 0) {
		free(m);
		return -EEXIST;
	}
	m->sp = sp;
	m->fd = fd;
	m->state = SPOOL_MSG_OPEN;
	buf_init(&m->envtext);
	*out = m;
	return 0;
}

/* spool_msg_id - the queue id (valid until the message is gone) */
const char *
spool_msg_id(const struct spool_msg *m)
{
	return m->id;
}

/* spool_msg_size - body bytes accepted so far */
uint64_t
spool_msg_size(const struct spool_msg *m)
{
	return m->size;
}

/* spool_flush - write the buffer out; records a sticky error */
static int
spool_flush(struct spool_msg *m)
{
	int rc;

	if (m->wlen == 0)
		return 0;
	rc = fd_write_all(m->fd, m->wbuf, m->wlen);
	m->wlen = 0;
	if (rc != 0 && m->err == 0) {
		m->err = rc;
		m->step = "write";
	}
	return rc;
}

/* spool_msg_write - buffer, then write(2) full buffers; errors are sticky */
int
spool_msg_write(struct spool_msg *m, const void *data, size_t len)
{
	const char *p = data;
	int rc;

	if (m->state != SPOOL_MSG_OPEN)
		relay_panic("%s spool write after commit", m->id);
	if (m->err)
		return m->err;
	m->size += len;
	while (len > 0) {
		/* Big chunks skip the copy (the buffer is for small lines). */
		if (m->wlen == 0 && len >= SPOOL_WBUF) {
			if ((rc = fd_write_all(m->fd, p, len)) != 0) {
				m->err = rc;
				m->step = "write";
			}
			break;
		}
		if (m->wbuf == NULL)
			m->wbuf = xmalloc(SPOOL_WBUF);
		size_t n = SPOOL_WBUF - m->wlen;
		if (n > len)
			n = len;
		memcpy(m->wbuf + m->wlen, p, n);
		m->wlen += n;
		p += n;
		len -= n;
		if (m->wlen == SPOOL_WBUF && spool_flush(m) != 0)
			break;
	}
	if (m->err)
		log_warnx("%s spool write error=%s", m->id,
		    relay_strerror(m->err));
	return m->err;
}

/* spool_msg_free - release memory (files are the caller's business) */
static void
spool_msg_free(struct spool_msg *m)
{
	if (m->env) {
		envelope_free(m->env);
		free(m->env);
	}
	buf_free(&m->envtext);
	free(m->wbuf);
	free(m);
}

/* spool_unlink_quiet - unlinkat that ignores ENOENT (used for cleanup) */
static void
spool_unlink_quiet(int dirfd, const char *id, const char *suffix)
{
	char name[SPOOL_NAME_MAX];

	snprintf(name, sizeof name, "%s%s", id, suffix);
	(void)unlinkat(dirfd, name, 0);
}

/* spool_msg_abort - drop a message before commit, or detach after it */
void
spool_msg_abort(struct spool_msg *m)
{
	if (m->state != SPOOL_MSG_OPEN) {
		/* The commit completes; nobody is told. */
		m->cb = NULL;
		m->arg = NULL;
		return;
	}
	/*
	 * XXX unlink of a large body is a blocking call on the loop thread;
	 * it is rare (a dropped session) and cheap on ext4/xfs.
	 */
	close(m->fd);
	spool_unlink_quiet(m->sp->incoming_fd, m->id, ".msg");
	log_trace(TRACE_SPOOL, "%s spool abort size=%" PRIu64, m->id, m->size);
	spool_msg_free(m);
}

/* spool_msg_commit - queue the commit job; cb runs later; see spool.h */
void
spool_msg_commit(struct spool_msg *m, struct envelope *env,
    spool_commit_cb cb, void *arg)
{
	struct spool *sp = m->sp;
	int rc;

	if (m->state != SPOOL_MSG_OPEN)
		relay_panic("%s spool commit twice", m->id);
	m->state = SPOOL_MSG_COMMITTING;
	m->cb = cb;
	m->arg = arg;
	m->t_commit = time_now_ms();
	m->env = env;
	str_copy(env->id, m->id, sizeof env->id);
	env->size = m->size;
	if (m->err == 0)
		envelope_format(env, &m->envtext);
	/*
	 * Even a message with a sticky error goes through the pool: its
	 * cleanup (unlinking a possibly large body) blocks, and the
	 * callback must not run inside this call.
	 */
	sp->jobs++;
	if ((rc = uv_queue_work(sp->loop, &m->work, spool_on_commit_work,
	    spool_on_commit_done)) != 0)
		relay_panic("%s spool uv_queue_work: %s", m->id,
		    uv_strerror(rc));
}

/* spool_on_commit_work - worker: make files durable and rename them */
static void
spool_on_commit_work(uv_work_t *req)
{
	struct spool_msg *m = container_of(req, struct spool_msg, work);
	struct spool *sp = m->sp;
	char msgname[SPOOL_NAME_MAX], envname[SPOOL_NAME_MAX];
	int rc = m->err, fd = -1;

	/* No logging here: log_warn's strerror() is not thread-safe. */
	snprintf(msgname, sizeof msgname, "%s.msg", m->id);
	snprintf(envname, sizeof envname, "%s.env", m->id);
	if (rc == 0)
		rc = spool_flush(m);
	if (rc == 0 && fsync(m->fd) < 0) {
		rc = -errno;
		m->step = "fsync body";
	}
	/* close() may report a delayed write error (NFS). */
	if (close(m->fd) < 0 && errno != EINTR && rc == 0) {
		rc = -errno;
		m->step = "close body";
	}
	m->fd = -1;
	if (rc == 0) {
		m->step = "write envelope";
		fd = openat(sp->incoming_fd, envname,
		    O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
		if (fd < 0)
			rc = -errno;
	}
	if (rc == 0)
		rc = fd_write_all(fd, m->envtext.data, m->envtext.len);
	if (rc == 0 && fsync(fd) < 0) {
		rc = -errno;
		m->step = "fsync envelope";
	}
	if (fd >= 0 && close(fd) < 0 && errno != EINTR && rc == 0)
		rc = -errno;
	/* Body first: a queue/<id>.env always has its body beside it. */
	if (rc == 0 && renameat(sp->incoming_fd, msgname, sp->queue_fd,
	    msgname) < 0) {
		rc = -errno;
		m->step = "rename body";
	}
	if (rc == 0 && renameat(sp->incoming_fd, envname, sp->queue_fd,
	    envname) < 0) {
		rc = -errno;
		m->step = "rename envelope";
	}
	if (rc != 0) {
		/* Our id is unique, so anything under it is ours to remove. */
		spool_unlink_quiet(sp->queue_fd, m->id, ".env");
		spool_unlink_quiet(sp->queue_fd, m->id, ".msg");
		spool_unlink_quiet(sp->incoming_fd, m->id, ".env");
		spool_unlink_quiet(sp->incoming_fd, m->id, ".msg");
	}
	free(m->wbuf);
	m->wbuf = NULL;
	m->err = rc;
}

/* spool_on_commit_done - loop: report a failure, or join the dir-sync batch */
static void
spool_on_commit_done(uv_work_t *req, int status)
{
	struct spool_msg *m = container_of(req, struct spool_msg, work);
	struct spool *sp = m->sp;

	/* We never uv_cancel() a commit: the worker always ran. */
	if (status != 0)
		relay_panic("%s spool commit job status=%d", m->id, status);
	sp->jobs--;
	if (m->err != 0) {
		log_warnx("%s spool commit failed step=\"%s\" error=\"%s\"",
		    m->id, m->step ? m->step : "?", relay_strerror(m->err));
		if (m->cb)
			m->cb(m->arg, m->err, NULL);
		spool_msg_free(m);
		return;
	}
	buf_free(&m->envtext);
	m->state = SPOOL_MSG_SYNCING;
	m->waiter.undo = spool_commit_undo;
	m->waiter.done = spool_commit_synced;
	m->waiter.next = NULL;
	*sp->wait_tail = &m->waiter;
	sp->wait_tail = &m->waiter.next;
	spool_sync_kick(sp);
}

/* spool_sync_kick - start a dir fsync for the waiters, unless one runs */
static void
spool_sync_kick(struct spool *sp)
{
	struct spool_waiter *w;
	int rc;

	if (sp->syncing || sp->wait_head == NULL)
		return;
	/* The batch is exactly the renames finished before this fsync. */
	sp->sync_batch = sp->wait_head;
	sp->wait_head = NULL;
	sp->wait_tail = &sp->wait_head;
	sp->sync_size = 0;
	for (w = sp->sync_batch; w != NULL; w = w->next)
		sp->sync_size++;
	sp->syncing = true;
	sp->sync_status = 0;
	if ((rc = uv_queue_work(sp->loop, &sp->sync_work, spool_on_sync_work,
	    spool_on_sync_done)) != 0)
		relay_panic("spool uv_queue_work: %s", uv_strerror(rc));
}

/* spool_on_sync_work - worker: fsync queue/, undo the batch on failure */
static void
spool_on_sync_work(uv_work_t *req)
{
	struct spool *sp = container_of(req, struct spool, sync_work);
	struct spool_waiter *w;

	/* Only sync_batch, sync_status and the fds: the loop owns the rest. */
	if (fsync(sp->queue_fd) == 0)
		return;
	sp->sync_status = -errno;
	for (w = sp->sync_batch; w != NULL; w = w->next)
		w->undo(sp, w);
}

/* spool_on_sync_done - loop: complete the batch, start the next one */
static void
spool_on_sync_done(uv_work_t *req, int status)
{
	struct spool *sp = container_of(req, struct spool, sync_work);
	struct spool_waiter *w, *next;
	int rc = sp->sync_status;
	unsigned n = sp->sync_size;

	if (status != 0)
		relay_panic("spool dir sync job status=%d", status);
	w = sp->sync_batch;
	sp->sync_batch = NULL;
	sp->syncing = false;
	sp->done_size = n;
	if (rc != 0)
		log_warnx("spool dir sync failed batch=%u error=\"%s\"", n,
		    relay_strerror(rc));
	else
		log_trace(TRACE_SPOOL, "spool dir sync batch=%u", n);
	/* Start the next fsync before callbacks run: they may take time. */
	spool_sync_kick(sp);
	for (; w != NULL; w = next) {
		next = w->next;
		w->done(sp, w, rc);
	}
}

/* spool_commit_undo - worker: remove a commit whose dir fsync failed */
static void
spool_commit_undo(struct spool *sp, struct spool_waiter *w)
{
	struct spool_msg *m = container_of(w, struct spool_msg, waiter);

	/* Envelope first: without it the body is an orphan recovery removes. */
	spool_unlink_quiet(sp->queue_fd, m->id, ".env");
	spool_unlink_quiet(sp->queue_fd, m->id, ".msg");
}

/* spool_commit_synced - loop: index the envelope and tell the caller */
static void
spool_commit_synced(struct spool *sp, struct spool_waiter *w, int status)
{
	struct spool_msg *m = container_of(w, struct spool_msg, waiter);
	struct spool_entry *e;

	if (status != 0) {
		log_warnx("%s spool commit failed step=\"fsync queue\" "
		    "error=\"%s\"", m->id, relay_strerror(status));
		if (m->cb)
			m->cb(m->arg, status, NULL);
		spool_msg_free(m);
		return;
	}
	e = xcalloc(1, sizeof *e);
	/* The index embeds the struct; the heap shell is freed with m. */
	e->env = *m->env;
	envelope_init(m->env);
	if (!spool_id_parse(e->env.id, strlen(e->env.id), &e->key))
		relay_panic("%s spool bad id", e->env.id);
	spool_index_add(sp, e);
	log_info("%s spool commit size=%" PRIu64 " rcpts=%zu batch=%u "
	    "ms=%" PRIu64, m->id, m->size, e->env.nrcpts, sp->done_size,
	    time_now_ms() - m->t_commit);
	if (m->cb)
		m->cb(m->arg, 0, e->env.id);
	spool_msg_free(m);
}

/* spool_found_cmp - qsort order for recovery: by id, then kind */
static int
spool_found_cmp(const void *a, const void *b)
{
	const struct spool_found *x = a, *y = b;

	if (x->key != y->key)
		return x->key < y->key ? -1 : 1;
	return (int)x->kind - (int)y->kind;
}

/*
 * spool_recover - run at open: empty incoming/, validate queue/, index what
 * is whole. Fails only if a directory cannot be read.
 */
static int
spool_recover(struct spool *sp, char *err, size_t errlen)
{
	struct spool_recovery rec = { 0, 0, 0, 0 };
	struct spool_found *found = NULL;
	size_t nfound = 0, i, j;
	int rc;

	if ((rc = spool_recover_dir(sp, &rec, NULL, NULL, err, errlen)) != 0 ||
	    (rc = spool_recover_dir(sp, &rec, &found, &nfound, err,
	    errlen)) != 0) {
		free(found);
		return rc;
	}
	/* Sorted: pairs meet, and the index is built by appending. */
	if (nfound > 0)
		qsort(found, nfound, sizeof *found, spool_found_cmp);
	for (i = 0; i < nfound; i = j) {
		bool msg = false, env = false;

		for (j = i; j < nfound && found[j].key == found[i].key; j++) {
			if (found[j].kind == SPOOL_KIND_MSG)
				msg = true;
			else
				env = true;
		}
		spool_recover_one(sp, &rec, found[i].key, msg, env);
	}
	free(found);
	/*
	 * No directory fsync here: every action above is idempotent, and a
	 * crash that undoes one just makes the next start-up repeat it.
	 */
	log_info("spool recovered messages=%zu quarantined=%zu removed=%zu "
	    "done=%zu", rec.messages, rec.quarantined, rec.removed, rec.done);
	return 0;
}

/*
 * spool_recover_dir - walk incoming/ (found == NULL: unfinished sessions,
 * all removed) or queue/ (strictly named regular files go to *found,
 * *.env.tmp is an unfinished rewrite and removed, the rest quarantined).
 */
static int
spool_recover_dir(struct spool *sp, struct spool_recovery *rec,
    struct spool_found **found, size_t *nfound, char *err, size_t errlen)
{
	const char *sub = found ? "queue" : "incoming";
	size_t cap = 0;
	struct dirent *de;
	DIR *d;
	int fd, rc = 0;

	/* A fresh open file description: readdir must not move ours. */
	if ((fd = openat(found ? sp->queue_fd : sp->incoming_fd, ".",
	    O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 ||
	    (d = fdopendir(fd)) == NULL) {
		rc = -errno;
		if (fd >= 0)
			close(fd);
		snprintf(err, errlen, "%s/%s: %s", sp->dir, sub,
		    relay_strerror(rc));
		return rc;
	}
	while ((errno = 0, de = readdir(d)) != NULL) {
		const char *name = de->d_name;
		enum spool_kind kind = SPOOL_KIND_MSG;	/* incoming/: unused */
		struct stat st;
		uint64_t key = 0;

		if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
			continue;
		if (found && !spool_name_parse(name, &key, &kind)) {
			spool_quarantine(sp, rec, fd, sub, name, "bad name");
			continue;
		}
		/* d_type may be DT_UNKNOWN (xfs without ftype, some NFS). */
		if (de->d_type != DT_REG && (de->d_type != DT_UNKNOWN ||
		    fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		    !S_ISREG(st.st_mode))) {
			/* Not something we make: keep it for a human. */
			spool_quarantine(sp, rec, fd, sub, name,
			    "not a regular file");
			continue;
		}
		if (found == NULL || kind == SPOOL_KIND_TMP) {
			spool_remove(rec, fd, sub, name, NULL);
			continue;
		}
		if (*nfound == cap) {
			cap = cap ? cap * 2 : 1024;
			*found = xrealloc(*found, cap * sizeof **found);
		}
		(*found)[*nfound].key = key;
		(*found)[(*nfound)++].kind = kind;
	}
	if (errno != 0) {
		rc = -errno;
		snprintf(err, errlen, "readdir %s/%s: %s", sp->dir, sub,
		    relay_strerror(rc));
	}
	closedir(d);
	return rc;
}

/*
 * spool_recover_check - load queue/<id>.env into env and check it against
 * its name and its body. Returns NULL, or why it is bad (in why).
 */
static const char *
spool_recover_check(struct spool *sp, const char *id, struct envelope *env,
    char *why, size_t whylen)
{
	char name[SPOOL_NAME_MAX], *path, *text = NULL;
	struct stat st;
	size_t len;
	int rc;

	path = xasprintf("%s/queue/%s.env", sp->dir, id);
	rc = file_read_all(path, &text, &len, SPOOL_ENV_MAX);
	free(path);
	if (rc != 0) {
		snprintf(why, whylen, "read envelope: %s", relay_strerror(rc));
		return why;
	}
	rc = envelope_parse(text, len, env, why, whylen);
	free(text);
	if (rc != 0)
		return why;
	if (strcmp(env->id, id) != 0) {
		snprintf(why, whylen, "envelope id %s differs from its name",
		    env->id);
		return why;
	}
	snprintf(name, sizeof name, "%s.msg", id);
	if (fstatat(sp->queue_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		snprintf(why, whylen, "stat body: %s", relay_strerror(-errno));
		return why;
	}
	if ((uint64_t)st.st_size != env->size) {
		snprintf(why, whylen, "body size %jd differs from envelope "
		    "size %" PRIu64, (intmax_t)st.st_size, env->size);
		return why;
	}
	return NULL;
}

/* spool_recover_one - decide the fate of one id seen in queue/ */
static void
spool_recover_one(struct spool *sp, struct spool_recovery *rec,
    uint64_t key, bool have_msg, bool have_env)
{
	char id[ENVELOPE_ID_LEN + 1], msgname[SPOOL_NAME_MAX];
	char envname[SPOOL_NAME_MAX], why[256];
	struct spool_entry *e;
	const char *bad;

	spool_id_text(key, id);
	snprintf(msgname, sizeof msgname, "%s.msg", id);
	snprintf(envname, sizeof envname, "%s.env", id);
	if (!have_env) {
		/* Its commit never reached the envelope rename: never acked. */
		spool_remove(rec, sp->queue_fd, "queue", msgname,
		    "no envelope");
		return;
	}
	if (!have_msg) {
		spool_quarantine(sp, rec, sp->queue_fd, "queue", envname,
		    "body missing");
		return;
	}
	e = xcalloc(1, sizeof *e);
	if ((bad = spool_recover_check(sp, id, &e->env, why,
	    sizeof why)) != NULL) {
		envelope_free(&e->env);
		free(e);
		/* Body first: a lone .env is quarantined again next time. */
		spool_quarantine(sp, rec, sp->queue_fd, "queue", msgname, bad);
		spool_quarantine(sp, rec, sp->queue_fd, "queue", envname, bad);
		return;
	}
	if (key > sp->last_id)
		sp->last_id = key;
	if (envelope_is_done(&e->env)) {
		/* A removal the crash interrupted: nothing left to deliver. */
		envelope_free(&e->env);
		free(e);
		spool_recover_done(sp, rec, id);
		return;
	}
	e->key = key;
	spool_index_add(sp, e);
	rec->messages++;
}

/*
 * spool_recover_done - finish the removal of a message whose recipients are
 * all final: envelope first, then body, as spool_msg_remove does.
 */
static void
spool_recover_done(struct spool *sp, struct spool_recovery *rec,
    const char *id)
{
	char name[SPOOL_NAME_MAX];

	snprintf(name, sizeof name, "%s.env", id);
	if (unlinkat(sp->queue_fd, name, 0) < 0) {
		/* Not indexed either way; the next start tries again. */
		log_warn("spool recover unlink queue/%s", name);
		return;
	}
	snprintf(name, sizeof name, "%s.msg", id);
	if (unlinkat(sp->queue_fd, name, 0) < 0)
		log_warn("spool recover unlink queue/%s", name);
	rec->done++;
	log_info("spool recover removed=%s reason=done", id);
}

/* spool_remove - unlink <sub>/<name> during recovery and log it */
static void
spool_remove(struct spool_recovery *rec, int dirfd, const char *sub,
    const char *name, const char *reason)
{
	char lv[300];

	log_value(lv, sizeof lv, name);
	if (unlinkat(dirfd, name, 0) < 0) {
		log_warn("spool recover unlink %s/%s", sub, lv);
		return;
	}
	rec->removed++;
	if (reason)
		log_info("spool recover removed=%s/%s reason=\"%s\"", sub, lv,
		    reason);
	else
		log_info("spool recover removed=%s/%s", sub, lv);
}

/*
 * spool_quarantine - move <sub>/<name> to quarantine/ (with a numeric
 * suffix if that name is taken) and log a warning with the reason.
 */
static void
spool_quarantine(struct spool *sp, struct spool_recovery *rec, int dirfd,
    const char *sub, const char *name, const char *reason)
{
	char target[NAME_MAX + 16], lv[300], rv[300];
	struct stat st;

	log_value(lv, sizeof lv, name);
	log_value(rv, sizeof rv, reason);
	for (int n = 0; n < 1000; n++) {
		if (n == 0)
			snprintf(target, sizeof target, "%s", name);
		else
			snprintf(target, sizeof target, "%s.%d", name, n);
		if (fstatat(sp->quarantine_fd, target, &st,
		    AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT)
			break;
	}
	if (renameat(dirfd, name, sp->quarantine_fd, target) < 0) {
		log_warn("spool recover quarantine %s/%s reason=%s", sub, lv,
		    rv);
		return;
	}
	rec->quarantined++;
	log_warnx("spool recover quarantined=%s/%s reason=%s", sub, lv, rv);
}
