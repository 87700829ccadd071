//! `specc run FILE -- CMD ARGS...`: boot the spec's VM, run CMD through the agent, stream its
//! output and exit with its exit code.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use specc_guestkit::kernel::{self, KernelKind};
use specc_guestkit::rootfs;
use specc_machine::{DEFAULT_CMDLINE, Disk, Machine, MachineConfig};
use specc_plan::ir;
use specc_protocol::messages::ExecRequest;
use specc_rig::{Placement, RigConfig};

use super::common::{CompileArgs, Format, print_diagnostics};

/// Arguments of `specc run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file.
    pub file: PathBuf,
    /// Give the guest a network (passt, user mode) even if the spec has no `vm network=#true`
    /// (only for a spec that is not built: a built snapshot has the devices it was built with).
    #[arg(long)]
    pub net: bool,
    /// Seconds to wait for the guest agent after starting the VMM.
    #[arg(long, default_value_t = 120)]
    pub agent_timeout: u64,
    /// Print where the time went (VMM start, agent ready, command) on stderr.
    #[arg(long)]
    pub timings: bool,
    /// Keep the VM's run directory (console log, VMM log, disk diff) and print where it is.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub compile: CompileArgs,
    /// The command to run in the guest, and its arguments.
    #[arg(last = true, required = true)]
    pub cmd: Vec<OsString>,
}

/// Runs `specc run`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let decision = specc_rig::decide()?;
    let opts = args.compile.options()?;
    let compiled = specc_plan::compile(&args.file, &opts)?;
    print_diagnostics(&compiled.diagnostics, &compiled.files, Format::Human)?;
    let Some(spec) = compiled.spec else {
        return Ok(ExitCode::from(1));
    };
    let argv = args
        .cmd
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .context("the command's arguments must be UTF-8")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let t0 = Instant::now();
    let guest = prepare_guest(&spec, &args.file)?;
    let prepared = t0.elapsed();
    if decision.placement == Placement::Rig {
        return rerun_in_rig(&decision, &guest);
    }

    // A built head layer (`specc build`) is restored from its snapshot; otherwise the base
    // boots and every layer's steps are applied now, uncached.
    let store = specc_store::Store::open_default().context("opening the store")?;
    let head = &spec.layers[spec.head().0];
    let built = store.layer(&head.key).ok().flatten().is_some();
    if built && args.net && !spec.vm.network {
        anyhow::bail!(
            "--net: {} is built without a network device; set `vm network=#true` in the spec \
             (and build again) for a network",
            spec.name
        );
    }
    let net = spec.vm.network || args.net;
    if net {
        prepare_rig_network()?;
    }
    let run_dir = tempfile::Builder::new()
        .prefix("specc-run-")
        .tempdir()
        .context("creating the VM's run directory")?;
    let config = MachineConfig {
        kernel: guest.kernel,
        cmdline: DEFAULT_CMDLINE.to_owned(),
        vcpus: u8::try_from(spec.vm.vcpus).context("at most 254 vCPUs")?,
        mem_bytes: spec.vm.memory,
        disk: Disk {
            layers: vec![guest.rootfs.path.clone()],
            top: run_dir.path().join("disk.diff"),
        },
        net,
    };
    let t1 = Instant::now();
    let mut machine = if built {
        let (vmstate, memory, disks) = specc_build::builder::restore_sources(&store, &head.key)?;
        let restored = MachineConfig {
            disk: Disk {
                layers: disks,
                top: run_dir.path().join("disk.diff"),
            },
            ..config
        };
        Machine::restore_image(&vmstate, &memory, &restored, run_dir.path())?
    } else {
        Machine::start(&config, run_dir.path())?
    };
    let mut agent = machine
        .connect_agent(Duration::from_secs(args.agent_timeout))
        .context("waiting for the guest agent")?;
    let ready = t1.elapsed();
    let t_layers = Instant::now();
    if built {
        let _ = store.touch_layer(&head.key);
        let mut err = std::io::stderr();
        let mut out = |_stderr: bool, b: &[u8]| {
            let _ = err.write_all(b);
        };
        specc_build::steps::announce_restored(&mut agent, &spec.name, net, &mut out)
            .context("announcing the restore to the guest (and waiting for its network)")?;
    } else {
        if net {
            let mut err = std::io::stderr();
            let mut out = |_stderr: bool, b: &[u8]| {
                let _ = err.write_all(b);
            };
            specc_build::steps::configure_network(&mut agent, &mut out)
                .context("configuring the guest's network")?;
        }
        apply_layers(&spec, &mut agent)?;
    }
    let layers_took = t_layers.elapsed();

    let t2 = Instant::now();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let status = agent
        .exec(
            &command_request(argv, &head.context),
            |b| {
                let _ = out.write_all(b).and_then(|()| out.flush());
            },
            |b| {
                let _ = err.write_all(b).and_then(|()| err.flush());
            },
        )
        .context("running the command in the guest")?;
    let ran = t2.elapsed();
    let vm_status = machine.power_off(&mut agent, Duration::from_secs(10))?;
    if args.timings {
        eprintln!(
            "specc: timings: kernel+rootfs {:.0} ms, VMM {} to agent ready {:.0} ms, \
             layers {:.0} ms, command {:.0} ms",
            prepared.as_secs_f64() * 1e3,
            if built {
                "restore from the built snapshot"
            } else {
                "boot"
            },
            ready.as_secs_f64() * 1e3,
            layers_took.as_secs_f64() * 1e3,
            ran.as_secs_f64() * 1e3
        );
    }
    if !vm_status.success() {
        eprintln!("specc: the VM did not power off cleanly ({vm_status})");
    }
    if args.keep {
        let kept = run_dir.keep();
        eprintln!("specc: VM run directory kept at {}", kept.display());
    }
    Ok(match (status.code, status.signal, status.timed_out) {
        (_, _, true) => ExitCode::from(124),
        (Some(code), _, _) => exit_code_of(code),
        (None, Some(sig), _) => exit_code_of(128 + sig),
        (None, None, _) => ExitCode::from(1),
    })
}

/// CMD as the spec's last layer leaves things: its environment, working directory and user,
/// as a `run` step at the end of the head layer would see them.
fn command_request(argv: Vec<String>, context: &ir::RunContext) -> ExecRequest {
    let mut req = ExecRequest::new(argv);
    req.env = context
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    req.cwd = Some(context.workdir.clone());
    req.user = Some(match context.user.parse::<u32>() {
        Ok(uid) => specc_protocol::User::Uid(uid),
        Err(_) => specc_protocol::User::Name(context.user.clone()),
    });
    req
}

/// Inside the rig, which has no network device, gives passt what it needs to start: an
/// interface with a default route (a tap nobody opens). A guest then reaches the rig's own
/// loopback through its gateway address, and nothing beyond. Elsewhere nothing to do.
pub(crate) fn prepare_rig_network() -> anyhow::Result<()> {
    if !specc_rig::in_rig() {
        return Ok(());
    }
    let has_default = std::fs::read_to_string("/proc/net/route")
        .context("reading /proc/net/route")?
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some("00000000"));
    if has_default {
        return Ok(());
    }
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "ip tuntap add specc-net0 mode tap && ip addr add 10.0.2.15/24 dev specc-net0 && \
             ip link set specc-net0 up && ip route add default via 10.0.2.2 dev specc-net0 onlink \
             && ip link set lo up",
        ])
        .output()
        .context("running ip(8)")?;
    anyhow::ensure!(
        out.status.success(),
        "setting up the rig's stand-in interface for passt: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Applies, in order, every layer the spec's head layer stands on (base specs' layers first).
/// Without the builder's snapshots that is the whole build, uncached: `specc build` caches it.
fn apply_layers(spec: &ir::Spec, agent: &mut specc_build::steps::Agent) -> anyhow::Result<()> {
    if let ir::Base::Spec { spec: parent, .. } = &spec.base {
        apply_layers(parent, agent)?;
    }
    let head = spec.head();
    let mut needed = vec![false; spec.layers.len()];
    needed[head.0] = true;
    // Layers are in topological order: walking backwards marks every ancestor of the head.
    for i in (0..spec.layers.len()).rev() {
        if needed[i] {
            for p in &spec.layers[i].parents {
                needed[p.0] = true;
            }
        }
    }
    let mut err = std::io::stderr();
    for (layer, _) in spec.layers.iter().zip(&needed).filter(|(_, n)| **n) {
        if layer.steps.is_empty() {
            continue;
        }
        eprintln!("specc: layer {}: {} steps", layer.name, layer.steps.len());
        let mut out = |_stderr: bool, b: &[u8]| {
            let _ = err.write_all(b);
        };
        specc_build::steps::apply_steps(agent, &layer.steps, &mut out).map_err(|(i, e)| {
            anyhow::Error::new(e).context(format!("layer `{}`, step {} failed", layer.name, i + 1))
        })?;
    }
    Ok(())
}

/// What a guest of `spec` needs, made on the host at native speed.
pub(crate) struct Guest {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The base root filesystem.
    pub rootfs: rootfs::RootfsImage,
    /// The static agent inside it.
    pub agent: PathBuf,
}

/// Builds (or finds cached) the kernel, the agent and the base root filesystem of `spec`.
pub(crate) fn prepare_guest(spec: &ir::Spec, file: &Path) -> anyhow::Result<Guest> {
    let kernel = match &spec.vm.kernel {
        Some(p) => p.clone(),
        None => {
            let k = kernel::ensure_kernel(KernelKind::Guest, &|line| eprintln!("specc: {line}"))
                .context("building the guest kernel (`specc kernel build` does it alone)")?;
            k.vmlinux
        }
    };
    let base = specc_build::keys::guest_base(&spec.base, file.parent().unwrap_or(Path::new(".")))
        .map_err(anyhow::Error::msg)?;
    let agent = rootfs::agent_binary().context("finding the guest agent")?;
    let image = rootfs::ensure_rootfs(
        &base,
        &rootfs::RootfsOptions {
            disk_bytes: spec.vm.disk,
            agent_path: agent.clone(),
        },
    )
    .with_context(|| format!("building the {} root filesystem", base.kind()))?;
    Ok(Guest {
        kernel,
        rootfs: image,
        agent,
    })
}

/// Re-runs this very command inside the rig (the VMM needs hardware-style KVM) and exits
/// with its status. Everything slow to make was made out here; inside, the same $SPECC_HOME
/// finds it cached.
pub(crate) fn rerun_in_rig(
    decision: &specc_rig::Decision,
    guest: &Guest,
) -> anyhow::Result<ExitCode> {
    eprintln!("{}", decision.line);
    // SAFETY: single-threaded here (no threads started yet), so nothing reads the environment
    // concurrently.
    unsafe {
        std::env::set_var("SPECC_AGENT_BIN", &guest.agent);
        // This process, which outlives the rig, owns the build's scratch files in the store.
        std::env::set_var(specc_store::owner::OWNER_ENV, specc_store::owner::current());
        // The rig has no route to a registry; an OCI base was pulled just now, out here.
        std::env::set_var(specc_guestkit::oci::OFFLINE_ENV, "1");
    }
    let status = specc_rig::run_self_in_rig(RigConfig::default())?;
    Ok(exit_code_of(status.code().unwrap_or(1)))
}

pub(crate) fn exit_code_of(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}
