#!/bin/bash
# bench-throttle.sh - the throttling benchmark behind `make bench-throttle`.
#
# A receiver that accepts R messages per minute from our address (fake-mx
# --rate R/60: at most R MAIL commands per fixed 60 s window per client
# IP, "421 4.7.0 Error: too much mail from <ip>" at MAIL beyond, and every
# 421 closes the connection) gets N messages from relayd, once per mode:
#
#   adaptive  relayd as configured by default: a 421 is a throttle, the
#             site controller (relay/site.c) lowers the connection limit
#             and the message rate, throttled recipients go back to the
#             ready queue without counting an attempt;
#   naive     the same relayd with
#               reply_rules = ( { name = "naive"; code = "4xx";
#                                 class = "msg-temp"; } );
#             and delivery.retry_schedule = [ 60 ], min_retry = 1: every
#             4xx is an ordinary per-message deferral retried after 60 s
#             (+-10 % jitter), which is what a fixed-retry MTA does;
#   greylist  a receiver without a quota that greylists (fake-mx
#             --greylist G: every new client/sender/recipient triplet is
#             answered 450 4.2.0 "Greylisted ... please come back in N
#             seconds" for G s), relayd with delivery.greylist_retry = G.
#             Every message goes to its own recipient. Reported: the
#             longest time from a message's first attempt to its
#             delivery against G + one greylist retry interval (2 G), and
#             attempts per message; the site must not slow down.
#
# For each mode it prints the drain time (start of the submission -> last
# message recorded by the receiver) against the ideal N / R, the share of
# transactions (MAIL commands) answered 421, duplicates and losses, the
# number of site decreases relayd logged, and a per-30 s timeline. The
# issue's target: drain <= 1.2 x ideal with <= 5 % of transactions
# answered 421. A missed target is reported, not an error.
#
# Each mode gets a fresh fake-mx (so a fresh rate window), a fresh relayd
# and spool; one private dnsmasq on 127.0.0.1 answers the MX of
# example.net (bench-submit's recipient domain, rcpt<message number>@example.net)
# with mx1.example.net = 127.0.0.2. Only 127.0.0.x is used. Every wait is
# bounded: a mode's drain is cut off at BENCH_BOUND x ideal.
#
# Environment:
#   BUILD          build directory (build); relayd, relayctl, bench-submit
#                  and fake-mx are copied at the start, so a rebuild
#                  during the run does not change them
#   BENCH_N        messages per mode (300)
#   BENCH_R        the receiver's limit, messages per minute (120)
#   BENCH_MODES    modes, in order ("adaptive naive greylist")
#   BENCH_GREY     greylist mode: the receiver's greylist delay G, s (60)
#   BENCH_BOUND    drain cut-off as a multiple of the ideal (3)
#   BENCH_KEEP=1   keep the bench directory (logs, records)
#
# Exit: 0 when every message was accepted and delivered exactly once in
# every mode, 1 otherwise.
set -u

BUILD=${BUILD:-build}
N=${BENCH_N:-300}
R=${BENCH_R:-120}
MODES=${BENCH_MODES:-"adaptive naive greylist"}
GREY=${BENCH_GREY:-60}
BOUND=${BENCH_BOUND:-3}
CONNS=4			# submission connections
SIZE=2048		# message size, octets
SUBMIT_TIMEOUT=300	# bench-submit -t, seconds
POLL=1			# drain poll interval, seconds (the drain time comes
			# from the receiver's record, not from the poll)
BUCKET=30		# timeline bucket, seconds
START_WAIT=100		# x 0.1 s for a daemon to come up
STOP_WAIT=200		# x 0.1 s for a daemon to exit
MX_IP=127.0.0.2
DNSMASQ=/usr/sbin/dnsmasq
TARGET_RATIO=1.2
TARGET_SHARE=5		# percent

cd "$(dirname "$0")/.." || exit 1
for bin in relayd relayctl bench-submit fake-mx; do
	if [ ! -x "$BUILD/$bin" ]; then
		echo "bench-throttle.sh: $BUILD/$bin missing; run" \
		    "'make bench-throttle'" >&2
		exit 1
	fi
done
if [ ! -x "$DNSMASQ" ]; then
	echo "bench-throttle.sh: $DNSMASQ missing (tools/install-deps)" >&2
	exit 1
fi
for v in N R BOUND GREY; do
	if ! [[ ${!v} =~ ^[1-9][0-9]{0,6}$ ]]; then
		echo "bench-throttle.sh: bad $v: ${!v}" >&2
		exit 1
	fi
done
for m in $MODES; do
	case $m in
	adaptive | naive | greylist) ;;
	*)
		echo "bench-throttle.sh: unknown mode $m" >&2
		exit 1
		;;
	esac
done
IDEAL=$(awk -v n="$N" -v r="$R" 'BEGIN { printf "%.1f", n * 60 / r }')
LIMIT=$(awk -v i="$IDEAL" -v b="$BOUND" -v g="$GREY" 'BEGIN {
    l = i * b; if (2 * g * b > l) l = 2 * g * b; printf "%d", l + 0.5 }')

tmp=
dns_pid=
sink_pid=
relayd_pid=
status=0
declare -A res		# "$mode:field" -> value

# ---------------------------------------------------------------- helpers







# shared helpers: alive, wait_gone, stop_pid, free_port, listening, jget
. "$(dirname "$0")/bench-lib.sh"

# now - wall-clock seconds with milliseconds (fake-mx's "t")
now() {
	date +%s.%3N
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
	stop_pid "$relayd_pid"
	stop_pid "$sink_pid"
	stop_pid "$dns_pid"
	if [ -n "$tmp" ] && [ -d "$tmp" ]; then
		if [ "${BENCH_KEEP:-0}" = 1 ]; then
			echo "kept $tmp"
		else
			rm -rf "$tmp"
		fi
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ the fixtures

start_dns() {
	local i
	dns_port=$(free_port) || { echo "bench-throttle.sh: no free port" >&2; return 1; }
	"$DNSMASQ" --no-resolv --no-hosts --no-daemon --conf-file=/dev/null \
	    --pid-file= --port="$dns_port" --listen-address=127.0.0.1 \
	    --bind-interfaces --local=/example.net/ --local-ttl=300 \
	    --mx-host=example.net,mx1.example.net,10 \
	    --host-record=mx1.example.net,$MX_IP \
	    >"$tmp/dnsmasq.log" 2>&1 &
	dns_pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		if ! alive "$dns_pid"; then
			echo "bench-throttle.sh: dnsmasq exited:" >&2
			cat "$tmp/dnsmasq.log" >&2
			dns_pid=
			return 1
		fi
		listening "$dns_port" && return 0
		sleep 0.1
	done
	echo "bench-throttle.sh: dnsmasq did not listen" >&2
	return 1
}

# start_sink DIR MODE - the receiver (rate-limited, or greylisting);
# sets sink_pid, sink_port
start_sink() {
	local i line limit="--rate $R/60"
	[ "$2" = greylist ] && limit="--greylist $GREY"
	# shellcheck disable=SC2086  # $limit is two words
	"$BIN/fake-mx" -q -l "mx=$MX_IP:0" -r "$1/sink.json" \
	    --events command,reply,message --no-flush -S -T 120 \
	    -t $((LIMIT + SUBMIT_TIMEOUT + 120)) $limit \
	    >"$1/sink.out" 2>"$1/sink.err" &
	sink_pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		line=$(head -n 1 "$1/sink.out" 2>/dev/null)
		if [[ $line == ready* ]]; then
			sink_port=${line##*:}
			return 0
		fi
		alive "$sink_pid" || break
		sleep 0.1
	done
	echo "bench-throttle.sh: fake-mx did not start:" >&2
	cat "$1/sink.err" >&2
	return 1
}

# start_relayd DIR MODE - sets relayd_pid, smtp_port
start_relayd() {
	local i extra='' rules=''
	smtp_port=$(free_port) || return 1
	if [ "$2" = naive ]; then
		extra='retry_schedule = [ 60 ]; min_retry = 1;'
		rules='reply_rules = ( { name = "naive"; code = "4xx"; class = "msg-temp"; } );'
	elif [ "$2" = greylist ]; then
		extra="greylist_retry = $GREY;"
	fi
	cat >"$1/relay.conf" <<EOF
# Written by tools/bench-throttle.sh ($2).
hostname = "bench-throttle.relay.test";
spool_dir = "$1/spool";
control = { socket = "$1/relayd.sock"; mode = "0600"; };
listeners = (
  { name = "bench"; address = "127.0.0.1"; port = $smtp_port;
    tls = "none"; auth_required = false; }
);
relay_networks = [ "127.0.0.0/8" ];
limits = { max_connections = 200; max_connections_per_ip = 100; };
dns = { servers = [ "127.0.0.1:$dns_port" ]; };
delivery = {
  enabled = true;
  port = $sink_port;
  tls = "none";
  $extra
};
$rules
EOF
	"$BIN/relayd" -t -c "$1/relay.conf" >/dev/null || return 1
	"$BIN/relayd" -f -c "$1/relay.conf" 2>>"$1/relayd.log" &
	relayd_pid=$!
	for ((i = 0; i < START_WAIT; i++)); do
		if ! alive "$relayd_pid"; then
			echo "bench-throttle.sh: relayd exited; its log:" >&2
			tail -n 20 "$1/relayd.log" >&2
			relayd_pid=
			return 1
		fi
		"$BIN/relayctl" -s "$1/relayd.sock" status >/dev/null 2>&1 &&
		    return 0
		sleep 0.1
	done
	echo "bench-throttle.sh: relayd did not answer" >&2
	return 1
}

# queue_count DIR - relayd's queue count, or empty
queue_count() {
	"$BIN/relayctl" -s "$1/relayd.sock" queue --json 2>/dev/null |
	    tail -c 200 | sed -n 's/.*"count": *\([0-9]*\).*/\1/p'
}

# delivered DIR - message records so far
delivered() {
	grep -c '"event":"message"' "$1/sink.json" 2>/dev/null
}

# ------------------------------------------------------------------ a mode

run_mode() {
	local mode=$1 dir="$tmp/$1" out ok t0 i n q elapsed
	mkdir -p "$dir" || return 1
	start_sink "$dir" "$mode" || return 1
	start_relayd "$dir" "$mode" || return 1
	echo "== $mode: relayd pid $relayd_pid, receiver $MX_IP:$sink_port" \
	    "($([ "$mode" = greylist ] && echo "--greylist $GREY" ||
	    echo "--rate $R/60"))"
	t0=$(now)
	out=$("$BIN/bench-submit" -H 127.0.0.1 -p "$smtp_port" -c "$CONNS" \
	    -n "$N" -s "$SIZE" -t "$SUBMIT_TIMEOUT" -j)
	ok=$(jget "$out" ok)
	res[$mode:submitted]=${ok:-0}
	if [ "${ok:-0}" != "$N" ]; then
		echo "bench-throttle.sh: $mode: only ${ok:-0} of $N messages" \
		    "accepted: $out" >&2
		status=1
	fi
	# Wait for the drain: every message at the receiver and the queue
	# empty, or the cut-off.
	res[$mode:cutoff]=no
	for ((i = 0; ; i++)); do
		n=$(delivered "$dir")
		elapsed=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%d", b - a }')
		if [ "${n:-0}" -ge "$N" ]; then
			q=$(queue_count "$dir")
			[ "${q:-1}" = 0 ] && break
		fi
		if [ "$elapsed" -ge "$LIMIT" ]; then
			res[$mode:cutoff]=yes
			break
		fi
		if ! alive "$relayd_pid" || ! alive "$sink_pid"; then
			echo "bench-throttle.sh: $mode: relayd or fake-mx died" >&2
			status=1
			break
		fi
		if [ $((i % 30)) = 29 ]; then
			echo "   ${elapsed}s: ${n:-0} of $N delivered"
		fi
		sleep "$POLL"
	done
	"$BIN/relayctl" -s "$dir/relayd.sock" sites >"$dir/sites.txt" 2>&1
	res[$mode:queued]=$(queue_count "$dir")
	stop_pid "$relayd_pid" || status=1
	relayd_pid=
	stop_pid "$sink_pid" || status=1
	sink_pid=
	analyse "$mode" "$dir" "$t0"
}

# analyse MODE DIR T0 - figures from the receiver's record and relayd's log
analyse() {
	local mode=$1 dir=$2 t0=$3 rec="$2/sink.json" log="$2/relayd.log"
	local stats
	# One awk over the record: MAILs, 421s at MAIL, messages, the last
	# message's time, duplicates and the timeline. A message is known by
	# the SHA-256 of its body: bench-submit numbers every Subject, and a
	# repeated delivery of one queued message has the same body.
	stats=$(awk -v t0="$t0" -v n="$N" -v bucket="$BUCKET" '
	    function tval(l) { sub(/^\{"t":/, "", l); sub(/,.*/, "", l); return l + 0 }
	    /"event":"mail"/ {
		mails++; b = int((tval($0) - t0) / bucket); bm[b]++
		if (tval($0) - t0 < 60) m60++
		if (b > maxb) maxb = b
	    }
	    /"event":"reply"/ && /"phase":"mail"/ && /"code":421/ {
		r421++; b = int((tval($0) - t0) / bucket); br[b]++
		if (tval($0) - t0 < 60) r60++
	    }
	    /"event":"message"/ {
		msgs++; t = tval($0); if (t > last) last = t
		b = int((t - t0) / bucket); bd[b]++
		if (b > maxb) maxb = b
		if (match($0, /"sha256":"[0-9a-f]*"/)) {
			k = substr($0, RSTART, RLENGTH); seen[k]++
			if (seen[k] == 2) dupr++
			if (seen[k] >= 2) dupm++
		}
	    }
	    END {
		distinct = 0
		for (k in seen) distinct++
		printf "mails=%d r421=%d msgs=%d distinct=%d dups=%d dupr=%d " \
		    "drain=%.1f m60=%d r60=%d\n", mails, r421, msgs, distinct,
		    dupm + 0, dupr + 0, (msgs ? last - t0 : -1), m60, r60
		for (b = 0; b <= maxb; b++)
			printf "T %d %d %d %d\n", b * bucket, bm[b] + 0,
			    br[b] + 0, bd[b] + 0
	    }' "$rec")
	local line
	line=$(printf '%s\n' "$stats" | head -n 1)
	for kv in $line; do
		res[$mode:${kv%%=*}]=${kv#*=}
	done
	res[$mode:decreases]=$(grep -c '\]: site .* decrease' "$log")
	res[$mode:throttled]=$(grep -c ' dlv result .* status=throttled ' "$log")
	res[$mode:deferred]=$(grep -c ' dlv result .* status=deferred ' "$log")
	# Still queued at a cut-off is late, not lost.
	res[$mode:late]=${res[$mode:queued]:-0}
	res[$mode:loss]=$((N - ${res[$mode:distinct]} - ${res[$mode:late]}))
	echo "   relayd outcomes: sent $(grep -c ' dlv result .* status=sent ' "$log")," \
	    "throttled ${res[$mode:throttled]}, deferred ${res[$mode:deferred]}," \
	    "requeued $(grep -c ' dlv result .* status=requeued ' "$log")" \
	    "(connection lost before the reply was read)"
	echo "   timeline (s from the start of the submission):"
	printf '   %6s %7s %6s %9s\n' from MAILs 421s delivered
	printf '%s\n' "$stats" | awk '$1 == "T" {
	    printf "   %6d %7d %6d %9d\n", $2, $3, $4, $5 }'
	echo "   site decreases logged by relayd:"
	grep '\]: site .* decrease' "$log" | head -n 8 |
	    sed 's/^\([^ ]*\) [^ ]* site [^ ]* /     \1 /; s/ reply=.*//'
	echo "   relayctl sites at the end:"
	sed 's/^/     /' "$dir/sites.txt"
	[ "$mode" = greylist ] && analyse_greylist "$mode" "$rec"
	if [ "${res[$mode:dups]}" != 0 ] || [ "${res[$mode:loss]}" != 0 ]; then
		status=1
	fi
}

# analyse_greylist MODE RECORD - per message (its own recipient): the
# time from its first RCPT to its delivery, and its RCPT attempts
analyse_greylist() {
	local mode=$1 line
	line=$(awk -v g="$GREY" '
	    function tval(l) { sub(/^\{"t":/, "", l); sub(/,.*/, "", l); return l + 0 }
	    /"event":"rcpt"/ && match($0, /"arg":"<[^>]*>"/) {
		k = substr($0, RSTART + 8, RLENGTH - 10)
		if (!(k in first)) first[k] = tval($0)
		tries[k]++
	    }
	    /"phase":"rcpt"/ && /"code":450/ { grey++ }
	    /"event":"message"/ && match($0, /"rcpts":\["[^"]*"/) {
		k = substr($0, RSTART + 10, RLENGTH - 11)
		if (k in first) {
			w = tval($0) - first[k]; n++; sum += w
			if (w > max) max = w
			if (w > 2 * g) late++
		}
	    }
	    END {
		for (k in tries) { a[tries[k]]++; if (tries[k] > mt) mt = tries[k] }
		hist = ""
		for (i = 1; i <= mt; i++) if (a[i]) hist = hist sprintf("%s%dx%d", hist == "" ? "" : ",", a[i], i)
		printf "gmsgs=%d gmax=%.1f gmean=%.1f glate=%d g450=%d gtries=%s\n",
		    n, max, n ? sum / n : 0, late + 0, grey + 0, hist
	    }' "$2")
	for kv in $line; do
		res[$mode:${kv%%=*}]=${kv#*=}
	done
	echo "   greylisting: ${res[$mode:g450]} answered 450; first attempt ->" \
	    "delivery: mean ${res[$mode:gmean]} s, longest ${res[$mode:gmax]} s" \
	    "(bound G + one retry interval = $((2 * GREY)) s, ${res[$mode:glate]}" \
	    "over); messages x attempts: ${res[$mode:gtries]}"
}

# ------------------------------------------------------------------- main

mkdir -p var || exit 1
tmp=$(mktemp -d "$PWD/var/bench-throttle-XXXXXX") || exit 1
BIN=$tmp/bin
mkdir -p "$BIN" || exit 1
for bin in relayd relayctl bench-submit fake-mx; do
	cp "$BUILD/$bin" "$BIN/" || exit 1
done

echo "== machine"
echo "cpus      $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min)"
echo "source    $(git describe --always --dirty 2>/dev/null || echo '?')"
echo "receiver  fake-mx --rate $R/60: $R messages per 60 s window," \
    "421 at MAIL beyond"
echo "messages  $N x $SIZE octets, ideal drain N/R = ${IDEAL} s," \
    "cut-off ${LIMIT} s"
echo

start_dns || exit 1
for mode in $MODES; do
	if ! run_mode "$mode"; then
		status=1
		stop_pid "$relayd_pid"
		relayd_pid=
		stop_pid "$sink_pid"
		sink_pid=
	fi
	echo
done

echo "== summary (target: drain <= ${TARGET_RATIO} x ideal, <= ${TARGET_SHARE} %" \
    "of transactions answered 421;"
echo "   greylist: ideal = G, every message delivered within 2 G of its first" \
    "attempt, no site decrease)"
printf '%-9s %6s %8s %8s %6s %6s %6s %7s %9s %5s %5s %5s %6s\n' \
    mode msgs ideal_s drain_s ratio txns 421s share% 1stmin% dup loss decr target
for mode in $MODES; do
	[ -n "${res[$mode:mails]:-}" ] || continue
	ideal=$IDEAL
	[ "$mode" = greylist ] && ideal=$GREY
	awk -v m="$mode" -v n="${res[$mode:msgs]}" -v i="$ideal" \
	    -v d="${res[$mode:drain]}" -v t="${res[$mode:mails]}" \
	    -v r="${res[$mode:r421]}" -v t60="${res[$mode:m60]}" \
	    -v r60="${res[$mode:r60]}" -v dup="${res[$mode:dups]}" \
	    -v loss="${res[$mode:loss]}" -v dec="${res[$mode:decreases]}" \
	    -v cut="${res[$mode:cutoff]}" -v tr="$TARGET_RATIO" \
	    -v ts="$TARGET_SHARE" -v glate="${res[$mode:glate]:-}" 'BEGIN {
		ratio = d / i; share = t ? 100 * r / t : 0
		s60 = t60 ? 100 * r60 / t60 : 0
		ok = (cut == "no" && ratio <= tr && share <= ts) ? "met" : "missed"
		if (glate != "")	# greylist: every message within 2 G
			ok = (cut == "no" && glate == 0 && dec == 0) ? "met" : "missed"
		printf "%-9s %6d %8.1f %8s %6.2f %6d %6d %7.1f %9.1f %5d %5d %5d %6s\n",
		    m, n, i, (cut == "yes" ? ">" d : sprintf("%.1f", d)), ratio,
		    t, r, share, s60, dup, loss, dec, ok }'
done
echo
echo "txns = MAIL commands the receiver saw; 421s = those answered 421;"
echo "1stmin% = the same share over the first 60 s; decr = 'site ..."
echo "decrease' lines in relayd's log; dup/loss = messages (bodies) delivered"
echo "more than once / neither delivered nor still queued."
for mode in $MODES; do
	[ "${res[$mode:cutoff]:-no}" = yes ] &&
	    echo "$mode: cut off at ${LIMIT} s with ${res[$mode:late]:-?} messages still queued"
done
exit $status
