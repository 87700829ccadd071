/* Shared by the test guests. RESULTS is where a guest leaves values for the host to check. */
#define RESULTS   0x200000
#define COM1      0x3f8
/* i8042 CPU reset: how every test guest powers off. */
#define POWER_OFF movb $0xfe, %al; outb %al, $0x64; 1: hlt; jmp 1b
