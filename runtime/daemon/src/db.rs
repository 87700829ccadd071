//! The daemon's durable state: one SQLite row per VM, written before and after every
//! transition, so that a daemon killed at any point finds out on restart what each VM was
//! doing (see `Daemon::recover`).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use specc_vmm::snapshot_dir::MemoryImage;

use crate::api::Vm;

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("state database {}", path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A row does not parse (written by a newer daemon, or damaged).
    #[error("state database row for VM {id} is unreadable")]
    Row {
        /// The VM.
        id: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Where a VM is restored from next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RestorePoint {
    /// A store layer: its state file, memory image and disk stack (store blobs).
    Image {
        /// The vmstate blob.
        vmstate: PathBuf,
        /// Base memory and overlays.
        memory: MemoryImage,
        /// Disk layers, bottom first.
        disks: Vec<PathBuf>,
    },
    /// A snapshot directory the daemon wrote (suspend): its vmstate names memory and disks.
    Snapshot {
        /// The directory.
        dir: PathBuf,
    },
    /// A live fork child: it has no snapshot until its first suspend.
    Forked,
    /// A stopped VM: only its disk is kept; it cold-boots from a kernel chosen at start
    /// (`Daemon::kernel_for`).
    Boot {
        /// The kernel command line.
        cmdline: String,
        /// vCPUs.
        vcpus: u8,
        /// Guest memory.
        mem_bytes: u64,
        /// The frozen disk layers, bottom first.
        disks: Vec<PathBuf>,
        /// The writable diff every boot from this point continues (a VMM that died keeps
        /// what it flushed).
        top: PathBuf,
    },
}

/// What the daemon keeps about a VM beyond what the API shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The API view.
    pub vm: Vm,
    /// The VM's directory (run dirs, disk tops, snapshots).
    pub dir: PathBuf,
    /// Where the next restore starts.
    pub restore: RestorePoint,
    /// The current VMM's run directory (sockets, console), while it runs.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Incremented for every new VMM process: names fresh run dirs and disk tops.
    #[serde(default)]
    pub generation: u32,
    /// The VMs this one was forked from, parent first: their files hold its disk layers.
    #[serde(default)]
    pub lineage: Vec<String>,
    /// The store layer its chain starts at (hex key): pinned in the store while the VM exists.
    #[serde(default)]
    pub layer: Option<String>,
}

/// The database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let err = |source| DbError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // One daemon per state directory: the exclusive lock refuses a second one, and lets WAL
        // keep its index in heap memory instead of a shared-memory file (which 9p, the rig's
        // view of the host tree, cannot map).
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(err)?;
        // WAL with full sync: a committed transition survives kill -9 and power loss.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS vms (
                 id TEXT PRIMARY KEY,
                 record TEXT NOT NULL
             );",
        )
        .map_err(err)?;
        // Takes the exclusive lock now rather than at the first write.
        conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;")
            .map_err(err)?;
        Ok(Db {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Inserts or replaces `rec`, durably.
    pub fn put(&self, rec: &Record) -> Result<(), DbError> {
        let json = serde_json::to_string(rec).map_err(|source| DbError::Row {
            id: rec.vm.id.clone(),
            source,
        })?;
        self.conn
            .execute(
                "INSERT INTO vms (id, record) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![rec.vm.id, json],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// One VM.
    pub fn get(&self, id: &str) -> Result<Option<Record>, DbError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT record FROM vms WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|source| DbError::Row {
                id: id.to_owned(),
                source,
            })
        })
        .transpose()
    }

    /// Every VM, by id.
    pub fn all(&self) -> Result<Vec<Record>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, record FROM vms ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(id, j)| serde_json::from_str(&j).map_err(|source| DbError::Row { id, source }))
            .collect()
    }

    /// Forgets a VM.
    pub fn delete(&self, id: &str) -> Result<(), DbError> {
        self.conn
            .execute("DELETE FROM vms WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IdlePolicy, Persistence, Source, VmState};

    fn record(id: &str) -> Record {
        Record {
            vm: Vm {
                id: id.into(),
                name: id.into(),
                state: VmState::Running,
                source: Source::Layer { key: "ab".into() },
                parent: None,
                persistence: Persistence::Sticky { priority: 3 },
                idle: IdlePolicy {
                    pause_after_s: Some(1),
                    suspend_after_s: None,
                },
                ports: vec![],
                net: false,
                created_ms: 1,
                last_active_ms: 2,
                pid: Some(42),
                disk_bytes: 0,
                suspends: 0,
                error: None,
            },
            dir: "/x".into(),
            restore: RestorePoint::Snapshot {
                dir: "/x/s1".into(),
            },
            run_dir: None,
            generation: 1,
            lineage: vec!["p".into()],
            layer: Some("ab".into()),
        }
    }

    #[test]
    fn rows_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let db = Db::open(&path).expect("open");
            db.put(&record("b")).expect("put");
            db.put(&record("a")).expect("put");
            let mut changed = record("b");
            changed.vm.state = VmState::Suspended;
            db.put(&changed).expect("update");
        }
        let db = Db::open(&path).expect("reopen");
        let all = db.all().expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].vm.id, "a");
        assert_eq!(all[1].vm.state, VmState::Suspended);
        db.delete("a").expect("delete");
        assert!(db.get("a").expect("get").is_none());
        assert_eq!(db.get("b").expect("get"), Some(all[1].clone()));
    }

    #[test]
    fn a_damaged_row_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("state.db")).expect("open");
        db.conn
            .execute("INSERT INTO vms VALUES ('x', '{not json')", [])
            .expect("insert");
        let e = db.get("x").expect_err("damaged");
        assert!(e.to_string().contains("VM x"), "{e}");
    }
}
