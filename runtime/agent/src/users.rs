//! Users and groups from the guest's `/etc/passwd` and `/etc/group`, parsed directly: the agent
//! is a static binary and must not depend on NSS.

use std::path::Path;

use specc_protocol::User;

/// Errors of user resolution.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The user name is not in `/etc/passwd`.
    #[error("no user named {0:?} in /etc/passwd")]
    UnknownUser(String),
}

/// Everything needed to switch to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

fn read_lines(path: &Path) -> Vec<Vec<String>> {
    // A missing file (scratch images) means "no entries", not an error.
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect()
}

fn passwd(etc: &Path) -> Vec<PasswdEntry> {
    read_lines(&etc.join("passwd"))
        .into_iter()
        .filter_map(|f| {
            Some(PasswdEntry {
                name: f.first()?.clone(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).cloned().unwrap_or_default(),
                shell: f.get(6).cloned().unwrap_or_default(),
            })
        })
        .collect()
}

fn supplementary_groups(etc: &Path, name: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for f in read_lines(&etc.join("group")) {
        let (Some(gid), Some(members)) = (f.get(2).and_then(|g| g.parse().ok()), f.get(3)) else {
            continue;
        };
        if members.split(',').any(|m| m.trim() == name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

/// Resolves `user` against `<etc>/passwd` and `<etc>/group`. A numeric uid that is not listed
/// gets gid = uid, no supplementary groups and home `/`.
pub fn resolve(etc: &Path, user: Option<&User>) -> Result<Account, UserError> {
    let entries = passwd(etc);
    let found = match user {
        None => entries.into_iter().find(|e| e.uid == 0),
        Some(User::Uid(uid)) => entries.into_iter().find(|e| e.uid == *uid),
        Some(User::Name(name)) => match entries.into_iter().find(|e| &e.name == name) {
            Some(e) => Some(e),
            None => match name.parse::<u32>() {
                // "1000" given as a string still means a uid.
                Ok(uid) => return resolve(etc, Some(&User::Uid(uid))),
                Err(_) => return Err(UserError::UnknownUser(name.clone())),
            },
        },
    };
    Ok(match found {
        Some(e) => Account {
            groups: supplementary_groups(etc, &e.name, e.gid),
            name: e.name,
            uid: e.uid,
            gid: e.gid,
            home: if e.home.is_empty() {
                "/".into()
            } else {
                e.home
            },
            shell: if e.shell.is_empty() {
                "/bin/sh".into()
            } else {
                e.shell
            },
        },
        None => {
            let uid = match user {
                Some(User::Uid(uid)) => *uid,
                _ => 0,
            };
            Account {
                name: if uid == 0 {
                    "root".into()
                } else {
                    uid.to_string()
                },
                uid,
                gid: uid,
                groups: vec![uid],
                home: if uid == 0 { "/root".into() } else { "/".into() },
                shell: "/bin/sh".into(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\n# comment\ndev:x:1001:1001::/home/dev:/bin/zsh\nbroken\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("group"),
            "root:x:0:\ndev:x:1001:\ndocker:x:999:dev,other\nwheel:x:10:other\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn resolve_by_name_collects_supplementary_groups() {
        let etc = etc();
        let a = resolve(etc.path(), Some(&User::Name("dev".into()))).unwrap();
        assert_eq!((a.uid, a.gid), (1001, 1001));
        assert_eq!(a.groups, vec![1001, 999]);
        assert_eq!(a.home, "/home/dev");
        assert_eq!(a.shell, "/bin/zsh");
    }

    #[test]
    fn resolve_unlisted_uid_uses_uid_as_gid() {
        let etc = etc();
        let a = resolve(etc.path(), Some(&User::Uid(4242))).unwrap();
        assert_eq!((a.uid, a.gid, a.groups.clone()), (4242, 4242, vec![4242]));
        assert_eq!(a.home, "/");
    }

    #[test]
    fn resolve_numeric_name_is_a_uid() {
        let etc = etc();
        let a = resolve(etc.path(), Some(&User::Name("1001".into()))).unwrap();
        assert_eq!(a.name, "dev");
    }

    #[test]
    fn resolve_unknown_name_is_an_error() {
        let etc = etc();
        assert!(matches!(
            resolve(etc.path(), Some(&User::Name("ghost".into()))),
            Err(UserError::UnknownUser(_))
        ));
    }

    #[test]
    fn resolve_none_is_root_even_without_passwd() {
        let empty = tempfile::tempdir().unwrap();
        let a = resolve(empty.path(), None).unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_str()), (0, 0, "/root"));
    }
}
