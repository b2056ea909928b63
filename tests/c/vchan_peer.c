/* vchan_peer: a small driver of Debian's libxenvchan public API, used by ddstor's interop
 * tests and benchmark (run under the ddstor sim shim with LD_PRELOAD).
 *
 *   vchan_peer server PEER_DOMID XS_PATH LEFT_MIN RIGHT_MIN MODE [ARGS]
 *   vchan_peer client PEER_DOMID XS_PATH MODE [ARGS]
 *
 * MODE:
 *   echo            write back everything read until the peer closes
 *   source N        write N bytes of the xorshift stream (seed 1), then close
 *   sink            read until the peer closes
 *   blast N         write N bytes from a constant buffer, then close (benchmarks: no byte loop)
 *   drain           read until the peer closes without checksumming (benchmarks)
 *   pingpong N S    N round trips of S-byte messages (this side sends first); prints µs per trip
 * Every mode prints one line on stdout at the end: "bytes=<read> written=<written>
 * fnv=<fnv1a-64 of the bytes read> secs=<elapsed>".
 * Exit status 0 on success.
 *
 * License: GPL-3.0-only (part of ddstor).
 */
#include <libxenvchan.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t fnv = 14695981039346656037ULL;
static void fnv_update(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) { fnv ^= p[i]; fnv *= 1099511628211ULL; }
}
static uint64_t xs_state = 1;
static unsigned char next_byte(void) {
    xs_state ^= xs_state << 13; xs_state ^= xs_state >> 7; xs_state ^= xs_state << 17;
    return (unsigned char)(xs_state >> 24);
}
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
static int write_all(struct libxenvchan *v, const unsigned char *p, size_t n) {
    size_t off = 0;
    while (off < n) {
        int w = libxenvchan_write(v, p + off, n - off);
        if (w < 0) return -1;
        off += (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s server PEER XS_PATH LEFT_MIN RIGHT_MIN MODE [ARGS] | client PEER XS_PATH MODE [ARGS]\n", argv[0]);
        return 2;
    }
    int server = strcmp(argv[1], "server") == 0;
    int peer = atoi(argv[2]);
    const char *path = argv[3];
    int ai = server ? 6 : 4;
    if (argc <= ai) { fprintf(stderr, "vchan_peer: missing MODE\n"); return 2; }
    const char *mode = argv[ai];
    struct libxenvchan *v;
    if (server)
        v = libxenvchan_server_init(NULL, peer, path, strtoul(argv[4], 0, 0), strtoul(argv[5], 0, 0));
    else
        v = libxenvchan_client_init(NULL, peer, path);
    if (!v) { perror("vchan_peer: libxenvchan init"); return 1; }
    v->blocking = 1;
    if (server) {
        /* Wait for the client to connect (cli_live 2 -> 1). */
        while (v->ring->cli_live == 2)
            if (libxenvchan_wait(v)) { fprintf(stderr, "vchan_peer: wait failed\n"); return 1; }
    }
    if (server) { printf("ready\n"); fflush(stdout); }
    static unsigned char buf[1 << 16];
    uint64_t nread = 0, nwritten = 0;
    double t0 = now();
    int rc = 0;
    if (!strcmp(mode, "drain")) {
        for (;;) {
            int r = libxenvchan_read(v, buf, sizeof buf);
            if (r < 0) break;
            nread += (uint64_t)r;
        }
    } else if (!strcmp(mode, "blast") && argc > ai + 1) {
        uint64_t n = strtoull(argv[ai + 1], 0, 0);
        memset(buf, 0xa5, sizeof buf);
        while (nwritten < n) {
            size_t c = sizeof buf;
            if (n - nwritten < c) c = (size_t)(n - nwritten);
            if (write_all(v, buf, c)) { rc = 1; break; }
            nwritten += c;
        }
    } else if (!strcmp(mode, "echo") || !strcmp(mode, "sink")) {
        int echo = !strcmp(mode, "echo");
        for (;;) {
            int r = libxenvchan_read(v, buf, sizeof buf);
            if (r < 0) break;
            fnv_update(buf, (size_t)r);
            nread += (uint64_t)r;
            if (echo) {
                if (write_all(v, buf, (size_t)r)) { rc = 1; break; }
                nwritten += (uint64_t)r;
            }
        }
    } else if (!strcmp(mode, "source") && argc > ai + 1) {
        uint64_t n = strtoull(argv[ai + 1], 0, 0);
        while (nwritten < n) {
            size_t c = sizeof buf;
            if (n - nwritten < c) c = (size_t)(n - nwritten);
            for (size_t i = 0; i < c; i++) buf[i] = next_byte();
            if (write_all(v, buf, c)) { rc = 1; break; }
            nwritten += c;
        }
    } else if (!strcmp(mode, "pingpong") && argc > ai + 2) {
        long n = atol(argv[ai + 1]);
        size_t s = strtoul(argv[ai + 2], 0, 0);
        if (s > sizeof buf) s = sizeof buf;
        memset(buf, 0x5a, s);
        for (long i = 0; i < n; i++) {
            if (write_all(v, buf, s)) { rc = 1; break; }
            if (libxenvchan_recv(v, buf, s) != (int)s) { rc = 1; break; }
            nwritten += s; nread += s;
        }
    } else {
        fprintf(stderr, "vchan_peer: unknown mode %s\n", mode);
        rc = 2;
    }
    double secs = now() - t0;
    printf("bytes=%llu written=%llu fnv=%016llx secs=%.6f\n", (unsigned long long)nread,
           (unsigned long long)nwritten, (unsigned long long)fnv, secs);
    fflush(stdout);
    libxenvchan_close(v);
    return rc;
}
