/* Thin Arduino HAL of the rigfm reference firmware (see hal_arduino.cpp). */
#ifndef RIGFM_HAL_ARDUINO_H
#define RIGFM_HAL_ARDUINO_H
#include <stdint.h>

void rigfm_hal_setup(void); /* pins, encoder interrupts, PWM, 1 kHz timer, serial, protocol core */
void rigfm_hal_loop(void);  /* call from loop(): serial RX -> core; runs the control tick when due */

#endif
