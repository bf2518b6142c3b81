#!/bin/sh
# Transparent interception of HTTP (TCP port 80) for cachingproxy, iptables.
# The same rules as etc/nftables/transparent.nft, for routers still on
# iptables (legacy or iptables-nft).
#
# On the router the clients use as their gateway, with cachingproxy running on
# that router: their port-80 connections are redirected to the proxy, which
# reads the original destination (SO_ORIGINAL_DST) and the Host header and
# fetches through its cache. Clients need no proxy setting.
#
#   transparent.sh all                  intercept all port-80 traffic
#   transparent.sh mirrors HOST...      intercept only these hosts, resolved
#                                       now (getent: /etc/hosts, then DNS); run
#                                       it again to follow address changes
#   transparent.sh stop                 remove the rules again
#
# Settings come from the environment (defaults in brackets):
#   LAN_IF      interface the clients are on                       [lan0]
#   PROXY_PORT  port cachingproxy listens on                        [3128]
#   PROXY_USER  user cachingproxy runs as; its own traffic is never
#               redirected, so it cannot loop                [cachingproxy]
#   IPTABLES    IPv4 command                                    [iptables]
#   IP6TABLES   IPv6 command; empty to leave IPv6 alone        [ip6tables]
#
# e.g. in /etc/local.d/cachingproxy.start (OpenRC) or a oneshot unit:
#   LAN_IF=br0 /etc/cachingproxy/transparent.sh mirrors deb.debian.org
#
# Everything lives in two chains of the nat table, CACHINGPROXY_PRE (jumped
# to from PREROUTING for the LAN's port 80) and CACHINGPROXY_OUT (from OUTPUT,
# for the router's own downloads, which the proxy then must also accept on
# 127.0.0.1); running the script again replaces them, and nothing else of the
# firewall is touched.
set -eu

LAN_IF=${LAN_IF:-lan0}
PROXY_PORT=${PROXY_PORT:-3128}
PROXY_USER=${PROXY_USER:-cachingproxy}
IPTABLES=${IPTABLES:-iptables}
IP6TABLES=${IP6TABLES-ip6tables}

PRE=CACHINGPROXY_PRE
OUT=CACHINGPROXY_OUT

usage() {
	echo "usage: $0 all | mirrors HOST... | stop" >&2
	exit 2
}

# stop_family CMD: remove our jumps and chains (each -D removes one jump).
stop_family() {
	ipt=$1
	while "$ipt" -t nat -D PREROUTING -i "$LAN_IF" -p tcp --dport 80 -j "$PRE" 2>/dev/null; do :; done
	while "$ipt" -t nat -D OUTPUT -p tcp --dport 80 -j "$OUT" 2>/dev/null; do :; done
	for chain in "$PRE" "$OUT"; do
		"$ipt" -t nat -F "$chain" 2>/dev/null || true
		"$ipt" -t nat -X "$chain" 2>/dev/null || true
	done
}

# start_family CMD ADDRESS...: redirect port 80 to the proxy, for the given
# destinations ("all" for every address).
start_family() {
	ipt=$1
	shift
	stop_family "$ipt"
	"$ipt" -t nat -N "$PRE"
	"$ipt" -t nat -N "$OUT"
	# The router's own web pages and services are not intercepted.
	"$ipt" -t nat -A "$PRE" -m addrtype --dst-type LOCAL -j RETURN
	# The proxy's own upstream requests go out untouched: no loop.
	"$ipt" -t nat -A "$OUT" -m owner --uid-owner "$PROXY_USER" -j RETURN
	"$ipt" -t nat -A "$OUT" -m addrtype --dst-type LOCAL -j RETURN
	for dest in "$@"; do
		for chain in "$PRE" "$OUT"; do
			if [ "$dest" = all ]; then
				"$ipt" -t nat -A "$chain" -p tcp -j REDIRECT --to-ports "$PROXY_PORT"
			else
				"$ipt" -t nat -A "$chain" -d "$dest" -p tcp -j REDIRECT --to-ports "$PROXY_PORT"
			fi
		done
	done
	"$ipt" -t nat -A PREROUTING -i "$LAN_IF" -p tcp --dport 80 -j "$PRE"
	"$ipt" -t nat -A OUTPUT -p tcp --dport 80 -j "$OUT"
}

# resolve DATABASE HOST...: the addresses of the hosts, one a line.
resolve() {
	db=$1
	shift
	for name in "$@"; do
		# ahostsv6 also lists IPv4 addresses, mapped (::ffff:a.b.c.d): skip them.
		getent "$db" "$name" | awk '$1 !~ /^::ffff:/ { print $1 }'
	done | sort -u
}

[ "$#" -ge 1 ] || usage
mode=$1
shift
case "$mode" in
	all)
		[ "$#" -eq 0 ] || usage
		start_family "$IPTABLES" all
		[ -z "$IP6TABLES" ] || start_family "$IP6TABLES" all
		;;
	mirrors)
		[ "$#" -ge 1 ] || usage
		for name in "$@"; do
			if [ -z "$(resolve ahosts "$name")" ]; then
				echo "$0: cannot resolve $name; nothing changed" >&2
				exit 1
			fi
		done
		# shellcheck disable=SC2046 # one argument per address, on purpose
		start_family "$IPTABLES" $(resolve ahostsv4 "$@")
		if [ -n "$IP6TABLES" ]; then
			# shellcheck disable=SC2046
			start_family "$IP6TABLES" $(resolve ahostsv6 "$@")
		fi
		;;
	stop)
		[ "$#" -eq 0 ] || usage
		stop_family "$IPTABLES"
		[ -z "$IP6TABLES" ] || stop_family "$IP6TABLES"
		;;
	*)
		usage
		;;
esac
