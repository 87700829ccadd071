//! The `specc-vmm` process contract: JSON config from a file or stdin, the exit status per way
//! the VM ended, errors as one line on stderr, `--timings` as one JSON line. These boot the
//! test guests under /dev/kvm and fail, saying so, where it cannot be opened.

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    fn guest(name: &str) -> PathBuf {
        let dir = Path::new(env!("SPECC_TEST_GUESTS"));
        if let Ok(errors) = std::fs::read_to_string(dir.join("BUILD_ERRORS")) {
            panic!("test guests were not built (install gcc and binutils): {errors}");
        }
        dir.join(format!("{name}.elf"))
    }

    fn require_kvm() {
        if let Err(e) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            panic!("these tests boot guests and need /dev/kvm, which cannot be opened ({e})");
        }
    }

    fn run_stdin(config: &str, extra: &[&str]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_specc-vmm"))
            .args(extra)
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn config(name: &str, dir: &Path, extra: &str) -> String {
        format!(
            r#"{{"mem_bytes": 33554432, "kernel": {:?}, "cmdline": "x=1",
                "serial": {{"log": {:?}}} {extra}}}"#,
            guest(name),
            dir.join("serial.log")
        )
    }

    #[test]
    fn guest_power_off_exits_zero_and_timings_is_one_json_line() {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let out = run_stdin(&config("hello", dir.path(), ""), &["--timings"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8(out.stderr).unwrap();
        let line: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
        assert_eq!(line["exit"]["kind"], "power_off");
        assert!(line["setup_us"].as_u64().unwrap() > 0);
        assert!(line["vmm_overhead_kib"].as_u64().unwrap() > 0);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("serial.log")).unwrap(),
            "hello from the test guest: x=1\n"
        );
    }

    #[test]
    fn config_file_path_works_like_stdin() {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        std::fs::write(&path, config("hello", dir.path(), "")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_specc-vmm"))
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn triple_fault_exits_two() {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let out = run_stdin(&config("crash", dir.path(), ""), &[]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("TripleFault"));
    }

    #[test]
    fn timeout_exits_124() {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let out = run_stdin(&config("halt", dir.path(), r#", "timeout_ms": 200"#), &[]);
        assert_eq!(out.status.code(), Some(124));
    }

    #[test]
    fn bad_config_and_missing_kernel_exit_one_with_one_clear_line() {
        let out = run_stdin(r#"{"mem_bytes": 1, "kernel": "/k", "vpcus": 2}"#, &[]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("parsing the VM configuration") && err.contains("vpcus"),
            "{err}"
        );

        require_kvm();
        let out = run_stdin(
            r#"{"mem_bytes": 33554432, "kernel": "/nonexistent/vmlinux"}"#,
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("opening kernel /nonexistent/vmlinux"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
