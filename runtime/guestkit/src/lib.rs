//! Guest kit: kernel builds from linux-source-6.1 and rootfs images, cached by digest.

#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
mod lock;
pub mod oci;
pub mod rootfs;

pub use kernel::specc_home;
