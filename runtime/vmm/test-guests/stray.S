/* Stray-access guest: touches ports and MMIO addresses where no device is, records what it
 * read, and powers off. The VMM must log, ignore, and keep running. */
#include "common.h"
    .code64
    .globl _start
_start:
    mov $RESULTS, %rdi
    mov $0x2f8, %dx
    inb %dx, %al
    movzbq %al, %rax
    mov %rax, 0(%rdi)              /* absent COM2: 0xff */
    mov $0x1234, %dx
    movl $0xdeadbeef, %eax
    outl %eax, %dx                 /* write to nothing */
    inl %dx, %eax
    mov %rax, 8(%rdi)              /* 0xffffffff */
    mov $0xd0800000, %rsi
    movl (%rsi), %eax
    mov %rax, 16(%rdi)             /* unmapped MMIO in the hole: 0xffffffff */
    movl $0x55aa55aa, (%rsi)       /* write to nothing */
    mov $0xfe000000, %rsi
    movq (%rsi), %rax
    mov %rax, 24(%rdi)             /* 8-byte stray read */
    movq $0x600d, 32(%rdi)         /* got here */
    POWER_OFF
