/* hello: prints its command line, then exits through the debug-exit port or powers off. */
#include "guest.h"

const char guest_name[] = "hello";

void guest_main(void)
{
    puts("hello: booted cmdline=");
    puts(boot_cmdline);
    puts("\nhello: done\n");
    u32 code;
    if (cmdline_u32("exit", &code) && code <= 255)
        debug_exit((u8)code);
    power_off();
}
