//! Lowering: spanned AST to the spec IR, with every semantic check the language has.
//!
//! The lowerer never stops at the first problem: each check reports a diagnostic and lowering
//! goes on with a best guess, so one `specc check` run shows everything wrong with a file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use specc_syntax::ast::{Entry, Literal, Node, Value};
use specc_syntax::suggest::did_you_mean;
use specc_syntax::value::{self, Piece, PortSpec, ValueError};
use specc_syntax::{Code, Diagnostic, FileId, Files, Span};

use crate::Options;
use crate::graph;
use crate::hash::{self, DigestCache};
use crate::integrations::{self, Found};
use crate::ir::*;
use crate::key;

/// A node together with the file it was written in (imports splice nodes from other files).
#[derive(Debug, Clone)]
struct Item {
    file: FileId,
    dir: Rc<Path>,
    /// The import chain that led here, for cycle detection.
    chain: Rc<Vec<PathBuf>>,
    node: Node,
}

impl Item {
    fn name(&self) -> &str {
        &self.node.name.text
    }

    fn at(&self) -> SourceRef {
        SourceRef {
            file: self.file,
            span: self.node.head_span(),
        }
    }
}

/// The node shape a name must have: arguments, properties, whether it has children.
struct Shape {
    min_args: usize,
    max_args: usize,
    /// `None`: any property (env vars, integration params).
    props: Option<&'static [&'static str]>,
    children: bool,
    usage: &'static str,
}

const SPEC_NODES: &[&str] = &[
    "base",
    "vm",
    "param",
    "secret",
    "users",
    "use",
    "layer",
    "service",
    "repo",
    "expose",
    "idle",
    "persistence",
    "env",
    "import",
];
const LAYER_NODES: &[&str] = &[
    "copy", "workdir", "run", "env", "file", "user", "use", "service", "repo", "import",
];
const INTEGRATION_NODES: &[&str] = &[
    "description",
    "param",
    "run",
    "env",
    "file",
    "workdir",
    "user",
    "service",
];
const STEP_ONLY: &[&str] = &["copy", "workdir", "run", "file", "user"];

/// A layer before the DAG is resolved.
struct Draft {
    name: String,
    name_at: SourceRef,
    origin: LayerOrigin,
    after: Option<Vec<(String, SourceRef)>>,
    steps: Vec<Step>,
    source: SourceRef,
}

/// Params visible to `${...}`: name -> value; tracks which ones were used.
#[derive(Default)]
struct Scope {
    values: HashMap<String, String>,
    used: HashSet<String>,
}

/// State shared by every file of one compilation.
pub(crate) struct Lowerer<'o> {
    pub(crate) files: Files,
    pub(crate) diags: Vec<Diagnostic>,
    opts: &'o Options,
    scope: Scope,
    /// Chain of spec files being lowered (`base spec=` recursion).
    spec_stack: Vec<PathBuf>,
    pub(crate) digests: DigestCache,
    /// Every text file read (imports, base specs, integrations) with the sha256 of its text, or
    /// `None` for a path probed and found absent: what a cached plan must re-check.
    pub(crate) inputs: Vec<(PathBuf, Option<Digest>)>,
    /// Every copy source with its tree digest.
    pub(crate) trees: Vec<(PathBuf, Digest)>,
    /// The `vm kernel=` files with their content digests.
    pub(crate) kernels: Vec<(PathBuf, Digest)>,
    /// What the driver's resolver answered, in order of asking (each question once).
    pub(crate) resolved: Vec<(crate::plancache::Resolved, Digest)>,
}

fn kind_of(l: &Literal) -> &'static str {
    l.type_name()
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_layer_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A just-reported diagnostic, to attach a label, help or secondary label to.
struct DiagMut<'a>(&'a mut Diagnostic);

impl DiagMut<'_> {
    fn with_label(self, text: impl Into<String>) -> Self {
        self.0.primary.text = text.into();
        self
    }

    fn with_secondary(self, file: FileId, span: Span, text: impl Into<String>) -> Self {
        self.0.secondary.push(specc_syntax::Label {
            file,
            span,
            text: text.into(),
        });
        self
    }
}

impl std::ops::Deref for DiagMut<'_> {
    type Target = Diagnostic;
    fn deref(&self) -> &Diagnostic {
        self.0
    }
}

impl std::ops::DerefMut for DiagMut<'_> {
    fn deref_mut(&mut self) -> &mut Diagnostic {
        self.0
    }
}

/// Parent state a layer inherits: environment, working directory and user.
#[derive(Debug, Clone)]
struct State {
    env: BTreeMap<String, String>,
    workdir: String,
    user: String,
}

impl<'o> Lowerer<'o> {
    pub(crate) fn new(opts: &'o Options, digests: DigestCache) -> Self {
        Lowerer {
            files: Files::new(),
            diags: Vec::new(),
            opts,
            scope: Scope::default(),
            spec_stack: Vec::new(),
            digests,
            inputs: Vec::new(),
            trees: Vec::new(),
            kernels: Vec::new(),
            resolved: Vec::new(),
        }
    }

    fn report(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn error(&mut self, code: Code, it: &Item, span: Span, msg: impl Into<String>) -> DiagMut<'_> {
        self.diags.push(Diagnostic::error(code, it.file, span, msg));
        DiagMut(self.diags.last_mut().expect("just pushed"))
    }

    // ---------------------------------------------------------------- files and imports

    /// Lowers the spec in `text` (already read from `path`).
    pub(crate) fn lower_root(&mut self, path: &Path, display: &str, text: &str) -> Option<Spec> {
        let file = self.files.add(display, text);
        self.lower_spec_text(path, file, text)
    }

    fn lower_spec_text(&mut self, path: &Path, file: FileId, text: &str) -> Option<Spec> {
        let (doc, diags) = specc_syntax::parse(file, text);
        self.diags.extend(diags);
        let doc = doc?;
        let dir: Rc<Path> = dir_of(path);
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let chain = Rc::new(vec![canonical.clone()]);
        let mut spec_node: Option<Item> = None;
        for node in doc.nodes {
            let it = Item {
                file,
                dir: dir.clone(),
                chain: chain.clone(),
                node,
            };
            if it.name() == "spec" {
                if let Some(first) = &spec_node {
                    let first_span = first.node.name.span;
                    self.error(
                        Code::DuplicateNode,
                        &it,
                        it.node.name.span,
                        "a file holds one spec",
                    )
                    .with_label("second `spec`")
                    .with_secondary(file, first_span, "first `spec` here")
                    .help = Some("put the other spec in its own file and use `base spec=`".into());
                } else {
                    spec_node = Some(it);
                }
            } else {
                let help = did_you_mean(it.name(), ["spec"])
                    .unwrap_or_else(|| "a spec file holds one `spec \"name\" { ... }` node".into());
                let msg = format!("unknown top-level node `{}`", it.name());
                self.error(Code::UnknownNode, &it, it.node.name.span, msg)
                    .with_label("not `spec`")
                    .help = Some(help);
            }
        }
        let Some(spec_item) = spec_node else {
            self.report(
                Diagnostic::error(
                    Code::MissingNode,
                    file,
                    Span::new(0, 0),
                    "no `spec` node in this file",
                )
                .with_label("expected `spec \"name\" { ... }`")
                .with_help("start the file with `spec \"my-vm\" { base \"busybox\" }`"),
            );
            return None;
        };
        self.spec_stack.push(canonical);
        let spec = self.lower_spec(path, spec_item);
        self.spec_stack.pop();
        spec
    }

    /// The children of `it`, with `import` nodes replaced by the imported files' nodes.
    fn children(&mut self, it: &Item) -> Vec<Item> {
        let nodes = it.node.children.clone().unwrap_or_default();
        self.expand(it.file, &it.dir, &it.chain, nodes)
    }

    fn expand(
        &mut self,
        file: FileId,
        dir: &Rc<Path>,
        chain: &Rc<Vec<PathBuf>>,
        nodes: Vec<Node>,
    ) -> Vec<Item> {
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let it = Item {
                file,
                dir: dir.clone(),
                chain: chain.clone(),
                node,
            };
            if it.name() != "import" {
                out.push(it);
                continue;
            }
            self.shape(
                &it,
                &Shape {
                    min_args: 1,
                    max_args: 1,
                    props: Some(&[]),
                    children: false,
                    usage: "import \"common.kdl\"",
                },
            );
            let Some(arg) = it.node.arg(0).cloned() else {
                continue;
            };
            let Some(rel) = self.string(&it, &arg.value, "the import path") else {
                continue;
            };
            let path = dir.join(&rel);
            let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
            if chain.contains(&canonical) {
                let mut names: Vec<String> = chain
                    .iter()
                    .skip_while(|p| **p != canonical)
                    .map(|p| p.display().to_string())
                    .collect();
                names.push(canonical.display().to_string());
                self.error(
                    Code::ImportCycle,
                    &it,
                    arg.value.span,
                    format!("import cycle: {}", names.join(" -> ")),
                )
                .with_label("imports a file that is already being imported")
                .help = Some("move the shared nodes into a third file that both import".into());
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => {
                    self.inputs.push((path.clone(), Some(key::text_digest(&t))));
                    t
                }
                Err(e) => {
                    self.error(
                        Code::ImportMissing,
                        &it,
                        arg.value.span,
                        format!("cannot read `{}`: {e}", path.display()),
                    )
                    .with_label("imported here")
                    .help = Some("import paths are relative to the importing file".into());
                    continue;
                }
            };
            let id = self.files.add(path.display().to_string(), text.as_str());
            let (doc, diags) = specc_syntax::parse(id, &text);
            self.diags.extend(diags);
            let Some(doc) = doc else { continue };
            let sub_dir: Rc<Path> = dir_of(&path);
            let mut sub_chain = (**chain).clone();
            sub_chain.push(canonical);
            out.extend(self.expand(id, &sub_dir, &Rc::new(sub_chain), doc.nodes));
        }
        out
    }

    // ---------------------------------------------------------------- shape and values

    /// Checks arity, properties and children of a node; reports every mismatch.
    fn shape(&mut self, it: &Item, s: &Shape) {
        let node = &it.node;
        let nargs = node.args().count();
        if nargs < s.min_args {
            let what = if s.min_args - nargs == 1 {
                "an argument"
            } else {
                "more arguments"
            };
            self.error(
                Code::MissingArgument,
                it,
                node.head_span(),
                format!("`{}` needs {what}", it.name()),
            )
            .with_label("missing argument")
            .help = Some(format!("write `{}`", s.usage));
        }
        for extra in node.args().skip(s.max_args) {
            self.error(
                Code::UnexpectedArgument,
                it,
                extra.span,
                format!("`{}` takes at most {} argument(s)", it.name(), s.max_args),
            )
            .with_label("unexpected argument")
            .help = Some(format!("write `{}`", s.usage));
        }
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for e in node.props() {
            let key = e.key.as_ref().expect("props have keys");
            if let Some(first) = seen.insert(key.text.as_str(), key.span) {
                self.error(
                    Code::DuplicateProperty,
                    it,
                    key.span,
                    format!("property `{}` given twice", key.text),
                )
                .with_label("again here")
                .with_secondary(it.file, first, "first here")
                .help = Some("remove one of them".into());
            }
            if let Some(allowed) = s.props
                && !allowed.contains(&key.text.as_str())
            {
                let help = did_you_mean(&key.text, allowed.iter().copied()).unwrap_or_else(|| {
                    if allowed.is_empty() {
                        format!("`{}` takes no properties", it.name())
                    } else {
                        format!("`{}` takes {}", it.name(), list(allowed))
                    }
                });
                self.error(
                    Code::UnknownProperty,
                    it,
                    key.span,
                    format!("unknown property `{}` on `{}`", key.text, it.name()),
                )
                .with_label("unknown property")
                .help = Some(help);
            }
        }
        if !s.children
            && let Some(span) = node.children_span
        {
            self.error(
                Code::UnexpectedChildren,
                it,
                span,
                format!("`{}` takes no children block", it.name()),
            )
            .with_label("unexpected block")
            .help = Some(format!("write `{}`", s.usage));
        }
    }

    fn wrong_type(&mut self, it: &Item, v: &Value, what: &str, expected: &str) {
        self.error(
            Code::WrongType,
            it,
            v.span,
            format!("{what} must be {expected}, found {}", kind_of(&v.literal)),
        )
        .with_label(format!("expected {expected}"));
    }

    /// A string value, no interpolation.
    fn string(&mut self, it: &Item, v: &Value, what: &str) -> Option<String> {
        match &v.literal {
            Literal::String(s) => Some(s.clone()),
            _ => {
                self.wrong_type(it, v, what, "a string");
                None
            }
        }
    }

    /// A string with `${param}` interpolated.
    fn text(&mut self, it: &Item, v: &Value, what: &str) -> Option<String> {
        let s = self.string(it, v, what)?;
        let pieces = match value::parse_template(&s) {
            Ok(p) => p,
            Err(e) => {
                self.value_error(Code::BadInterpolation, it, v, e);
                return None;
            }
        };
        let mut out = String::with_capacity(s.len());
        let mut ok = true;
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.push_str(&t),
                Piece::Param { name, range } => match self.scope.values.get(&name) {
                    Some(val) => {
                        out.push_str(val);
                        self.scope.used.insert(name);
                    }
                    None => {
                        ok = false;
                        let known: Vec<String> = self.scope.values.keys().cloned().collect();
                        let help = did_you_mean(&name, known.iter().map(String::as_str)).unwrap_or_else(|| {
                            format!("declare it with `param \"{name}\" default=\"...\"`, or write `$${{{name}}}` for a literal `${{`")
                        });
                        self.error(
                            Code::UnknownParam,
                            it,
                            v.content_span(range.start, range.end),
                            format!("unknown param `{name}`"),
                        )
                        .with_label("not a declared param")
                        .help = Some(help);
                    }
                },
            }
        }
        ok.then_some(out)
    }

    fn value_error(&mut self, code: Code, it: &Item, v: &Value, e: ValueError) {
        let span = if e.range.is_empty() && v.content_start.is_some() {
            // An empty range marks a position ("missing unit here"): widen it to one
            // character so the label is visible, but keep it inside the string.
            v.content_span(e.range.start.saturating_sub(1), e.range.end)
        } else {
            v.content_span(e.range.start, e.range.end)
        };
        self.error(code, it, span, e.message)
            .with_label("here")
            .help = e.help;
    }

    fn prop_value<'n>(&self, it: &'n Item, key: &str) -> Option<&'n Value> {
        it.node.prop(key).map(|e| &e.value)
    }

    fn prop_text(&mut self, it: &Item, key: &str) -> Option<String> {
        let v = self.prop_value(it, key)?.clone();
        self.text(it, &v, &format!("`{key}`"))
    }

    fn arg_value(&self, it: &Item, i: usize) -> Option<Value> {
        it.node.arg(i).map(|e| e.value.clone())
    }

    fn arg_text(&mut self, it: &Item, i: usize, what: &str) -> Option<String> {
        let v = self.arg_value(it, i)?;
        self.text(it, &v, what)
    }

    fn integer(&mut self, it: &Item, v: &Value, what: &str, min: i128, max: i128) -> Option<i128> {
        match v.literal {
            Literal::Integer(n) if (min..=max).contains(&n) => Some(n),
            Literal::Integer(n) => {
                self.error(
                    Code::BadValue,
                    it,
                    v.span,
                    format!("{what} must be between {min} and {max}, found {n}"),
                )
                .with_label("out of range");
                None
            }
            _ => {
                self.wrong_type(it, v, what, "an integer");
                None
            }
        }
    }

    fn size(&mut self, it: &Item, v: &Value, what: &str) -> Option<u64> {
        match &v.literal {
            Literal::Integer(n) => match u64::try_from(*n) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error(
                        Code::BadSize,
                        it,
                        v.span,
                        format!("{what} must be a positive size"),
                    )
                    .with_label("negative or too large");
                    None
                }
            },
            Literal::String(s) => match value::parse_size(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.value_error(Code::BadSize, it, v, e);
                    None
                }
            },
            _ => {
                self.wrong_type(it, v, what, "a size like \"1GiB\"");
                None
            }
        }
    }

    fn duration(&mut self, it: &Item, v: &Value, what: &str) -> Option<std::time::Duration> {
        match &v.literal {
            Literal::String(s) => match value::parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.value_error(Code::BadDuration, it, v, e);
                    None
                }
            },
            _ => {
                self.wrong_type(it, v, what, "a duration like \"5m\"");
                None
            }
        }
    }

    fn port(&mut self, it: &Item, v: &Value) -> Option<PortSpec> {
        match &v.literal {
            Literal::Integer(n) => match value::check_port(*n) {
                Ok(p) => Some(PortSpec {
                    host: None,
                    guest: p,
                    protocol: value::Protocol::Tcp,
                }),
                Err(e) => {
                    self.error(Code::BadPort, it, v.span, e.message)
                        .with_label("here")
                        .help = e.help;
                    None
                }
            },
            Literal::String(s) => match value::parse_port(s) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.value_error(Code::BadPort, it, v, e);
                    None
                }
            },
            _ => {
                self.wrong_type(it, v, "a port", "an integer or a string like \"8080:3000\"");
                None
            }
        }
    }

    fn guest_path(&mut self, it: &Item, v: &Value, what: &str) -> Option<String> {
        let p = self.text(it, v, what)?;
        if !p.starts_with('/') {
            self.error(
                Code::RelativePath,
                it,
                v.span,
                format!("{what} must be an absolute guest path"),
            )
            .with_label("relative path")
            .help = Some(format!("write `/{}`", p.trim_start_matches("./")));
            return None;
        }
        Some(p)
    }

    fn name_list(&mut self, it: &Item, key: &str) -> Vec<(String, SourceRef)> {
        let Some(v) = self.prop_value(it, key).cloned() else {
            return Vec::new();
        };
        let Some(s) = self.string(it, &v, &format!("`{key}`")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // Names are separated by commas and/or spaces; each gets its own span when the string
        // maps onto the source, so "unknown layer" labels point at the one bad name.
        let mut start = None;
        for (i, c) in s.char_indices().chain(std::iter::once((s.len(), ','))) {
            let sep = c == ',' || c.is_whitespace();
            match (sep, start) {
                (false, None) => start = Some(i),
                (true, Some(st)) => {
                    out.push((
                        s[st..i].to_owned(),
                        SourceRef {
                            file: it.file,
                            span: v.content_span(st, i),
                        },
                    ));
                    start = None;
                }
                _ => {}
            }
        }
        if out.is_empty() {
            self.error(Code::BadValue, it, v.span, format!("`{key}` names nothing"))
                .with_label("empty");
        }
        out
    }

    // ---------------------------------------------------------------- the spec node

    fn lower_spec(&mut self, path: &Path, spec: Item) -> Option<Spec> {
        self.shape(
            &spec,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&[]),
                children: true,
                usage: "spec \"name\" { ... }",
            },
        );
        let name = match self.arg_value(&spec, 0) {
            Some(v) => self.string(&spec, &v, "the spec name").unwrap_or_default(),
            None => String::new(),
        };
        if spec.node.children.is_none() {
            self.error(
                Code::MissingNode,
                &spec,
                spec.node.head_span(),
                "the spec has no body",
            )
            .with_label("expected `{ ... }`")
            .help = Some("write `spec \"name\" { base \"busybox\" }`".into());
            return None;
        }
        let items = self.children(&spec);

        // Pass 1: params, so `${...}` anywhere in the body can refer to any of them.
        let saved_scope = std::mem::take(&mut self.scope);
        let mut params: Vec<(Param, Item)> = Vec::new();
        for it in items.iter().filter(|i| i.name() == "param") {
            if let Some(p) = self.lower_param(it, &params) {
                params.push((p, it.clone()));
            }
        }
        for (k, v) in &self.opts.params {
            match params.iter_mut().find(|(p, _)| p.name == *k) {
                Some((p, _)) => p.value = v.clone(),
                None => {
                    let known: Vec<&str> = params.iter().map(|(p, _)| p.name.as_str()).collect();
                    let help = did_you_mean(k, known.iter().copied())
                        .unwrap_or_else(|| format!("the spec declares {}", list(&known)));
                    self.error(
                        Code::UnknownParam,
                        &spec,
                        spec.node.head_span(),
                        format!("`--param {k}=...` names a param this spec does not declare"),
                    )
                    .with_label("in this spec")
                    .help = Some(help);
                }
            }
        }
        for (p, it) in &params {
            if p.default.is_none() && !self.opts.params.iter().any(|(k, _)| *k == p.name) {
                self.error(
                    Code::MissingParam,
                    it,
                    it.node.head_span(),
                    format!("param `{}` has no default and no value was given", p.name),
                )
                .with_label("no value")
                .help = Some(format!(
                    "give it a default or pass `--param {}=VALUE`",
                    p.name
                ));
            }
        }
        self.scope = Scope {
            values: params
                .iter()
                .map(|(p, _)| (p.name.clone(), p.value.clone()))
                .collect(),
            used: HashSet::new(),
        };

        // Pass 2: everything else, in file order.
        let mut base: Option<(Base, Item)> = None;
        let mut vm: Option<Vm> = None;
        let mut once: HashMap<&'static str, Span> = HashMap::new();
        let mut secrets: Vec<Secret> = Vec::new();
        let mut groups = Vec::new();
        let mut users = Vec::new();
        let mut spec_env: BTreeMap<String, String> = BTreeMap::new();
        let mut drafts: Vec<Draft> = Vec::new();
        let mut expose = Vec::new();
        let mut idle: Option<Idle> = None;
        let mut persistence: Option<Persistence> = None;
        let mut secret_names: Vec<String> = Vec::new();
        // Secrets first too: a `run` may name a secret declared further down.
        for it in items.iter().filter(|i| i.name() == "secret") {
            if let Some(s) = self.lower_secret(it, &secrets) {
                secret_names.push(s.name.clone());
                secrets.push(s);
            }
        }
        for it in &items {
            let n = it.name().to_owned();
            let single = ["base", "vm", "users", "idle", "persistence"];
            if let Some(key) = single.iter().find(|s| **s == n) {
                if let Some(first) = once.get(key) {
                    let first = *first;
                    self.error(
                        Code::DuplicateNode,
                        it,
                        it.node.name.span,
                        format!("`{n}` may appear once per spec"),
                    )
                    .with_label("again here")
                    .with_secondary(it.file, first, "first here")
                    .help = Some(format!("merge the two `{n}` nodes"));
                    continue;
                }
                once.insert(key, it.node.name.span);
            }
            match n.as_str() {
                "param" | "secret" => {}
                "base" => base = self.lower_base(it).map(|b| (b, it.clone())),
                "vm" => vm = Some(self.lower_vm(it)),
                "users" => {
                    let (g, u, steps) = self.lower_users(it);
                    groups.extend(g);
                    users.extend(u);
                    drafts.push(Draft {
                        name: "users".into(),
                        name_at: it.at(),
                        origin: LayerOrigin::Users,
                        after: None,
                        steps,
                        source: it.at(),
                    });
                }
                "env" => {
                    for (k, v) in self.lower_env(it) {
                        spec_env.insert(k, v);
                    }
                }
                "layer" => {
                    if let Some(d) = self.lower_layer(it, &secret_names) {
                        drafts.push(d);
                    }
                }
                "use" => {
                    self.shape_use(it);
                    let after = self.after(it);
                    if let Some(step) = self.lower_use(it) {
                        let StepKind::Use { integration, .. } = &step.kind else {
                            unreachable!("lower_use makes Use")
                        };
                        let integration = integration.clone();
                        drafts.push(Draft {
                            name: format!("use:{integration}"),
                            name_at: it.at(),
                            origin: LayerOrigin::Use(integration),
                            after,
                            steps: vec![step],
                            source: it.at(),
                        });
                    }
                }
                "service" => {
                    let after = self.after(it);
                    if let Some(step) = self.lower_service(it, true) {
                        let StepKind::Service(s) = &step.kind else {
                            unreachable!("lower_service makes Service")
                        };
                        let name = s.name.clone();
                        drafts.push(Draft {
                            name: format!("service:{name}"),
                            name_at: SourceRef {
                                file: it.file,
                                span: it.node.arg(0).map_or(it.node.name.span, |a| a.value.span),
                            },
                            origin: LayerOrigin::Service(name),
                            after,
                            steps: vec![step],
                            source: it.at(),
                        });
                    }
                }
                "repo" => {
                    let after = self.after(it);
                    if let Some(step) = self.lower_repo(it, true) {
                        let StepKind::Repo { path, .. } = &step.kind else {
                            unreachable!("lower_repo makes Repo")
                        };
                        let path = path.clone();
                        drafts.push(Draft {
                            name: format!("repo:{path}"),
                            name_at: it.at(),
                            origin: LayerOrigin::Repo(path),
                            after,
                            steps: vec![step],
                            source: it.at(),
                        });
                    }
                }
                "expose" => {
                    self.shape(
                        it,
                        &Shape {
                            min_args: 1,
                            max_args: usize::MAX,
                            props: Some(&[]),
                            children: false,
                            usage: "expose 3000 \"8080:80\"",
                        },
                    );
                    for e in it.node.args() {
                        if let Some(p) = self.port(it, &e.value) {
                            expose.push(p);
                        }
                    }
                }
                "idle" => idle = Some(self.lower_idle(it)),
                "persistence" => persistence = self.lower_persistence(it),
                other => {
                    let help = if STEP_ONLY.contains(&other) {
                        format!(
                            "`{other}` is a step: put it inside a layer, `layer \"name\" {{ {other} ... }}`"
                        )
                    } else {
                        did_you_mean(other, SPEC_NODES.iter().copied())
                            .unwrap_or_else(|| format!("a spec holds {}", list(SPEC_NODES)))
                    };
                    self.error(
                        Code::UnknownNode,
                        it,
                        it.node.name.span,
                        format!("unknown node `{other}` in spec"),
                    )
                    .with_label(if STEP_ONLY.contains(&other) {
                        "step outside a layer"
                    } else {
                        "unknown node"
                    })
                    .help = Some(help);
                }
            }
        }
        for (p, it) in &params {
            if !self.scope.used.contains(&p.name) {
                self.report(
                    Diagnostic::warning(
                        Code::UnusedParam,
                        it.file,
                        it.node.arg(0).map_or(it.node.name.span, |a| a.value.span),
                        format!("param `{}` is never used", p.name),
                    )
                    .with_label("unused")
                    .with_help(format!("refer to it as `${{{}}}` or remove it", p.name)),
                );
            }
        }
        self.scope = saved_scope;

        let base_written = once.contains_key("base");
        if !base_written {
            self.error(Code::MissingNode, &spec, spec.node.head_span(), format!("spec `{name}` has no `base`"))
                .with_label("needs a `base`")
                .help = Some("add `base \"busybox\"`, `base \"debian\" suite=\"bookworm\"`, `base oci=\"...\"` or `base spec=\"...\"`".into());
        }
        let base_at = base.as_ref().map_or(spec.at(), |(_, it)| it.at());
        drafts.insert(
            0,
            Draft {
                name: "base".into(),
                name_at: base_at,
                origin: LayerOrigin::Base,
                after: Some(Vec::new()),
                steps: Vec::new(),
                source: base_at,
            },
        );
        // The DAG is checked even when the base is missing or invalid: more errors in one run.
        let order = self.resolve_dag(&drafts);
        let (Some((base, base_it)), Some(order)) = (base, order) else {
            return None;
        };
        if self.diags.iter().any(Diagnostic::is_error) {
            // Keys of a spec with errors would be meaningless; stop after the last check.
            return None;
        }

        // Inherit what a base spec already decided, unless this spec says otherwise.
        let mut inherited_groups = Vec::new();
        let mut inherited_users = Vec::new();
        let mut inherited_services = Vec::new();
        let (vm, expose, idle, persistence) = match &base {
            Base::Spec { spec: parent, .. } => {
                inherited_groups = parent.groups.clone();
                inherited_users = parent.users.clone();
                inherited_services = parent.services.clone();
                (
                    vm.unwrap_or_else(|| parent.vm.clone()),
                    if expose.is_empty() {
                        parent.expose.clone()
                    } else {
                        expose
                    },
                    idle.unwrap_or(parent.idle),
                    persistence.unwrap_or(parent.persistence),
                )
            }
            _ => (
                vm.unwrap_or_default(),
                expose,
                idle.unwrap_or_default(),
                persistence.unwrap_or_default(),
            ),
        };

        let mut layers = self.finish_layers(drafts, order, &spec_env);
        self.fill_copy_digests(&mut layers);
        // Both asked before giving up, so one run reports both when both fail.
        let kernel_digest = self.kernel_digest(&vm, &spec);
        let base_digest = self.base_digest(&base, &base_it, vm.disk);
        let (Some(kernel_digest), Some(base_digest)) = (kernel_digest, base_digest) else {
            return None;
        };
        let mut services = inherited_services;
        for l in &layers {
            collect_services(&l.steps, &mut services);
        }
        let mut spec = Spec {
            name,
            path: path.to_path_buf(),
            base,
            vm,
            params: params.into_iter().map(|(p, _)| p).collect(),
            secrets,
            groups: [inherited_groups, groups].concat(),
            users: [inherited_users, users].concat(),
            layers,
            services,
            expose,
            idle,
            persistence,
            kernel_digest,
            base_digest,
        };
        key::assign_keys(&mut spec);
        Some(spec)
    }

    /// Asks the driver's resolver, once per question per compilation.
    fn resolve(
        &mut self,
        q: crate::plancache::Resolved,
        ask: impl FnOnce(&dyn crate::KeyInputs) -> Result<Digest, String>,
    ) -> Option<Result<Digest, String>> {
        if let Some((_, d)) = self.resolved.iter().find(|(r, _)| *r == q) {
            return Some(Ok(*d));
        }
        let resolver = self.opts.resolver.clone()?;
        let r = ask(resolver.0.as_ref());
        if let Ok(d) = &r {
            self.resolved.push((q, *d));
        }
        Some(r)
    }

    /// The base digest of the base layer's key (see [`Spec::base_digest`]).
    fn base_digest(&mut self, base: &Base, it: &Item, disk: u64) -> Option<Digest> {
        if matches!(base, Base::Spec { .. }) {
            // The base spec's head key already covers its kernel and root filesystem.
            return Some(key::default_base_digest(base));
        }
        if let Some(d) = self.opts.keys.base {
            return Some(d);
        }
        let q = crate::plancache::Resolved::rootfs(base, &it.dir, disk);
        match self.resolve(q, |r| r.rootfs(base, &it.dir, disk)) {
            None => Some(key::default_base_digest(base)),
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                self.error(
                    Code::BadValue,
                    it,
                    it.node.head_span(),
                    format!("cannot resolve the root filesystem of this base: {e}"),
                )
                .with_label("its digest enters every layer's key");
                None
            }
        }
    }

    fn kernel_digest(&mut self, vm: &Vm, spec: &Item) -> Option<Digest> {
        if let Some(d) = self.opts.keys.kernel {
            return Some(d);
        }
        match &vm.kernel {
            None => match self.resolve(crate::plancache::Resolved::Kernel, |r| r.kernel()) {
                None => Some(key::default_kernel_digest()),
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    self.error(
                        Code::KernelMissing,
                        spec,
                        spec.node.head_span(),
                        format!("cannot resolve the default guest kernel: {e}"),
                    )
                    .with_label("its digest enters every layer's key")
                    .help = Some("install linux-source-6.1, or give `vm kernel=`".into());
                    None
                }
            },
            Some(p) => match hash::hash_file(p, &mut self.digests) {
                Ok(d) => {
                    self.kernels.push((p.clone(), d));
                    Some(d)
                }
                Err(e) => {
                    self.error(
                        Code::KernelMissing,
                        spec,
                        spec.node.head_span(),
                        format!("cannot read kernel `{}`: {e}", p.display()),
                    )
                    .with_label("in this spec");
                    None
                }
            },
        }
    }

    fn lower_param(&mut self, it: &Item, seen: &[(Param, Item)]) -> Option<Param> {
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&["default", "description"]),
                children: false,
                usage: "param \"name\" default=\"value\"",
            },
        );
        let v = self.arg_value(it, 0)?;
        let name = self.string(it, &v, "the param name")?;
        if !is_ident(&name) {
            self.error(
                Code::BadName,
                it,
                v.span,
                format!("`{name}` is not a valid param name"),
            )
            .with_label("bad name")
            .help = Some(
                "param names start with a letter or `_` and hold letters, digits, `_` and `-`"
                    .into(),
            );
            return None;
        }
        if let Some((_, first)) = seen.iter().find(|(p, _)| p.name == name) {
            let first_span = first.node.head_span();
            let first_file = first.file;
            self.error(
                Code::DuplicateName,
                it,
                v.span,
                format!("param `{name}` is declared twice"),
            )
            .with_label("again here")
            .with_secondary(first_file, first_span, "first here");
            return None;
        }
        let default = match it.node.prop("default").map(|e| e.value.clone()) {
            None => None,
            Some(d) => match &d.literal {
                Literal::String(s) => Some(s.clone()),
                Literal::Integer(i) => Some(i.to_string()),
                Literal::Bool(b) => Some(b.to_string()),
                _ => {
                    self.wrong_type(it, &d, "a param default", "a string, integer or boolean");
                    None
                }
            },
        };
        if let Some(d) = it.node.prop("description").map(|e| e.value.clone()) {
            self.string(it, &d, "`description`");
        }
        Some(Param {
            name,
            value: default.clone().unwrap_or_default(),
            default,
        })
    }

    fn lower_secret(&mut self, it: &Item, seen: &[Secret]) -> Option<Secret> {
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&["env", "file", "version"]),
                children: false,
                usage: "secret \"npm_token\" env=\"NPM_TOKEN\"",
            },
        );
        let v = self.arg_value(it, 0)?;
        let name = self.string(it, &v, "the secret name")?;
        if !is_ident(&name) {
            self.error(
                Code::BadName,
                it,
                v.span,
                format!("`{name}` is not a valid secret name"),
            )
            .with_label("bad name");
            return None;
        }
        if seen.iter().any(|s| s.name == name) {
            self.error(
                Code::DuplicateName,
                it,
                v.span,
                format!("secret `{name}` is declared twice"),
            )
            .with_label("again here");
            return None;
        }
        let env = self.prop_value(it, "env").cloned();
        let file = self.prop_value(it, "file").cloned();
        let source = match (env, file) {
            (Some(e), None) => SecretSource::Env(self.string(it, &e, "`env`")?),
            (None, Some(f)) => SecretSource::File(it.dir.join(self.string(it, &f, "`file`")?)),
            _ => {
                self.error(
                    Code::MissingProperty,
                    it,
                    it.node.head_span(),
                    format!("secret `{name}` needs exactly one of `env=` and `file=`"),
                )
                .with_label("where does the value come from?")
                .help = Some(format!(
                    "write `secret \"{name}\" env=\"HOST_VAR\"` or `file=\"path\"`"
                ));
                return None;
            }
        };
        let version = match self.prop_value(it, "version").cloned() {
            Some(v) => Some(self.string(it, &v, "`version`")?),
            None => None,
        };
        Some(Secret {
            name,
            source,
            version,
        })
    }

    fn lower_base(&mut self, it: &Item) -> Option<Base> {
        self.shape(
            it,
            &Shape {
                min_args: 0,
                max_args: 1,
                props: Some(&["suite", "oci", "spec"]),
                children: false,
                usage: "base \"debian\" suite=\"bookworm\"",
            },
        );
        let arg = self.arg_value(it, 0);
        let oci = self.prop_value(it, "oci").cloned();
        let spec = self.prop_value(it, "spec").cloned();
        let given =
            usize::from(arg.is_some()) + usize::from(oci.is_some()) + usize::from(spec.is_some());
        if given != 1 {
            self.error(Code::BadValue, it, it.node.head_span(), "`base` needs exactly one of a kind, `oci=` or `spec=`")
                .with_label(if given == 0 { "no base given" } else { "more than one base" })
                .help = Some("write `base \"busybox\"`, `base \"debian\"`, `base \"scratch\"`, `base oci=\"ref\"` or `base spec=\"other.kdl\"`".into());
            return None;
        }
        let suite = self.prop_value(it, "suite").cloned();
        if let Some(v) = arg {
            let kind = self.string(it, &v, "the base kind")?;
            if kind != "debian"
                && let Some(s) = &suite
            {
                self.error(
                    Code::UnknownProperty,
                    it,
                    s.span,
                    "`suite=` only applies to `base \"debian\"`",
                )
                .with_label("not for this base");
            }
            return match kind.as_str() {
                "scratch" => Some(Base::Scratch),
                "busybox" => Some(Base::Busybox),
                "debian" => {
                    let suite = match suite {
                        Some(s) => self.text(it, &s, "`suite`")?,
                        None => "bookworm".into(),
                    };
                    Some(Base::Debian { suite })
                }
                other => {
                    let help = did_you_mean(other, ["scratch", "busybox", "debian"])
                        .unwrap_or_else(|| "kinds are `scratch`, `busybox` and `debian`; images are `base oci=\"ref\"`".into());
                    self.error(
                        Code::BadValue,
                        it,
                        v.span,
                        format!("unknown base `{other}`"),
                    )
                    .with_label("unknown base")
                    .help = Some(help);
                    None
                }
            };
        }
        if let Some(s) = &suite {
            self.error(
                Code::UnknownProperty,
                it,
                s.span,
                "`suite=` only applies to `base \"debian\"`",
            )
            .with_label("not for this base");
        }
        if let Some(v) = oci {
            let reference = self.text(it, &v, "`oci`")?;
            if reference.is_empty() || reference.chars().any(char::is_whitespace) {
                self.error(
                    Code::BadValue,
                    it,
                    v.span,
                    format!("`{reference}` is not an image reference"),
                )
                .with_label("bad reference");
                return None;
            }
            return Some(Base::Oci { reference });
        }
        let v = spec?;
        let rel = self.string(it, &v, "`spec`")?;
        let path = it.dir.join(&rel);
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        if self.spec_stack.contains(&canonical) {
            let mut chain: Vec<String> = self
                .spec_stack
                .iter()
                .skip_while(|p| **p != canonical)
                .map(|p| p.display().to_string())
                .collect();
            chain.push(canonical.display().to_string());
            self.error(
                Code::ImportCycle,
                it,
                v.span,
                format!("base spec cycle: {}", chain.join(" -> ")),
            )
            .with_label("this spec is already a base of itself");
            return None;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => {
                self.inputs.push((path.clone(), Some(key::text_digest(&t))));
                t
            }
            Err(e) => {
                self.error(
                    Code::ImportMissing,
                    it,
                    v.span,
                    format!("cannot read base spec `{}`: {e}", path.display()),
                )
                .with_label("base spec")
                .help = Some("the path is relative to this file".into());
                return None;
            }
        };
        let id = self.files.add(path.display().to_string(), text.as_str());
        let saved = std::mem::take(&mut self.scope);
        let parent = self.lower_spec_text(&path, id, &text);
        self.scope = saved;
        Some(Base::Spec {
            path: canonical,
            spec: Box::new(parent?),
        })
    }

    fn lower_vm(&mut self, it: &Item) -> Vm {
        self.shape(
            it,
            &Shape {
                min_args: 0,
                max_args: 0,
                props: Some(&["vcpus", "memory", "disk", "kernel", "network"]),
                children: false,
                usage: "vm vcpus=2 memory=\"1GiB\" disk=\"4GiB\" network=#true",
            },
        );
        let mut vm = Vm::default();
        if let Some(v) = self.prop_value(it, "vcpus").cloned()
            && let Some(n) = self.integer(it, &v, "`vcpus`", 1, 255)
        {
            vm.vcpus = u32::try_from(n).unwrap_or(1);
        }
        if let Some(v) = self.prop_value(it, "memory").cloned()
            && let Some(n) = self.size(it, &v, "`memory`")
        {
            if n < (32 << 20) || n % 4096 != 0 {
                self.error(
                    Code::BadValue,
                    it,
                    v.span,
                    "`memory` must be at least 32MiB and a multiple of 4KiB",
                )
                .with_label("too small or unaligned")
                .help = Some("write e.g. `memory=\"512MiB\"`".into());
            } else {
                vm.memory = n;
            }
        }
        if let Some(v) = self.prop_value(it, "disk").cloned()
            && let Some(n) = self.size(it, &v, "`disk`")
        {
            if n < (16 << 20) || n % 512 != 0 {
                self.error(
                    Code::BadValue,
                    it,
                    v.span,
                    "`disk` must be at least 16MiB and a multiple of 512 bytes",
                )
                .with_label("too small or unaligned")
                .help = Some("write e.g. `disk=\"4GiB\"`".into());
            } else {
                vm.disk = n;
            }
        }
        if let Some(v) = self.prop_value(it, "kernel").cloned()
            && let Some(p) = self.text(it, &v, "`kernel`")
        {
            let path = it.dir.join(p);
            if !path.is_file() {
                self.error(Code::KernelMissing, it, v.span, format!("kernel `{}` does not exist", path.display()))
                    .with_label("no such file")
                    .help = Some("the path is relative to this file; leave `kernel=` out for the default guest kernel".into());
            }
            vm.kernel = Some(std::path::absolute(&path).unwrap_or(path));
        }
        if let Some(v) = self.prop_value(it, "network").cloned() {
            match v.literal {
                Literal::Bool(b) => vm.network = b,
                _ => self.wrong_type(it, &v, "`network`", "#true or #false"),
            }
        }
        vm
    }

    fn lower_users(&mut self, it: &Item) -> (Vec<Group>, Vec<User>, Vec<Step>) {
        self.shape(
            it,
            &Shape {
                min_args: 0,
                max_args: 0,
                props: Some(&[]),
                children: true,
                usage: "users { group \"dev\"; user \"dev\" groups=\"dev\" }",
            },
        );
        let (mut groups, mut users, mut steps) =
            (Vec::<Group>::new(), Vec::<User>::new(), Vec::new());
        for c in self.children(it) {
            match c.name() {
                "group" => {
                    self.shape(
                        &c,
                        &Shape {
                            min_args: 1,
                            max_args: 1,
                            props: Some(&["gid"]),
                            children: false,
                            usage: "group \"dev\" gid=1001",
                        },
                    );
                    let Some(v) = self.arg_value(&c, 0) else {
                        continue;
                    };
                    let Some(name) = self.string(&c, &v, "the group name") else {
                        continue;
                    };
                    if groups.iter().any(|g| g.name == name) {
                        self.error(
                            Code::DuplicateName,
                            &c,
                            v.span,
                            format!("group `{name}` is declared twice"),
                        )
                        .with_label("again here");
                        continue;
                    }
                    let gid = self
                        .prop_value(&c, "gid")
                        .cloned()
                        .and_then(|g| self.integer(&c, &g, "`gid`", 0, 65_533))
                        .map(|g| u32::try_from(g).unwrap_or(0));
                    let g = Group { name, gid };
                    steps.push(Step {
                        kind: StepKind::AddGroup(g.clone()),
                        source: c.at(),
                    });
                    groups.push(g);
                }
                "user" => {
                    self.shape(
                        &c,
                        &Shape {
                            min_args: 1,
                            max_args: 1,
                            props: Some(&["uid", "groups", "shell", "home"]),
                            children: false,
                            usage: "user \"dev\" uid=1001 groups=\"dev\" shell=\"/bin/bash\"",
                        },
                    );
                    let Some(v) = self.arg_value(&c, 0) else {
                        continue;
                    };
                    let Some(name) = self.string(&c, &v, "the user name") else {
                        continue;
                    };
                    if users.iter().any(|u| u.name == name) {
                        self.error(
                            Code::DuplicateName,
                            &c,
                            v.span,
                            format!("user `{name}` is declared twice"),
                        )
                        .with_label("again here");
                        continue;
                    }
                    let uid = self
                        .prop_value(&c, "uid")
                        .cloned()
                        .and_then(|g| self.integer(&c, &g, "`uid`", 0, 65_533))
                        .map(|g| u32::try_from(g).unwrap_or(0));
                    let groups_of = self
                        .name_list(&c, "groups")
                        .into_iter()
                        .map(|(n, _)| n)
                        .collect();
                    let shell = match self.prop_value(&c, "shell").cloned() {
                        Some(v) => self.guest_path(&c, &v, "`shell`"),
                        None => None,
                    };
                    let home = match self.prop_value(&c, "home").cloned() {
                        Some(v) => self.guest_path(&c, &v, "`home`"),
                        None => None,
                    };
                    let u = User {
                        name,
                        uid,
                        groups: groups_of,
                        shell,
                        home,
                    };
                    steps.push(Step {
                        kind: StepKind::AddUser(u.clone()),
                        source: c.at(),
                    });
                    users.push(u);
                }
                other => {
                    let help = did_you_mean(other, ["group", "user"])
                        .unwrap_or_else(|| "`users` holds `group` and `user` nodes".into());
                    self.error(
                        Code::UnknownNode,
                        &c,
                        c.node.name.span,
                        format!("unknown node `{other}` in `users`"),
                    )
                    .with_label("unknown node")
                    .help = Some(help);
                }
            }
        }
        (groups, users, steps)
    }

    fn lower_env(&mut self, it: &Item) -> Vec<(String, String)> {
        self.shape(
            it,
            &Shape {
                min_args: 0,
                max_args: 2,
                props: None,
                children: false,
                usage: "env \"NAME\" \"value\"` or `env NAME=\"value\"",
            },
        );
        let mut out = Vec::new();
        let args: Vec<Entry> = it.node.args().cloned().collect();
        match args.len() {
            0 if it.node.props().next().is_none() => {
                self.error(
                    Code::MissingArgument,
                    it,
                    it.node.head_span(),
                    "`env` sets nothing",
                )
                .with_label("no variable")
                .help = Some("write `env \"NAME\" \"value\"` or `env NAME=\"value\"`".into());
            }
            0 => {}
            1 => {
                self.error(
                    Code::MissingArgument,
                    it,
                    it.node.head_span(),
                    "`env` needs a name and a value",
                )
                .with_label("missing value")
                .help = Some("write `env \"NAME\" \"value\"`".into());
            }
            _ => {
                if let (Some(k), Some(v)) = (
                    self.string(it, &args[0].value, "the variable name"),
                    self.env_value(it, &args[1].value),
                ) {
                    self.check_env_name(it, &k, args[0].value.span);
                    out.push((k, v));
                }
            }
        }
        let props: Vec<Entry> = it.node.props().cloned().collect();
        for e in props {
            let key = e.key.expect("props have keys");
            if let Some(v) = self.env_value(it, &e.value) {
                self.check_env_name(it, &key.text, key.span);
                out.push((key.text, v));
            }
        }
        out
    }

    fn env_value(&mut self, it: &Item, v: &Value) -> Option<String> {
        match &v.literal {
            Literal::Integer(i) => Some(i.to_string()),
            Literal::Bool(b) => Some(b.to_string()),
            _ => self.text(it, v, "an environment value"),
        }
    }

    fn check_env_name(&mut self, it: &Item, name: &str, span: Span) {
        if !is_env_name(name) {
            self.error(
                Code::BadName,
                it,
                span,
                format!("`{name}` is not a valid environment variable name"),
            )
            .with_label("bad name")
            .help = Some("names hold letters, digits and `_` and do not start with a digit".into());
        }
    }

    fn after(&mut self, it: &Item) -> Option<Vec<(String, SourceRef)>> {
        it.node
            .prop("after")
            .is_some()
            .then(|| self.name_list(it, "after"))
    }

    fn lower_layer(&mut self, it: &Item, secrets: &[String]) -> Option<Draft> {
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&["after"]),
                children: true,
                usage: "layer \"name\" after=\"base\" { ... }",
            },
        );
        let after = self.after(it);
        let v = self.arg_value(it, 0)?;
        let name = self.string(it, &v, "the layer name")?;
        let name_at = SourceRef {
            file: it.file,
            span: v.span,
        };
        if !is_layer_name(&name) {
            self.error(Code::BadName, it, v.span, format!("`{name}` is not a valid layer name"))
                .with_label("bad name")
                .help = Some("layer names start with a letter or digit and hold letters, digits, `_`, `-` and `.`".into());
        } else if name == "base" || name == "users" {
            self.error(
                Code::BadName,
                it,
                v.span,
                format!("`{name}` is a reserved layer name"),
            )
            .with_label("reserved")
            .help = Some(format!(
                "`{name}` is the implicit layer of the `{name}` node; pick another name"
            ));
        }
        let steps = self.lower_steps(it, secrets, LAYER_NODES);
        Some(Draft {
            name,
            name_at,
            origin: LayerOrigin::Declared,
            after,
            steps,
            source: it.at(),
        })
    }

    fn lower_steps(&mut self, parent: &Item, secrets: &[String], allowed: &[&str]) -> Vec<Step> {
        let mut steps = Vec::new();
        for c in self.children(parent) {
            let name = c.name().to_owned();
            if !allowed.contains(&name.as_str()) {
                let help = did_you_mean(&name, allowed.iter().copied())
                    .unwrap_or_else(|| format!("here you can write {}", list(allowed)));
                self.error(
                    Code::UnknownNode,
                    &c,
                    c.node.name.span,
                    format!("unknown node `{name}` in `{}`", parent.name()),
                )
                .with_label("unknown node")
                .help = Some(help);
                continue;
            }
            let step = match name.as_str() {
                "run" => self.lower_run(&c, secrets),
                "copy" => self.lower_copy(&c),
                "workdir" => {
                    self.shape(
                        &c,
                        &Shape {
                            min_args: 1,
                            max_args: 1,
                            props: Some(&[]),
                            children: false,
                            usage: "workdir \"/app\"",
                        },
                    );
                    self.arg_value(&c, 0)
                        .and_then(|v| self.guest_path(&c, &v, "`workdir`"))
                        .map(StepKind::Workdir)
                }
                "user" => {
                    self.shape(
                        &c,
                        &Shape {
                            min_args: 1,
                            max_args: 1,
                            props: Some(&[]),
                            children: false,
                            usage: "user \"dev\"",
                        },
                    );
                    self.arg_text(&c, 0, "the user name").map(StepKind::User)
                }
                "env" => {
                    for (key, value) in self.lower_env(&c) {
                        steps.push(Step {
                            kind: StepKind::Env { key, value },
                            source: c.at(),
                        });
                    }
                    None
                }
                "file" => self.lower_file(&c),
                "use" => {
                    self.shape_use(&c);
                    self.lower_use(&c).map(|s| s.kind)
                }
                "service" => self.lower_service(&c, false).map(|s| s.kind),
                "repo" => self.lower_repo(&c, false).map(|s| s.kind),
                "description" => {
                    self.shape(
                        &c,
                        &Shape {
                            min_args: 1,
                            max_args: 1,
                            props: Some(&[]),
                            children: false,
                            usage: "description \"what it installs\"",
                        },
                    );
                    if let Some(v) = self.arg_value(&c, 0) {
                        self.string(&c, &v, "the description");
                    }
                    None
                }
                "param" => None,
                _ => unreachable!("allowed lists only handled names"),
            };
            if let Some(kind) = step {
                steps.push(Step {
                    kind,
                    source: c.at(),
                });
            }
        }
        steps
    }

    fn lower_run(&mut self, it: &Item, secrets: &[String]) -> Option<StepKind> {
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&["secrets"]),
                children: false,
                usage: "run \"apt-get install -y git\"",
            },
        );
        let cmd = self.arg_text(it, 0, "the command");
        let mut used = Vec::new();
        for (name, at) in self.name_list(it, "secrets") {
            if secrets.contains(&name) {
                used.push(name);
            } else {
                let help =
                    did_you_mean(&name, secrets.iter().map(String::as_str)).unwrap_or_else(|| {
                        format!("declare it with `secret \"{name}\" env=\"HOST_VAR\"`")
                    });
                self.report(
                    Diagnostic::error(
                        Code::UnknownSecret,
                        at.file,
                        at.span,
                        format!("unknown secret `{name}`"),
                    )
                    .with_label("not a declared secret")
                    .with_help(help),
                );
            }
        }
        Some(StepKind::Run {
            cmd: cmd?,
            env: BTreeMap::new(),
            workdir: String::new(),
            user: String::new(),
            secrets: used,
        })
    }

    fn lower_copy(&mut self, it: &Item) -> Option<StepKind> {
        self.shape(
            it,
            &Shape {
                min_args: 2,
                max_args: 2,
                props: Some(&[]),
                children: false,
                usage: "copy \"src/on/host\" \"/dst/in/guest\"",
            },
        );
        let src_v = self.arg_value(it, 0)?;
        let src = self.text(it, &src_v, "the copy source");
        let dst = self
            .arg_value(it, 1)
            .and_then(|v| self.guest_path(it, &v, "the copy destination"));
        let src = src?;
        let path = it.dir.join(&src);
        let path = std::path::absolute(&path).unwrap_or(path);
        if let Err(e) = std::fs::symlink_metadata(&path) {
            self.error(
                Code::CopySourceMissing,
                it,
                src_v.span,
                format!("copy source `{}` cannot be read: {e}", path.display()),
            )
            .with_label("no such file or directory")
            .help = Some(format!(
                "copy sources are relative to the spec's directory, `{}`",
                std::path::absolute(&it.dir)
                    .unwrap_or_else(|_| it.dir.to_path_buf())
                    .display()
            ));
            return None;
        }
        Some(StepKind::Copy {
            src: path,
            dst: dst?,
            digest: Digest::default(),
        })
    }

    fn lower_file(&mut self, it: &Item) -> Option<StepKind> {
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&["content", "mode"]),
                children: false,
                usage: "file \"/etc/motd\" content=\"hello\\n\" mode=0o644",
            },
        );
        let path = self
            .arg_value(it, 0)
            .and_then(|v| self.guest_path(it, &v, "the file path"));
        let content = match self.prop_value(it, "content").cloned() {
            Some(v) => self.text(it, &v, "`content`"),
            None => {
                self.error(Code::MissingProperty, it, it.node.head_span(), "`file` needs `content=`")
                    .with_label("no content")
                    .help = Some("write `file \"/etc/motd\" content=\"hello\\n\"`; to copy a host file use `copy`".into());
                None
            }
        };
        let mode = match self.prop_value(it, "mode").cloned() {
            None => Some(0o644),
            Some(v) => match &v.literal {
                Literal::Integer(n) if (0..=0o7777).contains(n) => {
                    Some(u32::try_from(*n).unwrap_or(0o644))
                }
                Literal::String(s)
                    if !s.is_empty()
                        && s.len() <= 4
                        && s.chars().all(|c| ('0'..='7').contains(&c)) =>
                {
                    u32::from_str_radix(s, 8).ok()
                }
                _ => {
                    self.error(
                        Code::BadValue,
                        it,
                        v.span,
                        "`mode` must be octal permission bits",
                    )
                    .with_label("not a mode")
                    .help = Some("write `mode=0o755` or `mode=\"0755\"`".into());
                    None
                }
            },
        };
        Some(StepKind::File {
            path: path?,
            content: content?,
            mode: mode?,
        })
    }

    fn shape_use(&mut self, it: &Item) {
        // Properties are the integration's params; `lower_use` checks them against it.
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: None,
                children: false,
                usage: "use \"node\" version=\"20\"",
            },
        );
    }

    fn lower_use(&mut self, it: &Item) -> Option<Step> {
        let v = self.arg_value(it, 0)?;
        let name = self.string(it, &v, "the integration name")?;
        let found = integrations::find(&name, &self.opts.integration_dirs);
        let Some(found) = found else {
            let names = integrations::names(&self.opts.integration_dirs);
            let help = did_you_mean(&name, names.iter().map(String::as_str))
                .unwrap_or_else(|| format!("integrations: {}", names.join(", ")));
            self.error(
                Code::UnknownIntegration,
                it,
                v.span,
                format!("unknown integration `{name}`"),
            )
            .with_label("not an integration")
            .help = Some(help);
            return None;
        };
        // Values given to the integration's params are interpolated in the *spec's* scope.
        let mut given: Vec<(String, Span, String)> = Vec::new();
        let props: Vec<Entry> = it.node.props().cloned().collect();
        for e in props {
            if e.key.as_ref().is_some_and(|k| k.text == "after") {
                continue;
            }
            let key = e.key.expect("props have keys");
            if let Some(val) = self.env_value(it, &e.value) {
                given.push((key.text, key.span, val));
            }
        }
        // Which file `use` resolved to depends on which files exist: record the probes.
        for dir in &self.opts.integration_dirs {
            let probe = dir.join(format!("{name}.kdl"));
            if !matches!(&found, Found::File(p) if *p == probe) {
                self.inputs.push((probe, None));
            } else {
                break;
            }
        }
        let (display, text) = match found {
            Found::Builtin(d, t) => (d, t.to_owned()),
            Found::File(p) => match std::fs::read_to_string(&p) {
                Ok(t) => {
                    self.inputs.push((p.clone(), Some(key::text_digest(&t))));
                    (p.display().to_string(), t)
                }
                Err(e) => {
                    self.error(
                        Code::UnknownIntegration,
                        it,
                        v.span,
                        format!("cannot read integration `{}`: {e}", p.display()),
                    )
                    .with_label("here");
                    return None;
                }
            },
        };
        let file = self.files.add(display, text.as_str());
        let (doc, diags) = specc_syntax::parse(file, &text);
        self.diags.extend(diags);
        let doc = doc?;
        let Some(node) = doc.nodes.into_iter().find(|n| n.name.text == "integration") else {
            self.report(
                Diagnostic::error(
                    Code::MissingNode,
                    file,
                    Span::new(0, 0),
                    "no `integration` node in this file",
                )
                .with_label("expected `integration \"name\" { ... }`"),
            );
            self.error(
                Code::UnknownIntegration,
                it,
                v.span,
                format!("integration `{name}` is broken"),
            )
            .with_label("used here");
            return None;
        };
        let root = Item {
            file,
            dir: Rc::from(Path::new("/")),
            chain: Rc::new(Vec::new()),
            node,
        };
        self.shape(
            &root,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&[]),
                children: true,
                usage: "integration \"name\" { ... }",
            },
        );
        let mut params: Vec<Param> = Vec::new();
        for c in self.children(&root).iter().filter(|c| c.name() == "param") {
            let seen: Vec<(Param, Item)> = params.iter().map(|p| (p.clone(), c.clone())).collect();
            if let Some(p) = self.lower_param(c, &seen) {
                params.push(p);
            }
        }
        for (k, key_span, val) in &given {
            match params.iter_mut().find(|p| p.name == *k) {
                Some(p) => p.value = val.clone(),
                None => {
                    let help = did_you_mean(k, params.iter().map(|p| p.name.as_str()))
                        .unwrap_or_else(|| {
                            format!(
                                "`{name}` takes {}",
                                list(&params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>())
                            )
                        });
                    self.error(
                        Code::UnknownProperty,
                        it,
                        *key_span,
                        format!("integration `{name}` has no param `{k}`"),
                    )
                    .with_label("unknown param")
                    .help = Some(help);
                }
            }
        }
        let saved = std::mem::replace(
            &mut self.scope,
            Scope {
                values: params
                    .iter()
                    .map(|p| (p.name.clone(), p.value.clone()))
                    .collect(),
                used: HashSet::new(),
            },
        );
        let steps = self.lower_steps(&root, &[], INTEGRATION_NODES);
        self.scope = saved;
        let version = params
            .iter()
            .find(|p| p.name == "version")
            .map(|p| p.value.clone())
            .unwrap_or_default();
        Some(Step {
            kind: StepKind::Use {
                integration: name,
                version,
                steps,
            },
            source: it.at(),
        })
    }

    fn lower_service(&mut self, it: &Item, top: bool) -> Option<Step> {
        let props: &'static [&'static str] = if top {
            &["exec", "user", "workdir", "restart", "after"]
        } else {
            &["exec", "user", "workdir", "restart"]
        };
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(props),
                children: true,
                usage: "service \"app\" exec=\"node server.js\" user=\"dev\"",
            },
        );
        let v = self.arg_value(it, 0)?;
        let name = self.string(it, &v, "the service name")?;
        if !is_layer_name(&name) {
            self.error(
                Code::BadName,
                it,
                v.span,
                format!("`{name}` is not a valid service name"),
            )
            .with_label("bad name");
        }
        let exec = match it.node.prop("exec").map(|e| e.value.clone()) {
            Some(e) => self.text(it, &e, "`exec`"),
            None => {
                self.error(
                    Code::MissingProperty,
                    it,
                    it.node.head_span(),
                    format!("service `{name}` needs `exec=`"),
                )
                .with_label("what does it run?")
                .help = Some(format!("write `service \"{name}\" exec=\"command args\"`"));
                None
            }
        };
        let user = self.prop_text(it, "user");
        let workdir = match self.prop_value(it, "workdir").cloned() {
            Some(v) => self.guest_path(it, &v, "`workdir`"),
            None => None,
        };
        let restart = match self.prop_value(it, "restart").cloned() {
            None => Restart::OnFailure,
            Some(r) => match self.string(it, &r, "`restart`").as_deref() {
                Some("always") => Restart::Always,
                Some("on-failure") => Restart::OnFailure,
                Some("no") => Restart::Never,
                Some(other) => {
                    let help = did_you_mean(other, ["always", "on-failure", "no"])
                        .unwrap_or_else(|| "write `always`, `on-failure` or `no`".into());
                    self.error(
                        Code::BadValue,
                        it,
                        r.span,
                        format!("unknown restart policy `{other}`"),
                    )
                    .with_label("unknown policy")
                    .help = Some(help);
                    Restart::OnFailure
                }
                None => Restart::OnFailure,
            },
        };
        let mut env = BTreeMap::new();
        for c in self.children(it) {
            if c.name() == "env" {
                env.extend(self.lower_env(&c));
            } else {
                let help = did_you_mean(c.name(), ["env"])
                    .unwrap_or_else(|| "a service block holds `env` nodes".into());
                self.error(
                    Code::UnknownNode,
                    &c,
                    c.node.name.span,
                    format!("unknown node `{}` in `service`", c.name()),
                )
                .with_label("unknown node")
                .help = Some(help);
            }
        }
        Some(Step {
            kind: StepKind::Service(Service {
                name,
                exec: exec?,
                user,
                workdir,
                env,
                restart,
            }),
            source: it.at(),
        })
    }

    fn lower_repo(&mut self, it: &Item, top: bool) -> Option<Step> {
        let props: &'static [&'static str] = if top {
            &["ref", "path", "after"]
        } else {
            &["ref", "path"]
        };
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(props),
                children: false,
                usage: "repo \"https://host/app.git\" ref=\"main\" path=\"/app/src\"",
            },
        );
        let url = self.arg_text(it, 0, "the repository URL")?;
        let reference = self.prop_text(it, "ref").unwrap_or_else(|| "HEAD".into());
        let path = match self.prop_value(it, "path").cloned() {
            Some(v) => self.guest_path(it, &v, "`path`"),
            None => {
                self.error(
                    Code::MissingProperty,
                    it,
                    it.node.head_span(),
                    "`repo` needs `path=`",
                )
                .with_label("where in the guest?")
                .help = Some("write `path=\"/app/src\"`".into());
                None
            }
        };
        Some(Step {
            kind: StepKind::Repo {
                url,
                reference,
                path: path?,
            },
            source: it.at(),
        })
    }

    fn lower_idle(&mut self, it: &Item) -> Idle {
        self.shape(
            it,
            &Shape {
                min_args: 0,
                max_args: 0,
                props: Some(&["pause-after", "suspend-after"]),
                children: false,
                usage: "idle pause-after=\"5m\" suspend-after=\"1h\"",
            },
        );
        let mut idle = Idle::default();
        if let Some(v) = self.prop_value(it, "pause-after").cloned() {
            idle.pause_after = self.duration(it, &v, "`pause-after`");
        }
        if let Some(v) = self.prop_value(it, "suspend-after").cloned() {
            idle.suspend_after = self.duration(it, &v, "`suspend-after`");
            if let (Some(p), Some(s)) = (idle.pause_after, idle.suspend_after)
                && s < p
            {
                self.error(
                    Code::BadValue,
                    it,
                    v.span,
                    "`suspend-after` is shorter than `pause-after`",
                )
                .with_label("suspends before it pauses")
                .help = Some(
                    "a VM pauses first, then suspends: make `suspend-after` the longer one".into(),
                );
            }
        }
        idle
    }

    fn lower_persistence(&mut self, it: &Item) -> Option<Persistence> {
        self.shape(
            it,
            &Shape {
                min_args: 1,
                max_args: 1,
                props: Some(&["priority"]),
                children: false,
                usage: "persistence \"sticky\" priority=5",
            },
        );
        let v = self.arg_value(it, 0)?;
        let kind = self.string(it, &v, "the persistence kind")?;
        let priority = self.prop_value(it, "priority").cloned();
        match kind.as_str() {
            "sticky" => {
                let p = match priority {
                    Some(p) => self.integer(it, &p, "`priority`", 0, 10)?,
                    None => 5,
                };
                Some(Persistence::Sticky {
                    priority: u8::try_from(p).unwrap_or(5),
                })
            }
            "ephemeral" | "persistent" => {
                if let Some(p) = priority {
                    self.error(
                        Code::UnknownProperty,
                        it,
                        p.span,
                        "`priority` only applies to `sticky`",
                    )
                    .with_label("not for this kind");
                }
                Some(if kind == "ephemeral" {
                    Persistence::Ephemeral
                } else {
                    Persistence::Persistent
                })
            }
            other => {
                let help = did_you_mean(other, ["ephemeral", "sticky", "persistent"])
                    .unwrap_or_else(|| "write `ephemeral`, `sticky` or `persistent`".into());
                self.error(
                    Code::BadValue,
                    it,
                    v.span,
                    format!("unknown persistence `{other}`"),
                )
                .with_label("unknown kind")
                .help = Some(help);
                None
            }
        }
    }

    // ---------------------------------------------------------------- DAG and state

    /// Resolves names and `after=`; returns a topological order (indices into `drafts`).
    fn resolve_dag(&mut self, drafts: &[Draft]) -> Option<Vec<(usize, Vec<usize>)>> {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut ok = true;
        for (i, d) in drafts.iter().enumerate() {
            if let Some(&first) = by_name.get(d.name.as_str()) {
                ok = false;
                let f = &drafts[first];
                let (code, msg) = match &d.origin {
                    LayerOrigin::Service(n) => (
                        Code::DuplicateName,
                        format!("service `{n}` is declared twice"),
                    ),
                    LayerOrigin::Use(n) => (
                        Code::DuplicateName,
                        format!("integration `{n}` is used twice at the top level"),
                    ),
                    LayerOrigin::Repo(p) => (
                        Code::DuplicateName,
                        format!("two repos are cloned to `{p}`"),
                    ),
                    _ => (
                        Code::DuplicateLayer,
                        format!("layer `{}` is defined twice", d.name),
                    ),
                };
                self.report(
                    Diagnostic::error(code, d.name_at.file, d.name_at.span, msg)
                        .with_label("again here")
                        .with_secondary(f.name_at.file, f.name_at.span, "first defined here")
                        .with_help("names are unique in a spec; rename one"),
                );
                continue;
            }
            by_name.insert(&d.name, i);
        }
        let mut parents: Vec<Vec<usize>> = Vec::with_capacity(drafts.len());
        for (i, d) in drafts.iter().enumerate() {
            let ps = match &d.after {
                // Implicit chaining: the previous layer in file order.
                None => vec![i - 1],
                Some(names) => {
                    let mut ps = Vec::new();
                    for (n, at) in names {
                        match by_name.get(n.as_str()) {
                            Some(&p) if p == i => {
                                ok = false;
                                self.report(
                                    Diagnostic::error(
                                        Code::LayerCycle,
                                        at.file,
                                        at.span,
                                        format!("layer `{n}` comes after itself"),
                                    )
                                    .with_label("self-reference"),
                                );
                            }
                            Some(&p) => {
                                if !ps.contains(&p) {
                                    ps.push(p);
                                }
                            }
                            None => {
                                ok = false;
                                let help = did_you_mean(n, drafts.iter().map(|d| d.name.as_str()))
                                    .unwrap_or_else(|| {
                                        format!(
                                            "layers: {}",
                                            drafts
                                                .iter()
                                                .map(|d| format!("`{}`", d.name))
                                                .collect::<Vec<_>>()
                                                .join(", ")
                                        )
                                    });
                                self.report(
                                    Diagnostic::error(
                                        Code::UnknownLayer,
                                        at.file,
                                        at.span,
                                        format!("`after` names unknown layer `{n}`"),
                                    )
                                    .with_label("no such layer")
                                    .with_help(help),
                                );
                            }
                        }
                    }
                    ps
                }
            };
            parents.push(ps);
        }
        match graph::topo_order(&parents) {
            Ok(order) => ok.then(|| order.into_iter().map(|i| (i, parents[i].clone())).collect()),
            Err(cycle) => {
                let names: Vec<&str> = cycle.iter().map(|&i| drafts[i].name.as_str()).collect();
                let first = &drafts[cycle[0]];
                let mut d = Diagnostic::error(
                    Code::LayerCycle,
                    first.name_at.file,
                    first.name_at.span,
                    format!("layer cycle: {} -> {}", names.join(" -> "), names[0]),
                )
                .with_label("this layer depends on itself")
                .with_help("remove one of the `after=` edges in the cycle");
                for &i in &cycle[1..] {
                    let l = &drafts[i];
                    d = d.with_secondary(l.name_at.file, l.name_at.span, "part of the cycle");
                }
                self.report(d);
                None
            }
        }
    }

    fn finish_layers(
        &mut self,
        drafts: Vec<Draft>,
        order: Vec<(usize, Vec<usize>)>,
        spec_env: &BTreeMap<String, String>,
    ) -> Vec<Layer> {
        let mut position = vec![0usize; drafts.len()];
        for (pos, (i, _)) in order.iter().enumerate() {
            position[*i] = pos;
        }
        let mut drafts: Vec<Option<Draft>> = drafts.into_iter().map(Some).collect();
        let mut layers: Vec<Layer> = Vec::with_capacity(order.len());
        let mut end_state: Vec<State> = Vec::with_capacity(order.len());
        for (i, ps) in order {
            let d = drafts[i].take().expect("each draft once");
            let parents: Vec<LayerId> = ps.iter().map(|p| LayerId(position[*p])).collect();
            // A layer continues from its first parent's state, as its VM does.
            let mut state = match parents.first() {
                Some(p) => end_state[p.0].clone(),
                None => State {
                    env: spec_env.clone(),
                    workdir: "/".into(),
                    user: "root".into(),
                },
            };
            let mut steps = d.steps;
            apply_state(&mut steps, &mut state);
            layers.push(Layer {
                name: d.name,
                origin: d.origin,
                parents,
                steps,
                key: Digest::default(),
                file_order: i,
                source: d.source,
                context: RunContext {
                    env: state.env.clone(),
                    workdir: state.workdir.clone(),
                    user: state.user.clone(),
                },
            });
            end_state.push(state);
        }
        layers
    }

    fn fill_copy_digests(&mut self, layers: &mut [Layer]) {
        let mut srcs: Vec<PathBuf> = Vec::new();
        for l in layers.iter() {
            collect_copies(&l.steps, &mut srcs);
        }
        srcs.sort();
        srcs.dedup();
        let digests = hash::hash_sources(&srcs, &mut self.digests);
        for (src, d) in &digests {
            if let Ok(d) = d {
                self.trees.push((src.clone(), *d));
            }
        }
        let mut failures: Vec<(PathBuf, String)> = Vec::new();
        for l in layers.iter_mut() {
            fill_copies(&mut l.steps, &digests, &mut failures);
        }
        for (step_src, e) in &failures {
            let at = layers
                .iter()
                .flat_map(|l| l.steps.iter())
                .find(|s| matches!(&s.kind, StepKind::Copy { src, .. } if src == step_src))
                .map(|s| s.source);
            if let Some(at) = at {
                self.report(
                    Diagnostic::error(
                        Code::CopySourceMissing,
                        at.file,
                        at.span,
                        format!("cannot hash copy source `{}`: {e}", step_src.display()),
                    )
                    .with_label("while hashing this copy"),
                );
            }
        }
    }
}

fn apply_state(steps: &mut [Step], state: &mut State) {
    for s in steps {
        match &mut s.kind {
            StepKind::Env { key, value } => {
                state.env.insert(key.clone(), value.clone());
            }
            StepKind::Workdir(w) => state.workdir = w.clone(),
            StepKind::User(u) => state.user = u.clone(),
            StepKind::Run {
                env, workdir, user, ..
            } => {
                env.clone_from(&state.env);
                workdir.clone_from(&state.workdir);
                user.clone_from(&state.user);
            }
            StepKind::Use { steps, .. } => apply_state(steps, state),
            _ => {}
        }
    }
}

fn collect_copies(steps: &[Step], out: &mut Vec<PathBuf>) {
    for s in steps {
        match &s.kind {
            StepKind::Copy { src, .. } => out.push(src.clone()),
            StepKind::Use { steps, .. } => collect_copies(steps, out),
            _ => {}
        }
    }
}

fn fill_copies(
    steps: &mut [Step],
    digests: &HashMap<PathBuf, Result<Digest, String>>,
    failures: &mut Vec<(PathBuf, String)>,
) {
    for s in steps {
        match &mut s.kind {
            StepKind::Copy { src, digest, .. } => match digests.get(src) {
                Some(Ok(d)) => *digest = *d,
                Some(Err(e)) => failures.push((src.clone(), e.clone())),
                None => failures.push((src.clone(), "not hashed".into())),
            },
            StepKind::Use { steps, .. } => fill_copies(steps, digests, failures),
            _ => {}
        }
    }
}

fn collect_services(steps: &[Step], out: &mut Vec<Service>) {
    for s in steps {
        match &s.kind {
            StepKind::Service(svc) => out.push(svc.clone()),
            StepKind::Use { steps, .. } => collect_services(steps, out),
            _ => {}
        }
    }
}

fn dir_of(path: &Path) -> Rc<Path> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Rc::from(p),
        _ => Rc::from(Path::new(".")),
    }
}

fn list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
