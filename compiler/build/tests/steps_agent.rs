//! A layer's steps applied through the real `specc-agent` (on a unix socket, on the host):
//! what the builder does inside a guest, minus the VM. Needs root (the agent's user switching).

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use specc_build::steps::{StepError, apply_steps};
    use specc_plan::{Options, compile_str};
    use specc_protocol::Client;

    struct Agent(Child);

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_agent(dir: &Path) -> (Agent, Client<UnixStream>) {
        assert_eq!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "the agent switches users: run these tests as root"
        );
        let bin = specc_guestkit::rootfs::agent_binary().expect("building the static agent");
        let sock = dir.join("agent.sock");
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let child = Command::new(bin)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--etc")
            .arg(&etc)
            .arg("--no-set-clock")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting specc-agent");
        let client = Client::connect_unix(&sock, Duration::from_secs(20)).expect("agent");
        (Agent(child), client)
    }

    #[test]
    fn layer_steps_write_files_copy_trees_and_run_with_env_and_workdir() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("guest");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
        std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(src.join("sub/data.txt"), "data\n").unwrap();
        std::os::unix::fs::symlink("data.txt", src.join("sub/link")).unwrap();
        let r = root.display();
        let spec = format!(
            r#"spec "steps" {{
                base "busybox"
                layer "one" {{
                    file "{r}/etc/motd" content="hi\n" mode=0o600
                    copy "src" "{r}/app"
                    env "GREETING" "hello"
                    workdir "{r}/app"
                    run "echo $GREETING from $(pwd) > out.txt && ./run.sh >> out.txt"
                }}
            }}"#
        );
        let c = compile_str(&tmp.path().join("spec.kdl"), &spec, &Options::default());
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        let spec = c.spec.unwrap();
        let (_agent, mut client) = start_agent(tmp.path());
        let mut seen = Vec::new();
        let mut out = |_: bool, b: &[u8]| seen.extend_from_slice(b);
        let layer = spec.layer("one").unwrap();
        apply_steps(&mut client, &layer.steps, &mut out).expect("steps apply");

        let motd = root.join("etc/motd");
        assert_eq!(std::fs::read_to_string(&motd).unwrap(), "hi\n");
        assert_eq!(
            std::fs::metadata(&motd).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let script = root.join("app/run.sh");
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o111,
            0o111
        );
        assert_eq!(
            std::fs::read_to_string(root.join("app/sub/data.txt")).unwrap(),
            "data\n"
        );
        assert_eq!(
            std::fs::read_link(root.join("app/sub/link")).unwrap(),
            Path::new("data.txt")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("app/out.txt")).unwrap(),
            format!("hello from {r}/app\nran\n")
        );
    }

    #[test]
    fn failing_run_step_reports_index_exit_code_and_output_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = r#"spec "fails" {
            base "busybox"
            layer "bad" {
                run "true"
                run "echo about to fail; echo oops >&2; exit 3"
            }
        }"#;
        let c = compile_str(&tmp.path().join("spec.kdl"), spec, &Options::default());
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        let spec = c.spec.unwrap();
        let (_agent, mut client) = start_agent(tmp.path());
        let mut out = |_: bool, _: &[u8]| {};
        let (index, err) = apply_steps(&mut client, &spec.layer("bad").unwrap().steps, &mut out)
            .expect_err("the second step fails");
        assert_eq!(index, 1);
        match err {
            StepError::Failed {
                code, tail, how, ..
            } => {
                assert_eq!(code, Some(3));
                assert_eq!(how, "exited with 3");
                assert!(
                    tail.contains("about to fail") && tail.contains("oops"),
                    "{tail}"
                );
            }
            other => panic!("expected a failed step, got {other}"),
        }
    }
}
