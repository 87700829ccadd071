//! Guest devices (virtio-mmio transport, virtio blk/vsock/net/rng, the layered disk) that know nothing of the VMM.
