/* hello: prints its command line, then exits through the debug-exit port or powers off.
 * With reset=kbd or reset=cf9 it resets the machine instead (i8042 pulse or the 0xcf9
 * reset control register), so a test can watch the VMM reboot it. */
#include "guest.h"

const char guest_name[] = "hello";

void guest_main(void)
{
    puts("hello: booted cmdline=");
    puts(boot_cmdline);
    puts("\nhello: done\n");
    u32 code;
    if (cmdline_has("reset=kbd")) {
        puts("hello: resetting through the i8042\n");
        outb(0x64, 0xfe);
    }
    if (cmdline_has("reset=cf9")) {
        puts("hello: resetting through 0xcf9\n");
        outb(0xcf9, 0x06);
    }
    if (cmdline_u32("exit", &code) && code <= 255)
        debug_exit((u8)code);
    power_off();
}
