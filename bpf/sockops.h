/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of what sockops' BPF programs share with each other and with user space:
 * key and value layouts, map names and pins, counter indexes. sockops/layout.py mirrors every
 * struct and constant here with ctypes; tests/test_layout.py checks the two agree.
 *
 * The loader passes these at compile time (all have defaults for a plain compile check):
 *   SOCKOPS_PIN_DIR      bpffs directory that holds the pinned maps (a string literal)
 *   SOCKOPS_SOCKHASH_MAX sockets the sockhash can hold
 *   SOCKOPS_PENDING_MAX  connections that can wait for their peer at once
 *   SOCKOPS_NETNS_MAX    network namespaces that can be enabled
 *   SOCKOPS_QUEUE_BUDGET bytes a receiver may hold unread in its psock queue before its peer's
 *                        sends go over TCP (redirect.bpf.c, over_budget; docs/DATAPLANE.md)
 *   SOCKOPS_PROXY_UID    the mesh proxy's UID: its sockets are trusted to be read by Envoy's
 *                        event loop, without proof from the reader hook
 *   KOFF_*               offsets of kernel-internal fields, read from the running kernel's BTF
 *                        (sockops/kernel_btf.py; no default: see kernel.bpf.h)
 */
#ifndef SOCKOPS_H
#define SOCKOPS_H

#ifndef SOCKOPS_PIN_DIR
#define SOCKOPS_PIN_DIR "/sys/fs/bpf/sockops"
#endif
#ifndef SOCKOPS_SOCKHASH_MAX
#define SOCKOPS_SOCKHASH_MAX 65536
#endif
#ifndef SOCKOPS_PENDING_MAX
#define SOCKOPS_PENDING_MAX 16384
#endif
#ifndef SOCKOPS_NETNS_MAX
#define SOCKOPS_NETNS_MAX 1024
#endif
#ifndef SOCKOPS_QUEUE_BUDGET
#define SOCKOPS_QUEUE_BUDGET (4 << 20)
#endif
#ifndef SOCKOPS_PROXY_UID
#define SOCKOPS_PROXY_UID 1337
#endif

/*
 * A connection is named by its client socket's view of it, in the client's network namespace:
 * (netns cookie, client ip:port, original destination ip:port). Both ends of an accelerated
 * connection sit in the sockhash under that one name, told apart by `role`, so either end finds
 * the other by flipping one field. That holds for Istio's REDIRECT too, where the two sockets'
 * 4-tuples do not mirror each other: the server end learns the name from its own SYN-ACK
 * (struct synack_key). A live TCP socket's 4-tuple is unique in its namespace, so the name is
 * too: no two connections ever share a key, whatever ports they share.
 *
 * The netns cookie is part of every key: two pods that both talk 127.0.0.1:A <-> 127.0.0.1:B have
 * identical 4-tuples, and a key without the namespace would deliver one pod's bytes to the other.
 * Addresses are IPv6; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so an AF_INET client and a
 * dual-stack AF_INET6 server agree on one key. Ports are in host byte order.
 */
struct sock_key {
	__u64 netns;
	__u32 client_ip[4];
	__u32 dest_ip[4];
	__u32 client_port;
	__u32 dest_port;
	__u32 role; /* ROLE_CLIENT or ROLE_SERVER */
	__u32 pad;
};

#define ROLE_CLIENT 0
#define ROLE_SERVER 1

/*
 * Pending map value, keyed by the client's struct sock_key (role ROLE_CLIENT): written at the
 * client's ACTIVE_ESTABLISHED, claimed by its server end at PASSIVE_ESTABLISHED. `tag` is
 * (client socket cookie << 2 | PEND_*): both ends change it only by compare-and-swap against the
 * exact tag they read, so a deleted and reused entry (a later connection with the same 4-tuple)
 * can never be mistaken for this one.
 */
struct pending {
	__u64 tag;
};

#define PEND_WAITING 0 /* client in the sockhash, no decision yet */
#define PEND_PAIRED 1  /* server end joined the sockhash: redirect both ways */
#define PEND_PASS 2    /* client spoke first before the server joined: TCP both ways */
#define PEND_MASK 3

/*
 * How a server end learns which client it serves (docs/DATAPLANE.md, "Exact pairing"). The
 * server's own 4-tuple does not name its client: Istio's REDIRECT rewrote the destination, and
 * conntrack may have rewritten the client's source port too. But the SYN-ACK the server sends
 * is un-NATed by conntrack before it leaves (cgroup_skb egress runs after POSTROUTING), so it
 * carries the client's own 4-tuple, exactly as the client socket sees it. sockops_synack records
 * it under what the server socket will know at PASSIVE_ESTABLISHED: its netns, the client's IP,
 * its listening port and its initial sequence number (the SYN-ACK's seq, which is snd_una - 1
 * on the established child).
 *
 * Two handshakes that share this key at once (an ISN collision on one port, 2^-32) cannot be
 * told apart: the record is marked ambiguous and neither connection is paired.
 */
struct synack_key {
	__u64 netns;
	__u32 client_ip[4];
	__u32 local_port;
	__u32 isn;
};

struct synack {
	struct sock_key conn; /* the client's view; netns and role are filled in by the server */
	__u32 ambiguous;
	__u32 pad;
};

/* Socket-local storage: the per-connection decision, kept for the socket's lifetime. */
struct sock_state {
	__u32 decision; /* DECIDE_* */
	__u32 in_map;   /* 1 while this socket is in the sockhash under `key` */
	__u64 cookie;   /* the client's socket cookie (the pending tag's upper bits) */
	struct sock_key key;
	__u32 peer_fin; /* the peer half-closed: send over TCP from now on (see sockops.bpf.c) */
	__u32 peer_claimed; /* RX_USED is set on the peer's conn_state half: no need to look again */
	__u32 origin;       /* ORIGIN_*: how the socket joined the sockhash */
	__u32 pad;
};

#define ORIGIN_HANDSHAKE 0 /* at its ACTIVE/PASSIVE_ESTABLISHED callback (sockops.bpf.c) */
#define ORIGIN_LATE 1      /* later, by the agent's iterator pass (late.bpf.c) */

/*
 * The half-close hand-off (sockops.bpf.c on_own_fin, redirect.bpf.c claim_peer). One entry per
 * paired connection, keyed by the client's socket cookie (both ends know it), created by the
 * server end before it commits the pairing, deleted when the client end sends its FIN or
 * closes. flags[role] are the bits of that end as a *receiver*; each side sets its bit with one
 * atomic fetch-or and reads the other's bit from the same operation, so exactly one of them
 * learns about the other: either the sender marked RX_USED first (the receiver may hold queued
 * bytes and keeps its psock), or the receiver marked HALF_CLOSED first (the sender never
 * redirects to it and sends over TCP).
 */
struct conn_state {
	__u64 flags[2]; /* SOCK_F_RX_USED / SOCK_F_HALF_CLOSED of the client (0) and server (1) end */
};

#define SOCK_F_RX_USED 1     /* the peer has redirected, or is about to redirect, to this end */
#define SOCK_F_HALF_CLOSED 2 /* this end sent its FIN first: it leaves the sockhash */

#define DECIDE_UNDECIDED 0
#define DECIDE_REDIRECT 1
#define DECIDE_PASS 2
#define DECIDE_LATE 3 /* joined late: redirect once the peer has read all our TCP bytes */

/*
 * How programs read their sockets (the reader hook, bpf/reader.bpf.c). Redirected bytes wait in
 * the receiver's psock queue, which only recvmsg() reads; splice() and sendfile() from a socket
 * read the TCP queue only (docs/KERNEL-NOTES.md §3). And a socket must get its psock at its
 * handshake or never (a psock in front of TCP bytes hides them from FIONREAD, §10). So sock_ops
 * gives a socket a psock only when its program is known to read that kind of socket with
 * read()/recv*(), and never when it is known to splice: docs/DATAPLANE.md, "Splice readers".
 *
 * The hook learns per process (`procs`: thread group id and the group leader's start time, so a
 * reused pid is a new process) and per listening port (`port_owner`), from the syscalls that make
 * and read sockets:
 * - listen() and accept() name the process behind a port (struct port_info; listen() also forgets
 *   what was learnt of the port: a new listener may be another program) and mark it as serving;
 * - read(), readv(), recvfrom(), recvmsg() on an accepted socket prove its port (PORT_F_RECV), on
 *   a connected socket of a serving process prove that process's client sockets
 *   (PROC_F_CLIENT_RECV);
 * - splice() or sendfile() from a TCP socket marks the process (PROC_F_SPLICED) and, for an
 *   accepted socket, its port (PORT_F_SPLICED), for good;
 * - connect() names the process behind a client socket (`sock_owner`, by the socket's kernel
 *   address, read at ACTIVE_ESTABLISHED).
 */
struct proc_key {
	__u32 tgid;
	__u32 pad;
	__u64 start_time;
};

struct proc_reader {
	__u64 flags; /* PROC_F_* */
	__u64 splices;
};

#define PROC_F_SPLICED 1     /* spliced or sendfile()d from a TCP socket: never give it a psock */
#define PROC_F_SERVES 2      /* listen()s or accept()s: its client sockets must prove their reader */
#define PROC_F_CLIENT_RECV 4 /* read one of its connected sockets with read()/recv*() */

struct port_key {
	__u64 netns;
	__u32 port; /* host order */
	__u32 pad;
};

struct port_info {
	struct proc_key owner; /* the last process to listen() or accept() on the port */
	__u64 flags;           /* PORT_F_* */
};

#define PORT_F_RECV 1    /* an accepted socket of this port was read with read()/recv*() */
#define PORT_F_SPLICED 2 /* an accepted socket of this port was spliced from: never a psock */

/*
 * Per-namespace settings, one entry per enabled network namespace (presence = enabled).
 * Capture ports are where the pod's Istio rules REDIRECT traffic, as found by the agent and shown
 * by `sockops status`; pairing does not depend on them (it follows conntrack, struct
 * synack_key). local_ip lists the pod's own addresses: a client whose destination is loopback, one of these,
 * or (with a sidecar) anything at all can have its server end in the same pod; other clients
 * are never inserted.
 */
#define NETNS_F_SIDECAR 1 /* outbound traffic is captured to capture_out */
#define NETNS_F_AGENT 2   /* written by the agent, which may remove it; others are manual (CLI) */
#define NETNS_LOCAL_IPS 4

struct netns_conf {
	__u32 flags;
	__u16 capture_out; /* Istio outbound capture, 15001 */
	__u16 capture_in;  /* Istio inbound capture, 15006 */
	__u32 local_ip[NETNS_LOCAL_IPS][4];
};

/*
 * Pods of this node (node_pods map, written by the agent): a pod IP, IPv4-mapped, -> the netns
 * cookie of the enabled namespace that owns it, or 0 when two enabled namespaces claim the same
 * IP (ambiguous: never paired across pods). A client whose destination is another enabled pod
 * of the node is inserted like a local one; the server end, accepted in the other namespace,
 * finds the client's namespace by the client's IP here and its pending entry by the exact
 * 4-tuple its SYN-ACK carried (struct synack_key).
 */
struct pod_ip {
	__u32 ip[4];
};

/*
 * Late insertion through a NAT (bpf/late.bpf.c, sockops/late.py). Istio's REDIRECT leaves the two
 * ends of a connection without mirrored 4-tuples, but the namespace's conntrack entry names both:
 * before each pass the agent writes, for each such entry, what each end sees (its namespace, its
 * local and remote address) -> the connection's name as the client sees it (struct sock_key) with
 * that end's role. A socket the pass finds here joins under that name.
 */
struct late_tuple {
	__u64 netns;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 local_port;
	__u32 remote_port;
};

/* Per-namespace counters (a per-CPU hash; the agent creates the entry when it enables). */
struct netns_stats {
	__u64 redirected_bytes;
	__u64 redirected_msgs;
	__u64 misses;
	__u64 sockets_inserted;
	__u64 connections_passed;
};

/* Global per-CPU counters: indexes into the `counters` array. */
#define CNT_SOCKETS_INSERTED 0   /* sockets put in the sockhash (both ends) */
#define CNT_INSERT_FULL 1        /* sockhash full (E2BIG): connection not accelerated */
#define CNT_INSERT_BUSY 2        /* socket has another sk_msg program (EBUSY) */
#define CNT_INSERT_OTHER 3       /* any other insert error */
#define CNT_PENDING_FULL 4       /* pending map full: not accelerated */
#define CNT_PAIRED_MIRROR 5      /* server paired, its 4-tuple mirrors the client's */
#define CNT_PAIRED_ORIGDST 6     /* server paired through NAT (Istio's REDIRECT) */
#define CNT_PASSED 7             /* client spoke before its server joined: left on TCP */
#define CNT_PAIR_RACE_LOST 8     /* server joined just after the client decided: withdrew */
#define CNT_REDIRECTED_MSGS 9
#define CNT_REDIRECTED_BYTES 10
#define CNT_MISSES 11            /* redirect target gone (peer closing): sent over TCP */
#define CNT_SOCKETS_WITHDRAWN 12 /* unpaired client removed from the sockhash */
#define CNT_HALFCLOSE_LEFT 13    /* socket half-closed before any byte was redirected to it: left */
#define CNT_PAIRED_CROSS_POD 14  /* server paired with a client in another pod of this node */
#define CNT_PENDING_AMBIGUOUS 15 /* a connection's identity was not unique: not accelerated */
#define CNT_SKIPPED_MPTCP 16     /* MPTCP subflow: never given a psock */
#define CNT_SKIPPED_FASTOPEN 17  /* data rode on the SYN (TCP Fast Open): not accelerated */
#define CNT_UNDECIDED_FIN 18     /* client sent its FIN before deciding: left if never paired */
#define CNT_SKIPPED_BLOCKING 19  /* client file without O_NONBLOCK: never given a psock */
#define CNT_EARLY_TCP_SEND 20    /* client's first bytes left over TCP before its psock: sends stay TCP */
#define CNT_LATE_INSERTED 21     /* established socket joined by the iterator pass (late.bpf.c) */
#define CNT_LATE_SWITCHED 22     /* a late socket's direction moved from TCP to redirect */
#define CNT_LATE_PRUNED 23       /* a late socket whose peer never joined: left the sockhash */
#define CNT_QUEUE_OVER_BUDGET 24 /* a peer held more than the budget unread: sends went to TCP */
#define CNT_SKIPPED_SPLICER 25   /* the socket's program splices (reader.bpf.c): never given a psock */
#define CNT_SKIPPED_UNPROVEN 26  /* its program has not shown how it reads (reader.bpf.c): no psock */
#define CNT_MAX 27

/*
 * What went wrong in an app's traffic, per sending network namespace (the `anomalies` map, a
 * plain hash keyed by netns cookie, entry created by the agent when it enables the namespace).
 * The agent's breaker (sockops/breaker.py) turns a rise of these into "stop accelerating this
 * pod". pid (the thread group id) and comm are of the last sending process that hit each kind:
 * an sk_msg program runs in the sender's syscall. Written without a lock: a pid and comm of two
 * racing senders may mix, the counts never (atomic adds).
 */
#define ANOM_QUEUE_OVER_BUDGET 0 /* the peer held more than the budget unread: sends went to TCP */
#define ANOM_REDIRECT_MISS 1     /* the redirect target was gone (normal when a peer closes) */
#define ANOM_EARLY_TCP_SEND 2    /* the client's first bytes left over TCP before its psock */
#define ANOM_SPLICE_READER 3     /* splice() on a socket with redirected bytes queued (reader.bpf.c) */
#define ANOM_MAX 4
#define ANOM_COMM_LEN 16

struct netns_anomalies {
	__u64 count[ANOM_MAX];
	__u32 pid[ANOM_MAX];
	char comm[ANOM_MAX][ANOM_COMM_LEN];
};

#endif /* SOCKOPS_H */
