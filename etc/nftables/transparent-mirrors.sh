#!/bin/sh
# Intercept only the listed mirrors: the "listed mirrors" variant of
# transparent.nft. Resolves each name now (getent: /etc/hosts, then DNS) and
# replaces the addresses in the sets of the loaded "inet cachingproxy" table
# with exactly these, in one atomic nft transaction.
#
#   nft -f /etc/nftables/cachingproxy-transparent.nft
#   sh transparent-mirrors.sh deb.debian.org security.debian.org \
#       distfiles.gentoo.org
#
# Run it again (cron, or a systemd timer) to follow mirrors whose addresses
# change; until then, new addresses are simply not intercepted (the clients
# still reach the mirror directly). A name that does not resolve stops the
# script before anything is changed.
#
# Environment: NFT (default "nft"), TABLE (default "inet cachingproxy").
set -eu

NFT=${NFT:-nft}
TABLE=${TABLE:-inet cachingproxy}

if [ "$#" -eq 0 ]; then
	echo "usage: $0 HOST..." >&2
	exit 2
fi

v4=""
v6=""
for name in "$@"; do
	a4=$(getent ahostsv4 "$name" | awk '{ print $1 }' | sort -u) || true
	# ahostsv6 also lists IPv4 addresses, mapped (::ffff:a.b.c.d): skip them.
	a6=$(getent ahostsv6 "$name" | awk '$1 !~ /^::ffff:/ { print $1 }' | sort -u) || true
	if [ -z "$a4$a6" ]; then
		echo "$0: cannot resolve $name; nothing changed" >&2
		exit 1
	fi
	[ -z "$a4" ] || v4="$v4 $a4"
	[ -z "$a6" ] || v6="$v6 $a6"
done

# "a b c" -> "a, b, c" (words are addresses: no globbing or quoting issues).
_list() {
	printf '%s\n' "$@" | sort -u | paste -s -d, - | sed 's/,/, /g'
}

{
	echo "flush set $TABLE intercept4"
	echo "flush set $TABLE intercept6"
	# shellcheck disable=SC2086 # split the address lists on purpose
	[ -z "$v4" ] || echo "add element $TABLE intercept4 { $(_list $v4) }"
	# shellcheck disable=SC2086
	[ -z "$v6" ] || echo "add element $TABLE intercept6 { $(_list $v6) }"
} | "$NFT" -f -
