//! The `specc` binary end to end: exit codes, JSON diagnostics, plan output, fmt.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Output};

    fn specc(home: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_specc"))
            .args(args)
            .env("SPECC_HOME", home)
            .output()
            .expect("run specc")
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    const GOOD: &str =
        "spec \"ok\" {\n    base \"busybox\"\n    layer \"a\" {\n        run \"true\"\n    }\n}\n";

    #[test]
    fn check_exits_0_1_2_for_valid_invalid_and_unreadable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write(dir.path(), "good.kdl", GOOD);
        let bad = write(
            dir.path(),
            "bad.kdl",
            "spec \"x\" {\n    base \"busybox\"\n    vm memroy=\"1GiB\"\n}\n",
        );
        assert_eq!(specc(dir.path(), &["check", &good]).status.code(), Some(0));
        let out = specc(dir.path(), &["check", &good, &bad]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("specc::unknown-property"), "{stderr}");
        assert!(stderr.contains("bad.kdl:3:8"), "{stderr}");
        assert!(stderr.contains("did you mean `memory`?"), "{stderr}");
        let missing = dir.path().join("missing.kdl").display().to_string();
        assert_eq!(
            specc(dir.path(), &["check", &good, &missing]).status.code(),
            Some(2)
        );
        assert_eq!(
            specc(dir.path(), &["check"]).status.code(),
            Some(2),
            "usage error"
        );
    }

    #[test]
    fn check_json_reports_every_error_with_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = write(
            dir.path(),
            "bad.kdl",
            "spec \"x\" {\n  base \"busybox\"\n  // é\n  vm disk=\"4Gib\"\n  lyer \"l\" {}\n}\n",
        );
        let out = specc(dir.path(), &["check", "--format", "json", &bad]);
        assert_eq!(out.status.code(), Some(1));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .expect("utf8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["code"], "specc::bad-size");
        assert_eq!(
            (lines[0]["line"].as_u64(), lines[0]["column"].as_u64()),
            (Some(4), Some(13))
        );
        assert_eq!(lines[0]["severity"], "error");
        assert_eq!(lines[0]["file"], bad.as_str());
        assert_eq!(lines[1]["code"], "specc::unknown-node");
        assert_eq!(
            (lines[1]["line"].as_u64(), lines[1]["column"].as_u64()),
            (Some(5), Some(3))
        );
    }

    #[test]
    fn plan_json_lists_layers_in_order_and_sees_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write(dir.path(), "good.kdl", GOOD);
        let out = specc(dir.path(), &["plan", "--json", &good]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["spec"], "ok");
        let layers = v["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0]["name"], "base");
        assert_eq!(layers[1]["parents"], serde_json::json!(["base"]));
        assert_eq!(layers[1]["cached"], false);
        let key = layers[1]["key"].as_str().expect("key");
        assert!(key.starts_with("sha256:") && key.len() == 71, "{key}");

        let layer_dir = dir.path().join("store/layers").join(&key[7..]);
        std::fs::create_dir_all(&layer_dir).expect("mkdir");
        std::fs::write(layer_dir.join("layer.json"), "{}").expect("write");
        let v: serde_json::Value =
            serde_json::from_slice(&specc(dir.path(), &["plan", "--json", &good]).stdout)
                .expect("json");
        assert_eq!(v["layers"][1]["cached"], true);
        assert_eq!(v["layers"][0]["cached"], false);

        let tree = String::from_utf8(specc(dir.path(), &["plan", &good]).stdout).expect("utf8");
        assert!(
            tree.contains("└─ a  sha256:") && tree.contains("cached"),
            "{tree}"
        );
        let dot = String::from_utf8(specc(dir.path(), &["graph", &good]).stdout).expect("utf8");
        assert!(
            dot.starts_with("digraph \"ok\" {") && dot.contains("\"base\" -> \"a\";"),
            "{dot}"
        );
    }

    #[test]
    fn plan_of_an_invalid_spec_exits_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = write(dir.path(), "bad.kdl", "spec \"x\" {\n}\n");
        assert_eq!(specc(dir.path(), &["plan", &bad]).status.code(), Some(1));
    }

    #[test]
    fn fmt_rewrites_then_check_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "messy.kdl",
            "spec   \"ok\"  {\n base \"busybox\" // keep me\n}\n",
        );
        assert_eq!(
            specc(dir.path(), &["fmt", "--check", &f]).status.code(),
            Some(1)
        );
        assert_eq!(specc(dir.path(), &["fmt", &f]).status.code(), Some(0));
        let text = std::fs::read_to_string(&f).expect("read");
        assert_eq!(text, "spec \"ok\" {\n    base \"busybox\" // keep me\n}\n");
        assert_eq!(
            specc(dir.path(), &["fmt", "--check", &f]).status.code(),
            Some(0)
        );
    }

    #[test]
    fn examples_are_formatted() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let dir = tempfile::tempdir().expect("tempdir");
        for e in std::fs::read_dir(&examples).expect("examples") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "kdl") {
                let out = specc(dir.path(), &["fmt", "--check", &p.display().to_string()]);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
    }
}
