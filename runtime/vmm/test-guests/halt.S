/* Halt guest: prints "H", leaves the address of `resumed` for the host, and halts with
 * interrupts off. Nothing wakes it; the host pauses it, rewrites RIP to `resumed` through a
 * vCPU state restore, and resumes: the guest then prints "R" and powers off. */
#include "common.h"
    .code64
    .globl _start
_start:
    mov $RESULTS, %rdi
    lea resumed(%rip), %rax
    mov %rax, 8(%rdi)
    movq $0x1234abcd, %r12         /* a register value the host checks in the saved state */
    mov $COM1, %dx
    movb $'H', %al
    outb %al, %dx
    movq $1, 0(%rdi)
    cli
halted:
    hlt
    jmp halted
resumed:
    mov $COM1, %dx
    movb $'R', %al
    outb %al, %dx
    movb $'\n', %al
    outb %al, %dx
    POWER_OFF
