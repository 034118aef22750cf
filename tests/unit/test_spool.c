/*
 * test_spool.c - unit tests for queue/spool.c against a real directory
 * under /tmp: commit durability and reopen, callback timing, group commit
 * under concurrency, abort, sticky write errors, the recovery scan and
 * quarantine, id order, bounded memory for large bodies, and the later
 * life of a message: envelope updates (durable, serialised per id,
 * parallel across ids, failing cleanly), removal, recovery of a removal
 * a crash interrupted, and reading the body back.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "config/log.h"
#include "config/util.h"
#include "queue/envelope.h"
#include "queue/spool.h"
#include "tests/unit/test.h"

/* What a commit callback saw. */
struct result {
	int calls;		/* times the callback ran */
	int status;		/* its status */
	char id[ENVELOPE_ID_LEN + 1];	/* its id, "" on failure */
};

/* One test's world: a loop, a temporary spool directory, a spool. */
struct fixture {
	uv_loop_t loop;		/* private loop, closed at the end */
	char dir[64];		/* mkdtemp result */
	struct spool *sp;	/* open spool or NULL */
};

static void fx_setup(struct fixture *);
static void fx_open(struct fixture *);
static void fx_reopen(struct fixture *);
static void fx_teardown(struct fixture *);
static int rm_entry(const char *, const struct stat *, int, struct FTW *);
static int count_files(const struct fixture *, const char *);
static bool file_exists(const struct fixture *, const char *, const char *);
static void put_file(const struct fixture *, const char *, const char *,
    const void *, size_t);
static struct envelope *make_env(const char *);
static void on_commit(void *, int, const char *);
static struct spool_msg *commit_one(struct fixture *, const char *,
    struct result *);
static void put_message(const struct fixture *, const char *, const char *,
    size_t);
static void collect_id(void *, const struct envelope *);
static const char *path_in(const struct fixture *, const char *, char *);
static void on_done(void *, int);
static void commit_wait(struct fixture *, const char *, char *);
static struct envelope *dup_indexed(struct fixture *, const char *);
static void put_message_env(const struct fixture *, struct envelope *,
    const char *);

/* fx_setup - fresh loop and directory, spool open */
static void
fx_setup(struct fixture *fx)
{
	log_init("test_spool", false, 0);
	ASSERT_EQ(uv_loop_init(&fx->loop), 0);
	str_copy(fx->dir, "/tmp/relay-spool-XXXXXX", sizeof fx->dir);
	ASSERT(mkdtemp(fx->dir) != NULL);
	fx->sp = NULL;
}

/* fx_open - open the spool, which runs recovery */
static void
fx_open(struct fixture *fx)
{
	char err[256];

	ASSERT_EQ(spool_open(&fx->loop, fx->dir, &fx->sp, err, sizeof err), 0);
}

/* fx_reopen - what a restart does */
static void
fx_reopen(struct fixture *fx)
{
	ASSERT(!spool_busy(fx->sp));
	spool_close(fx->sp);
	fx_open(fx);
}

/* rm_entry - nftw callback for rm -rf */
static int
rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

/* fx_teardown - close, check the loop closes cleanly, rm -rf the dir */
static void
fx_teardown(struct fixture *fx)
{
	if (fx->sp) {
		ASSERT(!spool_busy(fx->sp));
		spool_close(fx->sp);
	}
	ASSERT_EQ(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(uv_loop_close(&fx->loop), 0);
	ASSERT_EQ(nftw(fx->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS), 0);
}

/* path_in - <dir>/<rel> in out (256 bytes) */
static const char *
path_in(const struct fixture *fx, const char *rel, char *out)
{
	snprintf(out, 256, "%s/%s", fx->dir, rel);
	return out;
}

/* count_files - entries in <dir>/<sub> */
static int
count_files(const struct fixture *fx, const char *sub)
{
	char path[256];
	struct dirent *de;
	DIR *d;
	int n = 0;

	snprintf(path, sizeof path, "%s/%s", fx->dir, sub);
	ASSERT((d = opendir(path)) != NULL);
	while ((de = readdir(d)) != NULL)
		if (de->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

/* file_exists - does <dir>/<sub>/<name> exist? */
static bool
file_exists(const struct fixture *fx, const char *sub, const char *name)
{
	char path[256];

	snprintf(path, sizeof path, "%s/%s/%s", fx->dir, sub, name);
	return access(path, F_OK) == 0;
}

/* put_file - create <dir>/<sub>/<name> with contents */
static void
put_file(const struct fixture *fx, const char *sub, const char *name,
    const void *data, size_t len)
{
	char path[256];
	int fd;

	snprintf(path, sizeof path, "%s/%s/%s", fx->dir, sub, name);
	ASSERT((fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600)) >= 0);
	ASSERT_EQ(fd_write_all(fd, data, len), 0);
	close(fd);
}

/* make_env - a plausible heap envelope with two recipients */
static struct envelope *
make_env(const char *sender)
{
	struct envelope *env = xmalloc(sizeof *env);
	struct env_rcpt *r;

	envelope_init(env);
	env->created = time_wall();
	env->sender = xstrdup(sender);
	env->helo = xstrdup("client.example");
	env->client_addr = xstrdup("192.0.2.7");
	env->auth_user = xstrdup("app1");
	env->body = ENV_BODY_8BITMIME;
	env->smtputf8 = true;
	r = envelope_add_rcpt(env, "\"x y\"@example.net");
	r->notify = ENV_NOTIFY_FAILURE | ENV_NOTIFY_DELAY;
	r->last_reply = xstrdup("451 4.7.1 try\r\nlater +=");
	envelope_add_rcpt(env, "\xc3\xa9l\xc3\xa8ve@\xc3\xa9" "cole.example");
	return env;
}

/* on_commit - record the callback */
static void
on_commit(void *arg, int status, const char *id)
{
	struct result *r = arg;

	r->calls++;
	r->status = status;
	str_copy(r->id, id ? id : "", sizeof r->id);
	ASSERT((status == 0) == (id != NULL));
}

/* commit_one - new message with body text, committed; returns it */
static struct spool_msg *
commit_one(struct fixture *fx, const char *body, struct result *res)
{
	struct spool_msg *m;

	memset(res, 0, sizeof *res);
	ASSERT_EQ(spool_msg_new(fx->sp, &m), 0);
	ASSERT_EQ(spool_msg_write(m, body, strlen(body)), 0);
	spool_msg_commit(m, make_env("sender@example.com"), on_commit, res);
	return m;
}

/* put_message - a committed-looking message written by hand */
static void
put_message(const struct fixture *fx, const char *id, const char *body,
    size_t envsize)
{
	struct envelope *env = make_env("hand@example.com");
	struct buf t;
	char name[32];

	str_copy(env->id, id, sizeof env->id);
	env->size = envsize;
	buf_init(&t);
	envelope_format(env, &t);
	snprintf(name, sizeof name, "%s.msg", id);
	put_file(fx, "queue", name, body, strlen(body));
	snprintf(name, sizeof name, "%s.env", id);
	put_file(fx, "queue", name, t.data, t.len);
	buf_free(&t);
	envelope_free(env);
	free(env);
}

/* collect_id - spool_foreach visitor appending ids to a struct buf */
static void
collect_id(void *arg, const struct envelope *env)
{
	buf_printf(arg, "%s\n", env->id);
}

TEST(commit_reopen)
{
	static const char body[] = "Subject: hi\r\n\r\nbody\r\n";
	struct fixture fx;
	struct result res;
	struct envelope *want;
	const struct envelope *got;
	char name[32], path[256], *data;
	size_t len;

	fx_setup(&fx);
	fx_open(&fx);
	commit_one(&fx, body, &res);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(res.calls, 1);
	ASSERT_EQ(res.status, 0);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT_EQ(count_files(&fx, "incoming"), 0);
	ASSERT_EQ(count_files(&fx, "queue"), 2);

	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT((got = spool_find(fx.sp, res.id)) != NULL);
	want = make_env("sender@example.com");
	ASSERT_STR_EQ(got->id, res.id);
	ASSERT_EQ(got->size, sizeof body - 1);
	ASSERT_STR_EQ(got->sender, want->sender);
	ASSERT_STR_EQ(got->helo, want->helo);
	ASSERT_STR_EQ(got->auth_user, want->auth_user);
	ASSERT_EQ(got->body, want->body);
	ASSERT_EQ(got->smtputf8, true);
	ASSERT_EQ(got->nrcpts, 2);
	ASSERT_STR_EQ(got->rcpts[0].addr, want->rcpts[0].addr);
	ASSERT_STR_EQ(got->rcpts[0].last_reply, want->rcpts[0].last_reply);
	ASSERT_EQ(got->rcpts[0].notify, want->rcpts[0].notify);
	ASSERT_STR_EQ(got->rcpts[1].addr, want->rcpts[1].addr);
	envelope_free(want);
	free(want);

	snprintf(name, sizeof name, "%s.msg", res.id);
	snprintf(path, sizeof path, "%s/queue/%s", fx.dir, name);
	ASSERT_EQ(file_read_all(path, &data, &len, 1 << 20), 0);
	ASSERT_EQ(len, sizeof body - 1);
	ASSERT(memcmp(data, body, len) == 0);
	free(data);
	ASSERT(spool_find(fx.sp, "0000000000000000") == NULL);
	ASSERT(spool_find(fx.sp, "not-an-id") == NULL);
	fx_teardown(&fx);
}

TEST(callback_not_inline)
{
	struct fixture fx;
	struct result ok, bad;
	struct spool_msg *m;

	fx_setup(&fx);
	fx_open(&fx);
	commit_one(&fx, "x", &ok);
	ASSERT_EQ(ok.calls, 0);
	ASSERT(spool_busy(fx.sp));

	/* The error path is deferred too: the message is already failed. */
	memset(&bad, 0, sizeof bad);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	spool_msg_commit(m, make_env(""), on_commit, &bad);
	ASSERT_EQ(bad.calls, 0);

	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(ok.calls, 1);
	ASSERT_EQ(bad.calls, 1);
	ASSERT_EQ(bad.status, 0);	/* an empty body is a valid message */
	ASSERT(!spool_busy(fx.sp));
	ASSERT_EQ(spool_count(fx.sp), 2);
	ASSERT_EQ(spool_find(fx.sp, bad.id)->sender[0], '\0');
	fx_teardown(&fx);
}

TEST(concurrent_commits)
{
	enum { N = 200 };
	static struct result res[N];
	struct fixture fx;
	struct buf ids;
	uint64_t t0, ms;
	char body[512];
	int i;

	/* As the daemon does: parallel fsyncs scale on this disk. */
	setenv("UV_THREADPOOL_SIZE", "16", 1);
	fx_setup(&fx);
	fx_open(&fx);
	memset(body, 'a', sizeof body - 1);
	body[sizeof body - 1] = '\0';
	t0 = time_now_ms();
	for (i = 0; i < N; i++)
		commit_one(&fx, body, &res[i]);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ms = time_now_ms() - t0;
	fprintf(stderr, "concurrent_commits: %d commits in %llu ms "
	    "(%.0f/s)\n", N, (unsigned long long)ms,
	    ms ? N * 1000.0 / (double)ms : 0.0);
	for (i = 0; i < N; i++) {
		ASSERT_EQ(res[i].calls, 1);
		ASSERT_EQ(res[i].status, 0);
		ASSERT(spool_find(fx.sp, res[i].id) != NULL);
	}
	ASSERT_EQ(spool_count(fx.sp), N);
	ASSERT_EQ(count_files(&fx, "queue"), 2 * N);
	ASSERT_EQ(count_files(&fx, "incoming"), 0);

	/* foreach is in id order, which is allocation order here. */
	buf_init(&ids);
	spool_foreach(fx.sp, collect_id, &ids);
	for (i = 0; i < N; i++)
		ASSERT(strncmp(ids.data + i * 17, res[i].id, 16) == 0);
	buf_free(&ids);

	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), N);
	for (i = 0; i < N; i++)
		ASSERT_EQ(spool_find(fx.sp, res[i].id)->size, sizeof body - 1);
	fx_teardown(&fx);
}

/* State for chain_commits: each callback starts the next commit. */
struct chain {
	struct fixture *fx;	/* where to commit */
	int left;		/* commits still to start */
	int done;		/* callbacks seen */
	struct result res;	/* scratch for the callback */
};

static void on_chain(void *, int, const char *);

/* on_chain - re-enter the spool from inside its own callback */
static void
on_chain(void *arg, int status, const char *id)
{
	struct chain *c = arg;
	struct spool_msg *m;

	ASSERT_EQ(status, 0);
	ASSERT(spool_find(c->fx->sp, id) != NULL);	/* indexed before cb */
	c->done++;
	if (c->left-- <= 0)
		return;
	ASSERT_EQ(spool_msg_new(c->fx->sp, &m), 0);
	ASSERT_EQ(spool_msg_write(m, "y", 1), 0);
	spool_msg_commit(m, make_env("chain@example.com"), on_chain, c);
}

TEST(chain_commits)
{
	struct fixture fx;
	struct chain c = { &fx, 4, 0, { 0, 0, "" } };
	struct spool_msg *m;

	fx_setup(&fx);
	fx_open(&fx);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	spool_msg_commit(m, make_env("chain@example.com"), on_chain, &c);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(c.done, 5);
	ASSERT_EQ(spool_count(fx.sp), 5);
	fx_teardown(&fx);
}

TEST(abort_before_commit)
{
	struct fixture fx;
	struct spool_msg *m;
	char chunk[1000];

	fx_setup(&fx);
	fx_open(&fx);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	ASSERT_EQ(count_files(&fx, "incoming"), 1);
	memset(chunk, 'z', sizeof chunk);
	for (int i = 0; i < 200; i++)	/* past the buffer: really written */
		ASSERT_EQ(spool_msg_write(m, chunk, sizeof chunk), 0);
	ASSERT_EQ(spool_msg_size(m), 200000);
	spool_msg_abort(m);
	ASSERT_EQ(count_files(&fx, "incoming"), 0);
	ASSERT_EQ(count_files(&fx, "queue"), 0);
	ASSERT(!spool_busy(fx.sp));
	fx_teardown(&fx);
}

TEST(abort_after_commit)
{
	struct fixture fx;
	struct result res;
	struct spool_msg *m;
	char id[ENVELOPE_ID_LEN + 1];

	fx_setup(&fx);
	fx_open(&fx);
	m = commit_one(&fx, "body\r\n", &res);
	str_copy(id, spool_msg_id(m), sizeof id);
	spool_msg_abort(m);	/* the session went away before 250 */
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(res.calls, 0);
	ASSERT(spool_find(fx.sp, id) != NULL);
	ASSERT_EQ(count_files(&fx, "queue"), 2);
	fx_teardown(&fx);
}

TEST(write_error_sticky)
{
	struct fixture fx;
	struct result res;
	struct spool_msg *m;
	struct rlimit rl = { 100000, 100000 };
	static char chunk[30000];
	int rc = 0, i;

	/* EFBIG instead of a SIGXFSZ kill, as the daemon arranges. */
	signal(SIGXFSZ, SIG_IGN);
	fx_setup(&fx);
	fx_open(&fx);
	ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &rl), 0);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	memset(chunk, 'q', sizeof chunk);
	for (i = 0; i < 10 && rc == 0; i++)
		rc = spool_msg_write(m, chunk, sizeof chunk);
	ASSERT_EQ(rc, -EFBIG);
	/* Sticky: the session keeps reading DATA and answers at the end. */
	ASSERT_EQ(spool_msg_write(m, "x", 1), -EFBIG);
	ASSERT_EQ(spool_msg_write(m, chunk, sizeof chunk), -EFBIG);
	memset(&res, 0, sizeof res);
	spool_msg_commit(m, make_env("s@example.com"), on_commit, &res);
	ASSERT_EQ(res.calls, 0);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(res.calls, 1);
	ASSERT_EQ(res.status, -EFBIG);
	ASSERT_EQ(spool_count(fx.sp), 0);
	ASSERT_EQ(count_files(&fx, "incoming"), 0);
	ASSERT_EQ(count_files(&fx, "queue"), 0);
	fx_teardown(&fx);
}

TEST(recover_incoming)
{
	struct fixture fx;

	fx_setup(&fx);
	fx_open(&fx);
	spool_close(fx.sp);
	put_file(&fx, "incoming", "6743a1f0000a3c7e.msg", "partial", 7);
	put_file(&fx, "incoming", "6743a1f0000a3c7e.env", "version: 1\n", 11);
	put_file(&fx, "incoming", "junk name", "?", 1);
	fx_open(&fx);
	ASSERT_EQ(count_files(&fx, "incoming"), 0);
	ASSERT_EQ(spool_count(fx.sp), 0);
	fx_teardown(&fx);
}

TEST(recover_orphan_body)
{
	struct fixture fx;

	fx_setup(&fx);
	fx_open(&fx);
	spool_close(fx.sp);
	/* A body whose envelope rename never happened: never acknowledged. */
	put_file(&fx, "queue", "6743a1f0000a3c7e.msg", "orphan", 6);
	put_file(&fx, "queue", "6743a1f0000a3c7f.env.tmp", "version", 7);
	put_message(&fx, "6743a1f0000a3c80", "whole", 5);
	fx_open(&fx);
	ASSERT(!file_exists(&fx, "queue", "6743a1f0000a3c7e.msg"));
	ASSERT(!file_exists(&fx, "queue", "6743a1f0000a3c7f.env.tmp"));
	ASSERT_EQ(count_files(&fx, "quarantine"), 0);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT(spool_find(fx.sp, "6743a1f0000a3c80") != NULL);
	fx_teardown(&fx);
}

TEST(recover_quarantine)
{
	static const char garbage[] = "\x00\x01\xffnot an envelope\n";
	struct fixture fx;
	struct buf t;
	char *cut, p1[256], p2[256];

	fx_setup(&fx);
	fx_open(&fx);
	spool_close(fx.sp);
	/* 01: garbage envelope */
	put_file(&fx, "queue", "6743a1f000000001.msg", "b", 1);
	put_file(&fx, "queue", "6743a1f000000001.env", garbage,
	    sizeof garbage);
	/* 02: truncated envelope (cut before its end line) */
	put_message(&fx, "6743a1f000000002", "b", 1);
	ASSERT_EQ(file_read_all(path_in(&fx,
	    "queue/6743a1f000000002.env", p1), &t.data, &t.len, 1 << 20), 0);
	ASSERT((cut = strstr(t.data, "end: ")) != NULL);
	put_file(&fx, "queue", "6743a1f000000002.env", t.data,
	    (size_t)(cut - t.data));
	free(t.data);
	/* 03: envelope whose body is missing */
	put_message(&fx, "6743a1f000000003", "b", 1);
	ASSERT_EQ(unlink(path_in(&fx, "queue/6743a1f000000003.msg",
	    p1)), 0);
	/* 04: body size differs from the envelope; 05: id differs */
	put_message(&fx, "6743a1f000000004", "bbb", 1);
	put_message(&fx, "6743a1f000000005", "b", 1);
	ASSERT_EQ(rename(path_in(&fx, "queue/6743a1f000000005.env", p1),
	    path_in(&fx, "queue/6743a1f000000015.env", p2)), 0);
	put_file(&fx, "queue", "6743a1f000000015.msg", "b", 1);
	/* badly named files, and a directory */
	put_file(&fx, "queue", "6743A1F000000006.msg", "b", 1);
	put_file(&fx, "queue", "6743a1f000000007.msg~", "b", 1);
	put_file(&fx, "queue", "notes.txt", "b", 1);
	ASSERT_EQ(mkdir(path_in(&fx, "queue/6743a1f000000008.env", p1),
	    0700), 0);
	/* and the valid neighbour */
	put_message(&fx, "6743a1f000000009", "hello", 5);

	fx_open(&fx);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT(spool_find(fx.sp, "6743a1f000000009") != NULL);
	/* queue/ keeps only the neighbour and the orphan body of 05 is gone */
	ASSERT_EQ(count_files(&fx, "queue"), 2);
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000001.env"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000001.msg"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000002.env"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000002.msg"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000003.env"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000004.env"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000004.msg"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000015.env"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000015.msg"));
	ASSERT(file_exists(&fx, "quarantine", "6743A1F000000006.msg"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000007.msg~"));
	ASSERT(file_exists(&fx, "quarantine", "notes.txt"));
	ASSERT(file_exists(&fx, "quarantine", "6743a1f000000008.env"));
	ASSERT_EQ(count_files(&fx, "quarantine"), 13);
	/* A second start finds nothing more to do; names collide safely. */
	put_file(&fx, "queue", "notes.txt", "again", 5);
	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT(file_exists(&fx, "quarantine", "notes.txt.1"));
	fx_teardown(&fx);
}

TEST(ids_increasing)
{
	enum { N = 10000 };
	struct fixture fx;
	struct spool_msg *m;
	char prev[ENVELOPE_ID_LEN + 1] = "";
	const char *id;

	fx_setup(&fx);
	fx_open(&fx);
	for (int i = 0; i < N; i++) {
		ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
		id = spool_msg_id(m);
		ASSERT_EQ(strlen(id), ENVELOPE_ID_LEN);
		ASSERT_EQ(strspn(id, "0123456789abcdef"), ENVELOPE_ID_LEN);
		ASSERT(strcmp(prev, id) < 0);	/* unique and increasing */
		str_copy(prev, id, sizeof prev);
		spool_msg_abort(m);
	}
	/* The top half is the wall clock. */
	ASSERT(labs((long)(strtoull(prev, NULL, 16) >> 32) -
	    (long)time_wall()) < 5);
	fx_teardown(&fx);
}

TEST(ids_after_recovery)
{
	struct fixture fx;
	struct spool_msg *m;

	fx_setup(&fx);
	fx_open(&fx);
	spool_close(fx.sp);
	/* A message from a clock far in the future (or a fast one). */
	put_message(&fx, "fffffff000000000", "x", 1);
	fx_open(&fx);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	ASSERT(strcmp(spool_msg_id(m), "fffffff000000000") > 0);
	spool_msg_abort(m);
	fx_teardown(&fx);
}

TEST(large_message_rss)
{
	enum { CHUNK = 64 * 1024, TOTAL = 50 * 1024 * 1024 };
	struct fixture fx;
	struct result res;
	struct spool_msg *m;
	struct rusage before, after;
	char *chunk;
	const struct envelope *got;

	fx_setup(&fx);
	fx_open(&fx);
	chunk = xmalloc(CHUNK);
	memset(chunk, 'L', CHUNK);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	/* Warm up the allocator, stdio and the write path first. */
	ASSERT_EQ(spool_msg_write(m, chunk, 100), 0);
	ASSERT_EQ(getrusage(RUSAGE_SELF, &before), 0);
	for (size_t done = 100; done < TOTAL; done += CHUNK)
		ASSERT_EQ(spool_msg_write(m, chunk, done + CHUNK > TOTAL ?
		    TOTAL - done : CHUNK), 0);
	memset(&res, 0, sizeof res);
	spool_msg_commit(m, make_env("big@example.com"), on_commit, &res);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(getrusage(RUSAGE_SELF, &after), 0);
	fprintf(stderr, "large_message_rss: maxrss %ld -> %ld KiB\n",
	    before.ru_maxrss, after.ru_maxrss);
	ASSERT(after.ru_maxrss - before.ru_maxrss < 4096);
	ASSERT_EQ(res.status, 0);
	ASSERT((got = spool_find(fx.sp, res.id)) != NULL);
	ASSERT_EQ(got->size, TOTAL);
	free(chunk);
	fx_reopen(&fx);	/* the size check against the body passes */
	ASSERT_EQ(spool_count(fx.sp), 1);
	fx_teardown(&fx);
}

TEST(lock_exclusive)
{
	struct fixture fx;
	struct spool *other;
	char err[256];

	fx_setup(&fx);
	fx_open(&fx);
	ASSERT_EQ(spool_open(&fx.loop, fx.dir, &other, err, sizeof err),
	    -EBUSY);
	ASSERT(other == NULL);
	ASSERT(strstr(err, "in use") != NULL);
	fx_reopen(&fx);	/* closing released it */
	ASSERT_EQ(spool_open(&fx.loop, "/proc/relay-no-such/x", &other, err,
	    sizeof err) < 0, 1);
	ASSERT(strstr(err, "mkdir") != NULL);
	fx_teardown(&fx);
}

/* What a spool_done_cb saw. */
struct done {
	int calls;		/* times the callback ran */
	int status;		/* its last status */
	int order;		/* value of *seq when it ran */
	int *seq;		/* shared call counter, or NULL */
	struct fixture *fx;	/* to look at the index from the callback */
	char id[ENVELOPE_ID_LEN + 1];	/* the id it is about */
	int want_attempts;	/* rcpts[0].attempts the index must hold */
};

/* on_done - record the callback; on success the index already changed */
static void
on_done(void *arg, int status)
{
	struct done *d = arg;
	const struct envelope *env;

	d->calls++;
	d->status = status;
	if (d->seq)
		d->order = ++*d->seq;
	if (status == 0 && d->fx && d->want_attempts >= 0) {
		ASSERT((env = spool_find(d->fx->sp, d->id)) != NULL);
		ASSERT_EQ(env->rcpts[0].attempts, d->want_attempts);
	}
}

/* commit_wait - commit a message with body and run until it is durable */
static void
commit_wait(struct fixture *fx, const char *body, char *id)
{
	struct result res;

	commit_one(fx, body, &res);
	ASSERT_EQ(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(res.calls, 1);
	ASSERT_EQ(res.status, 0);
	str_copy(id, res.id, ENVELOPE_ID_LEN + 1);
}

/* dup_indexed - a heap deep copy of the indexed envelope, to modify */
static struct envelope *
dup_indexed(struct fixture *fx, const char *id)
{
	struct envelope *env = xmalloc(sizeof *env);
	const struct envelope *cur;

	ASSERT((cur = spool_find(fx->sp, id)) != NULL);
	envelope_copy(env, cur);
	return env;
}

/* put_message_env - write env (id and size set here) and body by hand */
static void
put_message_env(const struct fixture *fx, struct envelope *env,
    const char *body)
{
	struct buf t;
	char name[32];

	env->size = strlen(body);
	buf_init(&t);
	envelope_format(env, &t);
	snprintf(name, sizeof name, "%s.msg", env->id);
	put_file(fx, "queue", name, body, strlen(body));
	snprintf(name, sizeof name, "%s.env", env->id);
	put_file(fx, "queue", name, t.data, t.len);
	buf_free(&t);
}

TEST(update_reopen)
{
	struct fixture fx;
	struct done d = { 0 };
	struct envelope *env;
	const struct envelope *got;
	char id[ENVELOPE_ID_LEN + 1], tmp[32];

	fx_setup(&fx);
	fx_open(&fx);
	commit_wait(&fx, "Subject: u\r\n\r\nbody\r\n", id);
	env = dup_indexed(&fx, id);
	env->rcpts[0].state = ENV_RCPT_SENT;
	env->rcpts[0].attempts = 1;
	env->rcpts[0].updated = 1732425600;
	free(env->rcpts[0].last_reply);
	env->rcpts[0].last_reply = xstrdup("250 2.0.0 Ok: queued as X");
	env->rcpts[1].attempts = 1;
	env->rcpts[1].next_attempt = 1732429200;
	env->size = 999999;	/* a wrong size is not believed */
	spool_env_update(fx.sp, env, on_done, &d);
	/* Never inline; the index keeps the old state until durable. */
	ASSERT_EQ(d.calls, 0);
	ASSERT(spool_busy(fx.sp));
	ASSERT_EQ(spool_find(fx.sp, id)->rcpts[0].state, ENV_RCPT_PENDING);
	/* The spool took a copy: the caller's envelope is its own. */
	envelope_free(env);
	free(env);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(d.calls, 1);
	ASSERT_EQ(d.status, 0);
	ASSERT(!spool_busy(fx.sp));
	got = spool_find(fx.sp, id);
	ASSERT_EQ(got->rcpts[0].state, ENV_RCPT_SENT);
	ASSERT_EQ(got->size, strlen("Subject: u\r\n\r\nbody\r\n"));
	snprintf(tmp, sizeof tmp, "%s.env.tmp", id);
	ASSERT(!file_exists(&fx, "queue", tmp));
	ASSERT_EQ(count_files(&fx, "queue"), 2);

	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT((got = spool_find(fx.sp, id)) != NULL);
	ASSERT_EQ(got->rcpts[0].state, ENV_RCPT_SENT);
	ASSERT_EQ(got->rcpts[0].attempts, 1);
	ASSERT_EQ(got->rcpts[0].updated, 1732425600);
	ASSERT_STR_EQ(got->rcpts[0].last_reply, "250 2.0.0 Ok: queued as X");
	ASSERT_EQ(got->rcpts[1].state, ENV_RCPT_PENDING);
	ASSERT_EQ(got->rcpts[1].next_attempt, 1732429200);
	ASSERT_EQ(count_files(&fx, "quarantine"), 0);
	fx_teardown(&fx);
}

TEST(update_failure_keeps_old)
{
	struct fixture fx;
	struct done d = { 0 }, unknown = { 0 };
	struct envelope *env;
	const struct envelope *got;
	struct rlimit rl = { 8192, 8192 };
	char id[ENVELOPE_ID_LEN + 1], old[64], *big;

	/* EFBIG instead of a SIGXFSZ kill, as the daemon arranges. */
	signal(SIGXFSZ, SIG_IGN);
	fx_setup(&fx);
	fx_open(&fx);
	commit_wait(&fx, "body\r\n", id);
	str_copy(old, spool_find(fx.sp, id)->rcpts[0].last_reply, sizeof old);
	/* A record larger than the file size limit cannot be written. */
	ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &rl), 0);
	env = dup_indexed(&fx, id);
	env->rcpts[0].state = ENV_RCPT_BOUNCED;
	big = xmalloc(20000);
	memset(big, 'r', 19999);
	big[19999] = '\0';
	free(env->rcpts[0].last_reply);
	env->rcpts[0].last_reply = big;
	spool_env_update(fx.sp, env, on_done, &d);
	ASSERT_EQ(d.calls, 0);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(d.calls, 1);
	ASSERT_EQ(d.status, -EFBIG);
	/* Old state in the index and on disk; no tmp file left behind. */
	got = spool_find(fx.sp, id);
	ASSERT_EQ(got->rcpts[0].state, ENV_RCPT_PENDING);
	ASSERT_STR_EQ(got->rcpts[0].last_reply, old);
	ASSERT_EQ(count_files(&fx, "queue"), 2);

	/* An unknown id fails too, later, not inside the call. */
	memcpy(env->id, "0000000000000001", ENVELOPE_ID_LEN + 1);
	spool_env_update(fx.sp, env, on_done, &unknown);
	ASSERT_EQ(unknown.calls, 0);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(unknown.calls, 1);
	ASSERT_EQ(unknown.status, -ENOENT);
	envelope_free(env);
	free(env);

	fx_reopen(&fx);
	ASSERT((got = spool_find(fx.sp, id)) != NULL);
	ASSERT_EQ(got->rcpts[0].state, ENV_RCPT_PENDING);
	ASSERT_STR_EQ(got->rcpts[0].last_reply, old);
	ASSERT_EQ(count_files(&fx, "quarantine"), 0);
	fx_teardown(&fx);
}

TEST(concurrent_updates)
{
	enum { N = 200 };
	static struct done d[N];
	static char ids[N][ENVELOPE_ID_LEN + 1];
	static struct result res[N];
	struct fixture fx;
	struct envelope *env;
	uint64_t t0, ms;
	int i;

	setenv("UV_THREADPOOL_SIZE", "16", 1);
	fx_setup(&fx);
	fx_open(&fx);
	for (i = 0; i < N; i++)
		commit_one(&fx, "concurrent\r\n", &res[i]);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	t0 = time_now_ms();
	for (i = 0; i < N; i++) {
		ASSERT_EQ(res[i].status, 0);
		str_copy(ids[i], res[i].id, sizeof ids[i]);
		env = dup_indexed(&fx, ids[i]);
		env->rcpts[0].state = ENV_RCPT_SENT;
		env->rcpts[0].attempts = i + 1;
		env->rcpts[1].state = ENV_RCPT_BOUNCED;
		d[i].fx = &fx;
		str_copy(d[i].id, ids[i], sizeof d[i].id);
		d[i].want_attempts = i + 1;
		spool_env_update(fx.sp, env, on_done, &d[i]);
		envelope_free(env);
		free(env);
	}
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ms = time_now_ms() - t0;
	fprintf(stderr, "concurrent_updates: %d updates in %llu ms (%.0f/s)\n",
	    N, (unsigned long long)ms, ms ? N * 1000.0 / (double)ms : 0.0);
	for (i = 0; i < N; i++) {
		ASSERT_EQ(d[i].calls, 1);
		ASSERT_EQ(d[i].status, 0);
	}
	ASSERT_EQ(count_files(&fx, "queue"), 2 * N);
	/* All final now: the restart treats them as removals it missed. */
	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), 0);
	ASSERT_EQ(count_files(&fx, "queue"), 0);
	ASSERT_EQ(count_files(&fx, "quarantine"), 0);
	fx_teardown(&fx);
}

TEST(serialised_updates)
{
	enum { N = 20 };
	static struct done d[N];
	struct fixture fx;
	struct envelope *env;
	const struct envelope *got;
	char id[ENVELOPE_ID_LEN + 1], name[32];
	int seq = 0, i;

	fx_setup(&fx);
	fx_open(&fx);
	commit_wait(&fx, "same id\r\n", id);
	env = dup_indexed(&fx, id);
	for (i = 0; i < N; i++) {
		env->rcpts[0].attempts = i + 1;
		free(env->rcpts[0].last_reply);
		env->rcpts[0].last_reply = xasprintf("451 4.0.0 try %d", i + 1);
		d[i].seq = &seq;
		d[i].fx = &fx;
		str_copy(d[i].id, id, sizeof d[i].id);
		/* Each callback sees exactly its own version indexed. */
		d[i].want_attempts = i + 1;
		spool_env_update(fx.sp, env, on_done, &d[i]);
	}
	envelope_free(env);
	free(env);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	for (i = 0; i < N; i++) {
		ASSERT_EQ(d[i].calls, 1);
		ASSERT_EQ(d[i].status, 0);
		ASSERT_EQ(d[i].order, i + 1);	/* call order */
	}
	got = spool_find(fx.sp, id);
	ASSERT_EQ(got->rcpts[0].attempts, N);
	ASSERT_STR_EQ(got->rcpts[0].last_reply, "451 4.0.0 try 20");
	snprintf(name, sizeof name, "%s.env.tmp", id);
	ASSERT(!file_exists(&fx, "queue", name));
	fx_reopen(&fx);
	got = spool_find(fx.sp, id);
	ASSERT_EQ(got->rcpts[0].attempts, N);
	ASSERT_STR_EQ(got->rcpts[0].last_reply, "451 4.0.0 try 20");
	fx_teardown(&fx);
}

/* State for update_chain: each callback queues the next update. */
struct upd_chain {
	struct fixture *fx;	/* where */
	char id[ENVELOPE_ID_LEN + 1];	/* which message */
	int left;		/* updates still to queue */
	int done;		/* callbacks seen */
};

static void on_upd_chain(void *, int);

/* on_upd_chain - re-enter the spool from inside an update callback */
static void
on_upd_chain(void *arg, int status)
{
	struct upd_chain *c = arg;
	struct envelope *env;

	ASSERT_EQ(status, 0);
	c->done++;
	ASSERT_EQ(spool_find(c->fx->sp, c->id)->rcpts[0].attempts, c->done);
	if (c->left-- <= 0)
		return;
	env = dup_indexed(c->fx, c->id);
	env->rcpts[0].attempts++;
	spool_env_update(c->fx->sp, env, on_upd_chain, c);
	envelope_free(env);
	free(env);
}

TEST(update_chain)
{
	struct fixture fx;
	struct upd_chain c = { &fx, "", 4, 0 };
	struct envelope *env;

	fx_setup(&fx);
	fx_open(&fx);
	commit_wait(&fx, "chain\r\n", c.id);
	env = dup_indexed(&fx, c.id);
	env->rcpts[0].attempts = 1;
	spool_env_update(fx.sp, env, on_upd_chain, &c);
	envelope_free(env);
	free(env);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(c.done, 5);
	fx_reopen(&fx);
	ASSERT_EQ(spool_find(fx.sp, c.id)->rcpts[0].attempts, 5);
	fx_teardown(&fx);
}

TEST(remove_reopen)
{
	struct fixture fx;
	struct done late = { 0 };
	struct envelope *env;
	char a[ENVELOPE_ID_LEN + 1], b[ENVELOPE_ID_LEN + 1], name[32];

	fx_setup(&fx);
	fx_open(&fx);
	commit_wait(&fx, "first\r\n", a);
	commit_wait(&fx, "second\r\n", b);
	env = dup_indexed(&fx, a);
	spool_msg_remove(fx.sp, a);
	/* Out of the index at once; the files go on the pool. */
	ASSERT(spool_find(fx.sp, a) == NULL);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT(spool_busy(fx.sp));
	/* An update after the removal is refused, not resurrected. */
	spool_env_update(fx.sp, env, on_done, &late);
	envelope_free(env);
	free(env);
	spool_msg_remove(fx.sp, a);		/* twice: logged, ignored */
	spool_msg_remove(fx.sp, "nonsense");
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(late.calls, 1);
	ASSERT_EQ(late.status, -ENOENT);
	ASSERT(!spool_busy(fx.sp));
	snprintf(name, sizeof name, "%s.env", a);
	ASSERT(!file_exists(&fx, "queue", name));
	snprintf(name, sizeof name, "%s.msg", a);
	ASSERT(!file_exists(&fx, "queue", name));
	ASSERT_EQ(count_files(&fx, "queue"), 2);
	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT(spool_find(fx.sp, a) == NULL);
	ASSERT(spool_find(fx.sp, b) != NULL);
	fx_teardown(&fx);
}

TEST(remove_after_update)
{
	struct fixture fx;
	struct done d = { 0 };
	struct envelope *env;

	char id[ENVELOPE_ID_LEN + 1];

	fx_setup(&fx);
	fx_open(&fx);
	commit_wait(&fx, "final\r\n", id);
	env = dup_indexed(&fx, id);
	env->rcpts[0].state = ENV_RCPT_SENT;
	env->rcpts[1].state = ENV_RCPT_BOUNCED;
	/* Record the outcome, then forget: the removal waits its turn. */
	spool_env_update(fx.sp, env, on_done, &d);
	spool_msg_remove(fx.sp, id);
	envelope_free(env);
	free(env);
	ASSERT(spool_find(fx.sp, id) == NULL);
	ASSERT_EQ(spool_count(fx.sp), 0);
	ASSERT_EQ(d.calls, 0);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(d.calls, 1);
	ASSERT_EQ(d.status, 0);		/* durable, though already unindexed */
	ASSERT_EQ(count_files(&fx, "queue"), 0);
	fx_reopen(&fx);
	ASSERT_EQ(spool_count(fx.sp), 0);
	fx_teardown(&fx);
}

TEST(recover_done)
{
	struct fixture fx;
	struct envelope *env;

	fx_setup(&fx);
	fx_open(&fx);
	spool_close(fx.sp);
	fx.sp = NULL;
	/* A removal lost in a crash: every recipient is final on disk. */
	env = make_env("hand@example.com");
	memcpy(env->id, "6743a1f000000021", ENVELOPE_ID_LEN + 1);
	env->rcpts[0].state = ENV_RCPT_SENT;
	env->rcpts[1].state = ENV_RCPT_BOUNCED;
	put_message_env(&fx, env, "done\r\n");
	/* One recipient still pending: it stays. */
	memcpy(env->id, "6743a1f000000022", ENVELOPE_ID_LEN + 1);
	env->rcpts[1].state = ENV_RCPT_PENDING;
	put_message_env(&fx, env, "not yet\r\n");
	envelope_free(env);
	free(env);
	/* A crash between the two unlinks: the orphan body goes. */
	put_file(&fx, "queue", "6743a1f000000023.msg", "half", 4);
	fx_open(&fx);
	ASSERT_EQ(spool_count(fx.sp), 1);
	ASSERT(spool_find(fx.sp, "6743a1f000000021") == NULL);
	ASSERT(spool_find(fx.sp, "6743a1f000000022") != NULL);
	ASSERT(!file_exists(&fx, "queue", "6743a1f000000021.env"));
	ASSERT(!file_exists(&fx, "queue", "6743a1f000000021.msg"));
	ASSERT(!file_exists(&fx, "queue", "6743a1f000000023.msg"));
	ASSERT_EQ(count_files(&fx, "queue"), 2);
	ASSERT_EQ(count_files(&fx, "quarantine"), 0);
	fx_teardown(&fx);
}

TEST(body_open)
{
	static const char body[] = "Subject: b\r\n\r\n\x00\x01\xff\r\n."
	    "\r\nlast";
	struct fixture fx;
	char id[ENVELOPE_ID_LEN + 1], got[sizeof body + 16];
	struct spool_msg *m;
	struct result res;
	ssize_t n;
	int fd, fd2;

	fx_setup(&fx);
	fx_open(&fx);
	memset(&res, 0, sizeof res);
	ASSERT_EQ(spool_msg_new(fx.sp, &m), 0);
	ASSERT_EQ(spool_msg_write(m, body, sizeof body - 1), 0);
	spool_msg_commit(m, make_env("b@example.com"), on_commit, &res);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(res.status, 0);
	str_copy(id, res.id, sizeof id);
	ASSERT_EQ(spool_body_open(fx.sp, id, &fd), 0);
	ASSERT((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
	ASSERT_EQ(n = read(fd, got, sizeof got), (ssize_t)(sizeof body - 1));
	ASSERT(memcmp(got, body, sizeof body - 1) == 0);
	ASSERT_EQ(read(fd, got, sizeof got), 0);
	ASSERT(write(fd, "x", 1) < 0);		/* read-only */
	ASSERT_EQ(spool_body_open(fx.sp, "0000000000000001", &fd2), -ENOENT);
	ASSERT_EQ(fd2, -1);
	ASSERT_EQ(spool_body_open(fx.sp, "../lock", &fd2), -ENOENT);
	/* Removed while open: the open fd still reads (a DSN in progress). */
	spool_msg_remove(fx.sp, id);
	ASSERT_EQ(spool_body_open(fx.sp, id, &fd2), -ENOENT);
	ASSERT_EQ(uv_run(&fx.loop, UV_RUN_DEFAULT), 0);
	ASSERT_EQ(pread(fd, got, sizeof got, 0), (ssize_t)(sizeof body - 1));
	ASSERT(memcmp(got, body, sizeof body - 1) == 0);
	close(fd);
	fx_teardown(&fx);
}

TEST_MAIN("spool",
    TEST_ENTRY(commit_reopen),
    TEST_ENTRY(callback_not_inline),
    TEST_ENTRY(concurrent_commits),
    TEST_ENTRY(chain_commits),
    TEST_ENTRY(abort_before_commit),
    TEST_ENTRY(abort_after_commit),
    TEST_ENTRY(write_error_sticky),
    TEST_ENTRY(recover_incoming),
    TEST_ENTRY(recover_orphan_body),
    TEST_ENTRY(recover_quarantine),
    TEST_ENTRY(ids_increasing),
    TEST_ENTRY(ids_after_recovery),
    TEST_ENTRY(large_message_rss),
    TEST_ENTRY(lock_exclusive),
    TEST_ENTRY(update_reopen),
    TEST_ENTRY(update_failure_keeps_old),
    TEST_ENTRY(concurrent_updates),
    TEST_ENTRY(serialised_updates),
    TEST_ENTRY(update_chain),
    TEST_ENTRY(remove_reopen),
    TEST_ENTRY(remove_after_update),
    TEST_ENTRY(recover_done),
    TEST_ENTRY(body_open))
