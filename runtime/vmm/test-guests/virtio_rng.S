/* virtio round trip: drives the virtio-rng device at the first virtio-mmio window by hand
 * (modern virtio-mmio, one queue of 4), posts one 16-byte device-writable buffer, notifies,
 * and polls the used ring. Results for the host:
 *   +0 magic register, +8 version, +16 device id, +24 used idx, +32 used len,
 *   +40 status after DRIVER_OK, +48 interrupt status; the buffer is at 0x310000. */
#include "common.h"
#define MMIO   0xd0000000
#define DESC   0x300000
#define AVAIL  0x301000
#define USED   0x302000
#define BUF    0x310000
    .code64
    .globl _start
_start:
    mov $RESULTS, %rdi
    mov $MMIO, %rsi
    movl 0x000(%rsi), %eax
    mov %rax, 0(%rdi)
    movl 0x004(%rsi), %eax
    mov %rax, 8(%rdi)
    movl 0x008(%rsi), %eax
    mov %rax, 16(%rdi)
    movl $0, 0x070(%rsi)           /* reset */
    movl $1, 0x070(%rsi)           /* ACKNOWLEDGE */
    movl $3, 0x070(%rsi)           /* DRIVER */
    movl $1, 0x024(%rsi)           /* driver features, high word */
    movl $1, 0x020(%rsi)           /* VIRTIO_F_VERSION_1 */
    movl $0, 0x024(%rsi)
    movl $0, 0x020(%rsi)
    movl $0xb, 0x070(%rsi)         /* FEATURES_OK */
    movl $0, 0x030(%rsi)           /* queue 0 */
    movl $4, 0x038(%rsi)           /* size 4 */
    movl $DESC, 0x080(%rsi)
    movl $0, 0x084(%rsi)
    movl $AVAIL, 0x090(%rsi)
    movl $0, 0x094(%rsi)
    movl $USED, 0x0a0(%rsi)
    movl $0, 0x0a4(%rsi)
    movl $1, 0x044(%rsi)           /* QueueReady */
    movl $0xf, 0x070(%rsi)         /* DRIVER_OK */
    movl 0x070(%rsi), %eax
    mov %rax, 40(%rdi)

    mov $DESC, %rbx
    movq $BUF, 0(%rbx)             /* addr */
    movl $16, 8(%rbx)              /* len */
    movw $2, 12(%rbx)              /* VIRTQ_DESC_F_WRITE */
    movw $0, 14(%rbx)
    mov $AVAIL, %rbx
    movw $0, 4(%rbx)               /* ring[0] = descriptor 0 */
    movw $1, 2(%rbx)               /* idx = 1 */
    movl $0, 0x050(%rsi)           /* QueueNotify */

    mov $USED, %rbx
    mov $2000000, %ecx             /* bounded poll: the device works in its own thread */
1:  movzwl 2(%rbx), %eax
    cmp $1, %eax
    je 2f
    pause
    dec %ecx
    jnz 1b
2:  mov %rax, 24(%rdi)
    movl 8(%rbx), %eax             /* used.ring[0].len */
    mov %rax, 32(%rdi)
    movl 0x060(%rsi), %eax
    mov %rax, 48(%rdi)
    movl %eax, 0x064(%rsi)         /* InterruptACK */
    POWER_OFF
