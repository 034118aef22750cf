/*
 * smtp_parse.h - pure parsers for the SMTP server: command lines, paths
 * (RFC 5321 Mailbox incl. quoted local parts and RFC 6531 UTF-8), ESMTP
 * parameters, AUTH base64, and the streaming DATA decoder (dot-unstuffing
 * that works across arbitrary buffer boundaries). No I/O, no allocation
 * except where a function says so, so each piece is unit-testable.
 */
#ifndef RELAY_SMTP_PARSE_H
#define RELAY_SMTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>

#include "config/util.h"

enum smtp_verb {
	SMTP_CMD_UNKNOWN,
	SMTP_CMD_HELO,
	SMTP_CMD_EHLO,
	SMTP_CMD_STARTTLS,
	SMTP_CMD_AUTH,
	SMTP_CMD_MAIL,
	SMTP_CMD_RCPT,
	SMTP_CMD_DATA,
	SMTP_CMD_BDAT,
	SMTP_CMD_RSET,
	SMTP_CMD_NOOP,
	SMTP_CMD_QUIT,
	SMTP_CMD_HELP,
	SMTP_CMD_VRFY,
	SMTP_CMD_EXPN,
	SMTP_CMD_LAST
};

struct smtp_cmd {
	enum smtp_verb verb;	/* SMTP_CMD_UNKNOWN if not recognised */
	const char *arg;	/* rest of the line after the verb and one
				 * space (for MAIL/RCPT: after "FROM:"/"TO:"
				 * and optional spaces); "" if none. Points
				 * into the parsed line. */
};

/*
 * smtp_cmd_parse - split a command line (CRLF already removed, NUL
 * terminated). Verbs are case-insensitive. For MAIL and RCPT the "FROM:"
 * / "TO:" keyword is required (else verb is returned but arg is NULL).
 */
void smtp_cmd_parse(const char *line, struct smtp_cmd *cmd);

const char *smtp_verb_name(enum smtp_verb v);

#define SMTP_PATH_MAX 512	/* reverse/forward path octets we accept */

/*
 * smtp_path_parse - parse "<mailbox> [params]" (the arg of MAIL FROM:/RCPT
 * TO:). A source route "<@a,@b:user@dom>" is accepted and dropped. With
 * allow_null, "<>" yields an empty address. UTF-8 in the mailbox is allowed
 * only when utf8 is true (SMTPUTF8 given), and must be valid UTF-8.
 * Address-literal domains "[192.0.2.1]" / "[IPv6:...]" are accepted.
 * On success *addr is a heap copy without brackets (quoted local part kept
 * as written), *params points at the parameters in arg (or "").
 * Returns 0 or RELAY_EPROTO with *why set to a short reply text.
 */
int smtp_path_parse(const char *arg, bool allow_null, bool utf8, char **addr,
    const char **params, const char **why);

struct smtp_param {
	char key[32];		/* upper-cased keyword */
	const char *value;	/* points into the caller's buffer, or NULL */
	size_t vlen;		/* length of value */
};

/*
 * smtp_params_parse - split "KEY=VALUE KEY2 ..." into out (max entries).
 * Returns the count, or -1 on syntax error / too many parameters.
 */
int smtp_params_parse(const char *params, struct smtp_param *out, size_t max);

/* smtp_xtext_valid - is this a syntactically valid RFC 3461 xtext? */
bool smtp_xtext_valid(const char *s, size_t len);

/*
 * smtp_base64_decode - decode standard base64 (no whitespace). Returns
 * decoded length, or -1 if the input is not valid base64. out must hold
 * 3 * len / 4 + 3 bytes; output is NUL-terminated.
 */
int smtp_base64_decode(const char *in, size_t len, char *out, size_t outlen);
/* smtp_base64_encode - encode into out (4*ceil(len/3)+1 bytes) */
void smtp_base64_encode(const void *in, size_t len, char *out, size_t outlen);

/* Streaming DATA decoder: RFC 5321 4.5.2 dot-unstuffing. */
#define SMTP_DOT_BARE_LF	0x01	/* a LF not preceded by CR */
#define SMTP_DOT_BARE_CR	0x02	/* a CR not followed by LF */
#define SMTP_DOT_NUL		0x04	/* a NUL octet */
#define SMTP_DOT_LONG_LINE	0x08	/* a line over 998 octets + CRLF */
#define SMTP_DOT_8BIT		0x10	/* an octet >= 0x80 */

struct smtp_dot {
	int state;		/* position relative to line start / CRLF */
	size_t linelen;		/* octets in the current line so far */
	unsigned flags;		/* SMTP_DOT_* seen in the body */
	bool done;		/* the terminating CRLF.CRLF was seen */
};

void smtp_dot_init(struct smtp_dot *d);

/*
 * smtp_dot_decode - feed raw DATA bytes. Appends the unstuffed body to out
 * (CRLF line endings kept as received, the final ".CRLF" removed) and
 * returns how many input bytes were consumed: all of them, or fewer when
 * the end-of-data sequence was found (the rest belongs to the next command).
 * The end of data is only CRLF "." CRLF: a bare LF never ends it (the SMTP
 * smuggling class).
 */
size_t smtp_dot_decode(struct smtp_dot *d, const char *in, size_t len,
    struct buf *out);

#endif
