//! The spanned AST: KDL nodes with byte spans on every name, argument and property.
//!
//! The tree is deliberately untyped (names, entries, children): knowing which nodes exist is the
//! job of lowering in `specc-plan`, which can then report *every* unknown node with a
//! suggestion instead of failing the parse.

use std::panic::{AssertUnwindSafe, catch_unwind};

use kdl::{KdlDocument, KdlEntry, KdlNode, KdlValue};

use crate::diagnostic::{Code, Diagnostic};
use crate::source::{FileId, Span};

/// A parsed file: its top-level nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The file the nodes came from.
    pub file: FileId,
    /// Top-level nodes in source order.
    pub nodes: Vec<Node>,
}

/// A name with its span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    /// The name as a string (after KDL unquoting).
    pub text: String,
    /// The bytes of the name in the source.
    pub span: Span,
}

/// One KDL node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The node name.
    pub name: Ident,
    /// Arguments and properties in source order.
    pub entries: Vec<Entry>,
    /// The children block, if the node has braces.
    pub children: Option<Vec<Node>>,
    /// The span of the braces, if any.
    pub children_span: Option<Span>,
    /// The whole node.
    pub span: Span,
}

/// An argument (`key` is `None`) or a property.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The property name, for properties.
    pub key: Option<Ident>,
    /// The value.
    pub value: Value,
    /// The whole entry (`key="value"`).
    pub span: Span,
}

/// A KDL literal.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A string (quoted, raw, multi-line or a bare identifier).
    String(String),
    /// An integer.
    Integer(i128),
    /// A float.
    Float(f64),
    /// `#true` or `#false`.
    Bool(bool),
    /// `#null`.
    Null,
}

impl Literal {
    /// The KDL type name, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Literal::String(_) => "string",
            Literal::Integer(_) => "integer",
            Literal::Float(_) => "float",
            Literal::Bool(_) => "boolean",
            Literal::Null => "null",
        }
    }
}

/// A value with the span of its token.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// The literal.
    pub literal: Literal,
    /// The bytes of the value token (quotes included).
    pub span: Span,
    /// For strings whose characters map one-to-one onto source bytes (no escapes, not
    /// multi-line): the source offset of the first character. Lets value grammars point at the
    /// exact bad characters inside a string.
    pub content_start: Option<usize>,
}

impl Value {
    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match &self.literal {
            Literal::String(s) => Some(s),
            _ => None,
        }
    }

    /// The source span of bytes `from..to` of the string's content; the whole token when the
    /// content does not map one-to-one onto the source.
    pub fn content_span(&self, from: usize, to: usize) -> Span {
        match self.content_start {
            Some(start) => Span::new(start + from, start + to),
            None => self.span,
        }
    }
}

impl Node {
    /// Positional arguments in order.
    pub fn args(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.key.is_none())
    }

    /// Properties in order.
    pub fn props(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.key.is_some())
    }

    /// The last property called `key` (KDL: the rightmost one wins).
    pub fn prop(&self, key: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key.as_ref().is_some_and(|k| k.text == key))
    }

    /// The `i`th positional argument.
    pub fn arg(&self, i: usize) -> Option<&Entry> {
        self.args().nth(i)
    }

    /// The span of the node's name and entries, without children: where "this node" labels go.
    pub fn head_span(&self) -> Span {
        let end = self
            .entries
            .last()
            .map_or(self.name.span.end, |e| e.span.end);
        Span::new(self.name.span.start, end)
    }
}

pub(crate) fn parse(file: FileId, text: &str) -> (Option<Document>, Vec<Diagnostic>) {
    // The KDL crate has no known panics, but "never panics on any input" is our promise, not
    // its: a panic in it becomes a diagnostic instead of taking the whole tool down.
    let parsed = catch_unwind(AssertUnwindSafe(|| KdlDocument::parse_v2(text)));
    match parsed {
        Ok(Ok(doc)) => {
            let nodes = doc.nodes().iter().map(|n| lower_node(text, n)).collect();
            (Some(Document { file, nodes }), Vec::new())
        }
        Ok(Err(err)) => {
            let mut diags: Vec<Diagnostic> = err
                .diagnostics
                .iter()
                .map(|d| {
                    let span = narrow(text, clamp(text, Span::from(d.span)));
                    let message = d
                        .message
                        .clone()
                        .unwrap_or_else(|| "invalid KDL".to_owned());
                    Diagnostic::error(Code::KdlSyntax, file, span, message)
                        .with_label(d.label.clone().unwrap_or_else(|| "here".to_owned()))
                        .with_help_opt(d.help.clone())
                })
                .collect();
            if diags.is_empty() {
                diags.push(
                    Diagnostic::error(Code::KdlSyntax, file, Span::new(0, 0), "invalid KDL")
                        .with_label("the KDL parser gave no location"),
                );
            }
            diags.sort_by_key(|d| d.primary.span);
            diags.dedup();
            (None, diags)
        }
        Err(_) => (
            None,
            vec![
                Diagnostic::error(
                    Code::KdlSyntax,
                    file,
                    Span::new(0, 0),
                    "the KDL parser crashed",
                )
                .with_label("on this file")
                .with_help("this is a bug in the KDL parser; please report the file"),
            ],
        ),
    }
}

/// The KDL parser reports some errors ("Expected property value") on the whole enclosing
/// node, from its first line to where it gave up. The place to fix is where it gave up: the
/// end. Multi-line spans are narrowed to their last non-blank character.
fn narrow(text: &str, span: Span) -> Span {
    let body = text[span.start..span.end].trim_end();
    if !body.contains('\n') {
        return span;
    }
    match body.char_indices().last() {
        Some((i, c)) => Span::new(span.start + i, span.start + i + c.len_utf8()),
        None => span,
    }
}

fn clamp(text: &str, span: Span) -> Span {
    let mut s = span.start.min(text.len());
    while !text.is_char_boundary(s) {
        s -= 1;
    }
    let mut e = span.end.min(text.len()).max(s);
    while !text.is_char_boundary(e) {
        e += 1;
    }
    Span::new(s, e)
}

fn lower_node(text: &str, node: &KdlNode) -> Node {
    let name = Ident {
        text: node.name().value().to_owned(),
        span: node.name().span().into(),
    };
    let entries = node
        .entries()
        .iter()
        .map(|e| lower_entry(text, e))
        .collect();
    let (children, children_span) = match node.children() {
        Some(doc) => (
            Some(doc.nodes().iter().map(|n| lower_node(text, n)).collect()),
            Some(Span::from(doc.span())),
        ),
        None => (None, None),
    };
    Node {
        name,
        entries,
        children,
        children_span,
        span: node.span().into(),
    }
}

fn lower_entry(text: &str, entry: &KdlEntry) -> Entry {
    let span: Span = entry.span().into();
    let key = entry.name().map(|k| Ident {
        text: k.value().to_owned(),
        span: k.span().into(),
    });
    // The value token is the tail of the entry (`key=value`, `(type)value`): its length is
    // the length of its source representation.
    let repr = entry.format().map(|f| f.value_repr.as_str()).unwrap_or("");
    let value_span = if !repr.is_empty() && repr.len() <= span.len() {
        Span::new(span.end - repr.len(), span.end)
    } else {
        span
    };
    let literal = match entry.value() {
        KdlValue::String(s) => Literal::String(s.clone()),
        KdlValue::Integer(i) => Literal::Integer(*i),
        KdlValue::Float(f) => Literal::Float(*f),
        KdlValue::Bool(b) => Literal::Bool(*b),
        KdlValue::Null => Literal::Null,
    };
    let content_start = match &literal {
        Literal::String(s) => content_start(text, value_span, repr, s),
        _ => None,
    };
    Entry {
        key,
        value: Value {
            literal,
            span: value_span,
            content_start,
        },
        span,
    }
}

/// Where the characters of a string start in the source, if they map one-to-one.
fn content_start(text: &str, span: Span, repr: &str, value: &str) -> Option<usize> {
    let hashes = repr.bytes().take_while(|b| *b == b'#').count();
    let rest = &repr[hashes..];
    let start = if rest.starts_with("\"\"\"") {
        return None;
    } else if let Some(stripped) = rest.strip_prefix('"') {
        if hashes == 0 && stripped.contains('\\') {
            return None;
        }
        span.start + hashes + 1
    } else {
        // A bare identifier string: the token is the value.
        span.start
    };
    (text.get(start..start + value.len()) == Some(value)).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Document {
        let (doc, diags) = parse(FileId(0), text);
        assert!(diags.is_empty(), "{diags:?}");
        doc.expect("document")
    }

    #[test]
    fn spans_point_at_names_keys_and_values() {
        let text = "spec \"a\" {\n    vm memory=\"1GiB\" vcpus=2\n    run #\"raw\"# bare\n}\n";
        let doc = parse_ok(text);
        let spec = &doc.nodes[0];
        let vm = &spec.children.as_ref().expect("children")[0];
        let at = |s: Span| &text[s.start..s.end];
        assert_eq!(at(vm.name.span), "vm");
        let mem = vm.prop("memory").expect("memory");
        assert_eq!(at(mem.key.as_ref().expect("key").span), "memory");
        assert_eq!(at(mem.value.span), "\"1GiB\"");
        assert_eq!(at(mem.value.content_span(1, 4)), "GiB");
        assert_eq!(at(vm.prop("vcpus").expect("vcpus").value.span), "2");
        let run = &spec.children.as_ref().expect("children")[1];
        assert_eq!(at(run.arg(0).expect("raw").value.content_span(0, 3)), "raw");
        assert_eq!(
            at(run.arg(1).expect("bare").value.content_span(0, 4)),
            "bare"
        );
        assert_eq!(at(run.head_span()), "run #\"raw\"# bare");
    }

    #[test]
    fn escaped_strings_fall_back_to_the_whole_token() {
        let text = "run \"a\\tb\"";
        let doc = parse_ok(text);
        let v = &doc.nodes[0].entries[0].value;
        assert_eq!(v.content_start, None);
        assert_eq!(v.content_span(0, 1), v.span);
    }

    #[test]
    fn syntax_errors_point_where_the_parser_gave_up() {
        let text = "spec \"a\" {\n    vm memory=\n}\n";
        let (_, diags) = parse(FileId(0), text);
        let d = &diags[0];
        assert_eq!(
            &text[d.primary.span.start..d.primary.span.end],
            "=",
            "{diags:?}"
        );
    }

    #[test]
    fn syntax_errors_are_diagnostics_not_failures() {
        let (doc, diags) = parse(FileId(0), "spec \"a\" {\n  vm x=\n");
        assert!(doc.is_none());
        assert!(!diags.is_empty());
        assert!(diags.iter().all(|d| d.code == Code::KdlSyntax));
    }
}

#[cfg(test)]
mod hammer {
    //! The fuzz target's checks as a proptest, so every `cargo test` hammers the parser with
    //! KDL-shaped garbage even where cargo-fuzz (nightly) is not available.

    use proptest::prelude::*;

    use super::*;
    use crate::Files;

    fn kdl_ish() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("spec".to_owned()),
            Just("layer".to_owned()),
            Just("run".to_owned()),
            Just("\"x\"".to_owned()),
            Just("#\"raw\"#".to_owned()),
            Just("\"\"\"\n  multi\n  \"\"\"".to_owned()),
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("=".to_owned()),
            Just(";".to_owned()),
            Just("\n".to_owned()),
            Just(" ".to_owned()),
            Just("/-".to_owned()),
            Just("//c\n".to_owned()),
            Just("/*".to_owned()),
            Just("*/".to_owned()),
            Just("(t)".to_owned()),
            Just("0o7".to_owned()),
            Just("1.5e3".to_owned()),
            Just("#true".to_owned()),
            Just("é".to_owned()),
            Just("\\".to_owned()),
            "[a-z]{1,6}".prop_map(|s| s),
            any::<char>().prop_map(|c| c.to_string()),
        ];
        prop::collection::vec(token, 0..60).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512), ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_and_spans_stay_in_bounds(text in kdl_ish()) {
            let (_, diags) = parse(FileId(0), &text);
            let mut files = Files::new();
            files.add("t.kdl", text.as_str());
            for d in &diags {
                prop_assert!(d.primary.span.end <= text.len());
                prop_assert!(text.is_char_boundary(d.primary.span.start));
                prop_assert!(text.is_char_boundary(d.primary.span.end));
                let _ = d.to_short(&files);
            }
        }

        #[test]
        fn formatting_is_idempotent(text in kdl_ish()) {
            if let Ok(once) = crate::format::format(FileId(0), &text) {
                let twice = crate::format::format(FileId(0), &once);
                prop_assert_eq!(twice.as_ref(), Ok(&once), "input {:?}", text);
            }
        }

        #[test]
        fn value_grammars_never_panic(s in "\\PC{0,24}") {
            let _ = crate::value::parse_size(&s);
            let _ = crate::value::parse_duration(&s);
            let _ = crate::value::parse_port(&s);
            let _ = crate::value::parse_template(&s);
        }
    }
}
