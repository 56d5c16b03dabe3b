/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The reader hook: a raw tracepoint on sys_enter that learns how programs read their sockets, and
 * which program owns each listening port and connecting socket, so that sock_ops gives a psock
 * only to a socket whose program is known to read that kind of socket with read()/recv*() and
 * never with splice() (struct proc_key, struct port_info; sockops.bpf.c client_veto, server_veto;
 * docs/DATAPLANE.md "Splice readers").
 *
 * Why: redirected bytes wait in the receiver's psock queue, and only recvmsg() reads that queue.
 * splice() and sendfile() from a socket go through tcp_splice_read() -> tcp_read_sock(), which
 * reads the TCP receive queue only, so a splice reader (Go's io.Copy between two TCP connections,
 * HAProxy's splice paths) waits for bytes it never sees, or reads the peer's FIN past them
 * (docs/KERNEL-NOTES.md §3). And the decision must come before the socket's first byte: a psock in
 * front of TCP bytes hides them from FIONREAD (§10). No sock_ops or sk_msg program sees a read,
 * and fentry/kprobe/LSM programs do not load on every node (§7); a raw tracepoint does (§9).
 * Per syscall:
 * - listen/accept/accept4 on a TCP socket: the process owns that port of its namespace, and
 *   serves; listen() also forgets what the port had proven (a new listener may be a new program);
 * - read/readv/recvfrom/recvmsg on a TCP socket, by a serving process only (or a child of one:
 *   a fork-per-connection server; the others have nothing to prove): an accepted socket proves its
 *   port, a connected one proves the process's client sockets;
 * - splice (fd_in) from a TCP socket, and sendfile (in_fd) from one into a pipe (the only place it
 *   can send a socket's bytes), by any process of the node: the process is a splicer for its
 *   life, and an accepted socket's port too; the socket is remembered for
 *   late passes (`spliced_socks`). If that socket has redirected bytes queued, this splice cannot
 *   see them (a program that read its port with recv() first, then spliced): a splice_reader
 *   anomaly of its namespace, with pid and comm, which trips the agent's breaker. In a namespace
 *   the agent only watches (observe mode, a suspended pod) every TCP splice counts: what the
 *   program does.
 * - connect on a TCP socket: the process owns that socket (in an enabled namespace, or anywhere
 *   for a serving or splicing process: a late pass may meet that connection after an enable).
 *
 * Attached by the data plane's load through a pinned link (sockops/reader_hook.py), like the other
 * programs, so it keeps learning while no agent runs. It is machine-wide, not per cgroup, and
 * leaves at once for every other syscall. Every step from the task to the socket is a
 * bpf_probe_read_kernel() at offsets from the running kernel's BTF: a step that reads nothing (a
 * closed fd, a racing close()) ends the walk, never faults.
 */
#include <uapi/linux/bpf.h>

#include "kernel.bpf.h"
#include "maps.bpf.h"

#if defined(KOFF_PT_REGS_ARG0) && defined(SOCKOPS_NR_SPLICE)

#define S_IFMT_ 0170000
#define S_IFSOCK_ 0140000
#define S_IFIFO_ 0010000
#define SOCK_STREAM_ 1

/* x86-64 syscall numbers (the loader passes splice's only where it knows the architecture) */
#define NR_READ_ 0
#define NR_READV_ 19
#define NR_SENDFILE_ 40
#define NR_CONNECT_ 42
#define NR_ACCEPT_ 43
#define NR_RECVFROM_ 45
#define NR_RECVMSG_ 47
#define NR_LISTEN_ 50
#define NR_ACCEPT4_ 288

/* The struct file behind file descriptor `fd` of the current task, 0 if none. */
static __always_inline __u64 file_of_fd(__u32 fd)
{
	__u64 task = bpf_get_current_task(), files = 0, fdt = 0, fds = 0, file = 0;
	__u32 max_fds = 0;

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
	return file;
}

/* The file type bits (S_IFMT) of a struct file's inode; 0 if unreadable. */
static __always_inline __u16 file_type(__u64 file)
{
	__u64 inode = 0;
	__u16 mode = 0;

	read_kernel(&inode, sizeof(inode), (void *)(file + KOFF_FILE_F_INODE));
	if (inode)
		read_kernel(&mode, sizeof(mode), (void *)(inode + KOFF_INODE_I_MODE));
	return mode & S_IFMT_;
}

/* The struct sock behind file descriptor `fd` of the current task, 0 if it is not a socket. */
static __always_inline __u64 sock_of_fd(__u32 fd)
{
	__u64 file = file_of_fd(fd), socket = 0, sk = 0;

	if (!file || file_type(file) != S_IFSOCK_)
		return 0;	/* a pipe, a file: the other end of a splice */
	read_kernel(&socket, sizeof(socket), (void *)(file + KOFF_FILE_PRIVATE_DATA));
	if (!socket)
		return 0;
	read_kernel(&sk, sizeof(sk), (void *)(socket + KOFF_SOCKET_SK));
	return sk;
}

/* Is file descriptor `fd` of the current task a pipe? */
static __always_inline int is_pipe(__u32 fd)
{
	__u64 file = file_of_fd(fd);

	return file && file_type(file) == S_IFIFO_;
}

/* A TCP socket's network namespace cookie; 0 for anything else (UDP, unix, raw). */
static __always_inline __u64 tcp_netns(__u64 sk)
{
	__u64 net = 0, netns = 0;
	__u16 family = 0, type = 0;

	read_kernel(&family, sizeof(family), (void *)(sk + KOFF_SKC_FAMILY));
	if (family != AF_INET_ && family != AF_INET6_)
		return 0;
	read_kernel(&type, sizeof(type), (void *)(sk + KOFF_SK_TYPE));
	if (type != SOCK_STREAM_)
		return 0;
	read_kernel(&net, sizeof(net), (void *)(sk + KOFF_SKC_NET));
	if (net)
		read_kernel(&netns, sizeof(netns), (void *)(net + KOFF_NET_COOKIE));
	return netns;
}

/* The TCP socket behind file descriptor `fd` and its namespace cookie; 0 for anything else. */
static __always_inline __u64 tcp_of_fd(__u32 fd, __u64 *netns)
{
	__u64 sk = sock_of_fd(fd);

	*netns = sk ? tcp_netns(sk) : 0;
	return *netns ? sk : 0;
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
 * read() is the commonest syscall of a node, and most processes that make it have nothing to
 * prove. The last such process seen on each CPU is remembered with the serving generation of that
 * moment: its next read() there leaves after two array lookups, until some process starts serving
 * (its parent may be the one). A serving process is never cached: a descriptor number is reused
 * for the next connection, maybe of another port, so only the walk to the socket can tell what a
 * read proves. Not pinned: a cache, rebuilt by each load.
 */
struct read_skip {
	__u32 tgid;
	__u32 pad;
	__u64 gen;
};
BPF_PERCPU_ARRAY(read_skip, struct read_skip, 1);
BPF_ARRAY(serve_gen, __u64, 1);

/* Set `flag` on a process (creating its entry); a splice also counts. */
static __always_inline void mark_proc(const struct proc_key *k, __u64 flag)
{
	struct proc_reader fresh = { .flags = flag, .splices = flag == PROC_F_SPLICED }, *p;
	__u32 zero = 0;
	__u64 *gen;

	p = procs.lookup((void *)k);
	if (p && (p->flags & flag) && flag != PROC_F_SPLICED)
		return;
	if (!p)
		procs.update((void *)k, &fresh);
	else if (!(p->flags & flag))
		__sync_fetch_and_or(&p->flags, flag);
	if (p && flag == PROC_F_SPLICED)
		__sync_fetch_and_add(&p->splices, 1);
	if (flag == PROC_F_SERVES) {
		/* after the flag is set: a cache built from now on sees it */
		gen = serve_gen.lookup(&zero);
		if (gen)
			__sync_fetch_and_add(gen, 1);	/* a new server: every read_skip entry is stale */
	}
}

/* Set `flag` on the port `sk` is bound to, if a program listens there (an accepted socket). */
static __always_inline int mark_port(__u64 netns, __u64 sk, __u64 flag)
{
	struct port_key pk = { .netns = netns };
	struct port_info *info;
	__u16 port = 0;

	read_kernel(&port, sizeof(port), (void *)(sk + KOFF_SKC_NUM));
	pk.port = port;
	info = port_owner.lookup(&pk);
	if (!info)
		return 0;
	if (!(info->flags & flag))
		__sync_fetch_and_or(&info->flags, flag);
	return 1;
}

/* Redirected bytes waiting in this socket's psock queue (sk_psock.msg_tot_len). */
static __always_inline __u32 psock_queued(__u64 sk)
{
	__u64 psock = psock_of(sk);
	__u32 queued = 0;

	if (psock)
		read_kernel(&queued, sizeof(queued), (void *)(psock + KOFF_PSOCK_MSG_TOT_LEN));
	return queued;
}

/*
 * Does the calling process's parent serve? A server that forks a process per connection (inetd's
 * and busybox nc's -e, PostgreSQL's backends) reads in a child that never called listen() or
 * accept() itself. The child's reads of an accepted socket prove the port; the child itself is not
 * taken for a server (a client that a serving program started, such as a test runner's, must not
 * have to prove its client sockets). One level only.
 */
static __always_inline int parent_serves(void)
{
	__u64 task = bpf_get_current_task(), parent = 0, leader = 0;
	struct proc_key k = {};

	read_kernel(&parent, sizeof(parent), (void *)(task + KOFF_TASK_REAL_PARENT));
	if (!parent)
		return 0;
	read_kernel(&k.tgid, sizeof(k.tgid), (void *)(parent + KOFF_TASK_TGID));
	read_kernel(&leader, sizeof(leader), (void *)(parent + KOFF_TASK_GROUP_LEADER));
	if (leader)
		read_kernel(&k.start_time, sizeof(k.start_time), (void *)(leader + KOFF_TASK_START_TIME));
	return (proc_flags(&k) & PROC_F_SERVES) != 0;
}

/* A read()/recv*() by a process that serves, or by a child of one: what it proves (see the top of
 * this file). Any other process leaves after one lookup of itself and one of its parent, and its
 * next reads on the same CPU after the read_skip check. */
static __always_inline int on_read(__u64 fd)
{
	__u32 zero = 0, tgid = bpf_get_current_pid_tgid() >> 32;
	struct read_skip *skip = read_skip.lookup(&zero);
	__u64 *gen = serve_gen.lookup(&zero), sk, netns;
	struct proc_reader *p;
	struct proc_key k = {};

	if (!skip || !gen)
		return 0;
	if (skip->tgid == tgid && skip->gen == *gen)
		return 0;	/* nothing to prove the last time, and no new server since */
	if ((bpf_get_current_uid_gid() & 0xffffffff) == SOCKOPS_PROXY_UID)
		goto nothing;	/* the proxy's sockets need no proof (sockops.bpf.c) */
	current_proc(&k);
	p = procs.lookup(&k);
	if ((p && !(p->flags & PROC_F_SERVES)) || (!p && !parent_serves()))
		goto nothing;
	sk = tcp_of_fd((__u32)fd, &netns);
	if (!sk)
		return 0;
	if (!mark_port(netns, sk, PORT_F_RECV) && p && !(p->flags & PROC_F_CLIENT_RECV))
		__sync_fetch_and_or(&p->flags, PROC_F_CLIENT_RECV);
	return 0;
nothing:
	skip->tgid = tgid;
	skip->gen = *gen;
	return 0;
}

int sockops_reader(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 regs = ctx->args[0], nr = ctx->args[1], fd = 0, sk, netns, addr;
	struct port_info fresh = {}, *info;
	struct port_key pk = {};
	struct proc_key k = {};
	__u16 port = 0;

	switch (nr) {
	case NR_READ_:
	case NR_READV_:
	case NR_RECVFROM_:
	case NR_RECVMSG_:
		read_kernel(&fd, sizeof(fd), (void *)(regs + KOFF_PT_REGS_ARG0));
		return on_read(fd);
	case SOCKOPS_NR_SPLICE:
	case NR_SENDFILE_:
	case NR_ACCEPT_:
	case NR_ACCEPT4_:
	case NR_LISTEN_:
	case NR_CONNECT_:
		break;
	default:
		return 0;
	}
	if (nr == NR_SENDFILE_) {
		/* sendfile() reads a socket only into a pipe: into a file or a socket it fails with
		 * EINVAL on this kernel, and programs that try it first (busybox's cat) then read(). */
		read_kernel(&fd, sizeof(fd), (void *)(regs + KOFF_PT_REGS_ARG0));
		if (!is_pipe((__u32)fd))
			return 0;
	}
	/* splice(fd_in, ...), accept(fd, ...), listen(fd, ...), connect(fd, ...); sendfile(out_fd, in_fd) */
	read_kernel(&fd, sizeof(fd), (void *)(regs + (nr == NR_SENDFILE_ ? KOFF_PT_REGS_ARG1 : KOFF_PT_REGS_ARG0)));
	sk = tcp_of_fd((__u32)fd, &netns);
	if (!sk)
		return 0;
	current_proc(&k);
	if (nr == SOCKOPS_NR_SPLICE || nr == NR_SENDFILE_) {
		mark_proc(&k, PROC_F_SPLICED);
		mark_port(netns, sk, PORT_F_SPLICED);
		addr = sk;
		if (!spliced_socks.lookup(&addr))
			spliced_socks.update(&addr, &addr);
		/* Enabled namespace: only bytes already redirected to this socket are at risk. Watched
		 * only (observe, suspended): no psocks there; any splice says what the program does. */
		if (netns_conf.lookup(&netns) ? psock_queued(sk) > 0 : 1)
			anomaly_at(netns, ANOM_SPLICE_READER);	/* only watched namespaces have an entry */
		return 0;
	}
	if (nr == NR_CONNECT_) {
		/* Enabled namespaces' clients, read at their handshake; and, anywhere, the sockets of
		 * the programs that must prove their client sockets, for a late pass after an enable. */
		if (!netns_conf.lookup(&netns) && !(proc_flags(&k) & (PROC_F_SERVES | PROC_F_SPLICED)))
			return 0;
		addr = sk;
		sock_owner.update(&addr, &k);
		return 0;
	}
	/* listen() and accept() in any namespace: a listener opened before its pod was enabled (and
	 * a blocking accept() that was already waiting then) must still name its program. */
	mark_proc(&k, PROC_F_SERVES);
	read_kernel(&port, sizeof(port), (void *)(sk + KOFF_SKC_NUM));
	pk.netns = netns;
	pk.port = port;
	info = port_owner.lookup(&pk);
	if (info && nr != NR_LISTEN_) {
		info->owner = k;	/* another worker of the program: what the port proved stays */
		return 0;
	}
	fresh.owner = k;	/* a new listener, maybe a new program: it proves itself again */
	port_owner.update(&pk, &fresh);
	return 0;
}

#endif
