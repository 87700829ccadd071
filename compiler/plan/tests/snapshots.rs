//! Data-driven tests: every `tests/data/**/*.kdl` is compiled and the result compared with the
//! snapshot beside it (`.plan` for `data/plan`, `.diags` for `data/diag`). Regenerate with
//! `UPDATE_EXPECT=1 cargo test -p specc-plan --test snapshots` and review the diff.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use specc_plan::ir::{Base, Spec, Step, StepKind};
use specc_plan::{Compilation, Options};
use specc_syntax::Code;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn cases(sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir().join(sub))
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "kdl"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no test cases in {sub}");
    v
}

/// Copy digests cover permission bits, and a checkout's bits depend on the umask: pin them.
fn pin_modes(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if p.is_dir() {
            pin_modes(&p);
        }
    }
}

fn compile(path: &Path) -> Compilation {
    pin_modes(&data_dir().join("plan/files"));
    // Absolute paths, replaced by `$DATA` in snapshots, so they match on every machine.
    specc_plan::compile(path, &Options::default()).expect("read case")
}

fn normalize(s: &str) -> String {
    s.replace(&data_dir().display().to_string(), "$DATA")
}

fn steps(out: &mut String, steps: &[Step], indent: &str) {
    for s in steps {
        let line = match &s.kind {
            StepKind::Run {
                cmd,
                env,
                workdir,
                user,
                secrets,
            } => {
                let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "run {cmd:?} user={user} workdir={workdir} env=[{}] secrets={secrets:?}",
                    env.join(" ")
                )
            }
            StepKind::Copy { src, dst, digest } => {
                format!("copy {} -> {dst} {digest:?}", src.display())
            }
            StepKind::File {
                path,
                content,
                mode,
            } => format!("file {path} mode={mode:o} content={content:?}"),
            StepKind::Env { key, value } => format!("env {key}={value}"),
            StepKind::Workdir(w) => format!("workdir {w}"),
            StepKind::User(u) => format!("user {u}"),
            StepKind::AddGroup(g) => format!("add-group {} gid={:?}", g.name, g.gid),
            StepKind::AddUser(u) => format!(
                "add-user {} uid={:?} groups={:?} shell={:?} home={:?}",
                u.name, u.uid, u.groups, u.shell, u.home
            ),
            StepKind::Service(s) => format!(
                "service {} exec={:?} user={:?} workdir={:?} env={:?} restart={}",
                s.name,
                s.exec,
                s.user,
                s.workdir,
                s.env,
                s.restart.as_str()
            ),
            StepKind::Repo {
                url,
                reference,
                path,
            } => format!("repo {url} ref={reference} path={path}"),
            StepKind::Use {
                integration,
                version,
                steps: inner,
            } => {
                let _ = writeln!(
                    out,
                    "{indent}use {integration} version={version:?} ({} steps)",
                    inner.len()
                );
                continue;
            }
        };
        let _ = writeln!(out, "{indent}{line}");
    }
}

fn dump(spec: &Spec) -> String {
    let mut out = String::new();
    let base = match &spec.base {
        Base::Spec { spec: parent, .. } => format!(
            "spec {} (head {})",
            parent.name,
            parent.layers[parent.head().0].name
        ),
        other => other.describe(),
    };
    let _ = writeln!(out, "spec {} base={base}", spec.name);
    let vm = &spec.vm;
    let _ = writeln!(
        out,
        "vm vcpus={} memory={} disk={} kernel={:?}{}",
        vm.vcpus,
        vm.memory,
        vm.disk,
        vm.kernel.as_ref().map(|k| k.display().to_string()),
        if vm.network { " network" } else { "" }
    );
    for p in &spec.params {
        let _ = writeln!(
            out,
            "param {}={:?} default={:?}",
            p.name, p.value, p.default
        );
    }
    for s in &spec.secrets {
        let _ = writeln!(
            out,
            "secret {} {:?} version={:?}",
            s.name, s.source, s.version
        );
    }
    for g in &spec.groups {
        let _ = writeln!(out, "group {} gid={:?}", g.name, g.gid);
    }
    for u in &spec.users {
        let _ = writeln!(out, "user {} uid={:?} groups={:?}", u.name, u.uid, u.groups);
    }
    for s in &spec.services {
        let _ = writeln!(out, "service {} exec={:?}", s.name, s.exec);
    }
    let _ = writeln!(out, "expose {:?}", spec.expose);
    let _ = writeln!(out, "idle {:?}", spec.idle);
    let _ = writeln!(out, "persistence {:?}", spec.persistence);
    let _ = writeln!(out, "head {}", spec.layers[spec.head().0].name);
    for l in &spec.layers {
        let parents: Vec<&str> = l
            .parents
            .iter()
            .map(|p| spec.layers[p.0].name.as_str())
            .collect();
        let _ = writeln!(
            out,
            "layer {} {:?} after={parents:?} origin={:?}",
            l.name, l.key, l.origin
        );
        steps(&mut out, &l.steps, "    ");
    }
    out
}

fn render_diags(c: &Compilation) -> String {
    let mut out = String::new();
    for d in &c.diagnostics {
        out.push_str(&d.to_short(&c.files));
        out.push('\n');
    }
    normalize(&out)
}

// The workspace lints want tests inside a `#[cfg(test)]` module, integration tests too.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_cases_match_their_snapshots() {
        for case in cases("plan") {
            let c = compile(&case);
            let mut actual = render_diags(&c);
            match &c.spec {
                Some(spec) => actual.push_str(&normalize(&dump(spec))),
                None => panic!("{} did not plan:\n{actual}", case.display()),
            }
            expect_test::expect_file![case.with_extension("plan")].assert_eq(&actual);
        }
    }

    #[test]
    fn diag_cases_match_their_snapshots() {
        for case in cases("diag") {
            let c = compile(&case);
            assert!(
                c.has_errors() || !c.diagnostics.is_empty(),
                "{} produced no diagnostics",
                case.display()
            );
            expect_test::expect_file![case.with_extension("diags")].assert_eq(&render_diags(&c));
        }
    }

    #[test]
    fn every_diagnostic_code_has_a_case() {
        let mut seen = BTreeSet::new();
        for case in cases("diag") {
            for d in compile(&case).diagnostics {
                seen.insert(d.code);
            }
        }
        // `specc fmt`'s own code is tested with the formatter, not by compiling.
        let missing: Vec<&str> = Code::ALL
            .iter()
            .filter(|c| !seen.contains(c) && **c != Code::FormatWouldLose)
            .map(|c| c.as_str())
            .collect();
        assert!(missing.is_empty(), "no diag case produces {missing:?}");
    }

    #[test]
    fn examples_and_the_design_example_plan_without_diagnostics() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&examples).expect("examples") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "kdl") {
                let c = specc_plan::compile(&p, &Options::default()).expect("read");
                assert!(
                    c.diagnostics.is_empty(),
                    "{}:\n{}",
                    p.display(),
                    render_diags(&c)
                );
                assert!(c.spec.is_some());
                n += 1;
            }
        }
        assert!(
            n >= 5,
            "the issue asks for at least five examples, found {n}"
        );
    }

    #[test]
    fn every_stdlib_integration_lowers_cleanly() {
        for (name, _) in specc_plan::integrations::STDLIB {
            let text = format!("spec \"t\" {{\n    base \"debian\"\n    use \"{name}\"\n}}\n");
            let c = specc_plan::compile_str(Path::new("t.kdl"), &text, &Options::default());
            assert!(c.diagnostics.is_empty(), "{name}:\n{}", render_diags(&c));
            let spec = c.spec.expect("planned");
            let StepKind::Use { steps, .. } = &spec.layers[1].steps[0].kind else {
                panic!("use step")
            };
            assert!(!steps.is_empty(), "{name} has no steps");
        }
    }
}
