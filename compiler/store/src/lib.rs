//! Where built layers live and how they travel.
//!
//! - [`store`]: the local content-addressed store under `$SPECC_HOME/store` (blobs by sha256,
//!   layers by cache key, atomic writes, gc with a size budget).
//! - [`owner`]: which process owns a temporary file, so cleanup spares live writers.
//! - [`sparse`]: sparse files in and out of tar+gzip without losing their holes.
//! - [`oci`]: a snapshot as an OCI image layout (`docs/artifact-format.md`), export and import.
//! - [`registry`]: the OCI distribution API client (push, pull, pull of ordinary images).
#![deny(missing_docs)]

pub mod oci;
pub mod owner;
pub mod registry;
pub mod sparse;
pub mod store;

pub use specc_plan::ir::Digest;
pub use store::{
    Algorithm, BlobId, BlobInfo, GcReport, LayerRecord, Part, Pin, Role, Store, StoreError,
};

/// Serde for [`Digest`] as `"sha256:<64 hex>"`.
pub(crate) mod digest_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use specc_plan::ir::Digest;

    pub(crate) fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_prefixed())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// Parses `sha256:<64 lowercase hex>` (the prefix is required here).
    pub(crate) fn parse(s: &str) -> Result<Digest, String> {
        match s.strip_prefix("sha256:") {
            Some(hex)
                if hex.len() == 64
                    && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Digest::parse(hex).ok_or_else(|| format!("bad digest {s:?}"))
            }
            _ => Err(format!("bad digest {s:?}: want sha256:<64 lowercase hex>")),
        }
    }

    pub(crate) mod vec {
        use serde::ser::SerializeSeq;
        use serde::{Deserialize, Deserializer, Serializer};
        use specc_plan::ir::Digest;

        pub(crate) fn serialize<S: Serializer>(v: &[Digest], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for d in v {
                seq.serialize_element(&d.to_prefixed())?;
            }
            seq.end()
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<Digest>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|s| super::parse(s).map_err(serde::de::Error::custom))
                .collect()
        }
    }
}

/// Readers and writers that hash what passes through them.
pub(crate) mod hashio {
    use std::io::{self, Read, Write};

    use sha2::Digest as _;
    use specc_plan::ir::Digest;

    /// Hashes and counts the bytes written through it.
    #[derive(Debug)]
    pub(crate) struct HashWriter<W> {
        pub(crate) inner: W,
        hasher: sha2::Sha256,
        pub(crate) len: u64,
    }

    impl<W: Write> HashWriter<W> {
        pub(crate) fn new(inner: W) -> Self {
            HashWriter {
                inner,
                hasher: sha2::Sha256::new(),
                len: 0,
            }
        }

        pub(crate) fn finish(self) -> (W, Digest, u64) {
            (self.inner, Digest(self.hasher.finalize().into()), self.len)
        }
    }

    impl<W: Write> Write for HashWriter<W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hasher.update(&buf[..n]);
            self.len += n as u64;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    /// Hashes and counts the bytes read through it.
    #[derive(Debug)]
    pub(crate) struct HashReader<R> {
        inner: R,
        hasher: sha2::Sha256,
        pub(crate) len: u64,
    }

    impl<R: Read> HashReader<R> {
        pub(crate) fn new(inner: R) -> Self {
            HashReader {
                inner,
                hasher: sha2::Sha256::new(),
                len: 0,
            }
        }

        pub(crate) fn finish(self) -> (Digest, u64) {
            (Digest(self.hasher.finalize().into()), self.len)
        }
    }

    impl<R: Read> Read for HashReader<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            self.len += n as u64;
            Ok(n)
        }
    }
}

/// Serializes `value` as JSON with object keys sorted at every level, so the same value always
/// gives the same bytes (and digest) whatever map types it was built from.
pub(crate) fn canonical_json<T: serde::Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let sorted: std::collections::BTreeMap<String, serde_json::Value> =
                    m.into_iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    serde_json::to_vec(&sort(serde_json::to_value(value)?))
}
