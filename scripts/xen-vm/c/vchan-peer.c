/* SPDX-License-Identifier: GPL-3.0-only
 *
 * vchan-peer: a small driver of Debian's real libxenvchan (libxenmisc4.17), the reference
 * implementation ddstor's Rust ring must interoperate with.  Used inside the Xen VM.
 *
 *   vchan-peer server DOMID XSPATH [READ_MIN WRITE_MIN]
 *       offer a vchan to DOMID at XSPATH (ring sizes: libxenvchan picks the order from the
 *       minimum sizes: <=1024 -> order 10, <=2048 -> order 11, more -> separate pages);
 *       echo every byte back until the client goes away; print "vchan-peer: echoed N bytes".
 *   vchan-peer client DOMID XSPATH ping
 *       send "PING!", expect it back, print "VCHAN_OK".
 *   vchan-peer client DOMID XSPATH stream BYTES
 *       full-duplex stream of BYTES through an echo server, verified; prints MiB/s.
 *   vchan-peer client DOMID XSPATH rtt COUNT
 *       COUNT round trips of 16 bytes; prints the mean round-trip time in microseconds.
 *   vchan-peer client DOMID XSPATH hold
 *       connect, then block reading until the server goes away; prints "vchan-peer: peer closed"
 *       (close detection: the server's ring page unmap notification clears its live byte).
 *   vchan-peer client DOMID XSPATH hostile
 *       connect, then act as a hostile peer: claim far more bytes written than the ring holds
 *       (bogus producer index) and signal; passes when the server drops the connection (its
 *       live byte goes to 0) within 20 s, fails if it is still open.
 * Exit status 0 on success, 1 on any failure (with a reason on stderr).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <libxenvchan.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *what)
{
    fprintf(stderr, "vchan-peer: %s failed: %s\n", what, strerror(errno));
    return 1;
}

static int write_all(struct libxenvchan *c, const char *p, size_t n)
{
    while (n > 0) {
        int k = libxenvchan_write(c, p, n);
        if (k < 0)
            return -1;
        if (k == 0) {
            if (libxenvchan_wait(c) < 0)
                return -1;
            continue;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int read_all(struct libxenvchan *c, char *p, size_t n)
{
    while (n > 0) {
        int k = libxenvchan_read(c, p, n);
        if (k < 0)
            return -1;
        if (k == 0) {
            if (libxenvchan_wait(c) < 0)
                return -1;
            continue;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static unsigned char pattern(uint64_t i)
{
    return (unsigned char)((i * 2654435761u) >> 13);
}

static int server(int dom, const char *path, size_t rmin, size_t wmin)
{
    struct libxenvchan *c = libxenvchan_server_init(NULL, dom, path, rmin, wmin);
    if (!c)
        return fail("libxenvchan_server_init");
    c->blocking = 0; /* not initialised by the library; we drive the waits ourselves */
    printf("vchan-peer: server ready at %s for domain %d\n", path, dom);
    fflush(stdout);
    static char buf[65536];
    uint64_t total = 0;
    for (;;) {
        int k = libxenvchan_read(c, buf, sizeof buf);
        if (k < 0)
            break; /* the client went away */
        if (k == 0) {
            if (libxenvchan_is_open(c) == 0)
                break;
            if (libxenvchan_wait(c) < 0)
                break;
            continue;
        }
        if (write_all(c, buf, (size_t)k) < 0)
            break;
        total += (uint64_t)k;
    }
    printf("vchan-peer: echoed %llu bytes\n", (unsigned long long)total);
    libxenvchan_close(c);
    return 0;
}

static int client(int dom, const char *path, const char *mode, uint64_t arg)
{
    struct libxenvchan *c = libxenvchan_client_init(NULL, dom, path);
    if (!c)
        return fail("libxenvchan_client_init");
    c->blocking = 0;
    if (!strcmp(mode, "ping")) {
        char got[6] = {0};
        if (write_all(c, "PING!", 5) < 0 || read_all(c, got, 5) < 0)
            return fail("ping");
        if (memcmp(got, "PING!", 5)) {
            fprintf(stderr, "vchan-peer: ping: got '%s'\n", got);
            return 1;
        }
        printf("VCHAN_OK\n");
    } else if (!strcmp(mode, "rtt")) {
        char out[16], in[16];
        double t = now();
        for (uint64_t i = 0; i < arg; i++) {
            memset(out, (int)(i & 0xff), sizeof out);
            if (write_all(c, out, sizeof out) < 0 || read_all(c, in, sizeof in) < 0)
                return fail("rtt");
            if (memcmp(out, in, sizeof in)) {
                fprintf(stderr, "vchan-peer: rtt: echo mismatch at %llu\n", (unsigned long long)i);
                return 1;
            }
        }
        t = now() - t;
        printf("vchan-peer: rtt %.1f us over %llu calls\n", t / (double)arg * 1e6, (unsigned long long)arg);
    } else if (!strcmp(mode, "stream")) {
        static char out[65536], in[65536];
        uint64_t sent = 0, got = 0;
        double t = now();
        while (got < arg) {
            int progress = 0;
            if (sent < arg) {
                size_t n = arg - sent < sizeof out ? (size_t)(arg - sent) : sizeof out;
                for (size_t i = 0; i < n; i++)
                    out[i] = (char)pattern(sent + i);
                int k = libxenvchan_write(c, out, n);
                if (k < 0)
                    return fail("stream write");
                sent += (uint64_t)k;
                progress |= k > 0;
            }
            int k = libxenvchan_read(c, in, sizeof in);
            if (k < 0)
                return fail("stream read (peer gone?)");
            for (int i = 0; i < k; i++) {
                if ((unsigned char)in[i] != pattern(got + (uint64_t)i)) {
                    fprintf(stderr, "vchan-peer: stream: byte %llu differs\n",
                            (unsigned long long)(got + (uint64_t)i));
                    return 1;
                }
            }
            got += (uint64_t)k;
            progress |= k > 0;
            if (!progress && libxenvchan_wait(c) < 0)
                return fail("libxenvchan_wait");
        }
        t = now() - t;
        printf("vchan-peer: stream %llu bytes verified, %.2f MiB/s\n", (unsigned long long)arg,
               (double)arg / t / 1048576.0);
    } else if (!strcmp(mode, "hostile")) {
        uint32_t size = 1u << c->write.order;
        uint32_t cons = c->write.shr->cons;
        /* a producer 3 ring sizes ahead of the consumer: more than the ring can hold */
        __atomic_store_n(&c->write.shr->prod, cons + 3 * size + 17, __ATOMIC_SEQ_CST);
        xenevtchn_notify(c->event, c->event_port);
        printf("vchan-peer: wrote bogus prod %u (cons %u, ring %u bytes)\n", cons + 3 * size + 17,
               cons, size);
        fflush(stdout);
        double t = now();
        while (libxenvchan_is_open(c) && now() - t < 20)
            usleep(50000);
        if (libxenvchan_is_open(c)) {
            fprintf(stderr, "vchan-peer: hostile: the server still has the connection open\n");
            return 1;
        }
        printf("vchan-peer: hostile: server dropped the connection after %.1f s\n", now() - t);
    } else if (!strcmp(mode, "hold")) {
        char b[64];
        printf("vchan-peer: connected, holding\n");
        fflush(stdout);
        for (;;) {
            int k = libxenvchan_read(c, b, sizeof b);
            if (k < 0 || libxenvchan_is_open(c) == 0)
                break;
            if (k == 0 && libxenvchan_wait(c) < 0)
                break;
        }
        printf("vchan-peer: peer closed\n");
    } else {
        fprintf(stderr, "vchan-peer: unknown mode %s\n", mode);
        return 2;
    }
    fflush(stdout);
    libxenvchan_close(c);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && !strcmp(argv[1], "server")) {
        size_t rmin = argc > 4 ? strtoull(argv[4], NULL, 0) : 0;
        size_t wmin = argc > 5 ? strtoull(argv[5], NULL, 0) : 0;
        return server(atoi(argv[2]), argv[3], rmin, wmin);
    }
    if (argc >= 5 && !strcmp(argv[1], "client"))
        return client(atoi(argv[2]), argv[3], argv[4], argc > 5 ? strtoull(argv[5], NULL, 0) : 0);
    fprintf(stderr, "usage: vchan-peer server DOMID XSPATH [READ_MIN WRITE_MIN]\n"
                    "       vchan-peer client DOMID XSPATH ping|stream BYTES|rtt COUNT|hold|hostile\n");
    return 2;
}
