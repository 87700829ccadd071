//! The decisions of the idle timers and of the storage budget, as pure functions of the VM
//! table: the daemon's loop applies them, the tests here check them without any VM.

use crate::api::{Persistence, Vm, VmState};

/// What the idle timers want done to a VM now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// Stop its vCPUs.
    Pause,
    /// Write it to disk and end its process.
    Suspend,
    /// It is ephemeral and timed out: delete it.
    Delete,
}

/// The idle action due for `vm` at `now_ms`; `busy` is true while an exec, file call or proxied
/// connection is open (an idle timer never fires under a running command).
pub fn idle_action(vm: &Vm, now_ms: u64, busy: bool) -> Option<IdleAction> {
    if busy {
        return None;
    }
    let idle_s = now_ms.saturating_sub(vm.last_active_ms) / 1000;
    let due = |after: Option<u64>| after.is_some_and(|a| idle_s >= a);
    let ephemeral = vm.persistence == Persistence::Ephemeral;
    match vm.state {
        VmState::Running | VmState::Paused if due(vm.idle.suspend_after_s) => Some(if ephemeral {
            IdleAction::Delete
        } else {
            IdleAction::Suspend
        }),
        VmState::Running if due(vm.idle.pause_after_s) => Some(IdleAction::Pause),
        // Its VMM is gone: an ephemeral VM has nothing worth keeping, but it stays for its
        // suspend timer so that whoever used it can still read why it failed.
        VmState::Failed if ephemeral && due(vm.idle.suspend_after_s) => Some(IdleAction::Delete),
        _ => None,
    }
}

/// The VMs to evict so that the VMs' disk use fits `budget_bytes`, in eviction order: sticky
/// VMs only, and only those at rest (suspended, stopped or failed: a running VM is in use), lowest
/// priority first, then least recently active. Persistent VMs are never evicted; ephemeral ones
/// never reach disk at rest. May return fewer than needed when the rest cannot be evicted.
pub fn evictions(vms: &[Vm], budget_bytes: u64) -> Vec<String> {
    let mut total: u64 = vms.iter().map(|v| v.disk_bytes).sum();
    if total <= budget_bytes {
        return Vec::new();
    }
    let mut candidates: Vec<&Vm> = vms
        .iter()
        .filter(|v| {
            matches!(
                v.state,
                VmState::Suspended | VmState::Stopped | VmState::Failed
            )
        })
        .filter(|v| matches!(v.persistence, Persistence::Sticky { .. }))
        .collect();
    candidates.sort_by_key(|v| {
        let priority = match v.persistence {
            Persistence::Sticky { priority } => priority,
            _ => u8::MAX,
        };
        (priority, v.last_active_ms, v.id.clone())
    });
    let mut out = Vec::new();
    for v in candidates {
        if total <= budget_bytes {
            break;
        }
        total = total.saturating_sub(v.disk_bytes);
        out.push(v.id.clone());
    }
    out
}

/// Own diffs above which a suspended VM's chain is merged into one. Each suspend adds one
/// memory diff and one disk diff; a wake maps every memory diff (mappings and open files per
/// diff, plus the holes of each mapped anonymous) and opens every disk layer. Four keeps a wake
/// within a handful of files over the layer's own, while a merge, which rewrites the union of
/// the diffs once, runs at most once every four suspends.
pub const MAX_CHAIN_DIFFS: usize = 4;

/// The diffs' ranges may add up to this many times the memory they cover before they are
/// merged whatever their count: a VM that rewrites the same pages every cycle would otherwise
/// keep up to four copies of them on disk.
pub const MAX_REWRITE_FACTOR: u64 = 2;

/// A VM's own chain above the layer it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainShape {
    /// Own memory diffs.
    pub memory_diffs: usize,
    /// Own disk diffs that may be merged (of the disk that has most).
    pub disk_diffs: usize,
    /// The memory diffs' range bytes, added up.
    pub range_bytes: u64,
    /// The bytes they cover (their union).
    pub union_bytes: u64,
}

/// Whether a suspended VM's chain should be compacted now.
pub fn should_compact(chain: &ChainShape) -> bool {
    chain.memory_diffs.max(chain.disk_diffs) > MAX_CHAIN_DIFFS
        || (chain.memory_diffs >= 2 && chain.range_bytes > MAX_REWRITE_FACTOR * chain.union_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IdlePolicy, Source};

    fn vm(id: &str, state: VmState, persistence: Persistence, last: u64, bytes: u64) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            state,
            source: Source::Layer { key: "k".into() },
            parent: None,
            persistence,
            idle: IdlePolicy {
                pause_after_s: Some(10),
                suspend_after_s: Some(60),
            },
            ports: vec![],
            net: false,
            created_ms: 0,
            last_active_ms: last,
            pid: None,
            disk_bytes: bytes,
            suspends: 0,
            error: None,
        }
    }

    #[test]
    fn idle_timers_pause_then_suspend_and_ephemeral_vms_are_deleted() {
        let p = Persistence::Persistent;
        let v = vm("a", VmState::Running, p, 1_000, 0);
        assert_eq!(idle_action(&v, 10_999, false), None);
        assert_eq!(idle_action(&v, 11_000, false), Some(IdleAction::Pause));
        assert_eq!(idle_action(&v, 11_000, true), None, "busy");
        let paused = Vm {
            state: VmState::Paused,
            ..v.clone()
        };
        assert_eq!(idle_action(&paused, 11_000, false), None, "already paused");
        assert_eq!(
            idle_action(&paused, 61_000, false),
            Some(IdleAction::Suspend)
        );
        let eph = Vm {
            persistence: Persistence::Ephemeral,
            ..paused.clone()
        };
        assert_eq!(idle_action(&eph, 61_000, false), Some(IdleAction::Delete));
        let suspended = Vm {
            state: VmState::Suspended,
            ..v
        };
        assert_eq!(idle_action(&suspended, 1_000_000, false), None);
    }

    #[test]
    fn failed_vms_are_never_woken_by_a_timer_and_ephemeral_ones_go_after_their_suspend_timer() {
        let failed = vm("f", VmState::Failed, Persistence::Persistent, 1_000, 0);
        assert_eq!(idle_action(&failed, 1_000_000, false), None);
        let eph = Vm {
            persistence: Persistence::Ephemeral,
            ..failed
        };
        assert_eq!(idle_action(&eph, 60_999, false), None, "kept to be read");
        assert_eq!(idle_action(&eph, 61_000, false), Some(IdleAction::Delete));
        assert_eq!(idle_action(&eph, 61_000, true), None, "busy");
    }

    #[test]
    fn eviction_takes_lowest_priority_then_least_recent_and_spares_the_rest() {
        let s = |p| Persistence::Sticky { priority: p };
        let vms = vec![
            vm("hi-old", VmState::Suspended, s(9), 1, 100),
            vm("lo-new", VmState::Suspended, s(1), 50, 100),
            vm("lo-old", VmState::Suspended, s(1), 10, 100),
            vm("mid", VmState::Suspended, s(5), 5, 100),
            vm("running", VmState::Running, s(0), 0, 100),
            vm("keep", VmState::Suspended, Persistence::Persistent, 0, 100),
            vm("failed", VmState::Failed, s(9), 0, 100),
        ];
        assert!(evictions(&vms, 700).is_empty());
        assert_eq!(evictions(&vms, 600), ["lo-old"]);
        assert_eq!(evictions(&vms, 450), ["lo-old", "lo-new", "mid"]);
        assert_eq!(
            evictions(&vms, 0),
            ["lo-old", "lo-new", "mid", "failed", "hi-old"],
            "persistent and running VMs are never evicted; a failed one is at rest"
        );
    }

    #[test]
    fn chains_are_compacted_past_four_diffs_or_twice_the_memory_they_cover() {
        let shape = |memory_diffs, disk_diffs, range_bytes, union_bytes| ChainShape {
            memory_diffs,
            disk_diffs,
            range_bytes,
            union_bytes,
        };
        assert!(!should_compact(&shape(4, 4, 400, 400)));
        assert!(should_compact(&shape(5, 5, 500, 500)));
        assert!(should_compact(&shape(1, 5, 100, 100)), "the disk alone");
        assert!(!should_compact(&shape(3, 3, 200, 100)), "exactly twice");
        assert!(should_compact(&shape(3, 3, 201, 100)));
        assert!(
            !should_compact(&shape(1, 1, 900, 100)),
            "one diff has nothing to merge"
        );
        assert!(!should_compact(&shape(0, 0, 0, 0)));
    }
}
