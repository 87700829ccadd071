//! `specc vm ...`: a client of the specd API (create, ls, show, fork, pause, resume, suspend,
//! wake, stop, start, exec, cp, logs, rm).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use base64::Engine as _;
use specd::api::{self, CreateVm, ExecEvent, IdlePolicy, Persistence, Source, Vm};
use specd::client::Client;

/// Arguments of `specc vm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The daemon's socket [default: $SPECD_SOCKET, else $SPECC_HOME/specd/run/specd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Start a VM from a built layer, an OCI layout or a registry artifact.
    Create(CreateArgs),
    /// List VMs.
    Ls,
    /// Show one VM.
    Show(IdArg),
    /// Fork a VM into N independent running VMs.
    Fork(ForkArgs),
    /// Stop a VM's vCPUs (memory kept).
    Pause(IdArg),
    /// Resume a paused VM.
    Resume(IdArg),
    /// Write a VM's memory and state to disk and end its process.
    Suspend(IdArg),
    /// Restore a suspended VM (or resume a paused one).
    Wake(IdArg),
    /// Power a VM off: only its disk is kept (memory is discarded); exec needs `start` first.
    Stop(IdArg),
    /// Cold-boot a stopped VM from its disk (or wake a suspended one).
    Start(IdArg),
    /// Run a command in a VM (waking it if needed); exits with the command's status.
    Exec(ExecArgs),
    /// Copy a file into (`cp FILE VM:/path`) or out of (`cp VM:/path FILE`) a VM.
    Cp(CpArgs),
    /// Print the end of a VM's console.
    Logs(LogsArgs),
    /// Delete a VM and its files.
    Rm(IdArg),
}

#[derive(Debug, clap::Args)]
struct IdArg {
    /// The VM's id.
    id: String,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// A layer's cache key (as `specc build --json` or `specc store ls` shows it).
    #[arg(long, value_name = "KEY", conflicts_with_all = ["oci", "reference"])]
    layer: Option<String>,
    /// An OCI image layout written by `specc build -o`.
    #[arg(long, value_name = "DIR", conflicts_with = "reference")]
    oci: Option<PathBuf>,
    /// A registry reference `host[:port]/repo[:tag|@digest]`.
    #[arg(long = "ref", value_name = "REF")]
    reference: Option<String>,
    /// Name and hostname.
    #[arg(long)]
    name: Option<String>,
    /// ephemeral, sticky or persistent (default: the artifact's spec says, else persistent).
    #[arg(long)]
    persistence: Option<String>,
    /// Priority of a sticky VM, 0 (evicted first) to 10.
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// Pause after this many idle seconds (with --suspend-after, replaces the spec's `idle`).
    #[arg(long, value_name = "SECS")]
    pause_after: Option<u64>,
    /// Suspend after this many idle seconds.
    #[arg(long, value_name = "SECS")]
    suspend_after: Option<u64>,
    /// No idle timers, whatever the artifact's spec says.
    #[arg(long, conflicts_with_all = ["pause_after", "suspend_after"])]
    no_idle: bool,
    /// Expose a guest TCP port on the daemon host's loopback (repeatable; replaces the spec's
    /// `expose`).
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Expose no ports, whatever the artifact's spec says.
    #[arg(long, conflicts_with = "ports")]
    no_ports: bool,
    /// Give the guest a network.
    #[arg(long)]
    net: bool,
}

#[derive(Debug, clap::Args)]
struct ForkArgs {
    /// The VM's id.
    id: String,
    /// How many children.
    #[arg(short = 'n', long, default_value_t = 1)]
    count: u32,
    /// How the children get the source's memory: `precopy` (copied while the source runs; a
    /// short pause whatever its size, the default) or `cow` (shared copy-on-write by
    /// `fork(2)`: nothing copied, a pause that grows with the source's memory).
    #[arg(long, value_parser = ["cow", "precopy"])]
    mode: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// The VM's id.
    id: String,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Pass this process's stdin through to the command, as it comes (its end closes the
    /// command's stdin).
    #[arg(short = 'i', long)]
    stdin: bool,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variable NAME=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct CpArgs {
    /// Source: a local file or VM:/path.
    from: String,
    /// Destination: a local file or VM:/path.
    to: String,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// The VM's id.
    id: String,
    /// How many lines.
    #[arg(short = 'n', long, default_value_t = 100)]
    lines: usize,
}

fn socket(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(specd::default_socket)
}

fn print_vms(vms: &[Vm], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(vms)?);
        return Ok(());
    }
    println!(
        "{:<14} {:<24} {:<10} {:<12} {:>9} {:>8}",
        "ID", "NAME", "STATE", "PERSISTENCE", "DISK MiB", "PID"
    );
    for v in vms {
        let persistence = match v.persistence {
            Persistence::Ephemeral => "ephemeral".to_owned(),
            Persistence::Sticky { priority } => format!("sticky:{priority}"),
            Persistence::Persistent => "persistent".to_owned(),
        };
        println!(
            "{:<14} {:<24} {:<10} {:<12} {:>9.1} {:>8}",
            v.id,
            v.name,
            v.state.as_str(),
            persistence,
            v.disk_bytes as f64 / f64::from(1u32 << 20),
            v.pid.map(|p| p.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

fn print_vm(vm: &Vm, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(vm)?);
    } else {
        print_vms(std::slice::from_ref(vm), false)?;
        for p in &vm.ports {
            match &p.unreachable {
                None => println!("port {} -> 127.0.0.1:{}", p.guest, p.host),
                Some(why) => println!(
                    "port {} -> 127.0.0.1:{} (NOT reachable: {why})",
                    p.guest, p.host
                ),
            }
        }
        if let Some(error) = &vm.error {
            println!("\nits VMM ended by itself: {error}");
        }
    }
    Ok(())
}

/// Runs `specc vm`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = Client::new(&socket(args.socket));
    let json = args.json;
    let post = |id: &str, op: &str| -> anyhow::Result<Vm> {
        Ok(client.call("POST", &format!("/v1/vms/{id}/{op}"), None::<&()>)?)
    };
    match args.command {
        Sub::Create(a) => {
            let source = match (a.layer, a.oci, a.reference) {
                (Some(key), None, None) => Source::Layer { key },
                (None, Some(dir), None) => Source::Layout {
                    path: std::path::absolute(&dir)?.to_string_lossy().into_owned(),
                },
                (None, None, Some(reference)) => Source::Registry { reference },
                _ => bail!("say where the VM comes from: --layer KEY, --oci DIR or --ref REF"),
            };
            let persistence = match a.persistence.as_deref() {
                None => None,
                Some("ephemeral") => Some(Persistence::Ephemeral),
                Some("sticky") => Some(Persistence::Sticky {
                    priority: a.priority,
                }),
                Some("persistent") => Some(Persistence::Persistent),
                Some(other) => {
                    bail!("--persistence is ephemeral, sticky or persistent, not {other}")
                }
            };
            // Flags given replace what the artifact's spec says; flags left out leave it.
            let idle = (a.no_idle || a.pause_after.is_some() || a.suspend_after.is_some())
                .then_some(IdlePolicy {
                    pause_after_s: a.pause_after,
                    suspend_after_s: a.suspend_after,
                });
            let ports = (a.no_ports || !a.ports.is_empty()).then_some(a.ports);
            let req = CreateVm {
                source,
                name: a.name,
                persistence,
                idle,
                ports,
                net: a.net,
            };
            let vm: Vm = client.call("POST", "/v1/vms", Some(&req))?;
            print_vm(&vm, json)?;
        }
        Sub::Ls => {
            let vms: Vec<Vm> = client.call("GET", "/v1/vms", None::<&()>)?;
            print_vms(&vms, json)?;
        }
        Sub::Show(a) => {
            let vm: Vm = client.call("GET", &format!("/v1/vms/{}", a.id), None::<&()>)?;
            print_vm(&vm, json)?;
        }
        Sub::Fork(a) => {
            let f: api::Forked = client.call(
                "POST",
                &format!("/v1/vms/{}/fork", a.id),
                Some(&api::ForkVm {
                    count: a.count,
                    mode: a.mode.as_deref().map(|m| match m {
                        "cow" => api::ForkMode::Cow,
                        _ => api::ForkMode::Precopy,
                    }),
                }),
            )?;
            if json {
                println!("{}", serde_json::to_string(&f)?);
            } else {
                let mode = match f.report.mode {
                    api::ForkMode::Cow => "cow",
                    api::ForkMode::Precopy => "precopy",
                };
                let copied = f.report.precopy.as_ref().map_or(String::new(), |p| {
                    format!(
                        ", {:.1} MiB copied in {:.1} ms before it",
                        p.copied_bytes as f64 / f64::from(1 << 20),
                        p.precopy_us as f64 / 1e3
                    )
                });
                eprintln!(
                    "source paused {:.3} ms ({mode} fork{copied})",
                    f.pause_us as f64 / 1e3
                );
                print_vms(&f.vms, false)?;
            }
        }
        Sub::Pause(a) => print_vm(&post(&a.id, "pause")?, json)?,
        Sub::Resume(a) => print_vm(&post(&a.id, "resume")?, json)?,
        Sub::Wake(a) => print_vm(&post(&a.id, "wake")?, json)?,
        Sub::Stop(a) => print_vm(&post(&a.id, "stop")?, json)?,
        Sub::Start(a) => print_vm(&post(&a.id, "start")?, json)?,
        Sub::Suspend(a) => {
            let resp = client.request("POST", &format!("/v1/vms/{}/suspend", a.id), None)?;
            if resp.status == 204 {
                if json {
                    println!("{{\"deleted\":true}}");
                } else {
                    println!("{} was ephemeral: deleted", a.id);
                }
            } else {
                print_vm(&resp.json()?, json)?;
            }
        }
        Sub::Exec(a) => return exec(&client, a, json),
        Sub::Cp(a) => cp(&client, &a)?,
        Sub::Logs(a) => {
            let text = client
                .request(
                    "GET",
                    &format!("/v1/vms/{}/logs?lines={}", a.id, a.lines),
                    None,
                )?
                .bytes()?;
            std::io::stdout().write_all(&text)?;
            println!();
        }
        Sub::Rm(a) => {
            client.request("DELETE", &format!("/v1/vms/{}", a.id), None)?;
            if json {
                println!("{{\"deleted\":\"{}\"}}", a.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(client: &Client, a: ExecArgs, json: bool) -> anyhow::Result<ExitCode> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = a
        .env
        .iter()
        .map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--env wants NAME=VALUE, got {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let req = api::Exec {
        argv: a.argv,
        env,
        cwd: a.cwd,
        stdin_b64: None,
        stdin_stream: a.stdin,
        timeout_ms: a.timeout.map(|s| s * 1000),
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let last = client.exec(&a.id, &req, |ev| {
        if let ExecEvent::Started {
            stdin: Some(exec), ..
        } = ev
        {
            // Fed from a thread of its own while the output streams here; when the command
            // ends first, this process exits with the thread still waiting for input.
            let (client, id, exec) = (client.clone(), a.id.clone(), exec.clone());
            std::thread::spawn(move || {
                match client.exec_stdin(&id, &exec, &mut std::io::stdin().lock()) {
                    // The command ended before it took its input.
                    Ok(()) | Err(specd::client::ClientError::Api { status: 404, .. }) => {}
                    Err(e) => eprintln!("specc vm exec: passing stdin on: {e}"),
                }
            });
        }
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(ev).unwrap_or_default());
            return;
        }
        let (w, data): (&mut dyn Write, _) = match ev {
            ExecEvent::Stdout { data_b64 } => (&mut out, data_b64),
            ExecEvent::Stderr { data_b64 } => (&mut err, data_b64),
            _ => return,
        };
        if let Ok(bytes) = b64.decode(data) {
            let _ = w.write_all(&bytes).and_then(|()| w.flush());
        }
    })?;
    match last {
        ExecEvent::Exit { code, signal, .. } => Ok(match (code, signal) {
            (Some(c), _) => crate::cmd::run::exit_code_of(c),
            (None, Some(s)) => crate::cmd::run::exit_code_of(128 + s),
            (None, None) => ExitCode::from(1),
        }),
        ExecEvent::Error { message } => bail!("exec failed: {message}"),
        _ => bail!("exec ended without a status"),
    }
}

fn cp(client: &Client, a: &CpArgs) -> anyhow::Result<()> {
    let remote = |s: &str| {
        s.split_once(':')
            .filter(|(id, p)| !id.is_empty() && p.starts_with('/'))
            .map(|(id, p)| (id.to_owned(), p.to_owned()))
    };
    let q = |p: &str| -> String {
        p.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    match (remote(&a.from), remote(&a.to)) {
        (Some((id, path)), None) => {
            let data = client
                .request(
                    "GET",
                    &format!("/v1/vms/{id}/files?path={}", q(&path)),
                    None,
                )?
                .bytes()?;
            std::fs::write(&a.to, data).with_context(|| format!("writing {}", a.to))?;
        }
        (None, Some((id, path))) => {
            let data = std::fs::read(&a.from).with_context(|| format!("reading {}", a.from))?;
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&a.from)?.permissions())
                    & 0o7777;
            client.request(
                "PUT",
                &format!("/v1/vms/{id}/files?path={}&mode={mode:o}", q(&path)),
                Some(("application/octet-stream", &data)),
            )?;
        }
        _ => bail!("cp copies between a local file and VM:/absolute/path"),
    }
    Ok(())
}
