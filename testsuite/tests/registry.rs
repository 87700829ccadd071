//! Push and pull against a real registry: Debian's `docker-registry` (distribution 2.8),
//! started by the test on a free loopback port with its storage in a temp dir.
//!
//! The artifact comes from a synthetic store (sparse memory and disk files, raw vmstate and
//! kernel): the store and the artifact format treat layer parts as opaque blobs, so no VM is
//! needed to test distribution.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use specc_store::oci::{self, ArtifactMeta, VmShape};
use specc_store::registry::{self, Client, Options, Reference, RegistryError};
use specc_store::{Digest, LayerRecord, Part, Role, Store};
use specc_testsuite::registry::Registry;

/// Incompressible bytes (xorshift), so artifact sizes are data sizes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse file of `len` bytes with `chunks` noise chunks of `chunk` bytes.
fn sparse_file(path: &Path, len: u64, chunks: u64, chunk: usize, seed: u64) {
    let f = File::create(path).expect("create");
    f.set_len(len).expect("set_len");
    for i in 0..chunks {
        f.write_all_at(&noise(seed + i, chunk), i * (len / chunks))
            .expect("write");
    }
    f.sync_all().expect("sync");
}

/// Two layers, about `data_mib` MiB of incompressible data in all; returns the head key.
fn synthetic(store: &Store, scratch: &Path, data_mib: u64) -> Digest {
    let mut parents = vec![];
    let mut head = Digest::default();
    for i in 0..2u64 {
        let mem = scratch.join(format!("mem{i}"));
        // 512 MiB of guest memory of which (data_mib/2 - 2) MiB were touched.
        sparse_file(&mem, 512 << 20, data_mib / 2 - 2, 1 << 20, 100 * i);
        let disk = scratch.join(format!("disk{i}"));
        sparse_file(&disk, 1 << 30, 8, 256 << 10, 1000 + i);
        let mut parts = vec![];
        for (role, p) in [(Role::Memory, &mem), (Role::DiskDiff, &disk)] {
            let info = store.put_file(p).expect("put");
            parts.push(Part {
                role,
                digest: info.digest,
                size: info.size,
            });
        }
        let vm = store.put_bytes(&noise(7 + i, 64 << 10)).expect("vmstate");
        parts.push(Part {
            role: Role::Vmstate,
            digest: vm.digest,
            size: vm.size,
        });
        if i == 0 {
            let k = store.put_bytes(&noise(99, 1 << 20)).expect("kernel");
            parts.push(Part {
                role: Role::Kernel,
                digest: k.digest,
                size: k.size,
            });
        }
        let mut key = [0u8; 32];
        key[0] = 0xa0 + u8::try_from(i).expect("small");
        let rec = LayerRecord::new(Digest(key), parents.clone(), parts);
        store.commit_layer(&rec).expect("commit");
        parents = vec![rec.key];
        head = rec.key;
    }
    head
}

fn meta() -> ArtifactMeta {
    ArtifactMeta {
        vm: VmShape {
            vcpus: 2,
            memory_mib: 512,
            disk_bytes: 1 << 30,
            kernel_cmdline: "console=ttyS0 quiet".into(),
        },
        spec_digest: Some(Digest([0x33; 32])),
        cpu_fingerprint: serde_json::json!({"test": "synthetic"}),
        ref_name: Some("v1".into()),
        annotations: BTreeMap::new(),
        runtime: Some(oci::RuntimePolicy {
            ports: vec![22, 3000],
            pause_after_s: Some(60),
            suspend_after_s: Some(600),
            persistence: oci::RuntimePersistence::Persistent,
        }),
    }
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir.join("blobs/sha256"))
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum()
}

#[test]
fn push_pull_round_trip_and_a_second_push_uploads_nothing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let src = Store::open(work.path().join("src")).expect("store");
    let head = synthetic(&src, work.path(), 50);
    let layout = work.path().join("oci");
    let t = Instant::now();
    let desc = oci::export_artifact(&src, &head, &meta(), &layout).expect("export");
    let export_time = t.elapsed();
    let size = dir_size(&layout);

    let reference = reg.reference("specc/synthetic:v1");
    let t = Instant::now();
    let first = registry::push(&layout, &reference, &Options::default()).expect("push");
    let push_time = t.elapsed();
    assert_eq!(first.manifest_digest, desc.digest().to_string());
    assert_eq!(first.uploaded.len(), 8, "config + 7 layer blobs");
    assert!(first.skipped.is_empty());
    let uploads = reg.uploads_started();
    assert_eq!(uploads, 8, "the registry saw 8 upload sessions");

    let pulled_dir = work.path().join("pulled");
    let t = Instant::now();
    let pulled = registry::pull(&reference, &pulled_dir, &Options::default()).expect("pull");
    let pull_time = t.elapsed();
    assert_eq!(pulled.manifest.digest(), desc.digest());
    assert_eq!(pulled.fetched, 8);

    let dst = Store::open(work.path().join("dst")).expect("store");
    let t = Instant::now();
    let got = oci::import_artifact_config(&pulled_dir, &dst).expect("import");
    let import_time = t.elapsed();
    assert_eq!(got.head, head);
    assert_eq!(
        got.runtime,
        meta().runtime,
        "the spec's runtime policy travels"
    );
    for e in src.layers().expect("layers") {
        let b = dst
            .layer(&e.record.key)
            .expect("read")
            .expect("layer imported");
        assert_eq!(b.parts, e.record.parts);
        assert_eq!(b.parents, e.record.parents);
        for p in &b.parts {
            dst.verify_blob(&p.digest).expect("identical bytes");
            let ma = fs::metadata(src.blob_path(&p.digest)).expect("meta");
            let mb = fs::metadata(dst.blob_path(&p.digest)).expect("meta");
            assert!(mb.blocks() <= ma.blocks() + 8, "holes kept for {}", p.role);
        }
    }

    // Again, unchanged: nothing is uploaded, only the manifest is put.
    let t = Instant::now();
    let second = registry::push(&layout, &reference, &Options::default()).expect("push again");
    let second_time = t.elapsed();
    assert!(second.uploaded.is_empty(), "{:?}", second.uploaded);
    assert_eq!(second.skipped.len(), 8);
    assert_eq!(reg.uploads_started(), uploads, "no new upload session");

    // A re-export of the same head gives the same blobs, so it uploads nothing either.
    let layout2 = work.path().join("oci2");
    oci::export_artifact(&src, &head, &meta(), &layout2).expect("export again");
    let third = registry::push(&layout2, &reference, &Options::default()).expect("push re-export");
    assert!(third.uploaded.is_empty());

    // Chunked upload (PATCH with Content-Range) into another repository, then back.
    let t = Instant::now();
    let chunked = registry::push(
        &layout,
        &reg.reference("specc/chunked:v1"),
        &Options {
            chunk_size: 1 << 20,
            ..Options::default()
        },
    )
    .expect("chunked push");
    let chunked_time = t.elapsed();
    assert_eq!(chunked.uploaded.len(), 8);
    let patches = reg
        .log()
        .lines()
        .filter(|l| l.contains("PATCH /v2/specc/chunked/blobs/uploads/"))
        .count();
    assert!(patches > 8, "{patches} PATCH requests");
    let back = work.path().join("chunked");
    let p = registry::pull(
        &reg.reference("specc/chunked:v1"),
        &back,
        &Options::default(),
    )
    .expect("pull the chunked upload");
    assert_eq!(p.manifest.digest(), desc.digest());
    eprintln!("chunked push (1 MiB chunks, {patches} PATCHes): {chunked_time:.2?}");

    eprintln!(
        "artifact {:.1} MiB: export {export_time:.2?}, push {push_time:.2?}, pull {pull_time:.2?}, \
         import {import_time:.2?}, second push {second_time:.2?}",
        size as f64 / (1 << 20) as f64
    );
}

#[test]
fn unreachable_registry_and_corrupt_blobs_are_clear_errors() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = Store::open(work.path().join("src")).expect("store");
    let head = synthetic(&src, work.path(), 8);
    let layout = work.path().join("oci");
    oci::export_artifact(&src, &head, &meta(), &layout).expect("export");

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = registry::push(
        &layout,
        &format!("127.0.0.1:{dead}/specc/x:v1"),
        &Options::default(),
    )
    .expect_err("nobody listens");
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("registry 127.0.0.1:{dead} unreachable")),
        "{err}"
    );

    let reg = Registry::start();
    let reference = reg.reference("specc/corrupt:v1");
    registry::push(&layout, &reference, &Options::default()).expect("push");
    let config = oci::read_config(&layout, &{
        let index = oci::read_index(&layout).expect("index");
        index.manifests()[0].clone()
    })
    .expect("config");
    let memory_blob = config.layers[1]
        .parts
        .iter()
        .find(|p| p.role == Role::Memory)
        .expect("memory part")
        .blob
        .to_prefixed();
    // Flip a byte of the registry's copy of the memory blob.
    let data = reg.blob_data(&memory_blob);
    let f = File::options()
        .read(true)
        .write(true)
        .open(&data)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1000).expect("read");
    b[0] ^= 0x55;
    f.write_all_at(&b, 1000).expect("write");
    drop(f);

    let pulled_dir = work.path().join("pulled");
    let err = registry::pull(&reference, &pulled_dir, &Options::default()).expect_err("corrupt");
    assert!(
        matches!(err, RegistryError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&memory_blob), "{err}");
    let hex = memory_blob.trim_start_matches("sha256:");
    assert!(
        !pulled_dir.join("blobs/sha256").join(hex).exists(),
        "the corrupt blob was not kept"
    );
    let stray = fs::read_dir(pulled_dir.join("blobs/sha256"))
        .expect("list")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp")
        })
        .count();
    assert_eq!(stray, 0, "no temp file left behind");

    // A layout whose blob was corrupted on disk is refused before anything is uploaded.
    let bad_layout = work.path().join("bad");
    oci::export_artifact(&src, &head, &meta(), &bad_layout).expect("export");
    let blob = oci::blob_path(&bad_layout, &config.layers[0].parts[0].blob);
    let f = File::options().write(true).open(&blob).expect("open");
    f.write_all_at(b"X", 10).expect("write");
    drop(f);
    let before = reg.uploads_started();
    let err = registry::push(
        &bad_layout,
        &reg.reference("specc/other:v1"),
        &Options::default(),
    )
    .expect_err("corrupt layout");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(
        reg.uploads_started() <= before + 1,
        "at most the blobs before the bad one"
    );

    // A missing tag is a clear 404.
    let err = registry::pull(
        &reg.reference("specc/corrupt:nope"),
        &work.path().join("x"),
        &Options::default(),
    )
    .expect_err("no such tag");
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("not found"), "{err}");
}

/// A minimal OCI image (one tar+gzip layer) behind an image index with two platforms, pushed
/// with the client's building blocks, then pulled back with `pull_image` for one platform.
#[test]
fn pull_image_resolves_the_platform_manifest_of_an_index() {
    use oci_spec::image::{
        Arch, Descriptor, ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder,
    };

    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tempdir");
    let layout = work.path().join("img");
    fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");

    let blob = |bytes: &[u8]| -> (Digest, u64) {
        use sha2::Digest as _;
        let d = Digest(sha2::Sha256::digest(bytes).into());
        fs::write(oci::blob_path(&layout, &d), bytes).expect("blob");
        (d, bytes.len() as u64)
    };
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "etc/hello", &b"hello\n"[..])
        .expect("tar");
    let layer = tar.into_inner().expect("tar").finish().expect("gz");
    let (ld, ls) = blob(&layer);
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let (cd, cs) = blob(config);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            cs,
            oci::oci_digest(&cd),
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayerGzip,
            ls,
            oci::oci_digest(&ld),
        )])
        .build()
        .expect("manifest");
    let mbytes = serde_json::to_vec(&manifest).expect("json");
    let (md, ms) = blob(&mbytes);
    let mdesc = Descriptor::new(MediaType::ImageManifest, ms, oci::oci_digest(&md));
    oci::add_to_index(&layout, mdesc.clone()).expect("index");
    // Push the platform manifest by digest (with its blobs), then the index under a tag.
    registry::push(
        &layout,
        &reg.reference(&format!("base/img@{}", md.to_prefixed())),
        &Options::default(),
    )
    .expect("push manifest");
    let mut amd = mdesc.clone();
    amd.set_platform(Some(
        PlatformBuilder::default()
            .os(Os::Linux)
            .architecture(Arch::Amd64)
            .build()
            .expect("platform"),
    ));
    let mut other = Descriptor::new(MediaType::ImageManifest, ms, oci::oci_digest(&md));
    other.set_platform(Some(
        PlatformBuilder::default()
            .os(Os::Linux)
            .architecture(Arch::s390x)
            .build()
            .expect("platform"),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![other, amd])
        .build()
        .expect("index");
    let ibytes = serde_json::to_vec(&index).expect("json");
    let r: Reference = reg.reference("base/img:1.0").parse().expect("ref");
    Client::new(&r, &Options::default())
        .put_manifest("1.0", "application/vnd.oci.image.index.v1+json", &ibytes)
        .expect("put index");

    let dest = work.path().join("pulled");
    let pulled = registry::pull_image(
        &reg.reference("base/img:1.0"),
        &dest,
        "linux/amd64",
        &Options::default(),
    )
    .expect("pull_image");
    assert_eq!(pulled.manifest.digest(), mdesc.digest());
    assert_eq!(pulled.layers.len(), 1);
    assert_eq!(*pulled.layers[0].media_type(), MediaType::ImageLayerGzip);
    assert_eq!(fs::read(oci::blob_path(&dest, &ld)).expect("layer"), layer);
    let listed = oci::read_index(&dest).expect("index");
    assert_eq!(listed.manifests().len(), 1);
    assert_eq!(
        listed.manifests()[0]
            .platform()
            .as_ref()
            .map(|p| p.architecture().to_string()),
        Some("amd64".to_owned())
    );
    assert_eq!(oci::ref_name(&listed.manifests()[0]), Some("1.0"));

    let err = registry::pull_image(
        &reg.reference("base/img:1.0"),
        &work.path().join("arm"),
        "linux/arm64",
        &Options::default(),
    )
    .expect_err("no arm64");
    assert!(matches!(err, RegistryError::NoPlatform { .. }), "{err:?}");
    assert!(err.to_string().contains("linux/amd64"), "{err}");
    let _ = std::io::stderr().flush();
}
