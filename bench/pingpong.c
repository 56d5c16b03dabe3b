/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Ping-pong latency over TCP or AF_UNIX with the very same loop, so the two are comparable: the
 * AF_UNIX figure is the floor that an accelerated TCP connection inside one pod is measured
 * against (sockperf 3.7 has no AF_UNIX mode, hence this small program).
 *
 *   pingpong tcp HOST PORT SIZE WARMUP_S DURATION_S
 *   pingpong unix PATH SIZE WARMUP_S DURATION_S
 *
 * The process listens, forks an echo server child that accepts one connection, then connects and
 * sends SIZE bytes / waits for SIZE bytes back, again and again (TCP_NODELAY). Over TCP a first
 * one-byte exchange comes before, on a connection of its own (prove_server()). Both ends are
 * event loops: O_NONBLOCK sockets that wait in epoll_wait() when a read finds nothing, the style
 * of Envoy, Go and nginx and the one sockops accelerates (a blocking reader stays on plain TCP:
 * docs/DATAPLANE.md, "Who may be redirected to"). Round trips during WARMUP_S are discarded. It
 * prints one JSON line with round-trip percentiles in microseconds and how often a read or write
 * had to wait ("waits").
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (1 << 24)

static unsigned long wait_count;
static int epfd = -1;

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Wait until fd (the one socket in this process's epoll set) is readable, or writable. */
static int wait_ready(int fd, int sending)
{
	struct epoll_event ev;
	struct pollfd p = { .fd = fd, .events = POLLOUT };

	wait_count++;
	if (sending)
		return poll(&p, 1, 10000) == 1 ? 0 : -1; /* a full send buffer: rare at these sizes */
	return epoll_wait(epfd, &ev, 1, 10000) == 1 ? 0 : -1;
}

static int io_all(int fd, char *buf, size_t len, int sending)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = sending ? send(fd, buf + done, len - done, MSG_NOSIGNAL)
				    : recv(fd, buf + done, len - done, 0);
		if (n > 0) {
			done += (size_t)n;
			continue;
		}
		if (n == 0)
			return -1;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			if (wait_ready(fd, sending))
				return -1;
			continue;
		}
		return -1;
	}
	return 0;
}

/* Make fd non-blocking and the one socket of this process's epoll set (level-triggered reads). */
static int event_loop(int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

	epfd = epoll_create1(0);
	return epfd < 0 ? -1 : epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(const double *v, size_t n, double p)
{
	size_t i;
	if (n == 0)
		return 0.0;
	i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
	return v[i < n ? i : n - 1];
}

static int wait_connected(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	int err = 0;
	socklen_t len = sizeof(err);

	if (poll(&p, 1, 10000) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len))
		return -1;
	errno = err;
	return err ? -1 : 0;
}

/*
 * A first TCP connection on which each end reads a byte before the measured one: sockops gives a
 * socket a psock only once its program has read such a socket with read()/recv() (the server's
 * port, the client's own connections: docs/DATAPLANE.md, "Splice readers"), as a real server has
 * by the time it serves steady traffic. This one may be plain TCP.
 */
static int prove_server(int lfd)
{
	char b;
	int fd = accept(lfd, NULL, NULL), ok;

	if (fd < 0)
		return -1;
	ok = read(fd, &b, 1) == 1 && write(fd, &b, 1) == 1;
	close(fd);
	return ok ? 0 : -1;
}

static int prove_client(const struct sockaddr *sa, socklen_t salen)
{
	char b = '?';
	int fd = socket(AF_INET, SOCK_STREAM, 0), ok;

	if (fd < 0)
		return -1;
	ok = !connect(fd, sa, salen) && write(fd, &b, 1) == 1 && read(fd, &b, 1) == 1;
	close(fd);
	return ok ? 0 : -1;
}

static void echo(int lfd, size_t size, int prove)
{
	char *buf = malloc(size);
	int fd;

	if (prove && prove_server(lfd))
		_exit(2);
	fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
	if (fd < 0 || !buf || event_loop(fd))
		_exit(2);
	for (;;) {
		if (io_all(fd, buf, size, 0) || io_all(fd, buf, size, 1))
			break;
	}
	_exit(0);
}

int main(int argc, char **argv)
{
	int is_tcp, lfd, fd, one = 1, status;
	size_t size, n = 0;
	double warmup, duration, t0, start, t, *samples;
	char *buf;
	pid_t child;
	struct sockaddr_in in4 = {0};
	struct sockaddr_un un = {0};
	struct sockaddr *sa;
	socklen_t salen;

	if (argc < 2 || (strcmp(argv[1], "tcp") && strcmp(argv[1], "unix"))) {
		fprintf(stderr, "usage: pingpong tcp HOST PORT SIZE WARMUP DURATION | unix PATH SIZE WARMUP DURATION\n");
		return 2;
	}
	is_tcp = strcmp(argv[1], "tcp") == 0;
	if (argc != (is_tcp ? 7 : 6)) {
		fprintf(stderr, "pingpong: wrong number of arguments\n");
		return 2;
	}
	if (is_tcp) {
		in4.sin_family = AF_INET;
		in4.sin_port = htons((uint16_t)atoi(argv[3]));
		if (inet_pton(AF_INET, argv[2], &in4.sin_addr) != 1) {
			fprintf(stderr, "pingpong: bad IPv4 address %s\n", argv[2]);
			return 2;
		}
		sa = (struct sockaddr *)&in4;
		salen = sizeof(in4);
	} else {
		un.sun_family = AF_UNIX;
		strncpy(un.sun_path, argv[2], sizeof(un.sun_path) - 1);
		unlink(un.sun_path);
		sa = (struct sockaddr *)&un;
		salen = sizeof(un);
	}
	size = (size_t)atol(argv[is_tcp ? 4 : 3]);
	warmup = atof(argv[is_tcp ? 5 : 4]);
	duration = atof(argv[is_tcp ? 6 : 5]);
	buf = calloc(1, size);
	samples = malloc(sizeof(double) * MAX_SAMPLES);
	if (!buf || !samples || size == 0)
		return 2;

	lfd = socket(is_tcp ? AF_INET : AF_UNIX, SOCK_STREAM, 0);
	if (is_tcp)
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, sa, salen) || listen(lfd, 1)) {
		perror("pingpong: listen");
		return 1;
	}
	child = fork();
	if (child == 0)
		echo(lfd, size, is_tcp);
	close(lfd);
	if (is_tcp && prove_client(sa, salen)) {
		perror("pingpong: first connection");
		kill(child, SIGKILL);
		return 1;
	}

	/* O_NONBLOCK before connect(): sockops decides at the handshake who may be redirected to */
	fd = socket(is_tcp ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (is_tcp)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (fd < 0 || (connect(fd, sa, salen) && errno != EINPROGRESS) || wait_connected(fd) ||
	    event_loop(fd)) {
		perror("pingpong: connect");
		kill(child, SIGKILL);
		return 1;
	}
	t0 = now_us();
	start = t0 + warmup * 1e6;
	for (;;) {
		double before = now_us();
		if (io_all(fd, buf, size, 1) || io_all(fd, buf, size, 0)) {
			perror("pingpong: round trip");
			kill(child, SIGKILL);
			return 1;
		}
		t = now_us();
		if (t >= start && n < MAX_SAMPLES)
			samples[n++] = t - before;
		if (t - start >= duration * 1e6)
			break;
	}
	close(fd);
	waitpid(child, &status, 0);
	if (!is_tcp)
		unlink(un.sun_path);
	qsort(samples, n, sizeof(double), cmp_double);
	printf("{\"round_trips\":%zu,\"seconds\":%.3f,\"rtt_us\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,"
	       "\"p999\":%.2f},\"waits\":%lu}\n",
	       n, duration, pct(samples, n, 50), pct(samples, n, 90), pct(samples, n, 99),
	       pct(samples, n, 99.9), wait_count);
	return 0;
}
