/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup_skb egress hook: records, for every SYN-ACK an enabled namespace sends, which client
 * 4-tuple it answers (struct synack_key explains the record; docs/DATAPLANE.md why it is exact).
 *
 * Why the egress hook: it runs in ip_finish_output(), after netfilter's LOCAL_OUT and POSTROUTING,
 * so conntrack has already undone every NAT of the connection on this packet: Istio's REDIRECT
 * to 15001/15006 and any source-port remapping. Its addresses are then exactly the client
 * socket's own view (client ip:port <- original destination ip:port), which is the client's
 * pending key. The listener (skb->sk, the request socket's full socket) gives the local port
 * the accepted socket will have.
 *
 * It runs for every packet the cgroup's sockets send, so anything but a TCP SYN-ACK returns at
 * once. It only reads: the verdict is always 1 (pass); nothing here can drop a packet.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "maps.bpf.h"

#define TCP_LISTEN_ 10
#define IP_FRAG_MASK_ 0x3fff /* more-fragments flag and fragment offset */

static __always_inline void map_ipv4(__u32 *ip6, __u32 ip4)
{
	ip6[0] = 0;
	ip6[1] = 0;
	ip6[2] = bpf_htonl(0xffff);
	ip6[3] = ip4;
}

static __always_inline int same_conn(const struct sock_key *a, const struct sock_key *b)
{
	return a->client_ip[0] == b->client_ip[0] && a->client_ip[1] == b->client_ip[1] &&
	       a->client_ip[2] == b->client_ip[2] && a->client_ip[3] == b->client_ip[3] &&
	       a->dest_ip[0] == b->dest_ip[0] && a->dest_ip[1] == b->dest_ip[1] &&
	       a->dest_ip[2] == b->dest_ip[2] && a->dest_ip[3] == b->dest_ip[3] &&
	       a->client_port == b->client_port && a->dest_port == b->dest_port;
}

int sockops_synack(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct synack_key k = {};
	struct synack rec = {}, *old;
	struct tcphdr th;
	__u32 thoff;
	__u64 netns;

	if (!sk || sk->state != TCP_LISTEN_)
		return 1;	/* SYN-ACKs of a listener only (a Fast Open child sends its own) */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 1;
		if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(IP_FRAG_MASK_)))
			return 1;
		thoff = ip.ihl * 4;
		map_ipv4(rec.conn.client_ip, ip.daddr);
		map_ipv4(rec.conn.dest_ip, ip.saddr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 1;
		if (ip6.nexthdr != IPPROTO_TCP)
			return 1;	/* extension headers: not worth parsing, the connection stays on TCP */
		thoff = sizeof(ip6);
		__builtin_memcpy(rec.conn.client_ip, &ip6.daddr, 16);
		__builtin_memcpy(rec.conn.dest_ip, &ip6.saddr, 16);
	} else {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, thoff, &th, sizeof(th)))
		return 1;
	if (!th.syn || !th.ack)
		return 1;
	netns = bpf_get_netns_cookie(skb);
	if (!netns_conf.lookup(&netns))
		return 1;

	rec.conn.client_port = bpf_ntohs(th.dest);
	rec.conn.dest_port = bpf_ntohs(th.source);
	k.netns = netns;
	__builtin_memcpy(k.client_ip, rec.conn.client_ip, sizeof(k.client_ip));
	k.local_port = sk->src_port;
	k.isn = bpf_ntohl(th.seq);

	/* A retransmitted SYN-ACK carries the same record; another handshake under the same key
	 * at the same time makes the record useless to both (see struct synack_key). */
	if (synacks.insert(&k, &rec) == 0)
		return 1;
	old = synacks.lookup(&k);
	if (old && !same_conn(&old->conn, &rec.conn) && !old->ambiguous) {
		old->ambiguous = 1;
		count(CNT_PENDING_AMBIGUOUS, 1);
	}
	return 1;
}
