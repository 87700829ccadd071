//! The integration registry: the KDL modules `use "node"` resolves to.
//!
//! The standard library (`stdlib-integrations/*.kdl` at the repository root) is compiled into
//! the binary so a `specc` on its own is complete; extra directories given in
//! [`crate::Options::integration_dirs`] are searched first, so a project can add or override
//! integrations.

use std::path::{Path, PathBuf};

/// The standard integrations, by name, with their KDL text.
pub const STDLIB: &[(&str, &str)] = &[
    (
        "node",
        include_str!("../../../stdlib-integrations/node.kdl"),
    ),
    (
        "python",
        include_str!("../../../stdlib-integrations/python.kdl"),
    ),
    ("bun", include_str!("../../../stdlib-integrations/bun.kdl")),
    (
        "ruby",
        include_str!("../../../stdlib-integrations/ruby.kdl"),
    ),
    (
        "postgres",
        include_str!("../../../stdlib-integrations/postgres.kdl"),
    ),
    (
        "chromium",
        include_str!("../../../stdlib-integrations/chromium.kdl"),
    ),
    ("git", include_str!("../../../stdlib-integrations/git.kdl")),
];

/// Where an integration's text came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Compiled in: `(display name, text)`.
    Builtin(String, &'static str),
    /// A file in an integration directory.
    File(PathBuf),
}

/// Finds integration `name`: first `<dir>/<name>.kdl` in each of `dirs`, then the stdlib.
pub fn find(name: &str, dirs: &[PathBuf]) -> Option<Found> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return None;
    }
    for dir in dirs {
        let path = Path::new(dir).join(format!("{name}.kdl"));
        if path.is_file() {
            return Some(Found::File(path));
        }
    }
    STDLIB
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| Found::Builtin(format!("<stdlib>/{n}.kdl"), text))
}

/// Names of every available integration (for suggestions).
pub fn names(dirs: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = STDLIB.iter().map(|(n, _)| (*n).to_owned()).collect();
    for dir in dirs {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "kdl")
                    && let Some(stem) = p.file_stem().and_then(|s| s.to_str())
                {
                    names.push(stem.to_owned());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}
