//! A real registry for tests: Debian's `docker-registry` (distribution 2.8) on a free loopback
//! port with its storage in a temp dir, killed on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use specc_store::registry::{Client, Options, Reference};

/// Where Debian's package puts it.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running `docker-registry`, killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts one and waits until it answers `/v2/` (panics, with its log, after 30 s).
    pub fn start() -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry package \
             (testsuite/scripts/setup-host.sh does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write config");
        let log = File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        let mut reg = Registry { child, port, dir };
        let r: Reference = format!("127.0.0.1:{port}/ping").parse().expect("ref");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Client::new(&r, &Options::default()).ping().is_ok() {
                break;
            }
            if let Some(st) = reg.child.try_wait().expect("wait") {
                panic!("docker-registry exited with {st}: {}", reg.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer /v2/ within 30 s: {}",
                reg.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    /// `127.0.0.1:<port>/<repo_tag>`.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Upload sessions the registry has started (one per uploaded blob).
    pub fn uploads_started(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("POST /v2/") && l.contains("/blobs/uploads/"))
            .count()
    }

    /// The registry's own file for blob `digest`.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
