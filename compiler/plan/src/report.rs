//! Views of a plan: the `--json` document, a readable tree, Graphviz DOT.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::ir::{Digest, Spec};
use crate::store::LayerStore;

/// What the views need of a planned spec: names, keys, edges. Small and serializable, so a
/// warm `specc plan` can load it from the plan cache instead of re-parsing the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outline {
    /// Spec name.
    pub spec: String,
    /// Layers in topological order.
    pub layers: Vec<OutlineLayer>,
    /// Index of [`Spec::head`].
    pub head: usize,
}

/// One layer of an [`Outline`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlineLayer {
    /// Name.
    pub name: String,
    /// Cache key.
    pub key: Digest,
    /// Parent indices.
    pub parents: Vec<usize>,
}

impl Outline {
    /// The outline of a planned spec.
    pub fn of(spec: &Spec) -> Outline {
        Outline {
            spec: spec.name.clone(),
            layers: spec
                .layers
                .iter()
                .map(|l| OutlineLayer {
                    name: l.name.clone(),
                    key: l.key,
                    parents: l.parents.iter().map(|p| p.0).collect(),
                })
                .collect(),
            head: spec.head().0,
        }
    }
}

/// `specc plan --json`: `{"spec": NAME, "layers": [...]}` in topological order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanReport {
    /// Spec name.
    pub spec: String,
    /// Layers, parents first.
    pub layers: Vec<LayerReport>,
}

/// One layer of a [`PlanReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerReport {
    /// Layer name.
    pub name: String,
    /// `sha256:<64 hex>`.
    pub key: String,
    /// Parent layer names in order.
    pub parents: Vec<String>,
    /// Whether the store already has it.
    pub cached: bool,
}

/// Builds the JSON view.
pub fn plan_report(spec: &Outline, store: &dyn LayerStore) -> PlanReport {
    PlanReport {
        spec: spec.spec.clone(),
        layers: spec
            .layers
            .iter()
            .map(|l| LayerReport {
                name: l.name.clone(),
                key: l.key.to_prefixed(),
                parents: l
                    .parents
                    .iter()
                    .map(|p| spec.layers[*p].name.clone())
                    .collect(),
                cached: store.has_layer(&l.key),
            })
            .collect(),
    }
}

/// A tree along first parents; a layer with more parents says so.
pub fn render_tree(spec: &Outline, store: &dyn LayerStore) -> String {
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); spec.layers.len()];
    for (i, l) in spec.layers.iter().enumerate() {
        if let Some(p) = l.parents.first() {
            children[*p].push(i);
        }
    }
    let head = spec.head;
    let cached = spec
        .layers
        .iter()
        .filter(|l| store.has_layer(&l.key))
        .count();
    let mut out = format!(
        "spec {} ({} layers, {} cached, head `{}`)\n",
        spec.spec,
        spec.layers.len(),
        cached,
        spec.layers[head].name
    );
    /// `last`: `None` for the root, else whether this is its parent's last child.
    fn line(
        spec: &Outline,
        store: &dyn LayerStore,
        children: &[Vec<usize>],
        i: usize,
        prefix: &str,
        last: Option<bool>,
        out: &mut String,
    ) {
        let l = &spec.layers[i];
        let (branch, next) = match last {
            None => ("", String::new()),
            Some(true) => ("└─ ", format!("{prefix}   ")),
            Some(false) => ("├─ ", format!("{prefix}│  ")),
        };
        let state = if store.has_layer(&l.key) {
            "cached"
        } else {
            "build"
        };
        let _ = write!(
            out,
            "{prefix}{branch}{}  {}  {state}",
            l.name,
            &l.key.to_prefixed()[..19]
        );
        if l.parents.len() > 1 {
            let others: Vec<&str> = l.parents[1..]
                .iter()
                .map(|p| spec.layers[*p].name.as_str())
                .collect();
            let _ = write!(out, "  (also after {})", others.join(", "));
        }
        out.push('\n');
        let kids = &children[i];
        for (n, &c) in kids.iter().enumerate() {
            line(
                spec,
                store,
                children,
                c,
                &next,
                Some(n + 1 == kids.len()),
                out,
            );
        }
    }
    line(spec, store, &children, 0, "", None, &mut out);
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn dot_id(s: &str) -> String {
    format!("\"{}\"", escape(s))
}

/// Graphviz DOT of the layer DAG, edges parent -> child, the head drawn bold.
pub fn render_dot(spec: &Outline) -> String {
    let mut out = format!(
        "digraph {} {{\n    rankdir=TB;\n    node [shape=box, fontname=\"monospace\"];\n",
        dot_id(&spec.spec)
    );
    let head = spec.head;
    for (i, l) in spec.layers.iter().enumerate() {
        let style = if i == head { ", style=bold" } else { "" };
        let _ = writeln!(
            out,
            "    {} [label=\"{}\\n{}\"{style}];",
            dot_id(&l.name),
            escape(&l.name),
            &l.key.to_hex()[..12]
        );
    }
    for l in &spec.layers {
        for p in &l.parents {
            let _ = writeln!(
                out,
                "    {} -> {};",
                dot_id(&spec.layers[*p].name),
                dot_id(&l.name)
            );
        }
    }
    out.push_str("}\n");
    out
}
