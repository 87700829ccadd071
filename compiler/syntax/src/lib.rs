//! The spec language: KDL source to a spanned AST, value grammars and diagnostics. No I/O.
//!
//! Architecture invariant: this crate does no I/O. Callers read files and hand over text;
//! everything here is a pure function of that text.
//!
//! Architecture invariant: parsing never fails. [`parse`] returns `(Option<Document>,
//! Vec<Diagnostic>)`; a syntax error is a diagnostic, never a panic or an early return.

#![deny(missing_docs)]

pub mod ast;
pub mod diagnostic;
pub mod format;
pub mod source;
pub mod suggest;
pub mod value;

pub use ast::{Document, Entry, Ident, Literal, Node, Value};
pub use diagnostic::{Code, Diagnostic, Label, Severity};
pub use source::{FileId, Files, LineCol, Span};

/// Parses one KDL v2 source file into a spanned [`Document`].
///
/// Returns `None` for the document when the KDL itself does not parse; the diagnostics then say
/// why (all of them the KDL parser found, not only the first).
pub fn parse(file: FileId, text: &str) -> (Option<Document>, Vec<Diagnostic>) {
    ast::parse(file, text)
}
