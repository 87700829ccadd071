/* Crash guest: leaves a marker in %r12, writes '!' to COM1 (an exit to userspace the VMM
 * remembers), then an invalid opcode with no usable IDT escalates to a triple fault. */
#include "common.h"
    .code64
    .globl _start
_start:
    movabsq $0x5ca1ab1e, %r12
    mov $COM1, %dx
    movb $'!', %al
    outb %al, %dx
    ud2
