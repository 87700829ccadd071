//! End to end on the host: the real `specc-agent` binary listening on a unix socket, driven by
//! the real client. Needs root (user switching, RNDADDENTROPY, a UTS namespace).

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use specc_protocol::{
        Client, ClientError, ErrorKind, ExecRequest, FileKind, PtySize, Request, Response,
        RestoredRequest, User, WriteFileRequest, frame,
    };

    const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

    struct Agent {
        child: Child,
        sock: PathBuf,
        dir: tempfile::TempDir,
    }

    impl Agent {
        fn start() -> Agent {
            Self::start_with(&[])
        }

        /// Starts the agent, optionally wrapped (e.g. in `unshare --uts`).
        fn start_with(wrapper: &[&str]) -> Agent {
            assert_eq!(
                // SAFETY: geteuid has no preconditions.
                unsafe { libc::geteuid() },
                0,
                "these tests switch users and reseed the kernel RNG: run them as root"
            );
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("agent.sock");
            let etc = dir.path().join("etc");
            std::fs::create_dir(&etc).unwrap();
            let bin = env!("CARGO_BIN_EXE_specc-agent");
            let mut cmd = match wrapper.split_first() {
                Some((first, rest)) => {
                    let mut c = Command::new(first);
                    c.args(rest).arg(bin);
                    c
                }
                None => Command::new(bin),
            };
            cmd.arg("--listen")
                .arg(format!("unix:{}", sock.display()))
                .arg("--etc")
                .arg(&etc)
                .arg("--no-set-clock")
                .stdin(Stdio::null());
            let child = cmd.spawn().expect("starting specc-agent");
            Agent { child, sock, dir }
        }

        fn client(&self) -> Client<UnixStream> {
            Client::connect_unix(&self.sock, CONNECT_TIMEOUT).expect("connecting to the agent")
        }

        fn tmp(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn sh(script: &str) -> ExecRequest {
        ExecRequest::new(["sh", "-c", script])
    }

    fn process_gone(pid: i32) -> bool {
        // A zombie still has /proc/PID; check its state too.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    fn wait_gone(pid: i32) {
        for _ in 0..1000 {
            if process_gone(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("process {pid} is still alive after 10 s");
    }

    #[test]
    fn exec_echo_hello_streams_stdout_and_exits_zero() {
        let agent = Agent::start();
        let mut c = agent.client();
        assert_eq!(c.info().version, specc_protocol::PROTOCOL_VERSION);
        assert!(!c.info().pid1);
        let out = c.exec_output(&ExecRequest::new(["echo", "hello"])).unwrap();
        assert_eq!(out.stdout, b"hello\n");
        assert!(out.stderr.is_empty());
        assert!(out.status.success(), "{:?}", out.status);
        // The same connection runs the next request.
        let out = c.exec_output(&sh("echo err >&2; exit 7")).unwrap();
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code, Some(7));
    }

    #[test]
    fn exec_stdin_round_trips_a_megabyte() {
        let agent = Agent::start();
        let mut c = agent.client();
        let input: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
            .collect();
        let mut out = Vec::new();
        let status = c
            .exec_with_stdin(
                &ExecRequest::new(["cat"]),
                &mut input.as_slice(),
                |d| out.extend_from_slice(d),
                |_| {},
            )
            .unwrap();
        assert!(status.success());
        assert_eq!(out.len(), input.len());
        assert!(out == input, "cat returned different bytes");
    }

    #[test]
    fn exec_output_arrives_before_the_process_exits() {
        let agent = Agent::start();
        let mut c = agent.client();
        // The process waits for files that only the output callbacks create: if output were
        // held back until exit this would never finish (the timeout turns that into a
        // failure), and the order of the three lines is forced across the two streams.
        let flag1 = agent.tmp().join("seen-one");
        let flag2 = agent.tmp().join("seen-two");
        let script = format!(
            "echo one; while [ ! -e {f1} ]; do sleep 0.01; done; echo two >&2; \
             while [ ! -e {f2} ]; do sleep 0.01; done; echo three",
            f1 = flag1.display(),
            f2 = flag2.display()
        );
        let mut events: Vec<(char, Vec<u8>)> = Vec::new();
        let log = std::cell::RefCell::new(&mut events);
        let status = c
            .exec(
                &ExecRequest {
                    timeout_ms: Some(30_000),
                    ..sh(&script)
                },
                |d| {
                    if d.starts_with(b"one") {
                        std::fs::write(&flag1, "").unwrap();
                    }
                    log.borrow_mut().push(('o', d.to_vec()));
                },
                |d| {
                    if d.starts_with(b"two") {
                        std::fs::write(&flag2, "").unwrap();
                    }
                    log.borrow_mut().push(('e', d.to_vec()));
                },
            )
            .unwrap();
        assert!(!status.timed_out, "stdout was not streamed before exit");
        assert!(status.success());
        let seq: Vec<(char, String)> = events
            .iter()
            .map(|(k, d)| (*k, String::from_utf8_lossy(d).into_owned()))
            .collect();
        let pos = |needle: &str| seq.iter().position(|(_, s)| s.contains(needle)).unwrap();
        assert!(
            pos("one") < pos("two") && pos("two") < pos("three"),
            "{seq:?}"
        );
        assert_eq!(seq[pos("two")].0, 'e');
    }

    #[test]
    fn exec_timeout_kills_the_whole_process_group() {
        let agent = Agent::start();
        let mut c = agent.client();
        let mut stdout = Vec::new();
        let status = c
            .exec(
                &ExecRequest {
                    timeout_ms: Some(300),
                    ..sh("sleep 1000 & echo $!; wait")
                },
                |d| stdout.extend_from_slice(d),
                |_| {},
            )
            .unwrap();
        assert!(status.timed_out);
        assert_eq!(status.signal, Some(9));
        assert_eq!(status.code, None);
        let bg: i32 = String::from_utf8(stdout).unwrap().trim().parse().unwrap();
        wait_gone(bg);
    }

    #[test]
    fn exec_as_nobody_and_as_a_bare_uid_switches_ids_and_cwd() {
        let agent = Agent::start();
        let mut c = agent.client();
        let out = c
            .exec_output(&ExecRequest {
                user: Some(User::Name("nobody".into())),
                ..sh("id -u; id -g; id -G; echo $USER")
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "65534");
        assert_eq!(lines[1], "65534");
        assert_eq!(lines[2], "65534");
        assert_eq!(lines[3], "nobody");

        let out = c
            .exec_output(&ExecRequest {
                user: Some(User::Uid(4242)),
                ..sh("id -u; id -g; id -G; pwd")
            })
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text, "4242\n4242\n4242\n/\n");
    }

    #[test]
    fn exec_uses_cwd_and_env_and_reports_signals() {
        let agent = Agent::start();
        let mut c = agent.client();
        let out = c
            .exec_output(&ExecRequest {
                cwd: Some("/usr".into()),
                env: vec![("FOO".into(), "bar baz".into())],
                ..sh("pwd; echo \"$FOO\"; echo $HOME")
            })
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "/usr\nbar baz\n/root\n"
        );
        let out = c.exec_output(&sh("kill -TERM $$")).unwrap();
        assert_eq!(out.status.signal, Some(15));
        assert_eq!(out.status.code, None);
    }

    #[test]
    fn exec_errors_are_reported_and_keep_the_connection() {
        let agent = Agent::start();
        let mut c = agent.client();
        match c.exec_output(&ExecRequest::new(["no-such-program-xyz"])) {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
            other => panic!("expected not found, got {other:?}"),
        }
        match c.exec_output(&ExecRequest {
            cwd: Some("/no/such/dir".into()),
            ..ExecRequest::new(["true"])
        }) {
            Err(ClientError::Agent(e)) => {
                assert_eq!(e.kind, ErrorKind::NotFound);
                assert!(e.message.contains("chdir"), "{e}");
            }
            other => panic!("expected chdir failure, got {other:?}"),
        }
        match c.exec_output(&ExecRequest {
            user: Some(User::Name("no-such-user-xyz".into())),
            ..ExecRequest::new(["true"])
        }) {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::InvalidInput),
            other => panic!("expected unknown user, got {other:?}"),
        }
        c.ping().unwrap();
    }

    #[test]
    fn concurrent_execs_on_separate_connections_all_run_at_once() {
        let agent = Agent::start();
        let n = 8;
        let markers = agent.tmp().join("markers");
        std::fs::create_dir(&markers).unwrap();
        // Each process waits until all n have started: only concurrent execution finishes.
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let mut c = agent.client();
                let script = format!(
                    "touch {m}/{i}; while [ $(ls {m} | wc -l) -lt {n} ]; do sleep 0.01; done; echo done-{i}",
                    m = markers.display()
                );
                std::thread::spawn(move || {
                    c.exec_output(&ExecRequest {
                        timeout_ms: Some(60_000),
                        ..sh(&script)
                    })
                    .unwrap()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let out = h.join().unwrap();
            assert!(
                !out.status.timed_out,
                "exec {i} never saw the others running"
            );
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                format!("done-{i}\n")
            );
        }
    }

    #[test]
    fn file_operations_write_read_list_stat_mkdir_remove() {
        let agent = Agent::start();
        let mut c = agent.client();
        let base = agent.tmp().join("files");
        let base = base.to_str().unwrap();

        c.mkdir(&format!("{base}/a/b/c"), 0o750, true).unwrap();
        assert_eq!(
            std::fs::metadata(format!("{base}/a/b/c"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o750
        );
        // mkdir -p of an existing directory is fine; plain mkdir is not.
        c.mkdir(&format!("{base}/a/b/c"), 0o700, true).unwrap();
        match c.mkdir(&format!("{base}/a/b/c"), 0o700, false) {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::AlreadyExists),
            other => panic!("{other:?}"),
        }

        let path = format!("{base}/new/dir/file.txt");
        let data: Vec<u8> = (0..700_000u32)
            .map(|i| (i % 253).to_le_bytes()[0])
            .collect();
        let req = WriteFileRequest {
            mode: 0o640,
            create_parents: true,
            uid: Some(65534),
            gid: Some(65534),
            ..WriteFileRequest::new(&path)
        };
        c.write_file(&req, &data).unwrap();
        assert_eq!(c.read_file(&path).unwrap(), data);
        let st = c.stat(&path, false).unwrap();
        assert_eq!(
            (st.kind, st.size, st.mode, st.uid, st.gid),
            (FileKind::File, 700_000, 0o640, 65534, 65534)
        );

        let mut part = Vec::new();
        assert_eq!(c.read_file_to(&path, 10, Some(5), &mut part).unwrap(), 5);
        assert_eq!(part, &data[10..15]);

        c.write_file(
            &WriteFileRequest {
                append: true,
                ..WriteFileRequest::new(&path)
            },
            b"tail",
        )
        .unwrap();
        assert_eq!(c.stat(&path, false).unwrap().size, 700_004);
        // Replacing keeps no temporary files behind.
        c.write_file(&WriteFileRequest::new(&path), b"small")
            .unwrap();
        assert_eq!(c.read_file(&path).unwrap(), b"small");

        std::os::unix::fs::symlink("file.txt", format!("{base}/new/dir/link")).unwrap();
        let mut names: Vec<(String, FileKind)> = c
            .list_dir(&format!("{base}/new/dir"))
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.stat.kind))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            names,
            vec![
                ("file.txt".into(), FileKind::File),
                ("link".into(), FileKind::Symlink)
            ]
        );
        let link = c.stat(&format!("{base}/new/dir/link"), false).unwrap();
        assert_eq!(link.symlink_target.as_deref(), Some("file.txt"));
        assert_eq!(
            c.stat(&format!("{base}/new/dir/link"), true).unwrap().kind,
            FileKind::File
        );

        match c.remove(&format!("{base}/new"), false) {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::InvalidInput),
            other => panic!("non-recursive remove of a full dir: {other:?}"),
        }
        c.remove(&format!("{base}/new"), true).unwrap();
        match c.stat(&format!("{base}/new"), false) {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
        match c.read_file("relative/path") {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::InvalidInput),
            other => panic!("{other:?}"),
        }
        // A write into a missing directory fails at the end and leaves the connection usable.
        match c.write_file(&WriteFileRequest::new(format!("{base}/missing/x")), b"x") {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
        c.ping().unwrap();
    }

    #[test]
    fn restored_sets_hostname_and_machine_id_and_reseeds() {
        let agent = Agent::start_with(&["unshare", "--uts"]);
        let mut c = agent.client();
        let mut req = RestoredRequest::fresh(Some("fork-7".into())).unwrap();
        let id = req.machine_id.clone().unwrap();
        let ack = c.restored(&req).unwrap();
        assert_eq!(ack.entropy_bytes, 64);
        let out = c.exec_output(&ExecRequest::new(["hostname"])).unwrap();
        assert_eq!(out.stdout, b"fork-7\n");
        let etc = agent.tmp().join("etc");
        assert_eq!(
            std::fs::read_to_string(etc.join("machine-id")).unwrap(),
            format!("{id}\n")
        );
        assert_eq!(
            std::fs::read_to_string(etc.join("hostname")).unwrap(),
            "fork-7\n"
        );
        // A later client sees the new hostname in the handshake.
        assert_eq!(agent.client().info().hostname, "fork-7");
        // Invalid input is refused as a whole.
        req.machine_id = Some("XYZ".into());
        match c.restored(&req) {
            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::InvalidInput),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn power_off_outside_a_vm_acknowledges_and_exits() {
        let mut agent = Agent::start();
        let mut c = agent.client();
        c.power_off().unwrap();
        let status = agent.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }

    fn connect_raw(agent: &Agent) -> UnixStream {
        for _ in 0..2000 {
            if let Ok(s) = UnixStream::connect(&agent.sock) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the agent never created {}", agent.sock.display());
    }

    fn raw(agent: &Agent) -> UnixStream {
        let mut s = connect_raw(agent);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        frame::write_frame(
            &mut s,
            &Request::Hello {
                min_version: 1,
                max_version: 1,
                client: "raw".into(),
            },
        )
        .unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(r, Response::Hello(_)));
        s
    }

    #[test]
    fn garbage_frames_get_an_error_and_oversized_frames_close_the_connection() {
        let agent = Agent::start();
        let mut s = raw(&agent);
        s.write_all(&4u32.to_be_bytes()).unwrap();
        s.write_all(b"junk").unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(
            matches!(r, Response::Error(ref e) if e.kind == ErrorKind::Protocol),
            "{r:?}"
        );
        frame::write_frame(&mut s, &Request::Ping).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(r, Response::Pong { .. }));
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap(),
            0,
            "connection should be closed"
        );
    }

    #[test]
    fn version_mismatch_is_refused() {
        let agent = Agent::start();
        let mut s = connect_raw(&agent);
        frame::write_frame(
            &mut s,
            &Request::Hello {
                min_version: specc_protocol::PROTOCOL_VERSION + 1,
                max_version: specc_protocol::PROTOCOL_VERSION + 2,
                client: "future".into(),
            },
        )
        .unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(r, Response::Error(ref e) if e.kind == ErrorKind::UnsupportedVersion));
    }

    #[test]
    fn connect_pipes_a_tcp_service_while_other_connections_keep_serving() {
        let agent = Agent::start();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).unwrap();
            s.write_all(format!("got {} bytes\n", req.len()).as_bytes())
                .unwrap();
            req
        });
        let mut pipe = agent.client().connect_port(port).unwrap();
        // The pipe is open and idle: another connection still runs requests.
        let out = agent
            .client()
            .exec_output(&ExecRequest::new(["echo", "alongside"]))
            .unwrap();
        assert_eq!(out.stdout, b"alongside\n");
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        pipe.write_all(&body).unwrap();
        pipe.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        pipe.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 300000 bytes\n");
        assert!(
            service.join().unwrap() == body,
            "the service got other bytes"
        );
    }

    #[test]
    fn connect_to_a_closed_port_is_refused_and_keeps_the_connection() {
        let agent = Agent::start();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut s = connect_raw(&agent);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        frame::write_frame(
            &mut s,
            &Request::Hello {
                min_version: 1,
                max_version: 2,
                client: "raw".into(),
            },
        )
        .unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(
            matches!(r, Response::Hello(ref i) if i.version == 2),
            "{r:?}"
        );
        frame::write_frame(&mut s, &Request::Connect { port }).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(
            matches!(r, Response::Error(ref e) if e.kind == ErrorKind::ConnectionRefused
                && e.errno == Some(libc::ECONNREFUSED)),
            "{r:?}"
        );
        frame::write_frame(&mut s, &Request::Ping).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(r, Response::Pong { .. }), "{r:?}");
    }

    #[test]
    fn connect_on_a_version_1_connection_is_a_protocol_error() {
        let agent = Agent::start();
        // `raw` says hello as a version-1 host.
        let mut s = raw(&agent);
        frame::write_frame(&mut s, &Request::Connect { port: 1 }).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(
            matches!(r, Response::Error(ref e) if e.kind == ErrorKind::Protocol),
            "{r:?}"
        );
    }

    #[test]
    fn dropping_the_connection_kills_the_running_exec() {
        let agent = Agent::start();
        let mut s = raw(&agent);
        frame::write_frame(&mut s, &Request::Exec(ExecRequest::new(["sleep", "1000"]))).unwrap();
        let Response::ExecStarted { pid } = frame::read_frame(&mut s).unwrap().unwrap() else {
            panic!("no exec_started");
        };
        assert!(!process_gone(pid));
        drop(s);
        wait_gone(pid);
    }

    #[test]
    fn exec_on_a_pty_has_a_controlling_terminal_and_merges_stderr() {
        let agent = Agent::start();
        let mut c = agent.client();
        let mut out = Vec::new();
        let status = c
            .exec_with_stdin(
                &ExecRequest {
                    pty: Some(PtySize {
                        rows: 40,
                        cols: 100,
                    }),
                    timeout_ms: Some(30_000),
                    ..sh("tty; stty size; echo err >&2; echo $TERM; read x; echo got:$x")
                },
                &mut b"hello\n".as_slice(),
                |d| out.extend_from_slice(d),
                |_| panic!("a pty has no separate stderr"),
            )
            .unwrap();
        assert!(status.success(), "{status:?}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("/dev/pts/"), "{text:?}");
        assert!(text.contains("40 100\r\n"), "{text:?}");
        assert!(text.contains("err\r\n"), "{text:?}");
        assert!(text.contains("xterm-256color"), "{text:?}");
        assert!(text.contains("got:hello"), "{text:?}");
    }

    #[test]
    fn resize_changes_the_pty_size_of_the_running_process() {
        let agent = Agent::start();
        let mut s = raw(&agent);
        let req = ExecRequest {
            pty: Some(PtySize { rows: 24, cols: 80 }),
            stdin: true,
            timeout_ms: Some(30_000),
            ..sh("stty size; read x; stty size")
        };
        frame::write_frame(&mut s, &Request::Exec(req)).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(r, Response::ExecStarted { .. }), "{r:?}");
        let mut out = Vec::new();
        // Resize only once the first size is printed, or the shell may not have run yet.
        while !String::from_utf8_lossy(&out).contains("24 80") {
            match frame::read_frame::<_, Response>(&mut s).unwrap().unwrap() {
                Response::Stdout { data } => out.extend(data),
                other => panic!("{other:?}"),
            }
        }
        frame::write_frame(
            &mut s,
            &Request::Resize(PtySize {
                rows: 50,
                cols: 132,
            }),
        )
        .unwrap();
        frame::write_frame(
            &mut s,
            &Request::Stdin {
                data: b"\n".to_vec(),
            },
        )
        .unwrap();
        loop {
            match frame::read_frame::<_, Response>(&mut s).unwrap().unwrap() {
                Response::Stdout { data } => out.extend(data),
                Response::Exit(st) => {
                    assert!(st.success(), "{st:?}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let text = String::from_utf8_lossy(&out);
        let first = text.find("24 80").expect("initial size");
        let second = text.find("50 132").expect("size after resize");
        assert!(first < second, "{text:?}");
    }

    #[test]
    fn kill_request_signals_the_process_group() {
        let agent = Agent::start();
        let mut s = raw(&agent);
        frame::write_frame(&mut s, &Request::Exec(ExecRequest::new(["sleep", "1000"]))).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(r, Response::ExecStarted { .. }));
        frame::write_frame(&mut s, &Request::Kill { signal: 15 }).unwrap();
        let r: Response = frame::read_frame(&mut s).unwrap().unwrap();
        let Response::Exit(st) = r else {
            panic!("{r:?}")
        };
        assert_eq!(st.signal, Some(15));
    }
}

/// The agent as PID 1 of fresh mount, pid, UTS and network namespaces, chrooted into a tiny
/// busybox tree: what it does first in a VM, without a VM.
#[cfg(test)]
mod pid1 {
    use std::os::unix::fs::symlink;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use specc_protocol::{Client, ExecRequest};

    fn copy_with_libs(tree: &Path, bin: &Path, dest: &str) {
        let d = tree.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        std::fs::copy(bin, &d).unwrap();
        // The test build of the agent is dynamic: bring its libraries along.
        let ldd = Command::new("ldd").arg(bin).output().unwrap();
        for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
            if word.starts_with('/') && Path::new(word).is_file() {
                let target = tree.join(word.trim_start_matches('/'));
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(word, target).unwrap();
            }
        }
    }

    #[test]
    fn pid1_mounts_brings_up_lo_reaps_orphans_and_powers_off() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "namespaces and chroot need root");
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        for d in [
            "bin", "sbin", "etc", "sock", "dev", "proc", "sys", "run", "tmp",
        ] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .expect("busybox-static provides /bin/busybox");
        for applet in ["sh", "cat", "sleep", "ls", "mount", "hostname", "echo"] {
            symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        copy_with_libs(
            &tree,
            Path::new(env!("CARGO_BIN_EXE_specc-agent")),
            "/sbin/init",
        );
        std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(tree.join("etc/group"), "root:x:0:\ntty:x:5:\n").unwrap();
        std::fs::write(tree.join("etc/hostname"), "pid1-test\n").unwrap();

        let mut child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--uts",
                "--net",
                "--propagation",
                "private",
            ])
            .arg("chroot")
            .arg(&tree)
            .args([
                "/sbin/init",
                "--listen",
                "unix:/sock/agent.sock",
                "stray-kernel-word",
            ])
            .env("SPECC_AGENT_CONSOLE", "/console.log")
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux)");
        let mut c = Client::connect_unix(&tree.join("sock/agent.sock"), Duration::from_secs(30))
            .expect("the PID 1 agent answers");
        assert!(c.info().pid1);
        assert_eq!(c.info().hostname, "pid1-test");

        let run = |c: &mut Client<_>, script: &str| {
            let out = c
                .exec_output(&ExecRequest::new(["sh", "-c", script]))
                .unwrap();
            assert!(out.status.success(), "{script}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let mounts = run(&mut c, "cat /proc/mounts");
        for m in [
            "devtmpfs /dev ",
            "proc /proc ",
            "sysfs /sys ",
            "devpts /dev/pts ",
            "tmpfs /run ",
            "tmpfs /tmp ",
        ] {
            assert!(mounts.contains(m), "{m:?} not mounted:\n{mounts}");
        }
        // IFF_UP | IFF_LOOPBACK (| IFF_RUNNING once the kernel marks it).
        let flags = run(&mut c, "cat /sys/class/net/lo/flags");
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 0x9, 0x9, "lo is not up: {flags:#x}");
        assert_eq!(run(&mut c, "hostname"), "pid1-test\n");

        // An orphan is re-parented to PID 1, the agent, which must reap it.
        let orphan = run(&mut c, "sleep 0.2 & echo $!");
        let orphan = orphan.trim();
        let mut reaped = false;
        for _ in 0..500 {
            let st = run(
                &mut c,
                &format!("cat /proc/{orphan}/stat 2>/dev/null || echo gone"),
            );
            if st.trim() == "gone" {
                reaped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(reaped, "orphan {orphan} was never reaped by PID 1");

        c.power_off().unwrap();
        let status = child.wait().unwrap();
        // reboot(2) in a child pid namespace ends its init with SIGINT for a power off and
        // SIGHUP for a restart (reboot(2), NOTES); without ACPI the agent resets.
        use std::os::unix::process::ExitStatusExt;
        let log = std::fs::read_to_string(tree.join("console.log")).unwrap();
        let expected = if log.contains("powering off (ACPI)") {
            libc::SIGINT
        } else {
            assert!(log.contains("powering off through a reset"), "{log}");
            libc::SIGHUP
        };
        assert_eq!(status.signal(), Some(expected), "{status:?}\n{log}");
        for line in [
            "starting as PID 1",
            "mounted proc on /proc",
            "lo is up",
            "ignoring argument",
            "power off requested",
        ] {
            assert!(log.contains(line), "console log lacks {line:?}:\n{log}");
        }
    }
}
