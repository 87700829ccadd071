/* Counting guest for snapshot/restore: counts to 1000 in memory, raises `ready`, spins until
 * the host sets `go`, then adds 1000 more using a register as the loop counter, prints "done"
 * and powers off. A restored copy ends at 2000 only if both its memory and its registers
 * came back. RESULTS: +0 counter, +8 ready, +16 go. */
#include "common.h"
    .code64
    .globl _start
_start:
    mov $RESULTS, %rdi
1:  incq 0(%rdi)
    cmpq $1000, 0(%rdi)
    jb 1b
    mov $1000, %ecx
    movq $1, 8(%rdi)
2:  pause
    cmpq $0, 16(%rdi)
    je 2b
3:  incq 0(%rdi)
    dec %ecx
    jnz 3b
    mov $COM1, %dx
    lea done(%rip), %rsi
4:  lodsb
    test %al, %al
    jz 5f
    outb %al, %dx
    jmp 4b
5:  POWER_OFF
done: .asciz "done\n"
