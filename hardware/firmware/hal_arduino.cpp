/* Arduino HAL (AVR, e.g. Mega 2560) of the rigfm reference firmware.
 *
 * - Rig kind at compile time: -DRIGFM_RIG=RIGFM_RIG_FURUTA (default cart-pole).
 * - Quadrature encoders (2 channels, x4 decoding) on pin-change interrupts (PCINT0 group, pins 50-53 on a Mega:
 *   PB0..PB3 = ch0 A/B, ch1 A/B). An illegal transition (both lines changed) raises a latching ENCODER fault.
 * - Motor: PWM on pin 9 (Timer2 8-bit fast PWM, ~31 kHz), direction on pin 8, driver enable on pin 7;
 *   voltage -> duty = |V| / supply voltage.
 * - Fixed-rate control loop: Timer1 CTC interrupt at 1 kHz sets a flag; the tick runs in loop() (serial I/O
 *   is not interrupt-safe), overruns are reported in STATE.
 * - E-stop input on pin 2 (active low, pull-up).
 * Built with arduino-cli (make arduino); not compiled in this repository's CI (no avr-gcc there).
 */
#include <Arduino.h>
#include <avr/interrupt.h>

#include "hal_arduino.h"
#include "rigfm_proto.h"

#ifndef RIGFM_RIG
#define RIGFM_RIG RIGFM_RIG_CARTPOLE
#endif
#ifndef RIGFM_BAUD
#define RIGFM_BAUD 1000000UL
#endif
#ifndef RIGFM_UID
#define RIGFM_UID 0x5249474600000001ULL /* per-board serial: -DRIGFM_UID=... */
#endif
#ifndef RIGFM_SUPPLY_V
#define RIGFM_SUPPLY_V 12.0f
#endif

static const uint8_t PIN_PWM = 9, PIN_DIR = 8, PIN_ENABLE = 7, PIN_ESTOP = 2;

static volatile int32_t g_counts[2];
static volatile uint8_t g_enc_prev;
static volatile uint8_t g_enc_error; /* bit c: illegal transition on channel c */
static volatile uint8_t g_tick_due, g_tick_missed;
static volatile uint32_t g_ms;
static rigfm_dev_t g_dev;

/* x4 quadrature table indexed by (prev << 2) | cur: +1, -1, 0 (no move), 2 (illegal) */
static const int8_t QDEC[16] = {0, -1, 1, 2, 1, 0, 2, -1, -1, 2, 0, 1, 2, 1, -1, 0};

ISR(PCINT0_vect)
{
    uint8_t now = PINB & 0x0F;
    uint8_t prev = g_enc_prev;
    for (uint8_t c = 0; c < 2; c++) {
        uint8_t idx = (uint8_t)((((prev >> (2 * c)) & 3) << 2) | ((now >> (2 * c)) & 3));
        int8_t d = QDEC[idx];
        if (d == 2)
            g_enc_error |= (uint8_t)(1 << c);
        else
            g_counts[c] += d;
    }
    g_enc_prev = now;
}

ISR(TIMER1_COMPA_vect)
{
    g_ms++;
    if (g_tick_due)
        g_tick_missed = 1;
    g_tick_due = 1;
}

static void serial_write(void *ctx, const uint8_t *buf, size_t n)
{
    (void)ctx;
    Serial.write(buf, n);
}

static uint64_t micros64(void)
{
    static uint32_t last;
    static uint64_t high;
    uint32_t now = micros();
    if (now < last)
        high += (uint64_t)1 << 32;
    last = now;
    return high | now;
}

static void motor_apply(float volts)
{
    float duty = volts < 0 ? -volts : volts;
    duty = duty / RIGFM_SUPPLY_V;
    if (duty > 1.0f)
        duty = 1.0f;
    digitalWrite(PIN_DIR, volts < 0 ? LOW : HIGH);
    OCR2B = (uint8_t)(duty * 255.0f + 0.5f);
    digitalWrite(PIN_ENABLE, volts != 0.0f ? HIGH : LOW);
}

void rigfm_hal_setup(void)
{
    pinMode(PIN_PWM, OUTPUT);
    pinMode(PIN_DIR, OUTPUT);
    pinMode(PIN_ENABLE, OUTPUT);
    pinMode(PIN_ESTOP, INPUT_PULLUP);
    TCCR2A = _BV(COM2B1) | _BV(WGM21) | _BV(WGM20); /* fast PWM on OC2B (pin 9), no prescaler */
    TCCR2B = _BV(CS20);
    motor_apply(0.0f);

    DDRB &= (uint8_t)~0x0F; /* encoder inputs with pull-ups */
    PORTB |= 0x0F;
    g_enc_prev = PINB & 0x0F;
    PCMSK0 |= 0x0F;
    PCICR |= _BV(PCIE0);

    cli(); /* Timer1 CTC at 1 kHz: 16 MHz / 64 / 250 */
    TCCR1A = 0;
    TCCR1B = _BV(WGM12) | _BV(CS11) | _BV(CS10);
    OCR1A = 249;
    TIMSK1 |= _BV(OCIE1A);
    sei();

    Serial.begin(RIGFM_BAUD);
    rigfm_info_t info;
    info.rig_kind = RIGFM_RIG;
    info.fw_version[0] = 1;
    info.fw_version[1] = 0;
    info.fw_version[2] = 0;
    info.counts_per_rev[0] = RIGFM_RIG == RIGFM_RIG_FURUTA ? 2048 : 4096;
    info.counts_per_rev[1] = RIGFM_RIG == RIGFM_RIG_FURUTA ? 2048 : 4096;
    info.loop_rate_hz = 1000;
    info.max_voltage = RIGFM_RIG == RIGFM_RIG_FURUTA ? 10.0f : 12.0f;
    info.uid = RIGFM_UID;
    rigfm_dev_init(&g_dev, &info, serial_write, 0);
}

void rigfm_hal_loop(void)
{
    uint8_t buf[32];
    int n = Serial.available();
    while (n > 0) {
        int k = n > (int)sizeof buf ? (int)sizeof buf : n;
        k = (int)Serial.readBytes(buf, (size_t)k);
        rigfm_dev_rx(&g_dev, buf, (size_t)k, micros64());
        n -= k;
    }
    if (!g_tick_due)
        return;
    int32_t counts[2];
    uint8_t enc_err, missed;
    cli();
    g_tick_due = 0;
    missed = g_tick_missed;
    g_tick_missed = 0;
    counts[0] = g_counts[0];
    counts[1] = g_counts[1];
    enc_err = g_enc_error;
    g_enc_error = 0;
    sei();
    for (uint8_t c = 0; c < 2; c++)
        if (enc_err & (1 << c))
            rigfm_dev_fault(&g_dev, RIGFM_FAULT_ENCODER, c, 1);
    int estop_in = digitalRead(PIN_ESTOP) == LOW;
    float v = rigfm_dev_tick(&g_dev, micros64(), counts, NAN, estop_in, missed);
    motor_apply(v);
}
