/* Deterministic unit tests of the plain-C protocol core on a virtual clock (no OS timing involved).
 * Build: make test_core BUILD=dir; run: dir/test_core (exit 0 and "test_core: all N checks passed"). */
#ifndef ARDUINO /* host-only: the Arduino build compiles every .c of the sketch folder */
#include <stdio.h>
#include <string.h>

#include "rigfm_proto.h"

static int g_checks, g_failed;
#define CHECK(cond)                                                                  \
    do {                                                                             \
        g_checks++;                                                                  \
        if (!(cond)) {                                                               \
            g_failed++;                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

/* captured device output, decoded */
typedef struct {
    uint8_t type;
    uint16_t seq;
    uint8_t payload[RIGFM_MAX_PAYLOAD];
    int len;
} msg_t;
static msg_t g_out[256];
static int g_nout;
static uint8_t g_acc[RIGFM_MAX_FRAME];
static size_t g_acc_len;

static void capture(void *ctx, const uint8_t *buf, size_t n)
{
    (void)ctx;
    for (size_t i = 0; i < n; i++) {
        if (buf[i] != 0) {
            if (g_acc_len < sizeof g_acc)
                g_acc[g_acc_len++] = buf[i];
            continue;
        }
        uint8_t inner[RIGFM_MAX_FRAME];
        size_t n_frame = g_acc_len;
        int len = g_acc_len ? rigfm_check_frame(g_acc, g_acc_len, inner, sizeof inner) : -2;
        g_acc_len = 0;
        if (len == -2 || g_nout >= 256)
            continue;
        CHECK(len >= (int)RIGFM_HEADER_SIZE); /* the device only sends valid frames */
        if (len < (int)RIGFM_HEADER_SIZE)
            continue;
        CHECK(inner[0] == RIGFM_PROTOCOL_VERSION && n_frame == RIGFM_FRAME_LEN((size_t)len - RIGFM_HEADER_SIZE));
        msg_t *m = &g_out[g_nout++];
        m->type = inner[1];
        m->seq = rigfm_get_u16(inner + 2);
        m->len = len - (int)RIGFM_HEADER_SIZE;
        memcpy(m->payload, inner + 4, (size_t)m->len);
    }
}

static rigfm_dev_t dev;
static uint16_t host_seq;
static int32_t counts[2];

static uint16_t host_send(uint8_t type, const uint8_t *p, size_t len, uint64_t now)
{
    uint8_t frame[RIGFM_MAX_WIRE];
    size_t n = rigfm_encode_frame(type, host_seq, p, len, frame);
    for (size_t i = 0; i < n; i++) /* byte by byte: chunking must not matter */
        rigfm_dev_rx(&dev, frame + i, 1, now);
    return host_seq++;
}

static const msg_t *last_of(uint8_t type)
{
    for (int i = g_nout - 1; i >= 0; i--)
        if (g_out[i].type == type)
            return &g_out[i];
    return NULL;
}

static int count_of(uint8_t type)
{
    int c = 0;
    for (int i = 0; i < g_nout; i++)
        c += g_out[i].type == type;
    return c;
}

static uint16_t state_flags(void) { return rigfm_get_u16(last_of(RIGFM_STATE)->payload + 24); }

static int is_ack(uint16_t seq, uint8_t type)
{
    const msg_t *m = &g_out[g_nout - 1];
    return m->type == RIGFM_ACK && rigfm_get_u16(m->payload) == seq && m->payload[2] == type;
}

static int nack_reason(uint16_t seq)
{
    const msg_t *m = last_of(RIGFM_NACK);
    return (m && rigfm_get_u16(m->payload) == seq) ? m->payload[3] : -1;
}

static void test_crc_cobs(void)
{
    CHECK(rigfm_crc16((const uint8_t *)"123456789", 9) == 0x29B1);
    uint8_t in[600], enc[620], dec[600];
    for (size_t n = 0; n < sizeof in; n += 37) {
        for (size_t i = 0; i < n; i++)
            in[i] = (uint8_t)((i * 7 + n) % 5 == 0 ? 0 : 1 + (i % 255));
        size_t e = rigfm_cobs_encode(in, n, enc);
        CHECK(memchr(enc, 0, e) == NULL);
        int d = rigfm_cobs_decode(enc, e, dec, sizeof dec);
        CHECK(d == (int)n && memcmp(in, dec, n) == 0);
    }
    memset(in, 0xAB, 300); /* runs longer than 254 */
    size_t e = rigfm_cobs_encode(in, 300, enc);
    CHECK(e == 302 && enc[0] == 0xFF);
    CHECK(rigfm_cobs_decode(enc, e, dec, sizeof dec) == 300);
    const uint8_t bad[] = {5, 1, 2};
    CHECK(rigfm_cobs_decode(bad, sizeof bad, dec, sizeof dec) == -1);
    CHECK(rigfm_cobs_decode(enc, e, dec, 10) == -1); /* output overflow */
}

/* Payload length per message type (docs/protocol.md section 3), -1 for unknown types. */
static int payload_len(uint8_t type)
{
    switch (type) {
    case RIGFM_HELLO: case RIGFM_ESTOP: case RIGFM_CLEAR_ESTOP: return 0;
    case RIGFM_COMMAND: case RIGFM_HEARTBEAT: case RIGFM_NACK: return 4;
    case RIGFM_CONFIG: return 16;
    case RIGFM_HELLO_REPLY: return 29;
    case RIGFM_STATE: return 26;
    case RIGFM_FAULT: return 6;
    case RIGFM_ACK: return 3;
    default: return -1;
    }
}

/* Whether a receiver following docs/protocol.md would accept this frame (bytes without the 0x00). */
static int accepted(const uint8_t *frame, size_t n)
{
    uint8_t inner[RIGFM_MAX_FRAME];
    if (n == 0 || n > RIGFM_MAX_FRAME)
        return 0;
    int len = rigfm_check_frame(frame, n, inner, sizeof inner);
    if (len < (int)RIGFM_HEADER_SIZE || inner[0] != RIGFM_PROTOCOL_VERSION)
        return 0;
    int want = payload_len(inner[1]);
    return want >= 0 && len - (int)RIGFM_HEADER_SIZE == want && n == RIGFM_FRAME_LEN((size_t)want);
}

/* Every position x every other byte value of one frame of each type: all parts rejected (v2 guarantee). */
static void test_single_byte_corruption_exhaustive(void)
{
    static const uint8_t types[] = {RIGFM_HELLO, RIGFM_COMMAND, RIGFM_ESTOP, RIGFM_CLEAR_ESTOP, RIGFM_CONFIG,
                                    RIGFM_HEARTBEAT, RIGFM_HELLO_REPLY, RIGFM_STATE, RIGFM_FAULT, RIGFM_ACK,
                                    RIGFM_NACK};
    uint8_t p[32], frame[RIGFM_MAX_WIRE], merged[2 * RIGFM_MAX_WIRE];
    long missed = 0, checked = 0;
    for (size_t ti = 0; ti < sizeof types; ti++) {
        for (int fill = 0; fill < 3; fill++) { /* zero-heavy, 0xFF-heavy, mixed payloads */
            int plen = payload_len(types[ti]);
            for (int i = 0; i < plen; i++)
                p[i] = (uint8_t)(fill == 0 ? (i % 3 == 0 ? 7 : 0) : fill == 1 ? 0xFF : (i * 37 + 11));
            size_t n = rigfm_encode_frame(types[ti], (uint16_t)(fill * 0x0100), p, (size_t)plen, frame) - 1;
            CHECK(accepted(frame, n));
            for (size_t pos = 0; pos < n; pos++) {
                uint8_t orig = frame[pos];
                for (int v = 0; v < 256; v++) {
                    if (v == orig)
                        continue;
                    frame[pos] = (uint8_t)v;
                    checked++;
                    if (v == 0) /* the frame splits in two: both parts must be rejected */
                        missed += accepted(frame, pos) || accepted(frame + pos + 1, n - pos - 1);
                    else
                        missed += accepted(frame, n);
                }
                frame[pos] = orig;
            }
            /* a lost delimiter merges this frame with the next one: rejected by the length field */
            memcpy(merged, frame, n);
            memcpy(merged + n, frame, n);
            CHECK(!accepted(merged, 2 * n));
        }
    }
    CHECK(checked > 50000);
    CHECK(missed == 0);
}

static float tick(uint64_t t) { return rigfm_dev_tick(&dev, t, counts, 0.0f, 0, 0); }

int main(void)
{
    uint8_t p[32];
    uint64_t t = 0;
    rigfm_info_t info = {RIGFM_RIG_FURUTA, {1, 2, 3}, {2048, 2048}, 1000, 10.0f, 42};
    test_crc_cobs();
    test_single_byte_corruption_exhaustive();
    rigfm_dev_init(&dev, &info, capture, NULL);

    /* before HELLO: no STATE, requests NACKed, motor 0 */
    uint16_t s = host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, 3.0f), t);
    CHECK(nack_reason(s) == RIGFM_NACK_NOT_CONNECTED);
    CHECK(tick(t += 1000) == 0.0f && count_of(RIGFM_STATE) == 0);

    host_send(RIGFM_HELLO, p, 0, t);
    const msg_t *hr = last_of(RIGFM_HELLO_REPLY);
    CHECK(hr && hr->len == 29 && hr->payload[1] == RIGFM_RIG_FURUTA && rigfm_get_u16(hr->payload + 19) == 50);
    tick(t += 1000);
    CHECK(count_of(RIGFM_STATE) == 1 && (state_flags() & RIGFM_F_CONNECTED));

    /* watchdog: COMMAND at t0; applied until t0 + 50 ms, 0 V at the first tick after */
    uint64_t t0 = t;
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, 3.0f), t0);
    for (t = t0 + 1000; t <= t0 + 50000; t += 1000)
        CHECK(tick(t) == 3.0f);
    CHECK(state_flags() & RIGFM_F_MOTOR_ENABLED);
    CHECK(tick(t) == 0.0f); /* t0 + 51 ms */
    CHECK(state_flags() & RIGFM_F_WATCHDOG_TRIPPED);
    CHECK(!(state_flags() & RIGFM_F_MOTOR_ENABLED));
    const msg_t *f = last_of(RIGFM_FAULT);
    CHECK(f && rigfm_get_u16(f->payload) == RIGFM_FAULT_WATCHDOG && (int32_t)rigfm_get_u32(f->payload + 2) == 51);
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, -2.0f), t);
    CHECK(tick(t += 1000) == -2.0f && !(state_flags() & RIGFM_F_WATCHDOG_TRIPPED));

    /* e-stop latch: commands ignored until CLEAR_ESTOP, then 0 V until the next COMMAND */
    s = host_send(RIGFM_ESTOP, p, 0, t);
    CHECK(is_ack(s, RIGFM_ESTOP));
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, 5.0f), t);
    CHECK(tick(t += 1000) == 0.0f && (state_flags() & RIGFM_F_ESTOP_LATCHED));
    s = host_send(RIGFM_CLEAR_ESTOP, p, 0, t);
    CHECK(is_ack(s, RIGFM_CLEAR_ESTOP));
    CHECK(tick(t += 1000) == 0.0f && !(state_flags() & RIGFM_F_ESTOP_LATCHED));
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, 5.0f), t);
    CHECK(tick(t += 1000) == 5.0f);
    /* e-stop input: latches, CLEAR refused while held */
    CHECK(rigfm_dev_tick(&dev, t += 1000, counts, 0.0f, 1, 0) == 0.0f);
    CHECK(state_flags() & RIGFM_F_ESTOP_INPUT);
    s = host_send(RIGFM_CLEAR_ESTOP, p, 0, t);
    CHECK(nack_reason(s) == RIGFM_NACK_ESTOP_INPUT_ACTIVE);
    rigfm_dev_tick(&dev, t += 1000, counts, 0.0f, 0, 0);
    s = host_send(RIGFM_CLEAR_ESTOP, p, 0, t);
    CHECK(is_ack(s, RIGFM_CLEAR_ESTOP));

    /* CONFIG validation and clamping */
    s = host_send(RIGFM_CONFIG, p, rigfm_pack_config(p, 10.5f, 50, -10, 10, 1), t);
    CHECK(nack_reason(s) == RIGFM_NACK_VOLTAGE_LIMIT_RANGE);
    s = host_send(RIGFM_CONFIG, p, rigfm_pack_config(p, 4.0f, 4, -10, 10, 1), t);
    CHECK(nack_reason(s) == RIGFM_NACK_WATCHDOG_RANGE);
    s = host_send(RIGFM_CONFIG, p, rigfm_pack_config(p, 4.0f, 50, 10, 10, 1), t);
    CHECK(nack_reason(s) == RIGFM_NACK_POSITION_LIMITS);
    s = host_send(RIGFM_CONFIG, p, rigfm_pack_config(p, 4.0f, 50, -10, 10, 1001), t);
    CHECK(nack_reason(s) == RIGFM_NACK_DIVIDER_RANGE);
    CHECK(dev.voltage_limit == 10.0f && !dev.configured); /* nothing applied */
    s = host_send(RIGFM_CONFIG, p, rigfm_pack_config(p, 4.0f, 20, -100, 100, 1), t);
    CHECK(is_ack(s, RIGFM_CONFIG));
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, 9.0f), t);
    CHECK(tick(t += 1000) == 4.0f && (state_flags() & RIGFM_F_VOLTAGE_CLAMPED));

    /* limits: outward voltage zeroed, inward allowed, FAULT(LIMIT) once */
    int faults_before = count_of(RIGFM_FAULT);
    counts[0] = 101;
    CHECK(tick(t += 1000) == 0.0f && (state_flags() & RIGFM_F_LIMIT_HIT));
    CHECK(tick(t += 1000) == 0.0f && count_of(RIGFM_FAULT) == faults_before + 1);
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, -1.0f), t);
    CHECK(tick(t += 1000) == -1.0f);
    counts[0] = -101;
    CHECK(tick(t += 1000) == 0.0f);
    counts[0] = 0;
    CHECK(tick(t += 1000) == -1.0f && !(state_flags() & RIGFM_F_LIMIT_HIT));

    /* non-finite command: NACK + FAULT, motor 0 */
    float nan = 0.0f / 0.0f;
    s = host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, nan), t);
    CHECK(nack_reason(s) == RIGFM_NACK_NOT_FINITE);
    CHECK(tick(t += 1000) == 0.0f);

    /* latching HAL fault */
    host_send(RIGFM_COMMAND, p, rigfm_pack_command(p, 1.0f), t);
    rigfm_dev_fault(&dev, RIGFM_FAULT_ENCODER, 1, 1);
    CHECK(tick(t += 1000) == 0.0f && (state_flags() & RIGFM_F_FAULT));

    /* heartbeat echo; corrupted frame flagged; device->host type NACKed */
    host_send(RIGFM_HEARTBEAT, p, rigfm_pack_u32(p, 0x1234), t);
    CHECK(last_of(RIGFM_HEARTBEAT) && rigfm_get_u32(last_of(RIGFM_HEARTBEAT)->payload) == 0x1234);
    uint8_t frame[RIGFM_MAX_WIRE];
    size_t n = rigfm_encode_frame(RIGFM_COMMAND, 9, p, rigfm_pack_command(p, 1.0f), frame);
    frame[3] ^= 0x20;
    rigfm_dev_rx(&dev, frame, n, t);
    tick(t += 1000);
    CHECK(state_flags() & RIGFM_F_RX_ERROR);
    tick(t += 1000);
    CHECK(!(state_flags() & RIGFM_F_RX_ERROR));
    s = host_send(RIGFM_STATE, p, 26, t);
    CHECK(nack_reason(s) == RIGFM_NACK_UNKNOWN_TYPE);
    s = host_send(RIGFM_COMMAND, p, 3, t);
    CHECK(nack_reason(s) == RIGFM_NACK_BAD_LENGTH);

    /* device seq increments by one per frame */
    for (int i = 1; i < g_nout; i++)
        CHECK(g_out[i].seq == (uint16_t)(g_out[i - 1].seq + 1));

    if (g_failed) {
        fprintf(stderr, "test_core: %d of %d checks FAILED\n", g_failed, g_checks);
        return 1;
    }
    printf("test_core: all %d checks passed\n", g_checks);
    return 0;
}
#endif /* ARDUINO */
