/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Reads of kernel-internal fields (struct sock, struct tcp_sock, struct file), which have no UAPI
 * layout. bcc compiles against the distribution's kernel headers, which need not match the
 * running kernel, so these structs are never named here: the loader passes each field's byte
 * offset as a KOFF_* macro read from the running kernel's BTF (sockops/kernel_btf.py), and the
 * program walks BTF-typed pointers (bpf_skc_to_tcp_sock()) at those offsets. The verifier checks
 * every such load against the same BTF: a wrong offset fails the load, it is never read
 * silently. A NULL pointer on the way reads as 0 (BTF pointer loads cannot fault).
 */
#ifndef SOCKOPS_KERNEL_H
#define SOCKOPS_KERNEL_H

#if !defined(KOFF_SK_SOCKET) || !defined(KOFF_SOCKET_FILE) || !defined(KOFF_FILE_F_FLAGS)
#error "KOFF_* offsets missing: compile through sockops.loader, which reads them from the kernel's BTF"
#endif

#define O_NONBLOCK_ 04000

/* The field at byte offset `off` of the BTF-typed kernel object `obj`, as type T. */
#define KFIELD(obj, off, T) (*(T *)((char *)(obj) + (off)))

#define READER_UNKNOWN 0  /* no file yet: an accepted socket before accept() returned it */
#define READER_NONBLOCK 1 /* the file is O_NONBLOCK: no read on it ever sleeps */
#define READER_BLOCKING 2 /* a read may sleep inside recvmsg() */

/*
 * How this socket's owner reads it, from its file's flags. Why it matters: a reader asleep in
 * tcp_bpf_recvmsg() (the recvmsg of a socket with a psock) returns EAGAIN when a wake-up brings
 * no data, also to a blocking caller (docs/KERNEL-NOTES.md §1), and a reader already asleep in
 * plain tcp_recvmsg() when a psock appears never looks at the psock queue (§6). A socket whose
 * file is O_NONBLOCK never has a sleeping reader, so neither can happen to it.
 */
static __always_inline int reader_style(struct bpf_sock *sk)
{
	void *tp = bpf_skc_to_tcp_sock(sk);
	void *sock, *file;

	if (!tp)
		return READER_UNKNOWN;
	sock = KFIELD(tp, KOFF_SK_SOCKET, void *);	/* struct sock is tcp_sock's first member */
	if (!sock)
		return READER_UNKNOWN;
	file = KFIELD(sock, KOFF_SOCKET_FILE, void *);
	if (!file)
		return READER_UNKNOWN;
	return (KFIELD(file, KOFF_FILE_F_FLAGS, __u32) & O_NONBLOCK_) ? READER_NONBLOCK
									: READER_BLOCKING;
}

/*
 * Has this socket written any byte the TCP way (sent, or still queued in its write queue)?
 * Nothing written means write_seq == snd_una and bytes_acked counts only the SYN (1).
 *
 * Why a client can have: an app that connects non-blocking and then poll()s sees the socket
 * writable as soon as the SYN-ACK's softirq has set TCP_ESTABLISHED, which is *before* that same
 * softirq runs the ACTIVE_ESTABLISHED callback that gives the socket its psock. Its send() then
 * picks plain tcp_sendmsg() (inet_sendmsg reads sk_prot before it waits for the socket lock), and
 * those bytes go over TCP without any sk_msg program seeing them. Redirecting its next message
 * would overtake them at the receiver (tcp_bpf_recvmsg reads the psock queue first).
 * Cannot tell (no tcp_sock): answers yes, which only ever means "do not redirect".
 */
static __always_inline int wrote_over_tcp(struct bpf_sock *sk)
{
	void *tp = bpf_skc_to_tcp_sock(sk);

	if (!tp)
		return 1;
	return KFIELD(tp, KOFF_TP_WRITE_SEQ, __u32) != KFIELD(tp, KOFF_TP_SND_UNA, __u32) ||
	       KFIELD(tp, KOFF_TP_BYTES_ACKED, __u64) > 1;
}

/*
 * sk_user_data of a socket with a psock is the psock's address with flag bits in its low bits
 * (SK_USER_DATA_NOCOPY 1, _BPF 2, _PSOCK 4); the kernel masks them off before using it.
 */
#define SK_USER_DATA_PSOCK_ 4UL
#define SK_USER_DATA_FLAGS_ 7UL

/*
 * bpf_probe_read_kernel() called by its helper number: run with the DaemonSet's capabilities
 * (tests/test_manifests.py), bcc turned calls by that name into the old bpf_probe_read(),
 * which sk_msg programs may not use; bpf_probe_read_kernel() they may (CAP_SYS_ADMIN or
 * CAP_PERFMON).
 */
static long (*read_kernel)(void *dst, __u32 size, const void *src) = (void *)BPF_FUNC_probe_read_kernel;

/* The psock behind a struct sock's sk_user_data (the kernel address `sk`), 0 when it has none. */
static __always_inline __u64 psock_of(__u64 sk)
{
	__u64 data = 0;

	read_kernel(&data, sizeof(data), (void *)(sk + KOFF_SK_USER_DATA));
	return (data & SK_USER_DATA_PSOCK_) ? data & ~SK_USER_DATA_FLAGS_ : 0;
}

#endif /* SOCKOPS_KERNEL_H */
