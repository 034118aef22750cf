/*
 * util.h - the small runtime every layer shares: allocation that aborts,
 * error codes, a growable byte buffer and clocks.
 *
 * It lives in config/ because config/ is the bottom layer (DESIGN.md: config
 * depends on nothing of ours), so tls/, dns/, queue/ and relay/ may all use it.
 */
#ifndef RELAY_UTIL_H
#define RELAY_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define container_of(ptr, type, member) \
	((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/*
 * Our own error codes sit below errno's range (libuv uses -4095 for EOF),
 * so a function can return 0, -errno, a UV_E* code or one of these.
 */
#define RELAY_EPROTO	(-5001)	/* peer broke the protocol */
#define RELAY_ETLS	(-5002)	/* TLS library failure */
#define RELAY_ECONFIG	(-5003)	/* invalid configuration */
#define RELAY_ECORRUPT	(-5004)	/* a record on disk does not parse */
#define RELAY_ETOOBIG	(-5005)	/* a limit was exceeded */

/* relay_strerror - text for 0, -errno, UV_E* or RELAY_E*; never NULL */
const char *relay_strerror(int err);

/* x* - allocate or abort the process with a log line (OOM is not recoverable) */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* xasprintf - formatted allocation; aborts on failure */
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* struct buf - a growable byte string, always NUL-terminated for convenience */
struct buf {
	char *data;	/* heap block, NULL until the first append */
	size_t len;	/* bytes used, excluding the terminating NUL */
	size_t cap;	/* bytes allocated */
};

void buf_init(struct buf *b);
void buf_free(struct buf *b);
void buf_reset(struct buf *b);			/* len = 0, keeps memory */
void buf_append(struct buf *b, const void *data, size_t len);
void buf_puts(struct buf *b, const char *s);
void buf_printf(struct buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* buf_consume - drop the first n bytes */
void buf_consume(struct buf *b, size_t n);

/* buf_json_string - append s as a JSON string literal with quotes */
void buf_json_string(struct buf *b, const char *s);

/* time_now_ms - monotonic milliseconds; time_wall - wall-clock seconds */
uint64_t time_now_ms(void);
int64_t time_wall(void);
/* time_wall_ms - wall-clock milliseconds (persisted deadlines) */
int64_t time_wall_ms(void);

/* strlcpy-like copy that always terminates; returns strlen(src) */
size_t str_copy(char *dst, const char *src, size_t dstlen);
/* str_ieq / str_ieqn - ASCII case-insensitive equality */
bool str_ieq(const char *a, const char *b);
bool str_ieqn(const char *a, const char *b, size_t n);
/* str_hasprefix_i - ASCII case-insensitive prefix test */
bool str_hasprefix_i(const char *s, const char *prefix);

/* fd_write_all - write(2) until done or error; returns 0 or -errno */
int fd_write_all(int fd, const void *data, size_t len);
/* file_read_all - read a whole (small) file; returns 0 or -errno; *out NUL-terminated */
int file_read_all(const char *path, char **out, size_t *len, size_t max);

#endif
