/* SPDX-License-Identifier: Apache-2.0 */
/*
 * An event-loop style TCP client for containers that have nothing but busybox (built static):
 * an O_NONBLOCK socket that waits in poll(), as Envoy, Go or nginx do, which is the kind of
 * client sockops accelerates (busybox's own nc is a blocking reader, left on plain TCP).
 *
 *   nbclient HOST PORT BYTES   send BYTES zero bytes, read the echo, print how many came back
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int wait_for(int fd, short events)
{
	struct pollfd p = { .fd = fd, .events = events };
	return poll(&p, 1, 10000) == 1 ? 0 : -1;	/* 10 s: every wait is bounded */
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	static char buf[65536];
	long want, sent = 0, got = 0;
	int fd, err = 0;
	socklen_t len = sizeof(err);

	if (argc != 4 || inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) {
		fprintf(stderr, "usage: nbclient HOST PORT BYTES\n");
		return 2;
	}
	a.sin_port = htons(atoi(argv[2]));
	want = atol(argv[3]);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (connect(fd, (void *)&a, sizeof(a)) && errno != EINPROGRESS)
		return perror("connect"), 1;
	if (wait_for(fd, POLLOUT) || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) || err)
		return fprintf(stderr, "connect: %s\n", strerror(err)), 1;
	while (got < want) {
		if (sent < want) {
			long n = send(fd, buf, want - sent < (long)sizeof(buf) ? want - sent : (long)sizeof(buf), 0);
			if (n > 0)
				sent += n;
			else if (errno != EAGAIN)
				return perror("send"), 1;
		}
		long n = recv(fd, buf, sizeof(buf), 0);
		if (n > 0)
			got += n;
		else if (n == 0)
			break;
		else if (errno != EAGAIN)
			return perror("recv"), 1;
		else if (wait_for(fd, sent < want ? POLLIN | POLLOUT : POLLIN))
			return fprintf(stderr, "timed out after %ld of %ld bytes\n", got, want), 1;
	}
	printf("%ld\n", got);
	return 0;
}
