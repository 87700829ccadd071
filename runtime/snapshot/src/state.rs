//! Versioned state files: a fixed little-endian header, a `postcard` payload and a CRC64.
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"SPECCVMS"
//!      8     2  version major   (u16 LE)
//!     10     2  version minor   (u16 LE)
//!     12     2  version patch   (u16 LE)
//!     14     8  payload length  (u64 LE)
//!     22     n  payload         (postcard)
//!   22+n     8  CRC-64/XZ of bytes 0..22+n (u64 LE)
//! ```
//!
//! The bytes are untrusted on the way in: every field is checked before it is used, the
//! allocation is bounded by the caller's `limit`, and no input makes the reader panic
//! (proptest here, a cargo-fuzz target in `fuzz/`).

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crc::{CRC_64_XZ, Crc, Table};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::atomic::AtomicFile;

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SPECCVMS";

/// The version this build writes, and the newest it reads (same major, minor not newer).
pub const FORMAT_VERSION: Version = Version {
    major: 1,
    minor: 0,
    patch: 0,
};

/// Bytes before the payload: magic, version, payload length.
pub const HEADER_LEN: usize = 22;
/// Bytes after the payload: the CRC64.
pub const TRAILER_LEN: usize = 8;
/// The smallest well-formed file (an empty payload).
pub const MIN_FILE_LEN: usize = HEADER_LEN + TRAILER_LEN;

/// Bytes up to and including the version: what must be there to tell which format a file has.
const IDENT_LEN: usize = 14;

// Slice-by-16 tables: the checksum runs over every byte of a state file on every restore.
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

/// A semantic version of the state format (see docs/snapshot-format.md for what bumps what).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Incompatible changes: a reader refuses any other major.
    pub major: u16,
    /// Changes that older files still decode under: a reader refuses a newer minor.
    pub minor: u16,
    /// No change to the bytes.
    pub patch: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Errors of writing and reading state files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the fixed header and checksum need.
    #[error("state file is truncated: {len} bytes, at least {needed} are needed")]
    Truncated {
        /// Bytes present.
        len: u64,
        /// Bytes the fixed fields need.
        needed: u64,
    },
    /// The magic is not [`MAGIC`].
    #[error("not a specc state file: magic is {found:02x?}, expected \"SPECCVMS\"")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// The file's major version is not the one this build reads.
    #[error("state file has format version {found}, this build reads major version {}", supported.major)]
    IncompatibleVersion {
        /// The file's version.
        found: Version,
        /// The version this build reads.
        supported: Version,
    },
    /// The file was written by a newer minor version than this build knows.
    #[error("state file has format version {found}, newer than the {supported} this build reads")]
    NewerMinorVersion {
        /// The file's version.
        found: Version,
        /// The version this build reads.
        supported: Version,
    },
    /// The file (or its declared payload) is larger than the caller's limit.
    #[error("state file needs {len} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Bytes the file has or declares.
        len: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// The header's payload length does not match the bytes present.
    #[error(
        "state file holds {actual} bytes but its header declares {declared} (truncated or padded)"
    )]
    LengthMismatch {
        /// Header + declared payload + checksum.
        declared: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The CRC64 over header and payload does not match the stored one.
    #[error("state file checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// The payload is not a valid encoding of the expected type.
    #[error("state payload does not decode")]
    Decode(#[source] postcard::Error),
    /// The payload decoded but did not use all its bytes.
    #[error("state payload has {count} trailing bytes after the value")]
    TrailingBytes {
        /// Unused bytes.
        count: u64,
    },
    /// Serializing the value failed.
    #[error("encoding state")]
    Encode(#[source] postcard::Error),
    /// Opening, reading or inspecting a state file failed.
    #[error("reading state file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("state file {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Creating, writing, syncing or renaming the file failed.
    #[error("writing state file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Encodes `value` as a state file stamped with [`FORMAT_VERSION`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    encode_with_version(value, FORMAT_VERSION)
}

/// Encodes `value` as a state file stamped with `version` (for callers that version their
/// own schema; [`encode`] is this with [`FORMAT_VERSION`]).
pub fn encode_with_version<T: Serialize>(value: &T, version: Version) -> Result<Vec<u8>, Error> {
    let payload = postcard::to_stdvec(value).map_err(Error::Encode)?;
    Ok(frame(&payload, version))
}

/// Wraps `payload` in a header and checksum (also used by the fuzz entry points to reach the
/// payload decoder with arbitrary bytes).
pub(crate) fn frame(payload: &[u8], version: Version) -> Vec<u8> {
    let mut out = Vec::with_capacity(MIN_FILE_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.major.to_le_bytes());
    out.extend_from_slice(&version.minor.to_le_bytes());
    out.extend_from_slice(&version.patch.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a state file of at most `limit` bytes written with [`FORMAT_VERSION`]'s major and
/// a minor no newer than it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: u64) -> Result<T, Error> {
    decode_with_version(bytes, limit, FORMAT_VERSION).map(|(value, _)| value)
}

/// Decodes a state file of at most `limit` bytes whose version is compatible with
/// `supported` (same major, minor not newer); returns the value and the file's version.
pub fn decode_with_version<T: DeserializeOwned>(
    bytes: &[u8],
    limit: u64,
    supported: Version,
) -> Result<(T, Version), Error> {
    let version = check_header(bytes, supported)?;
    let len = bytes.len() as u64;
    if len > limit {
        return Err(Error::TooLarge { len, limit });
    }
    let payload_len = u64::from_le_bytes(field(bytes, 14));
    // Checked: a hostile length must not wrap around and pass the comparisons below.
    let declared = payload_len
        .checked_add(MIN_FILE_LEN as u64)
        .ok_or(Error::TooLarge {
            len: u64::MAX,
            limit,
        })?;
    if declared > limit {
        return Err(Error::TooLarge {
            len: declared,
            limit,
        });
    }
    if declared != len {
        return Err(Error::LengthMismatch {
            declared,
            actual: len,
        });
    }
    let body_end = bytes.len() - TRAILER_LEN;
    let stored = u64::from_le_bytes(field(bytes, body_end));
    let computed = CRC64.checksum(&bytes[..body_end]);
    if stored != computed {
        return Err(Error::Checksum { stored, computed });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(&bytes[HEADER_LEN..body_end]).map_err(Error::Decode)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes {
            count: rest.len() as u64,
        });
    }
    Ok((value, version))
}

/// Checks length, magic and version, in that order: the fields that say what the rest is.
fn check_header(bytes: &[u8], supported: Version) -> Result<Version, Error> {
    let truncated = |needed: usize| Error::Truncated {
        len: bytes.len() as u64,
        needed: needed as u64,
    };
    if bytes.len() < IDENT_LEN {
        return Err(truncated(MIN_FILE_LEN));
    }
    let magic: [u8; 8] = field(bytes, 0);
    if magic != MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let found = Version {
        major: u16::from_le_bytes(field(bytes, 8)),
        minor: u16::from_le_bytes(field(bytes, 10)),
        patch: u16::from_le_bytes(field(bytes, 12)),
    };
    if found.major != supported.major {
        return Err(Error::IncompatibleVersion { found, supported });
    }
    if found.minor > supported.minor {
        return Err(Error::NewerMinorVersion { found, supported });
    }
    if bytes.len() < MIN_FILE_LEN {
        return Err(truncated(MIN_FILE_LEN));
    }
    Ok(found)
}

/// The `N` bytes at `at`; callers have checked the length.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Writes `value` to `path` atomically: a temporary file in the same directory is written,
/// synced and renamed over `path`, then the directory is synced. A crash leaves either the
/// old file or the new one, never a torn one.
pub fn write_state_file<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let bytes = encode(value)?;
    write_atomically(path, &bytes)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let f = AtomicFile::create(path).map_err(werr)?;
    let mut out = f.file();
    out.write_all(bytes).map_err(werr)?;
    f.commit().map_err(werr)
}

/// Reads and decodes the state file at `path`, refusing it before reading if it is larger
/// than `limit` bytes, and never reading more than `limit` bytes even if it grows meanwhile.
pub fn read_state_file<T: DeserializeOwned>(path: &Path, limit: u64) -> Result<T, Error> {
    let rerr = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(rerr)?;
    let meta = f.metadata().map_err(rerr)?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > limit {
        return Err(Error::TooLarge {
            len: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte past the limit tells a file that grew after the check from one that did not.
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(rerr)?;
    decode(&bytes, limit)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u64,
        name: String,
        bytes: Vec<u8>,
        inner: Vec<Inner>,
        tail: Option<u32>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Inner {
        A(u64),
        B { x: u16, y: Vec<u64> },
        C,
    }

    fn sample() -> Sample {
        Sample {
            id: 0x1122_3344_5566_7788,
            name: "vcpu0".into(),
            bytes: (0..=255).collect(),
            inner: vec![
                Inner::A(7),
                Inner::B {
                    x: 9,
                    y: vec![1, u64::MAX],
                },
                Inner::C,
            ],
            tail: Some(3),
        }
    }

    const LIMIT: u64 = 1 << 20;

    fn refix_crc(bytes: &mut [u8]) {
        let end = bytes.len() - TRAILER_LEN;
        let crc = CRC64.checksum(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn encode_then_decode_returns_the_value() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"SPECCVMS");
        assert_eq!(decode::<Sample>(&bytes, LIMIT).unwrap(), sample());
    }

    #[test]
    fn header_fields_are_little_endian_at_documented_offsets() {
        let bytes = encode_with_version(
            &7u8,
            Version {
                major: 0x0102,
                minor: 0x0304,
                patch: 0x0506,
            },
        )
        .unwrap();
        assert_eq!(bytes.len(), MIN_FILE_LEN + 1);
        assert_eq!(&bytes[8..14], &[2, 1, 4, 3, 6, 5]);
        assert_eq!(&bytes[14..22], &1u64.to_le_bytes());
        assert_eq!(bytes[22], 7);
        // CRC-64/XZ check value of "123456789" per the catalogue, to pin the algorithm.
        assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn short_input_returns_truncated() {
        let bytes = encode(&sample()).unwrap();
        for len in [0, 5, 13] {
            assert!(matches!(
                decode::<Sample>(&bytes[..len], LIMIT),
                Err(Error::Truncated { .. })
            ));
        }
        let empty = encode(&()).unwrap();
        assert!(matches!(
            decode::<()>(&empty[..MIN_FILE_LEN - 1], LIMIT),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn cut_file_returns_length_mismatch() {
        let bytes = encode(&sample()).unwrap();
        let err = decode::<Sample>(&bytes[..bytes.len() - 1], LIMIT).unwrap_err();
        assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            decode::<Sample>(&padded, LIMIT),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn bad_magic_returns_bad_magic() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0] = b'X';
        let err = decode::<Sample>(&bytes, LIMIT).unwrap_err();
        assert!(matches!(err, Error::BadMagic { .. }));
        assert!(err.to_string().contains("not a specc state file"), "{err}");
    }

    #[test]
    fn other_major_and_newer_minor_are_refused_older_minor_is_read() {
        let v = |major, minor| Version {
            major,
            minor,
            patch: 9,
        };
        let supported = v(2, 3);
        let of = |ver| encode_with_version(&sample(), ver).unwrap();
        assert!(matches!(
            decode_with_version::<Sample>(&of(v(1, 3)), LIMIT, supported),
            Err(Error::IncompatibleVersion { .. })
        ));
        assert!(matches!(
            decode_with_version::<Sample>(&of(v(3, 0)), LIMIT, supported),
            Err(Error::IncompatibleVersion { .. })
        ));
        let err = decode_with_version::<Sample>(&of(v(2, 4)), LIMIT, supported).unwrap_err();
        assert!(matches!(err, Error::NewerMinorVersion { .. }));
        assert!(err.to_string().contains("2.4.9"), "{err}");
        let (value, found) = decode_with_version::<Sample>(&of(v(2, 1)), LIMIT, supported).unwrap();
        assert_eq!((value, found), (sample(), v(2, 1)));
    }

    #[test]
    fn over_limit_input_and_declared_length_return_too_large() {
        let bytes = encode(&sample()).unwrap();
        let len = bytes.len() as u64;
        assert!(matches!(
            decode::<Sample>(&bytes, len - 1),
            Err(Error::TooLarge { .. })
        ));
        assert!(decode::<Sample>(&bytes, len).is_ok());
        // A huge declared length on short input: refused on the limit, never allocated.
        let mut huge = bytes.clone();
        huge[14..22].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&huge, LIMIT),
            Err(Error::TooLarge { .. })
        ));
        huge[14..22].copy_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&huge, LIMIT),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn flipped_payload_bit_returns_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[HEADER_LEN + 3] ^= 0x10;
        assert!(matches!(
            decode::<Sample>(&bytes, LIMIT),
            Err(Error::Checksum { .. })
        ));
    }

    #[test]
    fn payload_of_another_type_returns_decode_or_trailing_bytes() {
        // A valid file of a different shape: the checksum is right, the payload is not.
        let bytes = encode(&(1u8, 2u8)).unwrap();
        assert!(matches!(
            decode::<Sample>(&bytes, LIMIT),
            Err(Error::Decode(_))
        ));
        let bytes = encode(&(1u8, 2u8, 3u8)).unwrap();
        let err = decode::<(u8, u8)>(&bytes, LIMIT).unwrap_err();
        assert!(matches!(err, Error::TrailingBytes { count: 1 }), "{err}");
        // An enum tag out of range, checksum recomputed.
        let mut bytes = encode(&Inner::C).unwrap();
        bytes[HEADER_LEN] = 9;
        refix_crc(&mut bytes);
        assert!(matches!(
            decode::<Inner>(&bytes, LIMIT),
            Err(Error::Decode(_))
        ));
    }

    #[test]
    fn state_file_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmstate");
        write_state_file(&path, &sample()).unwrap();
        assert_eq!(read_state_file::<Sample>(&path, LIMIT).unwrap(), sample());
        let mut other = sample();
        other.id = 1;
        write_state_file(&path, &other).unwrap();
        assert_eq!(read_state_file::<Sample>(&path, LIMIT).unwrap(), other);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vmstate")]);
    }

    #[test]
    fn state_file_over_limit_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let err = read_state_file::<Sample>(&path, LIMIT).unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { len, .. } if len == 1 << 40),
            "{err}"
        );
    }

    #[test]
    fn state_file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = read_state_file::<Sample>(&missing, LIMIT).unwrap_err();
        assert!(matches!(err, Error::Read { .. }));
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(matches!(
            read_state_file::<Sample>(dir.path(), LIMIT),
            Err(Error::NotAFile { .. })
        ));
        let err = write_state_file(&dir.path().join("no/such/dir/f"), &1u8).unwrap_err();
        assert!(matches!(err, Error::Write { .. }));
    }

    fn arb_inner() -> impl Strategy<Value = Inner> {
        prop_oneof![
            any::<u64>().prop_map(Inner::A),
            (any::<u16>(), prop::collection::vec(any::<u64>(), 0..8))
                .prop_map(|(x, y)| Inner::B { x, y }),
            Just(Inner::C),
        ]
    }

    fn arb_sample() -> impl Strategy<Value = Sample> {
        (
            any::<u64>(),
            ".{0,16}",
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(arb_inner(), 0..6),
            any::<Option<u32>>(),
        )
            .prop_map(|(id, name, bytes, inner, tail)| Sample {
                id,
                name,
                bytes,
                inner,
                tail,
            })
    }

    proptest! {
        #[test]
        fn any_value_round_trips(v in arb_sample()) {
            let bytes = encode(&v).unwrap();
            prop_assert_eq!(decode::<Sample>(&bytes, LIMIT).unwrap(), v);
        }

        #[test]
        fn random_bytes_are_refused_without_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            keep_magic in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if keep_magic && bytes.len() >= 14 {
                bytes[..8].copy_from_slice(&MAGIC);
                bytes[8..14].copy_from_slice(&[1, 0, 0, 0, 0, 0]);
            }
            // Random bytes with a valid checksum only by chance; the decode must not panic.
            let _ = decode::<Sample>(&bytes, LIMIT);
        }

        #[test]
        fn any_bit_flip_is_refused(v in arb_sample(), bit in any::<prop::sample::Index>()) {
            let mut bytes = encode(&v).unwrap();
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            // CRC64 detects every single-bit error; header flips are caught before it.
            prop_assert!(decode::<Sample>(&bytes, LIMIT).is_err());
        }

        #[test]
        fn any_truncation_is_refused(v in arb_sample(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&v).unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(decode::<Sample>(&bytes[..cut], LIMIT).is_err());
        }

        #[test]
        fn corrupt_payload_with_valid_checksum_never_panics(
            v in arb_sample(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode(&v).unwrap();
            let payload = bytes.len() - MIN_FILE_LEN;
            if payload > 0 {
                for (at, x) in flips {
                    bytes[HEADER_LEN + at.index(payload)] ^= x;
                }
            }
            refix_crc(&mut bytes);
            // May decode to another value or fail; it must do either without panicking.
            let _ = decode::<Sample>(&bytes, LIMIT);
        }
    }
}
