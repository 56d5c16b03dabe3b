/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map definitions, shared by sockops.bpf.c and redirect.bpf.c (compiled as one bcc module so
 * both programs use the same maps). Every map is pinned under SOCKOPS_PIN_DIR: a restarted or
 * upgraded agent re-opens the same maps, so live connections keep their peers and their state.
 *
 * bcc 0.26 has no pinned variant of BPF_SOCKHASH or BPF_SK_STORAGE; the two macros below are
 * those tables with a "maps/<type>:<pin path>" section, which bcc's loader understands.
 */
#ifndef SOCKOPS_MAPS_H
#define SOCKOPS_MAPS_H

#include "sockops.h"

#define PIN(name) SOCKOPS_PIN_DIR "/" #name

#define SOCKHASH_PINNED(_name, _key_type, _max_entries)                        \
	struct _name##_table_t {                                               \
		_key_type key;                                                 \
		int leaf;                                                      \
		int (*update)(_key_type *, int *);                             \
		int (*insert)(_key_type *, void *);                            \
		void *(*lookup)(_key_type *);                                  \
		int (*delete)(_key_type *);                                    \
		int (*sock_hash_update)(void *, void *, u64);                  \
		int (*msg_redirect_hash)(void *, void *, u64);                 \
		int (*sk_redirect_hash)(void *, void *, u64);                  \
		u32 max_entries;                                               \
	};                                                                     \
	__attribute__((section("maps/sockhash:" PIN(_name))))                  \
	struct _name##_table_t _name = { .max_entries = (_max_entries) };     \
	BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

#define SK_STORAGE_PINNED(_name, _leaf_type)                                   \
	struct _name##_table_t {                                               \
		int key;                                                       \
		_leaf_type leaf;                                               \
		void *(*sk_storage_get)(void *, void *, int);                  \
		int (*sk_storage_delete)(void *);                              \
		u32 flags;                                                     \
	};                                                                     \
	__attribute__((section("maps/sk_storage:" PIN(_name))))                \
	struct _name##_table_t _name = { .flags = BPF_F_NO_PREALLOC };         \
	BPF_ANNOTATE_KV_PAIR(_name, int, _leaf_type)

/* Accelerated sockets, both ends of each connection (see struct sock_key). */
SOCKHASH_PINNED(sock_hash, struct sock_key, SOCKOPS_SOCKHASH_MAX);

/* Client sockets waiting for their server end to be accepted (see struct pending). */
BPF_TABLE_PINNED("hash", struct sock_key, struct pending, pending, SOCKOPS_PENDING_MAX,
		 PIN(pending), BPF_F_NO_PREALLOC);

/* Handshakes of enabled namespaces: what each SYN-ACK said about its client (see struct
 * synack_key). Consumed at PASSIVE_ESTABLISHED; LRU, so the records of handshakes that never
 * complete (a SYN flood, a dropped ACK) age out instead of filling the map. */
BPF_TABLE_PINNED("lru_hash", struct synack_key, struct synack, synacks, SOCKOPS_PENDING_MAX,
		 PIN(synacks));

/* Pod IPs of this node's enabled namespaces, written by the agent (see struct pod_ip). */
BPF_TABLE_PINNED("hash", struct pod_ip, __u64, node_pods, SOCKOPS_NETNS_MAX * NETNS_LOCAL_IPS,
		 PIN(node_pods));

/* Enabled network namespaces, written by the agent. */
BPF_TABLE_PINNED("hash", __u64, struct netns_conf, netns_conf, SOCKOPS_NETNS_MAX, PIN(netns_conf));

/* Per-namespace counters; entries created by the agent, only incremented here. */
BPF_TABLE_PINNED("percpu_hash", __u64, struct netns_stats, netns_stats, SOCKOPS_NETNS_MAX,
		 PIN(netns_stats));

/* Paired connections' half-close hand-off bits (see struct conn_state), from the pairing to the
 * client's FIN. An entry's connection normally holds two sockhash slots until then, so a map
 * as large as the sockhash does not fill before it (if it did: "not accelerated"). */
BPF_TABLE_PINNED("hash", __u64, struct conn_state, conns, SOCKOPS_SOCKHASH_MAX, PIN(conns),
		 BPF_F_NO_PREALLOC);

/* How programs read, and who owns a listening port or a connecting socket (struct proc_key,
 * struct port_info). LRU: an evicted entry only makes its program prove itself again (no psock
 * until then), and an evicted splicer is forgotten until its next splice(). */
BPF_TABLE_PINNED("lru_hash", struct proc_key, struct proc_reader, procs, SOCKOPS_PENDING_MAX,
		 PIN(procs));
BPF_TABLE_PINNED("lru_hash", struct port_key, struct port_info, port_owner, SOCKOPS_PENDING_MAX,
		 PIN(port_owner));
BPF_TABLE_PINNED("lru_hash", __u64, struct proc_key, sock_owner, SOCKOPS_PENDING_MAX,
		 PIN(sock_owner));
/* Sockets spliced from (by kernel address), for the late pass: a connection that predates the
 * enable can have been spliced by a program the pass cannot name. A stale entry (the address of a
 * closed socket reused) only keeps a socket on TCP. */
BPF_TABLE_PINNED("lru_hash", __u64, __u64, spliced_socks, SOCKOPS_PENDING_MAX, PIN(spliced_socks));

/* Index 0: 1 while the reader hook is attached (set by user space beside the hook's link,
 * sockops/reader_hook.py). Without the hook nothing is learnt, so sock_ops must not wait for
 * proof it can never get: it then vetoes nothing (splice readers are not known). */
BPF_TABLE_PINNED("array", __u32, __u32, reader_state, 1, PIN(reader_state));

static __always_inline int reader_hook_on(void)
{
	__u32 zero = 0, *on = reader_state.lookup(&zero);

	return on && *on;
}

/* What went wrong in apps' traffic, per sending namespace (struct netns_anomalies); entries
 * created by the agent beside netns_stats, only updated here. */
BPF_TABLE_PINNED("hash", __u64, struct netns_anomalies, anomalies, SOCKOPS_NETNS_MAX,
		 PIN(anomalies));

BPF_TABLE_PINNED("percpu_array", __u32, __u64, counters, CNT_MAX, PIN(counters));

SK_STORAGE_PINNED(sock_state, struct sock_state);

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = counters.lookup(&idx);

	if (v)
		*v += n; /* per-CPU slot: no atomic needed */
}

/* Count one anomaly of `kind` for namespace `netns`, naming the current process (the sender in
 * sk_msg, the caller of the syscall in the reader hook). */
static __always_inline void anomaly_at(__u64 netns, __u32 kind)
{
	struct netns_anomalies *a = anomalies.lookup(&netns);

	if (!a || kind >= ANOM_MAX)
		return;
	__sync_fetch_and_add(&a->count[kind], 1);
	a->pid[kind] = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(a->comm[kind], ANOM_COMM_LEN);
}

/* What the reader hook knows of a process (PROC_F_*; 0 for a process it never noted). */
static __always_inline __u64 proc_flags(const struct proc_key *k)
{
	struct proc_reader *p = procs.lookup((void *)k);

	return p ? p->flags : 0;
}

#endif /* SOCKOPS_MAPS_H */
