/* rigfm reference firmware (Arduino sketch). Logic: rigfm_proto.c (plain C); pins/timers: hal_arduino.cpp.
 * Select the rig at compile time: add -DRIGFM_RIG=2 (Furuta) to the build flags; default 1 (cart-pole). */
#include "hal_arduino.h"

void setup() { rigfm_hal_setup(); }

void loop() { rigfm_hal_loop(); }
