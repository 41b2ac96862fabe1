/* A link with delay and a rate cap between two TUN devices in two network namespaces,
 * for benchmarks/farlink.py (this kernel has no netem qdisc).
 *
 *   farlink NETNS_A DEV_A NETNS_B DEV_B DELAY_US RATE_BYTES_PER_S LIMIT_PACKETS
 *
 * Each packet read from one device is written to the other at netem's time:
 *   time_to_send = max(arrival + delay, previous time_to_send) + len / rate
 * A direction holding LIMIT packets drops the next (as netem's queue limit does), so TCP
 * finds the cap instead of filling an endless queue. Runs at real-time priority so its
 * timing holds on busy cores; written in C so that forwarding costs the machine little
 * (a Python loop took several CPU-s per GiB on the two cores the benchmark measures).
 * Ends on SIGTERM or SIGINT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define SLOT 16384 /* > the devices' MTU (9000) */

struct queue {
    int in, out;             /* read from in, write to out */
    uint8_t *buf;            /* limit slots of SLOT bytes */
    int *len;
    int64_t *due;            /* ns, CLOCK_MONOTONIC */
    int head, count, limit;
    int64_t last;            /* previous time_to_send */
    long long sent, dropped, bytes;
};

static volatile sig_atomic_t stop, report;
static void on_signal(int s) { (void)s; stop = 1; }
static void on_report(int s) { (void)s; report = 1; }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void die(const char *what) { perror(what); exit(1); }

static int open_tun(const char *netns, const char *dev) {
    int ns = open(netns, O_RDONLY | O_CLOEXEC);
    if (ns < 0) die(netns);
    if (setns(ns, CLONE_NEWNET) < 0) die("setns");
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    return fd;
}

static void init(struct queue *q, int in, int out, int limit) {
    memset(q, 0, sizeof *q);
    q->in = in; q->out = out; q->limit = limit;
    q->buf = malloc((size_t)limit * SLOT);
    q->len = calloc(limit, sizeof(int));
    q->due = calloc(limit, sizeof(int64_t));
    if (!q->buf || !q->len || !q->due) die("malloc");
}

static void take(struct queue *q, int64_t delay, double ns_per_byte) {
    for (int i = 0; i < 256; i++) {
        uint8_t scratch[SLOT];
        int full = q->count >= q->limit;
        int slot = (q->head + q->count) % q->limit;
        uint8_t *p = full ? scratch : q->buf + (size_t)slot * SLOT;
        ssize_t n = read(q->in, p, SLOT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            die("read");
        }
        if (full) { q->dropped++; continue; }
        int64_t t = now_ns() + delay;
        if (t < q->last) t = q->last;
        t += (int64_t)(n * ns_per_byte);
        q->last = t;
        q->len[slot] = (int)n;
        q->due[slot] = t;
        q->count++;
    }
}

static void send_due(struct queue *q, int64_t now) {
    while (q->count && q->due[q->head] <= now) {
        ssize_t n = write(q->out, q->buf + (size_t)q->head * SLOT, q->len[q->head]);
        if (n < 0 && errno == EAGAIN) return;
        q->sent++;
        q->bytes += q->len[q->head];
        q->head = (q->head + 1) % q->limit;
        q->count--;
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: farlink NETNS_A DEV_A NETNS_B DEV_B DELAY_US RATE_BYTES_PER_S LIMIT\n");
        return 2;
    }
    int a = open_tun(argv[1], argv[2]);
    int b = open_tun(argv[3], argv[4]);
    int64_t delay = atoll(argv[5]) * 1000LL;
    double rate = atof(argv[6]);
    double ns_per_byte = rate > 0 ? 1e9 / rate : 0;
    int limit = atoi(argv[7]);
    struct sched_param sp = {.sched_priority = 10};
    if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0) perror("sched_setscheduler (timing may drift)");
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGUSR1, on_report); /* counters so far, one line on stdout */
    struct queue q[2];
    init(&q[0], a, b, limit);
    init(&q[1], b, a, limit);
    printf("ready\n");
    fflush(stdout);
    while (!stop) {
        int64_t now = now_ns(), next = -1;
        for (int i = 0; i < 2; i++)
            if (q[i].count && (next < 0 || q[i].due[q[i].head] < next)) next = q[i].due[q[i].head];
        struct pollfd p[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
        struct timespec ts, *tp = NULL;
        if (next >= 0) {
            int64_t w = next > now ? next - now : 0;
            ts.tv_sec = w / 1000000000LL;
            ts.tv_nsec = w % 1000000000LL;
            tp = &ts;
        }
        if (ppoll(p, 2, tp, NULL) < 0 && errno != EINTR) die("ppoll");
        if (p[0].revents & POLLIN) take(&q[0], delay, ns_per_byte);
        if (p[1].revents & POLLIN) take(&q[1], delay, ns_per_byte);
        now = now_ns();
        send_due(&q[0], now);
        send_due(&q[1], now);
        if (report) {
            report = 0;
            printf("bytes %lld %lld\n", q[0].bytes, q[1].bytes);
            fflush(stdout);
        }
    }
    fprintf(stderr, "farlink: a->b %lld sent %lld dropped %lld bytes; b->a %lld sent %lld dropped %lld bytes\n",
            q[0].sent, q[0].dropped, q[0].bytes, q[1].sent, q[1].dropped, q[1].bytes);
    return 0;
}
