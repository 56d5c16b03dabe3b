/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The splice guard: a raw tracepoint on sys_enter that sees every splice(2) whose input is a
 * socket with a psock in an enabled namespace, or any TCP socket of an observed one, and counts it
 * as an anomaly of that namespace with the calling program's pid and name (docs/DATAPLANE.md,
 * "The splice guard").
 *
 * Why: splice() reads a TCP socket through tcp_splice_read() -> tcp_read_sock(), which looks at
 * the TCP receive queue only, never at the psock queue where redirected bytes wait, so a splice
 * reader (Go's io.Copy between two TCP connections, HAProxy's and nginx's splice paths) waits for
 * bytes it will never see, or reads the peer's FIN past them (docs/KERNEL-NOTES.md §3). No
 * sock_ops or sk_msg program sees a read, and fentry/kprobe/LSM programs do not load on every
 * node (§7); a raw tracepoint does (§9). The agent's breaker suspends the pod at the first count,
 * so its next connections stay on plain TCP.
 *
 * Attached by the agent only (sockops/guard.py), not by the data plane's load: a raw tracepoint
 * is machine-wide, not per cgroup. The program leaves at once for any other syscall. Every step
 * from the task to the socket is a bpf_probe_read_kernel() at offsets from the running kernel's
 * BTF: a step that reads nothing (a closed fd, a racing close()) ends the walk, never faults.
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
		return 0;	/* a pipe, a file: the other end of a splice */
	read_kernel(&socket, sizeof(socket), (void *)(file + KOFF_FILE_PRIVATE_DATA));
	if (!socket)
		return 0;
	read_kernel(&sk, sizeof(sk), (void *)(socket + KOFF_SOCKET_SK));
	return sk;
}

int sockops_splice_guard(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 regs = ctx->args[0], sk, net = 0, netns = 0;
	__u64 fd_in = 0;
	__u16 family = 0;

	if (ctx->args[1] != SOCKOPS_NR_SPLICE)
		return 0;
	read_kernel(&fd_in, sizeof(fd_in), (void *)(regs + KOFF_PT_REGS_ARG0));
	sk = sock_of_fd((__u32)fd_in);
	if (!sk)
		return 0;
	read_kernel(&family, sizeof(family), (void *)(sk + KOFF_SKC_FAMILY));
	if (family != AF_INET_ && family != AF_INET6_)
		return 0;
	read_kernel(&net, sizeof(net), (void *)(sk + KOFF_SKC_NET));
	if (net)
		read_kernel(&netns, sizeof(netns), (void *)(net + KOFF_NET_COOKIE));
	/* In an enabled namespace only a socket with a psock is at risk (splice reads all of any
	 * other). A namespace the agent watches without enabling it (observe mode, or a suspended
	 * pod) has no psocks: there any splice of a TCP socket tells what the program would do. */
	if (netns_conf.lookup(&netns) && !psock_of(sk))
		return 0;
	anomaly_at(netns, ANOM_SPLICE_READER);	/* only namespaces the agent watches have an entry */
	return 0;
}

#endif
