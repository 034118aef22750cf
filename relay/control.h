/*
 * control.h - the relayctl control socket.
 *
 * Protocol: the client connects to a unix stream socket, sends one request
 * line, and reads the answer until the daemon closes. Requests:
 *   queue        the queue as a table (like postqueue -p)
 *   queue json   the same as one JSON object
 *   sites [json] delivery sites: adaptive limits, mode, last throttle
 *   status json  counters and uptime as JSON
 * An unknown request gets one line "error: ..." and the close.
 */
#ifndef RELAY_CONTROL_H
#define RELAY_CONTROL_H

#include <stddef.h>

struct relay;
struct control;

/*
 * control_open - bind the socket at path with mode (refusing to replace a
 * socket another live daemon answers on). Returns 0 or an error in err.
 */
int control_open(struct relay *r, const char *path, int mode,
    struct control **out, char *err, size_t errlen);

/* control_close - stop listening, unlink the socket; clients finish */
void control_close(struct control *ctl);

#endif
