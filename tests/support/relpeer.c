/* SPDX-License-Identifier: Apache-2.0 */
/*
 * relpeer: the checking client and server of tests/test_reliability.py, in C because the cases
 * are about blocking semantics (a blocking recv() that returns EAGAIN, poll/epoll that never
 * wake, sendfile/splice/readv/writev/MSG_PEEK paths) that a runtime with its own retry loops
 * would hide. Compiled by the tests at run time: gcc -O2 -pthread relpeer.c -lcrypto.
 *
 * Protocol, one exchange per connection:
 *   client -> server  header (struct hdr), then req_size bytes of stream(seed(tag, conn, 0))
 *   server -> client  resp_size bytes of stream(seed(tag, conn, 1)), then the sha256 of the
 *                     request as the server received it (both ends compare digests)
 * stream() is position-dependent, so every byte is checked where it lands (loss, duplication,
 * reordering and bytes of another connection or pod all show as a mismatch at an offset), and
 * the server refuses a header whose tag is not its own (a wrong delivery between pods).
 * Sockets are plain blocking sockets without timeouts; the test bounds the wall time.
 *
 *   relpeer server HOST PORT --tag T [--recv recv|readv|splice|peek] [--banner]
 *           [--read-delay-us N] [--close-after-request-ms N] [--unread]
 *   relpeer client HOST PORT --tag T --connections N --parallel P --sizes a,b,c
 *           [--send write|writev|sendfile|more|cork] [--nodelay] [--halfclose]
 *           [--wait recv|poll|epoll] [--expect-eof] [--close-unread] [--banner]
 *           [--nonblock] [--bind-port-base B] [--pre-send-delay-ms N] [--big-every K --big-size S]
 *
 * The server prints {"listening": ...} once ready and, on SIGTERM, one JSON summary line; each
 * failed connection is one JSON line on stderr. The client prints one JSON summary line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/sha.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x72656c70u
#define CHUNK (256 * 1024)
#define F_CLOSE_UNREAD 1 /* the client closes without reading the response */

struct hdr {
	uint32_t magic, tag;
	uint64_t conn, req_size, resp_size;
	uint32_t flags, pad;
};

/* splitmix64: byte i of a stream is byte i%8 of mix(seed + i/8). */
static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t seed_of(uint32_t tag, uint64_t conn, int dir)
{
	return mix(((uint64_t)tag << 40) ^ (conn << 1) ^ (uint64_t)dir);
}

static void fill(uint8_t *buf, size_t len, uint64_t seed, uint64_t off)
{
	for (size_t i = 0; i < len; i++) {
		uint64_t p = off + i;
		buf[i] = (uint8_t)(mix(seed + p / 8) >> (8 * (p % 8)));
	}
}

/* Offset of the first byte that differs from the stream, or -1. */
static int64_t check(const uint8_t *buf, size_t len, uint64_t seed, uint64_t off)
{
	for (size_t i = 0; i < len;) {
		uint64_t p = off + i, w = mix(seed + p / 8);
		for (unsigned b = p % 8; b < 8 && i < len; b++, i++)
			if (buf[i] != (uint8_t)(w >> (8 * b)))
				return (int64_t)(off + i);
	}
	return -1;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* -- options ------------------------------------------------------------------------------------ */

static const char *host;
static int port, is_v6;
static uint32_t tag;
static const char *recv_mode = "recv", *send_mode = "write", *wait_mode = "recv";
static int banner, unread, nodelay, halfclose, expect_eof, close_unread, pre_send_ms, nonblock;
static long read_delay_us, close_after_ms, bind_base, big_every;
static uint64_t big_size;
static long connections = 1, parallel = 1;
static uint64_t sizes[64];
static int nsizes;

/* -- results ------------------------------------------------------------------------------------ */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long n_ok, n_mismatch;
static uint64_t n_bytes;
static char errs[32][24];
static long errn[32];
static int nerr;
static long next_conn;

static void count_err(const char *what)
{
	pthread_mutex_lock(&lock);
	int i;
	for (i = 0; i < nerr; i++)
		if (!strcmp(errs[i], what))
			break;
	if (i == nerr && nerr < 32)
		snprintf(errs[nerr++], sizeof(errs[0]), "%s", what);
	if (i < 32)
		errn[i]++;
	pthread_mutex_unlock(&lock);
}

static const char *errname(int e)
{
	switch (e) {
	case EAGAIN: return "EAGAIN";
	case ECONNRESET: return "ECONNRESET";
	case EPIPE: return "EPIPE";
	case ECONNREFUSED: return "ECONNREFUSED";
	case ENOTCONN: return "ENOTCONN";
	case ETIMEDOUT: return "ETIMEDOUT";
	case EINTR: return "EINTR";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	default: return "errno_other";
	}
}

static void server_fail(uint64_t conn, const char *what, int e)
{
	fprintf(stderr, "{\"conn\": %" PRIu64 ", \"error\": \"%s\", \"errno\": \"%s\"}\n", conn, what,
		e ? errname(e) : "");
	count_err(what);
}

/* -- I/O helpers: every failure is reported with its errno, never retried ----------------------- */
/* (except EAGAIN on a --nonblock client, whose file is O_NONBLOCK: it waits in poll() and tries
 * again, as an event loop does) */

static int wait_writable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	return poll(&p, 1, -1) < 0 ? -errno : 0;
}

static int write_all(int fd, const uint8_t *buf, size_t len, int flags)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | flags);
		if (n < 0 && nonblock && errno == EAGAIN) {
			if (wait_writable(fd))
				return -errno;
			continue;
		}
		if (n < 0)
			return -errno;
		buf += n;
		len -= n;
	}
	return 0;
}

/* Block until readable the way the client was told to (recv itself, poll or epoll). */
static int wait_readable(int fd, int ep)
{
	if (!strcmp(wait_mode, "poll") || (nonblock && strcmp(wait_mode, "epoll"))) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, -1) < 0)
			return -errno;
	} else if (!strcmp(wait_mode, "epoll")) {
		struct epoll_event ev;
		if (epoll_wait(ep, &ev, 1, -1) < 0)
			return -errno;
	}
	return 0;
}

/* Read exactly len bytes (or to EOF: returns bytes read) with recv(); negative errno on error. */
static ssize_t read_full(int fd, uint8_t *buf, size_t len, int ep)
{
	size_t got = 0;

	while (got < len) {
		int w = wait_readable(fd, ep);
		if (w)
			return w;
		ssize_t n = recv(fd, buf + got, len - got, 0);
		if (n < 0 && nonblock && errno == EAGAIN)
			continue;	/* a wake-up without data is allowed to an O_NONBLOCK reader */
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		got += n;
	}
	return got;
}

/* -- server ------------------------------------------------------------------------------------- */

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

/* Receive the request body one chunk at a time in the configured way; returns bytes or -errno. */
static ssize_t server_recv_chunk(int fd, uint8_t *buf, size_t want, int pipefd[2])
{
	if (!strcmp(recv_mode, "readv")) {
		/* Three uneven iovecs so that message boundaries never line up with them. */
		size_t a = want / 3 + 1 > want ? want : want / 3 + 1, b = (want - a) / 2;
		struct iovec iov[3] = { { buf, a }, { buf + a, b }, { buf + a + b, want - a - b } };
		ssize_t n = readv(fd, iov, 3);
		return n < 0 ? -errno : n;
	}
	if (!strcmp(recv_mode, "splice")) {
		ssize_t n = splice(fd, NULL, pipefd[1], NULL, want, SPLICE_F_MOVE);
		if (n <= 0)
			return n < 0 ? -errno : 0;
		for (ssize_t got = 0; got < n;) {
			ssize_t r = read(pipefd[0], buf + got, n - got);
			if (r <= 0)
				return -EIO;
			got += r;
		}
		return n;
	}
	ssize_t n = recv(fd, buf, want, 0);
	return n < 0 ? -errno : n;
}

static void *serve(void *arg)
{
	int fd = (int)(long)arg, pipefd[2] = { -1, -1 };
	uint8_t *buf = malloc(CHUNK), digest[SHA256_DIGEST_LENGTH];
	struct hdr h;
	SHA256_CTX sha;
	uint64_t conn = 0, got = 0;
	ssize_t n;
	int64_t bad;

	if (!strcmp(recv_mode, "splice") && pipe(pipefd)) {
		server_fail(0, "pipe", errno);
		goto out;
	}
	if (banner) {
		/* The server speaks first: these bytes reach the client before it half-closes. */
		uint8_t b[64];
		fill(b, sizeof(b), seed_of(tag, 0, 2), 0);
		if (write_all(fd, b, sizeof(b), 0)) {
			server_fail(0, "banner_send", errno);
			goto out;
		}
	}
	if (!strcmp(recv_mode, "peek")) {
		/* Peek the whole header first (as a protocol sniffer would), then read it for real. */
		size_t seen = 0;
		while (seen < sizeof(h)) {
			n = recv(fd, &h, sizeof(h), MSG_PEEK);
			if (n <= 0) {
				server_fail(0, n ? "peek" : "peek_eof", n ? errno : 0);
				goto out;
			}
			if ((size_t)n == seen)
				usleep(200); /* no new bytes yet: MSG_PEEK returns what is there */
			seen = n;
		}
	}
	n = read_full(fd, (uint8_t *)&h, sizeof(h), -1);
	if (n != sizeof(h)) {
		server_fail(0, n < 0 ? "header_recv" : "header_short", n < 0 ? -n : 0);
		goto out;
	}
	conn = h.conn;
	if (h.magic != MAGIC || h.tag != tag) {
		server_fail(conn, "wrong_delivery", 0); /* another pod's or connection's bytes */
		goto out;
	}
	if (unread) {
		close(fd); /* unread request bytes: the kernel answers with a RST */
		fd = -1;
		pthread_mutex_lock(&lock);
		n_ok++;
		pthread_mutex_unlock(&lock);
		goto out;
	}
	SHA256_Init(&sha);
	while (got < h.req_size) {
		size_t want = h.req_size - got < CHUNK ? h.req_size - got : CHUNK;
		n = server_recv_chunk(fd, buf, want, pipefd);
		if (n <= 0) {
			server_fail(conn, n ? "request_recv" : "request_eof", n ? -n : 0);
			goto out;
		}
		bad = check(buf, n, seed_of(tag, conn, 0), got);
		if (bad >= 0) {
			server_fail(conn, "request_mismatch", 0);
			goto out;
		}
		SHA256_Update(&sha, buf, n);
		got += n;
		if (read_delay_us)
			usleep(read_delay_us);
	}
	SHA256_Final(digest, &sha);
	if (close_after_ms) {
		/* The client is (most likely) blocked in recv/poll/epoll by now: close under it. */
		usleep(close_after_ms * 1000);
		pthread_mutex_lock(&lock);
		n_ok++;
		n_bytes += got;
		pthread_mutex_unlock(&lock);
		goto out;
	}
	for (uint64_t off = 0; off < h.resp_size;) {
		size_t len = h.resp_size - off < CHUNK ? h.resp_size - off : CHUNK;
		fill(buf, len, seed_of(tag, conn, 1), off);
		int e = write_all(fd, buf, len, 0);
		if (e) {
			if (!(h.flags & F_CLOSE_UNREAD))
				server_fail(conn, "response_send", -e);
			goto counted;
		}
		off += len;
	}
	if (write_all(fd, digest, sizeof(digest), 0) && !(h.flags & F_CLOSE_UNREAD)) {
		server_fail(conn, "digest_send", errno);
		goto out;
	}
	/* Wait for the client's EOF (half-close or close), then close our end. */
	n = recv(fd, buf, 1, 0);
	if (n != 0 && !(h.flags & F_CLOSE_UNREAD)) {
		server_fail(conn, n < 0 ? "eof_recv" : "extra_bytes", n < 0 ? errno : 0);
		goto out;
	}
counted:
	pthread_mutex_lock(&lock);
	n_ok++;
	n_bytes += got + h.resp_size;
	pthread_mutex_unlock(&lock);
out:
	if (fd >= 0)
		close(fd);
	if (pipefd[0] >= 0) {
		close(pipefd[0]);
		close(pipefd[1]);
	}
	free(buf);
	return NULL;
}

static int make_addr(struct sockaddr_storage *ss, const char *h, int p)
{
	memset(ss, 0, sizeof(*ss));
	if (strchr(h, ':')) {
		struct sockaddr_in6 *a = (void *)ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(p);
		is_v6 = 1;
		return inet_pton(AF_INET6, h, &a->sin6_addr) == 1 ? (int)sizeof(*a) : -1;
	}
	struct sockaddr_in *a = (void *)ss;
	a->sin_family = AF_INET;
	a->sin_port = htons(p);
	return inet_pton(AF_INET, h, &a->sin_addr) == 1 ? (int)sizeof(*a) : -1;
}

static int server_main(void)
{
	struct sockaddr_storage ss;
	int len = make_addr(&ss, host, port), one = 1;
	int lfd = socket(is_v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);

	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (len < 0 || bind(lfd, (void *)&ss, len) || listen(lfd, 4096)) {
		perror("listen");
		return 2;
	}
	signal(SIGTERM, on_term);
	signal(SIGPIPE, SIG_IGN);
	printf("{\"listening\": [\"%s\", %d]}\n", host, port);
	fflush(stdout);
	while (!stop) {
		struct pollfd p = { .fd = lfd, .events = POLLIN };
		if (poll(&p, 1, 100) <= 0)
			continue;
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		pthread_t t;
		pthread_attr_t a;
		pthread_attr_init(&a);
		pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
		pthread_attr_setstacksize(&a, 256 * 1024);
		if (pthread_create(&t, &a, serve, (void *)(long)fd))
			close(fd);
		pthread_attr_destroy(&a);
	}
	usleep(300 * 1000); /* let connection threads finish their last bytes */
	pthread_mutex_lock(&lock);
	printf("{\"ok\": %ld, \"bytes\": %" PRIu64 ", \"errors\": {", n_ok, n_bytes);
	for (int i = 0; i < nerr; i++)
		printf("%s\"%s\": %ld", i ? ", " : "", errs[i], errn[i]);
	printf("}}\n");
	fflush(stdout);
	return 0;
}

/* -- client ------------------------------------------------------------------------------------- */

static int send_request(int fd, struct hdr *h, uint8_t *buf)
{
	uint64_t seed = seed_of(tag, h->conn, 0);
	int e, on = 1, off = 0;

	if (!strcmp(send_mode, "cork"))
		setsockopt(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on));
	if (!strcmp(send_mode, "sendfile")) {
		/* The request comes from a file: sendfile() is the sender (nginx, Go's io.Copy). */
		if ((e = write_all(fd, (uint8_t *)h, sizeof(*h), 0)))
			return e;
		int mfd = memfd_create("relpeer", 0);
		for (uint64_t o = 0; o < h->req_size;) {
			size_t len = h->req_size - o < CHUNK ? h->req_size - o : CHUNK;
			fill(buf, len, seed, o);
			if (write(mfd, buf, len) != (ssize_t)len) {
				close(mfd);
				return -EIO;
			}
			o += len;
		}
		off_t pos = 0;
		while ((uint64_t)pos < h->req_size) {
			ssize_t n = sendfile(fd, mfd, &pos, h->req_size - pos);
			if (n < 0 && nonblock && errno == EAGAIN && !wait_writable(fd))
				continue;
			if (n <= 0) {
				e = n < 0 ? -errno : -EIO;
				close(mfd);
				return e;
			}
		}
		close(mfd);
		return 0;
	}
	if (!strcmp(send_mode, "writev")) {
		/* Header and body in one writev, the body split in uneven iovecs. */
		for (uint64_t o = 0; o < h->req_size || o == 0;) {
			size_t len = h->req_size - o < CHUNK ? h->req_size - o : CHUNK;
			fill(buf, len, seed, o);
			struct iovec iov[4];
			int n = 0;
			if (o == 0)
				iov[n++] = (struct iovec){ h, sizeof(*h) };
			size_t a = len / 3;
			iov[n++] = (struct iovec){ buf, a };
			iov[n++] = (struct iovec){ buf + a, len - a };
			size_t total = (o == 0 ? sizeof(*h) : 0) + len, done = 0;
			while (done < total) {
				ssize_t w = writev(fd, iov, n);
				if (w < 0 && nonblock && errno == EAGAIN) {
					if (wait_writable(fd))
						return -errno;
					continue;
				}
				if (w < 0)
					return -errno;
				done += w;
				/* Advance the iovecs past what was written. */
				for (int i = 0; i < n && w > 0; i++) {
					size_t t = (size_t)w < iov[i].iov_len ? (size_t)w : iov[i].iov_len;
					iov[i].iov_base = (uint8_t *)iov[i].iov_base + t;
					iov[i].iov_len -= t;
					w -= t;
				}
			}
			o += len;
			if (h->req_size == 0)
				break;
		}
		return 0;
	}
	/* write / more / cork: the header first (with MSG_MORE for "more"), then the body. */
	if ((e = write_all(fd, (uint8_t *)h, sizeof(*h), !strcmp(send_mode, "more") ? MSG_MORE : 0)))
		return e;
	for (uint64_t o = 0; o < h->req_size;) {
		size_t len = h->req_size - o < CHUNK ? h->req_size - o : CHUNK;
		int last = o + len >= h->req_size;
		fill(buf, len, seed, o);
		if ((e = write_all(fd, buf, len, !strcmp(send_mode, "more") && !last ? MSG_MORE : 0)))
			return e;
		o += len;
	}
	if (!strcmp(send_mode, "cork"))
		setsockopt(fd, IPPROTO_TCP, TCP_CORK, &off, sizeof(off));
	return 0;
}

/* One connection; returns NULL on success or the name of what failed. */
static const char *one(uint64_t conn, uint64_t size, uint8_t *buf, int *err)
{
	struct sockaddr_storage ss;
	int len = make_addr(&ss, host, port), fd, ep = -1, one = 1;
	struct hdr h = { MAGIC, tag, conn, size, size, close_unread ? F_CLOSE_UNREAD : 0, 0 };
	uint8_t want[SHA256_DIGEST_LENGTH], got_digest[SHA256_DIGEST_LENGTH];
	const char *what = NULL;
	SHA256_CTX sha;
	ssize_t n;

	*err = 0;
	fd = socket(is_v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
	if (fd < 0) {
		*err = errno;
		return "socket";
	}
	if (nodelay)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (bind_base) {
		/* A pinned source port: pods in different Labs then use identical 4-tuples. */
		struct sockaddr_storage bs;
		int blen = make_addr(&bs, is_v6 ? "::" : "0.0.0.0", bind_base + conn);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (void *)&bs, blen)) {
			*err = errno;
			what = "bind";
			goto out;
		}
	}
	if (nonblock)
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	if (connect(fd, (void *)&ss, len)) {
		socklen_t elen = sizeof(*err);
		if (!(nonblock && errno == EINPROGRESS && !wait_writable(fd) &&
		      !getsockopt(fd, SOL_SOCKET, SO_ERROR, err, &elen) && !*err)) {
			*err = *err ? *err : errno;
			what = "connect";
			goto out;
		}
	}
	if (!strcmp(wait_mode, "epoll")) {
		struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP };
		ep = epoll_create1(0);
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	}
	if (banner) {
		uint8_t b[64];
		n = read_full(fd, b, sizeof(b), ep);
		if (n != sizeof(b) || check(b, sizeof(b), seed_of(tag, 0, 2), 0) >= 0) {
			*err = n < 0 ? -n : 0;
			what = n < 0 ? "banner_recv" : "banner_mismatch";
			goto out;
		}
	}
	if (pre_send_ms)
		usleep(pre_send_ms * 1000);
	/* No pause otherwise: the first send races the server end's insert (first-send race). */
	int e = send_request(fd, &h, buf);
	if (e) {
		*err = -e;
		what = "request_send";
		goto out;
	}
	if (close_unread)
		goto out; /* close with the response unread */
	if (halfclose && shutdown(fd, SHUT_WR)) {
		*err = errno;
		what = "shutdown";
		goto out;
	}
	if (expect_eof) {
		/* The server closes without a response while we block: EOF, nothing else. */
		n = read_full(fd, buf, 1, ep);
		if (n != 0) {
			*err = n < 0 ? -n : 0;
			what = n < 0 ? "eof_wait" : "unexpected_bytes";
		}
		goto out;
	}
	for (uint64_t o = 0; o < size;) {
		size_t want_len = size - o < CHUNK ? size - o : CHUNK;
		n = read_full(fd, buf, want_len, ep);
		if (n <= 0 || (size_t)n != want_len) {
			*err = n < 0 ? -n : 0;
			what = n < 0 ? "response_recv" : "response_short";
			goto out;
		}
		if (check(buf, n, seed_of(tag, conn, 1), o) >= 0) {
			what = "response_mismatch";
			goto out;
		}
		o += n;
	}
	n = read_full(fd, got_digest, sizeof(got_digest), ep);
	if (n != sizeof(got_digest)) {
		*err = n < 0 ? -n : 0;
		what = n < 0 ? "digest_recv" : "digest_short";
		goto out;
	}
	SHA256_Init(&sha);
	for (uint64_t o = 0; o < size;) {
		size_t l = size - o < CHUNK ? size - o : CHUNK;
		fill(buf, l, seed_of(tag, conn, 0), o);
		SHA256_Update(&sha, buf, l);
		o += l;
	}
	SHA256_Final(want, &sha);
	if (memcmp(want, got_digest, sizeof(want))) {
		what = "digest_mismatch";
		goto out;
	}
	if (halfclose) {
		n = read_full(fd, buf, 1, ep); /* the server closes after our FIN: EOF */
		if (n != 0) {
			*err = n < 0 ? -n : 0;
			what = n < 0 ? "eof_recv" : "extra_bytes";
		}
	}
out:
	if (ep >= 0)
		close(ep);
	close(fd);
	return what;
}

static void *client_worker(void *arg)
{
	uint8_t *buf = malloc(CHUNK);
	(void)arg;

	for (;;) {
		pthread_mutex_lock(&lock);
		long c = next_conn < connections ? next_conn++ : -1;
		pthread_mutex_unlock(&lock);
		if (c < 0)
			break;
		uint64_t size = big_every && c % big_every == big_every - 1 ? big_size : sizes[c % nsizes];
		int err;
		const char *what = one(c, size, buf, &err);
		if (what) {
			char key[24];
			snprintf(key, sizeof(key), "%s", err ? errname(err) : what);
			count_err(key);
			if (strstr(what, "mismatch")) {
				pthread_mutex_lock(&lock);
				n_mismatch++;
				pthread_mutex_unlock(&lock);
			}
			if (getenv("RELPEER_VERBOSE"))
				fprintf(stderr, "conn %ld: %s %s\n", c, what, err ? errname(err) : "");
		} else {
			pthread_mutex_lock(&lock);
			n_ok++;
			n_bytes += expect_eof || close_unread ? size : 2 * size;
			pthread_mutex_unlock(&lock);
		}
	}
	free(buf);
	return NULL;
}

static int client_main(void)
{
	pthread_t t[512];
	struct rusage ru;
	double t0 = now();

	signal(SIGPIPE, SIG_IGN);
	if (parallel > 512)
		parallel = 512;
	for (long i = 0; i < parallel; i++)
		pthread_create(&t[i], NULL, client_worker, NULL);
	for (long i = 0; i < parallel; i++)
		pthread_join(t[i], NULL);
	getrusage(RUSAGE_SELF, &ru);
	printf("{\"ok\": %ld, \"mismatches\": %ld, \"bytes\": %" PRIu64 ", \"wall\": %.3f, "
	       "\"cpu\": %.3f, \"maxrss_kb\": %ld, \"errors\": {",
	       n_ok, n_mismatch, n_bytes, now() - t0,
	       ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
		       ru.ru_stime.tv_usec / 1e6,
	       ru.ru_maxrss);
	for (int i = 0; i < nerr; i++)
		printf("%s\"%s\": %ld", i ? ", " : "", errs[i], errn[i]);
	printf("}}\n");
	return n_ok == connections ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: relpeer server|client HOST PORT [options]\n");
		return 2;
	}
	host = argv[2];
	port = atoi(argv[3]);
	for (int i = 4; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
#define OPT(name) (!strcmp(a, name) && ++i)
		if (OPT("--tag"))
			tag = strtoul(v, NULL, 0);
		else if (OPT("--recv"))
			recv_mode = v;
		else if (OPT("--send"))
			send_mode = v;
		else if (OPT("--wait"))
			wait_mode = v;
		else if (OPT("--read-delay-us"))
			read_delay_us = atol(v);
		else if (OPT("--close-after-request-ms"))
			close_after_ms = atol(v);
		else if (OPT("--connections"))
			connections = atol(v);
		else if (OPT("--parallel"))
			parallel = atol(v);
		else if (OPT("--bind-port-base"))
			bind_base = atol(v);
		else if (OPT("--pre-send-delay-ms"))
			pre_send_ms = atoi(v);
		else if (OPT("--big-every"))
			big_every = atol(v);
		else if (OPT("--big-size"))
			big_size = strtoull(v, NULL, 0);
		else if (OPT("--sizes")) {
			char *s = strdup(v), *tok, *save;
			for (tok = strtok_r(s, ",", &save); tok && nsizes < 64; tok = strtok_r(NULL, ",", &save))
				sizes[nsizes++] = strtoull(tok, NULL, 0);
			free(s);
		} else if (!strcmp(a, "--banner"))
			banner = 1;
		else if (!strcmp(a, "--unread"))
			unread = 1;
		else if (!strcmp(a, "--nodelay"))
			nodelay = 1;
		else if (!strcmp(a, "--halfclose"))
			halfclose = 1;
		else if (!strcmp(a, "--expect-eof"))
			expect_eof = 1;
		else if (!strcmp(a, "--close-unread"))
			close_unread = 1;
		else if (!strcmp(a, "--nonblock"))
			nonblock = 1;
		else {
			fprintf(stderr, "unknown option %s\n", a);
			return 2;
		}
	}
	if (!nsizes)
		sizes[nsizes++] = 1024;
	if (!strcmp(argv[1], "server"))
		return server_main();
	return client_main();
}
