//! Where built layers live, as far as planning needs to know: "is this key built?".

use std::path::{Path, PathBuf};

use crate::ir::Digest;

/// The builder's store implements this; `specc plan` asks it which layers are cached.
pub trait LayerStore {
    /// Whether a complete layer with this key is in the store.
    fn has_layer(&self, key: &Digest) -> bool;
}

/// The on-disk store: `<root>/layers/<64 hex>/layer.json` marks a complete layer (it is
/// written last, by rename, so its presence means the layer is complete).
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// The store under `$SPECC_HOME/store`.
    pub fn open_default() -> Self {
        DirStore {
            root: specc_home().join("store"),
        }
    }

    /// A store rooted at `root` (the directory that holds `layers/`).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        DirStore { root: root.into() }
    }

    /// `<root>/layers/<hex>`.
    pub fn layer_dir(&self, key: &Digest) -> PathBuf {
        self.root.join("layers").join(key.to_hex())
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl LayerStore for DirStore {
    fn has_layer(&self, key: &Digest) -> bool {
        self.layer_dir(key).join("layer.json").is_file()
    }
}

/// `$SPECC_HOME`, else `$XDG_CACHE_HOME/specc`, else `~/.cache/specc`, else `/tmp/specc`.
pub fn specc_home() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("SPECC_HOME")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("specc")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/specc")))
        .unwrap_or_else(|| PathBuf::from("/tmp/specc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_layer_needs_the_layer_json_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::at(dir.path());
        let key = Digest([0xab; 32]);
        assert!(!store.has_layer(&key));
        std::fs::create_dir_all(store.layer_dir(&key)).expect("mkdir");
        assert!(
            !store.has_layer(&key),
            "an incomplete layer directory is not a layer"
        );
        std::fs::write(store.layer_dir(&key).join("layer.json"), "{}").expect("write");
        assert!(store.has_layer(&key));
        assert!(
            store
                .layer_dir(&key)
                .ends_with(format!("layers/{}", "ab".repeat(32)))
        );
    }
}
