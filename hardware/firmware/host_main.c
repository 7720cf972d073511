/* Host HAL of the rigfm reference firmware: runs the plain-C core (rigfm_proto.c) at 1 kHz on the Linux
 * monotonic clock over a pseudo-terminal, with a trivial simulated plant.
 *
 *   host_fw [--rig cartpole|furuta] [--uid HEX]            create a pty, print "PORT /dev/pts/N", serve it
 *   host_fw [--rig ...] --fd N                            serve an already open fd (e.g. an os.openpty() master)
 *   host_fw [--rig ...] --port PATH                       open a tty path and serve it
 *   host_fw --vectors                                     print the encoded test-vector frames as hex, exit
 *
 * Plant: channel 0 moves at 2000 counts/s per applied volt; channel 1 swings as a lightly damped
 * pendulum driven by channel-0 acceleration; current = applied / 2.6 ohm. SIGTERM/SIGINT: motor 0 V, exit 0.
 */
#ifndef ARDUINO /* the Arduino build compiles every .c of the sketch folder: skip this one */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "rigfm_proto.h"

#define LOOP_HZ 1000
#define PERIOD_NS (1000000000L / LOOP_HZ)

static volatile sig_atomic_t g_stop = 0;
static void on_signal(int sig) { (void)sig; g_stop = 1; }

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

typedef struct {
    int fd;
    unsigned long dropped;
} port_t;

static void port_write(void *ctx, const uint8_t *buf, size_t n)
{
    port_t *port = (port_t *)ctx;
    while (n) {
        ssize_t w = write(port->fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            port->dropped += n; /* nobody draining the pty: drop, like a UART into an unplugged cable */
            return;
        }
        buf += w;
        n -= (size_t)w;
    }
}

static void read_input(rigfm_dev_t *dev, int fd)
{
    uint8_t buf[256];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r <= 0)
            return; /* EAGAIN, EIO (no host attached) or EOF: nothing more to read now */
        rigfm_dev_rx(dev, buf, (size_t)r, mono_us());
    }
}

static void set_raw_nonblock(int fd)
{
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        tcsetattr(fd, TCSANOW, &t);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void hex_frame(const char *name, uint8_t type, uint16_t seq, const uint8_t *p, size_t len)
{
    uint8_t frame[RIGFM_MAX_WIRE];
    size_t n = rigfm_encode_frame(type, seq, p, len, frame);
    printf("%s ", name);
    for (size_t i = 0; i < n; i++)
        printf("%02x", frame[i]);
    printf("\n");
}

/* The fixed list of tests/test_firmware_fil.py::VECTORS (same order, same values). */
static int print_vectors(void)
{
    uint8_t p[32];
    rigfm_info_t info = {RIGFM_RIG_CARTPOLE, {1, 0, 0}, {4096, 4096}, 1000, 12.0f, 0x0123456789ABCDEFull};
    int32_t counts[2] = {100, -200};
    int32_t counts2[2] = {INT32_MIN, INT32_MAX};
    hex_frame("HELLO", RIGFM_HELLO, 0, p, 0);
    hex_frame("COMMAND", RIGFM_COMMAND, 1, p, rigfm_pack_command(p, 1.5f));
    hex_frame("COMMAND", RIGFM_COMMAND, 2, p, rigfm_pack_command(p, -12.25f));
    hex_frame("ESTOP", RIGFM_ESTOP, 3, p, 0);
    hex_frame("CLEAR_ESTOP", RIGFM_CLEAR_ESTOP, 4, p, 0);
    hex_frame("CONFIG", RIGFM_CONFIG, 5, p, rigfm_pack_config(p, 6.0f, 50, -4000, 4000, 2));
    hex_frame("HEARTBEAT", RIGFM_HEARTBEAT, 6, p, rigfm_pack_u32(p, 0xDEADBEEFu));
    hex_frame("HELLO_REPLY", RIGFM_HELLO_REPLY, 7, p, rigfm_pack_hello_reply(p, &info, 50));
    hex_frame("STATE", RIGFM_STATE, 8, p, rigfm_pack_state(p, 123456789012ull, counts, 150.0f, -2.5f, 0x0030));
    hex_frame("STATE", RIGFM_STATE, 256, p, rigfm_pack_state(p, 0, counts2, 0.0f, 0.0f, 0xFFFF));
    hex_frame("FAULT", RIGFM_FAULT, 9, p, rigfm_pack_fault(p, RIGFM_FAULT_LIMIT, -5000));
    hex_frame("ACK", RIGFM_ACK, 10, p, rigfm_pack_ack(p, 5, RIGFM_CONFIG));
    hex_frame("NACK", RIGFM_NACK, 0xFFFF, p, rigfm_pack_nack(p, 5, RIGFM_CONFIG, RIGFM_NACK_WATCHDOG_RANGE));
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: host_fw [--rig cartpole|furuta] [--uid HEX] [--fd N | --port PATH] | --vectors\n");
}

int main(int argc, char **argv)
{
    int fd = -1;
    const char *port_path = NULL;
    rigfm_info_t info = {RIGFM_RIG_CARTPOLE, {1, 0, 0}, {4096, 4096}, LOOP_HZ, 12.0f, 0x52494746000001ull};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--vectors"))
            return print_vectors();
        else if (!strcmp(argv[i], "--fd") && i + 1 < argc)
            fd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--port") && i + 1 < argc)
            port_path = argv[++i];
        else if (!strcmp(argv[i], "--uid") && i + 1 < argc)
            info.uid = strtoull(argv[++i], NULL, 16);
        else if (!strcmp(argv[i], "--rig") && i + 1 < argc) {
            const char *rig = argv[++i];
            if (!strcmp(rig, "cartpole")) {
                info.rig_kind = RIGFM_RIG_CARTPOLE;
                info.counts_per_rev[0] = 4096; /* cart motor pulley encoder */
                info.counts_per_rev[1] = 4096;
                info.max_voltage = 12.0f;
            } else if (!strcmp(rig, "furuta")) {
                info.rig_kind = RIGFM_RIG_FURUTA;
                info.counts_per_rev[0] = 2048; /* QUBE-Servo-like: 512 lines x4 */
                info.counts_per_rev[1] = 2048;
                info.max_voltage = 10.0f;
            } else {
                fprintf(stderr, "host_fw: unknown rig '%s' (expected cartpole or furuta)\n", rig);
                return 2;
            }
        } else {
            usage();
            return 2;
        }
    }
#ifdef __linux__
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the process that started us */
#endif
    if (fd < 0 && port_path) {
        fd = open(port_path, O_RDWR | O_NOCTTY);
        if (fd < 0) {
            fprintf(stderr, "host_fw: cannot open %s: %s\n", port_path, strerror(errno));
            return 1;
        }
    } else if (fd < 0) {
        fd = posix_openpt(O_RDWR | O_NOCTTY);
        if (fd < 0 || grantpt(fd) || unlockpt(fd)) {
            fprintf(stderr, "host_fw: cannot create a pty: %s\n", strerror(errno));
            return 1;
        }
        int slave = open(ptsname(fd), O_RDWR | O_NOCTTY); /* set the slave raw before the host opens it */
        if (slave >= 0) {
            set_raw_nonblock(slave);
        }
        printf("PORT %s\n", ptsname(fd));
        fflush(stdout);
        /* keep `slave` open: no EIO on the master while no host is connected */
    }
    set_raw_nonblock(fd);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    port_t port = {fd, 0};
    rigfm_dev_t dev;
    rigfm_dev_init(&dev, &info, port_write, &port);

    double pos = 0.0, vel = 0.0, alpha = 0.3, alpha_dot = 0.0; /* plant: counts, rad */
    const double dt = 1.0 / LOOP_HZ;
    float applied = 0.0f;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (!g_stop) {
        next.tv_nsec += PERIOD_NS;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        /* until the tick is due, service RX as it arrives (like loop() on the Arduino): low command latency */
        for (;;) {
            struct timespec now_ts, wait;
            clock_gettime(CLOCK_MONOTONIC, &now_ts);
            long long left = (long long)(next.tv_sec - now_ts.tv_sec) * 1000000000LL
                             + (next.tv_nsec - now_ts.tv_nsec);
            if (left <= 0 || g_stop)
                break;
            wait.tv_sec = (time_t)(left / 1000000000LL);
            wait.tv_nsec = (long)(left % 1000000000LL);
            struct pollfd pfd = {fd, POLLIN, 0};
            int r = ppoll(&pfd, 1, &wait, NULL);
            if (r > 0 && (pfd.revents & POLLIN))
                read_input(&dev, fd);
            else if (r > 0) /* POLLHUP/POLLERR: no host attached; do not spin */
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        }
        read_input(&dev, fd);
        uint64_t now = mono_us();
        uint64_t deadline = (uint64_t)next.tv_sec * 1000000u + (uint64_t)next.tv_nsec / 1000u;
        int overrun = now > deadline + PERIOD_NS / 1000;
        if (overrun) /* far behind (descheduled): skip the missed ticks instead of bursting */
            clock_gettime(CLOCK_MONOTONIC, &next);
        /* plant (explicit Euler): cart/arm velocity follows the applied voltage with a 20 ms lag */
        double target_vel = 2000.0 * applied;
        double acc = (target_vel - vel) / 0.02;
        vel += acc * dt;
        pos += vel * dt;
        double accel_rad = acc * (2.0 * M_PI / info.counts_per_rev[0]) * 0.05;
        alpha_dot += (-(9.81 / 0.3) * sin(alpha) - 0.2 * alpha_dot - accel_rad * cos(alpha)) * dt;
        alpha += alpha_dot * dt;
        int32_t counts[2];
        counts[0] = (int32_t)llround(pos);
        counts[1] = (int32_t)llround((M_PI + alpha) * info.counts_per_rev[1] / (2.0 * M_PI)); /* hanging */
        applied = rigfm_dev_tick(&dev, now, counts, applied / 2.6f * 1000.0f, 0, overrun);
    }
    applied = 0.0f; /* safety: motor to 0 V on exit */
    fprintf(stderr, "host_fw: stopped (rx ok %lu, rx bad %lu, tx dropped %lu bytes)\n",
            (unsigned long)dev.rx_frames_ok, (unsigned long)dev.rx_frames_bad, port.dropped);
    close(fd);
    return 0;
}
#endif /* ARDUINO */
