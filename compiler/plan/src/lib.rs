//! Lowering to the spec IR, validation, the layer DAG and content-addressed cache keys.
