//! Applying a layer's steps to a running guest through its agent.
//!
//! The lowering already folded `env`, `workdir` and `user` into every `run` step (each `Run`
//! carries the full environment, directory and user it sees), so those steps change nothing in
//! the guest by themselves; everything else becomes agent requests.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use specc_plan::ir::{Group, Service, Step, StepKind, User};
use specc_protocol::{
    Client, ClientError, ExecRequest, GatewayWait, RestoredRequest, User as AgentUser,
    WriteFileRequest,
};

/// The agent connection steps run over.
pub type Agent = Client<UnixStream>;

/// Where a step's output goes as it comes.
pub trait StepOutput {
    /// A chunk of the step's stdout or stderr.
    fn output(&mut self, stderr: bool, bytes: &[u8]);
}

impl<F: FnMut(bool, &[u8])> StepOutput for F {
    fn output(&mut self, stderr: bool, bytes: &[u8]) {
        self(stderr, bytes)
    }
}

/// How many bytes of a failing step's output are kept for its report.
const TAIL_BYTES: usize = 4096;

/// Errors of applying a step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A command exited non-zero, was killed, or timed out.
    #[error("`{command}` {how}")]
    Failed {
        /// The command (or what the step ran).
        command: String,
        /// "exited with 3", "was killed by signal 9", "timed out".
        how: String,
        /// Exit code, when there is one.
        code: Option<i32>,
        /// The last bytes of its combined output.
        tail: String,
    },
    /// Reading a host file to copy failed.
    #[error("cannot read {} to copy it", path.display())]
    Host {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The restored guest's default gateway did not answer: its new network backend is not
    /// attached.
    #[error(
        "the default gateway {gateway} did not answer ARP within {waited_ms} ms of the restore"
    )]
    Gateway {
        /// The guest's default gateway.
        gateway: std::net::Ipv4Addr,
        /// How long the agent waited.
        waited_ms: u64,
    },
    /// No new identity could be made for a restored guest (host randomness or clock).
    #[error("cannot make a new identity for the restored guest")]
    Identity(#[source] io::Error),
    /// The agent failed the request, or the connection broke.
    #[error("the guest agent failed {what}")]
    Agent {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: ClientError,
    },
}

/// Applies `steps` in order; `Use` steps apply their expanded steps.
pub fn apply_steps(
    agent: &mut Agent,
    steps: &[Step],
    out: &mut dyn StepOutput,
) -> Result<(), (usize, StepError)> {
    for (i, step) in steps.iter().enumerate() {
        apply_step(agent, &step.kind, out).map_err(|e| (i, e))?;
    }
    Ok(())
}

/// A step in a few words, for error messages (`run "make install"`, `copy a -> /b`).
pub fn describe(step: &StepKind) -> String {
    let short = |s: &str| {
        let line = s.lines().next().unwrap_or("");
        if line.chars().count() > 60 || s.lines().count() > 1 {
            format!("{}…", line.chars().take(60).collect::<String>())
        } else {
            line.to_owned()
        }
    };
    match step {
        StepKind::Run { cmd, .. } => format!("run {:?}", short(cmd)),
        StepKind::Copy { src, dst, .. } => format!("copy {} -> {dst}", src.display()),
        StepKind::File { path, .. } => format!("file {path}"),
        StepKind::Env { .. } => "env".into(),
        StepKind::Workdir(w) => format!("workdir {w}"),
        StepKind::User(u) => format!("user {u}"),
        StepKind::AddGroup(_) => "group".into(),
        StepKind::AddUser(_) => "user".into(),
        StepKind::Service(_) => "service".into(),
        StepKind::Repo { url, .. } => format!("repo {url}"),
        StepKind::Use { .. } => "use".into(),
    }
}

/// Applies one step.
pub fn apply_step(
    agent: &mut Agent,
    step: &StepKind,
    out: &mut dyn StepOutput,
) -> Result<(), StepError> {
    match step {
        StepKind::Run {
            cmd,
            env,
            workdir,
            user,
            secrets: _,
        } => run_shell(agent, cmd, env, workdir, user, out),
        StepKind::Copy { src, dst, .. } => copy_in(agent, src, dst, out),
        StepKind::File {
            path,
            content,
            mode,
        } => write_file(agent, path, *mode, content.as_bytes()),
        // Folded into every later `run` by the lowering (module docs).
        StepKind::Env { .. } | StepKind::Workdir(_) | StepKind::User(_) => Ok(()),
        StepKind::AddGroup(g) => run_root(agent, &add_group_script(g), out),
        StepKind::AddUser(u) => run_root(agent, &add_user_script(u), out),
        StepKind::Service(s) => install_service(agent, s, out),
        StepKind::Repo {
            url,
            reference,
            path,
        } => {
            let script = format!(
                "set -e; command -v git >/dev/null || {{ echo 'repo needs git in the guest' >&2; exit 127; }}\n\
                 if [ -d {p}/.git ]; then git -C {p} fetch --depth 1 origin {r}; \
                 else git clone --depth 1 --branch {r} {u} {p} 2>/dev/null || \
                 {{ git init -q {p} && git -C {p} fetch --depth 1 {u} {r}; }}; fi\n\
                 git -C {p} checkout -q FETCH_HEAD 2>/dev/null || true",
                p = sh_quote(path),
                r = sh_quote(reference),
                u = sh_quote(url)
            );
            run_root(agent, &script, out)
        }
        StepKind::Use { steps, .. } => {
            for s in steps {
                apply_step(agent, &s.kind, out)?;
            }
            Ok(())
        }
    }
}

/// Brings the guest's `eth0` up by DHCP from its passt (busybox `udhcpc`, or systemd-networkd
/// where the guest runs systemd) and waits for the default route, so the steps that follow can
/// fetch. Done once, after boot: a VM restored from the snapshot keeps the configuration, and
/// its new passt hands out the same addresses.
pub fn configure_network(agent: &mut Agent, out: &mut dyn StepOutput) -> Result<(), StepError> {
    run_root(agent, NETWORK_SCRIPT, out)?;
    await_network(agent, out)
}

/// How long a restored guest's agent waits for the default gateway to answer.
pub const GATEWAY_WAIT: Duration = Duration::from_secs(60);

/// Gives a restored guest a new identity (clock, RNG, machine id, `hostname`) and, with `net`,
/// waits until its default gateway answers ARP: after a restore the VM talks to a new passt,
/// which may take seconds to start (under emulation), and the guest's first connection would
/// fail with "no route to host" once its ARP requests time out. The agent does the wait itself
/// over a packet socket, so it needs no tool in the guest; an agent too old for that is waited
/// for with the guest's `arping` where it has one. Returns how long the agent waited for the
/// gateway, when it did.
pub fn announce_restored(
    agent: &mut Agent,
    hostname: &str,
    net: bool,
    out: &mut dyn StepOutput,
) -> Result<Option<Duration>, StepError> {
    let mut req = RestoredRequest::fresh(Some(hostname.to_owned())).map_err(StepError::Identity)?;
    if net {
        req.await_gateway_ms = Some(u32::try_from(GATEWAY_WAIT.as_millis()).unwrap_or(u32::MAX));
    }
    let ack = agent.restored(&req).map_err(|source| StepError::Agent {
        what: "to take a new identity after the restore".into(),
        source,
    })?;
    if !net {
        return Ok(None);
    }
    match ack.gateway {
        None => await_network(agent, out).map(|()| None),
        Some(GatewayWait {
            gateway: Some(gateway),
            answered: false,
            waited_ms,
        }) => Err(StepError::Gateway { gateway, waited_ms }),
        Some(wait) => {
            tracing::debug!(?wait.gateway, wait.waited_ms, "gateway answered");
            Ok(Some(Duration::from_millis(wait.waited_ms)))
        }
    }
}

/// Waits until the gateway answers ARP, with the guest's `arping` (for agents that cannot do
/// it themselves; guests without `arping` are not waited for).
fn await_network(agent: &mut Agent, out: &mut dyn StepOutput) -> Result<(), StepError> {
    run_root(agent, AWAIT_NETWORK_SCRIPT, out)
}

const AWAIT_NETWORK_SCRIPT: &str = r#"gw=$(ip route show default 2>/dev/null | awk '{print $3; exit}')
dev=$(ip route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
if [ -z "$gw" ] || [ -z "$dev" ] || ! command -v arping >/dev/null; then exit 0; fi
i=0
until arping -q -c 1 -w 1 -I "$dev" "$gw" >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then echo "network: the gateway $gw does not answer ARP on $dev after 60 tries" >&2; exit 1; fi
done
"#;

const NETWORK_SCRIPT: &str = r#"set -e
if [ ! -d /run/systemd/system ]; then
    command -v udhcpc >/dev/null || { echo "network: the guest has neither systemd-networkd nor udhcpc" >&2; exit 127; }
    cat > /run/specc-dhcp.sh <<'EOF'
#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    if [ -n "$dns" ]; then
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    fi
    ;;
esac
EOF
    chmod 755 /run/specc-dhcp.sh
    ip link set eth0 up
    udhcpc -i eth0 -n -q -f -t 10 -s /run/specc-dhcp.sh
fi
# A default route is the sign that DHCP is done (networkd runs it on its own).
i=0
until awk '$2 == "00000000" { found = 1 } END { exit !found }' /proc/net/route; do
    i=$((i + 1))
    if [ "$i" -gt 600 ]; then
        echo "network: no default route after 60 s" >&2
        # What the guest knows, for the error's last lines.
        ip addr >&2 2>&1 || true
        if [ -d /run/systemd/system ]; then
            networkctl list --no-pager >&2 2>&1 || true
            journalctl -b --no-pager -n 25 -u systemd-networkd >&2 2>&1 || true
        fi
        exit 1
    fi
    sleep 0.1
done
"#;

fn run_root(agent: &mut Agent, script: &str, out: &mut dyn StepOutput) -> Result<(), StepError> {
    run_shell(agent, script, &BTreeMap::new(), "/", "root", out)
}

fn run_shell(
    agent: &mut Agent,
    cmd: &str,
    env: &BTreeMap<String, String>,
    workdir: &str,
    user: &str,
    out: &mut dyn StepOutput,
) -> Result<(), StepError> {
    let mut req = ExecRequest::new(["/bin/sh", "-c", cmd]);
    req.env = env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    req.cwd = Some(workdir.to_owned());
    req.user = Some(match user.parse::<u32>() {
        Ok(uid) => AgentUser::Uid(uid),
        Err(_) => AgentUser::Name(user.to_owned()),
    });
    let tail = std::cell::RefCell::new(Vec::<u8>::new());
    let keep = |b: &[u8]| {
        let mut t = tail.borrow_mut();
        t.extend_from_slice(b);
        let excess = t.len().saturating_sub(TAIL_BYTES);
        t.drain(..excess);
    };
    let out = std::cell::RefCell::new(out);
    let started = Instant::now();
    let status = agent
        .exec(
            &req,
            |b| {
                keep(b);
                out.borrow_mut().output(false, b);
            },
            |b| {
                keep(b);
                out.borrow_mut().output(true, b);
            },
        )
        .map_err(|source| StepError::Agent {
            what: format!("to run `{}`", first_line(cmd)),
            source,
        })?;
    tracing::debug!(cmd = first_line(cmd), elapsed = ?started.elapsed(), ?status, "ran");
    if status.success() {
        return Ok(());
    }
    let how = match (status.code, status.signal, status.timed_out) {
        (_, _, true) => "timed out".to_owned(),
        (Some(c), _, _) => format!("exited with {c}"),
        (None, Some(s), _) => format!("was killed by signal {s}"),
        (None, None, _) => "ended without an exit status".to_owned(),
    };
    Err(StepError::Failed {
        command: first_line(cmd).to_owned(),
        how,
        code: status.code,
        tail: String::from_utf8_lossy(&tail.into_inner()).into_owned(),
    })
}

fn first_line(cmd: &str) -> &str {
    cmd.lines().next().unwrap_or_default()
}

fn write_file(agent: &mut Agent, path: &str, mode: u32, data: &[u8]) -> Result<(), StepError> {
    let mut req = WriteFileRequest::new(path);
    req.mode = mode;
    req.create_parents = true;
    agent
        .write_file(&req, data)
        .map_err(|source| StepError::Agent {
            what: format!("to write {path}"),
            source,
        })
}

/// Copies a host file or directory tree to `dst` in the guest: regular files with their
/// permission bits, directories, and symlinks (through the guest's `ln`).
fn copy_in(
    agent: &mut Agent,
    src: &Path,
    dst: &str,
    out: &mut dyn StepOutput,
) -> Result<(), StepError> {
    let host = |path: &Path| {
        let path = path.to_owned();
        move |source| StepError::Host { path, source }
    };
    let meta = fs::symlink_metadata(src).map_err(host(src))?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(host(src))?;
        let script = format!(
            "ln -sfn {} {}",
            sh_quote(&target.to_string_lossy()),
            sh_quote(dst)
        );
        return run_root(agent, &script, out);
    }
    if meta.is_dir() {
        agent
            .mkdir(dst, meta.permissions().mode() & 0o7777, true)
            .map_err(|source| StepError::Agent {
                what: format!("to create {dst}"),
                source,
            })?;
        let mut entries = fs::read_dir(src)
            .map_err(host(src))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(host(src))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let child = format!("{}/{}", dst.trim_end_matches('/'), name.to_string_lossy());
            copy_in(agent, &e.path(), &child, out)?;
        }
        return Ok(());
    }
    let mut file = fs::File::open(src).map_err(host(src))?;
    let mut req = WriteFileRequest::new(dst);
    req.mode = meta.permissions().mode() & 0o7777;
    req.create_parents = true;
    let mut reader = HostReader {
        inner: &mut file,
        error: None,
    };
    let result = agent.write_file_from(&req, &mut reader);
    if let Some(source) = reader.error {
        return Err(StepError::Host {
            path: src.to_owned(),
            source,
        });
    }
    result.map(|_| ()).map_err(|source| StepError::Agent {
        what: format!("to write {dst}"),
        source,
    })
}

/// Remembers a host read error, so that it is reported as the host's fault, not the agent's.
struct HostReader<'a> {
    inner: &'a mut fs::File,
    error: Option<io::Error>,
}

impl Read for HostReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            self.error = Some(io::Error::new(e.kind(), e.to_string()));
        })
    }
}

/// A shell script that creates group `g` with busybox's `addgroup` or shadow's `groupadd`,
/// whichever the guest has; an existing group is left alone.
fn add_group_script(g: &Group) -> String {
    let gid = g.gid.map(|id| id.to_string());
    let name = sh_quote(&g.name);
    let shadow_gid = gid
        .as_ref()
        .map(|id| format!("-g {id} "))
        .unwrap_or_default();
    format!(
        "grep -q '^{raw}:' /etc/group && exit 0\n\
         if command -v groupadd >/dev/null; then groupadd {shadow_gid}{name}; \
         else addgroup {shadow_gid}{name}; fi",
        raw = g.name,
    )
}

/// A shell script that creates user `u` (home directory, shell, supplementary groups).
fn add_user_script(u: &User) -> String {
    let name = sh_quote(&u.name);
    let home = u
        .home
        .clone()
        .unwrap_or_else(|| format!("/home/{}", u.name));
    let shell = u.shell.clone().unwrap_or_else(|| "/bin/sh".to_owned());
    let uid = u.uid.map(|id| format!("-u {id} ")).unwrap_or_default();
    let mut s = format!(
        "set -e\nif ! grep -q '^{raw}:' /etc/passwd; then\n\
         if command -v useradd >/dev/null; then useradd -m {uid}-d {home} -s {shell} {name}; \
         else adduser -D {uid}-h {home} -s {shell} {name}; fi\nfi\n",
        raw = u.name,
        home = sh_quote(&home),
        shell = sh_quote(&shell),
    );
    for g in &u.groups {
        let g = sh_quote(g);
        s.push_str(&format!(
            "if command -v usermod >/dev/null; then usermod -aG {g} {name}; \
             else addgroup {name} {g}; fi\n"
        ));
    }
    s
}

/// Installs a service: a systemd unit where the guest runs systemd, else an entry the agent
/// supervises (`/etc/specc/services/<name>.json`, read by the agent at start).
fn install_service(
    agent: &mut Agent,
    s: &Service,
    out: &mut dyn StepOutput,
) -> Result<(), StepError> {
    let has_systemd = agent.stat("/run/systemd/system", true).is_ok();
    if has_systemd {
        let mut unit = format!(
            "[Unit]\nDescription=specc service {name}\nAfter=network.target\n\n[Service]\n\
             ExecStart=/bin/sh -c {exec}\nRestart={restart}\n",
            name = unit_escape(&s.name),
            exec = unit_quote(&s.exec),
            restart = s.restart.as_str(),
        );
        if let Some(u) = &s.user {
            unit.push_str(&format!("User={}\n", unit_escape(u)));
        }
        if let Some(w) = &s.workdir {
            unit.push_str(&format!("WorkingDirectory={}\n", unit_escape(w)));
        }
        for (k, v) in &s.env {
            unit.push_str(&format!(
                "Environment={}\n",
                unit_quote(&format!("{k}={v}"))
            ));
        }
        unit.push_str("\n[Install]\nWantedBy=multi-user.target\n");
        let path = format!("/etc/systemd/system/{}.service", s.name);
        write_file(agent, &path, 0o644, unit.as_bytes())?;
        let name = sh_quote(&format!("{}.service", s.name));
        return run_root(
            agent,
            &format!("systemctl daemon-reload && systemctl enable --now {name}"),
            out,
        );
    }
    let json = serde_json::json!({
        "name": s.name,
        "exec": s.exec,
        "user": s.user,
        "workdir": s.workdir,
        "restart": s.restart.as_str(),
        "env": s.env,
    })
    .to_string();
    write_file(
        agent,
        &format!("/etc/specc/services/{}.json", s.name),
        0o644,
        json.as_bytes(),
    )?;
    // Start it now as well, detached, so later steps and the snapshot see it running.
    let mut script = String::new();
    if let Some(w) = &s.workdir {
        script.push_str(&format!("cd {} && ", sh_quote(w)));
    }
    for (k, v) in &s.env {
        script.push_str(&format!("export {}={} && ", k, sh_quote(v)));
    }
    script.push_str(&format!(
        "mkdir -p /var/log/specc && (setsid /bin/sh -c {} >>/var/log/specc/{}.log 2>&1 &)",
        sh_quote(&s.exec),
        s.name
    ));
    let user = s.user.clone().unwrap_or_else(|| "root".to_owned());
    run_shell(agent, &script, &BTreeMap::new(), "/", &user, out)
}

/// `s` with systemd's specifiers (`%s` is the user's shell, `%N` the unit's name, ...)
/// turned back into literal text.
fn unit_escape(s: &str) -> String {
    s.replace('%', "%%")
}

/// `s` as one argument of a systemd unit's command line or `Environment=`: double-quoted with
/// C escapes, and `%` and `$` doubled, since systemd expands specifiers and `$VAR` there
/// before the shell ever sees the command.
fn unit_quote(s: &str) -> String {
    let escaped = unit_escape(s)
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "$$")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_command_line_reaches_the_shell_unexpanded() {
        assert_eq!(
            unit_quote(r#"date +%s > "$f" \ done"#),
            r#""date +%%s > \"$$f\" \\ done""#
        );
        assert_eq!(unit_quote("a\nb"), r#""a\nb""#);
        assert_eq!(unit_escape("/srv/%i"), "/srv/%%i");
    }

    #[test]
    fn sh_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(sh_quote("/usr/bin"), "/usr/bin");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn user_script_adds_supplementary_groups() {
        let s = add_user_script(&User {
            name: "dev".into(),
            uid: Some(1001),
            groups: vec!["dev".into(), "wheel".into()],
            shell: Some("/bin/bash".into()),
            home: None,
        });
        assert!(
            s.contains("useradd -m -u 1001 -d /home/dev -s /bin/bash dev"),
            "{s}"
        );
        assert!(
            s.contains("adduser -D -u 1001 -h /home/dev -s /bin/bash dev"),
            "{s}"
        );
        assert!(s.contains("usermod -aG wheel dev"), "{s}");
    }
}
