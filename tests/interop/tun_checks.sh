#!/usr/bin/env bash
# `--link tun` against the kernel's f_eem gadget, run INSIDE the real-peer guest after
# bridge_checks.sh in the same boot (the gadget is up, cdc_eem holds it again): results
# as files under $RW, read by test_guest_eembridge.py.
#
#   RW=DIR GADGET_ENV=FILE tun_checks.sh     FILE: the env.txt gadget.sh up wrote
#
# No static neighbour on either side: the peer's kernel and the bridge's translator
# (eembridge/core/l3.py) learn each other by ARP and NDP. No static address either: the
# board serves DHCP as a Linux gadget image does (dnsmasq on its f_eem interface, handing
# out $HOST_IP with a classless static route, a DNS server and a domain) and the bridge
# runs `--dhcp`; every check below runs on the leased address. (One bridge for both: a
# second start costs 25-60 s of Python and USB set-up under TCG.) Checks: the lease (address,
# option 121 route at metric 1024, DNS and domain in stats), IPv4 ping both ways, IPv6
# link-local ping both ways, TCP both ways by SHA-256, an unplug + replug from the UDC
# after which the lease is asked for again (REBOOTING) and ping and TCP work again,
# SIGTERM. The counters come from the control socket through nc (no Python start-up,
# 4-10 s each under TCG).
TUN=eemtun0
SOCK=/tmp/eembridge-$TUN.sock  # guest tmpfs: UNIX sockets do not work on the 9p rwdir
PEER_LL=fe80::ee:2  # a second link-local address on the peer: only an NS can find it
# A second IPv4 address on the peer, which only an ARP request can find: the DHCP exchange
# may have had the peer ARP for the host already, and the translator learn $PEER_IP then.
PEER_IP2=169.254.77.3
XFER_MB=4
DHCP_ROUTE=10.99.0.0/16  # option 121's one route, through the board
DHCP_DOMAIN=board.test
LEASES=/tmp/eembridge-dhcp.leases  # guest tmpfs, removed at the end

set -uo pipefail  # not -e: every step records its own exit code
# shellcheck source=lib.sh
. "$INTEROP/lib.sh"
# shellcheck disable=SC1090
. "${GADGET_ENV:?the env.txt of gadget.sh up}"
stamp tun_start

# neigh NAME FAMILY: the peer kernel's neighbours on its interface, in NAME.txt.
neigh() { ip -n "$PEER_NS" "-$2" neigh show dev "$PEER_IF" > "$RW/$1.txt" 2>&1; }
peer_ll_ready() {  # the peer's own link-local address is through DAD
    ip -n "$PEER_NS" -6 addr show dev "$PEER_IF" scope link | grep inet6 | grep -qv tentative
}

# What the TAP bridge left: the peer knows 169.254.77.1 by the TAP's MAC. Forget it, so
# that the TUN bridge (its own stable MAC, not --mac) has to be learned by ARP.
ip -n "$PEER_NS" neigh flush dev "$PEER_IF"
ip netns exec "$PEER_NS" sysctl -qw "net.ipv6.conf.$PEER_IF.disable_ipv6=0"
ip addr flush dev "$HOST_IF" 2>/dev/null  # cdc_eem's netdev, if it took an address again

# leased: the lease's route is on the TUN (it goes on after the address, which its router
# is reached through).
leased() { ip -4 route show dev "$TUN" 2>/dev/null | grep -q "^$DHCP_ROUTE via $PEER_IP "; }
# rebound: the bridge's log says the lease kept over an unplug was ACKed again.
rebound() { grep -q "REBOOTING -> BOUND" "$RW/bridge.log"; }

# The board's DHCP server: one address to hand out, $HOST_IP, so that the checks below
# know it; no ping before the offer (dnsmasq's 3 s check is tested on the host).
rm -f "$LEASES"
ip netns exec "$PEER_NS" dnsmasq --no-daemon --conf-file=/dev/null --port=0 --pid-file= \
    --log-dhcp --interface="$PEER_IF" --bind-interfaces --dhcp-authoritative --no-ping \
    --dhcp-leasefile="$LEASES" --dhcp-range="$HOST_IP,$HOST_IP,255.255.255.0,2m" \
    --dhcp-option="121,$DHCP_ROUTE,$PEER_IP" --dhcp-option="6,$PEER_IP" \
    --dhcp-option="15,$DHCP_DOMAIN" > "$RW/dnsmasq.log" 2>&1 &
DNSMASQ=$!
wait_until 20 grep -q "sockets bound" "$RW/dnsmasq.log"
echo $? > "$RW/dnsmasq_up.rc"
stamp dnsmasq_up

python3 -m eembridge --link tun --tap "$TUN" --dhcp --serial "$SERIAL" \
    --stats-socket "$SOCK" -v > "$RW/bridge.log" 2>&1 &
BRIDGE=$!
bridge_up $BRIDGE "$TUN" 120 > "$RW/tun_up.txt"
echo $? > "$RW/tun_up.rc"
stamp tun_up
wait_until 30 leased
echo $? > "$RW/tun_leased.rc"
stamp tun_leased
ip -4 route show dev "$TUN" > "$RW/dhcp_routes.txt" 2>&1
echo "DHCP_ROUTE=$DHCP_ROUTE DHCP_DOMAIN=$DHCP_DOMAIN" > "$RW/dhcp_env.txt"
ip -6 addr show dev "$TUN" scope link > "$RW/tun_ll.txt" 2>&1
HOST_LL=$(awk '/inet6 fe80/ {sub("/.*", "", $2); print $2; exit}' "$RW/tun_ll.txt")
echo "TUN=$TUN HOST_LL=$HOST_LL PEER_LL=$PEER_LL PEER_IP2=$PEER_IP2" > "$RW/tun_env.txt"
ip link show "$TUN" > "$RW/tun_link.txt" 2>&1

# 1. IPv4 both ways, nobody knowing anybody: the host's ping makes the translator ARP
#    for the peer's $PEER_IP2; then the peer forgets the host and has to ask the translator.
ip -n "$PEER_NS" addr add "$PEER_IP2/24" dev "$PEER_IF"
ping -c 3 -i 0.2 -W 2 "$PEER_IP2" > "$RW/ping4_h2p.txt" 2>&1
echo $? > "$RW/ping4_h2p.rc"
neigh neigh4_after_h2p 4
ip -n "$PEER_NS" neigh flush dev "$PEER_IF"
ip netns exec "$PEER_NS" ping -c 3 -i 0.2 -W 2 "$HOST_IP" > "$RW/ping4_p2h.txt" 2>&1
echo $? > "$RW/ping4_p2h.rc"
neigh neigh4 4
stats stats_arp
stamp ping4_done

# 2. IPv6 link-local both ways through NDP. $PEER_LL is added once the peer's own
#    link-local address is valid: the peer's MLD reports and router solicitations then
#    come from that one, so the translator can learn $PEER_LL only by soliciting it.
wait_until 10 peer_ll_ready
echo $? > "$RW/peer_ll_ready.rc"
ip -n "$PEER_NS" addr add "$PEER_LL/64" dev "$PEER_IF" nodad
ping -6 -c 3 -i 0.2 -W 2 "$PEER_LL%$TUN" > "$RW/ping6_h2p.txt" 2>&1
echo $? > "$RW/ping6_h2p.rc"
ip -n "$PEER_NS" -6 neigh flush dev "$PEER_IF"
ip netns exec "$PEER_NS" ping -6 -c 3 -i 0.2 -W 2 "$HOST_LL%$PEER_IF" > "$RW/ping6_p2h.txt" 2>&1
echo $? > "$RW/ping6_p2h.rc"
neigh neigh6 6
stats stats_ndp
stamp ping6_done

# 3. TCP both ways by SHA-256.
xfer tun_h2p h2p "$PEER_NS" "$PEER_IP" 5011 "$XFER_MB"
xfer tun_p2h p2h "$PEER_NS" "$PEER_IP" 5012 "$XFER_MB"
stats stats_tcp
stamp tun_tcp_done

# 4. Unplug + replug from the UDC: carrier off and on again on the TUN, then ping and
#    TCP both ways once more.
bash "$INTEROP/gadget.sh" unplug
wait_until 20 carrier_is "$TUN" 0
echo $? > "$RW/tun_carrier_off.rc"
bash "$INTEROP/gadget.sh" replug
wait_until 60 carrier_is "$TUN" 1
echo $? > "$RW/tun_carrier_on.rc"
stamp tun_replugged
wait_until 30 rebound
echo $? > "$RW/tun_rebound.rc"
stamp tun_rebound
ip -4 route show dev "$TUN" > "$RW/dhcp_routes_replug.txt" 2>&1
ping -c 3 -i 0.2 -W 2 "$PEER_IP" > "$RW/tun_replug_ping.txt" 2>&1
echo $? > "$RW/tun_replug_ping.rc"
xfer tun_replug_h2p h2p "$PEER_NS" "$PEER_IP" 5013 1
xfer tun_replug_p2h p2h "$PEER_NS" "$PEER_IP" 5014 1
stats stats_replug
stamp tun_replug_done

# 5. SIGTERM: a clean exit, and cdc_eem has the interface again.
kill -TERM $BRIDGE 2>/dev/null
bridge_exit $BRIDGE tun_exit
ip -n "$PEER_NS" addr del "$PEER_LL/64" dev "$PEER_IF" 2>/dev/null
ip -n "$PEER_NS" addr del "$PEER_IP2/24" dev "$PEER_IF" 2>/dev/null
ip netns exec "$PEER_NS" sysctl -qw "net.ipv6.conf.$PEER_IF.disable_ipv6=1"
kill -TERM $DNSMASQ 2>/dev/null
timeout 10 tail --pid=$DNSMASQ -f /dev/null || kill -KILL $DNSMASQ 2>/dev/null
wait $DNSMASQ 2>/dev/null
cp "$LEASES" "$RW/dhcp.leases" 2>/dev/null
rm -f "$LEASES"
stamp tun_done
true
