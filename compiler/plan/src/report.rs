//! Views of a plan: the `--json` document, a readable tree, Graphviz DOT.

use std::fmt::Write as _;

use serde::Serialize;

use crate::ir::{LayerId, Spec};
use crate::store::LayerStore;

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
pub fn plan_report(spec: &Spec, store: &dyn LayerStore) -> PlanReport {
    PlanReport {
        spec: spec.name.clone(),
        layers: spec
            .layers
            .iter()
            .map(|l| LayerReport {
                name: l.name.clone(),
                key: l.key.to_prefixed(),
                parents: l
                    .parents
                    .iter()
                    .map(|p| spec.layers[p.0].name.clone())
                    .collect(),
                cached: store.has_layer(&l.key),
            })
            .collect(),
    }
}

/// A tree along first parents; a layer with more parents says so.
pub fn render_tree(spec: &Spec, store: &dyn LayerStore) -> String {
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); spec.layers.len()];
    for (i, l) in spec.layers.iter().enumerate() {
        if let Some(p) = l.parents.first() {
            children[p.0].push(i);
        }
    }
    let head = spec.head();
    let cached = spec
        .layers
        .iter()
        .filter(|l| store.has_layer(&l.key))
        .count();
    let mut out = format!(
        "spec {} ({} layers, {} cached, head `{}`)\n",
        spec.name,
        spec.layers.len(),
        cached,
        spec.layers[head.0].name
    );
    /// `last`: `None` for the root, else whether this is its parent's last child.
    fn line(
        spec: &Spec,
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
                .map(|p| spec.layers[p.0].name.as_str())
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
pub fn render_dot(spec: &Spec) -> String {
    let mut out = format!(
        "digraph {} {{\n    rankdir=TB;\n    node [shape=box, fontname=\"monospace\"];\n",
        dot_id(&spec.name)
    );
    let head = spec.head();
    for (i, l) in spec.layers.iter().enumerate() {
        let style = if LayerId(i) == head {
            ", style=bold"
        } else {
            ""
        };
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
                dot_id(&spec.layers[p.0].name),
                dot_id(&l.name)
            );
        }
    }
    out.push_str("}\n");
    out
}
