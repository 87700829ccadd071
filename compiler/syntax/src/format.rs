//! Canonical formatting of spec files (`specc fmt`), keeping comments.

use kdl::{FormatConfig, KdlDocument, KdlNode};

use crate::ast;
use crate::diagnostic::{Code, Diagnostic};
use crate::source::{FileId, Span};

/// Formats `text` canonically: four-space indentation, one space between entries, values
/// written as the author wrote them (quotes, raw strings and escapes kept), comments kept.
/// Returns the syntax diagnostics instead when the text is not valid KDL.
pub fn format(file: FileId, text: &str) -> Result<String, Vec<Diagnostic>> {
    let doc = match KdlDocument::parse_v2(text) {
        Ok(doc) => doc,
        Err(_) => return Err(ast::parse(file, text).1),
    };
    let out = format_doc(doc, text);
    match first_loss(text, &out) {
        None => Ok(out),
        Some(at) => Err(vec![
            Diagnostic::error(
                Code::FormatWouldLose,
                file,
                Span::new(at, (at + 1).min(text.len())),
                "formatting would drop the text here",
            )
            .with_help(
                "the formatter cannot place a comment here (after a type annotation or \
                 between some entries); move it to its own line. The file is left unchanged",
            ),
        ]),
    }
}

/// Formatting may only change layout: blanks, `;` terminators and the quoting of names
/// (`"x"`, `#"x"#` become `x`). Where anything else from `text` is missing in `out` (kdl's
/// autoformat drops some comments), the byte offset in `text` of the first such character.
fn first_loss(text: &str, out: &str) -> Option<usize> {
    let ink = |c: &char| !c.is_whitespace() && !matches!(c, ';' | '"' | '#');
    let mut have = out.chars().filter(ink);
    for (i, c) in text.char_indices().filter(|(_, c)| ink(c)) {
        if have.next() != Some(c) {
            return Some(i);
        }
    }
    have.next().map(|_| text.len().saturating_sub(1))
}

fn format_doc(mut doc: KdlDocument, text: &str) -> String {
    let mut config = FormatConfig::builder().indent("    ").build();
    // Keep each value's source form: the formatter must not turn `"a"` into `a` or drop escapes.
    config.entry_autoformate_keep = true;
    // kdl's autoformat replaces a node terminator that is a line comment (`vm x=1 // why`)
    // with a bare newline, losing the comment: save those terminators and put them back.
    let mut saved = Vec::new();
    for (i, node) in doc.nodes_mut().iter_mut().enumerate() {
        save_comment_terminators(node, i == 0, text, &mut saved);
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

fn save_comment_terminators(node: &mut KdlNode, first: bool, text: &str, saved: &mut Vec<Kept>) {
    let f = node.format();
    let comment = f
        .map(|f| f.terminator.as_str())
        .filter(|t| t.trim_start().starts_with("//"))
        .or_else(|| brace_comment(node, text))
        .map(|t| format!(" {}", t.trim()));
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
            save_comment_terminators(child, i == 0, text, saved);
        }
    }
}

/// The line comment after a node's closing brace (`} // why`): kdl 6.7 parses it into no
/// field at all (the node's terminator is empty and its span stops before the comment), so
/// it would vanish from the output. Read it from the source after the node's span.
fn brace_comment<'t>(node: &KdlNode, text: &'t str) -> Option<&'t str> {
    node.children()?;
    let span = node.span();
    let rest = text.get(span.offset() + span.len()..)?;
    let rest = rest.trim_start_matches([' ', '\t']);
    rest.starts_with("//")
        .then(|| rest.lines().next().unwrap_or(""))
}

fn normalize_entries(node: &mut KdlNode, saved: &mut impl Iterator<Item = Kept>) {
    if let (Some(kept), Some(f)) = (saved.next(), node.format_mut()) {
        if let Some(comment) = kept.comment {
            f.terminator = format!("{comment}\n");
        }
        if kept.blank_before {
            f.leading.insert(0, '\n');
        }
        // kdl's autoformat ends a comment before the terminator (`a /**/;`) with a newline of
        // its own, on top of the terminator's: a blank line the next run would keep and add
        // to. Drop it unless a line comment or a line continuation (`\`) needs it.
        let bt = f.before_terminator.trim_end();
        let needs_newline = bt.ends_with('\\') || (bt.contains("//") && !bt.ends_with("*/"));
        if bt.len() < f.before_terminator.len() && !needs_newline {
            f.before_terminator.truncate(bt.len());
        }
    }
    for entry in node.entries_mut() {
        if let Some(f) = entry.format_mut() {
            // Blanks become one space; a comment between entries (`/* why */`) stays.
            let lead = f.leading.trim();
            f.leading = if lead.is_empty() {
                " ".into()
            } else if f.leading.contains('\n') {
                std::mem::take(&mut f.leading)
            } else {
                format!(" {lead} ")
            };
            if f.trailing.trim().is_empty() {
                f.trailing = String::new();
            }
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
    fn a_line_continuation_before_a_terminator_stays_one() {
        // `spec \` then `;`: two nodes; the continuation must not join them into one.
        let once = format(FileId(0), "spec\\\n;spec").expect("valid");
        assert_eq!(
            crate::ast::parse(FileId(0), &once).0.map(|d| d.nodes.len()),
            Some(2),
            "{once:?} is not two nodes"
        );
        assert_eq!(format(FileId(0), &once).expect("valid"), once, "idempotent");
    }

    #[test]
    fn a_comment_before_a_terminator_adds_no_blank_line() {
        for text in [
            "a/**/;spec",
            "a /* x */\nspec\n",
            "a /-b=1\nspec\n",
            "é/**/spec",
        ] {
            let once = format(FileId(0), text).expect("valid");
            assert!(!once.contains("\n\n"), "{text:?} became {once:?}");
            assert_eq!(format(FileId(0), &once).expect("valid"), once, "idempotent");
        }
    }

    #[test]
    fn a_comment_after_a_closing_brace_is_kept() {
        let text = "x { y { z } // in\n} // out\nnext\nspec{}//c\n";
        let out = format(FileId(0), text).expect("valid");
        expect_test::expect![[r#"
            x {
                y {
                    z
                } // in
            } // out
            next
            spec {

            } //c
        "#]]
        .assert_eq(&out);
        assert_eq!(format(FileId(0), &out).expect("valid"), out, "idempotent");
    }

    #[test]
    fn a_comment_the_formatter_cannot_place_is_an_error_not_a_loss() {
        let diags = format(FileId(0), "spec\n(t)/* why */node\n").expect_err("refused");
        assert_eq!(diags[0].code, Code::FormatWouldLose);
        assert_eq!(diags[0].primary.span.start, 8, "at the comment");
    }

    #[test]
    fn format_of_invalid_kdl_returns_diagnostics() {
        assert!(format(FileId(0), "spec {").is_err());
    }
}
