//! The layer DAG on `petgraph`: topological order, cycle naming, DOT.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::ir::{LayerId, Spec};

/// Builds the graph `parent -> child` over layer indices.
fn build(parents: &[Vec<usize>]) -> DiGraph<usize, ()> {
    let mut g = DiGraph::with_capacity(parents.len(), parents.len());
    let nodes: Vec<NodeIndex> = (0..parents.len()).map(|i| g.add_node(i)).collect();
    for (child, ps) in parents.iter().enumerate() {
        for &p in ps {
            g.add_edge(nodes[p], nodes[child], ());
        }
    }
    g
}

/// A topological order of layers given each layer's parents, ties broken by file order (the
/// index), so the order is deterministic. On a cycle, returns the cycle's members in edge order.
pub(crate) fn topo_order(parents: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let g = build(parents);
    let mut indegree: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..parents.len())
        .filter(|i| indegree[*i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(parents.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for e in g.edges(NodeIndex::new(i)) {
            let c = g[e.target()];
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(Reverse(c));
            }
        }
    }
    if order.len() == parents.len() {
        return Ok(order);
    }
    Err(find_cycle(&g))
}

fn find_cycle(g: &DiGraph<usize, ()>) -> Vec<usize> {
    let scc = tarjan_scc(g)
        .into_iter()
        .filter(|c| c.len() > 1)
        .min_by_key(|c| c.iter().map(|n| g[*n]).min())
        .unwrap_or_default();
    let Some(&start) = scc.iter().min_by_key(|n| g[**n]) else {
        return Vec::new();
    };
    // Walk parent -> child edges inside the component, starting at its first layer in file
    // order, until we are back: that walk is the cycle to show the user.
    let mut cycle = vec![g[start]];
    let mut at = start;
    loop {
        let next = g
            .edges(at)
            .map(|e| e.target())
            .filter(|t| scc.contains(t))
            .min_by_key(|t| g[*t])
            .expect("every member of a cycle has an edge inside it");
        if next == start || cycle.contains(&g[next]) {
            break;
        }
        cycle.push(g[next]);
        at = next;
    }
    cycle
}

/// The spec's layer DAG: node weights are [`LayerId`]s, edges go parent -> child.
pub fn dag(spec: &Spec) -> DiGraph<LayerId, ()> {
    let mut g = DiGraph::with_capacity(spec.layers.len(), spec.layers.len());
    let nodes: Vec<NodeIndex> = (0..spec.layers.len())
        .map(|i| g.add_node(LayerId(i)))
        .collect();
    for (i, l) in spec.layers.iter().enumerate() {
        for p in &l.parents {
            g.add_edge(nodes[p.0], nodes[i], ());
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topo_order_breaks_ties_by_file_order() {
        // 0 <- 2, 0 <- 1, 1 <- 3: 1 and 2 are both ready after 0; 1 comes first in the file.
        let parents = vec![vec![], vec![0], vec![0], vec![1]];
        assert_eq!(topo_order(&parents), Ok(vec![0, 1, 2, 3]));
    }

    #[test]
    fn cycles_are_named_in_edge_order() {
        // 1 after 3, 2 after 1, 3 after 2: the cycle 1 -> 2 -> 3 -> 1.
        let parents = vec![vec![], vec![3], vec![1], vec![2], vec![0]];
        assert_eq!(topo_order(&parents), Err(vec![1, 2, 3]));
    }
}
