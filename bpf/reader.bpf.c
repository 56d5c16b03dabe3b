/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The reader hook: a raw tracepoint on sys_enter that learns how each socket in the sockhash is
 * read, so that sk_msg redirects only to sockets whose reader looks at the psock queue
 * (struct reader; redirect.bpf.c reader_gate; docs/DATAPLANE.md "Who may be redirected to").
 *
 * Why it is needed: redirected bytes wait in the receiver's psock queue, and only recvmsg()
 * (tcp_bpf_recvmsg()) reads that queue. splice() and sendfile() from a socket go through
 * tcp_splice_read() -> tcp_read_sock(), which reads the TCP receive queue only: a splice reader
 * (Go's io.Copy between two TCP connections, HAProxy's and nginx's splice paths) would wait for
 * bytes it never sees, or read the peer's FIN past them (docs/KERNEL-NOTES.md §3). No sock_ops or
 * sk_msg program sees a read, and fentry/kprobe/LSM programs do not load on every node (§7); a raw
 * tracepoint does (§9). So:
 * - read/readv/recvfrom/recvmsg/recvmmsg on a socket with a reader entry: READER_F_RECV, and the
 *   socket's address, where the sender reads how far the reader got (its copied_seq), once the
 *   process has read for the grace without splicing (struct proc_key);
 * - splice/sendfile from any TCP socket marks the process (never a recv() reader again), and
 *   from a socket with a reader entry: READER_F_SPLICE, for good. If a sender had already
 *   redirected to it and bytes wait in its psock queue, those are what the splice cannot see:
 *   a splice_reader anomaly of the namespace, with the program's pid and name (the breaker,
 *   sockops/breaker.py, then suspends the pod). In a namespace that the agent only watches
 *   (observe mode, a suspended pod) every splice of a TCP socket counts: what the program would do.
 *
 * Attached by the data plane's load through a pinned link (sockops/reader_hook.py), like the other
 * programs, so it stays while no agent runs. It is machine-wide, not per cgroup: it leaves at once
 * for other syscalls, and for reads of tasks outside enabled namespaces. Every step from the task
 * to the socket is a bpf_probe_read_kernel() at offsets from the running kernel's BTF: a step that
 * reads nothing (a closed fd, a racing close()) ends the walk, never faults.
 */
#include <uapi/linux/bpf.h>

#include "kernel.bpf.h"
#include "maps.bpf.h"

#if defined(KOFF_PT_REGS_ARG0) && defined(SOCKOPS_NR_SPLICE)

#define S_IFMT_ 0170000
#define S_IFSOCK_ 0140000

/* The struct sock behind file descriptor `fd` of the current task, 0 if it is not a socket. */
static __always_inline __u64 sock_of_fd(__u32 fd)
{
	__u64 task = bpf_get_current_task(), files = 0, fdt = 0, fds = 0, file = 0, inode = 0;
	__u64 socket = 0, sk = 0;
	__u32 max_fds = 0;
	__u16 mode = 0;

	read_kernel(&files, sizeof(files), (void *)(task + KOFF_TASK_FILES));
	if (!files)
		return 0;
	read_kernel(&fdt, sizeof(fdt), (void *)(files + KOFF_FILES_FDT));
	if (!fdt)
		return 0;
	read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + KOFF_FDT_MAX_FDS));
	if (fd >= max_fds)
		return 0;
	read_kernel(&fds, sizeof(fds), (void *)(fdt + KOFF_FDT_FD));
	if (!fds)
		return 0;
	read_kernel(&file, sizeof(file), (void *)(fds + (__u64)fd * sizeof(__u64)));
	if (!file)
		return 0;
	read_kernel(&inode, sizeof(inode), (void *)(file + KOFF_FILE_F_INODE));
	if (!inode)
		return 0;
	read_kernel(&mode, sizeof(mode), (void *)(inode + KOFF_INODE_I_MODE));
	if ((mode & S_IFMT_) != S_IFSOCK_)
		return 0;	/* a file, a pipe: most reads of the node end here */
	read_kernel(&socket, sizeof(socket), (void *)(file + KOFF_FILE_PRIVATE_DATA));
	if (!socket)
		return 0;
	read_kernel(&sk, sizeof(sk), (void *)(socket + KOFF_SOCKET_SK));
	return sk;
}

/* The cookie of the calling task's network namespace. */
static __always_inline __u64 task_netns(void)
{
	__u64 task = bpf_get_current_task(), nsproxy = 0, net = 0, cookie = 0;

	read_kernel(&nsproxy, sizeof(nsproxy), (void *)(task + KOFF_TASK_NSPROXY));
	if (!nsproxy)
		return 0;
	read_kernel(&net, sizeof(net), (void *)(nsproxy + KOFF_NSPROXY_NET_NS));
	if (!net)
		return 0;
	read_kernel(&cookie, sizeof(cookie), (void *)(net + KOFF_NET_COOKIE));
	return cookie;
}

static __always_inline __u64 sock_netns(__u64 sk)
{
	__u64 net = 0, netns = 0;

	read_kernel(&net, sizeof(net), (void *)(sk + KOFF_SKC_NET));
	if (net)
		read_kernel(&netns, sizeof(netns), (void *)(net + KOFF_NET_COOKIE));
	return netns;
}

/* The calling process, as struct proc_key names it: its tgid and its group leader's start time. */
static __always_inline void current_proc(struct proc_key *k)
{
	__u64 task = bpf_get_current_task(), leader = 0;

	k->tgid = bpf_get_current_pid_tgid() >> 32;
	read_kernel(&leader, sizeof(leader), (void *)(task + KOFF_TASK_GROUP_LEADER));
	if (leader)
		read_kernel(&k->start_time, sizeof(k->start_time), (void *)(leader + KOFF_TASK_START_TIME));
}

/*
 * A recv()-family call on a socket with a reader entry. The socket becomes a recv() reader only
 * when its process has read for the grace without ever splicing (struct proc_key); a process that
 * spliced marks the socket spliced instead. The sidecar's trusted sockets only get their address.
 */
static __always_inline void on_recv(struct reader *r, __u64 sk)
{
	struct proc_key k = {};
	struct proc_reader fresh = {}, *p;
	__u64 now;

	if (r->flags & READER_F_TRUSTED) {
		r->sk = sk;
		return;
	}
	current_proc(&k);
	p = procs.lookup(&k);
	if (!p) {
		fresh.first_recv = bpf_ktime_get_ns();
		procs.insert(&k, &fresh);	/* its grace starts now */
		return;
	}
	if (p->flags & PROC_F_SPLICED) {
		__sync_fetch_and_or(&r->flags, READER_F_SPLICE);
		return;
	}
	now = bpf_ktime_get_ns();
	if (now - p->first_recv < SOCKOPS_READER_GRACE_NS)
		return;
	r->sk = sk;	/* before the flag: a sender that sees RECV finds the address */
	__sync_fetch_and_or(&r->flags, READER_F_RECV);
}

/* A splice()/sendfile() from a TCP socket, by any process of the node: never a recv() reader. */
static __always_inline void mark_splicer(void)
{
	struct proc_key k = {};
	struct proc_reader fresh = { .flags = PROC_F_SPLICED }, *p;

	current_proc(&k);
	p = procs.lookup(&k);
	if (p)
		__sync_fetch_and_or(&p->flags, PROC_F_SPLICED);
	else
		procs.update(&k, &fresh);
}

/* x86-64 syscall numbers (the loader passes splice's only where it knows the architecture) */
#define NR_READ_ 0
#define NR_READV_ 19
#define NR_SENDFILE_ 40
#define NR_RECVFROM_ 45
#define NR_RECVMSG_ 47
#define NR_RECVMMSG_ 299

int sockops_reader(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 regs = ctx->args[0], nr = ctx->args[1], sk, netns, cookie = 0, fd = 0, old, queued = 0;
	__u64 psock;
	struct reader *r;
	__u16 family = 0;
	int splice;

	switch (nr) {
	case NR_READ_:
	case NR_READV_:
	case NR_RECVFROM_:
	case NR_RECVMSG_:
	case NR_RECVMMSG_:
		/* Only tasks of enabled namespaces hold sockets worth a walk (a task that reads a
		 * socket of another namespace is not seen: its socket stays a TCP receiver). */
		netns = task_netns();
		if (!netns_conf.lookup(&netns))
			return 0;
		splice = 0;
		read_kernel(&fd, sizeof(fd), (void *)(regs + KOFF_PT_REGS_ARG0));
		break;
	case SOCKOPS_NR_SPLICE:
		splice = 1;
		read_kernel(&fd, sizeof(fd), (void *)(regs + KOFF_PT_REGS_ARG0));	/* fd_in */
		break;
	case NR_SENDFILE_:
		splice = 1;
		read_kernel(&fd, sizeof(fd), (void *)(regs + KOFF_PT_REGS_ARG1));	/* in_fd */
		break;
	default:
		return 0;
	}
	sk = sock_of_fd((__u32)fd);
	if (!sk)
		return 0;
	read_kernel(&family, sizeof(family), (void *)(sk + KOFF_SKC_FAMILY));
	if (family != AF_INET_ && family != AF_INET6_)
		return 0;
	read_kernel(&cookie, sizeof(cookie), (void *)(sk + KOFF_SKC_COOKIE));
	r = cookie ? readers.lookup(&cookie) : 0;	/* a socket's cookie exists once it joined */
	if (!splice) {
		if (r && (!(r->flags & READER_F_RECV) || !r->sk))
			on_recv(r, sk);
		return 0;
	}
	mark_splicer();
	netns = sock_netns(sk);
	if (r) {
		old = __sync_fetch_and_or(&r->flags, READER_F_SPLICE);
		psock = psock_of(sk);
		if (psock)
			read_kernel(&queued, sizeof(__u32), (void *)(psock + KOFF_PSOCK_MSG_TOT_LEN));
		if ((old & READER_F_REDIRECTED) && queued)
			anomaly_at(netns, ANOM_SPLICE_READER);	/* bytes this splice cannot see */
		return 0;
	}
	/* A namespace the agent watches without enabling it (observe mode, or a suspended pod) has
	 * no reader entries: there any splice of a TCP socket tells what the program would do. */
	if (!netns_conf.lookup(&netns))
		anomaly_at(netns, ANOM_SPLICE_READER);	/* only watched namespaces have an entry */
	return 0;
}

#endif
