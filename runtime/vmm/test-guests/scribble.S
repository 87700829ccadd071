/* Scribbling guest for precopy forks: keeps a sequence number n in %rax and writes each new
 * n into page n % 64 of a ring of 64 pages at RING, without end, until the host sets `stop`
 * (RESULTS+16); then powers off. It raises `ready` (RESULTS+8) once it runs. Memory captured
 * at any instant holds the 64 latest values, each in its own page, the largest equal to %rax
 * (or %rax - 1 between the increment and its store): a page copied too early breaks that.
 * It writes its ring pages all the time, so a precopy always has them in its last dirty
 * round. */
#include "common.h"
#define RING 0x400000
    .code64
    .globl _start
_start:
    mov $RESULTS, %rdi
    mov $RING, %rsi
    xor %eax, %eax
    movq $1, 8(%rdi)
1:  inc %rax
    mov %rax, %rbx
    and $63, %rbx
    shl $12, %rbx
    mov %rax, (%rsi,%rbx)
    cmpq $0, 16(%rdi)
    je 1b
    POWER_OFF
