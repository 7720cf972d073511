/* rigfm serial protocol v2 + firmware state machine (plain C99, no Arduino / OS dependencies). */
#include "rigfm_proto.h"

#include <string.h>

/* ------------------------------------------------------------------ CRC, COBS, packing */
uint16_t rigfm_crc16(const uint8_t *data, size_t n)
{
    uint16_t crc = 0xFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)((uint16_t)data[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
    }
    return crc;
}

size_t rigfm_cobs_encode(const uint8_t *in, size_t n, uint8_t *out)
{
    size_t code_pos = 0, o = 1;
    uint8_t code = 1;
    for (size_t i = 0; i < n; i++) {
        if (in[i] == 0) {
            out[code_pos] = code;
            code_pos = o++;
            code = 1;
        } else {
            out[o++] = in[i];
            if (++code == 0xFFu) {
                out[code_pos] = code;
                code_pos = o++;
                code = 1;
            }
        }
    }
    out[code_pos] = code;
    return o;
}

int rigfm_cobs_decode(const uint8_t *in, size_t n, uint8_t *out, size_t out_cap)
{
    size_t i = 0, o = 0;
    while (i < n) {
        uint8_t code = in[i++];
        if (code == 0)
            return -1;
        for (uint8_t k = 1; k < code; k++) {
            if (i >= n || in[i] == 0 || o >= out_cap)
                return -1;
            out[o++] = in[i++];
        }
        if (code != 0xFFu && i < n) {
            if (o >= out_cap)
                return -1;
            out[o++] = 0;
        }
    }
    return (int)o;
}

void rigfm_put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
void rigfm_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
void rigfm_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
void rigfm_put_f32(uint8_t *p, float v)
{
    uint32_t u;
    memcpy(&u, &v, 4); /* IEEE-754 binary32 on every supported target (AVR, ARM, x86) */
    rigfm_put_u32(p, u);
}
uint16_t rigfm_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | ((uint16_t)p[1] << 8)); }
uint32_t rigfm_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
float rigfm_get_f32(const uint8_t *p)
{
    uint32_t u = rigfm_get_u32(p);
    float v;
    memcpy(&v, &u, 4);
    return v;
}
static int f32_finite(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    return (u & 0x7F800000u) != 0x7F800000u;
}

void rigfm_trailer(const uint8_t *cobs, size_t n, uint8_t out[3])
{
    uint32_t t = ((uint32_t)rigfm_crc16(cobs, n) << 5)
                 | (uint32_t)((n + RIGFM_TRAILER_SIZE) & (RIGFM_LENGTH_MODULO - 1u));
    out[0] = (uint8_t)(0x80u | (t >> 14));
    out[1] = (uint8_t)(0x80u | ((t >> 7) & 0x7Fu));
    out[2] = (uint8_t)(0x80u | (t & 0x7Fu));
}

size_t rigfm_encode_frame(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out)
{
    uint8_t inner[RIGFM_MAX_INNER];
    if (len > RIGFM_MAX_PAYLOAD)
        return 0;
    inner[0] = RIGFM_PROTOCOL_VERSION;
    inner[1] = type;
    rigfm_put_u16(inner + 2, seq);
    if (len)
        memcpy(inner + RIGFM_HEADER_SIZE, payload, len);
    size_t n = rigfm_cobs_encode(inner, RIGFM_HEADER_SIZE + len, out);
    rigfm_trailer(out, n, out + n);
    n += RIGFM_TRAILER_SIZE;
    out[n++] = 0;
    return n;
}

int rigfm_check_frame(const uint8_t *frame, size_t n, uint8_t *inner, size_t inner_cap)
{
    if (n < RIGFM_MIN_FRAME)
        return -1;
    const uint8_t *tr = frame + n - RIGFM_TRAILER_SIZE;
    if (!(tr[0] & tr[1] & tr[2] & 0x80u))
        return -1; /* not a trailer pattern */
    uint32_t t = ((uint32_t)(tr[0] & 0x7Fu) << 14) | ((uint32_t)(tr[1] & 0x7Fu) << 7) | (uint32_t)(tr[2] & 0x7Fu);
    if (((t ^ (uint32_t)n) & (RIGFM_LENGTH_MODULO - 1u)) != 0)
        return -1; /* length field: a frame split by a 0x00 or two frames merged */
    if (rigfm_crc16(frame, n - RIGFM_TRAILER_SIZE) != (uint16_t)(t >> 5))
        return -1;
    return rigfm_cobs_decode(frame, n - RIGFM_TRAILER_SIZE, inner, inner_cap);
}

/* ------------------------------------------------------------------ payload builders */
size_t rigfm_pack_hello_reply(uint8_t *p, const rigfm_info_t *info, uint16_t watchdog_ms)
{
    p[0] = RIGFM_PROTOCOL_VERSION;
    p[1] = info->rig_kind;
    p[2] = info->fw_version[0];
    p[3] = info->fw_version[1];
    p[4] = info->fw_version[2];
    rigfm_put_u32(p + 5, info->counts_per_rev[0]);
    rigfm_put_u32(p + 9, info->counts_per_rev[1]);
    rigfm_put_u16(p + 13, info->loop_rate_hz);
    rigfm_put_f32(p + 15, info->max_voltage);
    rigfm_put_u16(p + 19, watchdog_ms);
    rigfm_put_u64(p + 21, info->uid);
    return 29;
}

size_t rigfm_pack_state(uint8_t *p, uint64_t t_us, const int32_t counts[2], float current_ma, float applied,
                        uint16_t flags)
{
    rigfm_put_u64(p, t_us);
    rigfm_put_u32(p + 8, (uint32_t)counts[0]);
    rigfm_put_u32(p + 12, (uint32_t)counts[1]);
    rigfm_put_f32(p + 16, current_ma);
    rigfm_put_f32(p + 20, applied);
    rigfm_put_u16(p + 24, flags);
    return 26;
}

size_t rigfm_pack_command(uint8_t *p, float voltage)
{
    rigfm_put_f32(p, voltage);
    return 4;
}

size_t rigfm_pack_config(uint8_t *p, float vlimit, uint16_t watchdog_ms, int32_t pos_min, int32_t pos_max,
                         uint16_t divider)
{
    rigfm_put_f32(p, vlimit);
    rigfm_put_u16(p + 4, watchdog_ms);
    rigfm_put_u32(p + 6, (uint32_t)pos_min);
    rigfm_put_u32(p + 10, (uint32_t)pos_max);
    rigfm_put_u16(p + 14, divider);
    return 16;
}

size_t rigfm_pack_u32(uint8_t *p, uint32_t token)
{
    rigfm_put_u32(p, token);
    return 4;
}

size_t rigfm_pack_fault(uint8_t *p, uint16_t code, int32_t detail)
{
    rigfm_put_u16(p, code);
    rigfm_put_u32(p + 2, (uint32_t)detail);
    return 6;
}

size_t rigfm_pack_ack(uint8_t *p, uint16_t seq, uint8_t type)
{
    rigfm_put_u16(p, seq);
    p[2] = type;
    return 3;
}

size_t rigfm_pack_nack(uint8_t *p, uint16_t seq, uint8_t type, uint8_t reason)
{
    rigfm_pack_ack(p, seq, type);
    p[3] = reason;
    return 4;
}

/* ------------------------------------------------------------------ device state machine */
static void dev_send(rigfm_dev_t *dev, uint8_t type, const uint8_t *payload, size_t len)
{
    uint8_t frame[RIGFM_MAX_WIRE];
    size_t n = rigfm_encode_frame(type, dev->tx_seq, payload, len, frame);
    dev->tx_seq = (uint16_t)(dev->tx_seq + 1u);
    if (n && dev->write)
        dev->write(dev->write_ctx, frame, n);
}

static void send_fault(rigfm_dev_t *dev, uint16_t code, int32_t detail)
{
    uint8_t p[8];
    if (dev->connected)
        dev_send(dev, RIGFM_FAULT, p, rigfm_pack_fault(p, code, detail));
}

static void send_ack(rigfm_dev_t *dev, uint16_t seq, uint8_t type)
{
    uint8_t p[4];
    dev_send(dev, RIGFM_ACK, p, rigfm_pack_ack(p, seq, type));
}

static void send_nack(rigfm_dev_t *dev, uint16_t seq, uint8_t type, uint8_t reason)
{
    uint8_t p[4];
    dev_send(dev, RIGFM_NACK, p, rigfm_pack_nack(p, seq, type, reason));
}

static void set_defaults(rigfm_dev_t *dev)
{
    dev->voltage_limit = dev->info.max_voltage;
    dev->watchdog_ms = RIGFM_WATCHDOG_MS_DEFAULT;
    dev->pos_min = INT32_MIN;
    dev->pos_max = INT32_MAX;
    dev->state_divider = 1;
    dev->configured = 0;
}

void rigfm_dev_init(rigfm_dev_t *dev, const rigfm_info_t *info, rigfm_write_fn write, void *ctx)
{
    memset(dev, 0, sizeof(*dev));
    dev->info = *info;
    dev->write = write;
    dev->write_ctx = ctx;
    set_defaults(dev);
    if (write) {
        static const uint8_t zero = 0;
        write(ctx, &zero, 1); /* boot: flush whatever partial frame the host may hold */
    }
}

uint16_t rigfm_dev_flags(const rigfm_dev_t *dev)
{
    uint16_t f = 0;
    if (dev->estop) f |= RIGFM_F_ESTOP_LATCHED;
    if (dev->wd_tripped) f |= RIGFM_F_WATCHDOG_TRIPPED;
    if (dev->limit_hit) f |= RIGFM_F_LIMIT_HIT;
    if (dev->fault_latched) f |= RIGFM_F_FAULT;
    if (dev->connected && !dev->estop && !dev->fault_latched && dev->have_cmd) f |= RIGFM_F_MOTOR_ENABLED;
    if (dev->connected) f |= RIGFM_F_CONNECTED;
    if (dev->have_cmd && (dev->cmd_voltage > dev->voltage_limit || dev->cmd_voltage < -dev->voltage_limit))
        f |= RIGFM_F_VOLTAGE_CLAMPED;
    if (dev->overrun) f |= RIGFM_F_LOOP_OVERRUN;
    if (dev->rx_error) f |= RIGFM_F_RX_ERROR;
    if (dev->configured) f |= RIGFM_F_CONFIGURED;
    if (dev->estop_input) f |= RIGFM_F_ESTOP_INPUT;
    return f;
}

static uint8_t handle_config(rigfm_dev_t *dev, const uint8_t *p)
{
    float vlimit = rigfm_get_f32(p);
    uint16_t wd = rigfm_get_u16(p + 4);
    int32_t pmin = (int32_t)rigfm_get_u32(p + 6);
    int32_t pmax = (int32_t)rigfm_get_u32(p + 10);
    uint16_t div = rigfm_get_u16(p + 14);
    if (!f32_finite(vlimit))
        return RIGFM_NACK_NOT_FINITE;
    if (!(vlimit > 0.0f) || vlimit > dev->info.max_voltage)
        return RIGFM_NACK_VOLTAGE_LIMIT_RANGE;
    if (wd < RIGFM_WATCHDOG_MS_MIN || wd > RIGFM_WATCHDOG_MS_MAX)
        return RIGFM_NACK_WATCHDOG_RANGE;
    if (pmin >= pmax)
        return RIGFM_NACK_POSITION_LIMITS;
    if (div < 1 || div > RIGFM_STATE_DIVIDER_MAX)
        return RIGFM_NACK_DIVIDER_RANGE;
    dev->voltage_limit = vlimit;
    dev->watchdog_ms = wd;
    dev->pos_min = pmin;
    dev->pos_max = pmax;
    dev->state_divider = div;
    dev->configured = 1;
    return 0;
}

static int expected_len(uint8_t type)
{
    switch (type) {
    case RIGFM_HELLO: case RIGFM_ESTOP: case RIGFM_CLEAR_ESTOP: return 0;
    case RIGFM_COMMAND: case RIGFM_HEARTBEAT: return 4;
    case RIGFM_CONFIG: return 16;
    default: return -1; /* unknown, or a device->host type */
    }
}

static void handle_frame(rigfm_dev_t *dev, const uint8_t *frame, size_t n)
{
    uint8_t inner[RIGFM_MAX_FRAME];
    int len = rigfm_check_frame(frame, n, inner, sizeof inner);
    if (len < (int)RIGFM_HEADER_SIZE) {
        dev->rx_error = 1;
        dev->rx_frames_bad++;
        return;
    }
    uint8_t type = inner[1];
    uint16_t seq = rigfm_get_u16(inner + 2);
    const uint8_t *p = inner + RIGFM_HEADER_SIZE;
    int plen = len - (int)RIGFM_HEADER_SIZE;
    int want = expected_len(type);
    if (inner[0] != RIGFM_PROTOCOL_VERSION) {
        dev->rx_frames_bad++;
        send_nack(dev, seq, type, RIGFM_NACK_VERSION_MISMATCH);
        return;
    }
    if (want < 0) {
        dev->rx_frames_bad++;
        send_nack(dev, seq, type, RIGFM_NACK_UNKNOWN_TYPE);
        return;
    }
    if (plen != want || n != RIGFM_FRAME_LEN((size_t)want)) {
        dev->rx_frames_bad++;
        send_nack(dev, seq, type, RIGFM_NACK_BAD_LENGTH);
        return;
    }
    dev->rx_frames_ok++;
    if (type == RIGFM_HELLO) {
        uint8_t r[32];
        dev->connected = 1;
        dev->have_cmd = 0;
        dev->cmd_voltage = 0.0f;
        dev->wd_tripped = 0;
        dev->tick_count = 0;
        set_defaults(dev);
        dev_send(dev, RIGFM_HELLO_REPLY, r, rigfm_pack_hello_reply(r, &dev->info, dev->watchdog_ms));
        return;
    }
    if (type == RIGFM_HEARTBEAT) {
        dev_send(dev, RIGFM_HEARTBEAT, p, 4); /* echo the token */
        return;
    }
    if (!dev->connected) {
        send_nack(dev, seq, type, RIGFM_NACK_NOT_CONNECTED);
        return;
    }
    switch (type) {
    case RIGFM_COMMAND: {
        float v = rigfm_get_f32(p);
        if (!f32_finite(v)) {
            dev->have_cmd = 0;
            dev->cmd_voltage = 0.0f;
            send_nack(dev, seq, type, RIGFM_NACK_NOT_FINITE);
            send_fault(dev, RIGFM_FAULT_BAD_COMMAND, 0);
            return;
        }
        dev->cmd_voltage = v;
        dev->have_cmd = 1;
        dev->wd_tripped = 0;
        dev->last_cmd_us = dev->now_us;
        return;
    }
    case RIGFM_ESTOP:
        if (!dev->estop) {
            dev->estop = 1;
            send_fault(dev, RIGFM_FAULT_ESTOP, 0);
        }
        send_ack(dev, seq, type);
        return;
    case RIGFM_CLEAR_ESTOP:
        if (dev->estop_input) {
            send_nack(dev, seq, type, RIGFM_NACK_ESTOP_INPUT_ACTIVE);
            return;
        }
        dev->estop = 0;
        dev->fault_latched = 0;
        dev->have_cmd = 0; /* motor stays at 0 V until the next COMMAND */
        dev->cmd_voltage = 0.0f;
        send_ack(dev, seq, type);
        return;
    case RIGFM_CONFIG: {
        uint8_t reason = handle_config(dev, p);
        if (reason)
            send_nack(dev, seq, type, reason);
        else
            send_ack(dev, seq, type);
        return;
    }
    default:
        return;
    }
}

void rigfm_dev_rx(rigfm_dev_t *dev, const uint8_t *data, size_t n, uint64_t now_us)
{
    dev->now_us = now_us;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = data[i];
        if (b == 0) {
            if (!dev->rx_discard && dev->rx_len)
                handle_frame(dev, dev->rx_buf, dev->rx_len);
            dev->rx_len = 0;
            dev->rx_discard = 0;
        } else if (!dev->rx_discard) {
            if (dev->rx_len < RIGFM_MAX_FRAME) {
                dev->rx_buf[dev->rx_len++] = b;
            } else {
                dev->rx_discard = 1; /* over-long: drop until the next delimiter */
                dev->rx_error = 1;
                dev->rx_frames_bad++;
                send_fault(dev, RIGFM_FAULT_RX_OVERFLOW, (int32_t)dev->rx_len + 1);
            }
        }
    }
}

void rigfm_dev_fault(rigfm_dev_t *dev, uint16_t code, int32_t detail, int latching)
{
    if (latching)
        dev->fault_latched = 1;
    send_fault(dev, code, detail);
}

float rigfm_dev_tick(rigfm_dev_t *dev, uint64_t now_us, const int32_t counts[2], float current_ma,
                     int estop_input, int loop_overrun)
{
    dev->now_us = now_us;
    if (loop_overrun)
        dev->overrun = 1;
    dev->estop_input = estop_input ? 1 : 0;
    if (dev->estop_input && !dev->estop) {
        dev->estop = 1;
        send_fault(dev, RIGFM_FAULT_ESTOP, 1);
    }
    /* watchdog: no COMMAND for watchdog_ms -> 0 V until the next COMMAND */
    if (dev->have_cmd && now_us > dev->last_cmd_us
        && now_us - dev->last_cmd_us > (uint64_t)dev->watchdog_ms * 1000u) {
        dev->have_cmd = 0;
        dev->wd_tripped = 1;
        send_fault(dev, RIGFM_FAULT_WATCHDOG, (int32_t)((now_us - dev->last_cmd_us) / 1000u));
    }
    float v = dev->have_cmd ? dev->cmd_voltage : 0.0f;
    if (!dev->connected || dev->estop || dev->fault_latched)
        v = 0.0f;
    if (v > dev->voltage_limit)
        v = dev->voltage_limit;
    if (v < -dev->voltage_limit)
        v = -dev->voltage_limit;
    /* position limits on channel 0: zero any voltage that drives further out */
    int below = counts[0] < dev->pos_min, above = counts[0] > dev->pos_max;
    if ((below || above) && !dev->limit_hit)
        send_fault(dev, RIGFM_FAULT_LIMIT, counts[0]);
    dev->limit_hit = (uint8_t)(below || above);
    if ((above && v > 0.0f) || (below && v < 0.0f))
        v = 0.0f;
    dev->applied = v;
    if (dev->connected && ++dev->tick_count >= dev->state_divider) {
        uint8_t p[32];
        dev->tick_count = 0;
        dev_send(dev, RIGFM_STATE, p, rigfm_pack_state(p, now_us, counts, current_ma, v, rigfm_dev_flags(dev)));
        dev->rx_error = 0;
        dev->overrun = 0;
    }
    return v;
}
