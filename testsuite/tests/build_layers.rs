//! `specc build` end to end with real Linux guests: a spec with two independent layers over
//! the base builds (each layer a snapshot restored from its parent's), rebuilds fully cached,
//! and after one copied file changes rebuilds exactly the layer that copies it. The build VMs
//! run inside the rig on machines without hardware KVM (`specc build` re-runs itself there).

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>/specc`, beside this test binary's directory.
fn specc_binary() -> PathBuf {
    specc_testsuite::test_binary("specc")
}

/// Runs `specc build --json [EXTRA] FILE`; returns (layer, event) pairs, an `explain` event
/// as ("layer", "explain: why").
fn build(spec: &Path, extra: &[&str]) -> Vec<(String, String)> {
    let out = Command::new(specc_binary())
        .args(["build", "--json"])
        .args(extra)
        .arg(spec)
        .output()
        .expect("running specc build");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "specc build failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] != "output")
        .map(|v| {
            let event = v["event"].as_str().unwrap_or("").to_owned();
            let event = if event == "explain" {
                format!("explain: {}", v["why"].as_str().unwrap_or(""))
            } else {
                event
            };
            (v["layer"].as_str().unwrap_or("").to_owned(), event)
        })
        .collect()
}

/// Every layer's key as `specc build --json` reported it (cached, started or finished events).
fn build_keys(spec: &Path) -> std::collections::BTreeMap<String, String> {
    let out = Command::new(specc_binary())
        .args(["build", "--json"])
        .arg(spec)
        .output()
        .expect("running specc build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let key = v["key"].as_str()?;
            Some((v["layer"].as_str()?.to_owned(), key.to_owned()))
        })
        .collect()
}

/// Every layer's key as `specc plan --json` computes it, with `env` set.
fn plan_keys(spec: &Path, env: &[(&str, &Path)]) -> std::collections::BTreeMap<String, String> {
    let mut cmd = Command::new(specc_binary());
    cmd.args(["plan", "--json"]).arg(spec);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running specc plan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan json");
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            let key = l["key"].as_str().expect("key");
            (
                l["name"].as_str().expect("name").to_owned(),
                key.strip_prefix("sha256:").unwrap_or(key).to_owned(),
            )
        })
        .collect()
}

fn events_of<'a>(events: &'a [(String, String)], layer: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|(l, _)| l == layer)
        .map(|(_, e)| e.as_str())
        .collect()
}

#[test]
fn two_independent_layers_build_then_rebuild_cached_then_only_the_changed_copy() {
    specc_testsuite::cargo_build("specc-vmm");
    specc_testsuite::cargo_build("specc");
    // Inside the target directory: the rig shares the project tree, not the host's /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // A marker unique to this run keeps its layer keys apart from earlier runs' (the store is
    // the user's, shared with the kernel and rootfs caches).
    let marker = format!("{}-{}", std::process::id(), chrono_free_nanos());
    std::fs::create_dir(dir.path().join("files")).unwrap();
    std::fs::write(dir.path().join("files/b.txt"), "first\n").unwrap();
    let spec = dir.path().join("three.kdl");
    std::fs::write(
        &spec,
        format!(
            r#"spec "three" {{
    base "busybox"
    vm vcpus=1 memory="128MiB" disk="64MiB"

    layer "a" after="base" {{
        run "echo {marker} > /root/a"
    }}

    layer "b" after="base" {{
        copy "files/b.txt" "/root/b.txt"
        run "cat /root/b.txt > /root/b.copy && echo {marker} >> /root/b.copy"
    }}
}}
"#
        ),
    )
    .unwrap();

    let first = build(&spec, &[]);
    assert_eq!(events_of(&first, "a"), ["started", "finished"], "{first:?}");
    assert_eq!(events_of(&first, "b"), ["started", "finished"], "{first:?}");
    let base = events_of(&first, "base");
    assert!(
        base == ["cached"] || base == ["started", "finished"],
        "{first:?}"
    );

    let second = build(&spec, &["--explain"]);
    for layer in ["base", "a", "b"] {
        assert_eq!(events_of(&second, layer), ["cached"], "{second:?}");
    }

    std::fs::write(dir.path().join("files/b.txt"), "second\n").unwrap();
    let third = build(&spec, &["--explain"]);
    assert_eq!(events_of(&third, "base"), ["cached"], "{third:?}");
    assert_eq!(events_of(&third, "a"), ["cached"], "{third:?}");
    let b = events_of(&third, "b");
    assert_eq!(b.len(), 3, "{third:?}");
    assert!(
        b[0].starts_with("explain: step 1 (copy ") && b[0].ends_with("b.txt changed"),
        "--explain names the copied file: {}",
        b[0]
    );
    assert_eq!(&b[1..], ["started", "finished"], "{third:?}");

    // `specc plan` keys every layer exactly as `specc build` did (the same kernel and root
    // filesystem input digests), and a changed root filesystem input (another agent binary)
    // changes every key.
    let built = build_keys(&spec);
    assert_eq!(built.len(), 3, "{built:?}");
    assert_eq!(plan_keys(&spec, &[]), built, "plan and build agree");
    let agent = specc_guestkit::rootfs::installed_agent_binary().expect("an agent was built");
    let mut bytes = std::fs::read(&agent).unwrap();
    bytes.extend_from_slice(marker.as_bytes());
    let other_agent = dir.path().join("other-agent");
    std::fs::write(&other_agent, bytes).unwrap();
    std::fs::set_permissions(
        &other_agent,
        std::fs::metadata(&agent).unwrap().permissions(),
    )
    .unwrap();
    let other = plan_keys(&spec, &[("SPECC_AGENT_BIN", &other_agent)]);
    for (layer, key) in &built {
        assert_ne!(
            other.get(layer),
            Some(key),
            "layer {layer} keeps its key with another agent"
        );
    }

    // A failing step: one clear error with the step's place in the spec, its exit status and
    // the end of its output; nothing of the failed layer enters the store.
    let bad = dir.path().join("bad.kdl");
    std::fs::write(
        &bad,
        format!(
            "spec \"bad\" {{\n    base \"busybox\"\n    vm vcpus=1 memory=\"128MiB\" disk=\"64MiB\"\n\n    \
             layer \"fails\" {{\n        run \"echo {marker}-boom >&2; exit 3\"\n    }}\n}}\n"
        ),
    )
    .unwrap();
    let out = Command::new(specc_binary())
        .arg("build")
        .arg(&bad)
        .output()
        .expect("running specc build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.kdl:6:"),
        "the failing step's line: {stderr}"
    );
    assert!(stderr.contains("exited with 3"), "{stderr}");
    assert!(
        stderr.contains(&format!("{marker}-boom")),
        "its output: {stderr}"
    );
    let again = Command::new(specc_binary())
        .args(["build", "--json"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&again.stdout).contains(r#""event":"started","layer":"fails""#),
        "a failed layer is not cached"
    );
}

fn chrono_free_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
