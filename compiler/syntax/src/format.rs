//! Canonical formatting of spec files (`specc fmt`), keeping comments.

use kdl::{FormatConfig, KdlDocument, KdlNode};

use crate::ast;
use crate::diagnostic::Diagnostic;
use crate::source::FileId;

/// Formats `text` canonically: four-space indentation, one space between entries, values
/// written as the author wrote them (quotes, raw strings and escapes kept), comments kept.
/// Returns the syntax diagnostics instead when the text is not valid KDL.
pub fn format(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let doc = match KdlDocument::parse_v2(text) {
        Ok(doc) => doc,
        Err(_) => return Err(ast::parse(file, text).1),
    };
    Ok(format_doc(doc))
}

fn format_doc(mut doc: KdlDocument) -> String {
    let mut config = FormatConfig::builder().indent("    ").build();
    // Keep each value's source form: the formatter must not turn `"a"` into `a` or drop escapes.
    config.entry_autoformate_keep = true;
    // kdl's autoformat replaces a node terminator that is a line comment (`vm x=1 // why`)
    // with a bare newline, losing the comment: save those terminators and put them back.
    let mut saved = Vec::new();
    for node in doc.nodes_mut() {
        save_comment_terminators(node, &mut saved);
    }
    doc.autoformat_config(&config);
    let mut saved = saved.into_iter();
    for node in doc.nodes_mut() {
        normalize_entries(node, &mut saved);
    }
    let mut out = doc.to_string();
    // One trailing newline, no trailing blanks on any line.
    let mut clean: String = out
        .lines()
        .map(|l| l.trim_end())
        .collect::<Vec<_>>()
        .join("\n");
    clean = clean.trim_end().to_owned();
    clean.push('\n');
    out.clear();
    out.push_str(clean.trim_start_matches('\n'));
    out
}

fn save_comment_terminators(node: &mut KdlNode, saved: &mut Vec<Option<String>>) {
    let term = node
        .format()
        .map(|f| f.terminator.trim_start())
        .filter(|t| t.starts_with("//"));
    saved.push(term.map(|t| format!(" {}", t.trim_end())));
    if let Some(children) = node.children_mut() {
        for child in children.nodes_mut() {
            save_comment_terminators(child, saved);
        }
    }
}

fn normalize_entries(node: &mut KdlNode, saved: &mut impl Iterator<Item = Option<String>>) {
    if let (Some(Some(comment)), Some(f)) = (saved.next(), node.format_mut()) {
        f.terminator = format!("{comment}\n");
    }
    for entry in node.entries_mut() {
        if let Some(f) = entry.format_mut() {
            f.leading = " ".into();
            f.trailing = String::new();
            f.after_key = String::new();
            f.after_eq = String::new();
        }
    }
    if let Some(children) = node.children_mut() {
        for child in children.nodes_mut() {
            normalize_entries(child, saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_normalizes_spacing_and_keeps_comments_and_quotes() {
        let text = "// top\nspec   \"a\"   {\n  vm   memory=\"1GiB\"    vcpus=2 // two\n        run \"echo \\\"hi\\\"\"\n}\n\n\n";
        let out = format(FileId(0), text).expect("valid");
        expect_test::expect![[r#"
            // top
            spec "a" {
                vm memory="1GiB" vcpus=2 // two
                run "echo \"hi\""
            }
        "#]]
        .assert_eq(&out);
        assert_eq!(format(FileId(0), &out).expect("valid"), out, "idempotent");
    }

    #[test]
    fn format_of_invalid_kdl_returns_diagnostics() {
        assert!(format(FileId(0), "spec {").is_err());
    }
}
