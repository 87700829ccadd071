//! Arbitrary bytes through the whole front end: KDL parse, AST, formatter, value grammars and
//! lowering. Checks that nothing panics and that every diagnostic span lies inside its file on
//! character boundaries, so rendering can never go out of bounds.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use specc_syntax::{FileId, Files, Node, value};

/// Nodes and properties that make lowering read the file system (`copy "/"` would hash the
/// whole machine, `import "/dev/zero"` never ends). Lowering runs only on documents without
/// them; the syntax layer still sees every input.
fn touches_files(nodes: &[Node]) -> bool {
    nodes.iter().any(|n| {
        matches!(n.name.text.as_str(), "copy" | "import")
            || n.props().any(|e| e.key.as_ref().is_some_and(|k| matches!(k.text.as_str(), "spec" | "kernel" | "file")))
            || n.children.as_deref().is_some_and(touches_files)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (doc, diags) = specc_syntax::parse(FileId(0), text);
    let mut files = Files::new();
    files.add("fuzz.kdl", text);
    for d in &diags {
        assert!(d.primary.span.end <= text.len(), "span past the end: {d:?}");
        assert!(text.is_char_boundary(d.primary.span.start) && text.is_char_boundary(d.primary.span.end));
        let _ = d.to_short(&files);
    }
    if let Ok(formatted) = specc_syntax::format::format(FileId(0), text) {
        // The formatter's output must itself be valid and already formatted.
        let again = specc_syntax::format::format(FileId(0), &formatted).expect("formatted output parses");
        assert_eq!(again, formatted, "formatting is idempotent");
    }
    let _ = value::parse_size(text);
    let _ = value::parse_duration(text);
    let _ = value::parse_port(text);
    let _ = value::parse_template(text);
    if doc.as_ref().is_none_or(|d| touches_files(&d.nodes)) {
        return;
    }
    let c = specc_plan::compile_str(Path::new("/nonexistent/specc-fuzz/spec.kdl"), text, &specc_plan::Options::default());
    for d in &c.diagnostics {
        let f = c.files.get(d.primary.file);
        assert!(d.primary.span.end <= f.text().len(), "span past the end: {d:?}");
        let _ = d.to_record(&c.files);
    }
});
