//! The VM description the `specc-vmm` process is started with (JSON, documented in
//! docs/vmm.md). Trusted input: it comes from `specc`/`specd`, never from a guest.

use std::path::PathBuf;

use crate::vstate::memory::MemoryBacking;

/// A VM to boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (1..=254).
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest RAM in bytes (a multiple of 4096, more than 1 MiB).
    pub mem_bytes: u64,
    /// The kernel: an ELF vmlinux or a bzImage (or a test guest ELF).
    pub kernel: PathBuf,
    /// The kernel command line; virtio-mmio device parameters are appended.
    #[serde(default)]
    pub cmdline: String,
    /// The guest console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-blk disks, in order (`/dev/vda`, `/dev/vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Where guest RAM comes from.
    #[serde(default = "anonymous")]
    pub memory: MemoryBacking,
    /// Ask for transparent huge pages on guest RAM.
    #[serde(default = "yes")]
    pub hugepages: bool,
    /// Take anonymous guest RAM from the host's 2 MiB hugetlb pool when it has the pages
    /// (a fork's `fork(2)` then costs a fifth of what it does with transparent huge pages);
    /// falls back to transparent huge pages with a warning. Size the pool for the VM and what
    /// its fork children write ([`crate::vstate::memory::create_with`]).
    #[serde(default)]
    pub hugetlb: bool,
    /// How a live fork gives its children this VM's memory (`"cow"` or `"precopy"`,
    /// [`crate::snapshot::ForkMode`]; docs/fork.md says which is the default and why). Fork
    /// children inherit it.
    #[serde(default)]
    pub fork_mode: crate::snapshot::ForkMode,
    /// Stop the VM after this many milliseconds (exit status 124).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Serve the control API (pause, resume, snapshot, fork; docs/vmm.md) on this unix
    /// socket.
    #[serde(default)]
    pub control: Option<PathBuf>,
}

/// The guest console (COM1).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Log file (created or truncated).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Also copy the console to the VMM's stdout.
    #[serde(default)]
    pub stdout: bool,
}

/// A layered copy-on-write disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Read-only layers, bottom first.
    pub layers: Vec<PathBuf>,
    /// The writable diff on top (created empty if missing).
    pub top: PathBuf,
    /// Offer the disk read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The disk's serial as the guest sees it (`/sys/block/vdX/serial`), at most 20 bytes.
    #[serde(default)]
    pub id: Option<String>,
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host-side unix socket (`CONNECT <port>\n` to reach a guest port).
    pub uds_path: PathBuf,
}

/// The network device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`; [`DEFAULT_MAC`] if absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// MTU offered to the guest (default 1500).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The backend.
    pub backend: NetBackend,
}

/// The MAC a guest gets when the config names none (locally administered, unicast).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x5c, 0x00, 0x00, 0x00, 0x01];

/// Why a MAC address string is not one.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
pub struct MacError(String);

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts
            .next()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| MacError(s.into()))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| MacError(s.into()))?;
    }
    if parts.next().is_some() {
        return Err(MacError(s.into()));
    }
    Ok(out)
}

/// Network backends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum NetBackend {
    /// passt in user mode: the VMM starts `passt` and talks to it over its unix socket.
    Passt {
        /// The passt binary (default: `passt` on PATH).
        #[serde(default)]
        binary: Option<PathBuf>,
        /// passt's log file.
        #[serde(default)]
        log: Option<PathBuf>,
        /// Extra passt arguments (e.g. port forwards `-t 8080`).
        #[serde(default)]
        args: Vec<String>,
    },
    /// An existing tap interface (needs CAP_NET_ADMIN or a persistent tap owned by the user).
    Tap {
        /// Interface name.
        name: String,
    },
}

fn one() -> u8 {
    1
}
fn yes() -> bool {
    true
}
fn anonymous() -> MemoryBacking {
    MemoryBacking::Anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_fills_defaults() {
        let c: VmConfig =
            serde_json::from_str(r#"{"mem_bytes": 268435456, "kernel": "/k"}"#).unwrap();
        assert_eq!(c.vcpus, 1);
        assert!(c.hugepages);
        assert_eq!(c.memory, MemoryBacking::Anonymous);
        assert!(c.disks.is_empty() && c.vsock.is_none() && !c.rng);
    }

    #[test]
    fn full_config_parses() {
        let c: VmConfig = serde_json::from_str(
            r#"{
                "vcpus": 2, "mem_bytes": 536870912, "kernel": "/k/vmlinux",
                "cmdline": "console=ttyS0 reboot=k panic=-1",
                "serial": {"log": "/tmp/serial.log", "stdout": true},
                "disks": [{"layers": ["/l/base.ext4"], "top": "/l/diff"}],
                "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
                "net": {"backend": {"kind": "passt", "args": []}},
                "rng": true,
                "memory": {"kind": "file", "path": "/snap/mem"},
                "timeout_ms": 60000
            }"#,
        )
        .unwrap();
        assert_eq!(c.disks[0].layers.len(), 1);
        assert_eq!(c.vsock.unwrap().guest_cid, 3);
        assert!(matches!(c.memory, MemoryBacking::File { .. }));
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!(
            parse_mac("02:5c:00:ab:cd:ef").unwrap(),
            [2, 0x5c, 0, 0xab, 0xcd, 0xef]
        );
        for bad in [
            "",
            "02:5c:00:ab:cd",
            "02:5c:00:ab:cd:ef:00",
            "2:5c:00:ab:cd:ef",
            "zz:5c:00:ab:cd:ef",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_errors() {
        let e = serde_json::from_str::<VmConfig>(r#"{"mem_bytes": 1, "kernel": "/k", "vpcus": 2}"#);
        assert!(e.unwrap_err().to_string().contains("vpcus"));
    }
}
