/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Late insertion: a bpf_iter/tcp program that puts *established* sockets of enabled namespaces
 * into the sockhash, so connections that predate the opt-in (or the agent) get accelerated too:
 * upstream keep-alive pools, HTTP/2 and gRPC channels. docs/DATAPLANE.md, "Late insertion".
 *
 * Why an iterator: sock_ops may insert only in its ESTABLISHED callbacks, which such a socket
 * has long passed, and tracing programs may not update a sockhash at all; an iterator may
 * (docs/KERNEL-NOTES.md §6). The agent runs it inside each enabled namespace (the kernel walks
 * the sockets of the namespace that created the iterator), with the socket locked for each visit,
 * so no send of this socket runs while it is visited.
 *
 * Who joins: an established TCP socket of an enabled namespace that sockops has never touched
 * (no sock_state), whose file is O_NONBLOCK (a reader already asleep in plain tcp_recvmsg() when a
 * psock appears would never look at the psock queue: only an event-loop socket is safe), and
 * whose peer is in an enabled namespace of this node. Two ways to name its connection exactly:
 * - through a NAT (Istio's REDIRECT): the agent wrote the name from conntrack (late_nat);
 * - else the peer must be loopback, the pod's own address or an enabled pod of the node, with no
 *   NAT in between: both ends then see mirrored 4-tuples, and a live 4-tuple is unique in its
 *   namespace, so the two ends name one connection: the endpoint that sorts lower plays the
 *   client of struct sock_key, in its own namespace.
 * A socket whose peer never joins under the same name is taken out again (late_settle).
 *
 * Joining changes nothing yet: a late socket sends over TCP until its peer has joined too and has
 * read every byte this socket sent over TCP; only then can a redirected byte not overtake a TCP
 * one. The agent's second step (settle mode, after every namespace had its insert step) checks
 * that for each late socket, switches its direction once it holds, and takes out late sockets
 * whose peer never joined (late_settle). Each direction switches on its own, once.
 */
#include <uapi/linux/bpf.h>

#include "kernel.bpf.h"
#include "maps.bpf.h"

/* Declared in the kernel's .c files, not its headers (net/ipv4/tcp_ipv4.c, kernel/bpf/bpf_iter.c). */
struct bpf_iter_meta {
	void *seq;
	__u64 session_id;
	__u64 seq_num;
};
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	uid_t uid;
};

#define TCP_ESTABLISHED_ 1
#define LATE_INSERT 0
#define LATE_SETTLE 1

/* [LATE_SLOT_MODE]: written by the agent before each step (sockops/late.py); [LATE_SLOT_WAITING]:
 * late directions the settle step left on TCP because their reader was still behind, so the agent
 * knows to come back soon. Not pinned: each agent loads its own. */
#define LATE_SLOT_MODE 0
#define LATE_SLOT_WAITING 1
#define LATE_SLOT_PASS 2 /* the pass's number, bumped by the agent before each pass */
BPF_ARRAY(late_mode, __u32, 3);

static __always_inline __u32 late_slot(__u32 slot)
{
	__u32 *v = late_mode.lookup(&slot);

	return v ? *v : 0;
}

/*
 * What each late socket in the sockhash had read (its copied_seq) when this pass visited it, under
 * its own name. Why a map: neither an iterator nor sk_msg may hold a reference to another socket
 * (they can look one up in the sockhash but not release it), so the peer's progress is read from
 * here. A value can only be old, never ahead: copied_seq only grows, so an old one only delays a
 * switch to a later pass. Only this pass's records count (`pass`): every live late socket records
 * in the insert step, so a record of an earlier pass is a closed socket's (LRU: they age out), and
 * its name may come back with a new connection. User space never reads this map.
 */
struct late_seq {
	__u32 copied_seq;
	__u32 pass;
};
BPF_TABLE("lru_hash", struct sock_key, struct late_seq, late_seqs, SOCKOPS_SOCKHASH_MAX);

static __always_inline void late_record(void *tp, struct sock_state *st)
{
	struct late_seq rec = {
		.copied_seq = KFIELD(tp, KOFF_TP_COPIED_SEQ, __u32),
		.pass = late_slot(LATE_SLOT_PASS),
	};

	late_seqs.update(&st->key, &rec);
}

/* Sockets of connections through a NAT, named from conntrack by the agent (struct late_tuple). */
BPF_HASH(late_nat, struct late_tuple, struct sock_key, SOCKOPS_PENDING_MAX);

/* This socket's addresses as struct sock_key stores them (IPv6, IPv4 mapped; host-order ports). */
static __always_inline int late_addrs(void *sk, __u32 *local_ip, __u32 *local_port, __u32 *remote_ip,
				      __u32 *remote_port)
{
	__u16 family = KFIELD(sk, KOFF_SKC_FAMILY, __u16);

	if (family == AF_INET_) {
		local_ip[0] = 0;
		local_ip[1] = 0;
		local_ip[2] = htonl_(0xffff);
		local_ip[3] = KFIELD(sk, KOFF_SKC_RCV_SADDR, __u32);
		remote_ip[0] = 0;
		remote_ip[1] = 0;
		remote_ip[2] = htonl_(0xffff);
		remote_ip[3] = KFIELD(sk, KOFF_SKC_DADDR, __u32);
	} else if (family == AF_INET6_) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			local_ip[i] = KFIELD(sk, KOFF_SKC_V6_RCV_SADDR + 4 * i, __u32);
			remote_ip[i] = KFIELD(sk, KOFF_SKC_V6_DADDR + 4 * i, __u32);
		}
	} else {
		return -1;
	}
	*local_port = KFIELD(sk, KOFF_SKC_NUM, __u16);
	*remote_port = __builtin_bswap16(KFIELD(sk, KOFF_SKC_DPORT, __u16));
	return 0;
}

/* Does endpoint a sort before endpoint b? Any total order works: both ends apply the same one. */
static __always_inline int endpoint_lt(const __u32 *a_ip, __u32 a_port, const __u32 *b_ip, __u32 b_port)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (a_ip[i] != b_ip[i])
			return a_ip[i] < b_ip[i];
	}
	return a_port < b_port;
}

/* A mirrored connection's name: its lower endpoint plays the client, in that endpoint's netns. */
static __always_inline void mirror_name(struct sock_key *key, __u64 netns, const __u32 *client_ip,
					__u32 client_port, const __u32 *dest_ip, __u32 dest_port, __u32 role)
{
	key->netns = netns;
	__builtin_memcpy(key->client_ip, client_ip, sizeof(key->client_ip));
	key->client_port = client_port;
	__builtin_memcpy(key->dest_ip, dest_ip, sizeof(key->dest_ip));
	key->dest_port = dest_port;
	key->role = role;
}

static __always_inline __u64 late_netns(void *sk)
{
	void *net = KFIELD(sk, KOFF_SKC_NET, void *);

	return net ? KFIELD(net, KOFF_NET_COOKIE, __u64) : 0;
}

/*
 * Why an established socket must not join (a CNT_SKIPPED_* index; 0: it may), by what the reader
 * hook knows (docs/DATAPLANE.md, "Splice readers"): a socket that was spliced from; an accepted
 * socket of a port that is not proven (its local port has a listener the hook saw); a client
 * socket whose connect()ing program splices or has not proven its client sockets. A socket the
 * hook cannot attribute (made before it was attached) may join, as at the handshake.
 */
static __always_inline __u32 late_veto(void *tp, __u64 netns, __u32 local_port)
{
	struct port_key pk = { .netns = netns, .port = local_port };
	__u64 addr = (__u64)(long)tp;
	struct proc_key *owner;
	__u32 veto = 0;

	if (!reader_hook_on())
		return 0;
	if (spliced_socks.lookup(&addr))
		return CNT_SKIPPED_SPLICER;
	if (port_owner.lookup(&pk))
		veto = server_veto(netns, local_port);
	else if ((owner = sock_owner.lookup(&addr)))
		veto = owner_veto(owner);
	if (veto == CNT_SKIPPED_UNPROVEN && proxy_owned(tp))
		veto = 0;
	return veto;
}

static __always_inline void late_insert(void *tp)
{
	__u32 local_ip[4], local_port, remote_ip[4], remote_port;
	struct late_tuple t = {};
	struct sock_key key = {}, *named;
	struct netns_conf *conf;
	struct sock_state *st;
	__u64 netns, peer_netns;
	__u32 veto;

	if (KFIELD(tp, KOFF_SKC_STATE, __u8) != TCP_ESTABLISHED_)
		return;
	netns = late_netns(tp);
	conf = netns_conf.lookup(&netns);
	if (!conf)
		return;
	if (KFIELD(tp, KOFF_ICSK_ULP_DATA, void *))
		return;	/* an upper-layer protocol owns it (an MPTCP subflow, kTLS): its reader may never
			 * look at this socket's psock queue */
	st = sock_state.sk_storage_get(tp, 0, 0);
	if (st) {
		/* sockops decided about it at its handshake, or an earlier pass let it join */
		if (st->origin == ORIGIN_LATE && st->in_map)
			late_record(tp, st);
		return;
	}
	if (reader_style(tp) != READER_NONBLOCK)
		return;
	if (late_addrs(tp, local_ip, &local_port, remote_ip, &remote_port))
		return;
	veto = late_veto(tp, netns, local_port);
	if (veto) {
		count(veto, 1);
		return;
	}
	__builtin_memcpy(t.local_ip, local_ip, sizeof(t.local_ip));
	__builtin_memcpy(t.remote_ip, remote_ip, sizeof(t.remote_ip));
	t.netns = netns;
	t.local_port = local_port;
	t.remote_port = remote_port;
	named = late_nat.lookup(&t);
	if (named) {
		key = *named;	/* through a NAT: conntrack named the connection */
	} else {
		if (is_loopback(remote_ip) || is_pod_ip(conf, remote_ip))
			peer_netns = netns;
		else
			peer_netns = node_pod(remote_ip);
		if (!peer_netns)
			return;	/* the peer is not a socket of an enabled namespace of this node */
		if (endpoint_lt(local_ip, local_port, remote_ip, remote_port))
			mirror_name(&key, netns, local_ip, local_port, remote_ip, remote_port, ROLE_CLIENT);
		else if (endpoint_lt(remote_ip, remote_port, local_ip, local_port))
			mirror_name(&key, peer_netns, remote_ip, remote_port, local_ip, local_port, ROLE_SERVER);
		else
			return;	/* connected to itself */
	}
	st = sock_state.sk_storage_get(tp, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;
	st->key = key;
	st->origin = ORIGIN_LATE;
	st->peer_claimed = 1;	/* no half-close hand-off: an O_NONBLOCK reader never sleeps in recv() */
	st->decision = DECIDE_PASS;	/* until it is in the map */
	if (sock_hash.insert(&key, tp)) {
		/* The name is taken (a handshake-path socket of another connection cannot hold it, but
		 * an error must never pair anything): this socket stays on TCP. */
		count(CNT_INSERT_OTHER, 1);
		return;
	}
	st->in_map = 1;
	st->decision = DECIDE_LATE;
	late_record(tp, st);
	count(CNT_LATE_INSERTED, 1);
	netns_inserted(netns);
}

/*
 * The second step of a pass, for each late socket still sending over TCP:
 * - its peer joined and had read every byte this socket ever sent over TCP (the peer's copied_seq
 *   recorded in this pass equals our write_seq; it cannot be ahead of it): switch this direction
 *   to redirect. The socket is locked while it is visited, so no send of it runs between this
 *   check and the switch, and after it every send is redirected: the peer's TCP queue holds
 *   nothing from us any more, and tcp_bpf_recvmsg() reads the psock queue, where the redirected
 *   bytes go, in order.
 * - its peer joined but is still reading our TCP bytes: try again at the next pass (counted in
 *   LATE_SLOT_WAITING, so the agent comes back soon);
 * - its peer never joined (a blocking reader, not in an enabled pod of the node): leave the
 *   sockhash. Nothing was ever redirected to it (only a joined late peer redirects to a late
 *   socket), so leaving loses nothing, and it stops paying for a psock.
 */
static __always_inline void late_settle(void *tp)
{
	struct sock_state *st = sock_state.sk_storage_get(tp, 0, 0);
	struct sock_key peer;
	struct late_seq *rec;

	if (!st || st->origin != ORIGIN_LATE || !st->in_map)
		return;
	late_record(tp, st);	/* a switched socket still tells a peer that has not switched yet */
	if (st->decision != DECIDE_LATE)
		return;
	peer = st->key;
	peer.role ^= 1;
	rec = late_seqs.lookup(&peer);
	if (rec && rec->pass == late_slot(LATE_SLOT_PASS)) {
		if (rec->copied_seq == KFIELD(tp, KOFF_TP_WRITE_SEQ, __u32)) {
			st->decision = DECIDE_REDIRECT;
			count(CNT_LATE_SWITCHED, 1);
		} else {
			__u32 slot = LATE_SLOT_WAITING;
			__u32 *waiting = late_mode.lookup(&slot);

			if (waiting)
				__sync_fetch_and_add(waiting, 1);
		}
		return;
	}
	if (sock_hash.delete(&st->key) == 0)
		count(CNT_LATE_PRUNED, 1);
	late_seqs.delete(&st->key);
	st->in_map = 0;
	st->decision = DECIDE_PASS;
}

BPF_ITER(tcp)
{
	struct sock_common *skc = ctx->sk_common;
	__u32 slot = LATE_SLOT_MODE, *mode;
	void *tp;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);	/* NULL for request and time-wait sockets */
	if (!tp)
		return 0;
	mode = late_mode.lookup(&slot);
	if (mode && *mode == LATE_SETTLE)
		late_settle(tp);
	else
		late_insert(tp);
	return 0;
}
