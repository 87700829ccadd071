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
    for (i, node) in doc.nodes_mut().iter_mut().enumerate() {
        save_comment_terminators(node, i == 0, &mut saved);
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

/// What kdl's autoformat loses and we put back, per node in tree order.
struct Kept {
    /// A line comment that ends the node (`vm x=1 // why`).
    comment: Option<String>,
    /// Whether a blank line separated the node from the one before it.
    blank_before: bool,
}

fn save_comment_terminators(node: &mut KdlNode, first: bool, saved: &mut Vec<Kept>) {
    let f = node.format();
    let comment = f
        .map(|f| f.terminator.trim_start())
        .filter(|t| t.starts_with("//"))
        .map(|t| format!(" {}", t.trim_end()));
    let leading = f.map(|f| f.leading.as_str()).unwrap_or("");
    let ws_end = leading
        .find(|c: char| !c.is_whitespace())
        .unwrap_or(leading.len());
    let blank_before = !first && leading[..ws_end].contains('\n');
    saved.push(Kept {
        comment,
        blank_before,
    });
    if let Some(children) = node.children_mut() {
        for (i, child) in children.nodes_mut().iter_mut().enumerate() {
            save_comment_terminators(child, i == 0, saved);
        }
    }
}

fn normalize_entries(node: &mut KdlNode, saved: &mut impl Iterator<Item = Kept>) {
    if let (Some(kept), Some(f)) = (saved.next(), node.format_mut()) {
        if let Some(comment) = kept.comment {
            f.terminator = format!("{comment}\n");
        }
        if kept.blank_before {
            f.leading.insert(0, '\n');
        }
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
        let text = "// top\nspec   \"a\"   {\n  vm   memory=\"1GiB\"    vcpus=2 // two\n\n\n        run \"echo \\\"hi\\\"\"\n}\n\n\n";
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
