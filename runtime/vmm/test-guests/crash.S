/* Crash guest: an invalid opcode with no usable IDT escalates to a triple fault. */
    .code64
    .globl _start
_start:
    ud2
