/* Boot-path guest: prints a greeting, echoes the kernel command line it finds through the
 * zero page, and records what the boot protocol handed it for the host to verify. */
#include "common.h"
    .code64
    .globl _start
_start:
    mov %rsi, %rbx                 /* zero page */
    mov $RESULTS, %rdi
    movabsq $0x5353454343455053, %rax
    mov %rax, 0(%rdi)              /* magic: the guest ran */
    movzwq 0x1fe(%rbx), %rax
    mov %rax, 8(%rdi)              /* boot_flag (0xaa55) */
    movl 0x202(%rbx), %eax
    mov %rax, 16(%rdi)             /* header ("HdrS") */
    mov %rsp, 24(%rdi)             /* boot stack pointer */
    movzbq 0x1e8(%rbx), %rax
    mov %rax, 32(%rdi)             /* e820 entries */
    mov $1, %eax
    cpuid
    mov %rbx, %r8
    mov %rsi, %rbx                 /* cpuid clobbered rbx; rsi still holds the zero page */
    mov %r8, 40(%rdi)              /* cpuid(1).ebx: APIC id, logical count */
    mov %rcx, 48(%rdi)             /* cpuid(1).ecx: hypervisor bit */

    lea msg(%rip), %rsi
    call puts
    movl 0x228(%rbx), %esi         /* cmd_line_ptr */
    call puts
    movb $'\n', %al
    mov $COM1, %dx
    outb %al, %dx
    POWER_OFF

puts:                              /* prints the NUL-terminated string at %rsi */
    mov $COM1, %dx
2:  lodsb
    test %al, %al
    jz 3f
    outb %al, %dx
    jmp 2b
3:  ret

msg: .asciz "hello from the test guest: "
