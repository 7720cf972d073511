/* rigfm serial protocol v2 + firmware state machine: plain C99, no Arduino / OS dependencies.
 * Wire format: docs/protocol.md. Python twin: hardware/protocol.py (byte-identical frames). */
#ifndef RIGFM_PROTO_H
#define RIGFM_PROTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RIGFM_PROTOCOL_VERSION 2u
#define RIGFM_HEADER_SIZE 4u
#define RIGFM_TRAILER_SIZE 3u /* zero-free: CRC-16 of the COBS bytes + frame length mod 32, 7 bits a byte */
#define RIGFM_LENGTH_MODULO 32u
#define RIGFM_MAX_PAYLOAD 32u
#define RIGFM_MAX_INNER (RIGFM_HEADER_SIZE + RIGFM_MAX_PAYLOAD) /* header + payload, before COBS */
#define RIGFM_MIN_FRAME (1u + RIGFM_HEADER_SIZE + RIGFM_TRAILER_SIZE) /* without the delimiter */
#define RIGFM_MAX_FRAME 64u /* encoded bytes without the delimiter; longer frames are dropped */
#define RIGFM_MAX_WIRE (RIGFM_MAX_INNER + 1u + RIGFM_TRAILER_SIZE + 1u) /* COBS code + trailer + 0x00 */

enum rigfm_msg_type {
    RIGFM_HELLO = 0x01, RIGFM_COMMAND = 0x02, RIGFM_ESTOP = 0x03, RIGFM_CLEAR_ESTOP = 0x04,
    RIGFM_CONFIG = 0x05, RIGFM_HEARTBEAT = 0x06,
    RIGFM_HELLO_REPLY = 0x81, RIGFM_STATE = 0x82, RIGFM_FAULT = 0x83, RIGFM_ACK = 0x84, RIGFM_NACK = 0x85
};

enum rigfm_rig_kind { RIGFM_RIG_CARTPOLE = 1, RIGFM_RIG_FURUTA = 2 };

enum rigfm_flags {
    RIGFM_F_ESTOP_LATCHED = 1u << 0, RIGFM_F_WATCHDOG_TRIPPED = 1u << 1, RIGFM_F_LIMIT_HIT = 1u << 2,
    RIGFM_F_FAULT = 1u << 3, RIGFM_F_MOTOR_ENABLED = 1u << 4, RIGFM_F_CONNECTED = 1u << 5,
    RIGFM_F_VOLTAGE_CLAMPED = 1u << 6, RIGFM_F_LOOP_OVERRUN = 1u << 7, RIGFM_F_RX_ERROR = 1u << 8,
    RIGFM_F_CONFIGURED = 1u << 9, RIGFM_F_ESTOP_INPUT = 1u << 10
};

enum rigfm_fault_code {
    RIGFM_FAULT_NONE = 0, RIGFM_FAULT_WATCHDOG = 1, RIGFM_FAULT_ESTOP = 2, RIGFM_FAULT_LIMIT = 3,
    RIGFM_FAULT_ENCODER = 4, RIGFM_FAULT_OVERCURRENT = 5, RIGFM_FAULT_LOOP_OVERRUN = 6,
    RIGFM_FAULT_BAD_COMMAND = 7, RIGFM_FAULT_RX_OVERFLOW = 8, RIGFM_FAULT_INTERNAL = 9
};

enum rigfm_nack_reason {
    RIGFM_NACK_NOT_CONNECTED = 1, RIGFM_NACK_VERSION_MISMATCH = 2, RIGFM_NACK_UNKNOWN_TYPE = 3,
    RIGFM_NACK_BAD_LENGTH = 4, RIGFM_NACK_NOT_FINITE = 5, RIGFM_NACK_VOLTAGE_LIMIT_RANGE = 6,
    RIGFM_NACK_WATCHDOG_RANGE = 7, RIGFM_NACK_POSITION_LIMITS = 8, RIGFM_NACK_DIVIDER_RANGE = 9,
    RIGFM_NACK_ESTOP_INPUT_ACTIVE = 10
};

#define RIGFM_WATCHDOG_MS_DEFAULT 50u
#define RIGFM_WATCHDOG_MS_MIN 5u
#define RIGFM_WATCHDOG_MS_MAX 1000u
#define RIGFM_STATE_DIVIDER_MAX 1000u

/* ---- low level: CRC, COBS, little-endian packing ---- */
uint16_t rigfm_crc16(const uint8_t *data, size_t n); /* CRC-16/CCITT-FALSE */
size_t rigfm_cobs_encode(const uint8_t *in, size_t n, uint8_t *out); /* out >= n+1+n/254; no delimiter */
/* returns decoded length, or -1 on invalid COBS / output overflow */
int rigfm_cobs_decode(const uint8_t *in, size_t n, uint8_t *out, size_t out_cap);

void rigfm_put_u16(uint8_t *p, uint16_t v);
void rigfm_put_u32(uint8_t *p, uint32_t v);
void rigfm_put_u64(uint8_t *p, uint64_t v);
void rigfm_put_f32(uint8_t *p, float v);
uint16_t rigfm_get_u16(const uint8_t *p);
uint32_t rigfm_get_u32(const uint8_t *p);
float rigfm_get_f32(const uint8_t *p);

/* Complete frame (COBS + trailer + trailing 0x00) into out (>= RIGFM_MAX_WIRE bytes); returns its length. */
size_t rigfm_encode_frame(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out);
/* The 3-byte zero-free trailer of a frame whose COBS part is cobs[0..n). */
void rigfm_trailer(const uint8_t *cobs, size_t n, uint8_t out[3]);
/* Check a received frame (without the 0x00): length >= RIGFM_MIN_FRAME, trailer pattern and length field,
 * CRC over the COBS bytes, COBS. Returns the decoded header+payload length (into inner), or -1. The exact
 * length for the type is checked by the caller (it needs the type). */
int rigfm_check_frame(const uint8_t *frame, size_t n, uint8_t *inner, size_t inner_cap);
/* Exact frame length (without the 0x00) for a payload of len bytes. */
#define RIGFM_FRAME_LEN(len) (1u + RIGFM_HEADER_SIZE + (len) + RIGFM_TRAILER_SIZE)

/* ---- message payload builders (return payload length) ---- */
typedef struct {
    uint8_t rig_kind;
    uint8_t fw_version[3];
    uint32_t counts_per_rev[2];
    uint16_t loop_rate_hz;
    float max_voltage;
    uint64_t uid;
} rigfm_info_t;

size_t rigfm_pack_hello_reply(uint8_t *p, const rigfm_info_t *info, uint16_t watchdog_ms);
size_t rigfm_pack_state(uint8_t *p, uint64_t t_us, const int32_t counts[2], float current_ma, float applied,
                        uint16_t flags);
size_t rigfm_pack_command(uint8_t *p, float voltage);
size_t rigfm_pack_config(uint8_t *p, float vlimit, uint16_t watchdog_ms, int32_t pos_min, int32_t pos_max,
                         uint16_t divider);
size_t rigfm_pack_u32(uint8_t *p, uint32_t token); /* HEARTBEAT */
size_t rigfm_pack_fault(uint8_t *p, uint16_t code, int32_t detail);
size_t rigfm_pack_ack(uint8_t *p, uint16_t seq, uint8_t type);
size_t rigfm_pack_nack(uint8_t *p, uint16_t seq, uint8_t type, uint8_t reason);

/* ---- the device state machine ---- */
typedef void (*rigfm_write_fn)(void *ctx, const uint8_t *buf, size_t n);

typedef struct {
    rigfm_info_t info;
    rigfm_write_fn write;
    void *write_ctx;
    /* configuration (CONFIG) */
    float voltage_limit;
    uint16_t watchdog_ms;
    int32_t pos_min, pos_max;
    uint16_t state_divider;
    /* session / safety state */
    uint8_t connected, configured, estop, estop_input, fault_latched, wd_tripped, limit_hit;
    uint8_t have_cmd, rx_error, overrun;
    float cmd_voltage, applied;
    uint64_t last_cmd_us, now_us;
    uint16_t tx_seq, tick_count;
    /* receiver */
    uint8_t rx_buf[RIGFM_MAX_FRAME];
    uint16_t rx_len;
    uint8_t rx_discard;
    uint32_t rx_frames_ok, rx_frames_bad;
} rigfm_dev_t;

void rigfm_dev_init(rigfm_dev_t *dev, const rigfm_info_t *info, rigfm_write_fn write, void *ctx);
/* Feed received bytes (any chunking); frames are handled immediately. */
void rigfm_dev_rx(rigfm_dev_t *dev, const uint8_t *data, size_t n, uint64_t now_us);
/* One control-loop tick: safety logic, STATE streaming. Returns the voltage to apply (0 when unsafe). */
float rigfm_dev_tick(rigfm_dev_t *dev, uint64_t now_us, const int32_t counts[2], float current_ma,
                     int estop_input, int loop_overrun);
/* A latching fault detected by the HAL (encoder, overcurrent, internal): motor 0 V until CLEAR_ESTOP. */
void rigfm_dev_fault(rigfm_dev_t *dev, uint16_t code, int32_t detail, int latching);
uint16_t rigfm_dev_flags(const rigfm_dev_t *dev);

#ifdef __cplusplus
}
#endif
#endif
