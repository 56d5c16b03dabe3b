/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sock_ops hook: decides which sockets join the sockhash, and pairs the two ends of a connection.
 *
 * The life of an accelerated connection (both ends in enabled pods of this node):
 *   1. client ACTIVE_ESTABLISHED: a client whose file is O_NONBLOCK (an event loop: blocking
 *      readers stay on TCP, kernel.bpf.h) joins the sockhash as (conn, CLIENT) and leaves a
 *      pending entry under its own 4-tuple, tagged WAITING.
 *   2. server SYN-ACK (synack.bpf.c): conntrack has un-NATed it, so it names the client's 4-tuple;
 *      it is recorded under what the server socket will know (struct synack_key).
 *   3. server PASSIVE_ESTABLISHED: the accepted socket takes that record, finds the client's
 *      pending entry by the exact 4-tuple, joins as (conn, SERVER) and flips the tag to PAIRED.
 *      Nothing else can pair two sockets: no port, address or capture-port guess is involved.
 *   4. the first message on the client decides once, for the connection's lifetime
 *      (decide_client): PAIRED means redirect both ways; WAITING means the server has not joined
 *      yet (the handshake's last ACK is still in a backlog), so the tag flips to PASS and the whole
 *      connection stays on TCP.
 *   5. a PASS client leaves the sockhash on its next transmit (HDR_OPT_LEN callback, below), or at
 *      its FIN if it never sends.
 *
 * Why a connection never starts redirecting mid-stream, nor receives over TCP while it has a
 * psock: tcp_bpf_recvmsg() reads the psock queue before the TCP queue (older TCP bytes would be
 * read after newer redirected ones), and a reader blocked in it that is woken by TCP data returns
 * EAGAIN. So either both ends redirect from the first byte, or neither end keeps a psock.
 */
#include <uapi/linux/bpf.h>

#include "kernel.bpf.h"
#include "maps.bpf.h"

#define AF_INET_ 2
#define AF_INET6_ 10
#define E2BIG_ 7
#define EEXIST_ 17
#define EBUSY_ 16
#define IPPROTO_TCP_ 6

/* A volatile read of one context field: clang may not move or merge it. */
#define CTX(ctx, field) (*(volatile __u32 *)&(ctx)->field)

static __always_inline __u32 htonl_(__u32 x)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return __builtin_bswap32(x);
#else
	return x;
#endif
}

/*
 * Copy the socket's addresses as IPv6 (IPv4 mapped) and host-order ports. Every context field is
 * read once, unconditionally, into a local: the verifier rejects a context pointer that clang has
 * offset and carried across branches ("dereference of modified ctx ptr").
 */
static __always_inline int load_addrs(struct bpf_sock_ops *skops, __u32 *local_ip, __u32 *local_port,
				      __u32 *remote_ip, __u32 *remote_port)
{
	__u32 family = CTX(skops, family);
	__u32 l4 = CTX(skops, local_ip4), r4 = CTX(skops, remote_ip4);
	__u32 l6_0 = CTX(skops, local_ip6[0]), l6_1 = CTX(skops, local_ip6[1]);
	__u32 l6_2 = CTX(skops, local_ip6[2]), l6_3 = CTX(skops, local_ip6[3]);
	__u32 r6_0 = CTX(skops, remote_ip6[0]), r6_1 = CTX(skops, remote_ip6[1]);
	__u32 r6_2 = CTX(skops, remote_ip6[2]), r6_3 = CTX(skops, remote_ip6[3]);
	__u32 lport = CTX(skops, local_port), rport = CTX(skops, remote_port);

	if (family == AF_INET_) {
		local_ip[0] = 0;
		local_ip[1] = 0;
		local_ip[2] = htonl_(0xffff);
		local_ip[3] = l4;
		remote_ip[0] = 0;
		remote_ip[1] = 0;
		remote_ip[2] = htonl_(0xffff);
		remote_ip[3] = r4;
	} else if (family == AF_INET6_) {
		local_ip[0] = l6_0;
		local_ip[1] = l6_1;
		local_ip[2] = l6_2;
		local_ip[3] = l6_3;
		remote_ip[0] = r6_0;
		remote_ip[1] = r6_1;
		remote_ip[2] = r6_2;
		remote_ip[3] = r6_3;
	} else {
		return -1;
	}
	*local_port = lport;		/* host order already */
	*remote_port = htonl_(rport);	/* network order in the upper half */
	return 0;
}

static __always_inline int ip_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int is_loopback(const __u32 *ip)
{
	if (ip[0] == 0 && ip[1] == 0 && ip[2] == htonl_(0xffff))
		return (htonl_(ip[3]) >> 24) == 127;	/* 127.0.0.0/8 */
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == htonl_(1);	/* ::1 */
}

static __always_inline int is_pod_ip(const struct netns_conf *conf, const __u32 *ip)
{
#pragma unroll
	for (int i = 0; i < NETNS_LOCAL_IPS; i++) {
		if (ip_eq(conf->local_ip[i], ip))
			return 1;
	}
	return 0;
}

/*
 * Could the server end of this client connection be in the same pod? Only then (or when the
 * destination is another enabled pod of the node, node_pod()) is the client worth inserting: a
 * client that never pairs would carry a psock until its first send for nothing.
 */
static __always_inline int may_pair_locally(const struct netns_conf *conf, const __u32 *dest_ip)
{
	if (conf->flags & NETNS_F_SIDECAR)
		return 1;	/* Istio captures outbound traffic to Envoy in the same pod */
	return is_loopback(dest_ip) || is_pod_ip(conf, dest_ip);
}

/* The enabled namespace of this node that owns `ip`; 0 for none (or an ambiguous IP). */
static __always_inline __u64 node_pod(const __u32 *ip)
{
	struct pod_ip k;
	__u64 *owner;

	__builtin_memcpy(k.ip, ip, sizeof(k.ip));
	owner = node_pods.lookup(&k);
	return owner ? *owner : 0;
}

/*
 * Sockets that must never get a psock. A socket of IPPROTO_MPTCP runs no sock_ops (only its TCP
 * subflows do), but the subflows are IPPROTO_TCP sockets owned by the MPTCP socket, whose reader
 * never looks at a subflow's psock queue: bytes redirected there would be lost to it.
 */
static __always_inline int eligible(struct bpf_sock_ops *skops, struct bpf_sock *sk)
{
	if (sk->protocol != IPPROTO_TCP_)
		return 0;
	if (bpf_skc_to_mptcp_sock(sk)) {
		count(CNT_SKIPPED_MPTCP, 1);
		return 0;
	}
	return 1;
}

/*
 * Why a socket of this process must not get a psock, as a CNT_SKIPPED_* index (0: it may). A
 * program that serves (it listen()s or accept()s: a proxy, a gateway) must first have read one of
 * its client sockets with read()/recv*(): Go's io.Copy proxy splices its upstream connection from
 * its first byte. A pure client (it never served) is not vetoed: a program that splices what it
 * fetches is caught at that splice (docs/DATAPLANE.md, "Splice readers").
 */
static __always_inline __u32 owner_veto(const struct proc_key *k)
{
	__u64 flags = proc_flags(k);

	if (flags & PROC_F_SPLICED)
		return CNT_SKIPPED_SPLICER;
	if ((flags & PROC_F_SERVES) && !(flags & PROC_F_CLIENT_RECV))
		return CNT_SKIPPED_UNPROVEN;
	return 0;
}

/*
 * The same for a new client socket. Its owner was recorded by the reader hook at connect(), under
 * the socket's kernel address; that record is used once, here, because a later socket may reuse
 * the address. A connect() the hook did not see is not vetoed.
 */
static __always_inline __u32 client_veto(struct bpf_sock *sk)
{
	__u64 addr = (__u64)(long)sk;
	struct proc_key *owner = sock_owner.lookup(&addr);
	struct proc_key k;

	if (!owner)
		return 0;
	k = *owner;
	sock_owner.delete(&addr);
	return reader_hook_on() ? owner_veto(&k) : 0;
}

/*
 * Why a server end accepted on this port must not get a psock (0: it may). The port must be
 * proven: a socket accepted on it was read with read()/recv*() by the program that listens there,
 * and none spliced (struct port_info). An unproven port's first connections are plain TCP; that
 * is what lets a program that splices from its very first connection (a Go io.Copy proxy started
 * in an enabled pod) lose nothing. A port the hook has never seen listen() or accept() on (an
 * accept() that was already waiting when the hook was attached) is unproven until its next one.
 */
static __always_inline __u32 server_veto(__u64 netns, __u32 local_port)
{
	struct port_key pk = { .netns = netns, .port = local_port };
	struct port_info *info;
	__u64 flags;

	if (!reader_hook_on())
		return 0;
	info = port_owner.lookup(&pk);
	if (!info)
		return CNT_SKIPPED_UNPROVEN;
	flags = info->flags;
	if ((flags & PORT_F_SPLICED) || (proc_flags(&info->owner) & PROC_F_SPLICED))
		return CNT_SKIPPED_SPLICER;
	if (!(flags & PORT_F_RECV))
		return CNT_SKIPPED_UNPROVEN;
	return 0;
}

/*
 * Is this a socket of the mesh's proxy (Istio's UID: a sidecar, or a gateway's Envoy)? Envoy reads
 * every socket from its event loop with readv() and never splices, so its sockets need no proof
 * from the reader hook (which skips that UID's reads): a proxy that just started is accelerated
 * from its first connection. sk_uid is the creator's (an accepted socket inherits its
 * listener's). `tp`: a struct tcp_sock (struct sock is its first member).
 */
static __always_inline int proxy_owned(void *tp)
{
	return KFIELD(tp, KOFF_SK_UID, __u32) == SOCKOPS_PROXY_UID;
}

static __always_inline int proxy_socket(struct bpf_sock *sk)
{
	void *tp = bpf_skc_to_tcp_sock(sk);

	return tp && proxy_owned(tp);
}

static __always_inline void count_insert_error(int err)
{
	if (err == -E2BIG_)
		count(CNT_INSERT_FULL, 1);
	else if (err == -EBUSY_)
		count(CNT_INSERT_BUSY, 1);
	else
		count(CNT_INSERT_OTHER, 1);
}

static __always_inline void netns_inserted(__u64 netns)
{
	struct netns_stats *s = netns_stats.lookup(&netns);

	if (s)
		s->sockets_inserted++;
}

static __always_inline void on_active_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct netns_conf *conf = netns_conf.lookup(&netns);
	struct sock_key key = {};
	struct pending pend = {};
	struct sock_state *st;
	__u64 cookie, remote;
	__u32 veto;
	int err;

	if (!conf || !sk)
		return;
	if (!eligible(skops, sk))
		return;
	if (skops->data_segs_out) {
		/* TCP Fast Open: bytes rode on the SYN over TCP, before any redirect could exist */
		count(CNT_SKIPPED_FASTOPEN, 1);
		return;
	}
	if (reader_style(sk) == READER_BLOCKING) {
		/* A blocking reader may sleep in recv() on this socket, and a psock would expose that
		 * sleep to spurious EAGAINs (a thread blocked in recv() while another half-closes, a
		 * client that half-closes after the server spoke): its connection stays on plain
		 * TCP. Its server end finds no pending entry and is never inserted either. */
		count(CNT_SKIPPED_BLOCKING, 1);
		return;
	}
	veto = client_veto(sk);
	if (veto == CNT_SKIPPED_UNPROVEN && proxy_socket(sk))
		veto = 0;
	if (veto) {
		/* Its program splices (which never sees redirected bytes), or has not shown yet that
		 * it reads with recv(): plain TCP for the whole connection (docs/DATAPLANE.md, "Splice
		 * readers"). */
		count(veto, 1);
		return;
	}
	if (load_addrs(skops, key.client_ip, &key.client_port, key.dest_ip, &key.dest_port))
		return;
	remote = node_pod(key.dest_ip);
	if (remote == netns)
		remote = 0;	/* its own address: a local connection */
	if (!remote && !may_pair_locally(conf, key.dest_ip))
		return;
	key.netns = netns;
	key.role = ROLE_CLIENT;

	st = sock_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(CNT_INSERT_OTHER, 1);
		return;
	}
	cookie = bpf_get_socket_cookie(skops);
	st->cookie = cookie;
	st->key = key;
	st->decision = DECIDE_PASS;	/* until both map updates below succeed */

	/* Written before the handshake's last ACK leaves (this callback runs first), so the entry is
	 * in place when the server's PASSIVE_ESTABLISHED runs, in this pod or in `remote`. */
	pend.tag = (cookie << 2) | PEND_WAITING;
	err = pending.insert(&key, &pend);
	if (err) {
		/* EEXIST: a stale entry under this very 4-tuple (a previous connection's, not yet
		 * cleaned). Never "first one wins": this connection is simply not accelerated. */
		count(err == -EEXIST_ ? CNT_PENDING_AMBIGUOUS : CNT_PENDING_FULL, 1);
		return;
	}
	err = sock_hash.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (err) {
		count_insert_error(err);
		pending.delete(&key);
		return;
	}
	st->in_map = 1;
	st->decision = DECIDE_UNDECIDED;
	count(CNT_SOCKETS_INSERTED, 1);
	netns_inserted(netns);
	/* STATE for cleanup at close; WRITE_HDR_OPT to withdraw on the first transmit if PASS. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG |
					 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

/*
 * Which client this accepted socket serves: the record its SYN-ACK left (synack.bpf.c), taken
 * (deleted) here. The client is in this namespace when its address is loopback or one of the
 * pod's own, else in the enabled pod of this node that owns its IP (node_pods; an IP claimed by
 * two namespaces is 0 there and never paired). Fills the client's pending key; 0 if none.
 */
static __always_inline int server_identity(struct bpf_sock_ops *skops, const struct netns_conf *conf,
					   __u64 netns, const __u32 *remote_ip, __u32 local_port,
					   struct sock_key *key)
{
	struct synack_key k = {};
	struct synack *rec;
	int ambiguous;

	k.netns = netns;
	__builtin_memcpy(k.client_ip, remote_ip, sizeof(k.client_ip));
	k.local_port = local_port;
	k.isn = skops->snd_una - 1;	/* nothing sent yet: snd_una is the ISN plus the SYN */
	rec = synacks.lookup(&k);
	if (!rec)
		return 0;	/* no SYN-ACK seen: a Fast Open child, or a handshake from before the load */
	*key = rec->conn;
	ambiguous = rec->ambiguous;
	synacks.delete(&k);
	if (ambiguous)
		return 0;	/* counted once, where the collision was seen (synack.bpf.c) */
	if (is_loopback(key->client_ip) || is_pod_ip(conf, key->client_ip))
		key->netns = netns;
	else
		key->netns = node_pod(key->client_ip);
	key->role = ROLE_CLIENT;
	return key->netns != 0;
}

static __always_inline void on_passive_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct netns_conf *conf = netns_conf.lookup(&netns);
	struct conn_state zero_conn = {};
	struct sock_key key = {};
	__u32 local_ip[4], local_port, remote_ip[4], remote_port;
	struct sock_state *st;
	struct pending *p;
	__u64 tag;
	__u32 veto;
	int found, mirror, err;

	if (!conf || !sk)
		return;
	if (load_addrs(skops, local_ip, &local_port, remote_ip, &remote_port))
		return;
	/* takes its SYN-ACK record in any case, eligible or not */
	found = server_identity(skops, conf, netns, remote_ip, local_port, &key);
	if (!eligible(skops, sk) || !found)
		return;
	veto = server_veto(netns, local_port);
	if (veto == CNT_SKIPPED_UNPROVEN && proxy_socket(sk))
		veto = 0;
	if (veto) {
		/* The program behind this port splices, or has not read a connection of this port
		 * with recv() yet: the server end stays out, so its client decides PASS at its first
		 * message and the connection is plain TCP both ways. */
		count(veto, 1);
		return;
	}
	p = pending.lookup(&key);
	if (!p)
		return;	/* the client is not an enabled socket */
	tag = p->tag;
	if ((tag & PEND_MASK) != PEND_WAITING)
		return;	/* already paired, or the client already chose TCP */
	mirror = ip_eq(local_ip, key.dest_ip) && local_port == key.dest_port &&
		 ip_eq(remote_ip, key.client_ip) && remote_port == key.client_port;
	key.role = ROLE_SERVER;

	st = sock_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(CNT_INSERT_OTHER, 1);
		return;
	}
	st->cookie = tag >> 2;
	st->key = key;
	st->decision = DECIDE_PASS;

	err = sock_hash.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (err) {
		count_insert_error(err);
		/* Tell the client to leave too (its HDR_OPT callback reads this): a client that keeps
		 * its psock while its server sends over TCP risks EAGAIN in a blocking recv(). */
		__sync_val_compare_and_swap(&p->tag, tag, (tag & ~(__u64)PEND_MASK) | PEND_PASS);
		return;
	}
	/* The hand-off bits exist before any redirect can (conns cannot fill before the sockhash). */
	if (conns.insert(&st->cookie, &zero_conn)) {
		sock_hash.delete(&key);
		count(CNT_INSERT_FULL, 1);
		__sync_val_compare_and_swap(&p->tag, tag, (tag & ~(__u64)PEND_MASK) | PEND_PASS);
		return;
	}
	/* Commit only if the entry is still this connection's and still waiting. */
	if (__sync_val_compare_and_swap(&p->tag, tag, (tag & ~(__u64)PEND_MASK) | PEND_PAIRED) != tag) {
		sock_hash.delete(&key);	/* the client spoke first: nothing was queued to us */
		conns.delete(&st->cookie);
		count(CNT_PAIR_RACE_LOST, 1);
		return;
	}
	st->in_map = 1;
	st->decision = DECIDE_REDIRECT;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	count(CNT_SOCKETS_INSERTED, 1);
	count(mirror ? CNT_PAIRED_MIRROR : CNT_PAIRED_ORIGDST, 1);
	if (key.netns != netns)
		count(CNT_PAIRED_CROSS_POD, 1);
	netns_inserted(netns);
}

/*
 * The client's one decision, at its first message (redirect.bpf.c) or at its FIN if it sends
 * nothing (on_own_fin): redirect if its server end has joined the sockhash (tag PAIRED), else
 * stay on TCP and mark the tag PASS so a server that joins a moment later withdraws. The
 * compare-and-swap against our own tag is what makes that race safe: exactly one end wins.
 * The caller counts a PASS (connections_passed at a first message, undecided_fin_left at a FIN).
 *
 * A client whose first bytes already left over TCP (wrote_over_tcp(), kernel.bpf.h: its send
 * raced its own psock) never redirects: its messages stay on TCP for good, or the next one would
 * overtake them. If its server already joined, the server's direction still redirects to us (the
 * server may have done so already, so we keep the psock; this client reads without sleeping, as
 * only O_NONBLOCK clients are inserted), and the server end, which never receives a redirected
 * byte, leaves the sockhash at its FIN through the hand-off.
 */
static __always_inline void decide_client(struct sock_state *st, int early_tcp)
{
	__u64 mine = st->cookie << 2;
	struct pending *p;
	__u64 old;

	st->decision = DECIDE_PASS;
	p = pending.lookup(&st->key);
	if (!p)
		return;
	old = __sync_val_compare_and_swap(&p->tag, mine | PEND_WAITING, mine | PEND_PASS);
	if (old == (mine | PEND_PAIRED)) {
		st->decision = DECIDE_REDIRECT;
		if (early_tcp)
			st->peer_fin = 1;	/* "send over TCP from now on": see redirect.bpf.c */
	}
	if (early_tcp)
		count(CNT_EARLY_TCP_SEND, 1);
	if ((old >> 2) == st->cookie)
		pending.delete(&st->key);	/* decided: the entry has done its job */
}

/*
 * Called on the client for each transmitted segment while WRITE_HDR_OPT is set (we add no option
 * bytes). The first data segment follows the first message's decision in the same sendmsg(), so
 * an unpaired client leaves the sockhash before it can read anything: its replies then arrive
 * over plain TCP to a socket without a psock.
 */
static __always_inline void on_transmit(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct pending *p;

	if (!sk)
		return;
	st = sock_state.sk_storage_get(sk, 0, 0);
	if (!st)
		goto done;
	if (st->decision == DECIDE_UNDECIDED) {
		p = pending.lookup(&st->key);
		if (!p || p->tag != ((st->cookie << 2) | PEND_PASS))
			return;	/* still waiting (e.g. the handshake's ACK): keep watching */
		st->decision = DECIDE_PASS;	/* the server could not join the sockhash */
		pending.delete(&st->key);
	}
	if (st->decision == DECIDE_PASS && st->in_map) {
		sock_hash.delete(&st->key);
		st->in_map = 0;
		count(CNT_SOCKETS_WITHDRAWN, 1);
	}
done:
	bpf_sock_ops_cb_flags_set(skops,
				  skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

/* A client that closes leaves no pending entry (if it never spoke) and no conns entry behind. */
static __always_inline void on_close(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct pending *p;

	if (!sk)
		return;
	st = sock_state.sk_storage_get(sk, 0, 0);
	if (!st || st->key.role != ROLE_CLIENT)
		return;
	conns.delete(&st->cookie);	/* the connection's hand-off bits (if it was paired) */
	p = pending.lookup(&st->key);
	if (p && (p->tag >> 2) == st->cookie)
		pending.delete(&st->key);
}

/*
 * The peer half-closed (its FIN arrived). From now on this socket sends over TCP instead of
 * redirecting. Why: the peer's reader is likely blocked in tcp_bpf_recvmsg(), and the bare ACK
 * of its FIN moves it to FIN_WAIT2 with a wake-up that carries no data; tcp_bpf_recvmsg() then
 * returns -EAGAIN to a *blocking* reader (kernel 6.18; see docs/KERNEL-NOTES.md). Sending the
 * reply over TCP lets that ACK ride on the reply's first segment, whose data makes the wake-up
 * real. Switching from redirect to TCP mid-stream keeps order: the reader drains its psock queue
 * (older bytes) before it falls back to the TCP queue (newer bytes).
 */
static __always_inline void on_peer_fin(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;

	if (!sk)
		return;
	st = sock_state.sk_storage_get(sk, 0, 0);
	if (st && st->decision == DECIDE_REDIRECT)
		st->peer_fin = 1;
}

/*
 * This socket sent its FIN (shutdown(SHUT_WR) or close(); called from tcp_set_state() with the
 * socket locked, before the FIN goes out). Why the hand-off: a half-closed socket that keeps its
 * psock and then blocks in recv() is woken when the peer's bare ACK of the FIN moves it to
 * FIN_WAIT2, and tcp_bpf_recvmsg() returns -EAGAIN to that *blocking* reader (kernel 6.18,
 * docs/KERNEL-NOTES.md §1). Without a psock the socket reads with tcp_recvmsg(), which waits
 * again. So the socket leaves the sockhash now, but only when that provably loses nothing:
 * leaving frees the psock and purges its queue, so no byte may ever have been redirected to it.
 * The peer sets RX_USED before its first redirect to us and we set HALF_CLOSED here, each with
 * one atomic fetch-or on the same word: either we see RX_USED and stay, or the peer sees
 * HALF_CLOSED and sends over TCP from its first byte on (redirect.bpf.c, claim_peer).
 * A socket that stays is still exposed; KERNEL-NOTES.md says when that happens.
 */
static __always_inline void on_own_fin(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct conn_state *cs;
	__u64 old;

	if (!sk)
		return;
	st = sock_state.sk_storage_get(sk, 0, 0);
	if (!st)
		return;
	if (st->decision == DECIDE_UNDECIDED) {
		/* A client that never sent (a server-first protocol, or connect() then shutdown()):
		 * decide now. Paired: its server may already have redirected to it, so it stays and
		 * takes the hand-off below like any paired end. Not paired: nothing was ever
		 * redirected to it, so it leaves the sockhash and reads over plain TCP. */
		decide_client(st, wrote_over_tcp(sk));
		if (st->decision == DECIDE_PASS && st->in_map) {
			sock_hash.delete(&st->key);
			st->in_map = 0;
			count(CNT_UNDECIDED_FIN, 1);
		}
	}
	if (st->in_map && st->decision == DECIDE_REDIRECT) {
		cs = conns.lookup(&st->cookie);
		old = cs ? __sync_fetch_and_or(&cs->flags[st->key.role & 1], SOCK_F_HALF_CLOSED)
			 : SOCK_F_RX_USED;	/* no entry (client end gone): no hand-off, stay */
		if (!(old & SOCK_F_RX_USED)) {
			/* close() has already taken it out (sock_map_close): count only a real leave */
			if (sock_hash.delete(&st->key) == 0)
				count(CNT_HALFCLOSE_LEFT, 1);
			st->in_map = 0;
		}
	}
	/* After the client's FIN the entry has done its job: a server that has not claimed yet
	 * finds it gone and sends over TCP, which is what it should do to a half-closed peer
	 * anyway. Freeing it here, not at the client's final CLOSE (which may come a FIN timeout
	 * later), keeps the conns map no fuller than the sockhash. */
	if (st->key.role == ROLE_CLIENT)
		conns.delete(&st->cookie);
}

int sockops_main(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_passive_established(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		on_transmit(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			on_close(skops);
		else if (skops->args[1] == BPF_TCP_CLOSE_WAIT)
			on_peer_fin(skops);
		else if (skops->args[1] == BPF_TCP_FIN_WAIT1)
			on_own_fin(skops);
		break;
	}
	return 1;	/* sock_ops return value: 1 = ok; we never fail a connection */
}
