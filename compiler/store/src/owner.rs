//! Which process owns a temporary file in the store, so that cleanup removes only the
//! leftovers of processes that are gone.
//!
//! The store's exclusive `flock` alone cannot tell: a build re-run inside the rig opens the store
//! over 9p, and its lock is invisible to the host, which then believed itself alone and removed
//! the rig build's temporary blobs mid-write. So every temporary name carries its owner,
//! `<boot id>.<pid>`, and only an owner that ran on this boot and has no `/proc/<pid>` any more
//! is gone. An owner this kernel cannot judge (another boot: the rig's, or a machine sharing the
//! store) is trusted until its leftovers are a day old.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// The variable a host process sets for work it re-runs inside the rig: the rig's processes end
/// with the rig, and only the host can see whether the process that started it still runs.
pub const OWNER_ENV: &str = "SPECC_BUILD_OWNER";

/// How old a leftover of an owner this kernel cannot judge must be before it is removed.
pub const FOREIGN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// This process's owner name: [`OWNER_ENV`] if it holds a valid one, else `<boot id>.<pid>`.
pub fn current() -> String {
    if let Some(owner) = std::env::var(OWNER_ENV).ok().filter(|o| parse(o).is_some()) {
        return owner;
    }
    format!("{}.{}", boot_id(), std::process::id())
}

/// `<12 hex boot id>.<pid>` → (boot id, pid).
pub fn parse(owner: &str) -> Option<(&str, u32)> {
    let (boot, pid) = owner.split_once('.')?;
    (boot.len() == 12 && boot.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(())
        .and(pid.parse().ok().map(|pid| (boot, pid)))
}

/// Whether `owner` ran on this boot and has exited.
pub fn is_gone(owner: &str) -> bool {
    match parse(owner) {
        Some((boot, pid)) => boot == boot_id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Whether a leftover named for `owner` (or unnamed: `None`) with modification time `mtime`
/// may be removed: its owner is gone, or nobody here can tell and it is older than `grace`.
pub fn is_leftover(owner: Option<&str>, mtime: Option<SystemTime>, grace: Duration) -> bool {
    if owner.is_some_and(is_gone) {
        return true;
    }
    let judged_alive = owner.is_some_and(|o| parse(o).is_some_and(|(b, _)| b == boot_id()));
    !judged_alive
        && mtime
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > grace)
}

/// The first 12 hex digits of this boot's id, read once (a cleanup judges every entry by it).
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(12)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_gone_only_on_this_boot_once_its_process_exited() {
        let me = current();
        assert!(parse(&me).is_some(), "{me}");
        assert!(!is_gone(&me));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("reap");
        let (boot, _) = parse(&me).expect("own owner");
        assert!(is_gone(&format!("{boot}.{pid}")));
        assert!(!is_gone(&format!("000000000000.{pid}")), "another boot");
        assert!(!is_gone("not-an-owner"));
    }

    #[test]
    fn a_foreign_or_unnamed_leftover_is_removed_only_after_the_grace() {
        let fresh = Some(SystemTime::now());
        let old = Some(SystemTime::now() - Duration::from_secs(3600));
        let grace = Duration::from_secs(60);
        let foreign = "000000000000.1";
        assert!(!is_leftover(Some(foreign), fresh, grace));
        assert!(is_leftover(Some(foreign), old, grace));
        assert!(!is_leftover(None, fresh, grace));
        assert!(is_leftover(None, old, grace));
        // A live owner on this boot keeps even an old file.
        assert!(!is_leftover(Some(&current()), old, grace));
    }
}
