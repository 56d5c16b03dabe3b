/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sk_msg hook: runs on every sendmsg() of a socket in the sockhash and moves the bytes straight
 * to the peer socket's receive (ingress) queue, skipping TCP/IP, netfilter and loopback.
 *
 * It must never drop: when the peer is not in the sockhash (it is closing, or the map entry was
 * removed), bpf_msg_redirect_hash() returns SK_DROP, and returning that would fail the sender's
 * sendmsg() with EACCES. We return SK_PASS instead, so the bytes take the normal TCP path.
 */

#include <uapi/linux/bpf.h>

#include "maps.bpf.h"

/*
 * Bytes the redirect target holds unread in its psock ingress queue (sk_psock.msg_tot_len),
 * called right after a successful bpf_msg_redirect_hash(). That helper stored the target socket
 * in the kernel's struct sk_msg behind our context (sk_redir), found in the sockhash under RCU;
 * this program still runs inside that RCU read section, and a psock is freed only after a grace
 * period, so both stay valid here. Why not look the peer up ourselves: a sockhash lookup returns
 * a referenced socket that an sk_msg program has no bpf_sk_release() for (the verifier refuses
 * it, kernel 6.18). sk_user_data is a plain `void *` with flag bits, not a BTF-typed pointer, so
 * every step is a bpf_probe_read_kernel() (read_kernel), which cannot fault; an unreadable
 * step reads as 0.
 */
static __always_inline __u32 target_queued(struct sk_msg_md *msg)
{
	__u64 peer = 0, peer_psock;
	__u32 queued = 0;

	read_kernel(&peer, sizeof(peer), (void *)msg + KOFF_SK_MSG_SK_REDIR);
	if (!peer)
		return 0;
	peer_psock = psock_of(peer);
	if (!peer_psock)
		return 0;
	read_kernel(&queued, sizeof(queued), (void *)(peer_psock + KOFF_PSOCK_MSG_TOT_LEN));
	return queued;
}

/* Count one anomaly of `kind` for the sending namespace, naming the sending process. */
static __always_inline void anomaly(struct sk_msg_md *msg, __u32 kind)
{
	anomaly_at(bpf_get_netns_cookie(msg), kind);
}

/*
 * Before the first redirect to the peer, mark RX_USED on the peer's half of the connection's
 * hand-off bits (struct conn_state; the receiving side is sockops.bpf.c on_own_fin). Returns 0
 * when the peer already half-closed with nothing ever redirected to it (it is leaving the
 * sockhash), or when the entry is gone (the client end closed): then this socket sends over TCP
 * for good, which is always safe. Once claimed, the peer never leaves early, so later messages
 * skip the lookup.
 */
static __always_inline int claim_peer(struct sock_state *st)
{
	struct conn_state *cs;
	__u64 old;

	if (st->peer_claimed)
		return 1;
	cs = conns.lookup(&st->cookie);
	if (!cs) {
		st->peer_fin = 1;
		return 0;
	}
	old = __sync_fetch_and_or(&cs->flags[(st->key.role ^ 1) & 1], SOCK_F_RX_USED);
	if (old & SOCK_F_HALF_CLOSED) {
		st->peer_fin = 1;
		return 0;
	}
	st->peer_claimed = 1;
	return 1;
}

int sockops_redirect(struct sk_msg_md *msg)
{
	struct sock_state *st;
	struct netns_stats *ns;
	struct sock_key peer;
	__u64 size = msg->size;

	if (!msg->sk)
		return SK_PASS;
	st = sock_state.sk_storage_get(msg->sk, 0, 0);
	if (!st)
		return SK_PASS;
	if (st->decision == DECIDE_UNDECIDED) {
		int early = wrote_over_tcp(msg->sk);

		decide_client(st, early);	/* sockops.bpf.c: the first message decides */
		if (st->decision == DECIDE_PASS)
			count(CNT_PASSED, 1);
		if (early)
			anomaly(msg, ANOM_EARLY_TCP_SEND);
	}
	/* DECIDE_LATE (a socket that joined after its handshake) sends over TCP until the agent's
	 * iterator pass has seen its peer read every byte it sent that way (late.bpf.c). */
	if (st->decision != DECIDE_REDIRECT || st->peer_fin)
		return SK_PASS;
	if (!claim_peer(st))
		return SK_PASS;
	peer = st->key;
	peer.role ^= 1;
	ns = netns_stats.lookup(&peer.netns);
	if (sock_hash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(CNT_REDIRECTED_MSGS, 1);
		count(CNT_REDIRECTED_BYTES, size);
		if (ns) {
			ns->redirected_msgs++;
			ns->redirected_bytes += size;
		}
		/*
		 * A redirected byte bypasses TCP's flow control: it is queued on the peer's psock
		 * whether or not the peer reads, without limit. Once the peer holds more than the
		 * budget unread (this message included, which is already on its way), this socket
		 * sends over TCP for good, where a full receive window blocks the sender again. Order
		 * is kept as after a peer's FIN: the reader drains its psock queue (older bytes)
		 * before its TCP queue (newer ones). docs/DATAPLANE.md, "The queue budget".
		 */
		if (target_queued(msg) + size > SOCKOPS_QUEUE_BUDGET) {
			st->peer_fin = 1;
			count(CNT_QUEUE_OVER_BUDGET, 1);
			anomaly(msg, ANOM_QUEUE_OVER_BUDGET);
		}
	} else {
		count(CNT_MISSES, 1);
		if (ns)
			ns->misses++;
		anomaly(msg, ANOM_REDIRECT_MISS);
	}
	return SK_PASS;
}
