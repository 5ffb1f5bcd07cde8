/*
 * fedrdma-delay: the WAN lab's userspace delay element.
 *
 * Why it exists: this kernel has no netem, so the lab queues forwarded packets in the
 * router namespace to NFQUEUE and this process releases each one a fixed time after it
 * arrived. Python did this at 1.7-3.3 Gbit/s with drops; the lab needs at least
 * 5 Gbit/s at MTU 9000 on two cores shared with sender and receiver. What makes it cheap:
 *   - metadata-only copy mode: the verdict never changes the packet, so no payload
 *     crosses into userspace;
 *   - recvmmsg: one syscall drains many queued-packet messages;
 *   - batched verdicts: delay is constant per queue and ids rise with arrival time, so
 *     one NFQA_VERDICT_BATCH releases every packet whose time has come.
 * One queue per (path, direction) keeps the FIFO property that batching relies on.
 *
 * Usage: fedrdma-delay [--maxlen N] [--rcvbuf BYTES] [--rt PRIO] QUEUE:DELAY_US [QUEUE:DELAY_US ...]
 * --rt asks for SCHED_FIFO: on two busy cores a normal-priority element releases packets
 * late by tens of ms, which shows up as RTT jitter the link does not have.
 * Prints "ready" on stdout once every queue is bound; exits on SIGTERM/SIGINT and prints
 * per-queue counters on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <linux/netfilter.h>
#include <linux/netlink.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

/* Packets one queue may hold in the kernel: 65536 x 9000 B covers ~0.9 s at 5 Gbit/s. */
#define DEFAULT_MAXLEN 65536u
/* Netlink receive buffer: metadata messages are ~150 B, so this absorbs long stalls. */
#define DEFAULT_RCVBUF (64 * 1024 * 1024)
/* Most (path, direction) queues one element serves: the lab uses two per silo. */
#define MAX_QUEUES 512
/* Messages drained per recvmmsg call: amortises the syscall without starving releases. */
#define BATCH 128
/* Bytes per message slot: a metadata-only message is well under this. */
#define SLOT 2048
/* Ring slots per queue (power of two): must exceed DEFAULT_MAXLEN so the ring never fills first. */
#define RING (1u << 17)

struct held {
    uint64_t due_ns;
    uint32_t id;
};

struct queue {
    struct nfq_q_handle *qh;
    uint16_t num;
    uint64_t delay_ns;
    struct held *ring;
    uint32_t head, tail; /* free-running; count = tail - head */
    uint64_t packets, overflow, batches, max_held, max_late_ns;
};

static struct queue queues[MAX_QUEUES];
static int nqueues;
static volatile sig_atomic_t stop;
static uint64_t now_cached;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
    (void)msg;
    struct queue *q = data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph)
        return 0;
    uint32_t id = ntohl(ph->packet_id);
    q->packets++;
    if (q->tail - q->head >= RING) {
        /* Cannot hold it without breaking FIFO bookkeeping: release now and count it. */
        q->overflow++;
        nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
        return 0;
    }
    struct held *h = &q->ring[q->tail & (RING - 1)];
    h->due_ns = now_cached + q->delay_ns;
    h->id = id;
    q->tail++;
    if (q->tail - q->head > q->max_held)
        q->max_held = q->tail - q->head;
    return 0;
}

/* Release every packet whose time has come; return ns until the next one is due. */
static int64_t release_due(uint64_t now)
{
    int64_t next = -1;
    for (int i = 0; i < nqueues; i++) {
        struct queue *q = &queues[i];
        uint32_t last = 0;
        int any = 0;
        while (q->head != q->tail) {
            struct held *h = &q->ring[q->head & (RING - 1)];
            if (h->due_ns > now)
                break;
            if (now - h->due_ns > q->max_late_ns)
                q->max_late_ns = now - h->due_ns;
            last = h->id;
            any = 1;
            q->head++;
        }
        if (any) {
            nfq_set_verdict_batch(q->qh, last, NF_ACCEPT);
            q->batches++;
        }
        if (q->head != q->tail) {
            int64_t wait = (int64_t)(q->ring[q->head & (RING - 1)].due_ns - now);
            if (next < 0 || wait < next)
                next = wait;
        }
    }
    return next;
}

static void usage(void)
{
    fprintf(stderr, "usage: fedrdma-delay [--maxlen N] [--rcvbuf BYTES] [--rt PRIO] QUEUE:DELAY_US [...]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    unsigned maxlen = DEFAULT_MAXLEN;
    int rcvbuf = DEFAULT_RCVBUF;
    int i;

    struct nfq_handle *h = nfq_open();
    if (!h) {
        fprintf(stderr, "fedrdma-delay: nfq_open failed (%s): needs root (CAP_NET_ADMIN) and nfnetlink_queue\n",
                strerror(errno));
        return 1;
    }
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--maxlen") && i + 1 < argc) {
            maxlen = (unsigned)strtoul(argv[++i], NULL, 10);
            continue;
        }
        if (!strcmp(argv[i], "--rt") && i + 1 < argc) {
            struct sched_param sp = {.sched_priority = atoi(argv[++i])};
            if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0)
                fprintf(stderr, "fedrdma-delay: SCHED_FIFO refused (%s); running at normal priority\n",
                        strerror(errno));
            continue;
        }
        if (!strcmp(argv[i], "--rcvbuf") && i + 1 < argc) {
            rcvbuf = atoi(argv[++i]);
            continue;
        }
        unsigned num;
        unsigned long long us;
        if (sscanf(argv[i], "%u:%llu", &num, &us) != 2 || num > 65535 || nqueues >= MAX_QUEUES)
            usage();
        struct queue *q = &queues[nqueues];
        q->num = (uint16_t)num;
        q->delay_ns = us * 1000ull;
        q->ring = calloc(RING, sizeof(struct held));
        if (!q->ring) {
            fprintf(stderr, "fedrdma-delay: out of memory\n");
            return 1;
        }
        q->qh = nfq_create_queue(h, q->num, on_packet, q);
        if (!q->qh) {
            fprintf(stderr, "fedrdma-delay: cannot bind queue %u (%s): is another element using it?\n", num,
                    strerror(errno));
            return 1;
        }
        if (nfq_set_mode(q->qh, NFQNL_COPY_META, 0) < 0) {
            fprintf(stderr, "fedrdma-delay: metadata-only mode refused on queue %u\n", num);
            return 1;
        }
        if (nfq_set_queue_maxlen(q->qh, maxlen) < 0)
            fprintf(stderr, "fedrdma-delay: queue %u keeps the kernel's default maxlen\n", num);
        nqueues++;
    }
    if (nqueues == 0)
        usage();

    int fd = nfq_fd(h);
    nfnl_rcvbufsiz(nfq_nfnlh(h), (unsigned)rcvbuf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    int one = 1;
    setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    static char bufs[BATCH][SLOT];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    printf("ready\n");
    fflush(stdout);

    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (!stop) {
        int64_t wait = release_due(now_ns());
        struct timespec ts, *tsp = NULL;
        if (wait >= 0) {
            ts.tv_sec = wait / 1000000000;
            ts.tv_nsec = wait % 1000000000;
            tsp = &ts;
        }
        int pr = ppoll(&pfd, 1, tsp, NULL);
        if (pr < 0 && errno != EINTR) {
            perror("fedrdma-delay: ppoll");
            break;
        }
        if (pr <= 0)
            continue;
        /* Drain what is queued, releasing due packets between batches so a flood of
         * arrivals never postpones departures by more than one batch. */
        for (int rounds = 0; rounds < 64; rounds++) {
            int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0)
                break;
            now_cached = now_ns();
            for (i = 0; i < n; i++)
                nfq_handle_packet(h, bufs[i], (int)msgs[i].msg_len);
            release_due(now_cached);
            if (n < BATCH)
                break;
        }
    }

    for (i = 0; i < nqueues; i++) {
        struct queue *q = &queues[i];
        fprintf(stderr,
                "queue %u delay_us %llu packets %llu batches %llu overflow %llu max_held %llu max_late_us %llu\n",
                q->num, (unsigned long long)(q->delay_ns / 1000), (unsigned long long)q->packets,
                (unsigned long long)q->batches, (unsigned long long)q->overflow, (unsigned long long)q->max_held,
                (unsigned long long)(q->max_late_ns / 1000));
        /* Let held packets go rather than drop them when the lab is torn down mid-flow. */
        if (q->head != q->tail)
            nfq_set_verdict_batch(q->qh, q->ring[(q->tail - 1) & (RING - 1)].id, NF_ACCEPT);
        nfq_destroy_queue(q->qh);
    }
    nfq_close(h);
    return 0;
}
