//! The specc command line: check, plan, graph, fmt, build, run.

fn main() {}
