#!/usr/bin/env bash
# bench-lib.sh - process and port helpers shared by the bench scripts;
# sourced, not run. Needs STOP_WAIT (tenths of a second) set by the caller.

# alive PID - the process exists and is not a zombie (no fork: the
# samplers and polls run during the measurement)
alive() {
	local line
	read -r line 2>/dev/null <"/proc/$1/stat" || return 1
	line=${line##*) }
	[ "${line%% *}" != Z ]
}

# wait_gone PID - bounded wait for a process to go; 1 if it did not
wait_gone() {
	local i
	for ((i = 0; i < STOP_WAIT; i++)); do
		alive "$1" || { wait "$1" 2>/dev/null; return 0; }
		sleep 0.1
	done
	return 1
}

# stop_pid PID - SIGTERM, bounded wait, SIGKILL
stop_pid() {
	[ -n "$1" ] || return 0
	kill -TERM "$1" 2>/dev/null
	if ! wait_gone "$1"; then
		echo "${0##*/}: pid $1 ignored SIGTERM; killing it" >&2
		kill -KILL "$1" 2>/dev/null
		wait "$1" 2>/dev/null
		return 1
	fi
	return 0
}

# free_port - a port below the ephemeral range (so no outgoing connection
# can hold it) that no TCP or UDP socket on the machine uses
free_port() {
	local i p used lo
	lo=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range \
	    2>/dev/null)
	[ "${lo:-0}" -gt 12000 ] || lo=32768
	used=$(awk 'NR > 1 && $2 ~ /:/ { split($2, a, ":"); print a[2] }' \
	    /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 \
	    2>/dev/null)
	for ((i = 0; i < 100; i++)); do
		p=$((10000 + RANDOM % (lo - 10000)))
		if ! printf '%s\n' "$used" | grep -qix "$(printf %04X "$p")"; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

# listening PORT - something listens on 127.0.0.1:PORT (TCP)
listening() {
	awk -v p="$(printf '0100007F:%04X' "$1")" \
	    '$4 == "0A" && toupper($2) == p { f = 1 } END { exit !f }' \
	    /proc/net/tcp
}

# jget JSON KEY - the scalar after "KEY": in one flat JSON line
jget() {
	printf '%s\n' "$1" | sed -n "s/.*\"$2\": *\([^,}]*\).*/\1/p"
}
